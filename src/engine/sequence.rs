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
}

impl Request {
    /// A greedy request for `max_tokens` tokens, no stop tokens.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop_ids: vec![],
            compression: None,
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
        }
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
