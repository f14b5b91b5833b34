//! `kvsift generate`: stream a completion of a prompt.

use std::io::Write;

use clap::Args;
use kvsift::engine::{GenerateOptions, TextStream, generate};
use kvsift::gpu::GpuContext;
use kvsift::model::config::GenerationDefaults;
use kvsift::model::{Message, TextTokenizer};
use serde_json::json;

use super::common::ModelArgs;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
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
    /// Print one JSON object at the end (token ids, text, timings) instead of streaming.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let ctx = GpuContext::from_env()?;
    let dir = a.model.dir()?;
    let tokenizer = TextTokenizer::load(&dir)?;
    let defaults = GenerationDefaults::load(&dir)?;
    let mut model = a.model.load(&ctx)?;

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
    sampling.seed = a.seed;
    sampling.validate()?;

    let prompt_ids = if a.chat {
        let text = tokenizer.apply_chat_template(
            &[Message {
                role: "user".into(),
                content: a.prompt.clone(),
            }],
            true,
        )?;
        tokenizer.encode(&text, false)?
    } else {
        tokenizer.encode(&a.prompt, true)?
    };
    let mut stop_ids = defaults.eos_token_ids.clone();
    stop_ids.extend(model.cfg.eos_token_ids.iter().copied());
    stop_ids.extend(tokenizer.eos_id());
    stop_ids.sort();
    stop_ids.dedup();
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling,
        stop_ids,
    };

    let mut stream = TextStream::new(&tokenizer);
    let mut stdout = std::io::stdout().lock();
    let mut failed = None;
    let g = generate(&mut model, &prompt_ids, &opts, |t| {
        if a.json {
            return true;
        }
        match stream.push(t) {
            Ok(text) => {
                let _ = write!(stdout, "{text}");
                let _ = stdout.flush();
                true
            }
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    let text = tokenizer.decode(&g.tokens, true)?;
    if a.json {
        let out = json!({
            "model": dir.display().to_string(),
            "prompt_tokens": g.prompt_tokens,
            "prompt_ids": prompt_ids,
            "tokens": g.tokens,
            "text": text,
            "stop": g.stop.as_str(),
            "prefill_ms": g.prefill_s * 1e3,
            "decode_ms": g.decode_s * 1e3,
            "prefill_tok_s": g.prefill_tok_s(),
            "decode_tok_s": g.decode_tok_s(),
            "sampling": {
                "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
                "min_p": sampling.min_p, "repetition_penalty": sampling.repetition_penalty, "seed": sampling.seed,
            },
            "weights_dtype": format!("{:?}", model.weights_dtype).to_lowercase(),
            "weight_bytes": model.weight_bytes(),
            "kv_bytes": model.kv_bytes(),
            "adapter": ctx.adapter_summary.name,
        });
        writeln!(stdout, "{}", serde_json::to_string_pretty(&out)?)?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "[{} prompt tokens, {} generated ({}); prefill {:.1} tok/s, decode {:.1} tok/s]",
            g.prompt_tokens,
            g.tokens.len(),
            g.stop.as_str(),
            g.prefill_tok_s(),
            g.decode_tok_s()
        );
    }
    Ok(())
}
