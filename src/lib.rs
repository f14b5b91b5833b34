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

/// Every kernel: the ops' and those the compression methods bring (for the
/// portability tests).
pub fn kernels() -> Vec<&'static gpu::Kernel> {
    let mut all = ops::all_kernels();
    all.extend(
        kv::compression::Method::ALL
            .iter()
            .flat_map(|m| m.policy().kernels()),
    );
    all
}

/// Every parameter struct shared between Rust and WGSL, the methods' too
/// (for the layout test).
#[doc(hidden)]
pub fn host_layouts() -> Vec<ops::HostLayout> {
    let mut all = ops::host_layouts();
    all.extend(
        kv::compression::Method::ALL
            .iter()
            .flat_map(|m| m.policy().host_layouts()),
    );
    all
}
