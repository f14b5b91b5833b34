//! Parsing an OpenAI request body into a [`Job`]: prompts (a chat through
//! the template, or completions' prompts), sampling, stop strings, logprobs,
//! the `kv` extension; fields kvsift does not implement are refused.

// Parsing helpers fail with the HTTP response itself (once per request).
#![allow(clippy::result_large_err)]

use axum::response::Response;
use kvsift::kv::compression::CompressConfig;
use kvsift::model::Message;
use serde_json::Value;

use super::App;
use super::api::bad;

/// Most choices (`n`) one request may ask for.
const MAX_CHOICES: usize = 16;

/// A parsed generation request.
pub(super) struct Job {
    /// A chat whose template's generation prompt opens a `<think>` block.
    pub(super) opens_think: bool,
    /// Choices to generate (each its own engine request; seeds seed, seed + 1, ...).
    pub(super) n: usize,
    /// One or more prompts (completions may batch them); choice `p * n + i`
    /// is prompt p's i-th.
    pub(super) prompts: Vec<Vec<u32>>,
    /// `echo`: each prompt's text, put before its choices' text.
    pub(super) echo: Option<Vec<String>>,
    pub(super) max_tokens: usize,
    pub(super) sampling: kvsift::ops::sample::SamplingParams,
    pub(super) stop: Vec<String>,
    pub(super) compression: Option<CompressConfig>,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    /// Alternatives per token when logprobs are asked for.
    pub(super) logprobs: Option<usize>,
    /// Generate through the model's stop tokens (vLLM's `ignore_eos`): to
    /// `max_tokens`, as load tests want.
    pub(super) ignore_eos: bool,
}

/// What logprobs a request asks for: chat's `logprobs: true` with
/// `top_logprobs` alternatives, or completions' `logprobs: N`.
fn logprobs(v: &Value, chat: bool) -> Result<Option<usize>, Response> {
    let most = kvsift::engine::MAX_TOP_LOGPROBS as u64;
    let check = |k: &str, n: u64| {
        if n > most {
            Err(bad(format!("{k}: {n}, expected 0 to {most}")))
        } else {
            Ok(n as usize)
        }
    };
    if chat {
        let on = field_bool(v, "logprobs")?.unwrap_or(false);
        let top = field_u64(v, "top_logprobs")?;
        match (on, top) {
            (false, Some(_)) => Err(bad("top_logprobs: needs logprobs: true")),
            (false, None) => Ok(None),
            (true, top) => Ok(Some(check("top_logprobs", top.unwrap_or(0))?)),
        }
    } else {
        match v.get("logprobs") {
            None | Some(Value::Null) => Ok(None),
            Some(x) => match x.as_u64() {
                Some(n) => Ok(Some(check("logprobs", n)?)),
                None => Err(bad("logprobs: must be an integer from 0 to 20")),
            },
        }
    }
}

fn field_f64(v: &Value, k: &str) -> Result<Option<f64>, Response> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| bad(format!("{k}: must be a number"))),
    }
}

fn field_u64(v: &Value, k: &str) -> Result<Option<u64>, Response> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(format!("{k}: must be a non-negative integer"))),
    }
}

pub(super) fn field_bool(v: &Value, k: &str) -> Result<Option<bool>, Response> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_bool()
            .map(Some)
            .ok_or_else(|| bad(format!("{k}: must be true or false"))),
    }
}

/// The text of a chat message's content (a string, or a list of text parts).
fn content_text(c: &Value, i: usize) -> Result<String, Response> {
    match c {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => parts
            .iter()
            .map(
                |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => Ok(t.clone()),
                    _ => Err(bad(format!(
                        "messages[{i}].content: only text parts are supported"
                    ))),
                },
            )
            .collect(),
        _ => Err(bad(format!(
            "messages[{i}].content: must be a string or a list of text parts"
        ))),
    }
}

