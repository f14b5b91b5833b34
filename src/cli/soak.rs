//! `kvsift bench soak`: one long generation (or `--batch` of them) with the
//! KV pool, the longest head and the process's resident memory sampled over
//! time. Under a decode-schedule method (R-KV) the cache must stay flat,
//! bounded by budget + buffer slots per head, however long the run; without
//! compression it grows until the context is full.

use std::time::Instant;

use kvsift::engine::{Event, StopReason};
use kvsift::gpu::GpuContext;
use kvsift::kv::compression::Schedule;
use serde_json::json;

use super::bench::{SoakArgs, human, request, tokens};

/// The process's resident set, from /proc (None where there is no /proc).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(ctx: &GpuContext, a: &SoakArgs) -> anyhow::Result<()> {
    if a.tokens == 0 || a.samples == 0 || a.batch == 0 || a.prompt_len == 0 {
        anyhow::bail!("--tokens, --samples, --batch and --prompt-len must be at least 1");
    }
    let compress = a.model.compress.config()?;
    let mut engine = a.model.engine(ctx, a.batch)?;
    if a.prompt_len >= engine.capacity() {
        anyhow::bail!(
            "--prompt-len {} exceeds the context {} (--max-context)",
            a.prompt_len,
            engine.capacity()
        );
    }
    let vocab = engine.cfg.vocab_size;
    for b in 0..a.batch {
        // No stop token: every sequence runs its --tokens (or to a full context).
        engine.add_request(request(tokens(b as u64, a.prompt_len, vocab), a.tokens))?;
    }
    // Under the decode schedule a head holds at most budget + buffer slots.
    let bound = (compress.method.policy().compresses() && compress.schedule == Schedule::Decode)
        .then(|| {
            let slots = compress.budget + compress.buffer;
            (slots, a.batch as u64 * engine.kv_bytes_for_slots(slots))
        });
    let every = a.tokens.div_ceil(a.samples).max(1);
    let start = Instant::now();
    let mut samples = vec![];
    let (mut generated, mut next_sample, mut last) = (0usize, every, (0usize, 0.0f64));
    let mut stops = vec![];
    while engine.has_work() {
        for ev in engine.step()? {
            match ev {
                Event::Token { .. } => generated += 1,
                Event::Finished { reason, .. } => stops.push(reason),
                Event::Failed { error, .. } => anyhow::bail!("a soak sequence failed: {error}"),
                _ => {}
            }
        }
        let per_sequence = generated / a.batch;
        if per_sequence >= next_sample || !engine.has_work() {
            next_sample = per_sequence + every;
            let st = engine.stats();
            let t = start.elapsed().as_secs_f64();
            let rate = (generated - last.0) as f64 / (t - last.1).max(1e-9);
            last = (generated, t);
            samples.push(json!({
                "tokens": per_sequence,
                "seconds": t,
                "tok_s": rate,
                "kv_pages_in_use": st.pool.pages_in_use,
                "kv_bytes_in_use": st.pool.bytes_in_use,
                "longest_head": st.longest_head,
                "rss_bytes": rss_bytes(),
            }));
        }
    }
    let stopped_at_context = stops.contains(&StopReason::Context);
    // After the first compression (the first quarter) the cache must be flat.
    let settled: Vec<&serde_json::Value> = samples.iter().skip(samples.len() / 4).collect();
    let field = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap_or(0);
    let kv_max = settled
        .iter()
        .map(|s| field(s, "kv_bytes_in_use"))
        .max()
        .unwrap_or(0);
    let head_max = settled
        .iter()
        .map(|s| field(s, "longest_head"))
        .max()
        .unwrap_or(0);
    let rss: Vec<u64> = settled.iter().map(|s| field(s, "rss_bytes")).collect();
    let rss_growth = match (rss.first(), rss.last()) {
        (Some(&first), Some(&end)) if first > 0 => Some(end as i64 - first as i64),
        _ => None,
    };
    let summary = json!({
        "model": a.model.dir()?.display().to_string(),
        "adapter": ctx.adapter_summary.name,
        "kv": a.model.compress.kv.name(),
        "budget": compress.budget,
        "buffer": compress.buffer,
        "sequences": a.batch,
        "tokens_per_sequence": generated / a.batch,
        "stopped_at_context": stopped_at_context,
        "seconds": start.elapsed().as_secs_f64(),
        "samples": samples,
        "bound_slots_per_head": bound.map(|b| b.0),
        "bound_kv_bytes": bound.map(|b| b.1),
        "settled_kv_bytes_max": kv_max,
        "settled_longest_head_max": head_max,
        "within_bound": bound.map(|(slots, bytes)| kv_max <= bytes && head_max as usize <= slots),
        "settled_rss_growth_bytes": rss_growth,
    });
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    outln!(
        "soak: {} sequence(s) x {} tokens, --kv {} (budget {}, buffer {}) on {}",
        a.batch,
        generated / a.batch,
        a.model.compress.kv.name(),
        compress.budget,
        compress.buffer,
        ctx.adapter_summary.name
    );
    outln!(
        "| tokens | KV pages | KV bytes | longest head | RSS | tok/s |\n|---|---|---|---|---|---|"
    );
    for s in &samples {
        outln!(
            "| {} | {} | {} | {} | {} | {:.1} |",
            s["tokens"],
            s["kv_pages_in_use"],
            human(field(s, "kv_bytes_in_use")),
            s["longest_head"],
            s["rss_bytes"].as_u64().map_or("?".to_string(), human),
            s["tok_s"].as_f64().unwrap_or(0.0)
        );
    }
    match bound {
        Some((slots, bytes)) => outln!(
            "settled KV: at most {} and {head_max} slots per head (bound: {} = {slots} slots per head){}",
            human(kv_max),
            human(bytes),
            if kv_max <= bytes && head_max as usize <= slots {
                ""
            } else {
                "  ** ABOVE THE BOUND **"
            }
        ),
        None => outln!(
            "settled KV: at most {}{}",
            human(kv_max),
            if stopped_at_context {
                " (the cache grew until the context was full)"
            } else {
                ""
            }
        ),
    }
    if let Some(g) = rss_growth {
        outln!(
            "resident memory over the settled part: {}{:.2} MiB",
            if g >= 0 { "+" } else { "-" },
            g.unsigned_abs() as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(())
}
