//! Negative log-likelihood of target tokens (`shaders/nll.wgsl`):
//! `log(sum exp(logits)) - logits[target]` per row, for teacher-forced scoring.

use bytemuck::{Pod, Zeroable};

use super::ensure;
use super::host_layout;
use super::{NO_FEATURES, REDUCE_SUBGROUP, REDUCE_WORKGROUP, ReducingKernel, SUBGROUPS, u32_of};
use crate::error::Result;
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, Kernel};

const SRC: &str = include_str!("../../shaders/nll.wgsl");

pub static NLL: ReducingKernel = ReducingKernel {
    workgroup: Kernel {
        name: "nll",
        sources: &[REDUCE_WORKGROUP, SRC],
        entries: &["nll"],
        needs: NO_FEATURES,
    },
    subgroup: Kernel {
        name: "nll_subgroup",
        sources: &[REDUCE_SUBGROUP, SRC],
        entries: &["nll"],
        needs: SUBGROUPS,
    },
};

/// The kernel's parameters; rewrite `row_offset` per step with `Dispatch::write_params`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct NllParams {
    pub rows: u32,
    pub n: u32,
    /// Where the rows start in `targets` and `out`.
    pub row_offset: u32,
}

/// `out[row_offset + r] = nll of targets[row_offset + r] under logits row r`, for `rows` rows of `n`.
pub fn nll(
    ctx: &GpuContext,
    rows: usize,
    n: usize,
    logits: &GpuBuffer<f32>,
    targets: &GpuBuffer<u32>,
    out: &GpuBuffer<f32>,
    row_offset: usize,
) -> Result<Dispatch> {
    ensure!(
        logits.len() >= rows * n
            && targets.len() >= row_offset + rows
            && out.len() >= row_offset + rows,
        "nll: [{rows}, {n}] against logits {}, targets {}, out {} at {row_offset}",
        logits.len(),
        targets.len(),
        out.len()
    );
    let pipeline = ctx.pipeline(NLL.pick(ctx), "nll", &super::wg_constants())?;
    let params = NllParams {
        rows: u32_of("rows", rows)?,
        n: u32_of("n", n)?,
        row_offset: u32_of("row offset", row_offset)?,
    };
    Dispatch::with_params(
        ctx,
        pipeline,
        "kvsift.nll".into(),
        &params,
        &[logits.binding(), targets.binding(), out.binding()],
        ctx.grid(u32_of("rows", rows)?),
    )
}

/// CPU twin (f64) for one row.
pub fn nll_cpu(row: &[f32], target: u32) -> f64 {
    let m = row.iter().fold(f64::NEG_INFINITY, |a, v| a.max(*v as f64));
    let z: f64 = row.iter().map(|v| (*v as f64 - m).exp()).sum();
    z.ln() + m - row[target as usize] as f64
}

/// The structs this module's kernels read (checked against the WGSL in
/// tests/shader_portability.rs).
pub(crate) fn host_layouts() -> Vec<super::HostLayout> {
    vec![
        host_layout!(NllParams in [&NLL.workgroup, &NLL.subgroup] as "Params" { rows, n, row_offset }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, assert_close, gpu};

    #[test]
    fn nll_matches_twin() {
        let Some(ctx) = gpu() else { return };
        for (i, &(rows, n)) in [(1, 1), (3, 7), (2, 64), (4, 128), (5, 1000), (2, 32000)]
            .iter()
            .enumerate()
        {
            let mut rng = Rng::new(150 + i as u64);
            let x: Vec<f32> = (0..rows * n).map(|_| 8.0 * rng.normal()).collect();
            let targets: Vec<u32> = (0..rows + 2).map(|_| rng.below(n) as u32).collect();
            let xb = GpuBuffer::from_slice(ctx, "logits", &x).unwrap();
            let tb = GpuBuffer::from_slice(ctx, "targets", &targets).unwrap();
            let out = GpuBuffer::<f32>::zeros(ctx, "out", rows + 2).unwrap();
            let d = nll(ctx, rows, n, &xb, &tb, &out, 2).unwrap();
            ctx.run("test", &[&d]).unwrap();
            let want: Vec<f64> = (0..rows)
                .map(|r| nll_cpu(&x[r * n..(r + 1) * n], targets[2 + r]))
                .collect();
            // log/exp in f32 over up to 32000 terms: 1e-5 relative + 1e-4 absolute.
            assert_close(
                &format!("nll [{rows}, {n}]"),
                &out.read(ctx).unwrap()[2..],
                &want,
                1e-4,
                1e-5,
            );
        }
    }
}
