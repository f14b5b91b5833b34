//! The readable CPU reference forward pass (llama2.c style): one token at a
//! time, f32 activations, f64 dot products and softmax. Tests hold the GPU
//! model against it, and it is the place to read what the model computes.
//! Weight values are those the GPU stores (`TensorRef::stored_values`:
//! rounded to f16, or blocks dequantized), so the two
//! differ only by arithmetic.

use std::path::Path;

use crate::error::Result;
use crate::gpu::WeightDtype;
use crate::model::config::ModelConfig;
use crate::model::llama::WeightFormat;
use crate::model::weights::WeightStore;
use crate::ops::rope::RopeTable;

struct Linear {
    w: Vec<f32>,
    b: Option<Vec<f32>>,
    rows: usize,
    cols: usize,
}

impl Linear {
    fn load(
        store: &WeightStore,
        name: &str,
        rows: usize,
        cols: usize,
        bias: bool,
        dtype: WeightDtype,
    ) -> Result<Self> {
        let t = store.get(&format!("{name}.weight"))?;
        t.expect(&[rows, cols])?;
        let w = t.stored_values(dtype)?;
        let b = if bias {
            let t = store.get(&format!("{name}.bias"))?;
            t.expect(&[rows])?;
            Some(t.to_f32()?)
        } else {
            None
        };
        Ok(Self { w, b, rows, cols })
    }

    fn apply(&self, x: &[f32]) -> Vec<f32> {
        (0..self.rows)
            .map(|r| {
                let row = &self.w[r * self.cols..(r + 1) * self.cols];
                let s: f64 = row.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
                (s + self.b.as_ref().map_or(0.0, |b| b[r] as f64)) as f32
            })
            .collect()
    }
}

fn vector(store: &WeightStore, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = store.get(name)?;
    t.expect(&[len])?;
    t.to_f32()
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| *v as f64 * *v as f64).sum::<f64>() / x.len() as f64;
    let scale = 1.0 / (ms + eps as f64).sqrt();
    x.iter()
        .zip(w)
        .map(|(v, w)| (*w as f64 * (*v as f64 * scale)) as f32)
        .collect()
}

struct Layer {
    input_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    o: Linear,
    post_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// `[position][kv_dim]`
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

/// The model on the CPU, with its own KV cache.
pub struct Reference {
    pub cfg: ModelConfig,
    embed: Vec<f32>,
    lm_head: Option<Vec<f32>>,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    rope: RopeTable,
}

impl Reference {
    /// The model at `path` (a directory or a GGUF file) with the weights
    /// the GPU holds when loaded in `format`.
    pub fn load(path: &Path, format: impl Into<WeightFormat>) -> Result<Self> {
        let format = format.into();
        let dtype = format.dtype;
        let cfg = ModelConfig::load(path)?;
        let store = WeightStore::open(path)?;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let matrix = |name: &str, rows, dtype: WeightDtype| -> Result<Vec<f32>> {
            let t = store.get(name)?;
            t.expect(&[rows, h])?;
            t.stored_values(dtype)
        };
        let tied = cfg.tie_word_embeddings;
        let embed = matrix(
            "model.embed_tokens.weight",
            cfg.vocab_size,
            format.embeddings(tied),
        )?;
        let lm_head = if tied {
            None
        } else {
            Some(matrix("lm_head.weight", cfg.vocab_size, format.lm_head())?)
        };
        let mut layers = vec![];
        for l in 0..cfg.n_layers {
            let p = format!("model.layers.{l}");
            let lin = |n: &str, rows, cols, bias| {
                Linear::load(&store, &format!("{p}.{n}"), rows, cols, bias, dtype)
            };
            layers.push(Layer {
                input_norm: vector(&store, &format!("{p}.input_layernorm.weight"), h)?,
                q: lin("self_attn.q_proj", cfg.q_dim(), h, cfg.qkv_bias)?,
                k: lin("self_attn.k_proj", cfg.kv_dim(), h, cfg.qkv_bias)?,
                v: lin("self_attn.v_proj", cfg.kv_dim(), h, cfg.qkv_bias)?,
                q_norm: cfg
                    .qk_norm
                    .then(|| {
                        vector(
                            &store,
                            &format!("{p}.self_attn.q_norm.weight"),
                            cfg.head_dim,
                        )
                    })
                    .transpose()?,
                k_norm: cfg
                    .qk_norm
                    .then(|| {
                        vector(
                            &store,
                            &format!("{p}.self_attn.k_norm.weight"),
                            cfg.head_dim,
                        )
                    })
                    .transpose()?,
                o: lin("self_attn.o_proj", h, cfg.q_dim(), cfg.o_bias)?,
                post_norm: vector(&store, &format!("{p}.post_attention_layernorm.weight"), h)?,
                gate: lin("mlp.gate_proj", i, h, cfg.mlp_bias)?,
                up: lin("mlp.up_proj", i, h, cfg.mlp_bias)?,
                down: lin("mlp.down_proj", h, i, cfg.mlp_bias)?,
                keys: vec![],
                values: vec![],
            });
        }
        Ok(Self {
            embed,
            lm_head,
            norm: vector(&store, "model.norm.weight", h)?,
            layers,
            rope: RopeTable::new(&cfg.rope)?,
            cfg,
        })
    }

