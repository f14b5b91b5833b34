//! The OpenAI-shaped endpoints: parsing a request into an engine request,
//! and answering from its events, whole or streamed (server-sent events).

// Parsing helpers fail with the HTTP response itself (once per request).
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kvsift::engine::service::ServiceState;
use kvsift::engine::{Event, Request, SequenceReport};
use kvsift::kv::compression::CompressConfig;
use kvsift::model::Message;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::App;
use super::respond::{stream, whole};

pub(super) fn error(
    status: StatusCode,
    kind: &str,
    code: &str,
    message: impl Into<String>,
) -> Response {
    let body = json!({"error": {"message": message.into(), "type": kind, "code": code}});
    (status, Json(body)).into_response()
}

fn bad(message: impl Into<String>) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_request",
        message,
    )
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), Response> {
    let Some(key) = &app.api_key else {
        return Ok(());
    };
    let got = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if got == Some(key.as_str()) {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "missing or wrong API key (send Authorization: Bearer KEY)",
        ))
    }
}

/// 200 when the model is loaded, 503 while it loads.
pub async fn health(State(app): State<Arc<App>>) -> Response {
    match app.svc.state() {
        ServiceState::Ready => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        ServiceState::Loading => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response(),
        state => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "engine_unavailable",
            format!(
                "the engine is {state:?}: {}",
                app.svc.failure().unwrap_or_default()
            ),
        ),
    }
}

pub async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&app, &headers) {
        return r;
    }
    Json(json!({
        "object": "list",
        "data": [{"id": app.model_name, "object": "model", "created": app.created, "owned_by": "kvsift"}],
    }))
    .into_response()
}

/// Prometheus text: the engine's requests, pool pages, compression and
/// preemptions, and the server's requests in flight.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    let a = app.clone();
    let stats = match tokio::task::spawn_blocking(move || a.svc.stats()).await {
        Ok(Ok(s)) => s,
        _ => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "engine_unavailable",
                "the engine is not running",
            );
        }
    };
    let c = stats.compression.clone().unwrap_or_default();
    let mut out = String::new();
    for (name, kind, help, value) in [
        (
            "kvsift_requests_in_flight",
            "gauge",
            "HTTP generation requests being served",
            app.in_flight.load(Ordering::SeqCst) as f64,
        ),
        (
            "kvsift_requests_running",
            "gauge",
            "sequences in the engine's lanes",
            stats.running as f64,
        ),
        (
            "kvsift_requests_waiting",
            "gauge",
            "sequences waiting for a lane or pages",
            stats.waiting as f64,
        ),
        (
            "kvsift_kv_pages_total",
            "gauge",
            "KV pool pages",
            stats.pool.pages_total as f64,
        ),
        (
            "kvsift_kv_pages_in_use",
            "gauge",
            "KV pool pages held by sequences",
            stats.pool.pages_in_use as f64,
        ),
        (
            "kvsift_kv_pages_peak",
            "gauge",
            "most KV pool pages held at once",
            stats.peak_pages_in_use as f64,
        ),
        (
            "kvsift_kv_bytes_in_use",
            "gauge",
            "KV pool bytes held by sequences",
            stats.pool.bytes_in_use as f64,
        ),
        (
            "kvsift_preemptions_total",
            "counter",
            "sequences preempted by a full pool",
            stats.preemptions as f64,
        ),
        (
            "kvsift_compression_passes_total",
            "counter",
            "KV compression passes",
            c.passes as f64,
        ),
        (
            "kvsift_compression_slots_dropped_total",
            "counter",
            "KV slots dropped by compression",
            c.slots_dropped as f64,
        ),
    ] {
        out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
    }
    app.metrics.render(&mut out);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

/// One model by id (`GET /v1/models/{id}`): the served one, or 404.
pub async fn model(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize(&app, &headers) {
        return r;
    }
    if id != app.model_name {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("model {id:?}: this server serves {:?}", app.model_name),
        );
    }
    Json(json!({"id": app.model_name, "object": "model", "created": app.created, "owned_by": "kvsift"}))
        .into_response()
}

pub async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        "no such endpoint",
    )
}

fn parse(body: &Bytes) -> Result<Value, Response> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("the body must be a JSON object"));
    }
    Ok(v)
}

