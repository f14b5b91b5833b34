//! The runner of the methods on the GPU: one layer's selection is the
//! method's recipe ([`Policy::select_gpu`]: the stages that score the
//! candidates, the per-head budgets) followed by top-k; the caller compacts.
//! Nothing here knows a method by name. Used by `kvsift select` (captured
//! tensors in a scratch pool) and by the engine (a sequence's pages in the
//! real pool).

use super::{Captured, CompressConfig, LayerCx, LayerJob, ScoreSource, Selection, SlotOrder};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuBuffer, GpuContext};
use crate::ops::compress::{self, CompressBuffers, ScoreQueries};
use crate::ops::paged_attention::{LayerKv, PoolLayout};

/// What a layer keeps: the dispatches that rank the kept slots into a list
/// (`bufs.kept` ascending, or `bufs.order` in R-KV's reference layout), and
/// per stored head the new length (kept prefix + window).
pub struct LayerKeep {
    pub dispatches: Vec<Dispatch>,
    pub new_lens: Vec<usize>,
    /// Where the kept prefix counts sit in `bufs.kvec`.
    pub kvec_base: usize,
    /// The list sits in `bufs.order` (R-KV's reference layout), else `bufs.kept`.
    pub reference: bool,
}

impl LayerKeep {
    pub fn list<'b>(&self, bufs: &'b CompressBuffers) -> &'b GpuBuffer<u32> {
        if self.reference {
            &bufs.order
        } else {
            &bufs.kept
        }
    }
}

/// Decides what layer `job.layer` keeps and records the kernels that select
/// it. `pending`: dispatches of earlier layers not yet submitted (a recipe
/// that reads scores back runs them first). `None`: nothing to compress
/// (every head shorter than the budget, or the method keeps everything).
pub fn select_layer(
    ctx: &GpuContext,
    cfg: &CompressConfig,
    job: &LayerJob,
    bufs: &CompressBuffers,
    pending: &mut Vec<Dispatch>,
) -> Result<Option<LayerKeep>> {
    let policy = cfg.method.policy();
    let t_max = job.lens.iter().copied().max().unwrap_or(0);
    if !policy.compresses() || t_max < cfg.budget {
        return Ok(None);
    }
    let mut cx = LayerCx {
        ctx,
        cfg,
        job,
        bufs,
        pending,
        dispatches: vec![],
    };
    let Some(kvec) = policy.select_gpu(&mut cx)? else {
        return Ok(None);
    };
    let mut ds = cx.dispatches;
    if kvec.len() != job.kv.n_heads {
        return Err(Error::invalid(
            "compression",
            format!("{} budgets for {} heads", kvec.len(), job.kv.n_heads),
        ));
    }
    let reference = policy.ranks_reference() && cfg.slot_order == SlotOrder::Reference;
    let ranked = policy.ranks_reference() && (reference || job.rank_reference);
    let kvec_base = bufs.write_kvec(ctx, job.layer, &kvec)?;
    ds.extend(compress::topk(
        ctx, &job.kv, cfg.window, bufs, kvec_base, ranked, t_max,
    )?);
    Ok(Some(LayerKeep {
        new_lens: kvec.iter().map(|k| k + cfg.window).collect(),
        kvec_base,
        dispatches: ds,
        reference,
    }))
}

/// Captured tensors uploaded into a scratch pool (pages of 16, one table
/// per stored head, optionally in a shuffled page order) with the query rows,
/// ready to run through the same kernels as the engine.
pub struct ScratchPool {
    pub layout: PoolLayout,
    pub pool: GpuBuffer<u32>,
    pub desc: GpuBuffer<u32>,
    pub tables: GpuBuffer<u32>,
    pub queries: GpuBuffer<f32>,
    pub positions: GpuBuffer<u32>,
    pub bufs: CompressBuffers,
    pub heads: usize,
    pub hpk: usize,
}

