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
use kvsift::engine::{Event, SequenceReport, StopReason, TokenLogprobs};
use kvsift::model::TextStream;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::App;
use super::api::{Events, InFlight, error};
use super::request::Job;
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
        StopReason::Eos => "stop",
        StopReason::MaxTokens | StopReason::Context => "length",
        // Stopped by the server (its shutdown deadline), as vLLM says it.
        StopReason::Cancelled => "abort",
    }
}

/// The extension object: what compression did to this request (its first
/// choice's figures; every choice's too when it has several).
fn kv_report(app: &App, job: &Job, reports: &[Option<SequenceReport>]) -> Value {
    let cfg = job.compression.as_ref().unwrap_or(&app.compression);
    let first = reports.first().cloned().flatten();
    let slots = first.as_ref().map(|r| r.slots_per_layer.clone());
    let layers = slots.as_ref().map_or(0, Vec::len).max(1);
    let mut v = json!({
        "kv": {
            "method": cfg.method.name(),
            "budget": cfg.method.policy().compresses().then_some(cfg.budget),
        },
        "kv_slots_total": slots.as_ref().map(|s| s.iter().sum::<usize>()),
        "kv_slots_per_layer_mean": slots.as_ref().map(|s| s.iter().sum::<usize>() as f64 / layers as f64),
        "kv_slots_per_layer": slots,
        "kv_slots_per_head": first.as_ref().map(|r| &r.slots_per_head),
        "compression_passes": first.as_ref().map(|r| r.compression_passes),
        "slots_dropped": first.as_ref().map(|r| r.slots_dropped),
        "peak_kv_bytes": first.as_ref().map(|r| r.peak_kv_bytes),
        "peak_kv_pages": first.as_ref().map(|r| r.peak_kv_pages),
        "peak_kv_slots_per_head": first.as_ref().map(|r| r.peak_slots_per_head),
    });
    if reports.len() > 1 {
        v["by_choice"] = json!(reports);
    }
    v
}

/// A token's text as the logprobs show it, and its UTF-8 bytes.
fn token_text(app: &App, id: u32) -> (String, Vec<u8>) {
    let bytes = app.tokenizer.token_bytes(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// Logprobs in OpenAI's shape: chat's `{"content": [...]}`, or completions'
/// parallel lists (`text_offset` counts characters from `offset`, which
/// moves past these tokens).
fn logprobs_json(app: &App, lps: &[TokenLogprobs], chat: bool, offset: &mut usize) -> Value {
    if chat {
        let entry = |id: u32, lp: f32| {
            let (token, bytes) = token_text(app, id);
            json!({"token": token, "logprob": lp, "bytes": bytes})
        };
        let content: Vec<Value> = lps
            .iter()
            .map(|t| {
                let mut e = entry(t.token, t.logprob);
                e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                e
            })
            .collect();
        return json!({"content": content, "refusal": null});
    }
    let (mut tokens, mut logprobs, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for t in lps {
        let (text, _) = token_text(app, t.token);
        offsets.push(*offset);
        *offset += text.chars().count();
        tokens.push(text);
        logprobs.push(t.logprob);
        // Tokens whose texts coincide (pieces of one character) share a
        // key: the most likely keeps it.
        let mut top = serde_json::Map::new();
        for &(id, lp) in &t.top {
            top.entry(token_text(app, id).0).or_insert(json!(lp));
        }
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets})
}

/// One choice (one engine request) as its events arrive.
struct Choice<'t> {
    text: Text<'t>,
    /// Splits a chat's text into reasoning and answer.
    think: Think,
    tokens: usize,
    reason: &'static str,
    report: Option<SequenceReport>,
    /// Logprobs of its tokens (when asked), and how many were sent.
    logprobs: Vec<TokenLogprobs>,
    logprobs_sent: usize,
    /// Characters of text the sent logprobs covered (completions' `text_offset`).
    text_offset: usize,
    /// A stop string ended it; the engine's confirmation is awaited.
    stopping: bool,
    done: bool,
    /// When the request was accepted, and when its last token came.
    start: std::time::Instant,
    last: Option<std::time::Instant>,
}

impl<'t> Choice<'t> {
    /// One per choice of the job.
    fn all(app: &'t App, job: &'t Job, n: usize) -> Vec<Self> {
        (0..n).map(|_| Self::new(app, job)).collect()
    }

    fn new(app: &'t App, job: &'t Job) -> Self {
        Self {
            text: Text {
                stream: TextStream::new(&app.tokenizer),
                stop: &job.stop,
                held: String::new(),
            },
            think: Think::new(job.opens_think),
            tokens: 0,
            reason: "stop",
            report: None,
            logprobs: vec![],
            logprobs_sent: 0,
            text_offset: 0,
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
        report: Option<SequenceReport>,
        cancel: impl FnOnce(),
    ) -> Result<Option<String>, String> {
        match ev {
            Event::Logprobs { logprobs, .. } if !self.stopping => {
                self.logprobs.push(logprobs);
                Ok(None)
            }
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
                self.report = report;
                if self.stopping {
                    return Ok(None);
                }
                self.reason = finish_reason(reason);
                let rest = self.text.finish();
                Ok((!rest.is_empty()).then_some(rest))
            }
            Event::Failed { error, .. } => {
                self.done = true;
                self.report = report;
                self.reason = "error";
                Err(error)
            }
            _ => Ok(None),
        }
    }
}

impl Choice<'_> {
    /// The logprobs not sent yet, in OpenAI's shape (None: not asked for).
    fn unsent_logprobs(&mut self, app: &App, job: &Job, chat: bool) -> Value {
        if job.logprobs.is_none() {
            return Value::Null;
        }
        let from = std::mem::replace(&mut self.logprobs_sent, self.logprobs.len());
        logprobs_json(app, &self.logprobs[from..], chat, &mut self.text_offset)
    }
}

