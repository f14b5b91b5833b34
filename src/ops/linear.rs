//! Linear projections `y = x W^T (+ bias)`, optionally accumulated into `y`
//! (which fuses the residual add into `o_proj` / `down_proj`).
//! Two kernels: `matvec` (decode: one or a few vectors, `shaders/matvec.wgsl`)
//! and `matmul` (prefill: many tokens, `shaders/matmul.wgsl`). Both take f32
//! or packed-f16 weights and one dispatch per row-part of the weight matrix.

use bytemuck::{Pod, Zeroable};

use super::ensure;
use super::host_layout;
use super::rmsnorm::{NormShape, rmsnorm};
use super::{NO_FEATURES, REDUCE_SUBGROUP, REDUCE_WORKGROUP, ReducingKernel, SUBGROUPS, u32_of};
use crate::error::Result;
use crate::gpu::matrix::MatrixPart;
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, GpuMatrix, Kernel, WeightDtype};

const MATVEC_SRC: &str = include_str!("../../shaders/matvec.wgsl");
/// What every matvec kernel shares (Params, bias / y, row starts, store).
pub(crate) const MATVEC_COMMON: &str = include_str!("../../shaders/matvec_common.wgsl");

pub static MATVEC: ReducingKernel = ReducingKernel {
    workgroup: Kernel {
        name: "matvec",
        sources: &[REDUCE_WORKGROUP, MATVEC_COMMON, MATVEC_SRC],
        entries: &["matvec_f32", "matvec_f16"],
        needs: NO_FEATURES,
    },
    subgroup: Kernel {
        name: "matvec_subgroup",
        sources: &[REDUCE_SUBGROUP, MATVEC_COMMON, MATVEC_SRC],
        entries: &["matvec_f32", "matvec_f16"],
        needs: SUBGROUPS,
    },
};

/// What the two subgroup matvec kernels add (NV, subgroup builtins, vec_of).
pub(crate) const MATVEC_BLOCKS: &str = include_str!("../../shaders/matvec_blocks.wgsl");

/// One subgroup per 4 rows, no workgroup reduction (shaders/matvec_rows.wgsl).
pub static MATVEC_ROWS: Kernel = Kernel {
    name: "matvec_rows",
    sources: &[
        MATVEC_COMMON,
        MATVEC_BLOCKS,
        include_str!("../../shaders/matvec_rows.wgsl"),
    ],
    entries: &["matvec_rows_f32", "matvec_rows_f16"],
    needs: SUBGROUPS,
};

/// One vector, 16-byte loads, a subgroup per 4 rows (shaders/matvec_vec4.wgsl).
pub static MATVEC_VEC4: Kernel = Kernel {
    name: "matvec_vec4",
    sources: &[
        MATVEC_COMMON,
        MATVEC_BLOCKS,
        include_str!("../../shaders/matvec_vec4.wgsl"),
    ],
    entries: &["matvec_vec4_f32", "matvec_vec4_f16"],
    needs: SUBGROUPS,
};

pub static MATMUL: Kernel = Kernel {
    name: "matmul",
    sources: &[
        super::quant::QUANT_BLOCKS,
        include_str!("../../shaders/matmul.wgsl"),
    ],
    entries: &[
        "matmul_f32",
        "matmul_f16",
        "matmul_q8_0",
        "matmul_q4_0",
        "matmul_q4_k",
        "matmul_q6_k",
    ],
    needs: NO_FEATURES,
};

/// Rows computed by one matvec workgroup (`ROWS` in matvec.wgsl).
pub(crate) const MATVEC_BLOCK: usize = 4;
/// Output tile of one matmul workgroup (`BM`, `BN` in matmul.wgsl).
const MATMUL_TILE: usize = 64;
/// Up to this many vectors a projection runs as matvec, beyond it as matmul.
pub const MATVEC_MAX_VECS: usize = 4;

