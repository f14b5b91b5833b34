//! The Llama decoder family on the GPU: Llama, Qwen2 (q/k/v biases), Qwen3
//! (per-head q/k RMSNorm), Mistral (sliding window). Read it against
//! transformers' `modeling_llama.py`:
//!
//! ```text
//! h = embed(ids)
//! per layer:  x = rmsnorm(h) * input_layernorm
//!             q, k, v = x Wq (+bq), x Wk (+bk), x Wv (+bv)    one fused matmul
//!             q, k = rmsnorm per head (Qwen3)
//!             q, k = rope(q, k)                               rotate_half layout
//!             cache[pos] = k, v
//!             h += attention(q, cache) Wo (+bo)               residual fused into o_proj
//!             x = rmsnorm(h) * post_attention_layernorm
//!             h += (silu(x Wg) * x Wu) Wd                     gate/up fused, residual fused
//! logits = rmsnorm(h) * norm  W_lm  (W_lm = embed when tied)
//! ```
//!
//! Weights are converted at load (bf16/f16/f32 to f32 or packed f16) and q/k/v
//! and gate/up are fused so each is one matmul. A step is a list of [`Op`]s
//! encoded into one submission; the decode step's list is built once and
//! reused, so a decode token costs a few small buffer writes, one submission
//! and one 4-byte readback.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::gpu::buffer::ReadbackSlot;
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, GpuMatrix, Op, WeightDtype};
use crate::model::config::ModelConfig;
use crate::model::weights::{TensorRef, WeightStore};
use crate::ops::attention::{AttentionShape, attention, kv_store};
use crate::ops::linear::{Linear, linear};
use crate::ops::rmsnorm::{NormShape, rmsnorm, rmsnorm_inplace};
use crate::ops::rope::{RopeShape, RopeTable, rope};
use crate::ops::sample::{Sampler, SamplingParams, mark_seen, seen_words};
use crate::ops::{argmax, embedding, nll, silu_mul};
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

struct Layer {
    input_norm: GpuBuffer<f32>,
    qkv: GpuMatrix,
    qkv_bias: Option<GpuBuffer<f32>>,
    q_norm: Option<GpuBuffer<f32>>,
    k_norm: Option<GpuBuffer<f32>>,
    o: GpuMatrix,
    o_bias: Option<GpuBuffer<f32>>,
    post_norm: GpuBuffer<f32>,
    gate_up: GpuMatrix,
    gate_up_bias: Option<GpuBuffer<f32>>,
    down: GpuMatrix,
    down_bias: Option<GpuBuffer<f32>>,
    cache_k: GpuBuffer<f32>,
    cache_v: GpuBuffer<f32>,
    window: usize,
}

/// Per-step working buffers, sized for `max_batch_tokens`.
struct Activations {
    ids: GpuBuffer<u32>,
    positions: GpuBuffer<u32>,
    cos: GpuBuffer<f32>,
    sin: GpuBuffer<f32>,
    hidden: GpuBuffer<f32>,
    normed: GpuBuffer<f32>,
    qkv: GpuBuffer<f32>,
    attn: GpuBuffer<f32>,
    gate_up: GpuBuffer<f32>,
    act: GpuBuffer<f32>,
    /// The rows the lm_head reads (the last token's, or a chunk of rows when scoring).
    head_in: GpuBuffer<f32>,
    /// `[head_rows, vocab]`
    logits: GpuBuffer<f32>,
    token: GpuBuffer<u32>,
    /// Bitmask of the tokens in the sequence (repetition penalty).
    seen: GpuBuffer<u32>,
    /// Teacher-forcing targets and their NLLs (score).
    targets: GpuBuffer<u32>,
    nll: GpuBuffer<f32>,
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

/// A loaded model with its KV cache for one sequence.
pub struct Model<'c> {
    ctx: &'c GpuContext,
    pub cfg: ModelConfig,
    pub dir: PathBuf,
    pub weights_dtype: WeightDtype,
    embed: GpuMatrix,
    lm_head: Option<GpuMatrix>,
    final_norm: GpuBuffer<f32>,
    layers: Vec<Layer>,
    acts: Activations,
    rope_table: RopeTable,
    capacity: usize,
    max_batch_tokens: usize,
    /// Rows of logits one lm_head pass produces when scoring.
    head_rows: usize,
    /// Cached single-token body and heads.
    decode_body: Option<Vec<Op>>,
    head_argmax: Vec<Op>,
    head_logits: Vec<Op>,
    head_sample: Vec<Op>,
    sampler: Sampler,
    sampling: SamplingParams,
    rng: Rng,
    seen_host: Vec<u32>,
    token_slot: ReadbackSlot,
    logits_slot: ReadbackSlot,
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
    pos_host: Vec<u32>,
    position: usize,
    weight_bytes: u64,
}

