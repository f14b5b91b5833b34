//! One module per WGSL kernel family. Each holds the kernel's parameters
//! (`#[repr(C)]` Pod, mirroring the WGSL `Params`), a constructor that records
//! [`Dispatch`]es, the CPU twin (f64 where it matters), and the tests that run
//! both on seeded random inputs with a stated tolerance.

pub mod add;
pub mod attention;
pub mod compress;
pub mod copy;
pub mod embedding;
pub mod linear;
pub mod nll;
pub mod paged_attention;
pub mod pages;
pub mod quant;
pub mod rmsnorm;
pub mod rope;
pub mod sample;
pub mod silu_mul;
pub mod softmax;

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, Kernel, OptionalFeatures};

/// Workgroup-reduction preludes, joined in front of kernels that reduce
/// across a workgroup (see the kernels' `sources`). Both define `Lane`, `workgroup_sum{,4}`, `workgroup_max`.
pub(crate) const REDUCE_WORKGROUP: &str = include_str!("../../shaders/reduce_workgroup.wgsl");
pub(crate) const REDUCE_SUBGROUP: &str = include_str!("../../shaders/reduce_subgroup.wgsl");

pub(crate) const NO_FEATURES: OptionalFeatures = OptionalFeatures::NONE;
pub(crate) const SUBGROUPS: OptionalFeatures = OptionalFeatures {
    shader_f16: false,
    subgroups: true,
    timestamps: false,
};

/// Workgroup size of the 1-D kernels (a power of two; WebGPU guarantees 256).
pub const WG: u32 = 256;

/// A kernel that reduces across a workgroup, in its two variants.
pub struct ReducingKernel {
    pub workgroup: Kernel,
    pub subgroup: Kernel,
}

impl ReducingKernel {
    /// The subgroup variant when the device has subgroups that fit in a
    /// workgroup, else the portable one.
    pub fn pick(&'static self, ctx: &GpuContext) -> &'static Kernel {
        let caps = &ctx.caps;
        if caps.features.subgroups && caps.subgroup_max_size <= WG {
            &self.subgroup
        } else {
            &self.workgroup
        }
    }
}

/// Every kernel, for the portability test and `kvsift info`.
pub fn all_kernels() -> Vec<&'static Kernel> {
    vec![
        &linear::MATVEC.workgroup,
        &linear::MATVEC.subgroup,
        &linear::MATVEC_ROWS,
        &linear::MATVEC_VEC4,
        &linear::MATMUL,
        &quant::MATVEC_QUANT.workgroup,
        &quant::MATVEC_QUANT.subgroup,
        &quant::MATVEC_QUANT_ROWS,
        &rmsnorm::RMSNORM.workgroup,
        &rmsnorm::RMSNORM.subgroup,
        &softmax::SOFTMAX.workgroup,
        &softmax::SOFTMAX.subgroup,
        &paged_attention::PAGED_KV_STORE,
        &paged_attention::PAGED_ATTENTION,
        &compress::COMPRESS,
        &copy::COPY,
        &rope::ROPE,
        &silu_mul::SILU_MUL,
        &add::ADD,
        &embedding::EMBEDDING,
        &sample::SAMPLE.workgroup,
        &sample::SAMPLE.subgroup,
        &nll::NLL.workgroup,
        &nll::NLL.subgroup,
    ]
}

/// Constants every 1-D kernel gets.
pub(crate) fn wg_constants() -> [(&'static str, f64); 1] {
    [("WG", WG as f64)]
}

/// Workgroups needed to cover `n` invocations with `WG` per workgroup.
pub(crate) fn blocks(n: usize) -> Result<u32> {
    u32_of("workgroups", n.div_ceil(WG as usize))
}

/// `usize` to the `u32` a WGSL parameter holds; larger sizes are a programming error.
pub(crate) fn u32_of(what: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| {
        Error::invalid(
            "kernel parameter",
            format!("{what} = {n} does not fit the kernels' 32-bit sizes"),
        )
    })
}

/// Fails with [`Error::InvalidArgument`] unless `cond` holds: the shapes
/// and buffers an op records come from its caller, who may get them wrong.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::error::Error::invalid(
                "kernel arguments",
                format!($($fmt)+),
            ));
        }
    };
}
pub(crate) use ensure;

/// A `#[repr(C)]` struct that kernels read as a WGSL struct: its size and
/// its fields' offsets by name. `tests/shader_portability.rs` checks each
/// against the WGSL struct's layout as naga computes it, so the two sides of
/// the protocol cannot drift apart unnoticed.
#[doc(hidden)]
pub struct HostLayout {
    pub rust: &'static str,
    /// Kernels whose source declares the struct.
    pub kernels: Vec<&'static Kernel>,
    /// The WGSL struct's name.
    pub wgsl: &'static str,
    pub size: usize,
    pub fields: Vec<(&'static str, usize)>,
}

/// `host_layout!(Type in [&KERNEL, ...] as "WgslName" { field, ... })`.
macro_rules! host_layout {
    ($ty:ident in [$($k:expr),+ $(,)?] as $wgsl:literal { $($f:ident),* $(,)? }) => {
        $crate::ops::HostLayout {
            rust: stringify!($ty),
            kernels: vec![$($k),+],
            wgsl: $wgsl,
            size: std::mem::size_of::<$ty>(),
            fields: vec![$((stringify!($f), std::mem::offset_of!($ty, $f))),*],
        }
    };
}
pub(crate) use host_layout;

/// Every struct shared between Rust and WGSL (for the layout test).
#[doc(hidden)]
pub fn host_layouts() -> Vec<HostLayout> {
    [
        add::host_layouts(),
        compress::host_layouts(),
        copy::host_layouts(),
        embedding::host_layouts(),
        linear::host_layouts(),
        nll::host_layouts(),
        paged_attention::host_layouts(),
        rmsnorm::host_layouts(),
        rope::host_layouts(),
        sample::host_layouts(),
        silu_mul::host_layouts(),
        softmax::host_layouts(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_past_the_kernels_range_are_errors() {
        assert_eq!(super::u32_of("n", 7).unwrap(), 7);
        let e = super::u32_of("rows", usize::MAX).unwrap_err().to_string();
        assert!(e.contains("rows") && e.contains("32-bit"), "{e}");
        assert!(super::blocks(usize::MAX).is_err());
    }
}