const FLAG_BIAS: u32 = 1;
pub(crate) const FLAG_ACCUMULATE: u32 = 2;
/// What matvec_vec4 does to x before the product (its `PROLOGUE` pipeline
/// constant: 0, 1, 2).
#[derive(Clone, Copy)]
pub(crate) enum Prologue<'a> {
    None,
    /// RMSNorm with this weight and epsilon.
    Norm(&'a GpuBuffer<f32>, f32),
    /// silu(gate) * up of a gate/up row.
    SwiGlu,
}

impl Prologue<'_> {
    /// The kernels' `PROLOGUE` pipeline constant.
    pub(crate) fn id(self) -> u32 {
        match self {
            Prologue::None => 0,
            Prologue::Norm(..) => 1,
            Prologue::SwiGlu => 2,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(crate) struct MatvecParams {
    pub rows: u32,
    pub cols: u32,
    /// Words per row (bytes per row for the quantized kernels).
    pub row_words: u32,
    pub n_vecs: u32,
    pub x_stride: u32,
    pub y_stride: u32,
    pub y_offset: u32,
    pub flags: u32,
    pub row_blocks: u32,
    /// RMSNorm epsilon (read by matvec_vec4's norm prologue only).
    pub eps: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    row_words: u32,
    a_stride: u32,
    c_stride: u32,
    c_offset: u32,
    flags: u32,
}

/// One projection: `y[v, :] (+)= W x[v, :] (+ bias)` for `n_vecs` rows of `x`.
#[derive(Clone, Copy)]
pub struct Linear<'a> {
    pub weights: &'a GpuMatrix,
    pub bias: Option<&'a GpuBuffer<f32>>,
    /// `[n_vecs, weights.cols]`
    pub x: &'a GpuBuffer<f32>,
    /// `[n_vecs, weights.rows]`
    pub y: &'a GpuBuffer<f32>,
    pub n_vecs: usize,
    /// Add into `y` instead of overwriting it.
    pub accumulate: bool,
}

impl Linear<'_> {
    pub(crate) fn check(&self, kernel: &str) -> Result<()> {
        let w = self.weights;
        ensure!(
            self.n_vecs > 0
                && self.x.len() >= self.n_vecs * w.cols
                && self.y.len() >= self.n_vecs * w.rows,
            "{kernel} {}: x has {} values, y {}, for {} vectors of [{}, {}]",
            w.label,
            self.x.len(),
            self.y.len(),
            self.n_vecs,
            w.rows,
            w.cols
        );
        if let Some(b) = self.bias {
            ensure!(
                b.len() == w.rows,
                "{kernel} {}: bias of {} values for {} rows",
                w.label,
                b.len(),
                w.rows
            );
        }
        Ok(())
    }

    pub(crate) fn flags(&self) -> u32 {
        (if self.bias.is_some() { FLAG_BIAS } else { 0 })
            | (if self.accumulate { FLAG_ACCUMULATE } else { 0 })
    }

    pub(crate) fn bias_binding(&self) -> wgpu::BindingResource<'_> {
        // Without a bias the kernel never reads binding 3; bind x there.
        self.bias.unwrap_or(self.x).binding()
    }
}

fn entry(kind: &str, dtype: WeightDtype) -> String {
    format!("{kind}_{}", dtype.entry_suffix())
}

/// The projection as matvec for few vectors, matmul for many.
pub fn linear(ctx: &GpuContext, args: &Linear) -> Result<Vec<Dispatch>> {
    if args.n_vecs <= matvec_max_vecs(ctx) {
        matvec(ctx, args)
    } else {
        matmul(ctx, args)
    }
}

/// Most vectors `matvec_rows` serves in one pass (`MAX_NV` in matvec_rows.wgsl;
/// its `NV` is the power of two covering the batch, up to this).
pub(crate) const MATVEC_ROWS_VECS: usize = 8;

pub(crate) fn has_matvec_rows(ctx: &GpuContext) -> bool {
    let caps = &ctx.caps;
    caps.features.subgroups && caps.subgroup_max_size <= super::WG
}

/// Most vectors [`linear`] sends to matvec (more go to the tiled matmul):
/// 16 with `matvec_rows` (weights read once per 8 vectors), else
/// [`MATVEC_MAX_VECS`] (weights read once per vector).
pub fn matvec_max_vecs(ctx: &GpuContext) -> usize {
    if has_matvec_rows(ctx) {
        2 * MATVEC_ROWS_VECS
    } else {
        MATVEC_MAX_VECS
    }
}

