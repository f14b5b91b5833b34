//! kvsift: LLM inference on any GPU through wgpu/WGSL, with a paged KV cache
//! and KV-cache compression passes on the GPU.
//!
//! Read `ARCHITECTURE.md` first. Layers, bottom up:
//! - [`gpu`]: adapter/device choice, buffers, pipelines, dispatches;
//! - [`ops`]: one module per WGSL kernel family: parameters, `encode`, the CPU
//!   twin, and the tests comparing the two.

pub mod engine;
pub mod error;
pub mod gpu;
pub mod kv;
pub mod model;
pub mod ops;
pub mod rng;
#[doc(hidden)]
pub mod testing;

pub use error::{Error, Result};
