//! The engine on a thread of its own, for callers that are not a step loop
//! (the HTTP server, the C API): requests arrive through a channel with a
//! sink for their events; the thread steps the engine while it has work and
//! sleeps on the channel when it has none. The engine, and the GPU context
//! it borrows, live and die on that thread.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use crate::engine::{Engine, EngineConfig, EngineStats, Event, Request, RequestId, SequenceReport};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::model::config::ModelConfig;
use crate::model::llama::WeightFormat;

/// Where a request's events go (called on the engine's thread; keep it
/// quick). With the event that ends the request (`Finished`, `Failed`) comes
/// its report (slots at the end, compression passes, slots dropped, peak KV).
pub type Sink = Box<dyn FnMut(Event, Option<SequenceReport>) + Send>;

/// What the service is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceState {
    Loading,
    Ready,
    /// Loading failed, or the engine stopped on an error.
    Failed,
    Stopped,
}

enum Command {
    Add(Box<Request>, Sink, mpsc::Sender<Result<RequestId>>),
    Cancel(RequestId),
    CancelAll,
    Stats(mpsc::Sender<EngineStats>),
    Shutdown,
}

/// A running engine thread.
pub struct EngineService {
    commands: mpsc::Sender<Command>,
    state: Arc<AtomicU8>,
    worker: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// The loaded model's configuration (once ready).
    config: Arc<std::sync::OnceLock<ModelConfig>>,
    /// Why loading failed, if it did.
    failure: Arc<std::sync::Mutex<Option<String>>>,
}

fn state_of(v: u8) -> ServiceState {
    match v {
        0 => ServiceState::Loading,
        1 => ServiceState::Ready,
        2 => ServiceState::Failed,
        _ => ServiceState::Stopped,
    }
}

impl EngineService {
    /// Starts the thread: it opens the GPU (`GpuContext::from_env`), loads
    /// the model in `dir` and builds the engine with `config`, then serves.
    /// Returns at once; [`EngineService::state`] says when it is ready.
    pub fn start(dir: PathBuf, weights: WeightFormat, config: EngineConfig) -> Self {
        let (tx, rx) = mpsc::channel::<Command>();
        let state = Arc::new(AtomicU8::new(0));
        let model = Arc::new(std::sync::OnceLock::new());
        let failure = Arc::new(std::sync::Mutex::new(None));
        let (st, md, fl) = (state.clone(), model.clone(), failure.clone());
        let worker = std::thread::Builder::new()
            .name("kvsift-engine".into())
            .spawn(move || {
                let run = || -> Result<()> {
                    let ctx = GpuContext::from_env()?;
                    let weights = crate::model::llama::load_weights(&ctx, &dir, weights, false)?;
                    let mut engine = Engine::new(&ctx, weights, config)?;
                    let _ = md.set(engine.cfg.clone());
                    st.store(1, Ordering::SeqCst);
                    serve(&mut engine, &rx)
                };
                match run() {
                    Ok(()) => st.store(3, Ordering::SeqCst),
                    Err(e) => {
                        log::error!("engine thread: {e}");
                        if let Ok(mut f) = fl.lock() {
                            *f = Some(e.to_string());
                        }
                        st.store(2, Ordering::SeqCst);
                    }
                }
            })
            .ok();
        Self {
            commands: tx,
            state,
            worker: std::sync::Mutex::new(worker),
            config: model,
            failure,
        }
    }

    pub fn state(&self) -> ServiceState {
        state_of(self.state.load(Ordering::SeqCst))
    }

    /// Why the service failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// The model's configuration, once loaded.
    pub fn model(&self) -> Option<&ModelConfig> {
        self.config.get()
    }

    fn stopped() -> Error {
        Error::invalid("engine", "the engine thread is not running")
    }

    /// Queues a request; its events go to `sink` until its `Finished` or
    /// `Failed`. The error is the engine's refusal (a bad request).
    pub fn add(&self, req: Request, sink: Sink) -> Result<RequestId> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(Command::Add(Box::new(req), sink, tx))
            .map_err(|_| Self::stopped())?;
        rx.recv().map_err(|_| Self::stopped())?
    }

    /// Stops a request; its pages return to the pool within one step.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.commands.send(Command::Cancel(id));
    }

    /// Stops every request; each gets its `Finished` (cancelled) event.
    pub fn cancel_all(&self) {
        let _ = self.commands.send(Command::CancelAll);
    }

    /// The engine's figures.
    pub fn stats(&self) -> Result<EngineStats> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(Command::Stats(tx))
            .map_err(|_| Self::stopped())?;
        rx.recv().map_err(|_| Self::stopped())
    }

    /// Stops the thread after the requests running now finish, and waits
    /// for it (its GPU context is gone when this returns: a process that
    /// exits while the thread still drives the device can crash in the
    /// driver's teardown). Later calls return at once.
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
        let worker = self.worker.lock().map(|mut w| w.take());
        if let Ok(Some(w)) = worker {
            let _ = w.join();
        }
    }
}

/// Stops a request and tells its sink.
fn cancel(engine: &mut Engine, sinks: &mut HashMap<RequestId, Sink>, id: RequestId) {
    if engine.cancel(id)
        && let Some(mut s) = sinks.remove(&id)
    {
        let ev = Event::Finished {
            id,
            reason: crate::engine::StopReason::Cancelled,
        };
        s(ev, engine.take_report(id));
    }
}

/// The thread's loop: commands first, then a step while there is work.
fn serve(engine: &mut Engine, rx: &mpsc::Receiver<Command>) -> Result<()> {
    let mut sinks: HashMap<RequestId, Sink> = HashMap::new();
    let mut draining = false;
    loop {
        // Block on the channel only when idle.
        let mut next = if engine.has_work() || draining {
            rx.try_recv().ok()
        } else {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return Ok(()),
            }
        };
        while let Some(cmd) = next {
            match cmd {
                Command::Add(req, sink, reply) => {
                    let r = if draining {
                        Err(Error::invalid("engine", "shutting down"))
                    } else {
                        engine.add_request(*req)
                    };
                    if let Ok(id) = r {
                        sinks.insert(id, sink);
                    }
                    let _ = reply.send(r);
                }
                Command::Cancel(id) => cancel(engine, &mut sinks, id),
                Command::CancelAll => {
                    let ids: Vec<RequestId> = sinks.keys().copied().collect();
                    for id in ids {
                        cancel(engine, &mut sinks, id);
                    }
                }
                Command::Stats(reply) => {
                    let _ = reply.send(engine.stats());
                }
                Command::Shutdown => draining = true,
            }
            next = rx.try_recv().ok();
        }
        if draining && !engine.has_work() {
            return Ok(());
        }
        if engine.has_work() {
            for ev in engine.step()? {
                let (id, last) = (ev.id(), ev.ends_request());
                let report = if last { engine.take_report(id) } else { None };
                if let Some(s) = sinks.get_mut(&id) {
                    s(ev, report);
                }
                if last {
                    sinks.remove(&id);
                }
            }
        }
    }
}