/// Whether `matvec_vec4` serves this projection: f32 or f16 rows that fill
/// whole vec4s (4 f32 or 8 f16 weights).
fn fits_vec4(args: &Linear) -> bool {
    let per_quad = match args.weights.dtype() {
        Some(WeightDtype::F32) => 4,
        Some(WeightDtype::F16) => 8,
        _ => return false,
    };
    args.weights.cols.is_multiple_of(per_quad)
}

/// The RMSNorm before a projection (Llama's input, post-attention and final
/// norms): `x' = g * x / sqrt(mean(x^2) + eps)` row by row.
pub struct PreNorm<'a> {
    /// `g`, `[cols]`
    pub weight: &'a GpuBuffer<f32>,
    pub eps: f32,
    /// Where the unfused path writes the normed rows (`[n_vecs, cols]`).
    pub scratch: &'a GpuBuffer<f32>,
}

/// Whether [`norm_linear`] and [`swiglu_linear`] can fuse their prologue
/// into the projection on this device (and do).
pub fn fuses_prologue(ctx: &GpuContext, args: &Linear) -> bool {
    let quantized = has_matvec_rows(ctx) && all_quantized(args.weights);
    (uses_vec4(ctx, args) || quantized) && args.n_vecs <= matvec_max_vecs(ctx)
}

/// Every part of `w` holds blocks (their kernels: ops::quant).
fn all_quantized(w: &GpuMatrix) -> bool {
    w.parts.iter().all(|p| p.dtype.quant().is_some())
}

/// Whether [`matvec`] runs `matvec_vec4` here.
fn uses_vec4(ctx: &GpuContext, args: &Linear) -> bool {
    has_matvec_rows(ctx) && fits_vec4(args)
}

/// `y (+)= W rmsnorm(x) (+ bias)` for the rows of `args.x`: one
/// `matvec_vec4` dispatch per row part that norms on the fly where it serves
/// (decode-sized batches, subgroups, rows of whole vec4s), else `rmsnorm` into
/// `norm.scratch` and [`linear`] from there.
pub fn norm_linear(ctx: &GpuContext, norm: &PreNorm, args: &Linear) -> Result<Vec<Dispatch>> {
    norm_linear_with(ctx, norm, args, fuses_prologue(ctx, args))
}

/// [`norm_linear`], fused or not as asked (tests and benches compare both;
/// `fused` needs [`fuses_prologue`]).
pub fn norm_linear_with(
    ctx: &GpuContext,
    norm: &PreNorm,
    args: &Linear,
    fused: bool,
) -> Result<Vec<Dispatch>> {
    ensure!(
        !fused || fuses_prologue(ctx, args),
        "norm_linear: cannot fuse here"
    );
    assert_eq!(
        norm.weight.len(),
        args.weights.cols,
        "norm_linear {}: norm weight length",
        args.weights.label
    );
    if fused {
        return matvec_impl(
            ctx,
            &MATVEC_VEC4,
            args,
            Prologue::Norm(norm.weight, norm.eps),
        );
    }
    let shape = NormShape::rows(args.n_vecs, args.weights.cols, norm.eps);
    let mut ds = vec![rmsnorm(ctx, &shape, args.x, norm.weight, norm.scratch)?];
    ds.extend(linear(
        ctx,
        &Linear {
            x: norm.scratch,
            ..*args
        },
    )?);
    Ok(ds)
}

/// The decode projection: where the device has subgroups that fit a
/// workgroup, a subgroup per 4 rows (16-byte loads where rows fill vec4s),
/// else the workgroup-reduction kernel.
pub fn matvec(ctx: &GpuContext, args: &Linear) -> Result<Vec<Dispatch>> {
    if uses_vec4(ctx, args) {
        matvec_with(ctx, &MATVEC_VEC4, args)
    } else if has_matvec_rows(ctx) {
        matvec_with(ctx, &MATVEC_ROWS, args)
    } else {
        matvec_with(ctx, MATVEC.pick(ctx), args)
    }
}

