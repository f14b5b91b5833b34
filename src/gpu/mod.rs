//! The GPU layer: adapter and device ([`GpuContext`]), typed buffers, weight
//! matrices that respect binding limits, and the kernel/pipeline machinery.

pub mod buffer;
pub mod context;
pub mod matrix;
pub mod pipeline;

pub use buffer::{GpuBuffer, StagedInput};
pub use context::{DeviceCaps, GpuContext, GpuOptions, OptionalFeatures};
pub use matrix::{GpuMatrix, QuantFormat, Segment, WeightDtype};
pub use pipeline::{BufferCopy, Dispatch, Kernel, Op};
