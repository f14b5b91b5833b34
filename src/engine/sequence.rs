//! A request's life in the engine, as plain data: what the user asked
//! ([`Request`]), what the engine reports ([`Event`]), and the per-sequence
//! state the scheduler moves between the waiting queue and the lanes
//! ([`Sequence`], [`Parked`]). No GPU code.

use crate::engine::compressor::LaneState;
use crate::kv::SeqTables;
use crate::kv::compression::CompressConfig;
use crate::kv::paged::HostKv;
use crate::ops::sample::SamplingParams;
use crate::rng::Rng;

/// A generation request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Token ids of the prompt (at least one, each below the vocabulary size).
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (0: the request finishes at once).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after any of these (the token is kept).
    pub stop_ids: Vec<u32>,
    /// Its own KV compression (None: the engine's). It must fit the
    /// engine: the same stored heads per KV head, and a method that scores
    /// from what the engine's forward records (see
    /// [`crate::engine::Engine::add_request`]).
    pub compression: Option<CompressConfig>,
    /// Also report each sampled token's log-probability and this many of
    /// the most likely tokens ([`Event::Logprobs`], at most
    /// [`MAX_TOP_LOGPROBS`]); None: no logprobs (no readback).
    pub logprobs: Option<usize>,
}

/// Most alternatives [`Request::logprobs`] may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Request {
    /// A greedy request for `max_tokens` tokens, no stop tokens.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop_ids: vec![],
            compression: None,
            logprobs: None,
        }
    }
}

/// Names a request in the events; ids count up from 0 in arrival order.
pub type RequestId = u64;

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// It produced one of its stop tokens.
    Eos,
    MaxTokens,
    /// The KV cache is full.
    Context,
    /// The caller stopped it.
    Cancelled,
}

impl StopReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::MaxTokens => "max_tokens",
            StopReason::Context => "context_full",
            StopReason::Cancelled => "cancelled",
        }
    }
}

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
    /// The logits the token was drawn from (only with
    /// [`crate::engine::Engine::capture_logits`]).
    Logits {
        id: RequestId,
        logits: Vec<f32>,
    },
    /// The sampled token's log-probability and the most likely tokens
    /// (only for a request with [`Request::logprobs`]); it comes just before
    /// the [`Event::Token`] it describes.
    Logprobs {
        id: RequestId,
        logprobs: TokenLogprobs,
    },
}

impl Event {
    /// The request the event belongs to.
    pub fn id(&self) -> RequestId {
        match self {
            Event::Token { id, .. }
            | Event::Finished { id, .. }
            | Event::Preempted { id }
            | Event::Failed { id, .. }
            | Event::Logits { id, .. }
            | Event::Logprobs { id, .. } => *id,
        }
    }

    /// Whether it is the request's last event (`Finished` or `Failed`).
    pub fn ends_request(&self) -> bool {
        matches!(self, Event::Finished { .. } | Event::Failed { .. })
    }
}

/// Log-probabilities under the model's distribution: the log-softmax of the
/// raw logits, before temperature, penalties and truncation (what vLLM and
/// OpenAI report), so they do not depend on the sampling settings.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// The most likely tokens, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// From one row of logits: `token`'s log-probability and the `top` most
    /// likely (log-sum-exp in f64).
    pub fn from_logits(logits: &[f32], token: u32, top: usize) -> Self {
        let max = logits
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
        let lse = max + sum.ln();
        let lp = |i: usize| (logits[i] as f64 - lse) as f32;
        let mut order: Vec<usize> = (0..logits.len()).collect();
        let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        let k = top.min(order.len());
        if k > 0 && k < order.len() {
            order.select_nth_unstable_by(k - 1, by_logit);
        }
        order.truncate(k);
        order.sort_by(by_logit);
        Self {
            token,
            logprob: logits
                .get(token as usize)
                .map_or(f32::NEG_INFINITY, |_| lp(token as usize)),
            top: order.into_iter().map(|i| (i as u32, lp(i))).collect(),
        }
    }
}

/// What the engine did with one request, kept when it leaves
/// ([`crate::engine::Engine::report`]).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SequenceReport {
    /// KV slots it held per layer when it left (summed over heads).
    pub slots_per_layer: Vec<usize>,
    /// KV slots each stored head held when it left, `[layer][head]`.
    pub slots_per_head: Vec<Vec<usize>>,
    /// Compression passes over its cache.
    pub compression_passes: u64,
    /// Slots those passes dropped (summed over layers and heads).
    pub slots_dropped: u64,
    /// Most slots one of its heads held at once (before a compression pass
    /// cut it, or when it left).
    pub peak_slots_per_head: usize,
    /// Most pool pages it held at once, and their bytes.
    pub peak_kv_pages: usize,
    pub peak_kv_bytes: u64,
}

