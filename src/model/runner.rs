//! [`Model`]: one sequence on a contiguous per-layer KV cache. The simplest
//! way to run the model, and the reference the paged, batched engine is held
//! against. Decode steps are built once and replayed: per token a few small
//! buffer writes, one submission and a 4-byte readback.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::gpu::buffer::ReadbackSlot;
use crate::gpu::{GpuBuffer, GpuContext, Op, WeightDtype};
use crate::model::config::ModelConfig;
use crate::model::llama::{
    Activations, LlamaWeights, body, check_ids, final_norm, load_weights, push_lm_head,
    push_nll_head,
};
use crate::ops::attention::{AttentionShape, attention, kv_store};
use crate::ops::sample::{Sampler, SamplingParams, mark_seen, seen_words};
use crate::ops::{argmax, nll};

use crate::rng::Rng;

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Storage of the weight matrices on the GPU.
    pub weights_dtype: WeightDtype,
    /// KV-cache positions to allocate (default: `max_position_embeddings`, at most 4096).
    pub max_context: Option<usize>,
    /// Tokens processed per prefill step (longer prompts run in chunks).
    pub max_batch_tokens: usize,
    /// Show a progress bar on stderr while weights upload (hidden when stderr is not a terminal).
    pub progress: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            weights_dtype: WeightDtype::F16,
            max_context: None,
            max_batch_tokens: 256,
            progress: false,
        }
    }
}

/// Default KV positions when the user gives none.
pub const DEFAULT_MAX_CONTEXT: usize = 4096;

/// The KV positions to allocate: the user's, or the default; never more than
/// the model's `max_position_embeddings`.
/// Most KV positions one sequence may hold (positions are exact in f32 below 2^24).
pub const MAX_CONTEXT: usize = 1 << 24;

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

/// What a step leaves behind for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Readout {
    /// Nothing (an early prefill chunk).
    None,
    /// The greedy token of the last position (argmax on the GPU, 4 bytes read back).
    Argmax,
    /// The logits of the last position, read back.
    Logits,
    /// A token drawn with the model's [`SamplingParams`] on the GPU (4 bytes read back).
    Sample,
}

/// Result of a step.
#[derive(Clone, Debug, Default)]
pub struct StepOutput {
    pub token: Option<u32>,
    pub logits: Option<Vec<f32>>,
}

/// Result of teacher-forced scoring.
#[derive(Clone, Debug)]
pub struct ScoreOutput {
    /// NLL of tokens 1..T, each under the logits after the previous token.
    pub nll: Vec<f32>,
    /// `[T, vocab]` logits after each token, when asked for.
    pub logits: Option<Vec<f32>>,
}

/// A loaded model with a contiguous KV cache for one sequence.
pub struct Model<'c> {
    ctx: &'c GpuContext,
    pub cfg: ModelConfig,
    pub dir: PathBuf,
    pub weights_dtype: WeightDtype,
    weights: LlamaWeights,
    acts: Activations,
    /// Per layer `[kv_heads, capacity, head_dim]` keys and values.
    caches: Vec<(GpuBuffer<f32>, GpuBuffer<f32>)>,
    capacity: usize,
    token: GpuBuffer<u32>,
    seen: GpuBuffer<u32>,
    targets: GpuBuffer<u32>,
    nll: GpuBuffer<f32>,
    sampler: Sampler,
    sampling: SamplingParams,
    rng: Rng,
    seen_host: Vec<u32>,
    decode_body: Vec<Op>,
    head_argmax: Vec<Op>,
    head_logits: Vec<Op>,
    head_sample: Vec<Op>,
    token_slot: ReadbackSlot,
    logits_slot: ReadbackSlot,
    pos_host: Vec<u32>,
    position: usize,
}

impl<'c> Model<'c> {
    /// Loads `dir` (config.json + safetensors) onto the GPU.
    pub fn load(ctx: &'c GpuContext, dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let cfg = ModelConfig::load(dir)?;
        let capacity = context_capacity(&cfg, opts.max_context)?;
        if opts.max_batch_tokens == 0 {
            return Err(Error::invalid("max batch tokens", "must be positive"));
        }
        let weights = load_weights(ctx, dir, opts.weights_dtype, opts.progress)?;
        Self::new(ctx, dir, weights, capacity, opts.max_batch_tokens)
    }

