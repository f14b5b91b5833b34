//! `kvsift bench`: llama-bench-style prompt processing (pp) and token
//! generation (tg) figures, the device's copy bandwidth (`bench roofline`),
//! per-kernel decode profiles (`--profile`), and the fixed-memory throughput
//! experiment of the R-KV paper (`bench throughput`).

use std::io::Write;
use std::time::Instant;

use clap::Args;
use kvsift::engine::{Engine, Event, Request};
use kvsift::gpu::{Dispatch, GpuBuffer, GpuContext};
use kvsift::kv::compression::{CompressConfig, Method};
use kvsift::model::config::ModelConfig;
use kvsift::ops::copy::copy_vec4;
use kvsift::ops::sample::SamplingParams;
use serde_json::json;

use super::common::ModelArgs;

/// `kvsift bench`: pp and tg figures, or one of the other measurements.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: Option<BenchMode>,
    #[command(flatten)]
    pub pp_tg: PpTgArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchMode {
    /// The device's copy bandwidth (the decode roofline).
    Roofline(RooflineArgs),
    /// Concurrent sequences in a fixed KV pool: the full cache against --kv.
    Throughput(ThroughputArgs),
    /// One long generation (or --batch of them): KV pages, bytes and host
    /// memory over time.
    Soak(SoakArgs),
    /// A load test against a running `kvsift serve`: concurrent streamed
    /// completions, with and without a `kv` per request.
    Serve(super::bench_serve::ServeBenchArgs),
}

/// llama-bench's pp (prompt processing) and tg (token generation) tests.
#[derive(Args, Debug)]
pub struct PpTgArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens of the pp test (0: skip it).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    pub n_prompt: usize,
    /// Generated tokens of the tg test (0: skip it).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub n_gen: usize,
    /// Repetitions of each test (after one warm-up run).
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub repetitions: usize,
    /// Sequences generated together in the tg test.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Per-kernel GPU time of one decode step (at the end of a tg run).
    #[arg(long)]
    pub profile: bool,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RooflineArgs {
    /// Print JSON instead of the line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Generated tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub gen_len: usize,
    /// Most concurrent sequences tried.
    #[arg(long, default_value_t = 256)]
    pub max_sequences: usize,
    /// Prompts from a JSONL file (`{"prompt": ...}` lines, e.g. a model's
    /// eval/tally.jsonl), taken in turn, instead of --prompt-len random tokens.
    #[arg(long)]
    pub prompts: Option<std::path::PathBuf>,
    /// Also draw the comparison as an SVG bar chart to this file.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SoakArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tokens each sequence generates.
    #[arg(long, default_value_t = 100_000)]
    pub tokens: usize,
    /// Samples taken over the run.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// Sequences generated together.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Mean and sample standard deviation.
fn mean_sd(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n;
    let v = if x.len() > 1 {
        x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, v.sqrt())
}

/// Parameters of a Llama-family model from its configuration.
fn param_count(c: &ModelConfig) -> u64 {
    let (h, i, v) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
    );
    let per_layer = c.qkv_dim() as u64 * h + c.q_dim() as u64 * h + 3 * i * h + 2 * h;
    let head = if c.tie_word_embeddings { 0 } else { v * h };
    v * h + c.n_layers as u64 * per_layer + h + head
}

pub(super) fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else {
        format!("{:.2} MiB", b / (1024.0 * 1024.0))
    }
}

pub(super) fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = kvsift::rng::Rng::new(seed);
    (0..n).map(|_| rng.below(vocab.min(32000)) as u32).collect()
}

pub(super) fn request(prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
        prompt,
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
        compression: None,
        logprobs: None,
    }
}

/// Runs the engine until idle; returns the steps' count and the most
/// sequences that ran at once.
fn drain(e: &mut Engine) -> anyhow::Result<(usize, usize)> {
    let mut steps = 0;
    let mut most = 0;
    while e.has_work() {
        for ev in e.step()? {
            if let Event::Failed { error, .. } = ev {
                anyhow::bail!("{error}");
            }
        }
        most = most.max(e.stats().running);
        steps += 1;
    }
    Ok((steps, most))
}

