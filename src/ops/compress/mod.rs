//! KV-compression kernels (`shaders/compress.wgsl`): window attention scores
//! through the block tables, GQA reduction and pooling, R-KV's key
//! redundancy by the row-sum identity, exact radix top-k with ties to the
//! lower slot, and compaction of the kept slots. The CPU twins are the
//! methods' reference code in `kv::compression` (f64); the tests below run
//! both on seeded random inputs.
//!
//! Each function records the dispatches of one stage for one sequence's
//! layer; the caller (`kv::compression::gpu`) strings them together.

use bytemuck::{Pod, Zeroable};

use super::ensure;
use super::host_layout;
use super::{NO_FEATURES, u32_of};
use crate::error::Result;
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, Kernel};
use crate::ops::paged_attention::{LayerKv, PoolLayout};

/// How a GQA group's per-query-head scores combine into one score per
/// stored (KV) head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GqaAgg {
    Mean,
    Max,
    Sum,
}

/// The 1-D pooling over slots that smooths scores before selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    Max,
    Avg,
}

pub static COMPRESS: Kernel = Kernel {
    name: "compress",
    sources: &[
        super::pages::PAGES_WGSL,
        include_str!("../../../shaders/compress.wgsl"),
    ],
    entries: &[
        "store_window_queries",
        "score_stats",
        "score_accumulate",
        "score_reduce",
        "score_pool",
        "fill_scores",
        "key_norms",
        "redundancy_rows",
        "redundancy_cols",
        "rkv_combine",
        "topk_select",
        "rank_reference",
        "compact_gather",
        "compact_scatter",
    ],
    needs: NO_FEATURES,
};

const WG: usize = 256;
/// Rows of S per redundancy_rows workgroup (RT in compress.wgsl).
const REDUNDANCY_TILE: usize = 32;
/// Slots one score_stats workgroup covers (STAT_SPLIT in compress.wgsl).
const STAT_SPLIT: usize = 8192;

/// Statistics floats the scoring of `rows` query rows by `units` units over
/// up to `t_max` slots needs.
pub fn stats_len(rows: usize, units: usize, t_max: usize) -> usize {
    rows * units * t_max.div_ceil(STAT_SPLIT).max(1) * 2
}

/// Mirrors `Params` in compress.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default, Debug)]
pub struct CompressParams {
    pub n_heads: u32,
    pub units: u32,
    pub units_per_head: u32,
    pub group: u32,
    pub head_dim: u32,
    pub dw: u32,
    pub page_size: u32,
    pub page_words: u32,
    pub n_rows: u32,
    pub rows_per_group: u32,
    pub q_base: u32,
    pub q_row_stride: u32,
    pub qpos_base: u32,
    pub desc_base: u32,
    pub acc_base: u32,
    pub acc_lane_stride: u32,
    pub t_stride: u32,
    pub window: u32,
    pub kernel: u32,
    pub rkv: u32,
    pub mean: u32,
    pub agg: u32,
    pub pooling: u32,
    pub accumulate: u32,
    pub k_stride: u32,
    pub acc_units: u32,
    pub ring_lane_rows: u32,
    pub scale: f32,
    pub lambda: f32,
    pub threshold: f32,
    pub eps: f32,
    pub stat_splits: u32,
    /// The longest head's length the pass covers: grids are sized by it
    /// (not by the scratch's `t_stride`), and compaction's scratch layout.
    pub slots: u32,
    /// score_stats: threads per (row, unit, split) (a power of two <= WG).
    pub row_lanes: u32,
    /// This layer's entries in `kvec` (top-k and compaction).
    pub kvec_base: u32,
}

impl CompressParams {
    fn for_kv(kv: &LayerKv) -> Result<Self> {
        let l = kv.layout;
        Ok(Self {
            n_heads: u32_of("stored heads", kv.n_heads)?,
            head_dim: u32_of("head dim", l.head_dim)?,
            dw: u32_of("dw", l.dw())?,
            page_size: u32_of("page size", l.page_size)?,
            page_words: u32_of("page words", l.page_words())?,
            desc_base: u32_of("desc base", kv.desc_base)?,
            rows_per_group: 1,
            ..Default::default()
        })
    }
}

