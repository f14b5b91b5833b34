//! Flags shared by the subcommands that load a model.

use std::path::PathBuf;

use clap::Args;
use kvsift::engine::{Engine, EngineConfig, Exhaustion};
use kvsift::gpu::{GpuContext, WeightDtype};
use kvsift::kv::paged::PoolConfig;
use kvsift::model::llama::{WeightFormat, load_weights};

use super::compress::CompressArgs;

/// `--weights-dtype`, `--kv-dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeArg {
    #[value(alias = "float16", alias = "half")]
    F16,
    #[value(alias = "float32")]
    F32,
}

/// `--weights-dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightsDtypeArg {
    #[value(alias = "float16", alias = "half")]
    F16,
    #[value(alias = "float32")]
    F32,
    /// llama.cpp's q8_0: 8.5 bits a weight.
    #[value(name = "q8_0")]
    Q8_0,
    /// llama.cpp's q4_0: 4.5 bits a weight.
    #[value(name = "q4_0")]
    Q4_0,
}

impl WeightsDtypeArg {
    pub fn dtype(self) -> WeightDtype {
        match self {
            Self::F16 => WeightDtype::F16,
            Self::F32 => WeightDtype::F32,
            Self::Q8_0 => WeightDtype::Q8_0,
            Self::Q4_0 => WeightDtype::Q4_0,
        }
    }
}

/// `--on-exhaustion`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExhaustionArg {
    Swap,
    /// Free the pages; replay the cache when readmitted.
    #[value(alias = "preempt")]
    Recompute,
    Reject,
}

/// The model shipped in models/ that runs when no --model is given.
pub const DEFAULT_MODEL: &str = "tiny-reasoner";

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, *.safetensors,
    /// tokenizer.json) or a GGUF file (llama, qwen2, qwen3; f32, f16, bf16,
    /// q8_0, q4_0, q4_K, q6_K tensors). Default: models/tiny-reasoner
    /// shipped with kvsift (trained on the needle and tally tasks of
    /// tools/train).
    #[arg(long, env = "KVSIFT_MODEL")]
    pub model: Option<PathBuf>,
    /// Storage of the weight matrices on the GPU: f16 (packed, half the
    /// memory of f32), f32, or quantized at load with llama.cpp's reference
    /// quantizers: q8_0 (8.5 bits a weight), q4_0 (4.5). A GGUF file's
    /// quantized tensors stay as the file holds them.
    #[arg(long, value_enum, default_value_t = WeightsDtypeArg::F16)]
    pub weights_dtype: WeightsDtypeArg,
    /// With --weights-dtype q8_0/q4_0: quantize the output projection too
    /// (by default it stays f16, and so do tied embeddings).
    #[arg(long)]
    pub quantize_lm_head: bool,
    /// KV positions per sequence (default: max_position_embeddings, at most 4096).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Tokens per prefill step (longer prompts run in chunks).
    #[arg(long, default_value_t = 256)]
    pub batch_tokens: usize,
    /// Decode steps per GPU submission: each step's sampled tokens feed the
    /// next on the GPU and reach the host once per chain (tokens stream in
    /// bursts). Same tokens as 1; saves the per-token submit and readback.
    #[arg(long, default_value_t = 1)]
    pub steps_per_submit: usize,
    /// Memory for the paged KV pool, MiB (default 512, at most one storage binding per layer).
    #[arg(long, visible_alias = "pool-mb")]
    pub kv_pool_mb: Option<f64>,
    /// KV storage: f16 (packed) or f32.
    #[arg(long, value_enum, default_value_t = DtypeArg::F16)]
    pub kv_dtype: DtypeArg,
    /// Slots per KV page.
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    /// When the pool runs out: swap (move the latest-arrived other sequence's
    /// pages to host memory, restore them later), recompute (free them,
    /// replay its cache later) or reject (fail the sequence that cannot grow).
    #[arg(long, value_enum, default_value_t = ExhaustionArg::Swap)]
    pub on_exhaustion: ExhaustionArg,
    #[command(flatten)]
    pub compress: CompressArgs,
}

impl ModelArgs {
    /// How the weights are stored (--weights-dtype, --quantize-lm-head).
    pub fn weight_format(&self) -> WeightFormat {
        WeightFormat {
            dtype: self.weights_dtype.dtype(),
            quantize_lm_head: self.quantize_lm_head,
        }
    }

    /// The model: a directory, or a GGUF file.
    pub fn dir(&self) -> anyhow::Result<PathBuf> {
        if let Some(m) = &self.model {
            if kvsift::model::weights::is_gguf(m) {
                return Ok(m.clone());
            }
            if !m.join("config.json").exists() {
                anyhow::bail!(
                    "--model {}: not a model directory (no config.json) nor a GGUF file",
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

    /// Lanes (sequences decoded together) for `requests` requests: all of
    /// them, up to the engine's maximum and the sequences whose logits fit
    /// one storage binding; the rest queue.
    pub fn lanes_for(
        &self,
        ctx: &GpuContext,
        dir: &std::path::Path,
        requests: usize,
    ) -> anyhow::Result<usize> {
        let cfg = kvsift::model::config::ModelConfig::load(dir)?;
        let by_logits = (ctx.caps.max_binding_bytes / (cfg.vocab_size as u64 * 4)).max(1);
        Ok(requests
            .min(kvsift::engine::config::MAX_LANES)
            .min(usize::try_from(by_logits).unwrap_or(usize::MAX)))
    }

    /// The engine for `max_batch` concurrent sequences, compressing as the flags say.
    pub fn engine<'c>(&self, ctx: &'c GpuContext, max_batch: usize) -> anyhow::Result<Engine<'c>> {
        self.engine_with(ctx, max_batch, self.compress.config()?)
    }

    /// The engine for `max_batch` concurrent sequences with `compression`
    /// (a sweep's method, a baseline's full cache).
    pub fn engine_with<'c>(
        &self,
        ctx: &'c GpuContext,
        max_batch: usize,
        compression: kvsift::kv::compression::CompressConfig,
    ) -> anyhow::Result<Engine<'c>> {
        let config = self.engine_config(max_batch, compression)?;
        let weights = load_weights(ctx, &self.dir()?, self.weight_format(), true)?;
        Ok(Engine::new(ctx, weights, config)?)
    }

    /// The engine's configuration from the flags, for `max_batch` sequences
    /// with `compression`.
    pub fn engine_config(
        &self,
        max_batch: usize,
        compression: kvsift::kv::compression::CompressConfig,
    ) -> anyhow::Result<EngineConfig> {
        let kv_f16 = self.kv_dtype == DtypeArg::F16;
        let bytes = match self.kv_pool_mb {
            None => None,
            // Values past u64 saturate; the pool then refuses them by the device's limits.
            Some(mb) if mb.is_finite() && mb > 0.0 => Some((mb * 1024.0 * 1024.0) as u64),
            Some(mb) => anyhow::bail!("--kv-pool-mb {mb}: must be a positive number of MiB"),
        };
        let on_exhaustion = match self.on_exhaustion {
            ExhaustionArg::Swap => Exhaustion::Swap,
            ExhaustionArg::Recompute => Exhaustion::Recompute,
            ExhaustionArg::Reject => Exhaustion::Reject,
        };
        let config = EngineConfig {
            max_batch,
            max_context: self.max_context,
            prefill_chunk: self.batch_tokens,
            pool: PoolConfig {
                bytes,
                page_size: self.page_size,
                kv_f16,
            },
            on_exhaustion,
            compression,
            decode_chain: self.steps_per_submit,
            ..EngineConfig::default()
        };
        Ok(config)
    }
}
