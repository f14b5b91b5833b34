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

/// Writes the last `window` query rows of each row group into the lanes'
/// rings (`ring[lane][layer][position % window][Hq * D]`, positions in
/// `ring_pos[lane][window]`). Runs in the forward, after RoPE.
#[allow(clippy::too_many_arguments)]
pub fn store_window_queries(
    ctx: &GpuContext,
    kv: &LayerKv,
    positions: &GpuBuffer<u32>,
    qkv: &GpuBuffer<f32>,
    qkv_stride: usize,
    n_q_heads: usize,
    n_rows: usize,
    rows_per_group: usize,
    lanes: &GpuBuffer<u32>,
    ring: &GpuBuffer<f32>,
    ring_pos: &GpuBuffer<u32>,
    layer: usize,
    n_layers: usize,
    window: usize,
) -> Result<Dispatch> {
    let width = n_q_heads * kv.layout.head_dim;
    let p = CompressParams {
        units: u32_of("query heads", n_q_heads)?,
        n_rows: u32_of("rows", n_rows)?,
        rows_per_group: u32_of("rows per group", rows_per_group)?,
        q_base: u32_of("ring base", layer * window * width)?,
        q_row_stride: u32_of("qkv stride", qkv_stride)?,
        ring_lane_rows: u32_of("ring rows", n_layers * window)?,
        window: u32_of("window", window)?,
        ..CompressParams::for_kv(kv)?
    };
    dispatch(
        ctx,
        kv,
        "store_window_queries",
        &p,
        &[
            (1, ring_pos.binding()),
            (2, ring.binding()),
            (8, lanes.binding()),
            (18, positions.binding()),
            (19, qkv.binding()),
        ],
        ctx.grid(blocks(n_rows * width)?),
    )
}

/// Query rows one `score_accumulate` invocation loops over at most: a
/// single sequence's rows are split into chunks that add up (llvmpipe stops
/// loops after 65535 iterations per invocation).
const ROWS_PER_PASS: usize = 64;

/// Per-unit probability sums of the query rows over every slot: into
/// `acc[acc_base + lanes[group] * acc_lane_stride + unit * t_stride + slot]`,
/// replacing or (`accumulate`) adding. `slots`: the longest head's length
/// (at most `t_stride`), which sizes the grids.
#[allow(clippy::too_many_arguments)]
pub fn score_accumulate(
    ctx: &GpuContext,
    kv: &LayerKv,
    q: &ScoreQueries,
    spec: &ScoreSpec,
    stats: &GpuBuffer<f32>,
    acc: &GpuBuffer<f32>,
    lanes: &GpuBuffer<u32>,
    acc_base: usize,
    acc_lane_stride: usize,
    t_stride: usize,
    slots: usize,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    if q.rows_per_group == q.n_rows && q.n_rows > ROWS_PER_PASS {
        let mut out = vec![];
        for r0 in (0..q.n_rows).step_by(ROWS_PER_PASS) {
            let n = ROWS_PER_PASS.min(q.n_rows - r0);
            let chunk = ScoreQueries {
                base: q.base + r0 * q.row_stride,
                pos_base: q.pos_base + r0,
                n_rows: n,
                rows_per_group: n,
                ..*q
            };
            out.extend(score_accumulate(
                ctx,
                kv,
                &chunk,
                spec,
                stats,
                acc,
                lanes,
                acc_base,
                acc_lane_stride,
                t_stride,
                slots,
                accumulate || r0 > 0,
            )?);
        }
        return Ok(out);
    }
    let units = spec.units(q);
    let groups = q.n_rows.div_ceil(q.rows_per_group);
    let (acc_base, acc_lane_stride) = (
        u32_of("acc base", acc_base)?,
        u32_of("acc lane stride", acc_lane_stride)?,
    );
    let p = params_for(kv, q, spec, t_stride, slots)?.with(|p| {
        p.acc_base = acc_base;
        p.acc_lane_stride = acc_lane_stride;
        p.accumulate = accumulate as u32;
    });
    let stats_d = dispatch(
        ctx,
        kv,
        "score_stats",
        &p,
        &[
            (1, q.positions.binding()),
            (2, q.queries.binding()),
            (3, kv.desc.binding()),
            (4, kv.tables.binding()),
            (5, kv.pool.binding()),
            (6, stats.binding()),
        ],
        ctx.grid(u32_of(
            "stats workgroups",
            (q.n_rows * units * p.stat_splits as usize).div_ceil(WG / p.row_lanes as usize),
        )?),
    )?;
    let acc_d = dispatch(
        ctx,
        kv,
        "score_accumulate",
        &p,
        &[
            (1, q.positions.binding()),
            (2, q.queries.binding()),
            (3, kv.desc.binding()),
            (4, kv.tables.binding()),
            (5, kv.pool.binding()),
            (6, stats.binding()),
            (7, acc.binding()),
            (8, lanes.binding()),
        ],
        [
            blocks(slots)?,
            u32_of("units", units)?,
            u32_of("groups", groups)?,
        ],
    )?;
    Ok(vec![stats_d, acc_d])
}