pub async fn tokenize(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = authorize(&app, &headers) {
        return r;
    }
    let v = match parse(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(text) = v.get("content").and_then(Value::as_str) else {
        return bad("content: a string is required");
    };
    let special = v
        .get("add_special")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    match app.tokenizer.encode(text, special) {
        Ok(ids) => Json(json!({"tokens": ids})).into_response(),
        Err(e) => bad(e.to_string()),
    }
}

pub async fn detokenize(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = authorize(&app, &headers) {
        return r;
    }
    let v = match parse(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let ids: Option<Vec<u32>> = v.get("tokens").and_then(Value::as_array).and_then(|a| {
        a.iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    });
    let Some(ids) = ids else {
        return bad("tokens: a list of token ids is required");
    };
    if let Some(m) = app.svc.model()
        && let Some(&id) = ids.iter().find(|&&id| id as usize >= m.vocab_size)
    {
        return bad(format!(
            "tokens: {id} is outside the vocabulary of {}",
            m.vocab_size
        ));
    }
    match app.tokenizer.decode(&ids, true) {
        Ok(text) => Json(json!({"content": text})).into_response(),
        Err(e) => bad(e.to_string()),
    }
}

/// A parsed generation request.
/// Most choices (`n`) one request may ask for.
const MAX_CHOICES: usize = 16;

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

fn field_bool(v: &Value, k: &str) -> Result<Option<bool>, Response> {
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

fn job(app: &App, v: &Value, chat: bool) -> Result<Job, Response> {
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

/// Counts a request in flight until dropped.
pub(super) struct InFlight(pub(super) Arc<App>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Each choice's events: (choice index, event, its report with the last).
pub(super) type Events = mpsc::UnboundedReceiver<(usize, Event, Option<SequenceReport>)>;

/// An engine message with the JSON fields for the command-line flags.
fn json_names(m: &str) -> String {
    let mut m = m.to_string();
    for (flag, field) in [
        ("--repetition-penalty", "repetition_penalty"),
        ("--temperature", "temperature"),
        ("--top-p", "top_p"),
        ("--top-k", "top_k"),
        ("--min-p", "min_p"),
        ("--seed", "seed"),
    ] {
        m = m.replace(flag, field);
    }
    m
}

/// Queues the job's choices on the engine; their ids and events.
async fn submit(app: &Arc<App>, job: &Job) -> Result<(Vec<u64>, Events), Response> {
    if app.draining.load(Ordering::SeqCst) {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "shutting_down",
            "the server is shutting down",
        ));
    }
    if app.svc.state() != ServiceState::Ready {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "loading",
            "the model is not loaded yet",
        ));
    }
    let context = app
        .svc
        .model()
        .map_or(usize::MAX, |m| m.max_position_embeddings);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut ids = vec![];
    for (choice, (prompt, i)) in job
        .prompts
        .iter()
        .flat_map(|p| (0..job.n).map(move |i| (p, i)))
        .enumerate()
    {
        let mut sampling = job.sampling;
        sampling.seed = sampling.seed.wrapping_add(i as u64);
        let req = Request {
            prompt: prompt.clone(),
            max_tokens: job.max_tokens.min(context),
            sampling,
            stop_ids: if job.ignore_eos {
                vec![]
            } else {
                app.stop_ids.clone()
            },
            compression: job.compression.clone(),
            logprobs: job.logprobs,
        };
        let i = choice;
        let tx = tx.clone();
        let sink: kvsift::engine::service::Sink = Box::new(move |ev, report| {
            let _ = tx.send((i, ev, report));
        });
        let a = app.clone();
        let added = tokio::task::spawn_blocking(move || a.svc.add(req, sink))
            .await
            .map_err(|e| {
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "internal",
                    e.to_string(),
                )
            })
            .and_then(|r| r.map_err(|e| bad(json_names(&e.to_string()))));
        match added {
            Ok(id) => ids.push(id),
            Err(r) => {
                for &id in &ids {
                    app.svc.cancel(id);
                }
                return Err(r);
            }
        }
    }
    Ok((ids, rx))
}

pub async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    generate(app, headers, body, false).await
}

pub async fn chat_completions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(app, headers, body, true).await
}

async fn generate(app: Arc<App>, headers: HeaderMap, body: Bytes, chat: bool) -> Response {
    if let Err(r) = authorize(&app, &headers) {
        return r;
    }
    let v = match parse(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let job = match job(&app, &v, chat) {
        Ok(j) => j,
        Err(r) => return r,
    };
    if app.in_flight.fetch_add(1, Ordering::SeqCst) >= app.max_queue {
        app.in_flight.fetch_sub(1, Ordering::SeqCst);
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "queue_full",
            format!(
                "the queue is full ({} requests); retry later",
                app.max_queue
            ),
        );
    }
    let guard = InFlight(app.clone());
    let (ids, rx) = match submit(&app, &job).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let id = ids[0];
    app.metrics.requests.fetch_add(1, Ordering::Relaxed);
    app.metrics.prompt_tokens.fetch_add(
        (job.prompts.iter().map(Vec::len).sum::<usize>() * job.n) as u64,
        Ordering::Relaxed,
    );
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rid = format!("{}-{id}", if chat { "chatcmpl" } else { "cmpl" });
    if job.stream {
        stream(app, job, ids, rx, rid, created, chat, guard)
    } else {
        whole(app, job, ids, rx, rid, created, chat, guard).await
    }
}
