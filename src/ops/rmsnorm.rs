//! RMSNorm (`shaders/rmsnorm.wgsl`): `y = w * (x / sqrt(mean(x^2) + eps))`,
//! as Hugging Face's `LlamaRMSNorm`. Plain, in place (Qwen3's per-head q/k
//! norm inside the fused qkv rows), and fused with the residual add.

use bytemuck::{Pod, Zeroable};

use super::ensure;
use super::host_layout;
use super::{NO_FEATURES, REDUCE_SUBGROUP, REDUCE_WORKGROUP, ReducingKernel, SUBGROUPS, u32_of};
use crate::error::Result;
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, Kernel};

const SRC: &str = include_str!("../../shaders/rmsnorm.wgsl");
const ENTRIES: &[&str] = &["rmsnorm", "rmsnorm_inplace", "add_rmsnorm"];

pub static RMSNORM: ReducingKernel = ReducingKernel {
    workgroup: Kernel {
        name: "rmsnorm",
        sources: &[REDUCE_WORKGROUP, SRC],
        entries: ENTRIES,
        needs: NO_FEATURES,
    },
    subgroup: Kernel {
        name: "rmsnorm_subgroup",
        sources: &[REDUCE_SUBGROUP, SRC],
        entries: ENTRIES,
        needs: SUBGROUPS,
    },
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    rows: u32,
    dim: u32,
    eps: f32,
    heads: u32,
    token_stride: u32,
    offset: u32,
}

/// Which rows to normalise: `tokens * heads` rows of `dim` values; row
/// (t, h) starts at `t * token_stride + offset + h * dim`.
#[derive(Clone, Copy, Debug)]
pub struct NormShape {
    pub tokens: usize,
    pub heads: usize,
    pub dim: usize,
    pub token_stride: usize,
    pub offset: usize,
    pub eps: f32,
}

impl NormShape {
    /// `rows` contiguous rows of `dim`.
    pub fn rows(rows: usize, dim: usize, eps: f32) -> Self {
        Self {
            tokens: rows,
            heads: 1,
            dim,
            token_stride: dim,
            offset: 0,
            eps,
        }
    }

    /// Element offset of each row, in row order.
    pub fn row_offsets(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.tokens).flat_map(move |t| {
            (0..self.heads).map(move |h| t * self.token_stride + self.offset + h * self.dim)
        })
    }

    fn check(&self, kernel: &str, w: &GpuBuffer<f32>, bufs: &[(&str, usize)]) -> Result<()> {
        let need = if self.tokens == 0 {
            0
        } else {
            (self.tokens - 1) * self.token_stride + self.offset + self.heads * self.dim
        };
        ensure!(
            w.len() == self.dim
                && (self.tokens <= 1 || self.offset + self.heads * self.dim <= self.token_stride),
            "{kernel}: weight {} for {self:?}",
            w.len()
        );
        for (name, len) in bufs {
            ensure!(
                *len >= need,
                "{kernel}: {name} has {len} values, {self:?} needs {need}"
            );
        }
        Ok(())
    }

    fn params(&self) -> Result<Params> {
        Ok(Params {
            rows: u32_of("rows", self.tokens * self.heads)?,
            dim: u32_of("dim", self.dim)?,
            eps: self.eps,
            heads: u32_of("heads", self.heads)?,
            token_stride: u32_of("token stride", self.token_stride)?,
            offset: u32_of("offset", self.offset)?,
        })
    }
}

