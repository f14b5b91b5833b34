//! Greedy pick (`shaders/argmax.wgsl`): per row, the index of the largest
//! value; exact ties go to the lower index; a row holding a NaN or an
//! infinity yields [`NO_INDEX`] (the sampler's `NO_TOKEN` rule).

use bytemuck::{Pod, Zeroable};

use super::host_layout;
use super::{NO_FEATURES, u32_of};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, Kernel};

pub static ARGMAX: Kernel = Kernel {
    name: "argmax",
    sources: &[include_str!("../../shaders/argmax.wgsl")],
    entries: &["argmax"],
    needs: NO_FEATURES,
};

/// What a row holding a non-finite value (or an empty row) yields.
pub const NO_INDEX: u32 = crate::ops::sample::NO_TOKEN;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    rows: u32,
    n: u32,
}

/// `out[r] = argmax(x[r, 0..n])` for each of `rows` rows.
pub fn argmax(
    ctx: &GpuContext,
    rows: usize,
    n: usize,
    x: &GpuBuffer<f32>,
    out: &GpuBuffer<u32>,
) -> Result<Dispatch> {
    if rows.checked_mul(n).is_none_or(|len| x.len() < len) || out.len() < rows {
        return Err(Error::invalid(
            "argmax",
            format!(
                "x holds {} values and out {} for [{rows}, {n}]",
                x.len(),
                out.len()
            ),
        ));
    }
    let pipeline = ctx.pipeline(&ARGMAX, "argmax", &super::wg_constants())?;
    let params = Params {
        rows: u32_of("rows", rows)?,
        n: u32_of("n", n)?,
    };
    Dispatch::with_params(
        ctx,
        pipeline,
        "kvsift.argmax".into(),
        &params,
        &[x.binding(), out.binding()],
        ctx.grid(u32_of("rows", rows)?),
    )
}

/// CPU twin.
pub fn argmax_cpu(row: &[f32]) -> u32 {
    let mut best: Option<(f32, usize)> = None;
    for (i, v) in row.iter().enumerate() {
        if !v.is_finite() {
            return NO_INDEX;
        }
        if best.is_none_or(|(bv, _)| *v > bv) {
            best = Some((*v, i));
        }
    }
    best.map_or(NO_INDEX, |(_, i)| i as u32)
}

/// The structs this module's kernels read (checked against the WGSL in
/// tests/shader_portability.rs).
pub(crate) fn host_layouts() -> Vec<super::HostLayout> {
    vec![host_layout!(Params in [&ARGMAX] as "Params" { rows, n })]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, gpu};

    #[test]
    fn argmax_matches_twin_with_ties_and_nans() {
        let Some(ctx) = gpu() else { return };
        for (i, &(rows, n)) in [
            (1, 1),
            (3, 7),
            (2, 64),
            (3, 128),
            (2, 256),
            (4, 1000),
            (2, 151936),
        ]
        .iter()
        .enumerate()
        {
            let mut rng = Rng::new(120 + i as u64);
            // Values on a coarse grid so exact ties are common.
            let mut x: Vec<f32> = (0..rows * n)
                .map(|_| (rng.normal() * 4.0).round())
                .collect();
            // Rows with a NaN, +inf or -inf yield NO_INDEX; the others not.
            if n > 10 {
                x[3] = f32::NAN;
                x[n + 5] = f32::INFINITY;
                if rows > 2 {
                    x[2 * n + n - 1] = f32::NEG_INFINITY;
                }
            }
            let xb = GpuBuffer::from_slice(ctx, "x", &x).unwrap();
            let out = GpuBuffer::<u32>::zeros(ctx, "out", rows).unwrap();
            let d = argmax(ctx, rows, n, &xb, &out).unwrap();
            ctx.run("test", &[&d]).unwrap();
            let got = out.read(ctx).unwrap();
            for r in 0..rows {
                let want = argmax_cpu(&x[r * n..(r + 1) * n]);
                assert_eq!(
                    got[r], want,
                    "argmax [{rows}, {n}] row {r}: got {}, want {want}",
                    got[r]
                );
            }
        }
        // All NaN: no index either.
        let xb = GpuBuffer::from_slice(ctx, "x", &[f32::NAN; 5]).unwrap();
        let out = GpuBuffer::<u32>::zeros(ctx, "out", 1).unwrap();
        let d = argmax(ctx, 1, 5, &xb, &out).unwrap();
        ctx.run("test", &[&d]).unwrap();
        assert_eq!(out.read(ctx).unwrap(), vec![NO_INDEX]);
    }
}