    pub fn new(
        ctx: &'c GpuContext,
        dir: &Path,
        weights: LlamaWeights,
        capacity: usize,
        max_batch_tokens: usize,
    ) -> Result<Self> {
        let cfg = weights.cfg.clone();
        let v = cfg.vocab_size;
        let acts = Activations::new(ctx, &cfg, max_batch_tokens, max_batch_tokens)?;
        let cache_len = cfg.n_kv_heads * capacity * cfg.head_dim;
        let caches = (0..cfg.n_layers)
            .map(|l| {
                Ok((
                    GpuBuffer::zeros(ctx, &format!("model.layers.{l}.cache_k"), cache_len)?,
                    GpuBuffer::zeros(ctx, &format!("model.layers.{l}.cache_v"), cache_len)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut model = Model {
            ctx,
            dir: dir.to_path_buf(),
            weights_dtype: weights.dtype,
            token: GpuBuffer::zeros(ctx, "act.token", 1)?,
            seen: GpuBuffer::zeros(ctx, "act.seen", seen_words(v))?,
            targets: GpuBuffer::zeros(ctx, "act.targets", capacity)?,
            nll: GpuBuffer::zeros(ctx, "act.nll", capacity)?,
            sampler: Sampler::new(ctx, v, 1)?,
            sampling: SamplingParams::greedy(),
            rng: Rng::new(0),
            seen_host: vec![0; seen_words(v)],
            decode_body: vec![],
            head_argmax: vec![],
            head_logits: vec![],
            head_sample: vec![],
            token_slot: ReadbackSlot::new(ctx, "readback.token", 4)?,
            logits_slot: ReadbackSlot::new(ctx, "readback.logits", (v * 4) as u64)?,
            pos_host: vec![0; max_batch_tokens],
            position: 0,
            cfg,
            weights,
            acts,
            caches,
            capacity,
        };
        model.head_argmax = model.last_token_head(Readout::Argmax, 1)?;
        model.head_logits = model.last_token_head(Readout::Logits, 1)?;
        model.head_sample = model.last_token_head(Readout::Sample, 1)?;
        model.decode_body = model.body(1)?;
        // Build (and so compile) the prefill pipelines now, not inside the first prompt.
        model.body((crate::ops::linear::matvec_max_vecs(ctx) + 1).min(max_batch_tokens))?;
        model.last_token_head(Readout::Argmax, 2)?;
        Ok(model)
    }

    /// Tokens currently in the KV cache.
    pub fn position(&self) -> usize {
        self.position
    }

    /// KV-cache positions allocated.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of weight matrices on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        self.weights.bytes()
    }

    /// Bytes of the KV cache on the GPU.
    pub fn kv_bytes(&self) -> u64 {
        self.caches
            .iter()
            .map(|(k, v)| k.size_bytes() + v.size_bytes())
            .sum()
    }

    /// Forgets the sequence (the cache is overwritten from position 0).
    pub fn reset(&mut self) {
        self.position = 0;
        self.seen_host.fill(0);
        // Both masks were sized for the vocabulary together at load.
        self.seen
            .write(self.ctx, 0, &self.seen_host)
            .expect("the seen mask fits its buffer");
    }

    /// How [`Readout::Sample`] picks tokens from now on; reseeds the generator.
    pub fn set_sampling(&mut self, params: SamplingParams) -> Result<()> {
        params.validate()?;
        self.rng = Rng::new(params.seed);
        self.sampling = params;
        Ok(())
    }

    fn body(&self, n: usize) -> Result<Vec<Op>> {
        let (ctx, cfg, a) = (self.ctx, &self.cfg, &self.acts);
        let mut attend = |l: usize, ops: &mut Vec<Op>| -> Result<()> {
            let s = AttentionShape {
                n_tokens: n,
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: cfg.head_dim,
                qkv_stride: cfg.qkv_dim(),
                capacity: self.capacity,
                window: self.weights.layers[l].window,
            };
            let (k, v) = &self.caches[l];
            ops.push(kv_store(ctx, &s, &a.positions, &a.qkv, k, v)?.into());
            ops.push(attention(ctx, &s, &a.positions, &a.qkv, k, v, &a.attn)?.into());
            Ok(())
        };
        body(ctx, &self.weights, a, n, &mut attend)
    }

    /// Final norm and lm_head on the last of `n` rows, then the readout.
    fn last_token_head(&self, readout: Readout, n: usize) -> Result<Vec<Op>> {
        let (ctx, a, v) = (self.ctx, &self.acts, self.cfg.vocab_size);
        let mut ops = vec![];
        if readout == Readout::None {
            return Ok(ops);
        }
        ops.push(final_norm(ctx, &self.weights, a, n - 1, 1)?);
        push_lm_head(&mut ops, ctx, &self.weights, a, n - 1, 1)?;
        match readout {
            Readout::Argmax => {
                ops.push(argmax::argmax(ctx, 1, v, &a.logits, &self.token)?.into());
                ops.push(self.token_slot.copy_from(self.token.raw(), 0, 4)?);
            }
            Readout::Logits => ops.push(self.logits_slot.copy_from(
                a.logits.raw(),
                0,
                (v * 4) as u64,
            )?),
            Readout::Sample => {
                ops.push(
                    self.sampler
                        .dispatch(ctx, 1, &a.logits, &self.seen, &self.token)?
                        .into(),
                );
                ops.push(self.token_slot.copy_from(self.token.raw(), 0, 4)?);
            }
            // Returned above.
            Readout::None => {}
        }
        Ok(ops)
    }

    /// Fails, changing nothing, unless `tokens` are valid ids and fit the cache.
    fn check_input(&self, tokens: &[u32]) -> Result<()> {
        let n = self.position + tokens.len();
        if n > self.capacity {
            return Err(too_long(&self.cfg, n, self.capacity));
        }
        check_ids(&self.cfg, tokens)
    }

    /// Writes one chunk's inputs (checked already) and marks its tokens seen.
    fn stage_inputs(&mut self, tokens: &[u32]) -> Result<()> {
        let n = tokens.len();
        for (i, p) in self.pos_host[..n].iter_mut().enumerate() {
            *p = (self.position + i) as u32;
        }
        self.acts
            .write_inputs(self.ctx, tokens, &self.pos_host[..n])?;
        // The repetition penalty's mask; a single token rewrites one word.
        mark_seen(&mut self.seen_host, tokens);
        if let [t] = tokens {
            let w = *t as usize / 32;
            self.seen.write(self.ctx, w, &self.seen_host[w..w + 1])
        } else {
            self.seen.write(self.ctx, 0, &self.seen_host)
        }
    }

    fn finish(&self, readout: Readout) -> Result<StepOutput> {
        Ok(match readout {
            Readout::None => StepOutput::default(),
            Readout::Argmax | Readout::Sample => StepOutput {
                token: Some(self.token_slot.read::<u32>(self.ctx, 1)?[0]),
                logits: None,
            },
            Readout::Logits => StepOutput {
                token: None,
                logits: Some(
                    self.logits_slot
                        .read::<f32>(self.ctx, self.cfg.vocab_size)?,
                ),
            },
        })
    }

    /// Appends `tokens` to the sequence (prefill in chunks, or one decode
    /// token) and returns `readout` for the last one.
    pub fn forward(&mut self, tokens: &[u32], readout: Readout) -> Result<StepOutput> {
        if tokens.is_empty() {
            return Err(Error::invalid("tokens", "nothing to process (empty input)"));
        }
        // Fail before any chunk runs, so the sequence is left unchanged.
        self.check_input(tokens)?;
        let chunk_len = self.acts.rows;
        let n_chunks = tokens.len().div_ceil(chunk_len);
        let mut out = StepOutput::default();
        for (i, chunk) in tokens.chunks(chunk_len).enumerate() {
            let r = if i + 1 == n_chunks {
                readout
            } else {
                Readout::None
            };
            self.stage_inputs(chunk)?;
            if r == Readout::Sample {
                let u = self.rng.uniform();
                self.sampler.set_rows(self.ctx, [(self.sampling, 0, u)])?;
            }
            let n = chunk.len();
            if n == 1 {
                let head = match r {
                    Readout::Argmax => &self.head_argmax[..],
                    Readout::Logits => &self.head_logits[..],
                    Readout::Sample => &self.head_sample[..],
                    Readout::None => &[],
                };
                self.ctx
                    .run_ops("kvsift.decode", &[&self.decode_body, head])?;
            } else {
                let body = self.body(n)?;
                let head = self.last_token_head(r, n)?;
                self.ctx.run_ops("kvsift.prefill", &[&body, &head])?;
            }
            self.position += n;
            out = self.finish(r)?;
        }
        Ok(out)
    }

    /// Teacher-forced scoring of `tokens` from an empty cache: the first
    /// `prefill` tokens run as one prefill (in chunks of the batch size), every
    /// later token as a decode step, as during generation. Returns the NLL of
    /// tokens 1.. and, when `want_logits`, the logits after every token.
    pub fn score(
        &mut self,
        tokens: &[u32],
        prefill: usize,
        want_logits: bool,
    ) -> Result<ScoreOutput> {
        let t = tokens.len();
        check_score_args(t, prefill)?;
        self.reset();
        self.check_input(tokens)?;
        self.targets.write(self.ctx, 0, &score_targets(tokens))?;
        let v = self.cfg.vocab_size;
        let mut logits = want_logits.then(|| Vec::with_capacity(t * v));
        let head_rows = self.acts.head_rows;

        // Prefill part, chunk by chunk, with the lm_head over every row.
        for chunk in tokens[..prefill].chunks(self.acts.rows) {
            let start = self.position;
            self.stage_inputs(chunk)?;
            let n = chunk.len();
            let body = if n == 1 { None } else { Some(self.body(n)?) };
            let body_ops: &[Op] = body.as_deref().unwrap_or(&self.decode_body);
            let norm = final_norm(self.ctx, &self.weights, &self.acts, 0, n)?;
            self.ctx.run_ops(
                "kvsift.score.prefill",
                &[body_ops, std::slice::from_ref(&norm)],
            )?;
            self.position += n;
            for r0 in (0..n).step_by(head_rows) {
                let rows = head_rows.min(n - r0);
                let head = self.nll_head(r0, rows, start + r0)?;
                self.ctx.run_ops("kvsift.score.head", &[&head])?;
                if let Some(l) = logits.as_mut() {
                    l.extend(self.acts.logits.read_range(self.ctx, 0, rows * v)?);
                }
            }
        }
        // Decode part: one token per step, NLL written at its row.
        if prefill < t {
            let mut head = vec![final_norm(self.ctx, &self.weights, &self.acts, 0, 1)?];
            head.extend(self.nll_head(0, 1, 0)?);
            for &tok in &tokens[prefill..] {
                let row = self.position;
                self.stage_inputs(&[tok])?;
                set_nll_row(self.ctx, &head, v, row)?;
                self.ctx
                    .run_ops("kvsift.score.decode", &[&self.decode_body, &head])?;
                self.position += 1;
                if let Some(l) = logits.as_mut() {
                    l.extend(self.acts.logits.read_range(self.ctx, 0, v)?);
                }
            }
        }
        let nll = self.nll.read_range(self.ctx, 0, t)?;
        Ok(ScoreOutput {
            nll: nll[..t - 1].to_vec(),
            logits,
        })
    }

    fn nll_head(&self, first: usize, rows: usize, row_offset: usize) -> Result<Vec<Op>> {
        let mut ops = vec![];
        push_nll_head(
            &mut ops,
            self.ctx,
            &self.weights,
            &self.acts,
            &self.targets,
            &self.nll,
            first,
            rows,
            row_offset,
        )?;
        Ok(ops)
    }
}

/// Validates the scoring arguments (user errors, naming the flag).
pub fn check_score_args(t: usize, prefill: usize) -> Result<()> {
    if t < 2 {
        return Err(Error::invalid(
            "tokens",
            format!("scoring needs at least 2 tokens, got {t}"),
        ));
    }
    if prefill == 0 || prefill > t {
        return Err(Error::invalid(
            "--prefill",
            format!("{prefill}: must be between 1 and the token count {t}"),
        ));
    }
    Ok(())
}

/// Token i+1 is scored under the logits after token i (the last row has no target).
pub fn score_targets(tokens: &[u32]) -> Vec<u32> {
    let mut targets: Vec<u32> = tokens[1..].to_vec();
    targets.push(0);
    targets
}

/// Points the nll dispatch at the end of `head` at row `row` of the targets.
pub fn set_nll_row(ctx: &GpuContext, head: &[Op], vocab: usize, row: usize) -> Result<()> {
    match head.last() {
        Some(Op::Dispatch(d)) => d.write_params(
            ctx,
            &nll::NllParams {
                rows: 1,
                n: vocab as u32,
                row_offset: row as u32,
            },
        ),
        _ => Err(Error::invalid(
            "scoring head",
            "does not end with the nll dispatch",
        )),
    }
}
