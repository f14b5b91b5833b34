//! The SwiGLU gate of the Llama MLP (`shaders/silu_mul.wgsl`):
//! `out = silu(gate) * up`, `silu(g) = g / (1 + exp(-g))`.

use bytemuck::{Pod, Zeroable};

use super::{NO_FEATURES, u32_of};
use crate::error::Result;
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, Kernel};

pub static SILU_MUL: Kernel = Kernel {
    name: "silu_mul",
    sources: &[include_str!("../../shaders/silu_mul.wgsl")],
    entries: &["silu_mul"],
    needs: NO_FEATURES,
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
}

/// `out[i] = silu(gate[i]) * up[i]` for `i < n`.
pub fn silu_mul(
    ctx: &GpuContext,
    n: usize,
    gate: &GpuBuffer<f32>,
    up: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    assert!(
        gate.len() >= n && up.len() >= n && out.len() >= n,
        "silu_mul: n {n}, gate {}, up {}, out {}",
        gate.len(),
        up.len(),
        out.len()
    );
    let pipeline = ctx.pipeline(&SILU_MUL, "silu_mul", &super::wg_constants())?;
    let uniform = ctx.uniform("kvsift.silu_mul", &Params { n: u32_of("n", n) })?;
    Dispatch::new(
        ctx,
        pipeline,
        "kvsift.silu_mul".into(),
        &[
            uniform.as_entire_binding(),
            gate.binding(),
            up.binding(),
            out.binding(),
        ],
        ctx.grid(super::blocks(n)),
    )
}

/// CPU twin (f64).
pub fn silu_mul_cpu(gate: &[f32], up: &[f32]) -> Vec<f64> {
    gate.iter()
        .zip(up)
        .map(|(g, u)| {
            let g = *g as f64;
            g / (1.0 + (-g).exp()) * *u as f64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, assert_close, gpu};

    #[test]
    fn silu_mul_matches_twin() {
        let Some(ctx) = gpu() else { return };
        for (i, n) in [1usize, 7, 64, 128, 256, 1000, 64 * 1024 + 3]
            .into_iter()
            .enumerate()
        {
            let mut rng = Rng::new(80 + i as u64);
            let gate: Vec<f32> = (0..n).map(|_| 6.0 * rng.normal()).collect();
            let up = rng.normals(n);
            let (gb, ub) = (
                GpuBuffer::from_slice(ctx, "gate", &gate).unwrap(),
                GpuBuffer::from_slice(ctx, "up", &up).unwrap(),
            );
            let out = GpuBuffer::<f32>::zeros(ctx, "out", n).unwrap();
            let d = silu_mul(ctx, n, &gb, &ub, &out).unwrap();
            ctx.run("test", &[&d]).unwrap();
            // GPU exp is accurate to a few ulp: 1e-5 relative + 1e-6 absolute.
            assert_close(
                &format!("silu_mul n={n}"),
                &out.read(ctx).unwrap(),
                &silu_mul_cpu(&gate, &up),
                1e-6,
                1e-5,
            );
        }
    }
}
