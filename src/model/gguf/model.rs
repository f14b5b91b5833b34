//! A GGUF file as a model: the Hugging Face `config.json` its metadata
//! implies, and the `tokenizer.json` its `tokenizer.ggml.*` vocabulary
//! implies (byte-level BPE, `tokenizer.ggml.model = gpt2`), so one path
//! (`ModelConfig::from_json`, the tokenizers crate) serves both kinds of
//! checkpoint. What kvsift cannot run is an error naming the GGUF key.

use serde_json::{Value, json};

use super::{GgufFile, GgufValue};
use crate::error::{Error, Result};

/// The architectures kvsift runs, by `general.architecture` (Mistral
/// checkpoints convert to `llama`).
fn hf_architecture(arch: &str) -> Option<&'static str> {
    match arch {
        "llama" => Some("LlamaForCausalLM"),
        "qwen2" => Some("Qwen2ForCausalLM"),
        "qwen3" => Some("Qwen3ForCausalLM"),
        _ => None,
    }
}

struct Meta<'a> {
    file: &'a GgufFile,
    arch: String,
}

impl Meta<'_> {
    fn bad(&self, key: &str, reason: impl std::fmt::Display) -> Error {
        Error::BadGguf {
            path: self.file.path.clone(),
            reason: format!("{key}: {reason}"),
        }
    }

    fn unsupported(&self, what: String) -> Error {
        Error::UnsupportedModel {
            path: self.file.path.clone(),
            what,
        }
    }

    fn get(&self, key: &str) -> Option<&GgufValue> {
        self.file.get(key)
    }

    fn uint(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.bad(key, "expected an unsigned integer")),
        }
    }

    fn need_uint(&self, key: &str) -> Result<u64> {
        self.uint(key)?
            .ok_or_else(|| self.bad(key, "missing (kvsift needs it to run the model)"))
    }

    fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(key, "expected a number")),
        }
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.bad(key, "expected a string")),
        }
    }

    fn arch_key(&self, key: &str) -> String {
        format!("{}.{key}", self.arch)
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let list = self
            .get(key)
            .ok_or_else(|| self.bad(key, "missing"))?
            .as_array()
            .ok_or_else(|| self.bad(key, "expected an array"))?;
        list.iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .ok_or_else(|| self.bad(key, format!("[{i}] is not a string")))
            })
            .collect()
    }
}

fn meta(file: &GgufFile) -> Result<Meta<'_>> {
    let m = Meta {
        file,
        arch: String::new(),
    };
    let arch = m
        .string("general.architecture")?
        .ok_or_else(|| m.bad("general.architecture", "missing"))?
        .to_string();
    if hf_architecture(&arch).is_none() {
        return Err(m.unsupported(format!(
            "general.architecture {arch:?}; kvsift runs llama (and Mistral as llama), qwen2 and qwen3"
        )));
    }
    Ok(Meta { file, arch })
}

