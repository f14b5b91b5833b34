//! The serving engine: many sequences over one paged KV pool, advanced
//! together (continuous batching). This file is the glue: the [`Engine`],
//! its configuration and public API, and [`Engine::step`], which asks the
//! [`Scheduler`] what to do and has the executor (`executor.rs`) run it
//! with the op lists of `plans.rs`.
//!
//! Each [`Engine::step`]:
//! 1. admits waiting requests, first come first served, while a lane is free
//!    and the pool holds their tokens; each runs its prefill (in chunks) and
//!    samples its first token;
//! 2. grows every running sequence by one slot; when the pool is exhausted it
//!    preempts the latest-arrived other sequence ([`Exhaustion`]:
//!    its pages are swapped to host memory and restored when it is
//!    readmitted, or freed and its cache replayed exactly from its tokens)
//!    or fails the sequence that cannot grow, as configured;
//! 3. runs one decode step for all running sequences in one submission (the
//!    projections are matmuls over the batch) and reads back one token each
//!    (or several chained steps, [`EngineConfig::decode_chain`]).
//!
//! Sequences join and leave between steps. Only sampled tokens are read back.
//!
//! Failures: whatever goes wrong while serving (a GPU error in a prefill, a
//! decode step or a compression pass, non-finite logits) fails the requests
//! it touches with an [`Event::Failed`] and returns their pages and lanes;
//! the engine goes on serving the others. A preempted sequence resumes with
//! exactly the cache it had, so its tokens are those it would have produced
//! without the preemption.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::engine::compressor::{CompressionStats, Compressor};
use crate::engine::config::{
    EngineConfig, MAX_DECODE_CHAIN, MAX_LANES, context_capacity, too_long,
};
use crate::engine::executor::Started;
use crate::engine::scheduler::{Scheduler, SchedulerConfig};
use crate::engine::sequence::{
    Event, MAX_TOP_LOGPROBS, Parked, Request, RequestId, SequenceReport,
};
use crate::error::{Error, Result};
use crate::gpu::buffer::ReadbackSlot;
use crate::gpu::{GpuBuffer, GpuContext, Op};
use crate::kv::compression::Method;
use crate::kv::paged::{KvShape, PagedKv, PoolUsage};
use crate::model::config::ModelConfig;
use crate::model::llama::{Activations, LlamaWeights, check_ids};
use crate::ops::paged_attention::{partials_len, prefill_splits};
use crate::ops::sample::{Sampler, seen_words};

/// Page splits a prefill chunk's attention uses at most.
pub(super) const MAX_PREFILL_SPLITS: usize = 16;
/// Pool and scheduler figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EngineStats {
    pub pool: PoolUsage,
    pub peak_pages_in_use: usize,
    pub running: usize,
    pub waiting: usize,
    pub preemptions: u64,
    /// Host memory holding swapped-out sequences now (pages and compressor state).
    pub swapped_bytes: u64,
    /// KV slots held per layer by the running sequences (summed over heads).
    pub slots_per_layer: Vec<usize>,
    /// Slots of the longest head of any running sequence.
    pub longest_head: usize,
    /// What the compression passes did (None without compression).
    pub compression: Option<CompressionStats>,
}

/// Where decode steps spent their wall time, summed since the last
/// [`Engine::take_decode_timing`].
#[derive(Clone, Copy, Debug, Default)]
pub struct DecodeTiming {
    pub steps: u64,
    /// Submissions those steps took (fewer than steps when chained).
    pub submissions: u64,
    /// Host work before the GPU can start: descriptors and inputs written,
    /// the step encoded and submitted.
    pub host: Duration,
    /// Submission to the sampled tokens on the host: the GPU's work plus
    /// the readback.
    pub wait: Duration,
}

impl DecodeTiming {
    /// `steps` decode steps in one submission: host work from `start` to
    /// `submitted`, then the wait until now (the tokens are on the host).
    pub(super) fn record(&mut self, steps: u64, start: Instant, submitted: Instant) {
        self.steps += steps;
        self.submissions += 1;
        self.host += submitted - start;
        self.wait += submitted.elapsed();
    }
}