fn build(
    ctx: &GpuContext,
    kernel: &'static Kernel,
    entry: &str,
    s: &NormShape,
    resources: &[wgpu::BindingResource<'_>],
) -> Result<Dispatch> {
    let pipeline = ctx.pipeline(kernel, entry, &super::wg_constants())?;
    let label = format!("kvsift.{entry}");
    Dispatch::with_params(
        ctx,
        pipeline,
        label,
        &s.params()?,
        resources,
        ctx.grid(u32_of("rows", s.tokens * s.heads)?),
    )
}

/// `out = rmsnorm(x) * w`.
pub fn rmsnorm(
    ctx: &GpuContext,
    s: &NormShape,
    x: &GpuBuffer<f32>,
    w: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    rmsnorm_with(ctx, RMSNORM.pick(ctx), s, x, w, out)
}

pub fn rmsnorm_with(
    ctx: &GpuContext,
    kernel: &'static Kernel,
    s: &NormShape,
    x: &GpuBuffer<f32>,
    w: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    s.check("rmsnorm", w, &[("x", x.len()), ("out", out.len())])?;
    build(
        ctx,
        kernel,
        "rmsnorm",
        s,
        &[w.binding(), out.binding(), x.binding()],
    )
}

/// `x = rmsnorm(x) * w` in place.
pub fn rmsnorm_inplace(
    ctx: &GpuContext,
    s: &NormShape,
    x: &GpuBuffer<f32>,
    w: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    rmsnorm_inplace_with(ctx, RMSNORM.pick(ctx), s, x, w)
}

pub fn rmsnorm_inplace_with(
    ctx: &GpuContext,
    kernel: &'static Kernel,
    s: &NormShape,
    x: &GpuBuffer<f32>,
    w: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    s.check("rmsnorm_inplace", w, &[("x", x.len())])?;
    build(
        ctx,
        kernel,
        "rmsnorm_inplace",
        s,
        &[w.binding(), x.binding()],
    )
}

/// `residual += delta; out = rmsnorm(residual) * w`.
pub fn add_rmsnorm(
    ctx: &GpuContext,
    s: &NormShape,
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
    s: &NormShape,
    delta: &GpuBuffer<f32>,
    residual: &GpuBuffer<f32>,
    w: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    s.check(
        "add_rmsnorm",
        w,
        &[
            ("delta", delta.len()),
            ("residual", residual.len()),
            ("out", out.len()),
        ],
    )?;
    build(
        ctx,
        kernel,
        "add_rmsnorm",
        s,
        &[
            w.binding(),
            out.binding(),
            delta.binding(),
            residual.binding(),
        ],
    )
}

/// CPU twin (f64): normalises the rows `s` names of `x` into the same places of `out`.
pub fn rmsnorm_cpu(s: &NormShape, x: &[f64], w: &[f32], out: &mut [f64]) {
    for base in s.row_offsets() {
        let row = &x[base..base + s.dim];
        let ms = row.iter().map(|v| v * v).sum::<f64>() / s.dim as f64;
        let scale = 1.0 / (ms + s.eps as f64).sqrt();
        for i in 0..s.dim {
            out[base + i] = w[i] as f64 * (row[i] * scale);
        }
    }
}

/// The structs this module's kernels read (checked against the WGSL in
/// tests/shader_portability.rs).
pub(crate) fn host_layouts() -> Vec<super::HostLayout> {
    vec![
        host_layout!(Params in [&RMSNORM.workgroup, &RMSNORM.subgroup] as "Params" { rows, dim, eps, heads, token_stride, offset }),
    ]
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

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|x| *x as f64).collect()
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
            let s = NormShape::rows(rows, dim, 1e-6);
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
                let d1 = rmsnorm_with(ctx, kernel, &s, &xb, &wb, &out).unwrap();
                let d2 = add_rmsnorm_with(ctx, kernel, &s, &xb, &rb, &wb, &out2).unwrap();
                ctx.run("test", &[&d1, &d2]).unwrap();

                let mut want = vec![0.0; rows * dim];
                rmsnorm_cpu(&s, &f64s(&x), &w, &mut want);
                let what = format!("{} rmsnorm [{rows}, {dim}]", kernel.name);
                assert_close(&what, &out.read(ctx).unwrap(), &want, ATOL, RTOL);

                // The residual is summed in f32 on the GPU; the twin normalises
                // that same f32 sum.
                let summed: Vec<f32> = res.iter().zip(&x).map(|(a, b)| a + b).collect();
                rmsnorm_cpu(&s, &f64s(&summed), &w, &mut want);
                let what = format!("{} add_rmsnorm [{rows}, {dim}]", kernel.name);
                assert_eq!(rb.read(ctx).unwrap(), summed, "{what}: residual");
                assert_close(&what, &out2.read(ctx).unwrap(), &want, ATOL, RTOL);
            }
        }
    }

    #[test]
    fn per_head_norm_in_place_touches_only_its_heads() {
        let Some(ctx) = gpu() else { return };
        // Qwen3 layout: tokens x (q heads, k heads, v heads) x head_dim; norm the k heads.
        for (i, &(tokens, hq, hkv, dim)) in
            [(1, 1, 1, 64), (5, 4, 2, 64), (3, 16, 8, 128), (2, 3, 1, 7)]
                .iter()
                .enumerate()
        {
            let stride = (hq + 2 * hkv) * dim;
            let s = NormShape {
                tokens,
                heads: hkv,
                dim,
                token_stride: stride,
                offset: hq * dim,
                eps: 1e-6,
            };
            let mut rng = Rng::new(50 + i as u64);
            let x = rng.normals(tokens * stride);
            let w: Vec<f32> = (0..dim).map(|_| 1.0 + 0.2 * rng.normal()).collect();
            for kernel in kernels(ctx) {
                let xb = GpuBuffer::from_slice(ctx, "qkv", &x).unwrap();
                let wb = GpuBuffer::from_slice(ctx, "w", &w).unwrap();
                let d = rmsnorm_inplace_with(ctx, kernel, &s, &xb, &wb).unwrap();
                ctx.run("test", &[&d]).unwrap();
                let mut want = f64s(&x);
                rmsnorm_cpu(&s, &f64s(&x), &w, &mut want);
                let what = format!("{} rmsnorm_inplace {s:?}", kernel.name);
                assert_close(&what, &xb.read(ctx).unwrap(), &want, ATOL, RTOL);
            }
        }
    }
}
