//! RMSNorm (`shaders/rmsnorm.wgsl`), plain and fused with the residual add:
//! `out = w * (x / sqrt(mean(x^2) + eps))`, as Hugging Face's `LlamaRMSNorm`
//! (also Qwen3's per-head q/k norm, with rows = tokens x heads).

use bytemuck::{Pod, Zeroable};

use super::{NO_FEATURES, REDUCE_SUBGROUP, REDUCE_WORKGROUP, ReducingKernel, SUBGROUPS, u32_of};
use crate::error::Result;
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, Kernel};

const SRC: &str = include_str!("../../shaders/rmsnorm.wgsl");

pub static RMSNORM: ReducingKernel = ReducingKernel {
    workgroup: Kernel {
        name: "rmsnorm",
        sources: &[REDUCE_WORKGROUP, SRC],
        entries: &["rmsnorm", "add_rmsnorm"],
        needs: NO_FEATURES,
    },
    subgroup: Kernel {
        name: "rmsnorm_subgroup",
        sources: &[REDUCE_SUBGROUP, SRC],
        entries: &["rmsnorm", "add_rmsnorm"],
        needs: SUBGROUPS,
    },
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    rows: u32,
    dim: u32,
    eps: f32,
}

/// Shape of one normalisation: `rows` rows of `dim` values.
#[derive(Clone, Copy, Debug)]
pub struct NormShape {
    pub rows: usize,
    pub dim: usize,
    pub eps: f32,
}

fn check(kernel: &str, s: NormShape, bufs: &[(&str, usize)], w: &GpuBuffer<f32>) {
    assert_eq!(w.len(), s.dim, "{kernel}: weight length vs dim {}", s.dim);
    for (name, len) in bufs {
        assert!(
            *len >= s.rows * s.dim,
            "{kernel}: {name} has {len} values, need [{}, {}]",
            s.rows,
            s.dim
        );
    }
}

fn build(
    ctx: &GpuContext,
    kernel: &'static Kernel,
    entry: &str,
    s: NormShape,
    resources: Vec<wgpu::BindingResource<'_>>,
) -> Result<Dispatch> {
    let pipeline = ctx.pipeline(kernel, entry, &super::wg_constants())?;
    let params = Params {
        rows: u32_of("rows", s.rows),
        dim: u32_of("dim", s.dim),
        eps: s.eps,
    };
    let label = format!("kvsift.{entry}");
    let uniform = ctx.uniform(&label, &params)?;
    let mut all = vec![uniform.as_entire_binding()];
    all.extend(resources);
    Dispatch::new(ctx, pipeline, label, &all, ctx.grid(u32_of("rows", s.rows)))
}

/// `out = rmsnorm(x) * w`.
pub fn rmsnorm(
    ctx: &GpuContext,
    s: NormShape,
    x: &GpuBuffer<f32>,
    w: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    rmsnorm_with(ctx, RMSNORM.pick(ctx), s, x, w, out)
}

pub fn rmsnorm_with(
    ctx: &GpuContext,
    kernel: &'static Kernel,
    s: NormShape,
    x: &GpuBuffer<f32>,
    w: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    check("rmsnorm", s, &[("x", x.len()), ("out", out.len())], w);
    build(
        ctx,
        kernel,
        "rmsnorm",
        s,
        vec![x.binding(), w.binding(), out.binding()],
    )
}

/// `residual += delta; out = rmsnorm(residual) * w`.
pub fn add_rmsnorm(
    ctx: &GpuContext,
    s: NormShape,
    delta: &GpuBuffer<f32>,
    residual: &GpuBuffer<f32>,
    w: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    add_rmsnorm_with(ctx, RMSNORM.pick(ctx), s, delta, residual, w, out)
}