/// A queued request, to be answered from its choices' events.
pub(super) struct Reply {
    pub app: Arc<App>,
    pub job: Job,
    /// The engine's ids of its choices, by choice index.
    pub ids: Vec<u64>,
    pub rx: Events,
    /// The response's `id`, and when it was made.
    pub rid: String,
    pub created: u64,
    pub chat: bool,
    /// Counts it in flight until the answer is done.
    pub guard: InFlight,
}

fn usage(job: &Job, choices: &[Choice]) -> Value {
    let n: usize = choices.iter().map(|c| c.tokens).sum();
    let prompt: usize = job.prompts.iter().map(Vec::len).sum();
    json!({"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n})
}

pub(super) async fn whole(reply: Reply) -> Response {
    let Reply {
        app,
        job,
        ids,
        mut rx,
        rid,
        created,
        chat,
        guard: _guard,
    } = reply;
    let mut choices = Choice::all(&app, &job, ids.len());
    let mut outs = vec![String::new(); ids.len()];
    let mut reasoning = vec![String::new(); ids.len()];
    while choices.iter().any(|c| !c.done) {
        let Some((i, ev, report)) = rx.recv().await else {
            break;
        };
        let id = ids[i];
        match choices[i].on(&app.metrics, ev, report, || app.svc.cancel(id)) {
            Ok(Some(t)) if chat => {
                let (r, c) = choices[i].think.push(&t);
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
    let mut list = vec![];
    for (i, c) in choices.iter_mut().enumerate() {
        let (r, rest) = c.think.finish();
        reasoning[i].push_str(&r);
        outs[i].push_str(&rest);
        let logprobs = c.unsent_logprobs(&app, &job, chat);
        let out = std::mem::take(&mut outs[i]);
        list.push(if chat {
            let mut message = json!({"role": "assistant", "content": out});
            if !reasoning[i].is_empty() {
                message["reasoning_content"] = json!(reasoning[i]);
            }
            json!({"index": i, "message": message, "finish_reason": c.reason, "logprobs": logprobs})
        } else {
            let text = match &job.echo {
                Some(prompts) => format!("{}{out}", prompts[i / job.n]),
                None => out,
            };
            json!({"index": i, "text": text, "finish_reason": c.reason, "logprobs": logprobs})
        });
    }
    let reports: Vec<Option<SequenceReport>> = choices.iter().map(|c| c.report.clone()).collect();
    Json(json!({
        "id": rid,
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": app.model_name,
        "choices": list,
        "usage": usage(&job, &choices),
        "kvsift": kv_report(&app, &job, &reports),
    }))
    .into_response()
}

/// What one streamed chunk of a choice carries.
#[derive(Default)]
struct Delta<'a> {
    content: Option<&'a str>,
    reasoning: Option<&'a str>,
    /// The chunk that opens a chat choice (its role).
    first: bool,
    finish_reason: Option<&'a str>,
    logprobs: Value,
}

pub(super) fn stream(reply: Reply) -> Response {
    let Reply {
        app,
        job,
        ids,
        mut rx,
        rid,
        created,
        chat,
        guard,
    } = reply;
    let (tx, out) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let _guard = guard;
        let chunk = |i: usize, d: Delta| -> Value {
            let choice = if chat {
                let mut delta = serde_json::Map::new();
                if d.first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = d.content {
                    delta.insert("content".into(), t.into());
                }
                if let Some(r) = d.reasoning {
                    delta.insert("reasoning_content".into(), r.into());
                }
                json!({"index": i, "delta": delta, "finish_reason": d.finish_reason, "logprobs": d.logprobs})
            } else {
                json!({"index": i, "text": d.content.unwrap_or(""), "finish_reason": d.finish_reason, "logprobs": d.logprobs})
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
        let mut choices = Choice::all(&app, &job, ids.len());
        let mut alive = true;
        if chat {
            for i in 0..ids.len() {
                let d = Delta {
                    content: Some(""),
                    first: true,
                    ..Delta::default()
                };
                alive = alive && send(chunk(i, d)).await;
            }
        }
        if let Some(prompts) = &job.echo {
            for i in 0..ids.len() {
                let d = Delta {
                    content: Some(&prompts[i / job.n]),
                    ..Delta::default()
                };
                alive = alive && send(chunk(i, d)).await;
            }
        }
        while alive && choices.iter().any(|c| !c.done) {
            let Some((i, ev, report)) = rx.recv().await else {
                break;
            };
            let id = ids[i];
            let shown = match choices[i].on(&app.metrics, ev, report, || app.svc.cancel(id)) {
                Ok(shown) => shown,
                Err(e) => {
                    let body = json!({"error": {"message": e, "type": "server_error", "code": "generation_failed"}});
                    alive = send(body).await;
                    None
                }
            };
            // What the text adds: thinking and answer apart in a chat; at
            // the end, whatever a think tag held back.
            let (mut reasoning, mut content) = match (&shown, chat) {
                (Some(t), true) => choices[i].think.push(t),
                (Some(t), false) => (String::new(), t.clone()),
                (None, _) => (String::new(), String::new()),
            };
            if choices[i].done && chat {
                let (r, c) = choices[i].think.finish();
                reasoning.push_str(&r);
                content.push_str(&c);
            }
            // The logprobs of the tokens shown so far ride on the first chunk
            // that shows text (or on the last chunk).
            for (r, c) in [(Some(reasoning), None), (None, Some(content))] {
                let text = r.as_deref().or(c.as_deref()).unwrap_or("");
                if alive && !text.is_empty() {
                    let d = Delta {
                        reasoning: r.as_deref(),
                        content: c.as_deref(),
                        logprobs: choices[i].unsent_logprobs(&app, &job, chat),
                        ..Delta::default()
                    };
                    alive = send(chunk(i, d)).await;
                }
            }
            if alive && choices[i].done {
                let c = &mut choices[i];
                let d = Delta {
                    finish_reason: Some(c.reason),
                    logprobs: if c.logprobs_sent < c.logprobs.len() {
                        c.unsent_logprobs(&app, &job, chat)
                    } else {
                        Value::Null
                    },
                    ..Delta::default()
                };
                let mut last = chunk(i, d);
                last["kvsift"] = kv_report(&app, &job, std::slice::from_ref(&choices[i].report));
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
            let mut u = chunk(0, Delta::default());
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
