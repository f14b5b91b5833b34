//! The engine's decisions, on the host only: which waiting request is
//! admitted (first come first served, while a lane is free and the pool holds
//! its tokens plus every running sequence's next slot), how the running
//! sequences grow by a slot each step, whom a full pool preempts (the
//! latest-arrived other sequence) or fails, how many decode steps one
//! submission may chain, and when a sampled token ends a sequence.
//!
//! It owns the sequences and the lanes, and moves pages only through the
//! [`PageAllocator`] it is handed; what it decides that touches the GPU
//! (new pages' descriptors, a preempted sequence's swap-out) it returns for
//! the engine to carry out. Its unit tests below need no GPU.

use std::collections::{HashMap, VecDeque};

use crate::engine::sequence::{
    Event, NO_LANE, Outcome, Parked, Request, RequestId, Sequence, SequenceReport, StopReason,
};
use crate::error::{Error, Result};
use crate::kv::compression::CompressConfig;
use crate::kv::pool::PageAllocator;
use crate::kv::{NewPage, SeqTables};

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

/// Most positions a sequence may reach (positions are exact in f32 below 2^24).
pub const MAX_CONTEXT: usize = 1 << 24;

/// The fixed facts the scheduler decides with.
#[derive(Clone, Debug)]
pub(crate) struct SchedulerConfig {
    pub lanes: usize,
    pub on_exhaustion: Exhaustion,
    /// Most decode steps one submission may chain.
    pub decode_chain: usize,
    /// Slots one head may hold (`--max-context`).
    pub capacity: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub n_layers: usize,
    /// Stored heads per layer.
    pub n_heads: usize,
    pub page_size: usize,
    /// Bytes of one page (every layer's pages are alike).
    pub page_bytes: u64,
    /// What to tell a user whose request the pool cannot hold.
    pub pool_advice: String,
}

/// A sequence the pool's exhaustion took out of its lane (pages released,
/// lane freed). With `swap_from` the engine copies those pages (still
/// intact: nothing ran since) and the lane's compressor state to the host
/// before the next submission, then parks it; otherwise it is parked already
/// set to be replayed.
pub(crate) struct Preempted {
    pub seq: Sequence,
    pub swap_from: Option<(SeqTables, usize)>,
}

/// New pages of the sequence in a lane.
pub(crate) type LanePages = (usize, Vec<NewPage>);

/// What growing the running sequences by a slot did.
#[derive(Default)]
pub(crate) struct Growth {
    /// New pages per running sequence: `(id, lane, pages)`.
    pub new_pages: Vec<(RequestId, usize, Vec<NewPage>)>,
    pub preempted: Vec<Preempted>,
}

