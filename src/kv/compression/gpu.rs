//! The methods on the GPU. Policy stays on the host (which method, whether a
//! layer compresses, how many slots each head keeps: the same code as the
//! CPU path); the kernels of `ops::compress` score, select and compact.
//! Used by `kvsift select` (captured tensors in a scratch pool) and by the
//! engine (a sequence's pages in the real pool).

use super::{
    Captured, CompressConfig, Granularity, Method, Pooling, Selection, SlotOrder, adakv, pyramidkv,
};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuBuffer, GpuContext};
use crate::ops::compress::{self, CompressBuffers, ScoreQueries, ScoreSpec};
use crate::ops::paged_attention::{LayerKv, PoolLayout};

/// Where a layer's scores come from.
pub enum ScoreSource<'a> {
    /// Attention of these query rows (the window's; all prompt rows for H2O v3 in `select`).
    Queries(ScoreQueries<'a>),
    /// H2O's running column sums (per query head) kept by the engine.
    Accumulated {
        acc: &'a GpuBuffer<f32>,
        base: usize,
        t_stride: usize,
    },
}

/// One (sequence, layer) to compress.
pub struct LayerJob<'a> {
    /// The sequence's view: `desc_base` points at its entry for stored head 0.
    pub kv: LayerKv<'a>,
    /// Slots each stored head holds.
    pub lens: Vec<usize>,
    pub source: ScoreSource<'a>,
    pub layer: usize,
    pub n_layers: usize,
    pub n_q_heads: usize,
    /// Query heads per model KV head.
    pub group: usize,
    /// Also rank R-KV's kept slots in the reference layout (`bufs.order`)
    /// even when the cache keeps position order (`kvsift select` reports both).
    pub rank_reference: bool,
}

/// The kept lists of one layer: recorded dispatches that fill them, and
/// per stored head the new length (kept prefix + window).
pub struct LayerKeep {
    pub dispatches: Vec<Dispatch>,
    pub new_lens: Vec<usize>,
    /// Kept prefix slots per head (`kvec`).
    pub kvec: GpuBuffer<u32>,
    /// The list to compact from when the host wrote it (StreamingLLM).
    pub host_list: Option<GpuBuffer<u32>>,
    /// The list sits in `bufs.order` (R-KV's reference layout), else `bufs.kept`.
    pub reference: bool,
}

impl LayerKeep {
    pub fn list<'b>(&'b self, bufs: &'b CompressBuffers) -> &'b GpuBuffer<u32> {
        match &self.host_list {
            Some(l) => l,
            None if self.reference => &bufs.order,
            None => &bufs.kept,
        }
    }
}

/// Stored heads per KV head for a method and granularity.
pub fn heads_per_kv(cfg: &CompressConfig, group: usize) -> usize {
    match (cfg.method, cfg.granularity) {
        (Method::Rkv, _) | (_, Granularity::KvHead) => 1,
        (_, Granularity::QueryHead) => group,
    }
}