/// A prompt's token ids, from a string or a list of ids.
fn prompt_ids(app: &App, p: &Value, what: &str) -> Result<Option<Vec<u32>>, Response> {
    match p {
        Value::String(s) => app
            .tokenizer
            .encode(s, true)
            .map(Some)
            .map_err(|e| bad(format!("{what}: {e}"))),
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_u64) => Ok(Some(
            a.iter()
                .map(|x| {
                    x.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .unwrap_or(u32::MAX)
                })
                .collect(),
        )),
        _ => Ok(None),
    }
}

/// Most prompts one completions request may carry.
const MAX_PROMPTS: usize = 64;

/// The prompts of a completions request (a string, a list of ids, or a list
/// of either) and, for `echo`, their texts.
fn completion_prompts(app: &App, v: &Value) -> Result<(Vec<Vec<u32>>, Vec<String>), Response> {
    const SHAPE: &str = "prompt: a string, a list of token ids, or a list of strings or of token-id lists is required";
    let p = v.get("prompt").ok_or_else(|| bad(SHAPE))?;
    let items: Vec<&Value> = match p {
        Value::Array(a) if !a.is_empty() && !a.iter().all(Value::is_u64) => a.iter().collect(),
        p => vec![p],
    };
    if items.len() > MAX_PROMPTS {
        return Err(bad(format!(
            "prompt: {} prompts, at most {MAX_PROMPTS}",
            items.len()
        )));
    }
    let mut ids = vec![];
    let mut texts = vec![];
    for (i, item) in items.iter().enumerate() {
        let what = if items.len() > 1 {
            format!("prompt[{i}]")
        } else {
            "prompt".into()
        };
        let p = prompt_ids(app, item, &what)?.ok_or_else(|| bad(SHAPE))?;
        texts.push(match item {
            Value::String(s) => s.clone(),
            _ => app.tokenizer.decode(&p, false).unwrap_or_default(),
        });
        ids.push(p);
    }
    Ok((ids, texts))
}

/// OpenAI fields kvsift does not implement: an error when one asks for
/// something (a value other than the neutral one), never silently ignored.
fn refuse_unsupported(v: &Value, chat: bool) -> Result<(), Response> {
    let nonzero = |k: &str| v.get(k).and_then(Value::as_f64).is_some_and(|x| x != 0.0);
    for k in ["presence_penalty", "frequency_penalty"] {
        if nonzero(k) {
            return Err(bad(format!(
                "{k}: not supported (use repetition_penalty); only 0 is accepted"
            )));
        }
    }
    if v.get("logit_bias")
        .is_some_and(|b| b.as_object().is_some_and(|m| !m.is_empty()))
    {
        return Err(bad("logit_bias: not supported"));
    }
    if v.get("min_tokens")
        .and_then(Value::as_u64)
        .is_some_and(|n| n > 0)
    {
        return Err(bad("min_tokens: not supported"));
    }
    if let Some(f) = v.get("response_format").filter(|f| !f.is_null())
        && f.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(bad(
            "response_format: only {\"type\": \"text\"} is supported (no constrained decoding)",
        ));
    }
    if chat
        && v.get("tools")
            .is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()))
        && v.get("tool_choice").and_then(Value::as_str) != Some("none")
    {
        return Err(bad(
            "tools: tool calling is not supported (send no tools, or tool_choice \"none\")",
        ));
    }
    if !chat {
        if v.get("suffix")
            .is_some_and(|s| s.as_str().is_some_and(|s| !s.is_empty()))
        {
            return Err(bad("suffix: not supported"));
        }
        let n = v.get("n").and_then(Value::as_u64).unwrap_or(1);
        if v.get("best_of")
            .and_then(Value::as_u64)
            .is_some_and(|b| b != n)
        {
            return Err(bad("best_of: only equal to n is supported"));
        }
    }
    Ok(())
}

