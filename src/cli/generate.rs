//! `kvsift generate`: complete one or more prompts on the serving engine,
//! streaming the text of a single request.

use std::collections::HashMap;
use std::io::Write;
use std::time::Instant;

use clap::Args;
use kvsift::engine::{Event, Request};
use kvsift::gpu::GpuContext;
use kvsift::model::TextStream;
use kvsift::model::config::GenerationDefaults;
use kvsift::model::{Message, TextTokenizer};
use serde_json::json;

use super::common::ModelArgs;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text; repeat the flag for several prompts, served concurrently.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// Run every prompt this many times concurrently (seeds seed, seed+1, ...).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Wrap each prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate per request.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 = greedy. Default: the model's generation_config.json (greedy without one).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens with this much probability (1 = off).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than min_p times the most likely one (0 = off).
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Penalise tokens already in the sequence (1 = off).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler's generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object at the end (token ids, text, timings, KV pool use) instead of streaming.
    #[arg(long)]
    pub json: bool,
}

struct Outcome {
    prompt_ids: Vec<u32>,
    tokens: Vec<u32>,
    stop: Option<String>,
    first_token: Option<f64>,
    last_token: Option<f64>,
    id: kvsift::engine::RequestId,
}

/// Most requests one `generate` queues (each holds its prompt's tokens).
const MAX_REQUESTS: usize = 1 << 20;

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let n_requests = a
        .prompt
        .len()
        .checked_mul(a.batch)
        .filter(|n| (1..=MAX_REQUESTS).contains(n))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--batch {} with {} prompts: expected 1 to {MAX_REQUESTS} requests in all",
                a.batch,
                a.prompt.len()
            )
        })?;
    let ctx = GpuContext::from_env()?;
    let dir = a.model.dir()?;
    let tokenizer = TextTokenizer::load(&dir)?;
    let defaults = GenerationDefaults::load(&dir)?;
    // Requests beyond the lanes the device holds wait their turn.
    let lanes = a.model.lanes_for(&ctx, &dir, n_requests)?;
    let mut engine = a.model.engine(&ctx, lanes)?;

    let mut sampling = defaults.sampling;
    if let Some(t) = a.temperature {
        sampling.temperature = t;
    }
    if let Some(k) = a.top_k {
        sampling.top_k = k;
    }
    if let Some(p) = a.top_p {
        sampling.top_p = p;
    }
    if let Some(p) = a.min_p {
        sampling.min_p = p;
    }
    if let Some(r) = a.repetition_penalty {
        sampling.repetition_penalty = r;
    }
    sampling.validate()?;
    let mut stop_ids = defaults.eos_token_ids.clone();
    stop_ids.extend(engine.cfg.eos_token_ids.iter().copied());
    stop_ids.extend(tokenizer.eos_id());
    stop_ids.sort();
    stop_ids.dedup();

    let mut outcomes: Vec<Outcome> = vec![];
    let mut by_id = HashMap::new();
    for (pi, text) in a.prompt.iter().enumerate() {
        let prompt_ids = if a.chat {
            let rendered = tokenizer.apply_chat_template(
                &[Message {
                    role: "user".into(),
                    content: text.clone(),
                }],
                true,
            )?;
            tokenizer.encode(&rendered, false)?
        } else {
            tokenizer.encode(text, true)?
        };
        for copy in 0..a.batch {
            let mut s = sampling;
            s.seed = a.seed + (pi * a.batch + copy) as u64;
            let id = engine.add_request(Request {
                prompt: prompt_ids.clone(),
                max_tokens: a.max_tokens,
                sampling: s,
                stop_ids: stop_ids.clone(),
                compression: None,
                logprobs: None,
            })?;
            by_id.insert(id, outcomes.len());
            outcomes.push(Outcome {
                prompt_ids: prompt_ids.clone(),
                tokens: vec![],
                stop: None,
                first_token: None,
                last_token: None,
                id,
            });
        }
    }

    let stream_one = n_requests == 1 && !a.json;
    let mut stream = TextStream::new(&tokenizer);
    let mut stdout = std::io::stdout().lock();
    let start = Instant::now();
    let mut failures = vec![];
    while engine.has_work() {
        for ev in engine.step()? {
            let now = start.elapsed().as_secs_f64();
            match ev {
                Event::Token { id, token } => {
                    let o = &mut outcomes[by_id[&id]];
                    o.tokens.push(token);
                    o.first_token.get_or_insert(now);
                    o.last_token = Some(now);
                    if stream_one {
                        write!(stdout, "{}", stream.push(token)?)?;
                        stdout.flush()?;
                    }
                }
                Event::Finished { id, reason } => {
                    outcomes[by_id[&id]].stop = Some(reason.as_str().into())
                }
                Event::Preempted { id } => {
                    // It resumes exactly where it stopped: its streamed tokens stay valid.
                    log::info!("request {id} preempted; it resumes when the pool has room");
                }
                Event::Failed { id, error } => {
                    outcomes[by_id[&id]].stop = Some(format!("failed: {error}"));
                    failures.push(error);
                }
                Event::Logits { .. } | Event::Logprobs { .. } => {}
            }
        }
    }
    if stream_one {
        write!(stdout, "{}", stream.finish()?)?;
    }
    let total_s = start.elapsed().as_secs_f64();
    let stats = engine.stats();
    let generated: usize = outcomes.iter().map(|o| o.tokens.len()).sum();

    if a.json {
        let results: Vec<_> = outcomes
            .iter()
            .map(|o| {
                let ttft = o.first_token.unwrap_or(total_s);
                let decode_s = o.last_token.unwrap_or(ttft) - ttft;
                json!({
                    "prompt_tokens": o.prompt_ids.len(),
                    "prompt_ids": o.prompt_ids,
                    "tokens": o.tokens,
                    "text": tokenizer.decode(&o.tokens, true).unwrap_or_default(),
                    "stop": o.stop,
                    "time_to_first_token_ms": ttft * 1e3,
                    "prefill_tok_s": o.prompt_ids.len() as f64 / ttft.max(1e-9),
                    "decode_tok_s": o.tokens.len().saturating_sub(1) as f64 / decode_s.max(1e-9),
                    "kv_slots_per_layer": engine.final_slots(o.id),
                })
            })
            .collect();
        let mut out = json!({
            "model": dir.display().to_string(),
            "requests": &results,
            "seconds": total_s,
            "generated_tokens": generated,
            "throughput_tok_s": generated as f64 / total_s.max(1e-9),
            "sampling": {
                "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
                "min_p": sampling.min_p, "repetition_penalty": sampling.repetition_penalty, "seed": a.seed,
            },
            "weights_dtype": a.model.weights_dtype,
            "weight_bytes": engine.weight_bytes(),
            "kv": stats,
            "kv_compression": compression_json(&a.model.compress),
            "adapter": ctx.adapter_summary.name,
        });
        // With one request, its fields also at the top level.
        if let ([one], Some(top)) = (&results[..], out.as_object_mut())
            && let Some(fields) = one.as_object()
        {
            top.extend(fields.clone());
        }
        writeln!(stdout, "{}", serde_json::to_string_pretty(&out)?)?;
    } else if stream_one {
        writeln!(stdout)?;
        let o = &outcomes[0];
        let ttft = o.first_token.unwrap_or(total_s);
        note!(
            "[{} prompt tokens, {} generated ({}); prefill {:.1} tok/s, decode {:.1} tok/s]",
            o.prompt_ids.len(),
            o.tokens.len(),
            o.stop.as_deref().unwrap_or("?"),
            o.prompt_ids.len() as f64 / ttft.max(1e-9),
            o.tokens.len().saturating_sub(1) as f64
                / (o.last_token.unwrap_or(ttft) - ttft).max(1e-9)
        );
    } else {
        for (i, o) in outcomes.iter().enumerate() {
            writeln!(
                stdout,
                "[{i}] ({}) {}",
                o.stop.as_deref().unwrap_or("?"),
                tokenizer.decode(&o.tokens, true)?
            )?;
        }
        note!(
            "[{n_requests} requests, {generated} tokens in {total_s:.2} s: {:.1} tok/s; peak KV pages {} of {}]",
            generated as f64 / total_s.max(1e-9),
            stats.peak_pages_in_use,
            stats.pool.pages_total
        );
    }
    if let Some(e) = failures.first() {
        anyhow::bail!("{} of {n_requests} requests failed: {e}", failures.len());
    }
    Ok(())
}

/// The compression settings in effect, for `--json`.
fn compression_json(c: &super::compress::CompressArgs) -> serde_json::Value {
    match c.config() {
        Ok(cfg) => json!({
            "method": format!("{:?}", cfg.method).to_lowercase(),
            "budget": cfg.budget,
            "window": cfg.window,
            "schedule": format!("{:?}", cfg.schedule).to_lowercase(),
            "buffer": cfg.buffer,
        }),
        Err(_) => serde_json::Value::Null,
    }
}
