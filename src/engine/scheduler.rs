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
    Event, NO_LANE, Outcome, Parked, Request, RequestId, Sequence, StopReason,
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
    final_slots: HashMap<RequestId, Vec<usize>>,
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
            final_slots: HashMap::new(),
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

    /// KV slots a request held per layer when it left.
    pub fn final_slots(&self, id: RequestId) -> Option<&[usize]> {
        self.final_slots.get(&id).map(|v| v.as_slice())
    }

    /// A sequence leaves: its slots are noted, its pages and lane returned.
    pub fn retire(&mut self, mut s: Sequence, alloc: &mut PageAllocator) {
        self.final_slots.insert(s.id, s.tables.slots_per_layer());
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
mod tests {
    use super::*;
    use crate::engine::sequence::Swapped;
    use crate::kv::paged::HostKv;

    const PAGE: usize = 4;

    use crate::kv::compression::Method;

    fn none() -> CompressConfig {
        CompressConfig::new(Method::None, 0)
    }

    impl Scheduler {
        fn enqueue_plain(&mut self, req: Request) -> RequestId {
            self.enqueue(req, none())
        }
    }

    /// A scheduler over one layer with one stored head, pages of 4 slots.
    fn scheduler(lanes: usize, on_exhaustion: Exhaustion, chain: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            lanes,
            on_exhaustion,
            decode_chain: chain,
            capacity: 64,
            vocab_size: 100,
            max_position_embeddings: 64,
            n_layers: 1,
            n_heads: 1,
            page_size: PAGE,
            pool_advice: "raise --kv-pool-mb".into(),
        })
    }

    fn pool(pages: u32) -> PageAllocator {
        PageAllocator::new(&[pages], 1).unwrap()
    }

    fn request(prompt_len: usize, max_tokens: usize) -> Request {
        Request::greedy((0..prompt_len as u32).collect(), max_tokens)
    }

    /// Admits what can start and "prefills" it on the host: its tables take
    /// the prompt, as the engine's start does.
    fn admit_all(s: &mut Scheduler, alloc: &mut PageAllocator, events: &mut Vec<Event>) {
        while let Some(mut seq) = s.next_admission(alloc, events) {
            let n = seq.tokens.len();
            seq.tables.append(n, alloc).unwrap();
            s.accept(seq, 7, alloc, events);
        }
    }

    fn ids(s: &Scheduler) -> Vec<RequestId> {
        s.running.iter().map(|q| q.id).collect()
    }

    #[test]
    fn admission_is_first_come_first_served_within_the_lanes() {
        let mut s = scheduler(2, Exhaustion::Swap, 1);
        let mut alloc = pool(100);
        let mut ev = vec![];
        for _ in 0..3 {
            s.enqueue_plain(request(5, 10));
        }
        admit_all(&mut s, &mut alloc, &mut ev);
        assert_eq!(ids(&s), [0, 1]);
        assert_eq!(s.waiting.len(), 1);
        // Two lanes, distinct.
        assert_ne!(s.running[0].lane, s.running[1].lane);
        // The first finishes: its lane goes to the third.
        s.cancel(0, &mut alloc);
        admit_all(&mut s, &mut alloc, &mut ev);
        assert_eq!(ids(&s), [1, 2]);
    }

    #[test]
    fn admission_leaves_room_for_the_running_sequences_next_slot() {
        let mut s = scheduler(4, Exhaustion::Swap, 1);
        // 3 pages: request 0 (8 tokens, 2 pages, full) runs; request 1 needs
        // 1 page plus 1 for request 0's next slot plus one of headroom: waits.
        let mut alloc = pool(3);
        let mut ev = vec![];
        s.enqueue_plain(request(8, 10));
        s.enqueue_plain(request(2, 10));
        admit_all(&mut s, &mut alloc, &mut ev);
        assert_eq!(ids(&s), [0]);
        assert_eq!(s.waiting.len(), 1);
        // Alone, the same request would start.
        let mut alone = scheduler(4, Exhaustion::Swap, 1);
        alone.enqueue_plain(request(2, 10));
        admit_all(&mut alone, &mut pool(1), &mut ev);
        assert_eq!(ids(&alone), [0]);
    }

    #[test]
    fn requests_the_empty_pool_cannot_hold_fail_and_zero_token_ones_finish() {
        let mut s = scheduler(2, Exhaustion::Swap, 1);
        let mut alloc = pool(2);
        let mut ev = vec![];
        s.enqueue_plain(request(9, 10)); // 3 pages of 4 > 2
        s.enqueue_plain(request(3, 0));
        s.enqueue_plain(request(3, 10));
        admit_all(&mut s, &mut alloc, &mut ev);
        assert!(
            matches!(&ev[0], Event::Failed { id: 0, error } if error.contains("3 KV pages") && error.contains("--kv-pool-mb")),
            "{ev:?}"
        );
        assert_eq!(
            ev[1],
            Event::Finished {
                id: 1,
                reason: StopReason::MaxTokens
            }
        );
        assert_eq!(ids(&s), [2]);
        assert_eq!(alloc.pages_in_use(), 1);
    }

    #[test]
    fn exhaustion_preempts_the_latest_arrived_other_sequence() {
        for mode in [Exhaustion::Swap, Exhaustion::Recompute] {
            let mut s = scheduler(3, mode, 1);
            let mut alloc = pool(6);
            let mut ev = vec![];
            for _ in 0..3 {
                s.enqueue_plain(request(4, 50));
            }
            admit_all(&mut s, &mut alloc, &mut ev);
            assert_eq!(ids(&s), [0, 1, 2]);
            // Each holds one full page (4 tokens); the first growth takes
            // 3 more pages of the 3 left.
            let g = s.grow(&mut alloc, &mut ev);
            assert!(g.preempted.is_empty());
            assert_eq!(g.new_pages.len(), 3);
            for seq in s.running.iter_mut() {
                seq.tokens.push(1);
                seq.tables.append(3, &mut alloc).unwrap(); // fill the pages: 8 slots
            }
            ev.clear();
            // Sequence 0 needs a page, none free: sequence 2 (latest) goes.
            let g = s.grow(&mut alloc, &mut ev);
            assert_eq!(ev, [Event::Preempted { id: 2 }], "{mode:?}");
            assert_eq!(g.preempted.len(), 1);
            let p = &g.preempted[0];
            assert_eq!(p.seq.id, 2);
            assert_eq!(p.seq.lane, NO_LANE);
            assert_eq!(p.seq.tables.pages_in_use(), 0, "its pages are released");
            match mode {
                // The snapshot still names the 2 pages to copy out.
                Exhaustion::Swap => assert_eq!(p.swap_from.as_ref().unwrap().0.pages_in_use(), 2),
                _ => {
                    assert!(p.swap_from.is_none());
                    assert!(matches!(&p.seq.parked, Parked::Replay { held } if held == &[2]));
                }
            }
            assert_eq!(ids(&s), [0, 1]);
            // Both survivors grew by one slot, on the freed pages.
            assert!(
                s.running.iter().all(|q| q.tables.max_len() == 9),
                "{mode:?}"
            );
            assert_eq!(s.preemptions, 1);
        }
    }

    #[test]
    fn a_victim_that_already_grew_gives_its_slot_back() {
        let mut s = scheduler(2, Exhaustion::Swap, 1);
        let mut alloc = pool(4);
        let mut ev = vec![];
        s.enqueue_plain(request(4, 50)); // id 0
        s.enqueue_plain(request(3, 50)); // id 1
        admit_all(&mut s, &mut alloc, &mut ev);
        assert_eq!(ids(&s), [0, 1]);
        // Put the later arrival first in the rows: it grows (in its page),
        // then the earlier one cannot, and the later one, already grown, is
        // the victim.
        s.running.swap(0, 1);
        for seq in s.running.iter_mut() {
            seq.tokens.push(1);
        }
        s.running[1].tables.append(8, &mut alloc).unwrap(); // id 0: 12 slots, 3 pages
        assert_eq!(alloc.available_for_layer(0), 0);
        ev.clear();
        let g = s.grow(&mut alloc, &mut ev);
        assert_eq!(ev, [Event::Preempted { id: 1 }]);
        let (snapshot, _) = g.preempted[0].swap_from.as_ref().unwrap();
        assert_eq!(snapshot.max_len(), 3, "the grown slot was given back");
        assert_eq!(
            g.new_pages.len(),
            1,
            "only the survivor's pages are written"
        );
        assert_eq!(g.new_pages[0].0, 0);
        assert_eq!(ids(&s), [0]);
        assert_eq!(s.running[0].tables.max_len(), 13);
    }

    #[test]
    fn reject_fails_the_sequence_that_cannot_grow() {
        let mut s = scheduler(2, Exhaustion::Reject, 1);
        let mut alloc = pool(4);
        let mut ev = vec![];
        s.enqueue_plain(request(4, 50));
        s.enqueue_plain(request(3, 50));
        admit_all(&mut s, &mut alloc, &mut ev);
        assert_eq!(ids(&s), [0, 1]);
        s.running[0].tables.append(4, &mut alloc).unwrap(); // 8 slots, 2 pages
        s.running[1].tables.append(5, &mut alloc).unwrap(); // 8 slots, 2 pages
        ev.clear();
        s.grow(&mut alloc, &mut ev);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert!(
            matches!(&ev[0], Event::Failed { id: 0, error } if error.contains("exhausted") && error.contains("--on-exhaustion swap")),
            "{ev:?}"
        );
        // Its pages went to the other, which grew.
        assert_eq!(ids(&s), [1]);
        assert_eq!(s.running[0].tables.max_len(), 9);
        // Alone, swap has nobody to preempt: it fails too.
        let mut s = scheduler(1, Exhaustion::Swap, 1);
        let mut alloc = pool(1);
        s.enqueue_plain(request(4, 50));
        admit_all(&mut s, &mut alloc, &mut ev);
        ev.clear();
        s.grow(&mut alloc, &mut ev);
        assert!(matches!(&ev[0], Event::Failed { id: 0, .. }));
        assert_eq!(
            alloc.pages_in_use(),
            0,
            "a failed sequence returns its pages"
        );
    }

    #[test]
    fn a_swapped_sequence_is_readmitted_first_with_its_own_page_count() {
        let mut s = scheduler(2, Exhaustion::Swap, 1);
        let mut alloc = pool(10);
        let mut ev = vec![];
        s.enqueue_plain(request(2, 50));
        let mut seq = Sequence::new(9, request(2, 50), SeqTables::new(1, 1, PAGE), none());
        seq.parked = Parked::Swapped(Box::new(Swapped {
            kv: HostKv {
                lens: vec![13],
                words: vec![],
            },
            lane: None,
        }));
        s.park(seq);
        assert_eq!(s.admission_need(&s.waiting[0]), [4]);
        let first = s.next_admission(&mut alloc, &mut ev).unwrap();
        assert_eq!(first.id, 9);
    }

    #[test]
    fn tokens_end_a_sequence_at_a_stop_id_max_tokens_or_the_context() {
        let s = scheduler(1, Exhaustion::Swap, 1);
        let mut ev = vec![];
        let mut seq = Sequence::new(0, request(3, 2), SeqTables::new(1, 1, PAGE), none());
        seq.req.stop_ids = vec![42];
        assert!(matches!(
            s.record(&mut seq, 5, 0, &mut ev),
            Outcome::Running
        ));
        assert!(matches!(s.record(&mut seq, 6, 0, &mut ev), Outcome::Done));
        assert_eq!(
            ev.last(),
            Some(&Event::Finished {
                id: 0,
                reason: StopReason::MaxTokens
            })
        );
        let mut seq = Sequence::new(1, request(3, 9), SeqTables::new(1, 1, PAGE), none());
        seq.req.stop_ids = vec![42];
        assert!(matches!(s.record(&mut seq, 42, 0, &mut ev), Outcome::Done));
        assert_eq!(seq.tokens.last(), Some(&42), "the stop token is kept");
        // A head at capacity - 1 slots: the next token has no slot.
        let mut alloc = pool(100);
        let mut seq = Sequence::new(2, request(3, 99), SeqTables::new(1, 1, PAGE), none());
        seq.tables.append(62, &mut alloc).unwrap();
        assert!(matches!(
            s.record(&mut seq, 1, 0, &mut ev),
            Outcome::Running
        ));
        seq.tables.append(1, &mut alloc).unwrap();
        assert!(matches!(s.record(&mut seq, 1, 0, &mut ev), Outcome::Done));
        assert_eq!(
            ev.last(),
            Some(&Event::Finished {
                id: 2,
                reason: StopReason::Context
            })
        );
        // The sampler's NO_TOKEN (non-finite logits) fails it, no Token event.
        let n = ev.len();
        assert!(matches!(
            s.record(&mut seq, u32::MAX, 0, &mut ev),
            Outcome::Failed(Error::NonFiniteLogits { .. })
        ));
        assert_eq!(ev.len(), n);
    }

    #[test]
    fn chains_stop_at_limits_triggers_and_waiting_requests() {
        let mut s = scheduler(4, Exhaustion::Swap, 16);
        let mut alloc = pool(100);
        let mut ev = vec![];
        s.enqueue_plain(request(5, 40));
        s.enqueue_plain(request(5, 6));
        admit_all(&mut s, &mut alloc, &mut ev);
        let none = |_: &Sequence| None;
        // Request 1 has 5 tokens left (one generated at admission).
        assert_eq!(s.chain_len(false, none), 5);
        assert_eq!(s.chain_len(true, none), 1, "capturing or profiling");
        // A trigger 2 steps after the pending token's: the chain ends on it.
        assert_eq!(s.chain_len(false, |_| Some(2)), 3);
        assert_eq!(s.chain_len(false, |_| Some(0)), 1);
        s.enqueue_plain(request(5, 6));
        assert_eq!(s.chain_len(false, none), 1, "someone waits");
        // Growing a chain takes k slots from everyone, or nothing.
        s.waiting.clear();
        let before = alloc.pages_in_use();
        let pages = s.grow_chain(4, &mut alloc).unwrap().unwrap();
        assert_eq!(pages.len(), 2);
        assert!(s.running.iter().all(|q| q.tables.max_len() == 9));
        assert_eq!(alloc.pages_in_use(), before + 2);
        let mut tight = pool(2);
        let mut t = scheduler(2, Exhaustion::Swap, 16);
        t.enqueue_plain(request(4, 40));
        admit_all(&mut t, &mut tight, &mut ev);
        assert!(t.grow_chain(8, &mut tight).unwrap().is_none());
        assert_eq!(t.running[0].tables.max_len(), 4, "nothing changed");
    }
}
