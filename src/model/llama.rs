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
//!             cache[pos] = k, v; a = attention(q, cache)      (the caller's KV scheme)
//!             h += a Wo (+bo)                                 residual fused into o_proj
//!             x = rmsnorm(h) * post_attention_layernorm
//!             h += (silu(x Wg) * x Wu) Wd                     gate/up fused, residual fused
//! logits = rmsnorm(h) * norm  W_lm  (W_lm = embed when tied)
//! ```
//!
//! This file holds the weights ([`LlamaWeights`]: converted at load, q/k/v and
//! gate/up fused), the per-step working buffers ([`Activations`]) and the
//! builders that record a step as a list of [`Op`]s. For one token (decode)
//! the norms and the SwiGLU product run inside the projections that read them
//! (`norm_linear`, `swiglu_linear`): a layer is 8 dispatches, not 11. The KV cache is the
//! caller's: [`body`] asks it for each layer's store-and-attend ops (the
//! engine's paged kernels, `engine/plans.rs`).

use std::path::Path;

use crate::error::{Error, Result};
use crate::gpu::buffer::checked_len;
use crate::gpu::{
    BufferCopy, Dispatch, GpuBuffer, GpuContext, GpuMatrix, Op, Segment, StagedInput, WeightDtype,
};
use crate::model::config::ModelConfig;
use crate::model::weights::{TensorRef, WeightStore};
use crate::ops::embedding;
use crate::ops::linear::{Linear, PreNorm, linear, norm_linear, swiglu_linear};
use crate::ops::rmsnorm::{NormShape, rmsnorm, rmsnorm_inplace};
use crate::ops::rope::{RopeShape, RopeTable, rope};

mod forward;
pub use forward::{
    Activations, body, copy, final_norm, push_linear, push_lm_head, push_nll_head,
    push_norm_lm_head,
};

/// One decoder layer's weights.
pub struct LayerWeights {
    pub input_norm: GpuBuffer<f32>,
    pub qkv: GpuMatrix,
    pub qkv_bias: Option<GpuBuffer<f32>>,
    pub q_norm: Option<GpuBuffer<f32>>,
    pub k_norm: Option<GpuBuffer<f32>>,
    pub o: GpuMatrix,
    pub o_bias: Option<GpuBuffer<f32>>,
    pub post_norm: GpuBuffer<f32>,
    pub gate_up: GpuMatrix,
    pub gate_up_bias: Option<GpuBuffer<f32>>,
    pub down: GpuMatrix,
    pub down_bias: Option<GpuBuffer<f32>>,
    /// Sliding window of this layer (0 = full attention).
    pub window: usize,
}

/// How the loader stores a checkpoint's float matrices (blocks a GGUF file
/// holds stay as they are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightFormat {
    /// The projections' dtype; quantized ones fall back to f16 for rows
    /// that are not whole blocks, as llama.cpp does.
    pub dtype: WeightDtype,
    /// With a quantized `dtype`, quantize the output projection too (by
    /// default it stays f16: the logits are the most sensitive product).
    /// The token embeddings follow `dtype` (llama.cpp quantizes
    /// `token_embd`), except when tied to an f16 output projection: one
    /// table serves both.
    pub quantize_lm_head: bool,
}

impl From<WeightDtype> for WeightFormat {
    fn from(dtype: WeightDtype) -> Self {
        Self {
            dtype,
            quantize_lm_head: false,
        }
    }
}

impl WeightFormat {
    /// The output projection's dtype.
    pub fn lm_head(self) -> WeightDtype {
        match self.dtype {
            WeightDtype::Quant(_) if !self.quantize_lm_head => WeightDtype::F16,
            d => d,
        }
    }

    /// The token embeddings' dtype (`tied`: one table is both).
    pub fn embeddings(self, tied: bool) -> WeightDtype {
        if tied { self.lm_head() } else { self.dtype }
    }
}

/// The model's weights on the GPU.
pub struct LlamaWeights {
    pub cfg: ModelConfig,
    pub format: WeightFormat,
    pub embed: GpuMatrix,
    lm_head: Option<GpuMatrix>,
    pub final_norm: GpuBuffer<f32>,
    pub layers: Vec<LayerWeights>,
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
    // Each tensor in the dtype it is kept in (GGUF blocks as they are).
    let segments: Vec<Segment> = tensors
        .iter()
        .zip(parts)
        .map(|(t, (_, rows))| Segment {
            rows: *rows,
            dtype: t.stored_as(dtype),
        })
        .collect();
    let mut scratch = Vec::new();
    let m = GpuMatrix::upload_segments(ctx, label, cols, &segments, |r, dtype, out| {
        // starts[0] == 0, so some part starts at or before every row.
        let i = starts.iter().rposition(|s| *s <= r).unwrap_or(0);
        tensors[i].pack_row(r - starts[i], dtype, &mut scratch, out)
    })?;
    progress.inc(tensors.iter().map(|t| t.byte_len() as u64).sum());
    Ok(m)
}

