//! A Hugging Face `config.json` turned into the internal [`ModelConfig`].
//!
//! Reads both layouts in the wild: the Hub's (`rope_theta`, `rope_scaling`
//! with `rope_type` or the older `type`, `torch_dtype`) and transformers v5's
//! (`rope_parameters`, `dtype`, `layer_types`).

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::ops::rope::{RopeConfig, RopeScaling};
use crate::ops::sample::SamplingParams;

/// The architectures kvsift runs; all are the Llama decoder with variations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Mistral,
}

impl Arch {
    fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Arch::Llama),
            "Qwen2ForCausalLM" => Some(Arch::Qwen2),
            "Qwen3ForCausalLM" => Some(Arch::Qwen3),
            "MistralForCausalLM" => Some(Arch::Mistral),
            _ => None,
        }
    }
}

/// Bounds on config sizes: far above any released checkpoint, low enough
/// that every buffer size derived from them fits the integer types of the
/// kernels (a config is checked against its checkpoint's tensors later).
pub const MAX_WIDTH: usize = 1 << 20;
pub const MAX_HEADS: usize = 1 << 12;
pub const MAX_LAYERS: usize = 1 << 12;
/// The sampler's token indices are exact in f32 below 2^24.
pub const MAX_VOCAB: usize = crate::ops::sample::MAX_VOCAB;

/// Everything the forward pass needs, validated.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// Sliding-window size of each layer (`None` = full attention).
    pub layer_windows: Vec<Option<usize>>,
    /// q/k/v projections carry biases (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    /// gate/up/down carry biases (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Rows of the fused q/k/v projection.
    pub fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }

    /// Reads and validates `dir/config.json`, or the metadata of a GGUF
    /// file (see `model::gguf::model::config_json`).
    pub fn load(dir: &Path) -> Result<Self> {
        if crate::model::weights::is_gguf(dir) {
            let file = crate::model::gguf::GgufFile::open(dir)?;
            return Self::from_json(dir, &crate::model::gguf::model::config_json(&file)?);
        }
        let path = dir.join("config.json");
        let text = crate::model::weights::read_text(&path)?;
        let json = parse_object(&path, &text)?;
        Self::from_json(&path, &json)
    }

    pub fn from_json(path: &Path, j: &Value) -> Result<Self> {
        let f = Fields { path, j };
        let arch_name = j
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .ok_or_else(|| {
                f.bad(
                    "architectures",
                    "missing (expected e.g. [\"LlamaForCausalLM\"])",
                )
            })?;
        let arch = Arch::from_hf(arch_name).ok_or_else(|| Error::UnsupportedModel {
            path: path.to_path_buf(),
            what: format!(
                "architecture {arch_name:?}; kvsift runs LlamaForCausalLM, Qwen2ForCausalLM, \
                 Qwen3ForCausalLM and MistralForCausalLM"
            ),
        })?;
        if let Some(act) = j.get("hidden_act").and_then(|v| v.as_str())
            && act != "silu"
        {
            return Err(Error::UnsupportedModel {
                path: path.to_path_buf(),
                what: format!("hidden_act {act:?} (only silu)"),
            });
        }

        let hidden_size = f.dim("hidden_size", MAX_WIDTH)?;
        let n_heads = f.dim("num_attention_heads", MAX_HEADS)?;
        let n_kv_heads = match f.opt_usize("num_key_value_heads")? {
            Some(_) => f.dim("num_key_value_heads", MAX_HEADS)?,
            None => n_heads,
        };
        let n_layers = f.dim("num_hidden_layers", MAX_LAYERS)?;
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if !hidden_size.is_multiple_of(n_heads) => {
                return Err(f.bad(
                    "num_attention_heads",
                    &format!(
                        "{n_heads} does not divide hidden_size {hidden_size} (and there is no head_dim)"
                    ),
                ));
            }
            None => hidden_size / n_heads,
        };
        if n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(f.bad(
                "num_key_value_heads",
                &format!("{n_kv_heads} does not divide num_attention_heads {n_heads}"),
            ));
        }
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > crate::ops::attention::MAX_HEAD_DIM {
            return Err(f.bad(
                "head_dim",
                &format!(
                    "{head_dim}: must be even and at most {}",
                    crate::ops::attention::MAX_HEAD_DIM
                ),
            ));
        }

        let rope = rope_config(&f, head_dim)?;
        rope.validate().map_err(|e| f.bad("rope", &e.to_string()))?;

        let max_pos = f.dim("max_position_embeddings", usize::MAX)?;
        let layer_windows = layer_windows(&f, arch, n_layers)?;

        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let eps = f.f64("rms_norm_eps")?;
        if !(eps.is_finite() && eps > 0.0) {
            return Err(f.bad("rms_norm_eps", "must be positive"));
        }
        let cfg = ModelConfig {
            arch,
            vocab_size: f.dim("vocab_size", MAX_VOCAB)?,
            hidden_size,
            intermediate_size: f.dim("intermediate_size", MAX_WIDTH)?,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps: eps as f32,
            rope,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            max_position_embeddings: max_pos,
            layer_windows,
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: attention_bias && arch != Arch::Qwen2,
            mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
            qk_norm: arch == Arch::Qwen3,
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
        };
        Ok(cfg)
    }
}