trait With: Sized {
    fn with(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}
impl With for CompressParams {}

/// Threads per row of score_stats over rows of `slots` columns: about 16
/// columns each, at least 4 and at most a workgroup (a workgroup holds
/// `WG / lanes` rows, so short heads do not idle 256-thread workgroups on
/// barriers).
fn stat_lanes(slots: usize) -> usize {
    slots.div_ceil(16).next_power_of_two().clamp(4, WG)
}

fn params_for(
    kv: &LayerKv,
    q: &ScoreQueries,
    spec: &ScoreSpec,
    t_stride: usize,
    slots: usize,
) -> Result<CompressParams> {
    ensure!(slots <= t_stride, "{slots} slots, stride {t_stride}");
    let units = spec.units(q);
    Ok(CompressParams {
        units: u32_of("units", units)?,
        units_per_head: u32_of("units per head", (units / kv.n_heads).max(1))?,
        group: u32_of("group", spec.group)?,
        n_rows: u32_of("rows", q.n_rows)?,
        rows_per_group: u32_of("rows per group", q.rows_per_group)?,
        q_base: u32_of("query base", q.base)?,
        q_row_stride: u32_of("query stride", q.row_stride)?,
        qpos_base: u32_of("query positions base", q.pos_base)?,
        t_stride: u32_of("t stride", t_stride)?,
        window: u32_of("window", spec.window)?,
        kernel: u32_of("kernel", spec.kernel)?,
        rkv: spec.rkv as u32,
        mean: spec.mean as u32,
        agg: match spec.agg {
            GqaAgg::Mean => 0,
            GqaAgg::Max => 1,
            GqaAgg::Sum => 2,
        },
        pooling: match spec.pooling {
            Pooling::Max => 0,
            Pooling::Avg => 1,
        },
        scale: 1.0 / (kv.layout.head_dim as f32).sqrt(),
        stat_splits: u32_of("stat splits", slots.div_ceil(STAT_SPLIT).max(1))?,
        slots: u32_of("slots", slots)?,
        row_lanes: u32_of("row lanes", stat_lanes(slots.min(STAT_SPLIT)))?,
        ..CompressParams::for_kv(kv)?
    })
}

/// Row reduction, GQA reduction and pooling of the unit sums in `acc`
/// (at `acc_base`) into `bufs.scores` (per stored head, candidates `[0, len - window)`),
/// over heads of at most `slots` slots.
#[allow(clippy::too_many_arguments)]
pub fn reduce_and_pool(
    ctx: &GpuContext,
    kv: &LayerKv,
    q: &ScoreQueries,
    spec: &ScoreSpec,
    acc: &GpuBuffer<f32>,
    acc_base: usize,
    bufs: &CompressBuffers,
    slots: usize,
) -> Result<[Dispatch; 2]> {
    let acc_base = u32_of("acc base", acc_base)?;
    let p = params_for(kv, q, spec, bufs.t_max, slots)?.with(|p| p.acc_base = acc_base);
    let grid = [blocks(slots)?, u32_of("heads", kv.n_heads)?, 1];
    Ok([
        dispatch(
            ctx,
            kv,
            "score_reduce",
            &p,
            &[
                (3, kv.desc.binding()),
                (7, acc.binding()),
                (9, bufs.raw.binding()),
            ],
            grid,
        )?,
        dispatch(
            ctx,
            kv,
            "score_pool",
            &p,
            &[
                (3, kv.desc.binding()),
                (9, bufs.raw.binding()),
                (10, bufs.scores.binding()),
            ],
            grid,
        )?,
    ])
}

/// Every candidate of every stored head scores `value` (in `bufs.scores`),
/// over heads of at most `slots` slots.
pub fn fill_scores(
    ctx: &GpuContext,
    kv: &LayerKv,
    window: usize,
    value: f32,
    bufs: &CompressBuffers,
    slots: usize,
) -> Result<Dispatch> {
    ensure!(
        slots <= bufs.t_max,
        "fill_scores: {slots} slots, scratch for {}",
        bufs.t_max
    );
    let p = CompressParams {
        t_stride: u32_of("t stride", bufs.t_max)?,
        window: u32_of("window", window)?,
        lambda: value,
        ..CompressParams::for_kv(kv)?
    };
    dispatch(
        ctx,
        kv,
        "fill_scores",
        &p,
        &[(3, kv.desc.binding()), (10, bufs.scores.binding())],
        [blocks(slots)?, u32_of("heads", kv.n_heads)?, 1],
    )
}

/// Window scores of one sequence: stats, unit sums (scratch `bufs.acc`),
/// reduction and pooling into `bufs.scores`, over heads of at most `slots` slots.
pub fn window_scores(
    ctx: &GpuContext,
    kv: &LayerKv,
    q: &ScoreQueries,
    spec: &ScoreSpec,
    bufs: &CompressBuffers,
    slots: usize,
) -> Result<Vec<Dispatch>> {
    let mut out = Vec::with_capacity(4);
    out.extend(score_accumulate(
        ctx,
        kv,
        q,
        spec,
        &bufs.stats,
        &bufs.acc,
        &bufs.lane0,
        0,
        0,
        bufs.t_max,
        slots,
        false,
    )?);
    out.extend(reduce_and_pool(
        ctx, kv, q, spec, &bufs.acc, 0, bufs, slots,
    )?);
    Ok(out)
}

/// R-KV: redundancy of every slot and the final score
/// `lambda * importance - (1 - lambda) * redundancy` in `bufs.scores`
/// (which holds the pooled importance). `slots`: the longest head's length
/// (at most `bufs.t_max`), which sizes the grids (the row pass launches a
/// workgroup per tile of `REDUNDANCY_TILE` rows), not the scratch's capacity.
#[allow(clippy::too_many_arguments)]
pub fn rkv_redundancy(
    ctx: &GpuContext,
    kv: &LayerKv,
    window: usize,
    lambda: f32,
    threshold: f32,
    eps: f32,
    bufs: &CompressBuffers,
    slots: usize,
) -> Result<Vec<Dispatch>> {
    ensure!(
        slots <= bufs.t_max,
        "rkv_redundancy: {slots} slots, scratch for {}",
        bufs.t_max
    );
    let p = CompressParams {
        t_stride: u32_of("t stride", bufs.t_max)?,
        window: u32_of("window", window)?,
        lambda,
        threshold,
        eps,
        slots: u32_of("slots", slots)?,
        ..CompressParams::for_kv(kv)?
    };
    let grid = [blocks(slots)?, u32_of("heads", kv.n_heads)?, 1];
    fn with_pool<'a>(
        kv: &'a LayerKv,
        extra: &[(u32, wgpu::BindingResource<'a>)],
    ) -> Vec<(u32, wgpu::BindingResource<'a>)> {
        let mut v = vec![
            (3, kv.desc.binding()),
            (4, kv.tables.binding()),
            (5, kv.pool.binding()),
        ];
        v.extend(extra.iter().cloned());
        v
    }
    Ok(vec![
        dispatch(
            ctx,
            kv,
            "key_norms",
            &p,
            &with_pool(kv, &[(11, bufs.norms.binding())]),
            grid,
        )?,
        dispatch(
            ctx,
            kv,
            "redundancy_rows",
            &p,
            &with_pool(
                kv,
                &[
                    (11, bufs.norms.binding()),
                    (12, bufs.rowstat.binding()),
                    (13, bufs.last.binding()),
                ],
            ),
            {
                let row_tiles = slots.div_ceil(REDUNDANCY_TILE);
                let [x, y, _] = ctx.grid(u32_of("row tiles", row_tiles.max(1))?);
                [x, y, u32_of("heads", kv.n_heads)?]
            },
        )?,
        dispatch(
            ctx,
            kv,
            "redundancy_cols",
            &p,
            &[
                (3, kv.desc.binding()),
                (9, bufs.raw.binding()),
                (12, bufs.rowstat.binding()),
                (13, bufs.last.binding()),
            ],
            grid,
        )?,
        dispatch(
            ctx,
            kv,
            "rkv_combine",
            &p,
            &[
                (3, kv.desc.binding()),
                (9, bufs.raw.binding()),
                (10, bufs.scores.binding()),
            ],
            [u32_of("heads", kv.n_heads)?, 1, 1],
        )?,
    ])
}

/// Exact top-`kvec[kvec_base + s]` of each stored head's candidate scores
/// (`bufs.kvec`, see [`CompressBuffers::write_kvec`]), ties to the lower
/// slot: `bufs.kept[s]` = the kept slots ascending, then the window.
/// With `reference_order`, `bufs.order[s]` = the same slots in R-KV's layout
/// (selected by descending score, then the window). Heads hold at most `slots`.
pub fn topk(
    ctx: &GpuContext,
    kv: &LayerKv,
    window: usize,
    bufs: &CompressBuffers,
    kvec_base: usize,
    reference_order: bool,
    slots: usize,
) -> Result<Vec<Dispatch>> {
    let kvec = &bufs.kvec;
    ensure!(
        slots <= bufs.t_max,
        "topk: {slots} slots, scratch for {}",
        bufs.t_max
    );
    let p = CompressParams {
        t_stride: u32_of("t stride", bufs.t_max)?,
        k_stride: u32_of("k stride", bufs.t_max)?,
        window: u32_of("window", window)?,
        slots: u32_of("slots", slots)?,
        kvec_base: u32_of("kvec base", kvec_base)?,
        ..CompressParams::for_kv(kv)?
    };
    let mut out = vec![dispatch(
        ctx,
        kv,
        "topk_select",
        &p,
        &[
            (3, kv.desc.binding()),
            (10, bufs.scores.binding()),
            (14, kvec.binding()),
            (15, bufs.kept.binding()),
        ],
        [u32_of("heads", kv.n_heads)?, 1, 1],
    )?];
    if reference_order {
        out.push(dispatch(
            ctx,
            kv,
            "rank_reference",
            &p,
            &[
                (3, kv.desc.binding()),
                (10, bufs.scores.binding()),
                (14, kvec.binding()),
                (15, bufs.kept.binding()),
                (16, bufs.order.binding()),
            ],
            [blocks(slots)?, u32_of("heads", kv.n_heads)?, 1],
        )?);
    }
    Ok(out)
}

/// Moves slot `list[s][n]` of every stored head to slot `n`, for
/// `n < kvec[kvec_base + s] + window` (the list from `bufs.kept` or
/// `bufs.order`; the counts in `bufs.kvec`), with
/// `acc_units` accumulator rows per head (H2O) at `acc_base` moving along.
/// `slots`: the longest head's length before compaction (sizes the grid).
#[allow(clippy::too_many_arguments)]
pub fn compact(
    ctx: &GpuContext,
    kv: &LayerKv,
    window: usize,
    bufs: &CompressBuffers,
    kvec_base: usize,
    list: &GpuBuffer<u32>,
    acc: &GpuBuffer<f32>,
    acc_base: usize,
    acc_t_stride: usize,
    acc_units: usize,
    slots: usize,
) -> Result<[Dispatch; 2]> {
    ensure!(
        slots <= bufs.t_max,
        "compact: {slots} slots, scratch for {}",
        bufs.t_max
    );
    let p = CompressParams {
        t_stride: u32_of("acc t stride", acc_t_stride)?,
        k_stride: u32_of("k stride", bufs.t_max)?,
        window: u32_of("window", window)?,
        acc_base: u32_of("acc base", acc_base)?,
        acc_units: u32_of("acc units", acc_units)?,
        slots: u32_of("slots", slots)?,
        kvec_base: u32_of("kvec base", kvec_base)?,
        ..CompressParams::for_kv(kv)?
    };
    let kvec = &bufs.kvec;
    let words = kv.n_heads * slots * (2 * kv.layout.dw() + 1 + acc_units);
    ensure!(words <= bufs.scratch.len(), "compaction scratch too small");
    let grid = ctx.grid(blocks(words)?);
    let gather = [
        (3, kv.desc.binding()),
        (4, kv.tables.binding()),
        (5, kv.pool.binding()),
        (7, acc.binding()),
        (14, kvec.binding()),
        (15, list.binding()),
        (17, bufs.scratch.binding()),
    ];
    let scatter = [
        (3, kv.desc.binding()),
        (4, kv.tables.binding()),
        (5, kv.pool.binding()),
        (7, acc.binding()),
        (14, kvec.binding()),
        (17, bufs.scratch.binding()),
    ];
    Ok([
        dispatch(ctx, kv, "compact_gather", &p, &gather, grid)?,
        dispatch(ctx, kv, "compact_scatter", &p, &scatter, grid)?,
    ])
}

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
