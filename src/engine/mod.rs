//! Generation on top of the model: requests in, events out.
//!
//! - `sequence`: a request's data (`Request`, `Event`, per-sequence state);
//! - `scheduler`: host-only decisions (admission, growth, preemption,
//!   chaining, stopping), unit-tested without a GPU;
//! - `plans`: the op lists of a prefill chunk, a decode step, a chain;
//! - `executor`: submits them, reads tokens back, swaps, replays, compresses;
//! - `config`: [`EngineConfig`], [`EngineBuilder`], the context rules;
//! - `serve`: the [`Engine`] that ties them together, and its public API;
//! - `service`: the engine on a thread of its own, fed through a channel
//!   (the server, the C API);
//! - `score`: teacher-forced scoring; `compressor`: the forward's records
//!   and the compression pass of one sequence.

pub mod compressor;
pub mod config;
mod executor;
mod plans;
pub mod scheduler;
mod score;
pub mod sequence;
pub mod serve;
pub mod service;

pub use config::{EngineBuilder, EngineConfig};
pub use scheduler::Exhaustion;
pub use score::ScoreOutput;
pub use sequence::{
    Event, MAX_TOP_LOGPROBS, Request, RequestId, SequenceReport, StopReason, TokenLogprobs,
};
pub use serve::{DecodeTiming, Engine, EngineStats};