/// A 1-D f32 vector (norm weight), checked against `len`.
fn vector(ctx: &GpuContext, store: &WeightStore, name: &str, len: usize) -> Result<GpuBuffer<f32>> {
    let t = store.get(name)?;
    t.expect(&[len])?;
    GpuBuffer::from_slice(ctx, name, &t.to_f32()?)
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
        all.extend(t.to_f32()?);
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

/// Every tensor the config implies, with its shape (for the check before loading).
fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, v, inter, d) = (
        cfg.hidden_size,
        cfg.vocab_size,
        cfg.intermediate_size,
        cfg.head_dim,
    );
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![v, h]),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![v, h]));
    }
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}");
        let mut push = |name: &str, shape: Vec<usize>| out.push((format!("{p}.{name}"), shape));
        for (proj, rows) in [
            ("q_proj", cfg.q_dim()),
            ("k_proj", cfg.kv_dim()),
            ("v_proj", cfg.kv_dim()),
        ] {
            push(&format!("self_attn.{proj}.weight"), vec![rows, h]);
            if cfg.qkv_bias {
                push(&format!("self_attn.{proj}.bias"), vec![rows]);
            }
        }
        push("self_attn.o_proj.weight", vec![h, cfg.q_dim()]);
        if cfg.o_bias {
            push("self_attn.o_proj.bias", vec![h]);
        }
        if cfg.qk_norm {
            push("self_attn.q_norm.weight", vec![d]);
            push("self_attn.k_norm.weight", vec![d]);
        }
        for (proj, shape) in [
            ("gate_proj", vec![inter, h]),
            ("up_proj", vec![inter, h]),
            ("down_proj", vec![h, inter]),
        ] {
            if cfg.mlp_bias {
                push(&format!("mlp.{proj}.bias"), vec![shape[0]]);
            }
            push(&format!("mlp.{proj}.weight"), shape);
        }
        push("input_layernorm.weight", vec![h]);
        push("post_attention_layernorm.weight", vec![h]);
    }
    out
}

