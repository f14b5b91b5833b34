//! Answering a queued request from its events: whole (one JSON body) or
//! streamed (server-sent events), with stop strings matched across tokens
//! and never shown, and the `kvsift` extension object.

// Parsing helpers fail with the HTTP response itself (once per request).
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use kvsift::engine::{Event, StopReason};
use kvsift::model::TextStream;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::App;
use super::api::{Events, InFlight, Job, error};
use super::think::Think;

/// Text as it grows, held back while it could be the start of a stop string.
struct Text<'t> {
    stream: TextStream<'t>,
    stop: &'t [String],
    held: String,
}

impl Text<'_> {
    /// The text `token` adds that may be shown; `Err(shown)` when a stop
    /// string appeared (the text before it).
    fn push(&mut self, token: u32) -> Result<String, String> {
        let delta = self.stream.push(token).unwrap_or_default();
        self.held.push_str(&delta);
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let shown = self.held[..at].to_string();
            self.held.clear();
            return Err(shown);
        }
        // Keep back the longest tail that begins some stop string.
        let keep = self
            .stop
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k))
                    .map(move |k| &s[..k])
            })
            .filter(|p| self.held.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let shown = self.held[..cut].to_string();
        self.held.drain(..cut);
        Ok(shown)
    }

    /// What is held back, at the natural end.
    fn finish(&mut self) -> String {
        let rest = self.stream.finish().unwrap_or_default();
        self.held.push_str(&rest);
        std::mem::take(&mut self.held)
    }
}

fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos | StopReason::Cancelled => "stop",
        StopReason::MaxTokens | StopReason::Context => "length",
    }
}

/// The extension object: what compression did to this request (its
/// choices' slots when it has several).
fn kv_report(app: &App, job: &Job, slots: &[Option<Vec<usize>>]) -> Value {
    let cfg = job.compression.as_ref().unwrap_or(&app.compression);
    let first = slots.first().cloned().flatten();
    let layers = first.as_ref().map_or(0, Vec::len).max(1);
    let mut v = json!({
        "kv": {
            "method": cfg.method.name(),
            "budget": cfg.method.policy().compresses().then_some(cfg.budget),
        },
        "kv_slots_per_layer": first,
        "kv_slots_total": first.as_ref().map(|s| s.iter().sum::<usize>()),
        "kv_slots_per_layer_mean": first.as_ref().map(|s| s.iter().sum::<usize>() as f64 / layers as f64),
    });
    if slots.len() > 1 {
        v["kv_slots_per_layer_by_choice"] = json!(slots);
    }
    v
}

/// One choice (one engine request) as its events arrive.
struct Choice<'t> {
    text: Text<'t>,
    tokens: usize,
    reason: &'static str,
    slots: Option<Vec<usize>>,
    /// A stop string ended it; the engine's confirmation is awaited.
    stopping: bool,
    done: bool,
    /// When the request was accepted, and when its last token came.
    start: std::time::Instant,
    last: Option<std::time::Instant>,
}

impl<'t> Choice<'t> {
    fn new(app: &'t App, stop: &'t [String]) -> Self {
        Self {
            text: Text {
                stream: TextStream::new(&app.tokenizer),
                stop,
                held: String::new(),
            },
            tokens: 0,
            reason: "stop",
            slots: None,
            stopping: false,
            done: false,
            start: std::time::Instant::now(),
            last: None,
        }
    }

