//! The SwiGLU gate of the Llama MLP (`shaders/silu_mul.wgsl`) on the fused
//! gate/up projection: `out[t, i] = silu(gate_up[t, i]) * gate_up[t, dim + i]`,
//! `silu(g) = g / (1 + exp(-g))`.

use bytemuck::{Pod, Zeroable};

use super::ensure;
use super::host_layout;
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
    n_tokens: u32,
    dim: u32,
}

/// `out[t, :] = silu(gate_up[t, ..dim]) * gate_up[t, dim..]` for `n_tokens` rows.
pub fn silu_mul(
    ctx: &GpuContext,
    n_tokens: usize,
    dim: usize,
    gate_up: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    ensure!(
        gate_up.len() >= n_tokens * 2 * dim && out.len() >= n_tokens * dim,
        "silu_mul: [{n_tokens}, {dim}] against gate_up {}, out {}",
        gate_up.len(),
        out.len()
    );
    let pipeline = ctx.pipeline(&SILU_MUL, "silu_mul", &super::wg_constants())?;
    let params = Params {
        n_tokens: u32_of("tokens", n_tokens)?,
        dim: u32_of("dim", dim)?,
    };
    Dispatch::with_params(
        ctx,
        pipeline,
        "kvsift.silu_mul".into(),
        &params,
        &[gate_up.binding(), out.binding()],
        ctx.grid(super::blocks(n_tokens * dim)?),
    )
}

/// CPU twin (f64).
pub fn silu_mul_cpu(gate_up: &[f32], dim: usize) -> Vec<f64> {
    gate_up
        .chunks_exact(2 * dim)
        .flat_map(|row| {
            (0..dim).map(move |i| {
                let g = row[i] as f64;
                g / (1.0 + (-g).exp()) * row[dim + i] as f64
            })
        })
        .collect()
}

/// The structs this module's kernels read (checked against the WGSL in
/// tests/shader_portability.rs).
pub(crate) fn host_layouts() -> Vec<super::HostLayout> {
    vec![host_layout!(Params in [&SILU_MUL] as "Params" { n_tokens, dim })]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, assert_close, gpu};

    #[test]
    fn silu_mul_matches_twin() {
        let Some(ctx) = gpu() else { return };
        for (i, &(tokens, dim)) in [(1, 1), (3, 7), (1, 64), (2, 128), (5, 1000), (9, 4864)]
            .iter()
            .enumerate()
        {
            let mut rng = Rng::new(80 + i as u64);
            let gate_up: Vec<f32> = (0..tokens * 2 * dim).map(|_| 6.0 * rng.normal()).collect();
            let gb = GpuBuffer::from_slice(ctx, "gate_up", &gate_up).unwrap();
            let out = GpuBuffer::<f32>::zeros(ctx, "out", tokens * dim).unwrap();
            let d = silu_mul(ctx, tokens, dim, &gb, &out).unwrap();
            ctx.run("test", &[&d]).unwrap();
            // GPU exp is accurate to a few ulp: 1e-5 relative + 1e-6 absolute.
            assert_close(
                &format!("silu_mul [{tokens}, {dim}]"),
                &out.read(ctx).unwrap(),
                &silu_mul_cpu(&gate_up, dim),
                1e-6,
                1e-5,
            );
        }
    }
}
