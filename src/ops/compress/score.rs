//! The scoring stages: the window queries recorded in the forward, the
//! attention sums of query rows over a head's slots (score_stats +
//! score_accumulate), their reduction over rows and GQA groups, pooling,
//! and constant scores. Twins in `cpu.rs`.

use super::*;

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