/// matvec with an explicit reduction variant (tests run both).
pub fn matvec_with(
    ctx: &GpuContext,
    kernel: &'static Kernel,
    args: &Linear,
) -> Result<Vec<Dispatch>> {
    matvec_impl(ctx, kernel, args, Prologue::None)
}

/// `y (+)= W (silu(gate) * up) (+ bias)`, Llama's down projection, where
/// `args.x` holds `n_vecs` gate/up rows `[gate (cols), up (cols)]`: one
/// `matvec_vec4` dispatch that forms the product as it reads x where it
/// serves, else `silu_mul` into `act` (`[n_vecs, cols]`) and [`linear`].
pub fn swiglu_linear(
    ctx: &GpuContext,
    act: &GpuBuffer<f32>,
    args: &Linear,
) -> Result<Vec<Dispatch>> {
    swiglu_linear_with(ctx, act, args, fuses_prologue(ctx, args))
}

/// [`swiglu_linear`], fused or not as asked (`fused` needs [`fuses_prologue`]).
pub fn swiglu_linear_with(
    ctx: &GpuContext,
    act: &GpuBuffer<f32>,
    args: &Linear,
    fused: bool,
) -> Result<Vec<Dispatch>> {
    ensure!(
        !fused || fuses_prologue(ctx, args),
        "swiglu_linear: cannot fuse here"
    );
    let cols = args.weights.cols;
    ensure!(
        args.x.len() >= args.n_vecs * 2 * cols,
        "swiglu_linear {}: gate/up has {} values for {} rows of 2 x {cols}",
        args.weights.label,
        args.x.len(),
        args.n_vecs
    );
    if fused {
        return matvec_impl(ctx, &MATVEC_VEC4, args, Prologue::SwiGlu);
    }
    let mut ds = vec![super::silu_mul::silu_mul(
        ctx,
        args.n_vecs,
        cols,
        args.x,
        act,
    )?];
    ds.extend(linear(ctx, &Linear { x: act, ..*args })?);
    Ok(ds)
}

/// matvec, with a prologue on x (matvec_vec4 only).
fn matvec_impl(
    ctx: &GpuContext,
    kernel: &'static Kernel,
    args: &Linear,
    prologue: Prologue,
) -> Result<Vec<Dispatch>> {
    args.check("matvec")?;
    let w = args.weights;
    // Blocks have kernels of their own (the prologues fused by the rows
    // kernel; see fuses_prologue).
    if all_quantized(w) {
        let quant_kernel = match prologue {
            Prologue::None => super::quant::matvec_quant_kernel(ctx),
            _ => &super::quant::MATVEC_QUANT_ROWS,
        };
        return w
            .parts
            .iter()
            .map(|part| {
                let format = part.dtype.quant().expect("all parts quantized");
                super::quant::matvec_part(ctx, quant_kernel, args, part, format, prologue)
            })
            .collect();
    }
    let vec4_kernel = std::ptr::eq(kernel, &MATVEC_VEC4);
    ensure!(
        !vec4_kernel || fits_vec4(args),
        "matvec_vec4 {}: needs rows of whole vec4s",
        w.label
    );
    let prologue_id = prologue.id();
    ensure!(
        prologue_id == 0 || vec4_kernel,
        "matvec {}: only matvec_vec4 has prologues",
        w.label
    );
    // Both subgroup kernels: a subgroup per row block, grid stride.
    let rows_kernel = vec4_kernel || std::ptr::eq(kernel, &MATVEC_ROWS);
    let kind = if vec4_kernel {
        "matvec_vec4"
    } else if rows_kernel {
        "matvec_rows"
    } else {
        "matvec"
    };
    let [wg] = super::wg_constants();
    // Both subgroup kernels: vectors per pass, the power of two covering
    // n_vecs (<= 8).
    let rows_nv = args.n_vecs.next_power_of_two().min(MATVEC_ROWS_VECS);
    let pipeline = |dtype: WeightDtype| {
        if vec4_kernel {
            let constants = [wg, ("NV", rows_nv as f64), ("PROLOGUE", prologue_id as f64)];
            ctx.pipeline(kernel, &entry(kind, dtype), &constants)
        } else if rows_kernel {
            let constants = [wg, ("NV", rows_nv as f64)];
            ctx.pipeline(kernel, &entry(kind, dtype), &constants)
        } else {
            ctx.pipeline(kernel, &entry(kind, dtype), &[wg])
        }
    };
    let n_vecs = u32_of("matvec vectors", args.n_vecs)?;
    ensure!(
        n_vecs <= ctx.caps.max_workgroups_per_dim,
        "matvec: {n_vecs} vectors exceed the grid's z limit; use matmul"
    );
    w.parts
        .iter()
        .map(|part| {
            // A quantized part of a mixed matrix (no prologue: fits_vec4
            // and all_quantized are false for it).
            if let Some(format) = part.dtype.quant() {
                let kernel = super::quant::matvec_quant_kernel(ctx);
                return super::quant::matvec_part(ctx, kernel, args, part, format, prologue);
            }
            let grid = if rows_kernel {
                PartGrid::Subgroups { nv: rows_nv }
            } else {
                PartGrid::Workgroups
            };
            dispatch_part(
                ctx,
                pipeline(part.dtype)?,
                format!("kvsift.matvec.{}", w.label),
                args,
                part,
                part.dtype.row_words(w.cols),
                prologue,
                grid,
                vec4_kernel,
            )
        })
        .collect()
}