/// Serves generation requests on one model: [`Engine::add_request`], then
/// [`Engine::step`] until [`Engine::has_work`] is false, reading the events.
/// Build one with [`Engine::builder`] (or [`Engine::new`] from loaded
/// weights and an [`EngineConfig`]); `examples/embed.rs` is a whole program.
///
/// ```no_run
/// # fn main() -> kvsift::Result<()> {
/// use kvsift::engine::{Engine, Event, Request};
/// use kvsift::kv::compression::{CompressConfig, Method};
/// let ctx = kvsift::gpu::GpuContext::from_env()?;
/// let mut engine = Engine::builder(&ctx)
///     .max_batch(4)
///     .compression(CompressConfig::new(Method::Rkv, 128))
///     .load("models/tiny-llama".as_ref())?;
/// engine.add_request(Request::greedy(vec![1, 2, 3], 8))?;
/// while engine.has_work() {
///     for event in engine.step()? {
///         if let Event::Token { id, token } = event {
///             println!("request {id}: token {token}");
///         }
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub struct Engine<'c> {
    pub(super) ctx: &'c GpuContext,
    pub cfg: ModelConfig,
    pub(super) weights: LlamaWeights,
    pub(super) acts: Activations,
    pub(super) kv: PagedKv,
    pub(super) config: EngineConfig,
    pub(super) capacity: usize,
    pub(super) sched: Scheduler,
    pub(super) sampler: Sampler,
    pub(super) seen: GpuBuffer<u32>,
    pub(super) tokens_out: GpuBuffer<u32>,
    pub(super) partials: GpuBuffer<f32>,
    pub(super) token_slot: ReadbackSlot,
    /// The decode step for `b` rows (without the token readback).
    pub(super) decode_plans: HashMap<usize, Vec<Op>>,
    /// `(b, k)`: k chained decode steps of `b` rows, readbacks included.
    pub(super) chain_plans: HashMap<(usize, usize), Vec<Op>>,
    /// One decode step's body for a single row (replays), built on first use.
    pub(super) replay_body: Option<Vec<Op>>,
    pub(super) split_pages: usize,
    pub(super) n_splits: usize,
    pub(super) steps: u64,
    pub(super) peak_pages: usize,
    pub(super) ids_host: Vec<u32>,
    pub(super) lanes_host: Vec<u32>,
    pub(super) pos_host: Vec<u32>,
    pub(super) capture_logits: bool,
    pub(super) compressor: Option<Compressor>,
    pub(super) profile_next: bool,
    pub(super) profile_prefill: bool,
    pub(super) last_profile: Option<Vec<(String, f64)>>,
    pub(super) decode_timing: DecodeTiming,
}

