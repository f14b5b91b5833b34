//! Compression settings as JSON (the server's `kv` field, the C API): an
//! object with every setting `kvsift generate` has (`method`, `budget`,
//! `window`, `buffer`, `schedule`, `kernel`, `pooling`, `granularity`,
//! `gqa_agg`, `lambda`, `sim_threshold`, `eps`, `slot_order`, `h2o_version`,
//! `sinks`, `beta`, `floor`: [`Setting::field`]), over a base's settings
//! when `method` is the base's (another method starts from its defaults
//! and the base's window).

use serde_json::Value;

use super::{
    CompressConfig, GqaAgg, Granularity, H2oVersion, Method, Pooling, Schedule, Setting, SlotOrder,
};

/// The settings `v` gives over `base` (checked: a setting the method does
/// not read, or a bad value, is an error naming the field as `kv.<field>`).
pub fn from_json(v: &Value, base: &CompressConfig) -> Result<CompressConfig, String> {
    let server = base;
    let obj = v
        .as_object()
        .ok_or("kv: must be an object such as {\"method\": \"rkv\", \"budget\": 256}")?;
    let method = match obj.get("method") {
        None => server.method,
        Some(m) => {
            let name = m.as_str().ok_or("kv.method: must be a string")?;
            Method::from_name(name).ok_or_else(|| {
                let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
                format!(
                    "kv.method: unknown method {name:?}; expected one of {}",
                    names.join(", ")
                )
            })?
        }
    };
    let uint = |k: &str| -> Result<Option<usize>, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or(format!("kv.{k}: must be a non-negative integer")),
        }
    };
    let num = |k: &str| -> Result<Option<f64>, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .filter(|f| f.is_finite())
                .map(Some)
                .ok_or(format!("kv.{k}: must be a finite number")),
        }
    };
    let word = |k: &str, allowed: &[&str]| -> Result<Option<String>, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => {
                let s = x.as_str().ok_or(format!("kv.{k}: must be a string"))?;
                let s = s.replace('_', "-");
                if allowed.contains(&s.as_str()) {
                    Ok(Some(s))
                } else {
                    Err(format!(
                        "kv.{k}: {s:?}, expected one of {}",
                        allowed.join(", ")
                    ))
                }
            }
        }
    };
    let same_method = method == server.method;
    let budget = match (uint("budget")?, same_method) {
        (Some(b), _) => b,
        (None, true) => server.budget,
        (None, false) if !method.policy().compresses() => 0,
        (None, false) => return Err(format!("kv.budget: method {method} needs a budget")),
    };
    let mut c = if same_method {
        CompressConfig {
            budget,
            ..server.clone()
        }
    } else {
        // Another method keeps the base's window: the engine records
        // queries at one window.
        CompressConfig {
            window: server.window,
            ..CompressConfig::new(method, budget)
        }
    };
    let mut given = vec![];
    let mut known = vec!["method".to_string()];
    known.extend(Setting::ALL.map(Setting::field));
    if let Some(k) = obj.keys().find(|k| !known.contains(k)) {
        return Err(format!(
            "kv.{k}: unknown setting; known: {}",
            known.join(", ")
        ));
    }
    if obj.contains_key("budget") {
        given.push(Setting::Budget);
    }
    if let Some(x) = uint("window")? {
        c.window = x;
        given.push(Setting::Window);
    }
    if let Some(x) = uint("buffer")? {
        c.buffer = x;
        given.push(Setting::Buffer);
    }
    if let Some(x) = uint("kernel")? {
        c.kernel = x;
        given.push(Setting::Kernel);
    }
    if let Some(x) = uint("beta")? {
        c.beta = x;
        given.push(Setting::Beta);
    }
    if let Some(x) = uint("sinks")? {
        c.sinks = Some(x);
        given.push(Setting::Sinks);
    }
    if let Some(x) = num("lambda")? {
        c.lambda = x as f32;
        given.push(Setting::Lambda);
    }
    if let Some(x) = num("sim_threshold")? {
        c.sim_threshold = x as f32;
        given.push(Setting::SimThreshold);
    }
    if let Some(x) = num("eps")? {
        c.eps = x as f32;
        given.push(Setting::Eps);
    }
    if let Some(x) = num("floor")? {
        c.floor = x;
        given.push(Setting::Floor);
    }
    if let Some(s) = word("schedule", &["prefill", "decode"])? {
        c.schedule = if s == "decode" {
            Schedule::Decode
        } else {
            Schedule::Prefill
        };
        given.push(Setting::Schedule);
    }
    if let Some(s) = word("pooling", &["max", "avg"])? {
        c.pooling = if s == "avg" {
            Pooling::Avg
        } else {
            Pooling::Max
        };
        given.push(Setting::Pooling);
    }
    if let Some(s) = word("granularity", &["kv-head", "query-head"])? {
        c.granularity = if s == "query-head" {
            Granularity::QueryHead
        } else {
            Granularity::KvHead
        };
        given.push(Setting::Granularity);
    }
    if let Some(s) = word("gqa_agg", &["mean", "max", "sum"])? {
        c.gqa_agg = match s.as_str() {
            "max" => GqaAgg::Max,
            "sum" => GqaAgg::Sum,
            _ => GqaAgg::Mean,
        };
        given.push(Setting::GqaAgg);
    }
    if let Some(s) = word("slot_order", &["position", "reference"])? {
        c.slot_order = if s == "reference" {
            SlotOrder::Reference
        } else {
            SlotOrder::Position
        };
        given.push(Setting::SlotOrder);
    }
    if let Some(s) = word("h2o_version", &["v1", "v3"])? {
        c.h2o_version = if s == "v1" {
            H2oVersion::V1
        } else {
            H2oVersion::V3
        };
        given.push(Setting::H2oVersion);
    }
    // Name the JSON fields rather than the command-line flags (longest
    // first: no flag's name is then cut by a shorter one's).
    let named = |e: crate::Error| {
        let mut flags = Setting::ALL.to_vec();
        flags.sort_by_key(|s| std::cmp::Reverse(s.flag().len()));
        let mut m = e.to_string().replace("--kv ", "kv.method ");
        for s in flags {
            m = m.replace(s.flag(), &format!("kv.{}", s.field()));
        }
        m
    };
    // StreamingLLM's recent part is budget - sinks unless the request names
    // its window (a mismatch is then validate's error); this also follows a
    // new budget under the server's sinks.
    if method == Method::StreamingLlm && !given.contains(&Setting::Window) {
        if let Some(s) = c.sinks {
            c.set_sinks(s);
        }
    }
    c.check_given(&given).map_err(named)?;
    c.validate().map_err(named)?;
    Ok(c)
}