/// Loads a matrix whose rows are the concatenation of `parts` (name, rows).
fn fused_matrix(
    ctx: &GpuContext,
    store: &WeightStore,
    label: &str,
    parts: &[(String, usize)],
    cols: usize,
    dtype: WeightDtype,
    progress: &indicatif::ProgressBar,
) -> Result<GpuMatrix> {
    let tensors: Vec<TensorRef<'_>> = parts
        .iter()
        .map(|(name, rows)| {
            let t = store.get(name)?;
            t.expect(&[*rows, cols])?;
            Ok(t)
        })
        .collect::<Result<_>>()?;
    let starts: Vec<usize> = parts
        .iter()
        .scan(0, |acc, (_, rows)| {
            let s = *acc;
            *acc += rows;
            Some(s)
        })
        .collect();
    let total: usize = parts.iter().map(|(_, r)| r).sum();
    let mut scratch = Vec::new();
    let mut overflow = None;
    let m = GpuMatrix::upload_with(ctx, label, total, cols, dtype, |r, out| {
        let i = starts
            .iter()
            .rposition(|s| *s <= r)
            .expect("row in some part");
        tensors[i].pack_row(r - starts[i], dtype, &mut scratch, out);
        // bf16/f32 values beyond f16's range would become infinities.
        if dtype == WeightDtype::F16
            && overflow.is_none()
            && out
                .iter()
                .any(|w| (w & 0x7c00) == 0x7c00 || ((w >> 16) & 0x7c00) == 0x7c00)
            && tensors[i].dtype != safetensors::Dtype::F16
        {
            overflow = Some(i);
        }
    })?;
    if let Some(i) = overflow {
        return Err(Error::BadTensor {
            path: tensors[i].path.to_path_buf(),
            tensor: tensors[i].name.to_string(),
            reason: "holds values beyond the f16 range (65504); load with --weights-dtype f32"
                .into(),
        });
    }
    progress.inc(tensors.iter().map(|t| t.byte_len() as u64).sum());
    Ok(m)
}

/// A 1-D f32 vector (norm weight), checked against `len`.
fn vector(ctx: &GpuContext, store: &WeightStore, name: &str, len: usize) -> Result<GpuBuffer<f32>> {
    let t = store.get(name)?;
    t.expect(&[len])?;
    GpuBuffer::from_slice(ctx, name, &t.to_f32())
}

/// Concatenated biases of `parts`, if the config says they exist.
fn fused_bias(
    ctx: &GpuContext,
    store: &WeightStore,
    label: &str,
    parts: &[(String, usize)],
) -> Result<GpuBuffer<f32>> {
    let mut all = Vec::new();
    for (name, rows) in parts {
        let t = store.get(name)?;
        t.expect(&[*rows])?;
        all.extend(t.to_f32());
    }
    GpuBuffer::from_slice(ctx, label, &all)
}