/// The `config.json` the file's metadata implies (then validated by
/// `ModelConfig::from_json` like any other).
pub fn config_json(file: &GgufFile) -> Result<Value> {
    let m = meta(file)?;
    let key = |k: &str| m.arch_key(k);
    let hidden = m.need_uint(&key("embedding_length"))?;
    let heads = m.need_uint(&key("attention.head_count"))?;
    if let Some(GgufValue::Array(_)) = m.get(&key("attention.head_count_kv")) {
        return Err(m.unsupported(format!(
            "{}: a KV head count per layer",
            key("attention.head_count_kv")
        )));
    }
    let kv_heads = m.uint(&key("attention.head_count_kv"))?.unwrap_or(heads);
    let head_dim = match m.uint(&key("attention.key_length"))? {
        Some(d) => d,
        None if heads > 0 => hidden / heads,
        None => return Err(m.bad(&key("attention.head_count"), "must be positive")),
    };
    if let Some(v) = m.uint(&key("attention.value_length"))?
        && v != head_dim
    {
        return Err(m.unsupported(format!(
            "{} {v} differs from the key length {head_dim}",
            key("attention.value_length")
        )));
    }
    if let Some(r) = m.uint(&key("rope.dimension_count"))?
        && r != head_dim
    {
        return Err(m.unsupported(format!(
            "{} {r}: rope over part of a head of {head_dim} (kvsift rotates whole heads)",
            key("rope.dimension_count")
        )));
    }
    let rope_freqs = match file.tensor("rope_freqs.weight") {
        None => None,
        Some(t) => {
            let bad = || {
                m.bad(
                    "rope_freqs.weight",
                    format!("expected {} f32 values", head_dim / 2),
                )
            };
            if t.dtype != super::GgmlType::F32 || t.dims != [head_dim / 2] {
                return Err(bad());
            }
            let bytes = file.data(t)?;
            let factors: Vec<f64> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect();
            Some(factors)
        }
    };
    let vocab = file
        .tensor("token_embd.weight")
        .and_then(|t| t.dims.get(1).copied())
        .ok_or_else(|| m.bad("token_embd.weight", "missing, or not a matrix"))?;
    let mut rope_scaling = match rope_freqs {
        // Llama 3.1's scaling, as llama.cpp's converter stores it.
        Some(factors) => json!({"rope_type": "gguf_rope_freqs", "factors": factors}),
        None => Value::Null,
    };
    match m.string(&key("rope.scaling.type"))? {
        None | Some("none") => {}
        Some(_) if !rope_scaling.is_null() => {
            return Err(m.unsupported(format!(
                "{} together with rope_freqs.weight",
                key("rope.scaling.type")
            )));
        }
        Some("linear") => {
            let factor = m
                .float(&key("rope.scaling.factor"))?
                .ok_or_else(|| m.bad(&key("rope.scaling.factor"), "missing"))?;
            rope_scaling = json!({"rope_type": "linear", "factor": factor});
        }
        Some(other) => {
            return Err(m.unsupported(format!(
                "{} {other:?} (kvsift reads none and linear from GGUF)",
                key("rope.scaling.type")
            )));
        }
    }
    let mut cfg = json!({
        "architectures": [hf_architecture(&m.arch)],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": m.need_uint(&key("feed_forward_length"))?,
        "num_hidden_layers": m.need_uint(&key("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": m
            .float(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| m.bad(&key("attention.layer_norm_rms_epsilon"), "missing"))?,
        "rope_theta": m.float(&key("rope.freq_base"))?.unwrap_or(10000.0),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": m.need_uint(&key("context_length"))?,
        "vocab_size": vocab,
        "tie_word_embeddings": file.tensor("output.weight").is_none(),
        "attention_bias": m.arch == "llama" && file.tensor("blk.0.attn_q.bias").is_some(),
    });
    if let Some(bos) = m.uint("tokenizer.ggml.bos_token_id")? {
        cfg["bos_token_id"] = json!(bos);
    }
    let eos = stop_ids(&m)?;
    if !eos.is_empty() {
        cfg["eos_token_id"] = json!(eos);
    }
    Ok(cfg)
}

/// The ids that end a generation: EOS, and EOT / EOM where the file names
/// them (llama.cpp's end-of-generation set).
fn stop_ids(m: &Meta) -> Result<Vec<u32>> {
    let mut ids = vec![];
    for k in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = m.uint(k)? {
            let id = u32::try_from(id).map_err(|_| m.bad(k, "out of range"))?;
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    Ok(ids)
}

/// The stop ids of a GGUF file (generation defaults: greedy, these stops).
pub fn eos_token_ids(file: &GgufFile) -> Result<Vec<u32>> {
    stop_ids(&meta(file)?)
}

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split before byte-level BPE for each `tokenizer.ggml.pre` kvsift
/// reads (llama.cpp's `llama-vocab.cpp` names; deepseek-r1-qwen is Qwen2's).
fn pre_tokenizer_regex(pre: &str) -> Option<&'static str> {
    match pre {
        "llama-bpe" | "llama3" => Some(LLAMA3_REGEX),
        "qwen2" | "deepseek-r1-qwen" => Some(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        "default" | "gpt2" => {
            Some(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
        }
        _ => None,
    }
}

/// What the file says of its tokenizer.
pub struct GgufTokenizer {
    /// A `tokenizer.json` for the tokenizers crate.
    pub tokenizer_json: String,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

/// The tokenizer of `tokenizer.ggml.*` (gpt2 byte-level BPE only).
pub fn tokenizer(file: &GgufFile) -> Result<GgufTokenizer> {
    let m = meta(file)?;
    match m.string("tokenizer.ggml.model")? {
        Some("gpt2") => {}
        Some(other) => {
            return Err(m.unsupported(format!(
                "tokenizer.ggml.model {other:?}: kvsift reads byte-level BPE vocabularies \
                 (\"gpt2\"), not SentencePiece (\"llama\") or others"
            )));
        }
        None => return Err(m.bad("tokenizer.ggml.model", "missing")),
    }
    let pre = m.string("tokenizer.ggml.pre")?.unwrap_or("default");
    let regex = pre_tokenizer_regex(pre).ok_or_else(|| {
        m.unsupported(format!(
            "tokenizer.ggml.pre {pre:?}: kvsift reads llama-bpe, qwen2, deepseek-r1-qwen \
             and default"
        ))
    })?;
    let tokens = m.strings("tokenizer.ggml.tokens")?;
    let merges = m.strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match m.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => {
            let list = v
                .as_array()
                .ok_or_else(|| m.bad("tokenizer.ggml.token_type", "expected an array"))?;
            if list.len() != tokens.len() {
                return Err(m.bad(
                    "tokenizer.ggml.token_type",
                    format!("{} entries for {} tokens", list.len(), tokens.len()),
                ));
            }
            list.iter()
                .map(|t| t.as_f64().map(|v| v as i64))
                .collect::<Option<_>>()
                .ok_or_else(|| m.bad("tokenizer.ggml.token_type", "expected integers"))?
        }
    };
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = vec![];
    for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
        vocab.insert(tok.to_string(), json!(id));
        // 3: control, 4: user-defined (llama.cpp's token types) are
        // matched whole, before BPE, as Hugging Face's added tokens.
        if *ty == 3 || *ty == 4 {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": *ty == 3,
            }));
        }
    }
    if vocab.len() != tokens.len() {
        return Err(m.bad("tokenizer.ggml.tokens", "holds the same token twice"));
    }
    let token_at = |key: &str| -> Result<Option<String>> {
        Ok(match m.uint(key)? {
            Some(id) => Some(
                tokens
                    .get(id as usize)
                    .ok_or_else(|| {
                        m.bad(key, format!("{id} is outside the {} tokens", tokens.len()))
                    })?
                    .to_string(),
            ),
            None => None,
        })
    };
    let bos_token = token_at("tokenizer.ggml.bos_token_id")?;
    let eos_token = token_at("tokenizer.ggml.eos_token_id")?;
    let add_bos = matches!(
        m.get("tokenizer.ggml.add_bos_token"),
        Some(GgufValue::Bool(true))
    );
    let post_processor = match (&bos_token, add_bos) {
        (Some(bos), true) => {
            let id = m.uint("tokenizer.ggml.bos_token_id")?.unwrap_or(0);
            json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos.clone(): {"id": bos, "ids": [id], "tokens": [bos]}},
            })
        }
        _ => Value::Null,
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        ]},
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            // llama.cpp takes a piece in the vocabulary whole for Llama 3.
            "ignore_merges": regex == LLAMA3_REGEX, "vocab": vocab, "merges": merges,
        },
    });
    Ok(GgufTokenizer {
        tokenizer_json: tokenizer.to_string(),
        chat_template: m.string("tokenizer.chat_template")?.map(str::to_string),
        bos_token,
        eos_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::PreTokenizer;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::tokenizer::{OffsetReferential, OffsetType, PreTokenizedString};

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let regex = pre_tokenizer_regex(pre).unwrap();
        let split = Split::new(
            SplitPattern::Regex(regex.into()),
            tokenizers::SplitDelimiterBehavior::Isolated,
            false,
        )
        .unwrap();
        let mut s = PreTokenizedString::from(text);
        split.pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(p, _, _)| p.to_string())
            .collect()
    }

    /// The splits llama.cpp's pre-tokenizers make: Llama 3 keeps runs of up
    /// to 3 digits, Qwen2 (and DeepSeek-R1-Distill-Qwen) single digits, GPT-2
    /// whole runs with a leading space.
    #[test]
    fn pre_tokenizers_split_as_llama_cpp_does() {
        assert_eq!(pieces("llama-bpe", "x 12345"), ["x", " ", "123", "45"]);
        assert_eq!(
            pieces("qwen2", "x 12345"),
            ["x", " ", "1", "2", "3", "4", "5"]
        );
        assert_eq!(pieces("deepseek-r1-qwen", "I'LL go"), ["I", "'LL", " go"]);
        assert_eq!(pieces("default", "x 12345"), ["x", " 12345"]);
        assert!(pre_tokenizer_regex("tekken").is_none());
    }
}