/// Where the scoring queries sit: row `r`, query head `h` at
/// `queries[base + r * row_stride + h * head_dim ..]`, position `positions[pos_base + r]`.
#[derive(Clone, Copy)]
pub struct ScoreQueries<'a> {
    pub queries: &'a GpuBuffer<f32>,
    pub positions: &'a GpuBuffer<u32>,
    pub base: usize,
    pub row_stride: usize,
    pub pos_base: usize,
    pub n_rows: usize,
    /// Rows sharing one sequence (one desc entry and accumulator region).
    pub rows_per_group: usize,
    pub n_q_heads: usize,
}

/// How the window scores are formed.
#[derive(Clone, Copy, Debug)]
pub struct ScoreSpec {
    /// R-KV importance: group max of raw logits, softmax over the candidates, no mask.
    pub rkv: bool,
    /// Mean over the query rows (else sum).
    pub mean: bool,
    pub agg: GqaAgg,
    /// Pooling kernel (1: none).
    pub kernel: usize,
    pub pooling: Pooling,
    pub window: usize,
    /// Query heads per model KV head.
    pub group: usize,
}

impl ScoreSpec {
    fn units(&self, q: &ScoreQueries) -> usize {
        if self.rkv {
            q.n_q_heads / self.group
        } else {
            q.n_q_heads
        }
    }
}

/// Scratch of the passes over up to `heads` stored heads of `t_max` slots.
pub struct CompressBuffers {
    pub t_max: usize,
    pub heads: usize,
    pub stats: GpuBuffer<f32>,
    pub acc: GpuBuffer<f32>,
    pub raw: GpuBuffer<f32>,
    pub scores: GpuBuffer<f32>,
    pub norms: GpuBuffer<f32>,
    pub rowstat: GpuBuffer<f32>,
    pub last: GpuBuffer<u32>,
    pub kept: GpuBuffer<u32>,
    pub order: GpuBuffer<u32>,
    pub lane0: GpuBuffer<u32>,
    pub scratch: GpuBuffer<u32>,
    /// Kept prefix slots per stored head, one region per layer (the layers
    /// of one submission each read their own).
    pub kvec: GpuBuffer<u32>,
    pub layers: usize,
}

impl CompressBuffers {
    /// `units`: score units (query heads); `rows`: window query rows;
    /// `acc_units`: accumulator units a compaction moves per stored head;
    /// `layers`: the layers whose selections may share a submission.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &GpuContext,
        layout: PoolLayout,
        heads: usize,
        units: usize,
        rows: usize,
        t_max: usize,
        acc_units: usize,
        layers: usize,
    ) -> Result<Self> {
        let t = t_max.max(1);
        let z = |label: &str, n: usize| GpuBuffer::<f32>::zeros(ctx, label, n.max(1));
        let zu = |label: &str, n: usize| GpuBuffer::<u32>::zeros(ctx, label, n.max(1));
        let slot_words = 2 * layout.dw() + 1 + acc_units;
        Ok(Self {
            t_max: t,
            heads,
            stats: z("compress.stats", stats_len(rows, units, t))?,
            acc: z("compress.acc", units * t)?,
            raw: z("compress.raw", heads * t)?,
            scores: z("compress.scores", heads * t)?,
            norms: z("compress.norms", heads * t)?,
            rowstat: z("compress.rowstat", heads * t * 2)?,
            last: zu("compress.last", heads * t)?,
            kept: zu("compress.kept", heads * t)?,
            order: zu("compress.order", heads * t)?,
            lane0: zu("compress.lane0", 1)?,
            scratch: zu("compress.scratch", heads * t * slot_words)?,
            kvec: zu("compress.kvec", heads * layers.max(1))?,
            layers: layers.max(1),
        })
    }

    /// Writes layer `layer`'s kept prefix counts (one per stored head) into
    /// its region of `kvec`; returns the region's start.
    pub fn write_kvec(&self, ctx: &GpuContext, layer: usize, kvec: &[usize]) -> Result<usize> {
        ensure!(
            layer < self.layers && kvec.len() <= self.heads,
            "kvec of layer {layer} ({} heads) in scratch for {} layers of {} heads",
            kvec.len(),
            self.layers,
            self.heads
        );
        let words = kvec
            .iter()
            .map(|&k| u32_of("kept slots", k))
            .collect::<Result<Vec<u32>>>()?;
        let base = layer * self.heads;
        self.kvec.write(ctx, base, &words)?;
        Ok(base)
    }
}

