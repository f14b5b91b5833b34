//! The engine behind the C handle: the GPU context and tokenizer it
//! borrows, its requests' text streams, and the events waiting to be polled.

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::path::Path;

use kvsift::engine::{Engine, Event, Request, RequestId, SequenceReport, StopReason};
use kvsift::gpu::GpuContext;
use kvsift::kv::compression::CompressConfig;
use kvsift::model::config::GenerationDefaults;
use kvsift::model::llama::load_weights;
use kvsift::model::{Message, TextStream, TextTokenizer};

use crate::settings;
use crate::{Failure, KvsiftEvent, KvsiftEventKind, KvsiftFinish, KvsiftStats, KvsiftStatus};

/// A value on the heap at a fixed address, freed when this is dropped;
/// what borrows it must be dropped first (a raw pointer, not a `Box`, so
/// moving the owner asserts nothing about the borrows).
struct Pinned<T>(std::ptr::NonNull<T>);

impl<T> Pinned<T> {
    fn new(v: T) -> Self {
        Self(std::ptr::NonNull::from(Box::leak(Box::new(v))))
    }

    /// SAFETY (the caller's): the reference must not outlive `self`.
    unsafe fn get(&self) -> &'static T {
        unsafe { self.0.as_ref() }
    }
}

impl<T> Drop for Pinned<T> {
    fn drop(&mut self) {
        // SAFETY: made by Box::leak in `new`, freed once, here.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

/// An engine: a model on the GPU, its requests and their events. Made by
/// `kvsift_engine_open`, freed by `kvsift_engine_free`.
// The engine borrows the GPU context and the text streams borrow the
// tokenizer; both are `Pinned` and declared after their borrowers, so they
// are dropped last.
pub struct KvsiftEngine {
    engine: Engine<'static>,
    streams: HashMap<RequestId, TextStream<'static>>,
    events: VecDeque<(KvsiftEvent, CString)>,
    /// The text of the event handed out last (valid until the next poll).
    current: CString,
    stop_ids: Vec<u32>,
    defaults: GenerationDefaults,
    compression: CompressConfig,
    tokenizer: Pinned<TextTokenizer>,
    /// Never read: owned for the engine's borrow.
    _ctx: Pinned<GpuContext>,
}

fn event(request: RequestId, kind: KvsiftEventKind) -> KvsiftEvent {
    KvsiftEvent {
        request,
        kind,
        token: 0,
        text: std::ptr::null(),
        finish: KvsiftFinish::KvsiftNone,
        slots_kept: 0,
        compression_passes: 0,
        slots_dropped: 0,
        peak_kv_bytes: 0,
    }
}

fn c_string(s: String) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

impl KvsiftEngine {
    pub(crate) fn open(dir: &Path, settings: Option<&str>) -> Result<Self, Failure> {
        let (config, weights_dtype) = settings::engine(settings)?;
        if !dir.is_dir() {
            return Err(Failure(
                KvsiftStatus::KvsiftModel,
                format!("model_dir {}: not a directory", dir.display()),
            ));
        }
        let compression = config.compression.clone();
        let tokenizer = Pinned::new(TextTokenizer::load(dir)?);
        let defaults = GenerationDefaults::load(dir)?;
        let mut stop_ids = defaults.eos_token_ids.clone();
        // SAFETY: tokenizer outlives this borrow (dropped after `self`'s users).
        stop_ids.extend(unsafe { tokenizer.get() }.eos_id());
        let ctx = Pinned::new(GpuContext::from_env()?);
        // SAFETY: `ctx` moves into the returned struct, which drops `engine`
        // (declared first) before it; on an error below, the weights and
        // engine that borrow it are gone before it is.
        let ctx_ref: &'static GpuContext = unsafe { ctx.get() };
        let weights = load_weights(ctx_ref, dir, weights_dtype, false)?;
        let engine =
            Engine::new(ctx_ref, weights, config).map_err(|e| settings::name_fields(e.into()))?;
        Ok(Self {
            engine,
            streams: HashMap::new(),
            events: VecDeque::new(),
            current: CString::default(),
            stop_ids,
            defaults,
            compression,
            tokenizer,
            _ctx: ctx,
        })
    }

    fn tokenizer(&self) -> &'static TextTokenizer {
        // SAFETY: as for the context in `open`: pinned, owned, dropped after
        // the streams (declared before it) that hold this reference.
        unsafe { self.tokenizer.get() }
    }

    pub(crate) fn add(&mut self, prompt: &str, request: Option<&str>) -> Result<u64, Failure> {
        let s = settings::request(request, self.defaults.sampling, &self.compression)?;
        let tokenizer = self.tokenizer();
        let ids = if s.chat {
            let messages = [Message {
                role: "user".into(),
                content: prompt.into(),
            }];
            let text = tokenizer.apply_chat_template(&messages, true)?;
            tokenizer.encode(&text, false)?
        } else {
            tokenizer.encode(prompt, true)?
        };
        let id = self.engine.add_request(Request {
            prompt: ids,
            max_tokens: s.max_tokens,
            sampling: s.sampling,
            stop_ids: self.stop_ids.clone(),
            compression: s.compression,
            logprobs: None,
        })?;
        self.streams.insert(id, TextStream::new(tokenizer));
        Ok(id)
    }

    pub(crate) fn cancel(&mut self, id: u64) -> Result<(), Failure> {
        if !self.engine.cancel(id) {
            return Err(Failure(
                KvsiftStatus::KvsiftNotFound,
                format!(
                    "request {id}: not running or waiting (finished, cancelled, or never added)"
                ),
            ));
        }
        self.end(
            id,
            KvsiftEventKind::KvsiftFinished,
            KvsiftFinish::KvsiftCancelled,
            String::new(),
        );
        Ok(())
    }

    pub(crate) fn has_work(&self) -> bool {
        self.engine.has_work()
    }

    /// One step, its events queued.
    pub(crate) fn step(&mut self) -> Result<(), Failure> {
        if !self.engine.has_work() {
            return Ok(());
        }
        for ev in self.engine.step()? {
            match ev {
                Event::Token { id, token } => {
                    let text = match self.streams.get_mut(&id) {
                        Some(s) => s.push(token)?,
                        None => String::new(),
                    };
                    let mut e = event(id, KvsiftEventKind::KvsiftToken);
                    e.token = token;
                    self.events.push_back((e, c_string(text)));
                }
                Event::Finished { id, reason } => {
                    let rest = match self.streams.get_mut(&id) {
                        Some(s) => s.finish()?,
                        None => String::new(),
                    };
                    let finish = match reason {
                        StopReason::Eos => KvsiftFinish::KvsiftStop,
                        StopReason::MaxTokens => KvsiftFinish::KvsiftLength,
                        StopReason::Context => KvsiftFinish::KvsiftContext,
                        StopReason::Cancelled => KvsiftFinish::KvsiftCancelled,
                    };
                    self.end(id, KvsiftEventKind::KvsiftFinished, finish, rest);
                }
                Event::Failed { id, error } => self.end(
                    id,
                    KvsiftEventKind::KvsiftFailed,
                    KvsiftFinish::KvsiftNone,
                    error,
                ),
                Event::Preempted { id } => {
                    let e = event(id, KvsiftEventKind::KvsiftPreempted);
                    self.events.push_back((e, CString::default()));
                }
                Event::Logits { .. } | Event::Logprobs { .. } => {}
            }
        }
        Ok(())
    }

    /// A request's last event, with its report.
    fn end(&mut self, id: RequestId, kind: KvsiftEventKind, finish: KvsiftFinish, text: String) {
        self.streams.remove(&id);
        let r: SequenceReport = self.engine.take_report(id).unwrap_or_default();
        let mut e = event(id, kind);
        e.finish = finish;
        e.slots_kept = r.slots_per_layer.iter().sum::<usize>() as u64;
        e.compression_passes = r.compression_passes;
        e.slots_dropped = r.slots_dropped;
        e.peak_kv_bytes = r.peak_kv_bytes;
        self.events.push_back((e, c_string(text)));
    }

    /// The next queued event; its text lives in `self.current` until the next.
    pub(crate) fn poll(&mut self) -> Option<KvsiftEvent> {
        let (mut e, text) = self.events.pop_front()?;
        self.current = text;
        e.text = self.current.as_ptr();
        Some(e)
    }

    pub(crate) fn stats(&self) -> KvsiftStats {
        let s = self.engine.stats();
        let c = s.compression.unwrap_or_default();
        KvsiftStats {
            running: s.running as u64,
            waiting: s.waiting as u64,
            kv_pages_total: s.pool.pages_total as u64,
            kv_pages_in_use: s.pool.pages_in_use as u64,
            kv_pages_peak: s.peak_pages_in_use as u64,
            kv_bytes_in_use: s.pool.bytes_in_use,
            preemptions: s.preemptions,
            compression_passes: c.passes,
            slots_dropped: c.slots_dropped,
        }
    }
}
