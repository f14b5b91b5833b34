//! The JSON settings of an engine and of a request.

use kvsift::engine::EngineConfig;
use kvsift::engine::compressor::Recording;
use kvsift::gpu::WeightDtype;
use kvsift::kv::compression::json::from_json;
use kvsift::kv::compression::{CompressConfig, Method};
use kvsift::model::llama::WeightFormat;
use kvsift::ops::sample::SamplingParams;
use serde_json::{Map, Value};

use crate::Failure;

/// A JSON object (null or absent text: empty), its keys checked against `known`.
pub(crate) fn object(
    text: Option<&str>,
    what: &str,
    known: &[&str],
) -> Result<Map<String, Value>, Failure> {
    let Some(text) = text else {
        return Ok(Map::new());
    };
    let v: Value = serde_json::from_str(text)
        .map_err(|e| Failure::invalid(format!("{what}: not JSON ({e})")))?;
    let Value::Object(m) = v else {
        return Err(Failure::invalid(format!("{what}: must be a JSON object")));
    };
    if let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(Failure::invalid(format!(
            "{what}.{k}: unknown setting; known: {}",
            known.join(", ")
        )));
    }
    Ok(m)
}

fn uint(m: &Map<String, Value>, what: &str, k: &str) -> Result<Option<usize>, Failure> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| Failure::invalid(format!("{what}.{k}: must be a non-negative integer"))),
    }
}

fn num(m: &Map<String, Value>, what: &str, k: &str) -> Result<Option<f64>, Failure> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| Failure::invalid(format!("{what}.{k}: must be a finite number"))),
    }
}

fn boolean(m: &Map<String, Value>, what: &str, k: &str) -> Result<Option<bool>, Failure> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_bool()
            .map(Some)
            .ok_or_else(|| Failure::invalid(format!("{what}.{k}: must be true or false"))),
    }
}

fn dtype(m: &Map<String, Value>, what: &str, k: &str) -> Result<Option<bool>, Failure> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "f16" => Ok(Some(true)),
        Some(Value::String(s)) if s == "f32" => Ok(Some(false)),
        Some(_) => Err(Failure::invalid(format!("{what}.{k}: \"f16\" or \"f32\""))),
    }
}

/// The engine's refusal of its settings, naming their JSON fields rather
/// than the command-line flags.
pub(crate) fn name_fields(f: Failure) -> Failure {
    let mut m = f.1;
    for (flag, field) in [
        ("--steps-per-submit", "settings.steps_per_submit"),
        ("--max-context", "settings.max_context"),
        ("--kv-pool-mb", "settings.kv_pool_mb"),
        ("--page-size", "settings.page_size"),
        ("--batch-tokens", "the prefill chunk"),
        ("--batch", "settings.parallel"),
    ] {
        m = m.replace(flag, field);
    }
    Failure(f.0, m)
}

/// An engine's settings: its configuration and how its weights are stored.
pub(crate) fn engine(text: Option<&str>) -> Result<(EngineConfig, WeightFormat), Failure> {
    const WHAT: &str = "settings";
    let m = object(
        text,
        WHAT,
        &[
            "parallel",
            "max_context",
            "kv_pool_mb",
            "page_size",
            "kv_dtype",
            "weights",
            "quantize_lm_head",
            "steps_per_submit",
            "record_attention_sums",
            "kv",
        ],
    )?;
    let mut c = EngineConfig::default();
    if let Some(n) = uint(&m, WHAT, "parallel")? {
        c.max_batch = n;
    }
    c.max_context = uint(&m, WHAT, "max_context")?;
    if let Some(mb) = num(&m, WHAT, "kv_pool_mb")? {
        if mb <= 0.0 {
            return Err(Failure::invalid(format!(
                "{WHAT}.kv_pool_mb: {mb}, must be positive"
            )));
        }
        c.pool.bytes = Some((mb * 1024.0 * 1024.0) as u64);
    }
    if let Some(p) = uint(&m, WHAT, "page_size")? {
        c.pool.page_size = p;
    }
    if let Some(f16) = dtype(&m, WHAT, "kv_dtype")? {
        c.pool.kv_f16 = f16;
    }
    if let Some(k) = uint(&m, WHAT, "steps_per_submit")? {
        c.decode_chain = k;
    }
    let weights = WeightFormat {
        dtype: match m.get("weights") {
            None | Some(Value::Null) => WeightDtype::F16,
            Some(Value::String(s)) if ["f16", "f32", "q8_0", "q4_0"].contains(&s.as_str()) => s
                .parse()
                .map_err(|e: kvsift::Error| Failure::invalid(e.to_string()))?,
            Some(_) => {
                return Err(Failure::invalid(format!(
                    "{WHAT}.weights: \"f16\", \"f32\", \"q8_0\" or \"q4_0\""
                )));
            }
        },
        quantize_lm_head: match m.get("quantize_lm_head") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(Failure::invalid(format!(
                    "{WHAT}.quantize_lm_head: true or false"
                )));
            }
        },
    };
    if let Some(kv) = m.get("kv").filter(|v| !v.is_null()) {
        c.compression =
            from_json(kv, &CompressConfig::new(Method::None, 0)).map_err(Failure::invalid)?;
    }
    // Requests may bring any method that scores from window queries (at
    // the engine's window), and H2O v3 with record_attention_sums.
    c.recording = Recording {
        window_queries: true,
        attention_sums: boolean(&m, WHAT, "record_attention_sums")?.unwrap_or(false),
    };
    Ok((c, weights))
}

/// A request's settings.
pub(crate) struct RequestSettings {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub chat: bool,
    pub compression: Option<CompressConfig>,
}

/// Default `max_tokens` of a request.
pub(crate) const DEFAULT_MAX_TOKENS: usize = 256;

pub(crate) fn request(
    text: Option<&str>,
    defaults: SamplingParams,
    engine_kv: &CompressConfig,
) -> Result<RequestSettings, Failure> {
    const WHAT: &str = "request";
    let m = object(
        text,
        WHAT,
        &[
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "repetition_penalty",
            "seed",
            "chat",
            "kv",
        ],
    )?;
    let mut s = defaults;
    if let Some(t) = num(&m, WHAT, "temperature")? {
        s.temperature = t as f32;
    }
    if let Some(p) = num(&m, WHAT, "top_p")? {
        s.top_p = p as f32;
    }
    if let Some(k) = uint(&m, WHAT, "top_k")? {
        s.top_k = k;
    }
    if let Some(p) = num(&m, WHAT, "min_p")? {
        s.min_p = p as f32;
    }
    if let Some(p) = num(&m, WHAT, "repetition_penalty")? {
        s.repetition_penalty = p as f32;
    }
    if let Some(seed) = m.get("seed").filter(|v| !v.is_null()) {
        s.seed = seed
            .as_u64()
            .ok_or_else(|| Failure::invalid("request.seed: must be a non-negative integer"))?;
    }
    let compression = match m.get("kv") {
        None | Some(Value::Null) => None,
        Some(kv) => Some(from_json(kv, engine_kv).map_err(Failure::invalid)?),
    };
    Ok(RequestSettings {
        max_tokens: uint(&m, WHAT, "max_tokens")?.unwrap_or(DEFAULT_MAX_TOKENS),
        sampling: s,
        chat: boolean(&m, WHAT, "chat")?.unwrap_or(false),
        compression,
    })
}
