//! How an engine is set up: [`EngineConfig`] and its limits, the
//! [`EngineBuilder`], and the context rules (how many positions a sequence
//! may hold).

use crate::engine::compressor::Recording;
use crate::engine::scheduler::{Exhaustion, MAX_CONTEXT};
use crate::engine::serve::Engine;
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, WeightDtype};
use crate::kv::compression::{CompressConfig, Method};
use crate::kv::paged::PoolConfig;
use crate::model::config::ModelConfig;
use crate::model::llama::{LlamaWeights, WeightFormat, load_weights};

/// Most decode steps one submission may chain ([`EngineConfig::decode_chain`]).
pub const MAX_DECODE_CHAIN: usize = 64;
/// Most sequences one engine decodes together.
pub const MAX_LANES: usize = 1024;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Sequences decoded together (lanes).
    pub max_batch: usize,
    /// KV slots per head of a sequence (default: max_position_embeddings,
    /// at most [`DEFAULT_MAX_CONTEXT`]).
    pub max_context: Option<usize>,
    /// Tokens per prefill step.
    pub prefill_chunk: usize,
    pub pool: PoolConfig,
    pub on_exhaustion: Exhaustion,
    /// KV compression (method none: full cache).
    pub compression: CompressConfig,
    /// Most decode steps encoded in one submission: each step's sampled
    /// tokens feed the next step's embedding on the GPU, and the host reads
    /// the tokens once per chain (in bursts). 1: a submission and a readback
    /// per token. Chains stop short of a compression trigger, a sequence's
    /// token or context limit, and run only when nobody waits for admission
    /// and the pool holds the whole chain's slots.
    pub decode_chain: usize,
    /// What the forward also records for requests that bring their own
    /// compression ([`crate::engine::Request::compression`]): window queries
    /// (at `compression.window`) and H2O v3's attention sums. The engine's
    /// own method's needs are recorded anyway.
    pub recording: Recording,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            max_context: None,
            prefill_chunk: 256,
            pool: PoolConfig::default(),
            on_exhaustion: Exhaustion::Swap,
            compression: CompressConfig::new(Method::None, 0),
            decode_chain: 1,
            recording: Recording::default(),
        }
    }
}

/// Default KV positions when the user gives none.
pub const DEFAULT_MAX_CONTEXT: usize = 4096;

/// The KV positions to allocate: the user's, or the default; never more than
/// the model's `max_position_embeddings`.
pub fn context_capacity(cfg: &ModelConfig, asked: Option<usize>) -> Result<usize> {
    let capacity = asked.unwrap_or(cfg.max_position_embeddings.min(DEFAULT_MAX_CONTEXT));
    if capacity > MAX_CONTEXT {
        return Err(Error::invalid(
            "--max-context",
            format!("{capacity}: kvsift holds at most {MAX_CONTEXT} positions per sequence"),
        ));
    }
    if capacity == 0 || capacity > cfg.max_position_embeddings {
        return Err(Error::invalid(
            "--max-context",
            format!(
                "{capacity}: must be between 1 and the model's max_position_embeddings ({})",
                cfg.max_position_embeddings
            ),
        ));
    }
    Ok(capacity)
}

/// The error for a sequence that would outgrow `capacity` positions.
pub fn too_long(cfg: &ModelConfig, tokens: usize, capacity: usize) -> Error {
    Error::TooManyTokens {
        what: format!(
            "context ({capacity} positions{})",
            if capacity < cfg.max_position_embeddings {
                "; raise --max-context"
            } else {
                ", the model's max_position_embeddings"
            }
        ),
        tokens,
        limit: capacity,
    }
}

/// Builds an [`Engine`]: the [`EngineConfig`] defaults, changed setting
/// by setting, then [`EngineBuilder::load`] (a model directory) or
/// [`EngineBuilder::build`] (weights already loaded).
pub struct EngineBuilder<'c> {
    ctx: &'c GpuContext,
    config: EngineConfig,
    weights: WeightFormat,
}

impl<'c> EngineBuilder<'c> {
    /// Sequences decoded together (default 8).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.config.max_batch = n;
        self
    }
    /// KV slots per head of a sequence (default: the model's positions, at most 4096).
    pub fn max_context(mut self, n: usize) -> Self {
        self.config.max_context = Some(n);
        self
    }
    /// Tokens per prefill step (default 256).
    pub fn prefill_chunk(mut self, n: usize) -> Self {
        self.config.prefill_chunk = n;
        self
    }
    /// The KV pool: its size, page size and slot type.
    pub fn pool(mut self, pool: PoolConfig) -> Self {
        self.config.pool = pool;
        self
    }
    /// What a full pool does (default: swap).
    pub fn on_exhaustion(mut self, e: Exhaustion) -> Self {
        self.config.on_exhaustion = e;
        self
    }
    /// The engine's KV compression: every request's unless it brings its own.
    pub fn compression(mut self, c: CompressConfig) -> Self {
        self.config.compression = c;
        self
    }
    /// What the forward also records, for requests with their own compression.
    pub fn recording(mut self, r: Recording) -> Self {
        self.config.recording = r;
        self
    }
    /// Decode steps per submission (default 1).
    pub fn decode_chain(mut self, k: usize) -> Self {
        self.config.decode_chain = k;
        self
    }
    /// How [`EngineBuilder::load`] stores the weights (default f16; a
    /// [`WeightFormat`] for quantized ones).
    pub fn weights_dtype(mut self, d: impl Into<WeightFormat>) -> Self {
        self.weights = d.into();
        self
    }
    /// Loads the model at `path` (a Hugging Face model directory or a GGUF
    /// file) and builds the engine.
    pub fn load(self, path: &std::path::Path) -> Result<Engine<'c>> {
        let weights = load_weights(self.ctx, path, self.weights, false)?;
        self.build(weights)
    }
    /// Builds the engine on loaded weights.
    pub fn build(self, weights: LlamaWeights) -> Result<Engine<'c>> {
        Engine::new(self.ctx, weights, self.config)
    }
}

impl<'c> Engine<'c> {
    /// A builder with the default configuration.
    pub fn builder(ctx: &'c GpuContext) -> EngineBuilder<'c> {
        EngineBuilder {
            ctx,
            config: EngineConfig::default(),
            weights: WeightDtype::F16.into(),
        }
    }
}
