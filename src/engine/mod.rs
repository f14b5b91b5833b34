//! Generation on top of the model: prompts in, streamed tokens out.

pub mod generate;

pub use generate::{GenerateOptions, Generation, StopReason, TextStream, generate};
