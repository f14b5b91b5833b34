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

/// The extension object: what compression did to this request.
fn kv_report(app: &App, job: &Job, slots: &Option<Vec<usize>>) -> Value {
    let cfg = job.compression.as_ref().unwrap_or(&app.compression);
    let layers = slots.as_ref().map_or(0, Vec::len).max(1);
    json!({
        "kv": {
            "method": cfg.method.name(),
            "budget": cfg.method.policy().compresses().then_some(cfg.budget),
        },
        "kv_slots_per_layer": slots,
        "kv_slots_total": slots.as_ref().map(|s| s.iter().sum::<usize>()),
        "kv_slots_per_layer_mean": slots.as_ref().map(|s| s.iter().sum::<usize>() as f64 / layers as f64),
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn whole(
    app: Arc<App>,
    job: Job,
    id: u64,
    mut rx: Events,
    rid: String,
    created: u64,
    chat: bool,
    _guard: InFlight,
) -> Response {
    let mut text = Text {
        stream: TextStream::new(&app.tokenizer),
        stop: &job.stop,
        held: String::new(),
    };
    let (mut out, mut n, mut reason, mut slots) = (String::new(), 0usize, "stop", None);
    while let Some((ev, s)) = rx.recv().await {
        match ev {
            Event::Token { token, .. } => {
                n += 1;
                match text.push(token) {
                    Ok(t) => out.push_str(&t),
                    Err(t) => {
                        out.push_str(&t);
                        app.svc.cancel(id);
                        reason = "stop";
                        slots = s;
                        // Drain until the engine confirms.
                        while let Some((ev, s)) = rx.recv().await {
                            if matches!(ev, Event::Finished { .. } | Event::Failed { .. }) {
                                slots = s.or(slots);
                                break;
                            }
                        }
                        break;
                    }
                }
            }
            Event::Finished { reason: r, .. } => {
                out.push_str(&text.finish());
                reason = finish_reason(r);
                slots = s;
                break;
            }
            Event::Failed { error: e, .. } => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "generation_failed",
                    e,
                );
            }
            _ => {}
        }
    }
    let usage = json!({"prompt_tokens": job.prompt.len(), "completion_tokens": n, "total_tokens": job.prompt.len() + n});
    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": reason, "logprobs": null})
    } else {
        json!({"index": 0, "text": out, "finish_reason": reason, "logprobs": null})
    };
    Json(json!({
        "id": rid,
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": app.model_name,
        "choices": [choice],
        "usage": usage,
        "kvsift": kv_report(&app, &job, &slots),
    }))
    .into_response()
}

#[allow(clippy::too_many_arguments)]
pub(super) fn stream(
    app: Arc<App>,
    job: Job,
    id: u64,
    mut rx: Events,
    rid: String,
    created: u64,
    chat: bool,
    guard: InFlight,
) -> Response {
    let (tx, out) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let _guard = guard;
        let chunk = |delta: Option<&str>, reason: Option<&str>, first: bool| -> Value {
            let choice = if chat {
                let mut d = serde_json::Map::new();
                if first {
                    d.insert("role".into(), "assistant".into());
                }
                if let Some(t) = delta {
                    d.insert("content".into(), t.into());
                }
                json!({"index": 0, "delta": d, "finish_reason": reason, "logprobs": null})
            } else {
                json!({"index": 0, "text": delta.unwrap_or(""), "finish_reason": reason, "logprobs": null})
            };
            json!({
                "id": rid,
                "object": if chat { "chat.completion.chunk" } else { "text_completion" },
                "created": created,
                "model": app.model_name,
                "choices": [choice],
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
        let mut text = Text {
            stream: TextStream::new(&app.tokenizer),
            stop: &job.stop,
            held: String::new(),
        };
        let mut n = 0usize;
        let mut alive = !chat || send(chunk(Some(""), None, true)).await;
        let mut slots = None;
        let mut reason = "stop";
        while alive {
            let Some((ev, s)) = rx.recv().await else {
                break;
            };
            match ev {
                Event::Token { token, .. } => {
                    n += 1;
                    match text.push(token) {
                        Ok(t) if t.is_empty() => {}
                        Ok(t) => alive = send(chunk(Some(&t), None, false)).await,
                        Err(t) => {
                            if !t.is_empty() {
                                alive = send(chunk(Some(&t), None, false)).await;
                            }
                            app.svc.cancel(id);
                            reason = "stop";
                            while let Some((ev, s)) = rx.recv().await {
                                if matches!(ev, Event::Finished { .. } | Event::Failed { .. }) {
                                    slots = s;
                                    break;
                                }
                            }
                            break;
                        }
                    }
                }
                Event::Finished { reason: r, .. } => {
                    let rest = text.finish();
                    if !rest.is_empty() {
                        alive = send(chunk(Some(&rest), None, false)).await;
                    }
                    reason = finish_reason(r);
                    slots = s;
                    break;
                }
                Event::Failed { error: e, .. } => {
                    let body = json!({"error": {"message": e, "type": "server_error", "code": "generation_failed"}});
                    let _ = send(body).await;
                    reason = "error";
                    slots = s;
                    break;
                }
                _ => {}
            }
        }
        if !alive {
            // The client went away: its request stops, its pages return.
            app.svc.cancel(id);
            return;
        }
        let mut last = chunk(None, Some(reason), false);
        last["kvsift"] = kv_report(&app, &job, &slots);
        if send(last).await && job.include_usage {
            let mut u = chunk(None, None, false);
            u["choices"] = json!([]);
            u["usage"] = json!({"prompt_tokens": job.prompt.len(), "completion_tokens": n, "total_tokens": job.prompt.len() + n});
            send(u).await;
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out))
        .keep_alive(KeepAlive::default())
        .into_response()
}