pub(super) fn job(app: &App, v: &Value, chat: bool) -> Result<Job, Response> {
    refuse_unsupported(v, chat)?;
    let mut opens_think = false;
    let mut echo = None;
    let prompts = if chat {
        let msgs = v
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("messages: a list of messages is required"))?;
        if msgs.is_empty() {
            return Err(bad("messages: must not be empty"));
        }
        let mut messages = vec![];
        for (i, m) in msgs.iter().enumerate() {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("messages[{i}].role: a string is required")))?;
            let content = content_text(m.get("content").unwrap_or(&Value::Null), i)?;
            messages.push(Message {
                role: role.to_string(),
                content,
            });
        }
        let kwargs = match v.get("chat_template_kwargs") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err(bad("chat_template_kwargs: must be an object")),
        };
        let text = app
            .tokenizer
            .apply_chat_template_with(&messages, true, &kwargs)
            .map_err(|e| bad(format!("messages: {e}")))?;
        opens_think = text.trim_end().ends_with("<think>");
        vec![
            app.tokenizer
                .encode(&text, false)
                .map_err(|e| bad(format!("messages: {e}")))?,
        ]
    } else {
        let (ids, texts) = completion_prompts(app, v)?;
        if field_bool(v, "echo")?.unwrap_or(false) {
            echo = Some(texts);
        }
        ids
    };
    if prompts.iter().any(Vec::is_empty) {
        return Err(bad("prompt: empty after tokenization"));
    }
    let n = field_u64(v, "n")?.unwrap_or(1);
    if !(1..=MAX_CHOICES as u64).contains(&n) {
        return Err(bad(format!("n: {n}, expected 1 to {MAX_CHOICES}")));
    }
    if prompts.len() * n as usize > MAX_PROMPTS {
        return Err(bad(format!(
            "{} prompts x n = {n}: at most {MAX_PROMPTS} choices",
            prompts.len()
        )));
    }
    let logprobs = logprobs(v, chat)?;
    if echo.is_some() && logprobs.is_some() {
        return Err(bad(
            "echo with logprobs: the prompt's logprobs are not supported",
        ));
    }
    let max_tokens = field_u64(v, "max_completion_tokens")?
        .or(field_u64(v, "max_tokens")?)
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let max_tokens = max_tokens.unwrap_or(if chat { usize::MAX } else { 16 });
    let mut sampling = app.defaults.sampling;
    if let Some(t) = field_f64(v, "temperature")? {
        sampling.temperature = t as f32;
    }
    if let Some(p) = field_f64(v, "top_p")? {
        sampling.top_p = p as f32;
    }
    if let Some(p) = field_f64(v, "min_p")? {
        sampling.min_p = p as f32;
    }
    // vLLM's -1 (and 0) mean no top-k.
    if v.get("top_k").and_then(Value::as_i64) == Some(-1) {
        sampling.top_k = 0;
    } else if let Some(k) = field_u64(v, "top_k")? {
        sampling.top_k = usize::try_from(k).unwrap_or(usize::MAX);
    }
    if let Some(p) = field_f64(v, "repetition_penalty")? {
        sampling.repetition_penalty = p as f32;
    }
    if let Some(s) = field_u64(v, "seed")? {
        sampling.seed = s;
    }
    let stop = match v.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("stop: must be a string or a list of strings"))?,
        _ => return Err(bad("stop: must be a string or a list of strings")),
    };
    if stop.iter().any(String::is_empty) {
        return Err(bad("stop: strings must not be empty"));
    }
    let compression = match v.get("kv") {
        None | Some(Value::Null) => None,
        Some(kv) => {
            Some(kvsift::kv::compression::json::from_json(kv, &app.compression).map_err(bad)?)
        }
    };
    let stream = field_bool(v, "stream")?.unwrap_or(false);
    let include_usage = v
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(Job {
        opens_think,
        n: n as usize,
        prompts,
        echo,
        max_tokens,
        sampling,
        stop,
        compression,
        stream,
        include_usage,
        logprobs,
        ignore_eos: field_bool(v, "ignore_eos")?.unwrap_or(false),
    })
}
