//! The serving engine: many sequences over one paged KV pool, advanced
//! together (continuous batching).
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
//!    projections are matmuls over the batch) and reads back one token each.
//!
//! Sequences join and leave between steps. Only sampled tokens are read back.
//!
//! Failures: whatever goes wrong while serving (a GPU error in a prefill, a
//! decode step or a compression pass, non-finite logits) fails the requests
//! it touches with an [`Event::Failed`] and returns their pages and lanes;
//! the engine goes on serving the others. A preempted sequence resumes with
//! exactly the cache it had, so its tokens are those it would have produced
//! without the preemption.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::engine::compressor::{CompressionStats, Compressor, LaneState};
use crate::engine::generate::StopReason;
use crate::error::{Error, Result};
use crate::gpu::buffer::ReadbackSlot;
use crate::gpu::{GpuBuffer, GpuContext, Op};
use crate::kv::compression::{CompressConfig, Method};
use crate::kv::paged::{HostKv, KvShape, PagedKv, PoolConfig, PoolUsage};
use crate::kv::{Exhausted, SeqTables};
use crate::model::config::ModelConfig;
use crate::model::llama::{
    Activations, LlamaWeights, body, check_ids, final_norm, push_lm_head, push_nll_head,
    push_norm_lm_head,
};
use crate::model::runner::{
    MAX_CONTEXT, ScoreOutput, check_score_args, context_capacity, score_targets, set_nll_row,
    too_long,
};
use crate::ops::paged_attention::{
    QkvRows, paged_decode, paged_kv_store, paged_prefill, partials_len, prefill_splits,
};

/// Page splits a prefill chunk's attention uses at most.
const MAX_PREFILL_SPLITS: usize = 16;
/// Most decode steps one submission may chain ([`EngineConfig::decode_chain`]).
pub const MAX_DECODE_CHAIN: usize = 64;
use crate::ops::sample::{NO_TOKEN, Sampler, SamplingParams, mark_seen, seen_words};
use crate::rng::Rng;

/// What to do when a running sequence needs a page and none is free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Exhaustion {
    /// Preempt the latest-arrived other sequence: copy its pages
    /// (and its compressor state) to host memory, free them, and restore
    /// them when it is readmitted (vLLM's swap mode). Exact for every method.
    #[default]
    Swap,
    /// Preempt it by freeing its pages; when readmitted its cache is
    /// replayed from its tokens: the prompt's prefill, then one decode step
    /// per generated token with the compression schedule it had (exact,
    /// costs a step per token).
    Recompute,
    /// Fail the sequence that cannot grow, with a clear error.
    Reject,
}

impl std::str::FromStr for Exhaustion {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "swap" => Ok(Self::Swap),
            // "preempt" is the name recompute had before swap existed.
            "recompute" | "preempt" => Ok(Self::Recompute),
            "reject" => Ok(Self::Reject),
            _ => Err(Error::invalid(
                "--on-exhaustion",
                format!("{s:?}: expected swap, recompute or reject"),
            )),
        }
    }
}

/// Most sequences one engine decodes together.
pub const MAX_LANES: usize = 1024;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Sequences decoded together (lanes).
    pub max_batch: usize,
    /// KV positions per sequence (default: max_position_embeddings, at most 4096).
    pub max_context: Option<usize>,
    /// Tokens per prefill step.
    pub prefill_chunk: usize,
    pub pool: PoolConfig,
    pub on_exhaustion: Exhaustion,
    /// KV compression (method none: full cache).
    pub compression: CompressConfig,
    /// Most decode steps encoded in one submission: each step's sampled
    /// tokens feed the next step's embedding on the GPU, and the host reads
    /// the tokens once per chain (in bursts). 1: a submission and a readback
    /// per token. Chains stop short of a compression trigger, a sequence's
    /// token or context limit, and run only when nobody waits for admission
    /// and the pool holds the whole chain's slots.
    pub decode_chain: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            max_context: None,
            prefill_chunk: 256,
            pool: PoolConfig::default(),
            on_exhaustion: Exhaustion::Swap,
            compression: CompressConfig::new(Method::None, 0),
            decode_chain: 1,
        }
    }
}

/// A generation request.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after any of these (the token is kept).
    pub stop_ids: Vec<u32>,
}

pub type RequestId = u64;

/// What a step reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Token {
        id: RequestId,
        token: u32,
    },
    Finished {
        id: RequestId,
        reason: StopReason,
    },
    /// The pool ran out; this sequence's pages were swapped out (or freed,
    /// to be replayed) and it waits to resume where it stopped.
    Preempted {
        id: RequestId,
    },
    /// The request cannot be served (the message says why); its pages are freed.
    Failed {
        id: RequestId,
        error: String,
    },
    /// The logits the token was drawn from (only with [`Engine::capture_logits`]).
    Logits {
        id: RequestId,
        logits: Vec<f32>,
    },
}

struct Sequence {
    id: RequestId,
    req: Request,
    /// Prompt then generated tokens. While running, the cache holds all but
    /// the last (the pending token the next decode step feeds).
    tokens: Vec<u32>,
    generated: usize,
    /// Its lane while running; `NO_LANE` while it waits.
    lane: usize,
    tables: SeqTables,
    rng: Rng,
    /// Where its cache is while it waits.
    parked: Parked,
}

const NO_LANE: usize = usize::MAX;

/// A waiting sequence's cache.
enum Parked {
    /// Never ran: admission prefills the prompt.
    Fresh,
    /// Swapped out: its pages and compressor state, on the host.
    Swapped(Box<Swapped>),
    /// Freed: admission replays it; `held[l]` pages of layer l it had.
    Replay { held: Vec<usize> },
}

struct Swapped {
    kv: HostKv,
    lane: Option<LaneState>,
}

impl Swapped {
    fn bytes(&self) -> usize {
        self.kv.bytes() + self.lane.as_ref().map_or(0, |l| l.bytes())
    }
}

