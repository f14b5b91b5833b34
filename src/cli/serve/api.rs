//! The endpoints: health, models, metrics, tokenize, and the two
//! generation routes, which parse a request (`request.rs`), queue its
//! choices on the engine and answer from their events (`respond.rs`).

// Parsing helpers fail with the HTTP response itself (once per request).
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kvsift::engine::service::ServiceState;
use kvsift::engine::{Event, Request, SequenceReport};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::App;
use super::request::{Job, job};
use super::respond::{Reply, stream, whole};

pub(super) fn error(
    status: StatusCode,
    kind: &str,
    code: &str,
    message: impl Into<String>,
) -> Response {
    let body = json!({"error": {"message": message.into(), "type": kind, "code": code}});
    (status, Json(body)).into_response()
}

pub(super) fn bad(message: impl Into<String>) -> Response {
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

pub async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

pub async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        "no such endpoint",
    )
}

/// A request body as it arrived, or why it could not be read (too large,
/// cut short): answered in OpenAI's shape like any other error.
pub type Body = Result<Bytes, BytesRejection>;

fn parse(body: &Body) -> Result<Value, Response> {
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            return Err(error(
                e.status(),
                "invalid_request_error",
                "bad_body",
                format!("the body could not be read: {}", e.body_text()),
            ));
        }
    };
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("the body must be a JSON object"));
    }
    Ok(v)
}

pub async fn tokenize(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
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

pub async fn detokenize(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
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

pub async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    generate(app, headers, body, false).await
}

pub async fn chat_completions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate(app, headers, body, true).await
}

async fn generate(app: Arc<App>, headers: HeaderMap, body: Body, chat: bool) -> Response {
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
    let streamed = job.stream;
    let reply = Reply {
        app,
        job,
        ids,
        rx,
        rid,
        created,
        chat,
        guard,
    };
    if streamed {
        stream(reply)
    } else {
        whole(reply).await
    }
}
