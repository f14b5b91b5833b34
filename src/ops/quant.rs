//! Quantized weight blocks exactly as llama.cpp (ggml) lays them out, so
//! GGUF blocks go to the GPU as they are: the host half (quantizers with
//! llama.cpp's reference semantics, dequantizers that are the CPU twins of
//! the kernels that read the blocks).
//!
//! - q8_0: 32 weights in 34 bytes: f16 scale `d`, 32 int8 `q`; `x = d * q`.
//! - q4_0: 32 weights in 18 bytes: f16 `d`, 16 bytes of nibbles (low nibbles
//!   elements 0-15, high 16-31); `x = d * (q - 8)`.
//! - q4_K: 256 weights in 144 bytes: f16 `d`, f16 `dmin`, 12 bytes packing
//!   eight 6-bit scales and mins, 128 bytes of nibbles (each 32 bytes: the
//!   low nibbles one 32-weight sub-block, the high ones the next);
//!   `x = d * sc * q - dmin * m`.
//! - q6_K: 256 weights in 210 bytes: 128 bytes of low nibbles, 64 of high
//!   2-bit pairs, 16 int8 scales, f16 `d`; `x = d * sc * (q - 32)`.
//!
//! Products are formed in the order llama.cpp's `dequantize_row_*` forms
//! them, in f32, so the twins equal `gguf.quants.dequantize` bit for bit.
//!
//! The GPU half: weights are a [`GpuMatrix`] whose parts hold blocks
//! ([`WeightDtype::Quant`]); `ops::linear` runs a projection over them with
//! [`matvec_part`] (`shaders/matvec_quant.wgsl`, decode) or the matmul's
//! quantized entries (prefill), and `ops::embedding` gathers rows of them;
//! `shaders/quant_blocks.wgsl` reads the blocks for all three. The twin of
//! each is [`dequantize`], then the float twin.

use half::f16;

use super::linear::{
    Linear, MATVEC_BLOCKS, MATVEC_COMMON, MATVEC_ROWS_VECS, PartGrid, Prologue, dispatch_part,
};
use super::{NO_FEATURES, REDUCE_SUBGROUP, REDUCE_WORKGROUP, ReducingKernel, SUBGROUPS, ensure};
use crate::error::Result;
pub use crate::gpu::QuantFormat;
use crate::gpu::matrix::MatrixPart;
use crate::gpu::{Dispatch, GpuContext, GpuMatrix, Kernel, WeightDtype};

const MATVEC_QUANT_SRC: &str = include_str!("../../shaders/matvec_quant.wgsl");
/// The block readers every kernel over quantized weights joins in front.
pub(crate) const QUANT_BLOCKS: &str = include_str!("../../shaders/quant_blocks.wgsl");

const MATVEC_QUANT_ENTRIES: &[&str] = &["matvec_q8_0", "matvec_q4_0", "matvec_q4_k", "matvec_q6_k"];

pub static MATVEC_QUANT: ReducingKernel = ReducingKernel {
    workgroup: Kernel {
        name: "matvec_quant",
        sources: &[
            REDUCE_WORKGROUP,
            MATVEC_COMMON,
            QUANT_BLOCKS,
            MATVEC_QUANT_SRC,
        ],
        entries: MATVEC_QUANT_ENTRIES,
        needs: NO_FEATURES,
    },
    subgroup: Kernel {
        name: "matvec_quant_subgroup",
        sources: &[
            REDUCE_SUBGROUP,
            MATVEC_COMMON,
            QUANT_BLOCKS,
            MATVEC_QUANT_SRC,
        ],
        entries: MATVEC_QUANT_ENTRIES,
        needs: SUBGROUPS,
    },
};

/// One subgroup per 4 rows, each unit dequantized once for NV vectors
/// (`shaders/matvec_quant_rows.wgsl`; the decode kernel where subgroups fit
/// a workgroup, as `matvec_rows` for f32 and f16).
pub static MATVEC_QUANT_ROWS: Kernel = Kernel {
    name: "matvec_quant_rows",
    sources: &[
        MATVEC_COMMON,
        MATVEC_BLOCKS,
        QUANT_BLOCKS,
        include_str!("../../shaders/matvec_quant_rows.wgsl"),
    ],
    entries: &[
        "matvec_rows_q8_0",
        "matvec_rows_q4_0",
        "matvec_rows_q4_k",
        "matvec_rows_q6_k",
    ],
    needs: SUBGROUPS,
};

/// The decode kernel for quantized parts on this device.
pub(crate) fn matvec_quant_kernel(ctx: &GpuContext) -> &'static Kernel {
    if super::linear::has_matvec_rows(ctx) {
        &MATVEC_QUANT_ROWS
    } else {
        MATVEC_QUANT.pick(ctx)
    }
}