/// Defaults from `generation_config.json`, as transformers applies them.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationDefaults {
    pub eos_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
}

impl GenerationDefaults {
    /// Reads `dir/generation_config.json`; a missing file means greedy with no extra stop ids.
    /// A GGUF file: greedy, stopping at its EOS/EOT/EOM ids.
    pub fn load(dir: &Path) -> Result<Self> {
        if crate::model::weights::is_gguf(dir) {
            let file = crate::model::gguf::GgufFile::open(dir)?;
            return Ok(Self {
                eos_token_ids: crate::model::gguf::model::eos_token_ids(&file)?,
                sampling: SamplingParams::greedy(),
            });
        }
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self {
                eos_token_ids: vec![],
                sampling: SamplingParams::greedy(),
            });
        }
        let text = crate::model::weights::read_text(&path)?;
        let j = parse_object(&path, &text)?;
        let f = Fields { path: &path, j: &j };
        let mut sampling = SamplingParams::greedy();
        if f.opt_bool("do_sample")?.unwrap_or(false) {
            // transformers' GenerationConfig defaults when sampling.
            sampling.temperature = f.opt_f64_in(&j, "temperature")?.unwrap_or(1.0) as f32;
            sampling.top_k = f.opt_usize("top_k")?.unwrap_or(50);
            sampling.top_p = f.opt_f64_in(&j, "top_p")?.unwrap_or(1.0) as f32;
            sampling.min_p = f.opt_f64_in(&j, "min_p")?.unwrap_or(0.0) as f32;
        }
        sampling.repetition_penalty = f.opt_f64_in(&j, "repetition_penalty")?.unwrap_or(1.0) as f32;
        sampling
            .validate()
            .map_err(|e| f.bad("sampling", &e.to_string()))?;
        Ok(Self {
            eos_token_ids: f.token_ids("eos_token_id")?,
            sampling,
        })
    }
}

/// A JSON file that must hold an object (config.json, generation_config.json,
/// tokenizer_config.json).
pub fn parse_object(path: &Path, text: &str) -> Result<Value> {
    let bad = |reason: String| Error::BadConfig {
        path: path.to_path_buf(),
        reason,
    };
    let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let kind = match &v {
        Value::Object(_) => return Ok(v),
        Value::Array(_) => "an array",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
    };
    Err(bad(format!("expected a JSON object, got {kind}")))
}

struct Fields<'a> {
    path: &'a Path,
    j: &'a Value,
}

impl Fields<'_> {
    fn bad(&self, field: &str, reason: &str) -> Error {
        Error::BadConfig {
            path: self.path.to_path_buf(),
            reason: format!("{field}: {reason}"),
        }
    }
    fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        match self.j.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.bad(k, &format!("expected a non-negative integer, got {v}"))),
        }
    }
    fn usize(&self, k: &str) -> Result<usize> {
        self.opt_usize(k)?.ok_or_else(|| self.bad(k, "missing"))
    }
    /// A required size in `1..=max`.
    fn dim(&self, k: &str, max: usize) -> Result<usize> {
        let v = self.usize(k)?;
        if v == 0 {
            return Err(self.bad(k, "must be positive"));
        }
        if v > max {
            return Err(self.bad(k, &format!("{v} is beyond what kvsift supports ({max})")));
        }
        Ok(v)
    }
    /// `bos_token_id` / `eos_token_id`: an id, a list of ids, or null.
    fn token_ids(&self, k: &str) -> Result<Vec<u32>> {
        let bad = || self.bad(k, "expected a token id, a list of token ids or null");
        let one = |v: &Value| v.as_u64().and_then(|x| u32::try_from(x).ok());
        match self.j.get(k) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(a)) => a.iter().map(|x| one(x).ok_or_else(bad)).collect(),
            Some(v) => one(v).map(|x| vec![x]).ok_or_else(bad),
        }
    }
    fn opt_f64_in(&self, obj: &Value, k: &str) -> Result<Option<f64>> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(k, &format!("expected a number, got {v}"))),
        }
    }
    fn f64(&self, k: &str) -> Result<f64> {
        self.opt_f64_in(self.j, k)?
            .ok_or_else(|| self.bad(k, "missing"))
    }
    fn opt_bool(&self, k: &str) -> Result<Option<bool>> {
        match self.j.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(k, &format!("expected true or false, got {v}"))),
        }
    }
}