/// How an admitted sequence started.
enum Started {
    /// A fresh prompt's prefill sampled its first token.
    Token(u32),
    /// A preempted sequence has its cache back; its pending token is next.
    Resumed,
    /// A replay ran out of pages; it waits again.
    OutOfPages,
}

/// What a sampled token did to its sequence.
enum Outcome {
    Running,
    /// It finished (the Finished event carries why).
    Done,
    Failed(Error),
}

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

pub struct Engine<'c> {
    ctx: &'c GpuContext,
    pub cfg: ModelConfig,
    weights: LlamaWeights,
    acts: Activations,
    kv: PagedKv,
    config: EngineConfig,
    capacity: usize,
    running: Vec<Sequence>,
    waiting: VecDeque<Sequence>,
    free_lanes: Vec<usize>,
    sampler: Sampler,
    seen: GpuBuffer<u32>,
    tokens_out: GpuBuffer<u32>,
    partials: GpuBuffer<f32>,
    token_slot: ReadbackSlot,
    /// The decode step for `b` rows (without the token readback).
    decode_plans: HashMap<usize, Vec<Op>>,
    /// `(b, k)`: k chained decode steps of `b` rows, readbacks included.
    chain_plans: HashMap<(usize, usize), Vec<Op>>,
    split_pages: usize,
    n_splits: usize,
    next_id: RequestId,
    steps: u64,
    preemptions: u64,
    peak_pages: usize,
    ids_host: Vec<u32>,
    lanes_host: Vec<u32>,
    pos_host: Vec<u32>,
    capture_logits: bool,
    compressor: Option<Compressor>,
    final_slots: HashMap<RequestId, Vec<usize>>,
    profile_next: bool,
    profile_prefill: bool,
    last_profile: Option<Vec<(String, f64)>>,
    decode_timing: DecodeTiming,
    /// One decode step's body for a single row (replays), built on first use.
    replay_body: Option<Vec<Op>>,
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
    fn record(&mut self, steps: u64, start: Instant, submitted: Instant) {
        self.steps += steps;
        self.submissions += 1;
        self.host += submitted - start;
        self.wait += submitted.elapsed();
    }
}