impl<'c> Engine<'c> {
    /// An engine for `weights` (see [`crate::model::load_weights`]); checks
    /// the configuration against the model and the device, allocates the
    /// pool and every buffer, and compiles the pipelines.
    pub fn new(
        ctx: &'c GpuContext,
        weights: LlamaWeights,
        mut config: EngineConfig,
    ) -> Result<Self> {
        let cfg = weights.cfg.clone();
        let capacity = context_capacity(&cfg, config.max_context)?;
        if config.max_batch == 0 || config.max_batch > MAX_LANES {
            return Err(Error::invalid(
                "--batch",
                format!(
                    "{} concurrent sequences: expected 1 to {MAX_LANES}",
                    config.max_batch
                ),
            ));
        }
        if config.prefill_chunk == 0 {
            return Err(Error::invalid("--batch-tokens", "must be positive"));
        }
        // A chunk longer than the context never fills: the same steps.
        config.prefill_chunk = config.prefill_chunk.min(capacity);
        if config.decode_chain == 0 || config.decode_chain > MAX_DECODE_CHAIN {
            return Err(Error::invalid(
                "--steps-per-submit",
                format!("{}: expected 1 to {MAX_DECODE_CHAIN}", config.decode_chain),
            ));
        }
        let rows = config.max_batch.max(config.prefill_chunk);
        let mut acts = Activations::new(ctx, &cfg, rows, config.max_batch)?;
        if acts.head_rows < config.max_batch {
            return Err(Error::LimitExceeded {
                what: format!(
                    "logits of {} sequences x {} tokens",
                    config.max_batch, cfg.vocab_size
                ),
                requested: (config.max_batch as u64) * (cfg.vocab_size as u64) * 4,
                limit_name: "max_storage_buffer_binding_size",
                limit: ctx.caps.max_binding_bytes,
            });
        }
        config.compression.validate()?;
        let hpk = Compressor::heads_per_kv(&config.compression, &cfg);
        let shape = KvShape {
            n_layers: cfg.n_layers,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        };
        let mut kv = PagedKv::new(
            ctx,
            shape,
            &config.pool,
            config.max_batch,
            rows,
            capacity,
            hpk,
        )?;
        let compressor = if config.compression.method == Method::None && config.recording.is_empty()
        {
            None
        } else {
            Some(Compressor::new(
                ctx,
                config.compression.clone(),
                config.recording,
                &cfg,
                &kv,
                config.max_batch,
                rows,
                capacity,
            )?)
        };
        // At most 16 splits per head: each covers enough pages for the longest context.
        let max_pages = kv.pages_for(capacity);
        // On a CPU adapter (lavapipe) every workgroup launch is costly and
        // there are few cores: splits of up to 64 pages (within llvmpipe's
        // per-invocation loop limit) instead of as many as 16.
        let max_splits = if ctx.adapter_summary.device_type == wgpu::DeviceType::Cpu {
            max_pages.div_ceil(64).clamp(1, 16)
        } else {
            16
        };
        let split_pages = max_pages.div_ceil(max_splits).max(1);
        let n_splits = max_pages.div_ceil(split_pages);
        let v = cfg.vocab_size;
        let chain = config.decode_chain;
        let mut sampler = Sampler::new(ctx, v, config.max_batch)?;
        if chain > 1 {
            acts.enable_chain(ctx, chain)?;
            kv.enable_chain(ctx, chain)?;
            sampler.enable_chain(ctx, chain)?;
        }
        let sched = Scheduler::new(SchedulerConfig {
            lanes: config.max_batch,
            on_exhaustion: config.on_exhaustion,
            decode_chain: chain,
            capacity,
            vocab_size: v,
            max_position_embeddings: cfg.max_position_embeddings,
            n_layers: cfg.n_layers,
            n_heads: kv.n_heads,
            page_size: kv.layout.page_size,
            page_bytes: kv.layout.page_bytes() as u64,
            pool_advice: pool_advice(ctx, &kv, cfg.n_layers),
        });
        let mut engine = Engine {
            ctx,
            sampler,
            seen: GpuBuffer::zeros(ctx, "engine.seen", config.max_batch * seen_words(v))?,
            tokens_out: GpuBuffer::zeros(ctx, "engine.tokens", config.max_batch)?,
            partials: GpuBuffer::zeros(
                ctx,
                "engine.partials",
                partials_len(config.max_batch, cfg.n_heads, n_splits, cfg.head_dim).max(
                    partials_len(
                        config.prefill_chunk,
                        cfg.n_heads,
                        prefill_splits(capacity, config.pool.page_size, MAX_PREFILL_SPLITS).0,
                        cfg.head_dim,
                    ),
                ),
            )?,
            token_slot: ReadbackSlot::new(
                ctx,
                "readback.tokens",
                (chain * config.max_batch * 4) as u64,
            )?,
            decode_plans: HashMap::new(),
            chain_plans: HashMap::new(),
            replay_body: None,
            split_pages,
            n_splits,
            sched,
            steps: 0,
            peak_pages: 0,
            ids_host: vec![0; rows],
            lanes_host: vec![0; rows],
            pos_host: vec![0; rows],
            capture_logits: false,
            compressor,
            profile_next: false,
            profile_prefill: false,
            last_profile: None,
            decode_timing: DecodeTiming::default(),
            cfg,
            weights,
            acts,
            kv,
            config,
            capacity,
        };
        // Compile the decode and prefill pipelines now, not in the first request.
        engine.ensure_decode_plan(1)?;
        let n = (crate::ops::linear::matvec_max_vecs(ctx) + 1).min(rows);
        engine.prefill_ops(n, 0, n)?;
        Ok(engine)
    }

    /// Times each kernel of the next decode step on the GPU (timestamp
    /// queries, or per-dispatch host timing without them); read it with
    /// [`Engine::take_profile`].
    pub fn profile_next_decode(&mut self) {
        self.profile_next = true;
    }

    /// Times each kernel of the next prefill (all its chunks, in order);
    /// read it with [`Engine::take_profile`].
    pub fn profile_next_prefill(&mut self) {
        self.profile_prefill = true;
    }

    /// The per-kernel times (label, nanoseconds, in step order) of the last
    /// profiled step.
    pub fn take_profile(&mut self) -> Option<Vec<(String, f64)>> {
        self.last_profile.take()
    }

    /// Host and wait time of the decode steps since the last call (profiled
    /// steps excluded), and starts a new count.
    pub fn take_decode_timing(&mut self) -> DecodeTiming {
        std::mem::take(&mut self.decode_timing)
    }

    /// KV slots a finished (or cancelled) request held per layer when it
    /// left, summed over the layer's heads.
    pub fn final_slots(&self, id: RequestId) -> Option<&[usize]> {
        self.sched.report(id).map(|r| r.slots_per_layer.as_slice())
    }

    /// What the engine did with a request that left: its slots at the end,
    /// its compression passes and the slots they dropped, its peak KV pages
    /// and bytes. Kept until [`Engine::take_report`] (a long-running caller
    /// takes each, or they pile up).
    pub fn report(&self, id: RequestId) -> Option<&SequenceReport> {
        self.sched.report(id)
    }