/// How a matvec kernel covers a part's rows: a workgroup per 4 rows, or a
/// subgroup per 4 rows (a grid stride over them) serving `nv` vectors a pass.
#[derive(Clone, Copy)]
pub(crate) enum PartGrid {
    Workgroups,
    Subgroups { nv: usize },
}

/// One matvec dispatch over `part` (every matvec kernel's Params, grid and
/// bindings): `row_words` is the kernel's row stride (words, or bytes for
/// blocks); `norm_binding`: the kernel declares binding 5 (the prologue
/// kernels), the norm weight under `Prologue::Norm`, else x standing in.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dispatch_part(
    ctx: &GpuContext,
    pipeline: wgpu::ComputePipeline,
    label: String,
    args: &Linear,
    part: &MatrixPart,
    row_words: usize,
    prologue: Prologue,
    grid: PartGrid,
    norm_binding: bool,
) -> Result<Dispatch> {
    let w = args.weights;
    let (prologue_id, norm_w, eps) = match prologue {
        Prologue::Norm(g, eps) => (1, g, eps),
        p => (p.id(), args.x, 0.0),
    };
    let n_vecs = u32_of("matvec vectors", args.n_vecs)?;
    let row_blocks = u32_of("matvec row blocks", part.rows.div_ceil(MATVEC_BLOCK))?;
    let params = MatvecParams {
        rows: u32_of("rows", part.rows)?,
        cols: u32_of("cols", w.cols)?,
        row_words: u32_of("row words", row_words)?,
        n_vecs,
        // SwiGLU reads gate/up rows of 2 x cols.
        x_stride: u32_of(
            "x stride",
            if prologue_id == 2 { 2 * w.cols } else { w.cols },
        )?,
        y_stride: u32_of("y stride", w.rows)?,
        y_offset: u32_of("y offset", part.first_row)?,
        flags: args.flags(),
        row_blocks,
        eps,
    };
    // Subgroups: a workgroup holds at least WG / subgroup_max_size
    // subgroups of 4 rows; the kernel's grid stride covers the rest.
    let (workgroups, z) = match grid {
        PartGrid::Subgroups { nv } => {
            let per_wg = (super::WG / ctx.caps.subgroup_max_size.max(1)).max(1);
            (row_blocks.div_ceil(per_wg), n_vecs.div_ceil(nv as u32))
        }
        PartGrid::Workgroups => (row_blocks, n_vecs),
    };
    let [gx, gy, _] = ctx.grid(workgroups);
    let mut bindings = vec![
        part.buffer.as_entire_binding(),
        args.x.binding(),
        args.bias_binding(),
        args.y.binding(),
    ];
    if norm_binding {
        bindings.push(norm_w.binding());
    }
    Dispatch::with_params(ctx, pipeline, label, &params, &bindings, [gx, gy, z])
}