impl<'c> Engine<'c> {
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
        let compressor = if config.compression.method == Method::None {
            None
        } else {
            Some(Compressor::new(
                ctx,
                config.compression.clone(),
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
            split_pages,
            n_splits,
            free_lanes: (0..config.max_batch).rev().collect(),
            running: vec![],
            waiting: VecDeque::new(),
            next_id: 0,
            steps: 0,
            preemptions: 0,
            peak_pages: 0,
            ids_host: vec![0; rows],
            lanes_host: vec![0; rows],
            pos_host: vec![0; rows],
            capture_logits: false,
            compressor,
            final_slots: HashMap::new(),
            profile_next: false,
            profile_prefill: false,
            last_profile: None,
            decode_timing: DecodeTiming::default(),
            replay_body: None,
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
    /// profiled decode step.
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
        self.final_slots.get(&id).map(|v| v.as_slice())
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

    pub fn weight_bytes(&self) -> u64 {
        self.weights.bytes()
    }

    /// Queues a request; invalid ones are an error right away.
    pub fn add_request(&mut self, req: Request) -> Result<RequestId> {
        if req.prompt.is_empty() {
            return Err(Error::invalid("prompt", "is empty"));
        }
        check_ids(&self.cfg, &req.prompt)?;
        if req.prompt.len() >= self.capacity {
            return Err(too_long(&self.cfg, req.prompt.len() + 1, self.capacity));
        }
        req.sampling.validate()?;
        let id = self.next_id;
        self.next_id += 1;
        let tables = self.kv.new_tables();
        self.waiting.push_back(Sequence {
            id,
            rng: Rng::new(req.sampling.seed),
            tokens: req.prompt.clone(),
            generated: 0,
            lane: NO_LANE,
            tables,
            parked: Parked::Fresh,
            req,
        });
        Ok(id)
    }

    /// Stops a request; its pages return to the pool. False if unknown or done.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            // A waiting sequence holds no pages (a swapped one, host memory).
            if let Some(s) = self.waiting.remove(i) {
                self.retire(s);
            }
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let s = self.running.remove(i);
            self.retire(s);
            return true;
        }
        false
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    pub fn stats(&self) -> EngineStats {
        let mut slots = vec![0; self.cfg.n_layers];
        for s in &self.running {
            for (acc, v) in slots.iter_mut().zip(s.tables.slots_per_layer()) {
                *acc += v;
            }
        }
        EngineStats {
            pool: self.kv.usage(),
            peak_pages_in_use: self.peak_pages,
            running: self.running.len(),
            waiting: self.waiting.len(),
            preemptions: self.preemptions,
            swapped_bytes: self
                .waiting
                .iter()
                .map(|s| match &s.parked {
                    Parked::Swapped(sw) => sw.bytes() as u64,
                    _ => 0,
                })
                .sum(),
            slots_per_layer: slots,
            longest_head: self
                .running
                .iter()
                .map(|s| s.tables.max_len())
                .max()
                .unwrap_or(0),
            compression: self.compressor.as_ref().map(|c| c.stats.clone()),
        }
    }

    /// A sequence leaves: its slots are noted, its pages and lane returned.
    fn retire(&mut self, mut s: Sequence) {
        self.final_slots.insert(s.id, s.tables.slots_per_layer());
        s.tables.release(&mut self.kv.alloc);
        if s.lane != NO_LANE {
            self.free_lanes.push(s.lane);
        }
    }

    /// A sequence fails with `error` (an event says why) and leaves.
    fn fail(&mut self, s: Sequence, error: &Error, events: &mut Vec<Event>) {
        log::warn!("request {} failed: {error}", s.id);
        events.push(Event::Failed {
            id: s.id,
            error: error.to_string(),
        });
        self.retire(s);
    }

    /// Fails every running sequence (a decode step that could not run).
    fn fail_running(&mut self, error: &Error, events: &mut Vec<Event>) {
        for s in std::mem::take(&mut self.running) {
            self.fail(s, error, events);
        }
    }

    /// What to do about a full pool, in the flags' words.
    fn pool_advice(&self) -> String {
        let max_pool = self
            .ctx
            .caps
            .max_binding_bytes
            .saturating_mul(self.cfg.n_layers as u64);
        let at_limit = self.kv.usage().bytes_total
            + self.kv.layout.page_bytes() as u64 * self.cfg.n_layers as u64
            > max_pool;
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

    /// Advances every sequence by one token (admitting and prefilling
    /// waiting ones). What goes wrong with a request is an [`Event::Failed`]
    /// among the events, not an error of the step.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        self.steps += 1;
        let mut events = vec![];
        let decoders = self.running.len();
        self.admit(&mut events);
        // Sequences admitted this step already produced their first token.
        if decoders > 0 {
            let k = self.chain_len();
            match if k > 1 { self.grow_chain(k) } else { Ok(false) } {
                Ok(true) => self.decode_chain(k, &mut events),
                Ok(false) => {
                    self.grow(&mut events);
                    if !self.running.is_empty() {
                        self.decode(&mut events);
                    }
                }
                // A table the chain could not write: every running
                // sequence fails and returns its pages.
                Err(e) => self.fail_running(&e, &mut events),
            }
        }
        self.peak_pages = self.peak_pages.max(self.kv.alloc.pages_in_use());
        Ok(events)
    }

    /// Pages per layer a waiting sequence needs to be admitted.
    fn admission_need(&self, s: &Sequence) -> Vec<usize> {
        let n_layers = self.cfg.n_layers;
        let prompt = self.kv.pages_for(s.req.prompt.len()) * self.kv.n_heads;
        match &s.parked {
            Parked::Fresh => vec![prompt; n_layers],
            Parked::Swapped(sw) => (0..n_layers)
                .map(|l| s.tables.pages_needed_for(l, &sw.kv.lens))
                .collect(),
            // The prompt's prefill, then what it held; a replay that still
            // runs short waits again (Started::OutOfPages).
            Parked::Replay { held } => held.iter().map(|&h| h.max(prompt)).collect(),
        }
    }

    fn admit(&mut self, events: &mut Vec<Event>) {
        while let Some(front) = self.waiting.front() {
            if front.req.max_tokens == 0 {
                // Nothing to generate: done without a prefill (as `generate`).
                if let Some(s) = self.waiting.pop_front() {
                    events.push(Event::Finished {
                        id: s.id,
                        reason: StopReason::MaxTokens,
                    });
                    self.retire(s);
                }
                continue;
            }
            let need = self.admission_need(front);
            if !self.kv.alloc.fits_when_empty(|l| need[l]) {
                let Some(s) = self.waiting.pop_front() else {
                    break;
                };
                let total: usize = need.iter().sum();
                let error = Error::invalid(
                    "--kv-pool-mb",
                    format!(
                        "{} tokens need {total} KV pages ({} per layer) but the pool holds {}; {}",
                        s.tokens.len(),
                        need[0],
                        self.kv.alloc.total_pages(),
                        self.pool_advice()
                    ),
                );
                self.fail(s, &error, events);
                continue;
            }
            // While others run, admit only with room for everyone's next
            // slot too: a sequence the next step would preempt again only
            // thrashes (swapped in and out without a token).
            let headroom = |l: usize| -> usize {
                if self.running.is_empty() {
                    return 0;
                }
                self.kv.n_heads
                    + self
                        .running
                        .iter()
                        .map(|s| s.tables.pages_needed(l, 1))
                        .sum::<usize>()
            };
            if self.free_lanes.is_empty() || !self.kv.alloc.fits(|l| need[l] + headroom(l)) {
                break;
            }
            let (Some(mut s), Some(lane)) = (self.waiting.pop_front(), self.free_lanes.pop())
            else {
                break;
            };
            s.lane = lane;
            match self.start(&mut s, events) {
                Ok(Started::Token(token)) => self.accept(s, token, events),
                Ok(Started::Resumed) => self.running.push(s),
                Ok(Started::OutOfPages) => {
                    s.tables.release(&mut self.kv.alloc);
                    self.free_lanes.push(s.lane);
                    s.lane = NO_LANE;
                    self.waiting.push_front(s);
                    break;
                }
                Err(e) => self.fail(s, &e, events),
            }
            self.peak_pages = self.peak_pages.max(self.kv.alloc.pages_in_use());
        }
    }

    /// Gives an admitted sequence (lane set) its cache: a fresh prompt's
    /// prefill and first token, a swapped-out cache restored, or a replay.
    fn start(&mut self, s: &mut Sequence, events: &mut Vec<Event>) -> Result<Started> {
        if let Some(c) = &self.compressor {
            c.reset_lane(self.ctx, s.lane)?;
        }
        // The lane's repetition-penalty mask starts from the sequence's tokens.
        let words = seen_words(self.cfg.vocab_size);
        let mut mask = vec![0u32; words];
        mark_seen(&mut mask, &s.tokens);
        self.seen.write(self.ctx, s.lane * words, &mask)?;
        match std::mem::replace(&mut s.parked, Parked::Fresh) {
            Parked::Fresh => {
                self.grow_tables(s, s.tokens.len())?;
                let token = self.prefill(s)?;
                if self.capture_logits {
                    let logits = self
                        .acts
                        .logits
                        .read_range(self.ctx, 0, self.cfg.vocab_size)?;
                    events.push(Event::Logits { id: s.id, logits });
                }
                Ok(Started::Token(token))
            }
            Parked::Swapped(sw) => {
                let new = s
                    .tables
                    .grow_to(&sw.kv.lens, &mut self.kv.alloc)
                    .map_err(|_| self.exhausted_error(s))?;
                self.kv.write_pages(self.ctx, s.lane, &new)?;
                self.kv.write_sequence(self.ctx, &s.tables, &sw.kv)?;
                if let (Some(c), Some(state)) = (&self.compressor, &sw.lane) {
                    c.restore_lane(self.ctx, s.lane, state)?;
                }
                log::debug!(
                    "request {} swapped in: {} pages, lane {}",
                    s.id,
                    new.len(),
                    s.lane
                );
                Ok(Started::Resumed)
            }
            Parked::Replay { held } => {
                let t = Instant::now();
                if self.replay(s)? {
                    log::debug!(
                        "request {} replayed: {} tokens in {:.1} ms",
                        s.id,
                        s.tokens.len() - 1,
                        t.elapsed().as_secs_f64() * 1e3
                    );
                    Ok(Started::Resumed)
                } else {
                    s.parked = Parked::Replay { held };
                    Ok(Started::OutOfPages)
                }
            }
        }
    }

    /// `n` more slots for every head of `s` (a new chunk), or an error if
    /// the pool cannot hold them.
    fn grow_tables(&mut self, s: &mut Sequence, n: usize) -> Result<()> {
        let new = s
            .tables
            .append(n, &mut self.kv.alloc)
            .map_err(|_| self.exhausted_error(s))?;
        self.kv.write_pages(self.ctx, s.lane, &new)
    }

    fn exhausted_error(&self, s: &Sequence) -> Error {
        Error::invalid(
            "--kv-pool-mb",
            format!(
                "KV pool exhausted ({} pages in use of {}) after {} tokens; {}{}",
                self.kv.alloc.pages_in_use(),
                self.kv.alloc.total_pages(),
                s.tokens.len(),
                self.pool_advice(),
                if self.config.on_exhaustion == Exhaustion::Reject {
                    " or use --on-exhaustion swap"
                } else {
                    ""
                }
            ),
        )
    }

    /// Runs a sequence's prefill (all its tokens, in chunks; its tables
    /// hold them) and samples the next token.
    fn prefill(&mut self, s: &mut Sequence) -> Result<u32> {
        let total = s.tokens.len();
        self.prefill_chunks(s, total, true)
            .map(|t| t.unwrap_or(NO_TOKEN))
    }

    /// Prefills `s.tokens[..upto]` in chunks (the tables hold them), samples
    /// the next token if `sample`, and compresses after it as the method's
    /// prefill schedule says.
    fn prefill_chunks(
        &mut self,
        s: &mut Sequence,
        upto: usize,
        sample: bool,
    ) -> Result<Option<u32>> {
        let profiled = std::mem::take(&mut self.profile_prefill);
        let mut profile = vec![];
        let chunk = self.config.prefill_chunk;
        let mut token = None;
        for start in (0..upto).step_by(chunk) {
            let n = chunk.min(upto - start);
            let last = start + n == upto;
            for (i, p) in self.pos_host[..n].iter_mut().enumerate() {
                *p = (start + i) as u32;
            }
            self.acts
                .write_inputs(self.ctx, &s.tokens[start..start + n], &self.pos_host[..n])?;
            self.kv.set_row(0, s.lane, &s.tables, Some(start + n));
            self.kv.upload_rows(self.ctx)?;
            if let Some(c) = &self.compressor {
                c.set_lanes(self.ctx, &[s.lane as u32])?;
            }
            let body = self.prefill_ops(n, 0, start + n)?;
            let mut head = vec![];
            if last && sample {
                head.push(final_norm(self.ctx, &self.weights, &self.acts, n - 1, 1)?);
                push_lm_head(&mut head, self.ctx, &self.weights, &self.acts, n - 1, 1)?;
                head.push(
                    self.sampler
                        .dispatch(self.ctx, 1, &self.acts.logits, &self.seen, &self.tokens_out)?
                        .into(),
                );
                head.push(self.token_slot.copy_from(self.tokens_out.raw(), 0, 4)?);
                let u = s.rng.uniform();
                self.sampler
                    .set_rows(self.ctx, [(s.req.sampling, s.lane, u)])?;
            }
            if profiled {
                profile.extend(
                    self.ctx
                        .profile_ops("kvsift.engine.prefill", &[&body, &head])?,
                );
            } else {
                self.ctx.run_ops("kvsift.engine.prefill", &[&body, &head])?;
            }
            if last && sample {
                token = Some(self.token_slot.read::<u32>(self.ctx, 1)?[0]);
            }
        }
        if profiled {
            self.last_profile = Some(profile);
        }
        if self
            .compressor
            .as_ref()
            .is_some_and(|c| c.after_prefill(upto))
        {
            self.compress(s.lane, &mut s.tables)?;
        }
        Ok(token)
    }

    /// Rebuilds a preempted sequence's cache exactly as it was: the prompt's
    /// prefill (same chunks, same compression), then one decode step per
    /// generated token but the pending one, compressing where the decode
    /// schedule did. False if the pool ran out on the way.
    fn replay(&mut self, s: &mut Sequence) -> Result<bool> {
        let prompt = s.req.prompt.len();
        self.grow_tables(s, prompt)?;
        self.prefill_chunks(s, prompt, false)?;
        if self.replay_body.is_none() {
            self.replay_body = Some(self.decode_body(1)?);
        }
        for pos in prompt..s.tokens.len() - 1 {
            match s.tables.append(1, &mut self.kv.alloc) {
                Ok(new) => self.kv.write_pages(self.ctx, s.lane, &new)?,
                Err(Exhausted { .. }) => return Ok(false),
            }
            self.acts
                .write_inputs(self.ctx, &[s.tokens[pos]], &[pos as u32])?;
            self.kv.set_row(0, s.lane, &s.tables, None);
            self.kv.upload_rows(self.ctx)?;
            if let Some(c) = &self.compressor {
                c.set_lanes(self.ctx, &[s.lane as u32])?;
            }
            let body = self.replay_body.as_deref().unwrap_or_default();
            self.ctx.run_ops("kvsift.engine.replay", &[body])?;
            self.compress_after_decode(s, pos)?;
        }
        Ok(true)
    }

    /// Runs the compression pass over the sequence in `lane`.
    fn compress(&mut self, lane: usize, tables: &mut SeqTables) -> Result<()> {
        if let Some(c) = self.compressor.as_mut() {
            c.compress(self.ctx, &mut self.kv, lane, tables)?;
        }
        Ok(())
    }

    /// The body of a prefill chunk of `n` tokens of the sequence in step row
    /// `row`, whose heads hold `len` slots with the chunk.
    fn prefill_ops(&self, n: usize, row: usize, len: usize) -> Result<Vec<Op>> {
        let (ctx, cfg, a) = (self.ctx, &self.cfg, &self.acts);
        let mut attend = |l: usize, ops: &mut Vec<Op>| -> Result<()> {
            let mut kv = self.kv.layer(l);
            kv.desc_base += row * kv.n_heads;
            let q = qkv_rows(cfg, a);
            ops.push(paged_kv_store(ctx, &kv, &q, n, n)?.into());
            let splits = prefill_splits(len, kv.layout.page_size, MAX_PREFILL_SPLITS);
            ops.extend(
                paged_prefill(
                    ctx,
                    &kv,
                    &q,
                    n,
                    self.weights.layers[l].window,
                    splits,
                    &self.partials,
                    &a.attn,
                )?
                .into_iter()
                .map(Op::from),
            );
            if let Some(c) = &self.compressor {
                ops.extend(c.forward_ops(
                    ctx,
                    &kv,
                    &a.positions,
                    &a.qkv,
                    cfg.qkv_dim(),
                    l,
                    n,
                    n,
                    len,
                )?);
            }
            Ok(())
        };
        body(ctx, &self.weights, a, n, &mut attend)
    }

    /// The body of a decode step for `b` rows (one token each, rows set with
    /// `PagedKv::set_row`).
    fn decode_body(&self, b: usize) -> Result<Vec<Op>> {
        let (ctx, cfg, a) = (self.ctx, &self.cfg, &self.acts);
        let mut attend = |l: usize, ops: &mut Vec<Op>| -> Result<()> {
            let kv = self.kv.layer(l);
            let q = qkv_rows(cfg, a);
            ops.push(paged_kv_store(ctx, &kv, &q, b, 1)?.into());
            let window = self.weights.layers[l].window;
            let pair = paged_decode(
                ctx,
                &kv,
                &q,
                b,
                window,
                self.n_splits,
                self.split_pages,
                &self.partials,
                &a.attn,
            )?;
            ops.extend(pair.into_iter().map(Op::from));
            if let Some(c) = &self.compressor {
                ops.extend(c.forward_ops(
                    ctx,
                    &kv,
                    &a.positions,
                    &a.qkv,
                    cfg.qkv_dim(),
                    l,
                    b,
                    1,
                    self.capacity,
                )?);
            }
            Ok(())
        };
        body(ctx, &self.weights, a, b, &mut attend)
    }

    /// Builds (once) the decode step for `b` rows: body, final norm, lm_head
    /// over the batch and sampling into `tokens_out`.
    fn ensure_decode_plan(&mut self, b: usize) -> Result<()> {
        if !self.decode_plans.contains_key(&b) {
            let (ctx, a) = (self.ctx, &self.acts);
            let mut ops = self.decode_body(b)?;
            push_norm_lm_head(&mut ops, ctx, &self.weights, a, b)?;
            ops.push(
                self.sampler
                    .dispatch(ctx, b, &a.logits, &self.seen, &self.tokens_out)?
                    .into(),
            );
            self.decode_plans.insert(b, ops);
        }
        Ok(())
    }

    /// Builds (once) `k` chained decode steps of `b` rows: before step j its
    /// staged positions, RoPE rows, descriptors and sampling rows are copied
    /// in (and, after the first, the previous step's tokens become the ids);
    /// after it, its tokens go to slot j of the readback.
    fn ensure_chain_plan(&mut self, b: usize, k: usize) -> Result<()> {
        self.ensure_decode_plan(b)?;
        if !self.chain_plans.contains_key(&(b, k)) {
            let step = &self.decode_plans[&b];
            let mut ops = Vec::with_capacity(k * (step.len() + 6));
            for j in 0..k {
                if j > 0 {
                    ops.push(self.tokens_out.copy_op(0, &self.acts.ids, 0, b)?);
                }
                self.acts.push_staged(&mut ops, j, b)?;
                ops.push(self.kv.staged_rows_op(j)?);
                ops.push(self.sampler.staged_rows_op(j, b)?);
                ops.extend(step.iter().cloned());
                ops.push(self.token_slot.copy_from_to(
                    self.tokens_out.raw(),
                    0,
                    (b * 4) as u64,
                    (j * b * 4) as u64,
                )?);
            }
            self.chain_plans.insert((b, k), ops);
        }
        Ok(())
    }

    /// One more slot for every running sequence, preempting or failing on exhaustion.
    fn grow(&mut self, events: &mut Vec<Event>) {
        let mut i = 0;
        while i < self.running.len() {
            let lane = self.running[i].lane;
            match self.running[i].tables.append(1, &mut self.kv.alloc) {
                Ok(new) => match self.kv.write_pages(self.ctx, lane, &new) {
                    Ok(()) => i += 1,
                    Err(e) => {
                        let s = self.running.remove(i);
                        self.fail(s, &e, events);
                    }
                },
                Err(Exhausted { .. }) => {
                    let victim = match self.config.on_exhaustion {
                        Exhaustion::Swap | Exhaustion::Recompute if self.running.len() > 1 => {
                            // The latest-arrived other sequence (vLLM's FCFS
                            // rule): a restored early request is not the
                            // next victim, so preemptions do not thrash.
                            (0..self.running.len())
                                .filter(|&j| j != i)
                                .max_by_key(|&j| self.running[j].id)
                        }
                        _ => None,
                    };
                    match victim {
                        Some(j) => {
                            let s = self.running.remove(j);
                            // Rows before i already grew this step.
                            self.preempt(s, j < i, events);
                            if j < i {
                                i -= 1;
                            }
                        }
                        None => {
                            let s = self.running.remove(i);
                            let error = self.exhausted_error(&s);
                            self.fail(s, &error, events);
                        }
                    }
                }
            }
        }
    }

    /// Takes a running sequence out of the pool to wait: its cache goes to
    /// host memory (swap) or is dropped to be replayed (recompute). `grown`:
    /// it already got this step's slot, which it gives back first.
    fn preempt(&mut self, mut s: Sequence, grown: bool, events: &mut Vec<Event>) {
        events.push(Event::Preempted { id: s.id });
        self.preemptions += 1;
        if grown {
            for layer in 0..s.tables.n_layers {
                for head in 0..s.tables.n_heads {
                    let len = s.tables.head(layer, head).len;
                    s.tables
                        .truncate(layer, head, len.saturating_sub(1), &mut self.kv.alloc);
                }
            }
        }
        let pages = s.tables.pages_in_use();
        let parked = match self.config.on_exhaustion {
            Exhaustion::Swap => match self.swap_out(&s) {
                Ok(sw) => {
                    log::info!(
                        "request {} preempted: {pages} pages swapped out ({} bytes on the host)",
                        s.id,
                        sw.bytes()
                    );
                    Parked::Swapped(Box::new(sw))
                }
                Err(e) => return self.fail(s, &e, events),
            },
            _ => {
                log::info!(
                    "request {} preempted: {pages} pages freed, to be replayed ({} tokens)",
                    s.id,
                    s.tokens.len()
                );
                Parked::Replay {
                    held: (0..s.tables.n_layers)
                        .map(|l| {
                            (0..s.tables.n_heads)
                                .map(|h| s.tables.head(l, h).pages.len())
                                .sum()
                        })
                        .collect(),
                }
            }
        };
        s.tables.release(&mut self.kv.alloc);
        self.free_lanes.push(s.lane);
        s.lane = NO_LANE;
        s.parked = parked;
        self.waiting.push_front(s);
    }

    /// Copies a running sequence's pages and compressor state to the host.
    fn swap_out(&self, s: &Sequence) -> Result<Swapped> {
        Ok(Swapped {
            kv: self.kv.read_sequence(self.ctx, &s.tables)?,
            lane: match &self.compressor {
                Some(c) => Some(c.save_lane(self.ctx, s.lane)?),
                None => None,
            },
        })
    }

    /// The GPU half of a decode step for the running sequences: inputs,
    /// one submission, the sampled tokens back (and their logits, when
    /// captured).
    fn decode_tokens(&mut self, events: &mut Vec<Event>) -> Result<Vec<u32>> {
        let start = Instant::now();
        let b = self.running.len();
        for (row, s) in self.running.iter().enumerate() {
            self.ids_host[row] = s.tokens.last().copied().unwrap_or(0);
            self.pos_host[row] = (s.tokens.len() - 1) as u32;
            self.kv.set_row(row, s.lane, &s.tables, None);
        }
        self.kv.upload_rows(self.ctx)?;
        self.set_compressor_lanes()?;
        self.acts
            .write_inputs(self.ctx, &self.ids_host[..b], &self.pos_host[..b])?;
        self.sampler.set_rows(
            self.ctx,
            self.running
                .iter_mut()
                .map(|s| (s.req.sampling, s.lane, s.rng.uniform())),
        )?;
        self.ensure_decode_plan(b)?;
        let profiled = std::mem::take(&mut self.profile_next);
        let readback = [self
            .token_slot
            .copy_from(self.tokens_out.raw(), 0, (b * 4) as u64)?];
        let step = &self.decode_plans[&b];
        if profiled {
            self.last_profile = Some(
                self.ctx
                    .profile_ops("kvsift.engine.decode", &[step, &readback])?,
            );
        } else {
            self.ctx
                .run_ops("kvsift.engine.decode", &[step, &readback])?;
        }
        let submitted = Instant::now();
        let tokens = self.token_slot.read::<u32>(self.ctx, b)?;
        if !profiled {
            self.decode_timing.record(1, start, submitted);
        }
        if self.capture_logits {
            let v = self.cfg.vocab_size;
            let all = self.acts.logits.read_range(self.ctx, 0, b * v)?;
            for (s, row) in self.running.iter().zip(all.chunks_exact(v)) {
                events.push(Event::Logits {
                    id: s.id,
                    logits: row.to_vec(),
                });
            }
        }
        Ok(tokens)
    }

    fn decode(&mut self, events: &mut Vec<Event>) {
        let tokens = match self.decode_tokens(events) {
            Ok(tokens) => tokens,
            Err(e) => return self.fail_running(&e, events),
        };
        for (mut s, token) in std::mem::take(&mut self.running).into_iter().zip(tokens) {
            let pos = s.tokens.len() - 1;
            if let Err(e) = self.compress_after_decode(&mut s, pos) {
                self.fail(s, &e, events);
                continue;
            }
            self.accept(s, token, events);
        }
    }

    /// The decode schedule's compression after the step that fed position `pos`.
    fn compress_after_decode(&mut self, s: &mut Sequence, pos: usize) -> Result<()> {
        if self
            .compressor
            .as_ref()
            .is_some_and(|c| c.after_decode(pos))
        {
            self.compress(s.lane, &mut s.tables)?;
        }
        Ok(())
    }

    /// Records a sampled token; keeps the sequence running or retires it.
    fn accept(&mut self, mut s: Sequence, token: u32, events: &mut Vec<Event>) {
        match self.record(&mut s, token, 0, events) {
            Outcome::Running => self.running.push(s),
            Outcome::Done => self.retire(s),
            Outcome::Failed(e) => self.fail(s, &e, events),
        }
    }

    /// Appends a sampled token to `s` (a Token event, and Finished when it
    /// ends the sequence); what it did. A token outside the vocabulary is
    /// the sampler's `NO_TOKEN`: the logits were not finite. `ahead`: slots
    /// appended for the chain steps after this one.
    fn record(
        &self,
        s: &mut Sequence,
        token: u32,
        ahead: usize,
        events: &mut Vec<Event>,
    ) -> Outcome {
        if token as usize >= self.cfg.vocab_size {
            return Outcome::Failed(Error::NonFiniteLogits {
                at: format!(
                    "request {}, generated token {} (position {})",
                    s.id,
                    s.generated + 1,
                    s.tokens.len()
                ),
            });
        }
        s.tokens.push(token);
        s.generated += 1;
        events.push(Event::Token { id: s.id, token });
        let reason = if s.req.stop_ids.contains(&token) {
            Some(StopReason::Eos)
        } else if s.generated >= s.req.max_tokens {
            Some(StopReason::MaxTokens)
        } else if self.context_full(s, ahead) {
            Some(StopReason::Context)
        } else {
            None
        };
        match reason {
            Some(reason) => {
                events.push(Event::Finished { id: s.id, reason });
                Outcome::Done
            }
            None => Outcome::Running,
        }
    }

    /// Tokens `s` may still take: each needs a slot in every head (the
    /// context, `--max-context`, bounds a head's slots, not the positions:
    /// under a decode-schedule method the heads stay bounded while the
    /// positions run on, up to [`MAX_CONTEXT`]).
    /// `ahead`: slots its tables hold past the last token fed (appended for
    /// the rest of a chain).
    fn slots_left(&self, s: &Sequence, ahead: usize) -> usize {
        let held = s.tables.max_len().saturating_sub(ahead);
        let slots = self.capacity.saturating_sub(held + 1);
        slots.min(MAX_CONTEXT.saturating_sub(s.tokens.len()))
    }

    /// Whether `s` can take no further token.
    fn context_full(&self, s: &Sequence, ahead: usize) -> bool {
        if s.tokens.len() == self.cfg.max_position_embeddings + 1 {
            log::warn!(
                "request {} passes the model's max_position_embeddings ({}): positions run on \
                 under compression; what the model makes of them is the model's",
                s.id,
                self.cfg.max_position_embeddings
            );
        }
        self.slots_left(s, ahead) == 0
    }

    /// Decode steps the next submission may chain: at most the configured
    /// chain, no further than any running sequence's token or context limit
    /// or next compression trigger (which must be the chain's last step);
    /// 1 while requests wait for admission, logits are captured or a step
    /// is profiled.
    fn chain_len(&self) -> usize {
        let mut k = self.config.decode_chain;
        if k == 1 || !self.waiting.is_empty() || self.capture_logits || self.profile_next {
            return 1;
        }
        for s in &self.running {
            k = k
                .min(s.req.max_tokens.saturating_sub(s.generated))
                .min(self.slots_left(s, 0));
            if let Some(c) = &self.compressor {
                // The chain's first step feeds the pending token's position.
                if let Some(d) = c.steps_to_trigger(s.tokens.len() - 1) {
                    k = k.min(d + 1);
                }
            }
        }
        k.max(1)
    }

    /// Tells the compressor which lane each row of the next step belongs to.
    fn set_compressor_lanes(&mut self) -> Result<()> {
        if let Some(c) = &self.compressor {
            for (row, s) in self.running.iter().enumerate() {
                self.lanes_host[row] = s.lane as u32;
            }
            c.set_lanes(self.ctx, &self.lanes_host[..self.running.len()])?;
        }
        Ok(())
    }

    /// `k` more slots for every running sequence if the pool holds them all
    /// (else nothing changes: the caller falls back to one step).
    fn grow_chain(&mut self, k: usize) -> Result<bool> {
        let running = &self.running;
        let fits = self.kv.alloc.fits(|l| {
            running
                .iter()
                .map(|s| s.tables.pages_needed(l, k))
                .sum::<usize>()
        });
        if !fits {
            return Ok(false);
        }
        for s in self.running.iter_mut() {
            // fits() above counted every page.
            let new = s
                .tables
                .append(k, &mut self.kv.alloc)
                .map_err(|_| Error::invalid("KV pool", "a chain's pages ran out"))?;
            self.kv.write_pages(self.ctx, s.lane, &new)?;
        }
        Ok(true)
    }

    /// The GPU half of `k` chained decode steps: staged inputs, one
    /// submission, every step's tokens back (`[step][row]`).
    fn chain_tokens(&mut self, k: usize) -> Result<Vec<u32>> {
        let start = Instant::now();
        let b = self.running.len();
        for (row, s) in self.running.iter().enumerate() {
            self.ids_host[row] = s.tokens.last().copied().unwrap_or(0);
        }
        self.acts.write_ids(self.ctx, &self.ids_host[..b])?;
        for j in 0..k {
            for (row, s) in self.running.iter().enumerate() {
                self.pos_host[row] = (s.tokens.len() - 1 + j) as u32;
                self.kv.set_row_before(row, s.lane, &s.tables, k - 1 - j);
            }
            self.kv.stage_rows(self.ctx, j)?;
            self.acts
                .stage_positions(self.ctx, j, &self.pos_host[..b])?;
            self.sampler.stage_rows(
                self.ctx,
                j,
                self.running
                    .iter_mut()
                    .map(|s| (s.req.sampling, s.lane, s.rng.uniform())),
            )?;
        }
        self.set_compressor_lanes()?;
        self.ensure_chain_plan(b, k)?;
        self.ctx
            .run_ops("kvsift.engine.decode_chain", &[&self.chain_plans[&(b, k)]])?;
        let submitted = Instant::now();
        let tokens = self.token_slot.read::<u32>(self.ctx, k * b)?;
        self.decode_timing.record(k as u64, start, submitted);
        Ok(tokens)
    }

    /// `k` decode steps of every running sequence in one submission (slots
    /// already appended by [`Engine::grow_chain`]): the same tokens as `k`
    /// single steps, read back once.
    fn decode_chain(&mut self, k: usize, events: &mut Vec<Event>) {
        let tokens = match self.chain_tokens(k) {
            Ok(tokens) => tokens,
            Err(e) => return self.fail_running(&e, events),
        };
        let b = self.running.len();
        let mut running = std::mem::take(&mut self.running);
        let mut outcome: Vec<Outcome> = (0..b).map(|_| Outcome::Running).collect();
        for j in 0..k {
            for (row, s) in running.iter_mut().enumerate() {
                if matches!(outcome[row], Outcome::Running) {
                    outcome[row] = self.record(s, tokens[j * b + row], k - 1 - j, events);
                }
            }
        }
        for (mut s, outcome) in running.into_iter().zip(outcome) {
            match outcome {
                Outcome::Done => {
                    self.retire(s);
                    continue;
                }
                Outcome::Failed(e) => {
                    self.fail(s, &e, events);
                    continue;
                }
                Outcome::Running => {}
            }
            // The chain's last step fed the token before the newest: a
            // compression trigger can only fall there.
            let pos = s.tokens.len() - 2;
            if let Err(e) = self.compress_after_decode(&mut s, pos) {
                self.fail(s, &e, events);
                continue;
            }
            self.running.push(s);
        }
    }

    /// Teacher-forced scoring through the paged cache, as [`crate::model::Model::score`]:
    /// the first `prefill` tokens as one prefill (in chunks), then one decode
    /// step per token. Needs an idle engine.
    pub fn score(
        &mut self,
        tokens: &[u32],
        prefill: usize,
        want_logits: bool,
    ) -> Result<ScoreOutput> {
        let t = tokens.len();
        check_score_args(t, prefill)?;
        if self.has_work() {
            return Err(Error::invalid("score", "the engine is serving requests"));
        }
        if t > self.capacity {
            return Err(too_long(&self.cfg, t, self.capacity));
        }
        check_ids(&self.cfg, tokens)?;
        let (v, h) = (self.cfg.vocab_size, self.acts.head_rows);
        let targets = GpuBuffer::from_slice(self.ctx, "score.targets", &score_targets(tokens))?;
        let nll_out = GpuBuffer::<f32>::zeros(self.ctx, "score.nll", t)?;
        let mut logits = want_logits.then(|| Vec::with_capacity(t * v));
        // An idle engine has every lane free.
        let Some(lane) = self.free_lanes.pop() else {
            return Err(Error::invalid("score", "no free lane"));
        };
        let mut tables = self.kv.new_tables();
        let result = (|| -> Result<()> {
            if let Some(c) = &self.compressor {
                c.reset_lane(self.ctx, lane)?;
                c.set_lanes(self.ctx, &[lane as u32])?;
            }
            let grow = |tables: &mut SeqTables,
                        n: usize,
                        kv: &mut PagedKv,
                        ctx: &GpuContext|
             -> Result<()> {
                let new = tables.append(n, &mut kv.alloc).map_err(|_| {
                    Error::invalid(
                        "--kv-pool-mb",
                        format!("the pool cannot hold {t} tokens for scoring"),
                    )
                })?;
                kv.write_pages(ctx, lane, &new)
            };
            for start in (0..prefill).step_by(self.config.prefill_chunk) {
                let n = self.config.prefill_chunk.min(prefill - start);
                grow(&mut tables, n, &mut self.kv, self.ctx)?;
                for (i, p) in self.pos_host[..n].iter_mut().enumerate() {
                    *p = (start + i) as u32;
                }
                self.acts
                    .write_inputs(self.ctx, &tokens[start..start + n], &self.pos_host[..n])?;
                self.kv.set_row(0, lane, &tables, None);
                self.kv.upload_rows(self.ctx)?;
                let body = self.prefill_ops(n, 0, start + n)?;
                let norm = final_norm(self.ctx, &self.weights, &self.acts, 0, n)?;
                self.ctx.run_ops(
                    "kvsift.score.prefill",
                    &[&body, std::slice::from_ref(&norm)],
                )?;
                for r0 in (0..n).step_by(h) {
                    let rows = h.min(n - r0);
                    let mut head = vec![];
                    push_nll_head(
                        &mut head,
                        self.ctx,
                        &self.weights,
                        &self.acts,
                        &targets,
                        &nll_out,
                        r0,
                        rows,
                        start + r0,
                    )?;
                    self.ctx.run_ops("kvsift.score.head", &[&head])?;
                    if let Some(l) = logits.as_mut() {
                        l.extend(self.acts.logits.read_range(self.ctx, 0, rows * v)?);
                    }
                }
            }
            if self
                .compressor
                .as_ref()
                .is_some_and(|c| c.after_prefill(prefill))
            {
                self.compress(lane, &mut tables)?;
            }
            if prefill < t {
                let mut head = vec![final_norm(self.ctx, &self.weights, &self.acts, 0, 1)?];
                push_nll_head(
                    &mut head,
                    self.ctx,
                    &self.weights,
                    &self.acts,
                    &targets,
                    &nll_out,
                    0,
                    1,
                    0,
                )?;
                let body = self.decode_body(1)?;
                for (i, &tok) in tokens[prefill..].iter().enumerate() {
                    let row = prefill + i;
                    grow(&mut tables, 1, &mut self.kv, self.ctx)?;
                    self.acts.write_inputs(self.ctx, &[tok], &[row as u32])?;
                    self.kv.set_row(0, lane, &tables, None);
                    self.kv.upload_rows(self.ctx)?;
                    set_nll_row(self.ctx, &head, v, row)?;
                    self.ctx.run_ops("kvsift.score.decode", &[&body, &head])?;
                    if let Some(l) = logits.as_mut() {
                        l.extend(self.acts.logits.read_range(self.ctx, 0, v)?);
                    }
                    if self
                        .compressor
                        .as_ref()
                        .is_some_and(|c| c.after_decode(row))
                    {
                        self.compress(lane, &mut tables)?;
                    }
                }
            }
            Ok(())
        })();
        self.peak_pages = self.peak_pages.max(self.kv.alloc.pages_in_use());
        tables.release(&mut self.kv.alloc);
        self.free_lanes.push(lane);
        result?;
        let nll = nll_out.read_range(self.ctx, 0, t)?;
        Ok(ScoreOutput {
            nll: nll[..t - 1].to_vec(),
            logits,
        })
    }
}

fn qkv_rows<'a>(cfg: &ModelConfig, a: &'a Activations) -> QkvRows<'a> {
    QkvRows {
        positions: &a.positions,
        qkv: &a.qkv,
        qkv_stride: cfg.qkv_dim(),
        n_q_heads: cfg.n_heads,
        n_kv_heads: cfg.n_kv_heads,
    }
}