fn rope_config(f: &Fields, head_dim: usize) -> Result<RopeConfig> {
    // v5: rope_parameters holds theta and scaling; Hub: rope_theta + rope_scaling.
    let params = f.j.get("rope_parameters").filter(|v| !v.is_null());
    let scaling = params.or_else(|| f.j.get("rope_scaling").filter(|v| !v.is_null()));
    let theta = match params {
        Some(p) => f.opt_f64_in(p, "rope_theta")?,
        None => None,
    }
    .or(f.opt_f64_in(f.j, "rope_theta")?)
    .unwrap_or(10000.0);
    let scaling = match scaling {
        None => RopeScaling::None,
        Some(s) if !s.is_object() => {
            return Err(f.bad(
                if params.is_some() {
                    "rope_parameters"
                } else {
                    "rope_scaling"
                },
                &format!("expected an object or null, got {s}"),
            ));
        }
        Some(s) => {
            let kind = match s.get("rope_type").or_else(|| s.get("type")) {
                Some(Value::String(k)) => k.as_str(),
                Some(other) => {
                    return Err(f.bad(
                        "rope_scaling.rope_type",
                        &format!("expected a string, got {other}"),
                    ));
                }
                // transformers refuses scaling parameters without a type
                // (KeyError: missing rope_type) rather than guess one.
                None if s.as_object().is_some_and(|o| {
                    o.keys()
                        .any(|k| k != "rope_theta" && k != "partial_rotary_factor")
                }) =>
                {
                    return Err(f.bad(
                        "rope_scaling",
                        &format!(
                            "{s} has scaling parameters but no rope_type (or type); \
                             name it, e.g. \"linear\" or \"llama3\""
                        ),
                    ));
                }
                None => "default",
            };
            let need = |k: &str| -> Result<f64> {
                f.opt_f64_in(s, k)?
                    .ok_or_else(|| f.bad(&format!("rope_scaling.{k}"), "missing"))
            };
            match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear {
                    factor: need("factor")?,
                },
                // What a GGUF file's rope_freqs.weight becomes (gguf/model.rs).
                "gguf_rope_freqs" => RopeScaling::Factors(
                    s.get("factors")
                        .and_then(|v| v.as_array())
                        .and_then(|a| a.iter().map(|v| v.as_f64().map(|x| x as f32)).collect())
                        .ok_or_else(|| f.bad("rope_freqs.weight", "expected numbers"))?,
                ),
                "llama3" => RopeScaling::Llama3 {
                    factor: need("factor")?,
                    low_freq_factor: need("low_freq_factor")?,
                    high_freq_factor: need("high_freq_factor")?,
                    original_max_position_embeddings: need("original_max_position_embeddings")?,
                },
                other => {
                    return Err(Error::UnsupportedModel {
                        path: f.path.to_path_buf(),
                        what: format!(
                            "rope_scaling type {other:?} (supported: default, linear, llama3)"
                        ),
                    });
                }
            }
        }
    };
    Ok(RopeConfig {
        head_dim,
        theta,
        scaling,
    })
}

fn layer_windows(f: &Fields, arch: Arch, n_layers: usize) -> Result<Vec<Option<usize>>> {
    let window = f.opt_usize("sliding_window")?;
    if window == Some(0) && arch != Arch::Llama {
        return Err(f.bad(
            "sliding_window",
            "0: must be positive (or null for full attention)",
        ));
    }
    if let Some(types) = f.j.get("layer_types").and_then(|v| v.as_array()) {
        if types.len() != n_layers {
            return Err(f.bad(
                "layer_types",
                &format!("{} entries for {n_layers} layers", types.len()),
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(None),
                Some("sliding_attention") => window.map(Some).ok_or_else(|| {
                    f.bad(
                        "sliding_window",
                        "missing but layer_types has sliding_attention",
                    )
                }),
                _ => Err(f.bad("layer_types", &format!("unknown entry {t}"))),
            })
            .collect();
    }
    Ok(match arch {
        // Mistral: the window (when set) applies to every layer.
        Arch::Mistral => vec![window; n_layers],
        // transformers' Llama attends to the whole context whatever
        // sliding_window says (its attention never reads it).
        Arch::Llama => vec![None; n_layers],
        // Qwen: only with use_sliding_window, from max_window_layers on.
        Arch::Qwen2 | Arch::Qwen3 => {
            let used = f.opt_bool("use_sliding_window")?.unwrap_or(false);
            let from = f.opt_usize("max_window_layers")?.unwrap_or(n_layers);
            (0..n_layers)
                .map(|l| if used && l >= from { window } else { None })
                .collect()
        }
    })
}

#[cfg(test)]
mod tests;
