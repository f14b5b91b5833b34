//! The stages after scoring: R-KV's redundancy mixed into the scores, exact
//! top-k (with R-KV's reference ranking), and compaction of the kept slots.

use super::*;

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