/// Uploads `rows` rows of blocks as they are (`bytes`: GGUF's layout, rows
/// back to back), split into parts as every matrix.
pub fn upload_blocks(
    ctx: &GpuContext,
    label: &str,
    format: QuantFormat,
    rows: usize,
    cols: usize,
    bytes: &[u8],
) -> Result<GpuMatrix> {
    let row_bytes = format.bytes_for(cols);
    ensure!(
        cols.is_multiple_of(format.block_weights()) && bytes.len() == rows * row_bytes,
        "{label}: {} bytes for {rows} rows of {cols} {} weights",
        bytes.len(),
        format.name()
    );
    GpuMatrix::upload_with(
        ctx,
        label,
        rows,
        cols,
        WeightDtype::Quant(format),
        |r, out| {
            bytemuck::cast_slice_mut::<u32, u8>(out)[..row_bytes]
                .copy_from_slice(&bytes[r * row_bytes..(r + 1) * row_bytes]);
            Ok(())
        },
    )
}

/// Quantizes a row-major f32 matrix with llama.cpp's reference quantizer
/// ([`quantize`]) and uploads the blocks.
pub fn upload_quantized(
    ctx: &GpuContext,
    label: &str,
    format: QuantFormat,
    rows: usize,
    cols: usize,
    data: &[f32],
) -> Result<GpuMatrix> {
    ensure!(
        data.len() == rows * cols && cols.is_multiple_of(format.block_weights()),
        "{label}: {} values for [{rows}, {cols}] in {} blocks",
        data.len(),
        format.name()
    );
    let mut bytes = Vec::with_capacity(rows * format.bytes_for(cols));
    for row in data.chunks_exact(cols) {
        bytes.extend(quantize(format, row)?);
    }
    upload_blocks(ctx, label, format, rows, cols, &bytes)
}

/// The decode projection over a matrix of quantized parts with an explicit
/// kernel: [`MATVEC_QUANT_ROWS`] or a reduction variant of [`MATVEC_QUANT`]
/// (tests run each; `ops::linear` picks [`matvec_quant_kernel`]).
pub fn matvec_quant_with(
    ctx: &GpuContext,
    kernel: &'static Kernel,
    args: &Linear,
) -> Result<Vec<Dispatch>> {
    args.check("matvec_quant")?;
    args.weights
        .parts
        .iter()
        .map(|part| {
            let format = part.dtype.quant().ok_or_else(|| {
                crate::error::Error::invalid(
                    "matvec_quant",
                    format!("{} has {} rows", args.weights.label, part.dtype.name()),
                )
            })?;
            matvec_part(ctx, kernel, args, part, format, Prologue::None)
        })
        .collect()
}

/// One part of a projection over quantized blocks: `y[v] (+)= W x[v] (+
/// bias)` for the part's rows, 4 rows to a workgroup or to a subgroup.
pub(crate) fn matvec_part(
    ctx: &GpuContext,
    kernel: &'static Kernel,
    args: &Linear,
    part: &MatrixPart,
    format: QuantFormat,
    prologue: Prologue,
) -> Result<Dispatch> {
    let w = args.weights;
    let prologue_id = prologue.id();
    let [wg] = super::wg_constants();
    let rows_kernel = std::ptr::eq(kernel, &MATVEC_QUANT_ROWS);
    // The rows kernel: vectors per pass, the power of two covering n_vecs.
    let rows_nv = args.n_vecs.next_power_of_two().min(MATVEC_ROWS_VECS);
    ensure!(
        prologue_id == 0 || rows_kernel,
        "matvec_quant {}: only the rows kernel has prologues",
        w.label
    );
    let pipeline = if rows_kernel {
        let entry = format!("matvec_rows_{}", format.entry_suffix());
        let constants = [wg, ("NV", rows_nv as f64), ("PROLOGUE", prologue_id as f64)];
        ctx.pipeline(kernel, &entry, &constants)?
    } else {
        let entry = format!("matvec_{}", format.entry_suffix());
        ctx.pipeline(kernel, &entry, &[wg])?
    };
    ensure!(
        args.n_vecs <= ctx.caps.max_workgroups_per_dim as usize,
        "matvec: {} vectors exceed the grid's z limit; use matmul",
        args.n_vecs
    );
    let grid = if rows_kernel {
        PartGrid::Subgroups { nv: rows_nv }
    } else {
        PartGrid::Workgroups
    };
    dispatch_part(
        ctx,
        pipeline,
        format!("kvsift.matvec_quant.{}", w.label),
        args,
        part,
        format.bytes_for(w.cols),
        prologue,
        grid,
        rows_kernel,
    )
}