    /// A token arrived: the latency figures.
    fn timing(&mut self, metrics: &super::metrics::Metrics) {
        let now = std::time::Instant::now();
        match self.last {
            None => metrics.time_to_first_token.observe(now - self.start),
            Some(t) => metrics.inter_token.observe(now - t),
        }
        self.last = Some(now);
        metrics
            .completion_tokens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// What an event adds to the shown text (None: nothing new), and
    /// whether it failed the request (its message).
    fn on(
        &mut self,
        metrics: &super::metrics::Metrics,
        ev: Event,
        slots: Option<Vec<usize>>,
        cancel: impl FnOnce(),
    ) -> Result<Option<String>, String> {
        match ev {
            Event::Token { token, .. } if !self.stopping => {
                self.tokens += 1;
                self.timing(metrics);
                match self.text.push(token) {
                    Ok(t) => Ok((!t.is_empty()).then_some(t)),
                    Err(t) => {
                        cancel();
                        self.stopping = true;
                        self.reason = "stop";
                        Ok((!t.is_empty()).then_some(t))
                    }
                }
            }
            Event::Finished { reason, .. } => {
                self.done = true;
                self.slots = slots;
                if self.stopping {
                    return Ok(None);
                }
                self.reason = finish_reason(reason);
                let rest = self.text.finish();
                Ok((!rest.is_empty()).then_some(rest))
            }
            Event::Failed { error, .. } => {
                self.done = true;
                self.slots = slots;
                self.reason = "error";
                Err(error)
            }
            _ => Ok(None),
        }
    }
}

fn usage(job: &Job, choices: &[Choice]) -> Value {
    let n: usize = choices.iter().map(|c| c.tokens).sum();
    json!({"prompt_tokens": job.prompt.len(), "completion_tokens": n, "total_tokens": job.prompt.len() + n})
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn whole(
    app: Arc<App>,
    job: Job,
    ids: Vec<u64>,
    mut rx: Events,
    rid: String,
    created: u64,
    chat: bool,
    _guard: InFlight,
) -> Response {
    let mut choices: Vec<Choice> = ids.iter().map(|_| Choice::new(&app, &job.stop)).collect();
    let mut outs = vec![String::new(); ids.len()];
    let mut thinks: Vec<Think> = ids.iter().map(|_| Think::new(job.opens_think)).collect();
    let mut reasoning = vec![String::new(); ids.len()];
    while choices.iter().any(|c| !c.done) {
        let Some((i, ev, s)) = rx.recv().await else {
            break;
        };
        let id = ids[i];
        match choices[i].on(&app.metrics, ev, s, || app.svc.cancel(id)) {
            Ok(Some(t)) if chat => {
                let (r, c) = thinks[i].push(&t);
                reasoning[i].push_str(&r);
                outs[i].push_str(&c);
            }
            Ok(Some(t)) => outs[i].push_str(&t),
            Ok(None) => {}
            Err(e) => {
                for &other in &ids {
                    app.svc.cancel(other);
                }
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "generation_failed",
                    e,
                );
            }
        }
    }
    for (i, t) in thinks.iter_mut().enumerate() {
        let (r, c) = t.finish();
        reasoning[i].push_str(&r);
        outs[i].push_str(&c);
    }
    let list: Vec<Value> = choices
        .iter()
        .zip(&outs)
        .enumerate()
        .map(|(i, (c, out))| {
            if chat {
                let mut message = json!({"role": "assistant", "content": out});
                if !reasoning[i].is_empty() {
                    message["reasoning_content"] = json!(reasoning[i]);
                }
                json!({"index": i, "message": message, "finish_reason": c.reason, "logprobs": null})
            } else {
                json!({"index": i, "text": out, "finish_reason": c.reason, "logprobs": null})
            }
        })
        .collect();
    let slots: Vec<Option<Vec<usize>>> = choices.iter().map(|c| c.slots.clone()).collect();
    Json(json!({
        "id": rid,
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": app.model_name,
        "choices": list,
        "usage": usage(&job, &choices),
        "kvsift": kv_report(&app, &job, &slots),
    }))
    .into_response()
}

#[allow(clippy::too_many_arguments)]
pub(super) fn stream(
    app: Arc<App>,
    job: Job,
    ids: Vec<u64>,
    mut rx: Events,
    rid: String,
    created: u64,
    chat: bool,
    guard: InFlight,
) -> Response {
    let (tx, out) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let _guard = guard;
        let chunk = |i: usize, delta: Option<&str>, reason: Option<&str>, first: bool| -> Value {
            let choice = if chat {
                let mut d = serde_json::Map::new();
                if first {
                    d.insert("role".into(), "assistant".into());
                }
                if let Some(t) = delta {
                    d.insert("content".into(), t.into());
                }

                json!({"index": i, "delta": d, "finish_reason": reason, "logprobs": null})
            } else {
                json!({"index": i, "text": delta.unwrap_or(""), "finish_reason": reason, "logprobs": null})
            };
            json!({
                "id": rid,
                "object": if chat { "chat.completion.chunk" } else { "text_completion" },
                "created": created,
                "model": app.model_name,
                "choices": [choice],
            })
        };
        let reasoning_chunk = |i: usize, r: &str| -> Value {
            json!({
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": app.model_name,
                "choices": [{"index": i, "delta": {"reasoning_content": r}, "finish_reason": null, "logprobs": null}],
            })
        };
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(SseEvent::default().data(v.to_string())))
                    .await
                    .is_ok()
            }
        };
        let mut choices: Vec<Choice> = ids.iter().map(|_| Choice::new(&app, &job.stop)).collect();
        let mut thinks: Vec<Think> = ids.iter().map(|_| Think::new(job.opens_think)).collect();
        let mut alive = true;
        if chat {
            for i in 0..ids.len() {
                alive = alive && send(chunk(i, Some(""), None, true)).await;
            }
        }
        while alive && choices.iter().any(|c| !c.done) {
            let Some((i, ev, s)) = rx.recv().await else {
                break;
            };
            let id = ids[i];
            match choices[i].on(&app.metrics, ev, s, || app.svc.cancel(id)) {
                Ok(Some(t)) if chat => {
                    let (r, c) = thinks[i].push(&t);
                    if !r.is_empty() {
                        alive = send(reasoning_chunk(i, &r)).await;
                    }
                    if alive && !c.is_empty() {
                        alive = send(chunk(i, Some(&c), None, false)).await;
                    }
                }
                Ok(Some(t)) => alive = send(chunk(i, Some(&t), None, false)).await,
                Ok(None) => {}
                Err(e) => {
                    let body = json!({"error": {"message": e, "type": "server_error", "code": "generation_failed"}});
                    alive = send(body).await;
                }
            }
            if alive && choices[i].done && chat {
                let (r, c) = thinks[i].finish();
                if !r.is_empty() {
                    alive = send(reasoning_chunk(i, &r)).await;
                }
                if alive && !c.is_empty() {
                    alive = send(chunk(i, Some(&c), None, false)).await;
                }
            }
            if alive && choices[i].done {
                let mut last = chunk(i, None, Some(choices[i].reason), false);
                last["kvsift"] = kv_report(&app, &job, std::slice::from_ref(&choices[i].slots));
                alive = send(last).await;
            }
        }
        if !alive {
            // The client went away: its requests stop, their pages return.
            for &id in &ids {
                app.svc.cancel(id);
            }
            return;
        }
        if job.include_usage {
            let mut u = chunk(0, None, None, false);
            u["choices"] = json!([]);
            u["usage"] = usage(&job, &choices);
            send(u).await;
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out))
        .keep_alive(KeepAlive::default())
        .into_response()
}