    /// Tokens in the cache.
    pub fn position(&self) -> usize {
        self.layers[0].keys.len()
    }

    /// Runs one token at the next position and returns its logits.
    pub fn forward(&mut self, token: u32) -> Vec<f32> {
        let cfg = &self.cfg;
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let pos = self.position();
        let half = d / 2;
        let (mut cos, mut sin) = (vec![0.0; half], vec![0.0; half]);
        // cos and sin hold one position's rows.
        self.rope
            .fill(&[pos as u32], &mut cos, &mut sin)
            .expect("one row of each table");
        let rotate = |x: &mut [f32]| {
            for head in x.chunks_exact_mut(d) {
                for i in 0..half {
                    let (x1, x2) = (head[i], head[i + half]);
                    head[i] = x1 * cos[i] - x2 * sin[i];
                    head[i + half] = x2 * cos[i] + x1 * sin[i];
                }
            }
        };
        let head_norm = |x: &mut [f32], w: &[f32]| {
            for head in x.chunks_exact_mut(d) {
                let n = rmsnorm(head, w, cfg.rms_norm_eps);
                head.copy_from_slice(&n);
            }
        };

        let mut x: Vec<f32> = self.embed[token as usize * h..(token as usize + 1) * h].to_vec();
        let group = cfg.n_heads / cfg.n_kv_heads;
        let scale = 1.0 / (d as f64).sqrt();
        let attend_cpu = crate::ops::attention::attend_cpu;
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let xn = rmsnorm(&x, &layer.input_norm, cfg.rms_norm_eps);
            let (mut q, mut k, v) = (layer.q.apply(&xn), layer.k.apply(&xn), layer.v.apply(&xn));
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                head_norm(&mut q, qn);
                head_norm(&mut k, kn);
            }
            rotate(&mut q);
            rotate(&mut k);
            layer.keys.push(k);
            layer.values.push(v);

            let lo = match cfg.layer_windows[l] {
                Some(w) => (pos + 1).saturating_sub(w),
                None => 0,
            };
            let (keys, values) = (&layer.keys, &layer.values);
            let mut attn = Vec::with_capacity(cfg.q_dim());
            for hq in 0..cfg.n_heads {
                let g = hq / group;
                let slots = (lo..=pos)
                    .map(move |j| (&keys[j][g * d..(g + 1) * d], &values[j][g * d..(g + 1) * d]));
                attn.extend(
                    attend_cpu(&q[hq * d..(hq + 1) * d], slots, scale)
                        .into_iter()
                        .map(|v| v as f32),
                );
            }
            for (xi, oi) in x.iter_mut().zip(layer.o.apply(&attn)) {
                *xi += oi;
            }
            let xn = rmsnorm(&x, &layer.post_norm, cfg.rms_norm_eps);
            let (g, u) = (layer.gate.apply(&xn), layer.up.apply(&xn));
            let act: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| (*g as f64 / (1.0 + (-*g as f64).exp()) * *u as f64) as f32)
                .collect();
            for (xi, di) in x.iter_mut().zip(layer.down.apply(&act)) {
                *xi += di;
            }
        }
        let xn = rmsnorm(&x, &self.norm, cfg.rms_norm_eps);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        (0..cfg.vocab_size)
            .map(|r| {
                let row = &head[r * h..(r + 1) * h];
                row.iter()
                    .zip(&xn)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>() as f32
            })
            .collect()
    }
}