fn pipeline(ctx: &GpuContext, kv: &LayerKv, entry: &str) -> Result<wgpu::ComputePipeline> {
    let f16 = if kv.layout.kv_f16 { 1.0 } else { 0.0 };
    ctx.pipeline(&COMPRESS, entry, &[("WG", WG as f64), ("KV_F16", f16)])
}

fn dispatch(
    ctx: &GpuContext,
    kv: &LayerKv,
    entry: &str,
    params: &CompressParams,
    resources: &[(u32, wgpu::BindingResource<'_>)],
    workgroups: [u32; 3],
) -> Result<Dispatch> {
    Dispatch::with_params_at(
        ctx,
        pipeline(ctx, kv, entry)?,
        format!("kvsift.compress.{entry}"),
        params,
        resources,
        workgroups,
    )
}

fn blocks(n: usize) -> Result<u32> {
    u32_of("workgroups", n.div_ceil(WG).max(1))
}

mod score;
mod select;
pub use score::{
    fill_scores, reduce_and_pool, score_accumulate, store_window_queries, window_scores,
};
pub use select::{compact, rkv_redundancy, topk};

/// Pool words holding `keys` (`[heads][t][head_dim]` f32) with positions
/// `0..t`, values zero, one table per head over pages `order` (a permutation
/// of the pages, to exercise the tables): `(pool, desc, tables)`.
pub fn pool_from_keys(
    layout: PoolLayout,
    keys: &[f32],
    heads: usize,
    t: usize,
    page_order: Option<&[usize]>,
) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let d = layout.head_dim;
    let ps = layout.page_size;
    let per_head = t.div_ceil(ps).max(1);
    let total = heads * per_head;
    let identity: Vec<usize> = (0..total).collect();
    let order = page_order.unwrap_or(&identity);
    assert_eq!(order.len(), total, "page order covers every page");
    let mut pool = vec![0u32; total * layout.page_words()];
    let mut desc = vec![];
    let mut tables = vec![0u32; total];
    for h in 0..heads {
        desc.extend([(h * per_head) as u32, t as u32]);
        for pi in 0..per_head {
            tables[h * per_head + pi] = order[h * per_head + pi] as u32;
        }
        for s in 0..t {
            let page = order[h * per_head + s / ps];
            let base = layout.page_start(page) + layout.key_at(s % ps);
            let k = &keys[(h * t + s) * d..][..d];
            if layout.kv_f16 {
                for w in 0..d / 2 {
                    let lo = half::f16::from_f32(k[2 * w]).to_bits() as u32;
                    let hi = half::f16::from_f32(k[2 * w + 1]).to_bits() as u32;
                    pool[base + w] = lo | (hi << 16);
                }
            } else {
                for (w, v) in k.iter().enumerate() {
                    pool[base + w] = v.to_bits();
                }
            }
            pool[layout.page_start(page) + layout.position_at(s % ps)] = s as u32;
        }
    }
    (pool, desc, tables)
}

/// The structs this module's kernels read (checked against the WGSL in
/// tests/shader_portability.rs).
pub(crate) fn host_layouts() -> Vec<super::HostLayout> {
    vec![
        host_layout!(CompressParams in [&COMPRESS] as "Params" { n_heads, units, units_per_head, group, head_dim, dw, page_size, page_words, n_rows, rows_per_group, q_base, q_row_stride, qpos_base, desc_base, acc_base, acc_lane_stride, t_stride, window, kernel, rkv, mean, agg, pooling, accumulate, k_stride, acc_units, ring_lane_rows, scale, lambda, threshold, eps, stat_splits, slots, row_lanes, kvec_base }),
    ]
}

pub mod cpu;

#[cfg(test)]
mod tests;