impl ScratchPool {
    /// `capacity`: slots per head of the scratch buffers (at least `x.t`;
    /// tests give more so strides and grid extents differ); `layers`: the
    /// layers whose selections may share one submission.
    pub fn upload(
        ctx: &GpuContext,
        x: &Captured,
        hpk: usize,
        kv_f16: bool,
        page_order: Option<&[usize]>,
        capacity: usize,
        layers: usize,
    ) -> Result<Self> {
        if capacity < x.t {
            return Err(Error::invalid(
                "compression",
                format!("scratch of {capacity} slots for {}", x.t),
            ));
        }
        let heads = x.hkv * hpk;
        let layout = PoolLayout {
            page_size: 16,
            head_dim: x.d,
            kv_f16,
        };
        // Stored head s holds the keys of KV head s / hpk.
        let mut keys = Vec::with_capacity(heads * x.t * x.d);
        for s in 0..heads {
            keys.extend_from_slice(x.key_head(s / hpk));
        }
        let (pool, desc, tables) = compress::pool_from_keys(layout, &keys, heads, x.t, page_order);
        // Queries as rows [q_rows][hq * d], positions of the last q_rows tokens.
        let width = x.hq * x.d;
        let mut rows = vec![0f32; x.q_rows * width];
        for h in 0..x.hq {
            for r in 0..x.q_rows {
                rows[r * width + h * x.d..][..x.d]
                    .copy_from_slice(&x.query_head(h)[r * x.d..][..x.d]);
            }
        }
        let qpos: Vec<u32> = (x.t - x.q_rows.min(x.t)..x.t).map(|p| p as u32).collect();
        Ok(Self {
            layout,
            pool: GpuBuffer::from_slice(ctx, "select.pool", &pool)?,
            desc: GpuBuffer::from_slice(ctx, "select.desc", &desc)?,
            tables: GpuBuffer::from_slice(ctx, "select.tables", &tables)?,
            queries: GpuBuffer::from_slice(ctx, "select.queries", &rows)?,
            positions: GpuBuffer::from_slice(ctx, "select.positions", &qpos)?,
            bufs: CompressBuffers::new(ctx, layout, heads, x.hq, x.q_rows, capacity, 0, layers)?,
            heads,
            hpk,
        })
    }

    pub fn kv(&self) -> LayerKv<'_> {
        LayerKv {
            layout: self.layout,
            pool: &self.pool,
            desc: &self.desc,
            tables: &self.tables,
            desc_base: 0,
            n_heads: self.heads,
            heads_per_kv: self.hpk,
        }
    }

    pub fn job(&self, x: &Captured, layer: usize, n_layers: usize) -> LayerJob<'_> {
        LayerJob {
            kv: self.kv(),
            lens: vec![x.t; self.heads],
            source: ScoreSource::Queries(ScoreQueries {
                queries: &self.queries,
                positions: &self.positions,
                base: 0,
                row_stride: x.hq * x.d,
                pos_base: 0,
                n_rows: x.q_rows,
                rows_per_group: x.q_rows,
                n_q_heads: x.hq,
            }),
            layer,
            n_layers,
            n_q_heads: x.hq,
            group: x.hq / x.hkv,
            rank_reference: true,
        }
    }

    /// Reads `n[s]` entries of each stored head's list.
    pub fn read_lists(
        &self,
        ctx: &GpuContext,
        buf: &GpuBuffer<u32>,
        n: &[usize],
    ) -> Result<Vec<Vec<usize>>> {
        let words = buf.read(ctx)?;
        let stride = self.bufs.t_max;
        Ok(n.iter()
            .enumerate()
            .map(|(s, &n)| {
                words[s * stride..][..n]
                    .iter()
                    .map(|&v| v as usize)
                    .collect()
            })
            .collect())
    }
}

/// `kvsift select` on the GPU: the captured tensors go into a scratch pool
/// (f32 slots) and run through the same kernels as the engine.
pub fn select_gpu(
    ctx: &GpuContext,
    cfg: &CompressConfig,
    x: &Captured,
    layer: usize,
    n_layers: usize,
) -> Result<Selection> {
    cfg.validate()?;
    x.check(cfg)?;
    let policy = cfg.method.policy();
    let hpk = cfg.heads_per_kv(x.hq / x.hkv);
    let heads = x.hkv * hpk;
    let all = || Selection {
        kept: vec![(0..x.t).collect(); heads],
        reference: policy
            .ranks_reference()
            .then(|| vec![(0..x.t).collect(); heads]),
    };
    if !policy.compresses() || x.t < cfg.budget {
        return Ok(all());
    }
    let scratch = ScratchPool::upload(ctx, x, hpk, false, None, x.t, n_layers.max(layer + 1))?;
    let mut pending = vec![];
    let Some(keep) = select_layer(
        ctx,
        cfg,
        &scratch.job(x, layer, n_layers),
        &scratch.bufs,
        &mut pending,
    )?
    else {
        return Ok(all());
    };
    pending.extend(keep.dispatches);
    ctx.run("kvsift.select", &pending.iter().collect::<Vec<_>>())?;
    // Ascending lists from top-k (also for R-KV's reference layout, which
    // sits in bufs.order).
    let kept = scratch.read_lists(ctx, &scratch.bufs.kept, &keep.new_lens)?;
    let reference = if policy.ranks_reference() {
        Some(scratch.read_lists(ctx, &scratch.bufs.order, &keep.new_lens)?)
    } else {
        None
    };
    Ok(Selection { kept, reference })
}
