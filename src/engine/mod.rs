//! Generation on top of the model: prompts in, streamed tokens out.

pub mod compressor;
pub mod generate;
pub mod serve;

pub use generate::{GenerateOptions, Generation, StopReason, TextStream, generate};
pub use serve::{Engine, EngineConfig, EngineStats, Event, Exhaustion, Request, RequestId};
