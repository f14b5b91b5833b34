//! Flags shared by the subcommands that load a model.

use std::path::PathBuf;

use clap::Args;
use kvsift::gpu::{GpuContext, WeightDtype};
use kvsift::model::{LoadOptions, Model};

/// The model shipped in models/ that runs when no --model is given.
pub const DEFAULT_MODEL: &str = "tiny-llama";

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    /// Default: models/tiny-llama shipped with kvsift.
    #[arg(long, env = "KVSIFT_MODEL")]
    pub model: Option<PathBuf>,
    /// Storage of the weight matrices on the GPU: f16 (packed, half the memory) or f32.
    #[arg(long, default_value = "f16")]
    pub weights_dtype: String,
    /// KV-cache positions to allocate (default: max_position_embeddings, at most 4096).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Tokens per prefill step (longer prompts run in chunks).
    #[arg(long, default_value_t = 256)]
    pub batch_tokens: usize,
}

impl ModelArgs {
    pub fn dir(&self) -> anyhow::Result<PathBuf> {
        if let Some(m) = &self.model {
            if !m.join("config.json").exists() {
                anyhow::bail!(
                    "--model {}: not a model directory (no config.json)",
                    m.display()
                );
            }
            return Ok(m.clone());
        }
        let candidates = [
            PathBuf::from("models").join(DEFAULT_MODEL),
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("models")
                .join(DEFAULT_MODEL),
        ];
        candidates
            .into_iter()
            .find(|p| p.join("config.json").exists())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no --model given and the default models/{DEFAULT_MODEL} was not found; \
                     pass --model DIR (a Hugging Face model directory)"
                )
            })
    }

    pub fn load<'c>(&self, ctx: &'c GpuContext) -> anyhow::Result<Model<'c>> {
        let dtype: WeightDtype = self
            .weights_dtype
            .parse()
            .map_err(|e| anyhow::anyhow!("--weights-dtype {e}"))?;
        let opts = LoadOptions {
            weights_dtype: dtype,
            max_context: self.max_context,
            max_batch_tokens: self.batch_tokens,
            progress: true,
        };
        let dir = self.dir()?;
        Ok(Model::load(ctx, &dir, &opts)?)
    }
}
