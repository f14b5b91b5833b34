//! `kvsift score`: teacher-forced negative log-likelihood and perplexity,
//! through the serving engine's paged cache.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use kvsift::gpu::GpuContext;
use kvsift::model::TextTokenizer;
use serde_json::json;

use super::common::ModelArgs;

#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to score (tokenised with the model's tokenizer, special tokens added).
    #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
    pub text: Option<String>,
    /// Token ids to score, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub tokens: Option<Vec<u32>>,
    /// The first N tokens run as one prefill (default: all); every later token
    /// is a decode step, exactly as during generation.
    #[arg(long)]
    pub prefill: Option<usize>,
    /// Write the logits after every token to this safetensors file (tensor `logits`, f32 [T, vocab]).
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: ScoreArgs) -> anyhow::Result<()> {
    let ctx = GpuContext::from_env()?;
    let dir = a.model.dir()?;
    let tokens = match (&a.text, &a.tokens) {
        (Some(text), _) => TextTokenizer::load(&dir)?.encode(text, true)?,
        (None, Some(t)) => t.clone(),
        (None, None) => anyhow::bail!("give --text or --tokens"),
    };
    let mut engine = a.model.engine(&ctx, 1)?;
    let prefill = a.prefill.unwrap_or(tokens.len());
    let t0 = std::time::Instant::now();
    let out = engine.score(&tokens, prefill, a.dump_logits.is_some())?;
    let secs = t0.elapsed().as_secs_f64();
    let mean = out.nll.iter().map(|v| *v as f64).sum::<f64>() / out.nll.len() as f64;
    if let (Some(path), Some(logits)) = (&a.dump_logits, &out.logits) {
        let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![tokens.len(), engine.cfg.vocab_size],
            &bytes,
        )?;
        safetensors::serialize_to_file([("logits", view)], None, path)
            .map_err(|e| anyhow::anyhow!("--dump-logits {}: {e}", path.display()))?;
    }
    let stats = engine.stats();
    let mut stdout = std::io::stdout().lock();
    if a.json {
        let j = json!({
            "tokens": tokens.len(),
            "prefill": prefill,
            "scored": out.nll.len(),
            "mean_nll": mean,
            "perplexity": mean.exp(),
            "nll": out.nll,
            "seconds": secs,
            "kv": stats,
        });
        writeln!(stdout, "{}", serde_json::to_string_pretty(&j)?)?;
    } else {
        writeln!(
            stdout,
            "tokens {}  scored {}  mean NLL {:.6}  perplexity {:.4}",
            tokens.len(),
            out.nll.len(),
            mean,
            mean.exp()
        )?;
    }
    Ok(())
}