pub fn matmul(ctx: &GpuContext, args: &Linear) -> Result<Vec<Dispatch>> {
    args.check("matmul")?;
    let w = args.weights;
    let tiles_m = u32_of("matmul row tiles", args.n_vecs.div_ceil(MATMUL_TILE))?;
    w.parts
        .iter()
        .map(|part| {
            let tiles_n = u32_of("matmul column tiles", part.rows.div_ceil(MATMUL_TILE))?;
            ensure!(
                tiles_m <= ctx.caps.max_workgroups_per_dim
                    && tiles_n <= ctx.caps.max_workgroups_per_dim,
                "matmul {}: {tiles_n} x {tiles_m} tiles exceed the grid limit",
                w.label
            );
            let params = MatmulParams {
                m: u32_of("m", args.n_vecs)?,
                n: u32_of("n", part.rows)?,
                k: u32_of("k", w.cols)?,
                row_words: u32_of("row words", part.dtype.row_stride(w.cols))?,
                a_stride: u32_of("a stride", w.cols)?,
                c_stride: u32_of("c stride", w.rows)?,
                c_offset: u32_of("c offset", part.first_row)?,
                flags: args.flags(),
            };
            let label = format!("kvsift.matmul.{}", w.label);
            Dispatch::with_params(
                ctx,
                ctx.pipeline(&MATMUL, &entry("matmul", part.dtype), &[])?,
                label,
                &params,
                &[
                    part.buffer.as_entire_binding(),
                    args.x.binding(),
                    args.bias_binding(),
                    args.y.binding(),
                ],
                [tiles_n, tiles_m, 1],
            )
        })
        .collect()
}

/// CPU twin of both kernels, in f64: `y[v, r] (+)= sum_k w[r, k] x[v, k] (+ bias[r])`
/// for `w` `[rows, cols]`, `x` `[n_vecs, cols]`, `y` `[n_vecs, rows]`.
/// `w` must hold the values as stored (see [`WeightDtype::round`]).
pub fn linear_cpu(
    w: &[f32],
    cols: usize,
    bias: Option<&[f32]>,
    x: &[f32],
    y: &mut [f64],
    accumulate: bool,
) {
    let (rows, n_vecs) = (w.len() / cols, x.len() / cols);
    // A twin for tests: its inputs are the test's own.
    assert!(
        w.len() == rows * cols && x.len() == n_vecs * cols && y.len() == n_vecs * rows,
        "linear_cpu: w {}, x {}, y {} values for {cols} columns",
        w.len(),
        x.len(),
        y.len()
    );
    for v in 0..n_vecs {
        let xv = &x[v * cols..(v + 1) * cols];
        for r in 0..rows {
            let wr = &w[r * cols..(r + 1) * cols];
            let mut s: f64 = wr.iter().zip(xv).map(|(a, b)| *a as f64 * *b as f64).sum();
            if let Some(b) = bias {
                s += b[r] as f64;
            }
            let out = &mut y[v * rows + r];
            *out = if accumulate { *out + s } else { s };
        }
    }
}

/// The structs this module's kernels read (checked against the WGSL in
/// tests/shader_portability.rs).
pub(crate) fn host_layouts() -> Vec<super::HostLayout> {
    vec![
        host_layout!(MatvecParams in [&MATVEC.workgroup, &MATVEC.subgroup, &MATVEC_ROWS, &MATVEC_VEC4, &super::quant::MATVEC_QUANT.workgroup, &super::quant::MATVEC_QUANT.subgroup, &super::quant::MATVEC_QUANT_ROWS] as "Params" { rows, cols, row_words, n_vecs, x_stride, y_stride, y_offset, flags, row_blocks, eps }),
        host_layout!(MatmulParams in [&MATMUL] as "Params" { m, n, k, row_words, a_stride, c_stride, c_offset, flags }),
    ]
}

#[cfg(test)]
mod tests;