/// Copy bandwidth of the device (read + write bytes / time), best of 5 runs.
pub fn roofline(ctx: &GpuContext) -> anyhow::Result<f64> {
    let bytes = (ctx.caps.max_binding_bytes.min(256 << 20) / 16) * 16;
    let n = (bytes / 16) as usize;
    let src = GpuBuffer::<u32>::zeros(ctx, "roofline.src", 4 * n)?;
    let dst = GpuBuffer::<u32>::zeros(ctx, "roofline.dst", 4 * n)?;
    let d = copy_vec4(ctx, n, &src, &dst)?;
    let reps = 4;
    let list: Vec<&Dispatch> = (0..reps).map(|_| &d).collect();
    ctx.run("roofline.warmup", &list)?;
    ctx.wait_idle()?;
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        ctx.run("roofline", &list)?;
        ctx.wait_idle()?;
        best = best.max(2.0 * bytes as f64 * reps as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    Ok(best)
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    // The load test is a client: it needs no GPU here.
    if let Some(BenchMode::Serve(s)) = &a.mode {
        return super::bench_serve::run(s);
    }
    let ctx = GpuContext::from_env()?;
    match a.mode {
        None => pp_tg(&ctx, &a.pp_tg),
        Some(BenchMode::Roofline(a)) => {
            let gbs = roofline(&ctx)?;
            if a.json {
                outln!(
                    "{}",
                    json!({"adapter": ctx.adapter_summary.name, "copy_gb_s": gbs})
                );
            } else {
                outln!(
                    "{}: copy {gbs:.1} GB/s (read + write, decimal GB)",
                    ctx.adapter_summary.name
                );
            }
            Ok(())
        }
        Some(BenchMode::Throughput(a)) => throughput(&ctx, &a),
        Some(BenchMode::Soak(a)) => super::soak::run(&ctx, &a),
        Some(BenchMode::Serve(_)) => Ok(()),
    }
}

fn pp_tg(ctx: &GpuContext, a: &PpTgArgs) -> anyhow::Result<()> {
    if a.repetitions == 0 || a.batch == 0 {
        anyhow::bail!("-r and --batch must be at least 1");
    }
    if a.n_prompt == 0 && a.n_gen == 0 {
        anyhow::bail!("-p 0 and -n 0: nothing to measure (give -p N, -n N or both)");
    }
    let dir = a.model.dir()?;
    let mut engine = a.model.engine(ctx, a.batch)?;
    let cfg = engine.cfg.clone();
    if a.n_prompt >= engine.capacity() || a.n_gen + 1 >= engine.capacity() {
        anyhow::bail!(
            "-p {} / -n {}: the model's context holds {} positions (--max-context)",
            a.n_prompt,
            a.n_gen,
            engine.capacity()
        );
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let size = engine.weight_bytes();
    let decode_size = engine.decode_weight_bytes();
    let weights = engine.weights_summary();
    let params = param_count(&cfg);
    let backend = format!("wgpu {:?}", ctx.adapter_summary.backend).to_lowercase();
    let mut rows = vec![];
    let mut prefill_profile = None;

    if a.n_prompt > 0 {
        let mut rates = vec![];
        for rep in 0..=a.repetitions {
            engine.add_request(request(tokens(rep as u64, a.n_prompt, cfg.vocab_size), 1))?;
            let t = Instant::now();
            drain(&mut engine)?;
            if rep > 0 {
                rates.push(a.n_prompt as f64 / t.elapsed().as_secs_f64());
            }
        }
        rows.push((format!("pp{}", a.n_prompt), rates, None));
        if a.profile {
            // One more run, untimed: profile the prefill's kernels.
            engine.profile_next_prefill();
            engine.add_request(request(tokens(0, a.n_prompt, cfg.vocab_size), 1))?;
            drain(&mut engine)?;
            prefill_profile = engine.take_profile();
        }
    }
    let mut profile = None;
    let mut timing = None;
    if a.n_gen > 0 {
        let mut rates = vec![];
        let mut step_s = vec![];
        for rep in 0..=a.repetitions {
            for b in 0..a.batch {
                let seed = (rep * a.batch + b) as u64;
                engine.add_request(request(tokens(seed, 1, cfg.vocab_size), a.n_gen))?;
            }
            if rep == 1 {
                engine.take_decode_timing(); // the warm-up run's steps
            }
            let t = Instant::now();
            drain(&mut engine)?;
            let s = t.elapsed().as_secs_f64();
            if rep > 0 {
                rates.push((a.n_gen * a.batch) as f64 / s);
                // Per token step (the prefill's first token, then decode
                // steps, several per engine step when chained).
                step_s.push(s / a.n_gen as f64);
            }
        }
        timing = Some(engine.take_decode_timing());
        if a.profile {
            // One more run, untimed: profile a decode step in its middle.
            for b in 0..a.batch {
                engine.add_request(request(tokens(b as u64, 1, cfg.vocab_size), a.n_gen))?;
            }
            for _ in 0..a.n_gen / 2 {
                engine.step()?;
            }
            engine.profile_next_decode();
            engine.step()?;
            profile = engine.take_profile();
            drain(&mut engine)?;
        }
        // Bytes one decode step reads: the weights once, each sequence's KV
        // at its mean length over the run (about n / 2 positions).
        let kv = engine.kv_bytes_per_position() as f64 * (a.n_gen as f64 / 2.0 + 1.0);
        let step_bytes = decode_size as f64 + a.batch as f64 * kv;
        rows.push((
            format!("tg{}", a.n_gen),
            rates,
            Some((step_bytes, mean_sd(&step_s).0)),
        ));
    }
    let copy = roofline(ctx)?;

    let mut out = vec![];
    for (test, rates, bytes) in &rows {
        let (m, sd) = mean_sd(rates);
        let mut row = json!({
            "model": name, "size_bytes": size, "params": params, "backend": backend,
            "weights": weights, "decode_weight_bytes": decode_size,
            "adapter": ctx.adapter_summary.name, "test": test, "batch": a.batch,
            "t_s": m, "t_s_sd": sd, "repetitions": rates.len(),
        });
        if let Some((step_bytes, step)) = bytes {
            let gbs = step_bytes / step / 1e9;
            row["bytes_per_token"] = json!(step_bytes / a.batch as f64);
            row["achieved_gb_s"] = json!(gbs);
            row["roofline_gb_s"] = json!(copy);
            row["roofline_fraction"] = json!(gbs / copy);
        }
        out.push(row);
    }
    let mut stdout = std::io::stdout().lock();
    if a.json {
        let mut j = json!({ "results": out, "roofline_gb_s": copy });
        if let Some(t) = timing.filter(|t| t.steps > 0) {
            j["decode_steps"] = json!(t.steps);
            j["decode_submissions"] = json!(t.submissions);
            j["decode_host_ms"] = json!(per_step_ms(t.host, t.steps));
            j["decode_wait_ms"] = json!(per_step_ms(t.wait, t.steps));
        }
        let kernels = |p: &[(String, f64)]| {
            json!(
                p.iter()
                    .map(|(l, ns)| json!({"kernel": l, "ns": ns}))
                    .collect::<Vec<_>>()
            )
        };
        if let Some(p) = &profile {
            j["profile"] = kernels(p);
        }
        if let Some(p) = &prefill_profile {
            j["prefill_profile"] = kernels(p);
        }
        writeln!(stdout, "{}", serde_json::to_string_pretty(&j)?)?;
        return Ok(());
    }
    writeln!(
        stdout,
        "| model | size | params | backend | test | t/s |\n|---|---|---|---|---|---|"
    )?;
    for r in &out {
        writeln!(
            stdout,
            "| {} | {} | {:.2} M | {} | {}{} | {:.2} ± {:.2} |",
            r["model"].as_str().unwrap_or(""),
            human(size),
            params as f64 / 1e6,
            backend,
            r["test"].as_str().unwrap_or(""),
            if a.batch > 1 && r["test"].as_str().unwrap_or("").starts_with("tg") {
                format!(" x{}", a.batch)
            } else {
                String::new()
            },
            r["t_s"].as_f64().unwrap_or(0.0),
            r["t_s_sd"].as_f64().unwrap_or(0.0)
        )?;
    }
    for r in &out {
        if let Some(g) = r["achieved_gb_s"].as_f64() {
            writeln!(
                stdout,
                "\ndecode reads {} per token (weights {} in {weights} + KV), {g:.2} GB/s achieved = {:.1}% of the copy roofline {copy:.2} GB/s ({})",
                human(r["bytes_per_token"].as_f64().unwrap_or(0.0) as u64),
                human(decode_size),
                100.0 * r["roofline_fraction"].as_f64().unwrap_or(0.0),
                ctx.adapter_summary.name
            )?;
        }
    }
    if let Some(t) = timing.filter(|t| t.steps > 0) {
        writeln!(
            stdout,
            "decode step: {:.3} ms on the host (descriptors, encode, submit) + {:.3} ms from submission to the tokens on the host (GPU work, readback); mean of {} steps in {} submissions",
            per_step_ms(t.host, t.steps),
            per_step_ms(t.wait, t.steps),
            t.steps,
            t.submissions
        )?;
    }
    if let Some(p) = prefill_profile {
        let what = format!("pp{} profile", a.n_prompt);
        print_profile(&mut stdout, &what, &p, ctx.caps.features.timestamps)?;
    }
    if let Some(p) = profile {
        print_profile(
            &mut stdout,
            "decode step profile",
            &p,
            ctx.caps.features.timestamps,
        )?;
    }
    Ok(())
}

fn per_step_ms(d: std::time::Duration, steps: u64) -> f64 {
    d.as_secs_f64() * 1e3 / steps as f64
}

/// Kernels of one decode step by total time, merged by label.
fn print_profile(
    out: &mut impl Write,
    what: &str,
    p: &[(String, f64)],
    timestamps: bool,
) -> anyhow::Result<()> {
    let total: f64 = p.iter().map(|x| x.1).sum();
    let mut by: Vec<(String, f64, usize)> = vec![];
    for (l, ns) in p {
        match by.iter_mut().find(|x| &x.0 == l) {
            Some(x) => {
                x.1 += ns;
                x.2 += 1;
            }
            None => by.push((l.clone(), *ns, 1)),
        }
    }
    by.sort_by(|a, b| b.1.total_cmp(&a.1));
    writeln!(
        out,
        "\n{what} ({}): {:.3} ms in {} dispatches",
        if timestamps {
            "GPU timestamps"
        } else {
            "host time per dispatch, no timestamp queries"
        },
        total / 1e6,
        p.len()
    )?;
    writeln!(out, "| kernel | calls | ms | % |\n|---|---|---|---|")?;
    for (l, ns, n) in by {
        writeln!(
            out,
            "| {l} | {n} | {:.3} | {:.1} |",
            ns / 1e6,
            100.0 * ns / total
        )?;
    }
    Ok(())
}

fn throughput(ctx: &GpuContext, a: &ThroughputArgs) -> anyhow::Result<()> {
    let Some(mb) = a.model.kv_pool_mb else {
        anyhow::bail!("bench throughput needs --kv-pool-mb M (the fixed KV memory)");
    };
    if a.prompt_len == 0 || a.gen_len == 0 {
        anyhow::bail!("--prompt-len and --gen-len must be positive");
    }
    let method = a.model.compress.config()?;
    if !method.method.policy().compresses() {
        anyhow::bail!(
            "bench throughput compares the full cache with a method: pass --kv METHOD --budget B"
        );
    }
    // The prompts: a file's, tokenized, or random tokens of --prompt-len.
    let file_prompts: Option<Vec<Vec<u32>>> = match &a.prompts {
        None => None,
        Some(path) => {
            let tok = kvsift::model::TextTokenizer::load(&a.model.dir()?)?;
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--prompts {}: {e}", path.display()))?;
            let mut out = vec![];
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
                let p = v["prompt"].as_str().ok_or_else(|| {
                    anyhow::anyhow!("{}:{}: no string \"prompt\"", path.display(), i + 1)
                })?;
                out.push(tok.encode(p, true)?);
            }
            if out.is_empty() {
                anyhow::bail!("--prompts {}: no prompts", path.display());
            }
            Some(out)
        }
    };
    let prompt = |i: usize, vocab: usize| -> Vec<u32> {
        match &file_prompts {
            Some(ps) => ps[i % ps.len()].clone(),
            None => tokens(i as u64, a.prompt_len, vocab),
        }
    };
    let longest = file_prompts.as_ref().map_or(a.prompt_len, |ps| {
        ps.iter().map(Vec::len).max().unwrap_or(0)
    });
    let mean_prompt = file_prompts.as_ref().map_or(a.prompt_len as f64, |ps| {
        ps.iter().map(Vec::len).sum::<usize>() as f64 / ps.len() as f64
    });
    let mut results = vec![];
    for compressed in [false, true] {
        let mut args = a.model.clone();
        args.kv_pool_mb = Some(mb);
        let compression = if compressed {
            method.clone()
        } else {
            CompressConfig::new(Method::None, 0)
        };
        // One sequence alone: its peak pages.
        let mut probe = args.engine_with(ctx, 1, compression.clone())?;
        let vocab = probe.cfg.vocab_size;
        if longest + a.gen_len >= probe.capacity() {
            anyhow::bail!(
                "the longest prompt + --gen-len = {} exceeds the context {} (--max-context)",
                longest + a.gen_len,
                probe.capacity()
            );
        }
        probe.add_request(request(prompt(0, vocab), a.gen_len))?;
        drain(&mut probe)?;
        let one = probe.stats().peak_pages_in_use.max(1);
        let total = probe.stats().pool.pages_total;
        let page_bytes = probe.stats().pool.page_bytes;
        drop(probe);
        let n = (total / one).min(a.max_sequences);
        if n == 0 {
            anyhow::bail!("one sequence needs {one} pages; the pool holds {total}");
        }
        let mut e = args.engine_with(ctx, n, compression.clone())?;
        for i in 0..n {
            e.add_request(request(prompt(i + 1, vocab), a.gen_len))?;
        }
        let t = Instant::now();
        let (_, most) = drain(&mut e)?;
        let s = t.elapsed().as_secs_f64();
        let st = e.stats();
        results.push(json!({
            "kv": compression.method.name(),
            "budget": compressed.then_some(compression.budget),
            "pages_per_sequence": one,
            "max_concurrent": most,
            "sequences": n,
            "seconds": s,
            "tok_s": (n * a.gen_len) as f64 / s,
            "peak_kv_bytes": st.peak_pages_in_use * page_bytes,
            "preemptions": st.preemptions,
        }));
    }
    let ratio = |k: &str| {
        results[1][k].as_f64().unwrap_or(0.0) / results[0][k].as_f64().unwrap_or(1.0).max(1e-9)
    };
    let summary = json!({
        "pool_mb": mb, "prompt_len": mean_prompt, "gen_len": a.gen_len,
        "prompts": a.prompts.as_ref().map(|p| p.display().to_string()),
        "adapter": ctx.adapter_summary.name,
        "runs": results, "concurrency_ratio": ratio("max_concurrent"), "throughput_ratio": ratio("tok_s"),
    });
    if let Some(path) = &a.plot {
        let bars: Vec<(String, f64, f64)> = results
            .iter()
            .map(|r| {
                let kv = r["kv"].as_str().unwrap_or("");
                let label = match r["budget"].as_u64() {
                    Some(b) => format!("{kv} B={b}"),
                    None => "full cache".to_string(),
                };
                let most = r["max_concurrent"].as_f64().unwrap_or(0.0);
                (label, most, r["tok_s"].as_f64().unwrap_or(0.0))
            })
            .collect();
        let title = format!(
            "fixed KV memory {mb} MiB, {} generated tokens per sequence",
            a.gen_len
        );
        let svg = super::plot::throughput_svg(&title, &bars)?;
        std::fs::write(path, svg).map_err(|e| anyhow::anyhow!("--plot {}: {e}", path.display()))?;
    }
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    outln!(
        "fixed KV pool {mb} MiB, prompt {mean_prompt:.0}{} + {} generated tokens per sequence ({})",
        if a.prompts.is_some() { " (mean)" } else { "" },
        a.gen_len,
        ctx.adapter_summary.name
    );
    outln!(
        "| kv | pages/seq | max concurrent | tok/s | peak KV | preemptions |\n|---|---|---|---|---|---|"
    );
    for r in &results {
        outln!(
            "| {} | {} | {} | {:.1} | {} | {} |",
            r["kv"].as_str().unwrap_or(""),
            r["pages_per_sequence"],
            r["max_concurrent"],
            r["tok_s"].as_f64().unwrap_or(0.0),
            human(r["peak_kv_bytes"].as_u64().unwrap_or(0)),
            r["preemptions"]
        );
    }
    outln!(
        "{} vs none: {:.2}x concurrent sequences, {:.2}x throughput",
        results[1]["kv"].as_str().unwrap_or(""),
        ratio("max_concurrent"),
        ratio("tok_s")
    );
    Ok(())
}