/// llama.cpp's reference quantizer for `format` (q8_0 and q4_0; kvsift
/// reads the K formats from GGUF files but does not make them).
pub fn quantize(format: QuantFormat, row: &[f32]) -> Result<Vec<u8>> {
    ensure!(
        row.len().is_multiple_of(format.block_weights()),
        "quantize: {} values are not whole {} blocks",
        row.len(),
        format.name()
    );
    match format {
        QuantFormat::Q8_0 => Ok(quantize_q8_0(row)),
        QuantFormat::Q4_0 => Ok(quantize_q4_0(row)),
        f => Err(crate::error::Error::invalid(
            "weights dtype",
            format!(
                "kvsift does not quantize to {} (it reads such blocks from GGUF files)",
                f.name()
            ),
        )),
    }
}

/// The values a row of f32 weights takes once quantized to `format` and read
/// back (what the GPU computes with; the reference forward's weights).
pub fn round_row(format: QuantFormat, row: &[f32]) -> Result<Vec<f32>> {
    Ok(dequantize(format, &quantize(format, row)?))
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The first block of `bytes` whose f16 scale (or q4_K min scale) is not a
/// finite number (a corrupt file; the weights would be NaN).
pub fn first_bad_scale(format: QuantFormat, bytes: &[u8]) -> Option<usize> {
    let bad = |b: &[u8], at: usize| !f16_at(b, at).is_finite();
    bytes
        .chunks_exact(format.block_bytes())
        .position(|b| match format {
            QuantFormat::Q8_0 | QuantFormat::Q4_0 => bad(b, 0),
            QuantFormat::Q4K => bad(b, 0) || bad(b, 2),
            QuantFormat::Q6K => bad(b, 208),
        })
}

/// llama.cpp's `quantize_row_q8_0_ref`: per block `d = max|x| / 127`,
/// `q = round(x / d)` (half away from zero) computed as `x * (1/d)`.
/// `x.len()` must be a multiple of 32.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    assert_eq!(x.len() % 32, 0, "q8_0 rows are whole blocks of 32");
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for block in x.chunks_exact(32) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}

/// llama.cpp's `quantize_row_q4_0_ref`: per block the value of largest
/// magnitude (the first such) gives `d = max / -8`; `q = min(15, trunc(x / d
/// + 8.5))`, element j in the low nibble of byte j, element j + 16 in its
/// high nibble. `x.len()` must be a multiple of 32.
pub fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
    assert_eq!(x.len() % 32, 0, "q4_0 rows are whole blocks of 32");
    let mut out = Vec::with_capacity(x.len() / 32 * 18);
    for block in x.chunks_exact(32) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in block {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
        for j in 0..16 {
            out.push(q(block[j]) | (q(block[j + 16]) << 4));
        }
    }
    out
}

/// A q4_K sub-block's 6-bit scale and min (llama.cpp's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The weights of whole blocks of `format` (the CPU twin of every kernel
/// that reads them).
pub fn dequantize(format: QuantFormat, bytes: &[u8]) -> Vec<f32> {
    let bb = format.block_bytes();
    assert_eq!(
        bytes.len() % bb,
        0,
        "{} data is whole blocks",
        format.name()
    );
    let mut out = Vec::with_capacity(bytes.len() / bb * format.block_weights());
    for b in bytes.chunks_exact(bb) {
        match format {
            QuantFormat::Q8_0 => {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| d * (q as i8) as f32));
            }
            QuantFormat::Q4_0 => {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| d * ((q & 0xF) as i32 - 8) as f32));
                out.extend(qs.iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
            }
            QuantFormat::Q4K => {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (pair, q) in qs.chunks_exact(32).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * pair, scales);
                    let (sc2, m2) = scale_min_k4(2 * pair + 1, scales);
                    let (d1, dm1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, dm2) = (d * sc2 as f32, dmin * m2 as f32);
                    out.extend(q.iter().map(|&v| d1 * (v & 0xF) as f32 - dm1));
                    out.extend(q.iter().map(|&v| d2 * (v >> 4) as f32 - dm2));
                }
            }
            QuantFormat::Q6K => {
                let (ql, qh) = (&b[0..128], &b[128..192]);
                let sc: Vec<f32> = b[192..208].iter().map(|&s| s as i8 as f32).collect();
                let d = f16_at(b, 208);
                let mut y = [0.0f32; 256];
                for half in 0..2 {
                    let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                    let (y, sc) = (&mut y[128 * half..], &sc[8 * half..]);
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * sc[is] * q1 as f32;
                        y[l + 32] = d * sc[is + 2] * q2 as f32;
                        y[l + 64] = d * sc[is + 4] * q3 as f32;
                        y[l + 96] = d * sc[is + 6] * q4 as f32;
                    }
                }
                out.extend_from_slice(&y);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