fn progress_bar(show: bool, total: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !show || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "uploading weights {bar:40} {bytes}/{total_bytes} {elapsed}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}

impl<'c> Model<'c> {
    /// Loads `dir` (config.json + safetensors) onto the GPU.
    pub fn load(ctx: &'c GpuContext, dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let cfg = ModelConfig::load(dir)?;
        let store = WeightStore::open(dir)?;
        Self::from_store(ctx, dir, cfg, &store, opts)
    }

    pub fn from_store(
        ctx: &'c GpuContext,
        dir: &Path,
        cfg: ModelConfig,
        store: &WeightStore,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let dtype = opts.weights_dtype;
        let capacity = opts
            .max_context
            .unwrap_or(cfg.max_position_embeddings.min(DEFAULT_MAX_CONTEXT));
        if capacity == 0 || capacity > cfg.max_position_embeddings {
            return Err(Error::invalid(
                "--max-context",
                format!(
                    "{capacity}: must be between 1 and the model's max_position_embeddings ({})",
                    cfg.max_position_embeddings
                ),
            ));
        }
        if opts.max_batch_tokens == 0 {
            return Err(Error::invalid("max batch tokens", "must be positive"));
        }
        let (h, v, inter) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let pb = progress_bar(opts.progress, store.total_bytes());

        let embed = fused_matrix(
            ctx,
            store,
            "model.embed_tokens.weight",
            &[("model.embed_tokens.weight".into(), v)],
            h,
            dtype,
            &pb,
        )?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(fused_matrix(
                ctx,
                store,
                "lm_head.weight",
                &[("lm_head.weight".into(), v)],
                h,
                dtype,
                &pb,
            )?)
        };
        let final_norm = vector(ctx, store, "model.norm.weight", h)?;

        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let p = format!("model.layers.{l}");
            let qkv_parts = [
                (format!("{p}.self_attn.q_proj.weight"), cfg.q_dim()),
                (format!("{p}.self_attn.k_proj.weight"), cfg.kv_dim()),
                (format!("{p}.self_attn.v_proj.weight"), cfg.kv_dim()),
            ];
            let bias_of = |parts: &[(String, usize)]| -> Vec<(String, usize)> {
                parts
                    .iter()
                    .map(|(n, r)| (n.replace(".weight", ".bias"), *r))
                    .collect()
            };
            let gate_up_parts = [
                (format!("{p}.mlp.gate_proj.weight"), inter),
                (format!("{p}.mlp.up_proj.weight"), inter),
            ];
            let o_name = format!("{p}.self_attn.o_proj.weight");
            let down_name = format!("{p}.mlp.down_proj.weight");
            let cache_len = cfg.n_kv_heads * capacity * cfg.head_dim;
            layers.push(Layer {
                input_norm: vector(ctx, store, &format!("{p}.input_layernorm.weight"), h)?,
                qkv: fused_matrix(ctx, store, &format!("{p}.qkv"), &qkv_parts, h, dtype, &pb)?,
                qkv_bias: cfg
                    .qkv_bias
                    .then(|| fused_bias(ctx, store, &format!("{p}.qkv.bias"), &bias_of(&qkv_parts)))
                    .transpose()?,
                q_norm: cfg
                    .qk_norm
                    .then(|| {
                        vector(
                            ctx,
                            store,
                            &format!("{p}.self_attn.q_norm.weight"),
                            cfg.head_dim,
                        )
                    })
                    .transpose()?,
                k_norm: cfg
                    .qk_norm
                    .then(|| {
                        vector(
                            ctx,
                            store,
                            &format!("{p}.self_attn.k_norm.weight"),
                            cfg.head_dim,
                        )
                    })
                    .transpose()?,
                o: fused_matrix(
                    ctx,
                    store,
                    &o_name,
                    &[(o_name.clone(), h)],
                    cfg.q_dim(),
                    dtype,
                    &pb,
                )?,
                o_bias: cfg
                    .o_bias
                    .then(|| {
                        fused_bias(
                            ctx,
                            store,
                            &format!("{p}.o.bias"),
                            &bias_of(&[(o_name.clone(), h)]),
                        )
                    })
                    .transpose()?,
                post_norm: vector(
                    ctx,
                    store,
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                )?,
                gate_up: fused_matrix(
                    ctx,
                    store,
                    &format!("{p}.gate_up"),
                    &gate_up_parts,
                    h,
                    dtype,
                    &pb,
                )?,
                gate_up_bias: cfg
                    .mlp_bias
                    .then(|| {
                        fused_bias(
                            ctx,
                            store,
                            &format!("{p}.gate_up.bias"),
                            &bias_of(&gate_up_parts),
                        )
                    })
                    .transpose()?,
                down: fused_matrix(
                    ctx,
                    store,
                    &down_name,
                    &[(down_name.clone(), h)],
                    inter,
                    dtype,
                    &pb,
                )?,
                down_bias: cfg
                    .mlp_bias
                    .then(|| {
                        fused_bias(
                            ctx,
                            store,
                            &format!("{p}.down.bias"),
                            &bias_of(&[(down_name.clone(), h)]),
                        )
                    })
                    .transpose()?,
                cache_k: GpuBuffer::zeros(ctx, &format!("{p}.cache_k"), cache_len)?,
                cache_v: GpuBuffer::zeros(ctx, &format!("{p}.cache_v"), cache_len)?,
                window: cfg.layer_windows[l].unwrap_or(0),
            });
        }
        pb.finish_and_clear();

        let t = opts.max_batch_tokens;
        let half = cfg.head_dim / 2;
        // Score's lm_head runs over chunks of rows whose logits fit one binding.
        let head_rows = (ctx.caps.max_binding_bytes as usize / (v * 4)).clamp(1, t);
        let acts = Activations {
            ids: GpuBuffer::zeros(ctx, "act.ids", t)?,
            positions: GpuBuffer::zeros(ctx, "act.positions", t)?,
            cos: GpuBuffer::zeros(ctx, "act.cos", t * half)?,
            sin: GpuBuffer::zeros(ctx, "act.sin", t * half)?,
            hidden: GpuBuffer::zeros(ctx, "act.hidden", t * h)?,
            normed: GpuBuffer::zeros(ctx, "act.normed", t * h)?,
            qkv: GpuBuffer::zeros(ctx, "act.qkv", t * cfg.qkv_dim())?,
            attn: GpuBuffer::zeros(ctx, "act.attn", t * cfg.q_dim())?,
            gate_up: GpuBuffer::zeros(ctx, "act.gate_up", t * 2 * inter)?,
            act: GpuBuffer::zeros(ctx, "act.mlp", t * inter)?,
            head_in: GpuBuffer::zeros(ctx, "act.head_in", head_rows * h)?,
            logits: GpuBuffer::zeros(ctx, "act.logits", head_rows * v)?,
            token: GpuBuffer::zeros(ctx, "act.token", 1)?,
            seen: GpuBuffer::zeros(ctx, "act.seen", seen_words(v))?,
            targets: GpuBuffer::zeros(ctx, "act.targets", capacity)?,
            nll: GpuBuffer::zeros(ctx, "act.nll", capacity)?,
        };
        let weight_bytes = embed.size_bytes()
            + lm_head.as_ref().map_or(0, |m| m.size_bytes())
            + layers
                .iter()
                .map(|l| {
                    l.qkv.size_bytes()
                        + l.o.size_bytes()
                        + l.gate_up.size_bytes()
                        + l.down.size_bytes()
                })
                .sum::<u64>();
        let sampler = Sampler::new(ctx, v, &acts.logits, &acts.seen, &acts.token)?;
        let mut model = Model {
            ctx,
            sampler,
            sampling: SamplingParams::greedy(),
            rng: Rng::new(0),
            seen_host: vec![0; seen_words(v)],
            head_sample: vec![],
            rope_table: RopeTable::new(&cfg.rope)?,
            dir: dir.to_path_buf(),
            weights_dtype: dtype,
            token_slot: ReadbackSlot::new(ctx, "readback.token", 4)?,
            logits_slot: ReadbackSlot::new(ctx, "readback.logits", (v * 4) as u64)?,
            cos_host: vec![0.0; t * half],
            sin_host: vec![0.0; t * half],
            pos_host: vec![0; t],
            cfg,
            embed,
            lm_head,
            final_norm,
            layers,
            acts,
            capacity,
            max_batch_tokens: t,
            head_rows,
            decode_body: None,
            head_argmax: vec![],
            head_logits: vec![],
            position: 0,
            weight_bytes,
        };
        model.head_argmax = model.last_token_head(Readout::Argmax, 1)?;
        model.head_logits = model.last_token_head(Readout::Logits, 1)?;
        model.head_sample = model.last_token_head(Readout::Sample, 1)?;
        model.decode_body = Some(model.body(1)?);
        // Build (and so compile) the prefill pipelines now, not inside the first prompt.
        model.body(crate::ops::linear::MATVEC_MAX_VECS + 1)?;
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
        self.weight_bytes
    }

    /// Bytes of the KV cache on the GPU.
    pub fn kv_bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| l.cache_k.size_bytes() + l.cache_v.size_bytes())
            .sum()
    }

    /// Forgets the sequence (the cache is overwritten from position 0).
    pub fn reset(&mut self) {
        self.position = 0;
        self.seen_host.fill(0);
        self.acts.seen.write(self.ctx, 0, &self.seen_host);
    }

    /// How [`Readout::Sample`] picks tokens from now on; reseeds the generator.
    pub fn set_sampling(&mut self, params: SamplingParams) -> Result<()> {
        params.validate()?;
        self.rng = Rng::new(params.seed);
        self.sampling = params;
        Ok(())
    }

    fn lm_head(&self) -> &GpuMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    fn attention_shape(&self, n: usize, window: usize) -> AttentionShape {
        AttentionShape {
            n_tokens: n,
            n_heads: self.cfg.n_heads,
            n_kv_heads: self.cfg.n_kv_heads,
            head_dim: self.cfg.head_dim,
            qkv_stride: self.cfg.qkv_dim(),
            capacity: self.capacity,
            window,
        }
    }

    /// The transformer body for `n` tokens: embedding through the last layer,
    /// leaving the residual stream in `hidden`.
    fn body(&self, n: usize) -> Result<Vec<Op>> {
        let (ctx, cfg, a) = (self.ctx, &self.cfg, &self.acts);
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let mut ops: Vec<Op> = vec![];
        ops.extend(
            embedding::embed(ctx, n, &self.embed, &a.ids, &a.hidden)?
                .into_iter()
                .map(Op::from),
        );
        let rows = NormShape::rows(n, h, cfg.rms_norm_eps);
        let qkv_dim = cfg.qkv_dim();
        for layer in &self.layers {
            ops.push(rmsnorm(ctx, &rows, &a.hidden, &layer.input_norm, &a.normed)?.into());
            push_linear(
                &mut ops,
                ctx,
                &layer.qkv,
                layer.qkv_bias.as_ref(),
                &a.normed,
                &a.qkv,
                n,
                false,
            )?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                let heads = |heads, offset| NormShape {
                    tokens: n,
                    heads,
                    dim: d,
                    token_stride: qkv_dim,
                    offset,
                    eps: cfg.rms_norm_eps,
                };
                ops.push(rmsnorm_inplace(ctx, &heads(cfg.n_heads, 0), &a.qkv, qn)?.into());
                ops.push(
                    rmsnorm_inplace(ctx, &heads(cfg.n_kv_heads, cfg.q_dim()), &a.qkv, kn)?.into(),
                );
            }
            // q and k heads are adjacent in a qkv row: one rotation for both.
            let rope_shape = RopeShape {
                n_tokens: n,
                n_heads: cfg.n_heads + cfg.n_kv_heads,
                head_dim: d,
                token_stride: qkv_dim,
                head_offset: 0,
            };
            ops.push(rope(ctx, rope_shape, &a.cos, &a.sin, &a.qkv)?.into());
            let s = self.attention_shape(n, layer.window);
            ops.push(
                kv_store(
                    ctx,
                    &s,
                    &a.positions,
                    &a.qkv,
                    &layer.cache_k,
                    &layer.cache_v,
                )?
                .into(),
            );
            ops.push(
                attention(
                    ctx,
                    &s,
                    &a.positions,
                    &a.qkv,
                    &layer.cache_k,
                    &layer.cache_v,
                    &a.attn,
                )?
                .into(),
            );
            push_linear(
                &mut ops,
                ctx,
                &layer.o,
                layer.o_bias.as_ref(),
                &a.attn,
                &a.hidden,
                n,
                true,
            )?;
            ops.push(rmsnorm(ctx, &rows, &a.hidden, &layer.post_norm, &a.normed)?.into());
            push_linear(
                &mut ops,
                ctx,
                &layer.gate_up,
                layer.gate_up_bias.as_ref(),
                &a.normed,
                &a.gate_up,
                n,
                false,
            )?;
            ops.push(silu_mul::silu_mul(ctx, n, cfg.intermediate_size, &a.gate_up, &a.act)?.into());
            push_linear(
                &mut ops,
                ctx,
                &layer.down,
                layer.down_bias.as_ref(),
                &a.act,
                &a.hidden,
                n,
                true,
            )?;
        }
        Ok(ops)
    }

    /// Final norm and lm_head on the last of `n` rows, then the readout.
    fn last_token_head(&self, readout: Readout, n: usize) -> Result<Vec<Op>> {
        let (ctx, cfg, a) = (self.ctx, &self.cfg, &self.acts);
        let h = cfg.hidden_size;
        let mut ops = vec![];
        if readout == Readout::None {
            return Ok(ops);
        }
        let last = NormShape {
            offset: (n - 1) * h,
            ..NormShape::rows(1, h, cfg.rms_norm_eps)
        };
        ops.push(rmsnorm(ctx, &last, &a.hidden, &self.final_norm, &a.normed)?.into());
        self.push_lm_head(&mut ops, n - 1, 1)?;
        match readout {
            Readout::Argmax => {
                ops.push(argmax::argmax(ctx, 1, cfg.vocab_size, &a.logits, &a.token)?.into());
                ops.push(self.token_slot.copy_from(a.token.raw(), 0, 4));
            }
            Readout::Logits => {
                ops.push(self.logits_slot.copy_from(
                    a.logits.raw(),
                    0,
                    (cfg.vocab_size * 4) as u64,
                ));
            }
            Readout::Sample => {
                ops.push(Op::Dispatch(self.sampler.dispatch.clone()));
                ops.push(self.token_slot.copy_from(a.token.raw(), 0, 4));
            }
            Readout::None => unreachable!(),
        }
        Ok(ops)
    }

    /// Fails, changing nothing, unless `tokens` are valid ids and fit the cache.
    fn check_input(&self, tokens: &[u32]) -> Result<()> {
        let n = self.position + tokens.len();
        if n > self.capacity {
            return Err(Error::TooManyTokens {
                what: format!(
                    "context (KV cache of {} positions{})",
                    self.capacity,
                    if self.capacity < self.cfg.max_position_embeddings {
                        "; raise --max-context"
                    } else {
                        ", the model's max_position_embeddings"
                    }
                ),
                tokens: n,
                limit: self.capacity,
            });
        }
        embedding::check_ids(tokens, self.cfg.vocab_size)
    }

    /// Writes ids, positions and the RoPE rows of one chunk (checked already).
    fn stage_inputs(&mut self, tokens: &[u32]) {
        let n = tokens.len();
        assert!(n <= self.max_batch_tokens && self.position + n <= self.capacity);
        let half = self.cfg.head_dim / 2;
        for (i, p) in self.pos_host[..n].iter_mut().enumerate() {
            *p = (self.position + i) as u32;
        }
        self.rope_table.fill(
            &self.pos_host[..n],
            &mut self.cos_host[..n * half],
            &mut self.sin_host[..n * half],
        );
        // Mark the tokens for the repetition penalty; a single token rewrites one word.
        mark_seen(&mut self.seen_host, tokens);
        if let [t] = tokens {
            let w = *t as usize / 32;
            self.acts.seen.write(self.ctx, w, &self.seen_host[w..w + 1]);
        } else {
            self.acts.seen.write(self.ctx, 0, &self.seen_host);
        }
        let a = &self.acts;
        a.ids.write(self.ctx, 0, tokens);
        a.positions.write(self.ctx, 0, &self.pos_host[..n]);
        a.cos.write(self.ctx, 0, &self.cos_host[..n * half]);
        a.sin.write(self.ctx, 0, &self.sin_host[..n * half]);
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
        let n_chunks = tokens.len().div_ceil(self.max_batch_tokens);
        let mut out = StepOutput::default();
        for (i, chunk) in tokens.chunks(self.max_batch_tokens).enumerate() {
            let last = i + 1 == n_chunks;
            let r = if last { readout } else { Readout::None };
            self.stage_inputs(chunk);
            if r == Readout::Sample {
                let u = self.rng.uniform();
                self.sampler.set(self.ctx, &self.sampling, u);
            }
            let n = chunk.len();
            if n == 1 {
                let head = match r {
                    Readout::Argmax => &self.head_argmax[..],
                    Readout::Logits => &self.head_logits[..],
                    Readout::Sample => &self.head_sample[..],
                    Readout::None => &[],
                };
                let body = self
                    .decode_body
                    .as_deref()
                    .expect("decode body built at load");
                self.ctx.run_ops("kvsift.decode", &[body, head])?;
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
        self.reset();
        // Targets: token i+1 is scored under the logits after token i.
        let mut targets: Vec<u32> = tokens[1..].to_vec();
        targets.push(0);
        self.check_input(tokens)?;
        self.acts.targets.write(self.ctx, 0, &targets);
        let v = self.cfg.vocab_size;
        let mut logits = want_logits.then(|| Vec::with_capacity(t * v));

        // Prefill part, chunk by chunk, with the lm_head over every row.
        for chunk in tokens[..prefill].chunks(self.max_batch_tokens) {
            let start = self.position;
            self.stage_inputs(chunk);
            let n = chunk.len();
            let body = if n == 1 { None } else { Some(self.body(n)?) };
            let body_ops: &[Op] = body
                .as_deref()
                .unwrap_or_else(|| self.decode_body.as_deref().unwrap_or(&[]));
            let rows = NormShape::rows(n, self.cfg.hidden_size, self.cfg.rms_norm_eps);
            let norm: Op = rmsnorm(
                self.ctx,
                &rows,
                &self.acts.hidden,
                &self.final_norm,
                &self.acts.normed,
            )?
            .into();
            self.ctx.run_ops(
                "kvsift.score.prefill",
                &[body_ops, std::slice::from_ref(&norm)],
            )?;
            self.position += n;
            for r0 in (0..n).step_by(self.head_rows) {
                let rows = self.head_rows.min(n - r0);
                let head = self.all_rows_head(r0, rows, start + r0)?;
                self.ctx.run_ops("kvsift.score.head", &[&head])?;
                if let Some(l) = logits.as_mut() {
                    l.extend(read_rows(self.ctx, &self.acts.logits, rows * v)?);
                }
            }
        }
        // Decode part: one token per step, NLL written at its row.
        if prefill < t {
            let head = self.all_rows_head(0, 1, 0)?;
            let nll_dispatch = match head.last() {
                Some(Op::Dispatch(d)) => d,
                _ => unreachable!("all_rows_head ends with the nll dispatch"),
            };
            let norm = NormShape::rows(1, self.cfg.hidden_size, self.cfg.rms_norm_eps);
            let norm: Op = rmsnorm(
                self.ctx,
                &norm,
                &self.acts.hidden,
                &self.final_norm,
                &self.acts.normed,
            )?
            .into();
            for &tok in &tokens[prefill..] {
                let row = self.position;
                self.stage_inputs(&[tok]);
                nll_dispatch.write_params(
                    self.ctx,
                    &nll::NllParams {
                        rows: 1,
                        n: v as u32,
                        row_offset: row as u32,
                    },
                );
                let body = self.decode_body.as_deref().expect("decode body");
                self.ctx.run_ops(
                    "kvsift.score.decode",
                    &[body, std::slice::from_ref(&norm), &head],
                )?;
                self.position += 1;
                if let Some(l) = logits.as_mut() {
                    l.extend(read_rows(self.ctx, &self.acts.logits, v)?);
                }
            }
        }
        let nll = read_rows(self.ctx, &self.acts.nll, t)?;
        Ok(ScoreOutput {
            nll: nll[..t - 1].to_vec(),
            logits,
        })
    }

    /// logits[0..rows] = lm_head(normed rows r0..r0 + rows), through `head_in`.
    fn push_lm_head(&self, ops: &mut Vec<Op>, r0: usize, rows: usize) -> Result<()> {
        let (a, h) = (&self.acts, self.cfg.hidden_size);
        ops.push(copy(&a.normed, r0 * h, &a.head_in, 0, rows * h));
        push_linear(
            ops,
            self.ctx,
            self.lm_head(),
            None,
            &a.head_in,
            &a.logits,
            rows,
            false,
        )
    }

    /// lm_head over `rows` rows of `normed` starting at row `r0`, then the NLL
    /// of the targets at `row_offset..`.
    fn all_rows_head(&self, r0: usize, rows: usize, row_offset: usize) -> Result<Vec<Op>> {
        let mut ops = vec![];
        self.push_lm_head(&mut ops, r0, rows)?;
        let (a, v) = (&self.acts, self.cfg.vocab_size);
        ops.push(nll::nll(self.ctx, rows, v, &a.logits, &a.targets, &a.nll, row_offset)?.into());
        Ok(ops)
    }
}

fn read_rows(ctx: &GpuContext, buf: &GpuBuffer<f32>, n: usize) -> Result<Vec<f32>> {
    let slot = ReadbackSlot::new(ctx, "readback.rows", (n * 4) as u64)?;
    ctx.run_ops(
        "kvsift.readback",
        &[&[slot.copy_from(buf.raw(), 0, (n * 4) as u64)]],
    )?;
    slot.read(ctx, n)
}

fn copy(
    src: &GpuBuffer<f32>,
    src_elem: usize,
    dst: &GpuBuffer<f32>,
    dst_elem: usize,
    n: usize,
) -> Op {
    Op::Copy(crate::gpu::BufferCopy {
        src: src.raw().clone(),
        src_offset: (src_elem * 4) as u64,
        dst: dst.raw().clone(),
        dst_offset: (dst_elem * 4) as u64,
        size: (n * 4) as u64,
    })
}

#[allow(clippy::too_many_arguments)]
fn push_linear(
    ops: &mut Vec<Op>,
    ctx: &GpuContext,
    weights: &GpuMatrix,
    bias: Option<&GpuBuffer<f32>>,
    x: &GpuBuffer<f32>,
    y: &GpuBuffer<f32>,
    n: usize,
    accumulate: bool,
) -> Result<()> {
    let d: Vec<Dispatch> = linear(
        ctx,
        &Linear {
            weights,
            bias,
            x,
            y,
            n_vecs: n,
            accumulate,
        },
    )?;
    ops.extend(d.into_iter().map(Op::from));
    Ok(())
}