pub(crate) struct Scheduler {
    pub cfg: SchedulerConfig,
    pub running: Vec<Sequence>,
    pub waiting: VecDeque<Sequence>,
    free_lanes: Vec<usize>,
    next_id: RequestId,
    pub preemptions: u64,
    /// What each request that left did, until taken.
    reports: HashMap<RequestId, SequenceReport>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            free_lanes: (0..cfg.lanes).rev().collect(),
            cfg,
            running: vec![],
            waiting: VecDeque::new(),
            next_id: 0,
            preemptions: 0,
            reports: HashMap::new(),
        }
    }

    /// Queues a request (already validated) with its compression and names it.
    pub fn enqueue(&mut self, req: Request, compression: CompressConfig) -> RequestId {
        let id = self.next_id;
        self.next_id += 1;
        let tables = SeqTables::new(self.cfg.n_layers, self.cfg.n_heads, self.cfg.page_size);
        self.waiting
            .push_back(Sequence::new(id, req, tables, compression));
        id
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// A free lane for work outside the queue (scoring an idle engine).
    pub fn take_lane(&mut self) -> Option<usize> {
        self.free_lanes.pop()
    }

    pub fn return_lane(&mut self, lane: usize) {
        self.free_lanes.push(lane);
    }

    /// Takes a request out of the queue or the lanes (it is retired).
    pub fn cancel(&mut self, id: RequestId, alloc: &mut PageAllocator) -> bool {
        let s = if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i)
        } else if let Some(i) = self.running.iter().position(|s| s.id == id) {
            Some(self.running.remove(i))
        } else {
            None
        };
        match s {
            Some(s) => {
                self.retire(s, alloc);
                true
            }
            None => false,
        }
    }

    /// What a request that left did.
    pub fn report(&self, id: RequestId) -> Option<&SequenceReport> {
        self.reports.get(&id)
    }

    /// What a request that left did, forgotten here.
    pub fn take_report(&mut self, id: RequestId) -> Option<SequenceReport> {
        self.reports.remove(&id)
    }

    /// A sequence leaves: what it did is noted, its pages and lane returned.
    pub fn retire(&mut self, mut s: Sequence, alloc: &mut PageAllocator) {
        s.note_peak();
        self.reports.insert(
            s.id,
            SequenceReport {
                slots_per_layer: s.tables.slots_per_layer(),
                slots_per_head: s.tables.slots_per_head(),
                compression_passes: s.passes,
                slots_dropped: s.slots_dropped,
                peak_slots_per_head: s.peak_head_slots,
                peak_kv_pages: s.peak_pages,
                peak_kv_bytes: s.peak_pages as u64 * self.cfg.page_bytes,
            },
        );
        s.tables.release(alloc);
        if s.lane != NO_LANE {
            self.free_lanes.push(s.lane);
        }
    }

    /// A sequence fails with `error` (an event says why) and leaves.
    pub fn fail(
        &mut self,
        s: Sequence,
        error: &Error,
        alloc: &mut PageAllocator,
        events: &mut Vec<Event>,
    ) {
        log::warn!("request {} failed: {error}", s.id);
        events.push(Event::Failed {
            id: s.id,
            error: error.to_string(),
        });
        self.retire(s, alloc);
    }

    /// Fails every running sequence (a decode step that could not run).
    pub fn fail_running(
        &mut self,
        error: &Error,
        alloc: &mut PageAllocator,
        events: &mut Vec<Event>,
    ) {
        for s in std::mem::take(&mut self.running) {
            self.fail(s, error, alloc, events);
        }
    }

    /// Pages one head needs for `len` slots.
    fn pages_for(&self, len: usize) -> usize {
        len.div_ceil(self.cfg.page_size)
    }

    /// Pages per layer a waiting sequence needs to be admitted.
    fn admission_need(&self, s: &Sequence) -> Vec<usize> {
        let prompt = self.pages_for(s.req.prompt.len()) * self.cfg.n_heads;
        match &s.parked {
            Parked::Fresh => vec![prompt; self.cfg.n_layers],
            Parked::Swapped(sw) => (0..self.cfg.n_layers)
                .map(|l| s.tables.pages_needed_for(l, &sw.kv.lens))
                .collect(),
            // The prompt's prefill, then what it held; a replay that still
            // runs short waits again ([`Scheduler::requeue`]).
            Parked::Replay { held } => held.iter().map(|&h| h.max(prompt)).collect(),
        }
    }

    /// The next waiting sequence to start, its lane set: the engine gives it
    /// its cache (prefill, swap-in or replay). None: nobody can start now.
    /// Requests that ask for no token finish here; requests the pool could
    /// not hold even empty fail here.
    pub fn next_admission(
        &mut self,
        alloc: &mut PageAllocator,
        events: &mut Vec<Event>,
    ) -> Option<Sequence> {
        while let Some(front) = self.waiting.front() {
            if front.req.max_tokens == 0 {
                let s = self.waiting.pop_front()?;
                events.push(Event::Finished {
                    id: s.id,
                    reason: StopReason::MaxTokens,
                });
                self.retire(s, alloc);
                continue;
            }
            let need = self.admission_need(front);
            if !alloc.fits_when_empty(|l| need[l]) {
                let s = self.waiting.pop_front()?;
                let total: usize = need.iter().sum();
                let error = Error::invalid(
                    "--kv-pool-mb",
                    format!(
                        "{} tokens need {total} KV pages ({} per layer) but the pool holds {}; {}",
                        s.tokens.len(),
                        need[0],
                        alloc.total_pages(),
                        self.cfg.pool_advice
                    ),
                );
                self.fail(s, &error, alloc, events);
                continue;
            }
            // While others run, admit only with room for everyone's next
            // slot too: a sequence the next step would preempt again only
            // thrashes (swapped in and out without a token).
            let headroom = |l: usize| -> usize {
                if self.running.is_empty() {
                    return 0;
                }
                self.cfg.n_heads
                    + self
                        .running
                        .iter()
                        .map(|s| s.tables.pages_needed(l, 1))
                        .sum::<usize>()
            };
            if self.free_lanes.is_empty() || !alloc.fits(|l| need[l] + headroom(l)) {
                return None;
            }
            let mut s = self.waiting.pop_front()?;
            s.lane = self.free_lanes.pop()?;
            return Some(s);
        }
        None
    }

    /// An admitted sequence that could not start for want of pages (a
    /// replay that ran short) waits again, first in line.
    pub fn requeue(&mut self, mut s: Sequence, alloc: &mut PageAllocator) {
        s.note_peak();
        s.tables.release(alloc);
        self.free_lanes.push(s.lane);
        s.lane = NO_LANE;
        self.waiting.push_front(s);
    }

    /// A preempted sequence waits, first in line, to resume.
    pub fn park(&mut self, s: Sequence) {
        self.waiting.push_front(s);
    }

    /// The error for a sequence the pool cannot grow.
    pub fn exhausted_error(&self, s: &Sequence, alloc: &PageAllocator) -> Error {
        Error::invalid(
            "--kv-pool-mb",
            format!(
                "KV pool exhausted ({} pages in use of {}) after {} tokens; {}{}",
                alloc.pages_in_use(),
                alloc.total_pages(),
                s.tokens.len(),
                self.cfg.pool_advice,
                if self.cfg.on_exhaustion == Exhaustion::Reject {
                    " or use --on-exhaustion swap"
                } else {
                    ""
                }
            ),
        )
    }

    /// One more slot for every running sequence; on exhaustion preempts the
    /// latest-arrived other sequence (swap, recompute) or fails the one that
    /// cannot grow (reject, or nobody else to preempt).
    pub fn grow(&mut self, alloc: &mut PageAllocator, events: &mut Vec<Event>) -> Growth {
        let mut growth = Growth::default();
        let mut i = 0;
        while i < self.running.len() {
            let s = &mut self.running[i];
            match s.tables.append(1, alloc) {
                Ok(new) => {
                    growth.new_pages.push((s.id, s.lane, new));
                    i += 1;
                }
                Err(_) => {
                    let victim = match self.cfg.on_exhaustion {
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
                            let grown = j < i;
                            growth.new_pages.retain(|(id, _, _)| *id != s.id);
                            growth.preempted.push(self.preempt(s, grown, alloc, events));
                            if grown {
                                i -= 1;
                            }
                        }
                        None => {
                            let s = self.running.remove(i);
                            let error = self.exhausted_error(&s, alloc);
                            self.fail(s, &error, alloc, events);
                        }
                    }
                }
            }
        }
        growth
    }

    /// Takes a running sequence out of its lane to wait. `grown`: it already
    /// got this step's slot, which it gives back first.
    fn preempt(
        &mut self,
        mut s: Sequence,
        grown: bool,
        alloc: &mut PageAllocator,
        events: &mut Vec<Event>,
    ) -> Preempted {
        events.push(Event::Preempted { id: s.id });
        self.preemptions += 1;
        if grown {
            for layer in 0..s.tables.n_layers {
                for head in 0..s.tables.n_heads {
                    let len = s.tables.head(layer, head).len;
                    s.tables.truncate(layer, head, len.saturating_sub(1), alloc);
                }
            }
        }
        let swap_from = match self.cfg.on_exhaustion {
            Exhaustion::Swap => Some((s.tables.clone(), s.lane)),
            _ => {
                log::info!(
                    "request {} preempted: {} pages freed, to be replayed ({} tokens)",
                    s.id,
                    s.tables.pages_in_use(),
                    s.tokens.len()
                );
                s.parked = Parked::Replay {
                    held: s.pages_per_layer(),
                };
                None
            }
        };
        s.note_peak();
        s.tables.release(alloc);
        self.free_lanes.push(s.lane);
        s.lane = NO_LANE;
        Preempted { seq: s, swap_from }
    }

    /// `k` more slots for every running sequence if the pool holds them all:
    /// the new pages per lane; None (nothing changed) if it does not.
    pub fn grow_chain(
        &mut self,
        k: usize,
        alloc: &mut PageAllocator,
    ) -> Result<Option<Vec<LanePages>>> {
        let running = &self.running;
        let fits = alloc.fits(|l| {
            running
                .iter()
                .map(|s| s.tables.pages_needed(l, k))
                .sum::<usize>()
        });
        if !fits {
            return Ok(None);
        }
        let mut pages = vec![];
        for s in self.running.iter_mut() {
            // fits() above counted every page.
            let new = s
                .tables
                .append(k, alloc)
                .map_err(|_| Error::invalid("KV pool", "a chain's pages ran out"))?;
            pages.push((s.lane, new));
        }
        Ok(Some(pages))
    }

    /// Decode steps the next submission may chain: at most the configured
    /// chain, no further than any running sequence's token or context limit
    /// or next compression trigger (`steps_to_trigger(pos)`: steps from the
    /// one feeding `pos` to the next that compresses, which must be the
    /// chain's last); 1 while requests wait or when `single` (logits
    /// captured, a step profiled).
    pub fn chain_len(
        &self,
        single: bool,
        steps_to_trigger: impl Fn(&Sequence) -> Option<usize>,
    ) -> usize {
        let mut k = self.cfg.decode_chain;
        if k == 1 || single || !self.waiting.is_empty() {
            return 1;
        }
        for s in &self.running {
            k = k
                .min(s.req.max_tokens.saturating_sub(s.generated))
                .min(self.slots_left(s, 0));
            // The chain's first step feeds the pending token's position.
            if let Some(d) = steps_to_trigger(s) {
                k = k.min(d + 1);
            }
        }
        k.max(1)
    }

    /// Tokens `s` may still take: each needs a slot in every head (the
    /// context, `--max-context`, bounds a head's slots, not the positions:
    /// under a decode-schedule method the heads stay bounded while the
    /// positions run on, up to [`MAX_CONTEXT`]). `ahead`: slots its tables
    /// hold past the last token fed (appended for the rest of a chain).
    fn slots_left(&self, s: &Sequence, ahead: usize) -> usize {
        let held = s.tables.max_len().saturating_sub(ahead);
        let slots = self.cfg.capacity.saturating_sub(held + 1);
        slots.min(MAX_CONTEXT.saturating_sub(s.tokens.len()))
    }

    /// Whether `s` can take no further token.
    fn context_full(&self, s: &Sequence, ahead: usize) -> bool {
        if s.tokens.len() == self.cfg.max_position_embeddings.saturating_add(1) {
            log::warn!(
                "request {} passes the model's max_position_embeddings ({}): positions run on \
                 under compression; what the model makes of them is the model's",
                s.id,
                self.cfg.max_position_embeddings
            );
        }
        self.slots_left(s, ahead) == 0
    }

    /// Appends a sampled token to `s` (a Token event, and Finished when it
    /// ends the sequence); what it did. A token outside the vocabulary is
    /// the sampler's `NO_TOKEN`: the logits were not finite. `ahead`: slots
    /// appended for the chain steps after this one.
    pub fn record(
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

    /// Keeps a sequence running, retires it or fails it, as its outcome says.
    pub fn settle(
        &mut self,
        s: Sequence,
        outcome: Outcome,
        alloc: &mut PageAllocator,
        events: &mut Vec<Event>,
    ) {
        match outcome {
            Outcome::Running => self.running.push(s),
            Outcome::Done => self.retire(s, alloc),
            Outcome::Failed(e) => self.fail(s, &e, alloc, events),
        }
    }

    /// Records a sampled token and settles the sequence.
    pub fn accept(
        &mut self,
        mut s: Sequence,
        token: u32,
        alloc: &mut PageAllocator,
        events: &mut Vec<Event>,
    ) {
        let outcome = self.record(&mut s, token, 0, events);
        self.settle(s, outcome, alloc, events);
    }

    /// Host memory holding swapped-out sequences.
    pub fn swapped_bytes(&self) -> u64 {
        self.waiting
            .iter()
            .map(|s| match &s.parked {
                Parked::Swapped(sw) => sw.bytes() as u64,
                _ => 0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests;