pub fn add_rmsnorm_with(
    ctx: &GpuContext,
    kernel: &'static Kernel,
    s: NormShape,
    delta: &GpuBuffer<f32>,
    residual: &GpuBuffer<f32>,
    w: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    check(
        "add_rmsnorm",
        s,
        &[
            ("delta", delta.len()),
            ("residual", residual.len()),
            ("out", out.len()),
        ],
        w,
    );
    build(
        ctx,
        kernel,
        "add_rmsnorm",
        s,
        vec![
            delta.binding(),
            w.binding(),
            out.binding(),
            residual.binding(),
        ],
    )
}

/// CPU twin (f64): normalises each row of `x` in place into `out`.
pub fn rmsnorm_cpu(s: NormShape, x: &[f64], w: &[f32], out: &mut [f64]) {
    for r in 0..s.rows {
        let row = &x[r * s.dim..(r + 1) * s.dim];
        let ms = row.iter().map(|v| v * v).sum::<f64>() / s.dim as f64;
        let scale = 1.0 / (ms + s.eps as f64).sqrt();
        for i in 0..s.dim {
            out[r * s.dim + i] = w[i] as f64 * (row[i] * scale);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, assert_close, gpu};

    /// Per element: f32 sum of squares and scaling vs f64; 2e-6 relative
    /// (about 16 f32 ulps) plus 1e-6 absolute.
    const RTOL: f64 = 2e-6;
    const ATOL: f64 = 1e-6;

    fn kernels(ctx: &GpuContext) -> Vec<&'static Kernel> {
        let mut k = vec![&RMSNORM.workgroup];
        if ctx.caps.features.subgroups {
            k.push(&RMSNORM.subgroup);
        }
        k
    }

    #[test]
    fn rmsnorm_and_add_rmsnorm_match_twin() {
        let Some(ctx) = gpu() else { return };
        let shapes = [
            (1, 1),
            (3, 7),
            (2, 64),
            (5, 128),
            (4, 300),
            (70, 896),
            (1, 2048),
        ];
        for (i, &(rows, dim)) in shapes.iter().enumerate() {
            let s = NormShape {
                rows,
                dim,
                eps: 1e-6,
            };
            let mut rng = Rng::new(40 + i as u64);
            let x = rng.normals(rows * dim);
            let res = rng.normals(rows * dim);
            let w: Vec<f32> = (0..dim).map(|_| 1.0 + 0.2 * rng.normal()).collect();
            for kernel in kernels(ctx) {
                let xb = GpuBuffer::from_slice(ctx, "x", &x).unwrap();
                let wb = GpuBuffer::from_slice(ctx, "w", &w).unwrap();
                let out = GpuBuffer::<f32>::zeros(ctx, "out", rows * dim).unwrap();
                let rb = GpuBuffer::from_slice(ctx, "res", &res).unwrap();
                let out2 = GpuBuffer::<f32>::zeros(ctx, "out2", rows * dim).unwrap();
                let d1 = rmsnorm_with(ctx, kernel, s, &xb, &wb, &out).unwrap();
                let d2 = add_rmsnorm_with(ctx, kernel, s, &xb, &rb, &wb, &out2).unwrap();
                ctx.run("test", &[&d1, &d2]).unwrap();

                let x64: Vec<f64> = x.iter().map(|v| *v as f64).collect();
                let mut want = vec![0.0; rows * dim];
                rmsnorm_cpu(s, &x64, &w, &mut want);
                let what = format!("{} rmsnorm [{rows}, {dim}]", kernel.name);
                assert_close(&what, &out.read(ctx).unwrap(), &want, ATOL, RTOL);

                // The residual is summed in f32 on the GPU; the twin normalises
                // that same f32 sum.
                let summed: Vec<f32> = res.iter().zip(&x).map(|(a, b)| a + b).collect();
                let s64: Vec<f64> = summed.iter().map(|v| *v as f64).collect();
                rmsnorm_cpu(s, &s64, &w, &mut want);
                let what = format!("{} add_rmsnorm [{rows}, {dim}]", kernel.name);
                assert_eq!(rb.read(ctx).unwrap(), summed, "{what}: residual");
                assert_close(&what, &out2.read(ctx).unwrap(), &want, ATOL, RTOL);
            }
        }
    }
}