/// One request inside the engine.
pub(crate) struct Sequence {
    pub id: RequestId,
    pub req: Request,
    /// Prompt then generated tokens. While running, the cache holds all but
    /// the last (the pending token the next decode step feeds).
    pub tokens: Vec<u32>,
    pub generated: usize,
    /// Its lane while running; `NO_LANE` while it waits.
    pub lane: usize,
    pub tables: SeqTables,
    pub rng: Rng,
    /// Where its cache is while it waits.
    pub parked: Parked,
    /// How its cache is compressed (the request's or the engine's).
    pub compression: CompressConfig,
    /// Compression passes over its cache and the slots they dropped.
    pub passes: u64,
    pub slots_dropped: u64,
    /// Most pages it held at once (noted before each pass and at the end).
    pub peak_pages: usize,
    /// Most slots one head held (see `SequenceReport::peak_slots_per_head`).
    pub peak_head_slots: usize,
}

pub(crate) const NO_LANE: usize = usize::MAX;

impl Sequence {
    pub fn new(
        id: RequestId,
        req: Request,
        tables: SeqTables,
        compression: CompressConfig,
    ) -> Self {
        Self {
            compression,
            id,
            rng: Rng::new(req.sampling.seed),
            tokens: req.prompt.clone(),
            generated: 0,
            lane: NO_LANE,
            tables,
            parked: Parked::Fresh,
            req,
            passes: 0,
            slots_dropped: 0,
            peak_pages: 0,
            peak_head_slots: 0,
        }
    }

    /// Notes the pages it holds now toward its peak.
    pub fn note_peak(&mut self) {
        self.peak_pages = self.peak_pages.max(self.tables.pages_in_use());
        self.peak_head_slots = self.peak_head_slots.max(self.tables.max_head_len());
    }

    /// Position of the pending token (the next decode step feeds it).
    pub fn pending_pos(&self) -> usize {
        self.tokens.len() - 1
    }

    /// Pages the sequence holds per layer (summed over heads).
    pub fn pages_per_layer(&self) -> Vec<usize> {
        (0..self.tables.n_layers)
            .map(|l| {
                (0..self.tables.n_heads)
                    .map(|h| self.tables.head(l, h).pages.len())
                    .sum()
            })
            .collect()
    }
}

/// A waiting sequence's cache.
pub(crate) enum Parked {
    /// Never ran: admission prefills the prompt.
    Fresh,
    /// Swapped out: its pages and compressor state, on the host.
    Swapped(Box<Swapped>),
    /// Freed: admission replays it; `held[l]` pages of layer l it had.
    Replay { held: Vec<usize> },
}

pub(crate) struct Swapped {
    pub kv: HostKv,
    pub lane: Option<LaneState>,
}

impl Swapped {
    pub fn bytes(&self) -> usize {
        self.kv.bytes() + self.lane.as_ref().map_or(0, |l| l.bytes())
    }
}

/// What a sampled token did to its sequence.
pub(crate) enum Outcome {
    Running,
    /// It finished (the Finished event carries why).
    Done,
    Failed(crate::error::Error),
}

#[cfg(test)]
mod tests {
    use super::TokenLogprobs;

    #[test]
    fn logprobs_are_the_log_softmax_with_the_most_likely_first() {
        // Probabilities 0.1, 0.2, 0.3, 0.4 (logits shifted: softmax does not care).
        let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .map(|p| p.ln() + 7.0)
            .collect();
        let lp = TokenLogprobs::from_logits(&logits, 2, 2);
        assert!((lp.logprob - 0.3f32.ln()).abs() < 1e-6, "{lp:?}");
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [3, 2]);
        assert!((lp.top[0].1 - 0.4f32.ln()).abs() < 1e-6);
        // Ties go to the lower id; asking for more than the vocabulary gives it all.
        let tied = TokenLogprobs::from_logits(&[0.5, 1.0, 1.0, f32::NEG_INFINITY], 3, 9);
        assert_eq!(
            tied.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            [1, 2, 0, 3]
        );
        assert_eq!(tied.logprob, f32::NEG_INFINITY);
        assert!(TokenLogprobs::from_logits(&[0.0; 5], 0, 0).top.is_empty());
        let sum: f64 = tied.top.iter().map(|t| (t.1 as f64).exp()).sum();
        assert!((sum - 1.0).abs() < 1e-6, "{sum}");
    }
}
