//! Row softmax in place (`shaders/softmax.wgsl`), numerically stable.

use bytemuck::{Pod, Zeroable};

use super::ensure;
use super::host_layout;
use super::{NO_FEATURES, REDUCE_SUBGROUP, REDUCE_WORKGROUP, ReducingKernel, SUBGROUPS, u32_of};
use crate::error::Result;
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, Kernel};

const SRC: &str = include_str!("../../shaders/softmax.wgsl");

pub static SOFTMAX: ReducingKernel = ReducingKernel {
    workgroup: Kernel {
        name: "softmax",
        sources: &[REDUCE_WORKGROUP, SRC],
        entries: &["softmax"],
        needs: NO_FEATURES,
    },
    subgroup: Kernel {
        name: "softmax_subgroup",
        sources: &[REDUCE_SUBGROUP, SRC],
        entries: &["softmax"],
        needs: SUBGROUPS,
    },
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    rows: u32,
    n: u32,
}

/// Softmax over each of `rows` rows of `n` values of `x`, in place.
pub fn softmax(ctx: &GpuContext, rows: usize, n: usize, x: &GpuBuffer<f32>) -> Result<Dispatch> {
    softmax_with(ctx, SOFTMAX.pick(ctx), rows, n, x)
}

pub fn softmax_with(
    ctx: &GpuContext,
    kernel: &'static Kernel,
    rows: usize,
    n: usize,
    x: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    ensure!(
        x.len() >= rows * n,
        "softmax: x has {} values, need [{rows}, {n}]",
        x.len()
    );
    let pipeline = ctx.pipeline(kernel, "softmax", &super::wg_constants())?;
    let params = Params {
        rows: u32_of("rows", rows)?,
        n: u32_of("n", n)?,
    };
    Dispatch::with_params(
        ctx,
        pipeline,
        "kvsift.softmax".into(),
        &params,
        &[x.binding()],
        ctx.grid(u32_of("rows", rows)?),
    )
}

/// CPU twin (f64).
pub fn softmax_cpu(x: &[f32], rows: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * n];
    for r in 0..rows {
        let row = &x[r * n..(r + 1) * n];
        let m = row.iter().fold(f64::NEG_INFINITY, |a, v| a.max(*v as f64));
        let s: f64 = row.iter().map(|v| (*v as f64 - m).exp()).sum();
        for i in 0..n {
            out[r * n + i] = (row[i] as f64 - m).exp() / s;
        }
    }
    out
}

/// The structs this module's kernels read (checked against the WGSL in
/// tests/shader_portability.rs).
pub(crate) fn host_layouts() -> Vec<super::HostLayout> {
    vec![host_layout!(Params in [&SOFTMAX.workgroup, &SOFTMAX.subgroup] as "Params" { rows, n })]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, assert_close, gpu};

    #[test]
    fn softmax_matches_twin() {
        let Some(ctx) = gpu() else { return };
        let mut kernels = vec![&SOFTMAX.workgroup];
        if ctx.caps.features.subgroups {
            kernels.push(&SOFTMAX.subgroup);
        }
        for (i, &(rows, n)) in [(1, 1), (3, 7), (2, 64), (4, 128), (5, 1000), (1, 32000)]
            .iter()
            .enumerate()
        {
            let mut rng = Rng::new(100 + i as u64);
            // Large logits check the max subtraction.
            let x: Vec<f32> = (0..rows * n).map(|_| 30.0 * rng.normal()).collect();
            let want = softmax_cpu(&x, rows, n);
            for kernel in &kernels {
                let xb = GpuBuffer::from_slice(ctx, "x", &x).unwrap();
                let d = softmax_with(ctx, kernel, rows, n, &xb).unwrap();
                ctx.run("test", &[&d]).unwrap();
                // exp in f32 on the GPU: 1e-5 relative, 1e-9 absolute for tiny probabilities.
                assert_close(
                    &format!("{} [{rows}, {n}]", kernel.name),
                    &xb.read(ctx).unwrap(),
                    &want,
                    1e-9,
                    1e-5,
                );
            }
        }
    }
}