    /// [`Engine::report`], forgotten by the engine.
    pub fn take_report(&mut self, id: RequestId) -> Option<SequenceReport> {
        self.sched.take_report(id)
    }

    /// KV slots one head of one sequence may hold (`--max-context`): the
    /// positions of a sequence without compression, its cache's bound with it.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Also read back and report the logits each token is drawn from
    /// ([`Event::Logits`]); for checking and research, it costs a readback.
    pub fn capture_logits(&mut self, on: bool) {
        self.capture_logits = on;
    }

    /// KV bytes one position of one sequence holds (every layer and stored
    /// head: key, value and position), what attention reads per slot.
    pub fn kv_bytes_per_position(&self) -> u64 {
        let l = self.kv.layout;
        (self.kv.n_layers * self.kv.n_heads * l.page_bytes() / l.page_size) as u64
    }

    /// Pool bytes the pages of one sequence whose every head holds `slots` slots take.
    pub fn kv_bytes_for_slots(&self, slots: usize) -> u64 {
        let pages = self.kv.n_layers * self.kv.n_heads * self.kv.pages_for(slots);
        (pages * self.kv.layout.page_bytes()) as u64
    }

    /// Bytes the model's weights take on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        self.weights.bytes()
    }

    /// Bytes of weights a decode step reads (see `LlamaWeights::decode_bytes`).
    pub fn decode_weight_bytes(&self) -> u64 {
        self.weights.decode_bytes()
    }

    /// How the weights are stored (see `LlamaWeights::dtype_summary`).
    pub fn weights_summary(&self) -> String {
        self.weights.dtype_summary()
    }

    /// Queues a request; invalid ones (empty prompt, ids outside the
    /// vocabulary, a prompt the context cannot hold, bad sampling settings,
    /// a compression the engine cannot run) are an error right away.
    ///
    /// A request's own compression ([`Request::compression`]) may use any
    /// method and budget whose scores come from what this engine's forward
    /// records: its own method's needs plus [`EngineConfig::recording`]
    /// (the window queries, at the engine's window: every method but H2O
    /// v3; the attention sums: H2O v3; nothing: StreamingLLM, KNorm), and
    /// whose stored heads per KV head match the pool's (the granularity).
    /// An engine that neither compresses nor records serves only
    /// uncompressed requests.
    pub fn add_request(&mut self, req: Request) -> Result<RequestId> {
        if req.prompt.is_empty() {
            return Err(Error::invalid("prompt", "is empty"));
        }
        check_ids(&self.cfg, &req.prompt)?;
        if req.prompt.len() >= self.capacity {
            return Err(too_long(&self.cfg, req.prompt.len() + 1, self.capacity));
        }
        req.sampling.validate()?;
        if let Some(k) = req.logprobs
            && k > MAX_TOP_LOGPROBS
        {
            return Err(Error::invalid(
                "logprobs",
                format!("{k} alternatives: at most {MAX_TOP_LOGPROBS}"),
            ));
        }
        let compression = match (&req.compression, &self.compressor) {
            (None, _) => self.config.compression.clone(),
            (Some(c), Some(compressor)) => {
                compressor.accepts(c)?;
                c.clone()
            }
            (Some(c), None) if !c.method.policy().compresses() => c.clone(),
            (Some(c), None) => {
                return Err(Error::invalid(
                    "request compression",
                    format!(
                        "--kv {}: this engine was built without compression (its forward \
                         records nothing to score from); build it with a method or a recording",
                        c.method
                    ),
                ));
            }
        };
        Ok(self.sched.enqueue(req, compression))
    }

    /// Stops a request; its pages return to the pool. False if unknown or done.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        self.sched.cancel(id, &mut self.kv.alloc)
    }

    /// Whether any request is running or waiting.
    pub fn has_work(&self) -> bool {
        self.sched.has_work()
    }

    pub fn stats(&self) -> EngineStats {
        let running = &self.sched.running;
        let mut slots = vec![0; self.cfg.n_layers];
        for s in running {
            for (acc, v) in slots.iter_mut().zip(s.tables.slots_per_layer()) {
                *acc += v;
            }
        }
        EngineStats {
            pool: self.kv.usage(),
            peak_pages_in_use: self.peak_pages,
            running: running.len(),
            waiting: self.sched.waiting.len(),
            preemptions: self.sched.preemptions,
            swapped_bytes: self.sched.swapped_bytes(),
            slots_per_layer: slots,
            longest_head: running
                .iter()
                .map(|s| s.tables.max_len())
                .max()
                .unwrap_or(0),
            compression: self.compressor.as_ref().map(|c| c.stats.clone()),
        }
    }

    /// Advances every sequence by one token (admitting and prefilling
    /// waiting ones). What goes wrong with a request is an [`Event::Failed`]
    /// among the events, not an error of the step.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        self.steps += 1;
        let mut events = vec![];
        let decoders = self.sched.running.len();
        self.admit(&mut events);
        // Sequences admitted this step already produced their first token.
        if decoders > 0 {
            let single = self.capture_logits
                || self.profile_next
                || self.sched.running.iter().any(|s| s.req.logprobs.is_some());
            let compressing = self.compressor.is_some();
            let k = self.sched.chain_len(single, |s| {
                compressing
                    .then(|| s.compression.steps_to_trigger(s.pending_pos()))
                    .flatten()
            });
            match if k > 1 { self.grow_chain(k) } else { Ok(false) } {
                Ok(true) => self.decode_chain(k, &mut events),
                Ok(false) => {
                    self.grow(&mut events);
                    if !self.sched.running.is_empty() {
                        self.decode(&mut events);
                    }
                }
                // A table the chain could not write: every running
                // sequence fails and returns its pages.
                Err(e) => self.sched.fail_running(&e, &mut self.kv.alloc, &mut events),
            }
        }
        self.note_peak();
        Ok(events)
    }

    pub(super) fn note_peak(&mut self) {
        self.peak_pages = self.peak_pages.max(self.kv.alloc.pages_in_use());
    }

    /// Starts what the scheduler admits, each with its cache: a prefill and
    /// first token, a swap-in, or a replay.
    fn admit(&mut self, events: &mut Vec<Event>) {
        while let Some(mut s) = self.sched.next_admission(&mut self.kv.alloc, events) {
            match self.start(&mut s, events) {
                Ok(Started::Token(token)) => {
                    self.sched.accept(s, token, &mut self.kv.alloc, events)
                }
                Ok(Started::Resumed) => self.sched.running.push(s),
                Ok(Started::OutOfPages) => {
                    self.sched.requeue(s, &mut self.kv.alloc);
                    break;
                }
                Err(e) => self.sched.fail(s, &e, &mut self.kv.alloc, events),
            }
            self.note_peak();
        }
    }

    /// One more slot for every running sequence (the scheduler's growth:
    /// new pages written, preempted sequences swapped out and parked).
    fn grow(&mut self, events: &mut Vec<Event>) {
        let growth = self.sched.grow(&mut self.kv.alloc, events);
        for (id, lane, new) in growth.new_pages {
            if let Err(e) = self.kv.write_pages(self.ctx, lane, &new)
                && let Some(i) = self.sched.running.iter().position(|s| s.id == id)
            {
                let s = self.sched.running.remove(i);
                self.sched.fail(s, &e, &mut self.kv.alloc, events);
            }
        }
        for p in growth.preempted {
            let mut s = p.seq;
            if let Some((tables, lane)) = p.swap_from {
                match self.swap_out(&tables, lane) {
                    Ok(sw) => {
                        log::info!(
                            "request {} preempted: {} pages swapped out ({} bytes on the host)",
                            s.id,
                            tables.pages_in_use(),
                            sw.bytes()
                        );
                        s.parked = Parked::Swapped(Box::new(sw));
                    }
                    Err(e) => {
                        self.sched.fail(s, &e, &mut self.kv.alloc, events);
                        continue;
                    }
                }
            }
            self.sched.park(s);
        }
    }

    /// `k` more slots for every running sequence if the pool holds them all
    /// (else nothing changes: the caller falls back to one step).
    fn grow_chain(&mut self, k: usize) -> Result<bool> {
        let Some(pages) = self.sched.grow_chain(k, &mut self.kv.alloc)? else {
            return Ok(false);
        };
        for (lane, new) in pages {
            self.kv.write_pages(self.ctx, lane, &new)?;
        }
        Ok(true)
    }
}

/// What to tell a user whose request the pool cannot hold, in the flags' words.
fn pool_advice(ctx: &GpuContext, kv: &PagedKv, n_layers: usize) -> String {
    let max_pool = ctx.caps.max_binding_bytes.saturating_mul(n_layers as u64);
    let at_limit =
        kv.usage().bytes_total + kv.layout.page_bytes() as u64 * n_layers as u64 > max_pool;
    if at_limit {
        format!(
            "the pool is at the device's limit ({} MiB: one storage binding per layer); \
             serve fewer sequences, lower --max-context or compress the cache (--kv)",
            max_pool >> 20
        )
    } else {
        "raise --kv-pool-mb".into()
    }
}