/// Checks that the checkpoint holds every tensor the config implies, with
/// the right shape and a dtype kvsift reads, before anything is allocated
/// or uploaded (a config that disagrees with its checkpoint fails at once,
/// naming the field or tensor).
pub fn check_checkpoint(cfg: &ModelConfig, store: &WeightStore) -> Result<()> {
    let layers_held = store
        .names()
        .filter_map(|n| {
            n.strip_prefix("model.layers.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|l| l + 1)
        .max()
        .unwrap_or(0);
    if cfg.n_layers > layers_held {
        return Err(Error::BadConfig {
            path: store.first_path().with_file_name("config.json"),
            reason: format!(
                "num_hidden_layers: {}, but the checkpoint holds tensors of {layers_held} layers",
                cfg.n_layers
            ),
        });
    }
    for (name, shape) in expected_tensors(cfg) {
        store.get(&name)?.expect(&shape)?;
    }
    Ok(())
}

impl LlamaWeights {
    /// Loads and converts every weight; a tensor whose shape disagrees with
    /// the config is an error naming it.
    pub fn load(
        ctx: &GpuContext,
        cfg: ModelConfig,
        store: &WeightStore,
        format: impl Into<WeightFormat>,
        progress: bool,
    ) -> Result<Self> {
        let format = format.into();
        let dtype = format.dtype;
        check_checkpoint(&cfg, store)?;
        let (h, v, inter) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let pb = progress_bar(progress, store.total_bytes());
        let embed_name = "model.embed_tokens.weight".to_string();
        let embed = fused_matrix(
            ctx,
            store,
            &embed_name,
            &[(embed_name.clone(), v)],
            h,
            format.embeddings(cfg.tie_word_embeddings),
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
                format.lm_head(),
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
            let gate_up_parts = [
                (format!("{p}.mlp.gate_proj.weight"), inter),
                (format!("{p}.mlp.up_proj.weight"), inter),
            ];
            let o_part = [(format!("{p}.self_attn.o_proj.weight"), h)];
            let down_part = [(format!("{p}.mlp.down_proj.weight"), h)];
            let bias = |on: bool,
                        label: &str,
                        parts: &[(String, usize)]|
             -> Result<Option<GpuBuffer<f32>>> {
                if !on {
                    return Ok(None);
                }
                let names: Vec<(String, usize)> = parts
                    .iter()
                    .map(|(n, r)| (n.replace(".weight", ".bias"), *r))
                    .collect();
                fused_bias(ctx, store, label, &names).map(Some)
            };
            let head_norm = |name: &str| -> Result<Option<GpuBuffer<f32>>> {
                cfg.qk_norm
                    .then(|| {
                        vector(
                            ctx,
                            store,
                            &format!("{p}.self_attn.{name}.weight"),
                            cfg.head_dim,
                        )
                    })
                    .transpose()
            };
            layers.push(LayerWeights {
                input_norm: vector(ctx, store, &format!("{p}.input_layernorm.weight"), h)?,
                qkv: fused_matrix(ctx, store, &format!("{p}.qkv"), &qkv_parts, h, dtype, &pb)?,
                qkv_bias: bias(cfg.qkv_bias, &format!("{p}.qkv.bias"), &qkv_parts)?,
                q_norm: head_norm("q_norm")?,
                k_norm: head_norm("k_norm")?,
                o: fused_matrix(ctx, store, &o_part[0].0, &o_part, cfg.q_dim(), dtype, &pb)?,
                o_bias: bias(cfg.o_bias, &format!("{p}.o.bias"), &o_part)?,
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
                gate_up_bias: bias(cfg.mlp_bias, &format!("{p}.gate_up.bias"), &gate_up_parts)?,
                down: fused_matrix(ctx, store, &down_part[0].0, &down_part, inter, dtype, &pb)?,
                down_bias: bias(cfg.mlp_bias, &format!("{p}.down.bias"), &down_part)?,
                window: cfg.layer_windows[l].unwrap_or(0),
            });
        }
        pb.finish_and_clear();
        Ok(Self {
            cfg,
            format,
            embed,
            lm_head,
            final_norm,
            layers,
        })
    }

    /// The output projection (the embedding when tied).
    pub fn lm_head(&self) -> &GpuMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes of weights a decode step reads: every layer's matrices and the
    /// output projection (of an untied embedding table, one row per token:
    /// not counted).
    pub fn decode_bytes(&self) -> u64 {
        let embed = if self.lm_head.is_some() {
            self.embed.size_bytes()
        } else {
            0
        };
        self.bytes() - embed
    }

    /// The storage of the matrices, e.g. `q4_K+q6_K, lm_head q6_K`.
    pub fn dtype_summary(&self) -> String {
        let mut body: Vec<String> = Vec::new();
        for l in &self.layers {
            for m in [&l.qkv, &l.o, &l.gate_up, &l.down] {
                for p in &m.parts {
                    let n = p.dtype.name().to_string();
                    if !body.contains(&n) {
                        body.push(n);
                    }
                }
            }
        }
        format!(
            "{}, embeddings {}, lm_head {}",
            body.join("+"),
            self.embed.dtype_names(),
            self.lm_head().dtype_names()
        )
    }

    /// Bytes of the weight matrices on the GPU.
    pub fn bytes(&self) -> u64 {
        self.embed.size_bytes()
            + self.lm_head.as_ref().map_or(0, |m| m.size_bytes())
            + self
                .layers
                .iter()
                .map(|l| {
                    l.qkv.size_bytes()
                        + l.o.size_bytes()
                        + l.gate_up.size_bytes()
                        + l.down.size_bytes()
                })
                .sum::<u64>()
    }
}

/// Checks token ids against the vocabulary (a user error otherwise).
pub fn check_ids(cfg: &ModelConfig, tokens: &[u32]) -> Result<()> {
    embedding::check_ids(tokens, cfg.vocab_size)
}

/// Loads config, weights (see [`LlamaWeights::load`]) from a model
/// directory or a GGUF file.
pub fn load_weights(
    ctx: &GpuContext,
    path: &Path,
    format: impl Into<WeightFormat>,
    progress: bool,
) -> Result<LlamaWeights> {
    let cfg = ModelConfig::load(path)?;
    let store = WeightStore::open(path)?;
    LlamaWeights::load(ctx, cfg, &store, format, progress)
}