/// Decides what layer `job.layer` keeps and records the kernels that select it
/// (AdaKV reads its scores back once to share the budget between heads).
/// `None`: nothing to compress (every head shorter than the budget, or the
/// method keeps everything).
pub fn select_layer(
    ctx: &GpuContext,
    cfg: &CompressConfig,
    job: &LayerJob,
    bufs: &CompressBuffers,
) -> Result<Option<LayerKeep>> {
    let (w, b) = (cfg.window, cfg.budget);
    let t_max = job.lens.iter().copied().max().unwrap_or(0);
    if cfg.method == Method::None || t_max < b {
        return Ok(None);
    }
    let cands: Vec<usize> = job.lens.iter().map(|&t| t.saturating_sub(w)).collect();
    // Heads shorter than the budget keep everything.
    let uniform = |k: usize| -> Vec<usize> {
        job.lens
            .iter()
            .zip(&cands)
            .map(|(&t, &c)| if t < b { c } else { k.min(c) })
            .collect()
    };
    let finish = |kvec: Vec<usize>, dispatches: Vec<Dispatch>, reference: bool, host_list| {
        Ok(Some(LayerKeep {
            new_lens: kvec.iter().map(|k| k + w).collect(),
            kvec: GpuBuffer::from_slice(
                ctx,
                "compress.kvec",
                &kvec.iter().map(|&k| k as u32).collect::<Vec<_>>(),
            )?,
            dispatches,
            host_list,
            reference,
        }))
    };
    if cfg.method == Method::StreamingLlm {
        let sinks = cfg.sinks();
        let kvec = uniform(sinks);
        let mut list = vec![0u32; job.kv.n_heads * bufs.t_max];
        for (s, (&k, &c)) in kvec.iter().zip(&cands).enumerate() {
            let row = &mut list[s * bufs.t_max..];
            let slots = (0..k).chain(c..c + w);
            for (dst, slot) in row.iter_mut().zip(slots) {
                *dst = slot as u32;
            }
        }
        let list = GpuBuffer::from_slice(ctx, "compress.list", &list)?;
        return finish(kvec, vec![], false, Some(list));
    }
    let spec = ScoreSpec {
        rkv: cfg.method == Method::Rkv,
        mean: matches!(cfg.method, Method::AdaKv | Method::Rkv),
        agg: cfg.gqa_agg,
        kernel: match cfg.method {
            Method::H2o => 1,
            _ => cfg.kernel,
        },
        pooling: if cfg.method == Method::Rkv {
            Pooling::Max
        } else {
            cfg.pooling
        },
        window: w,
        group: job.group,
    };
    let mut ds = match &job.source {
        ScoreSource::Queries(q) => compress::window_scores(ctx, &job.kv, q, &spec, bufs, t_max)?,
        ScoreSource::Accumulated {
            acc,
            base,
            t_stride,
        } => {
            if *t_stride != bufs.t_max {
                return Err(Error::invalid(
                    "compression",
                    format!(
                        "accumulators of stride {t_stride} against scratch of {}",
                        bufs.t_max
                    ),
                ));
            }
            // The reduction only needs the query-head count and the rows (sum, no mean).
            let q = ScoreQueries {
                queries: acc,
                positions: &bufs.lane0,
                base: 0,
                row_stride: 0,
                pos_base: 0,
                n_rows: 1,
                rows_per_group: 1,
                n_q_heads: job.n_q_heads,
            };
            compress::reduce_and_pool(ctx, &job.kv, &q, &spec, acc, *base, bufs, t_max)?.into()
        }
    };
    if spec.rkv {
        ds.extend(compress::rkv_redundancy(
            ctx,
            &job.kv,
            w,
            cfg.lambda,
            cfg.sim_threshold,
            cfg.eps,
            bufs,
            t_max,
        )?);
    }
    let kvec = match cfg.method {
        Method::PyramidKv => {
            // The schedule is per layer; heads of a layer have one length here.
            match pyramidkv::layer_topk(b, w, t_max, job.n_layers, job.layer, cfg.beta) {
                Some(k) => uniform(k),
                None => return Ok(None),
            }
        }
        Method::AdaKv => {
            let base = b - w;
            if cands.iter().all(|&c| base > c) {
                return Ok(None);
            }
            let refs: Vec<&Dispatch> = ds.iter().collect();
            ctx.run("kvsift.compress.adakv.scores", &refs)?;
            let all = bufs
                .scores
                .read_range(ctx, 0, job.kv.n_heads * bufs.t_max)?;
            let scores: Vec<Vec<f32>> = cands
                .iter()
                .enumerate()
                .map(|(s, &c)| all[s * bufs.t_max..][..c].to_vec())
                .collect();
            ds.clear();
            adakv::head_caps(&scores, base, cfg.floor).0
        }
        _ => uniform(b - w),
    };
    let reference = cfg.method == Method::Rkv && cfg.slot_order == SlotOrder::Reference;
    let ranked = reference || (cfg.method == Method::Rkv && job.rank_reference);
    let kvec_buf = GpuBuffer::from_slice(
        ctx,
        "compress.kvec",
        &kvec.iter().map(|&k| k as u32).collect::<Vec<_>>(),
    )?;
    ds.extend(compress::topk(
        ctx, &job.kv, w, bufs, &kvec_buf, ranked, t_max,
    )?);
    Ok(Some(LayerKeep {
        new_lens: kvec.iter().map(|k| k + w).collect(),
        kvec: kvec_buf,
        dispatches: ds,
        host_list: None,
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
    /// tests give more so strides and grid extents differ).
    pub fn upload(
        ctx: &GpuContext,
        x: &Captured,
        hpk: usize,
        kv_f16: bool,
        page_order: Option<&[usize]>,
        capacity: usize,
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
            bufs: CompressBuffers::new(ctx, layout, heads, x.hq, x.q_rows, capacity, 0)?,
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
    let hpk = heads_per_kv(cfg, x.hq / x.hkv);
    let heads = x.hkv * hpk;
    let all = || Selection {
        kept: vec![(0..x.t).collect(); heads],
        reference: (cfg.method == Method::Rkv).then(|| vec![(0..x.t).collect(); heads]),
    };
    if cfg.method == Method::None || x.t < cfg.budget {
        return Ok(all());
    }
    let scratch = ScratchPool::upload(ctx, x, hpk, false, None, x.t)?;
    let Some(keep) = select_layer(ctx, cfg, &scratch.job(x, layer, n_layers), &scratch.bufs)?
    else {
        return Ok(all());
    };
    let refs: Vec<&Dispatch> = keep.dispatches.iter().collect();
    ctx.run("kvsift.select", &refs)?;
    // Ascending lists: the host's (StreamingLLM) or top-k's (also for R-KV's
    // reference layout, which sits in bufs.order).
    let ascending = keep.host_list.as_ref().unwrap_or(&scratch.bufs.kept);
    let kept = scratch.read_lists(ctx, ascending, &keep.new_lens)?;
    let reference = if cfg.method == Method::Rkv {
        Some(scratch.read_lists(ctx, &scratch.bufs.order, &keep.new_lens)?)
    } else {
        None
    };
    Ok(Selection { kept, reference })
}
