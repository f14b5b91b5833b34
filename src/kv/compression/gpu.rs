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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::compression::{Granularity, H2oVersion, Method, rkv, snapkv};
    use crate::ops::compress::{GqaAgg, Pooling, ScoreSpec, rkv_redundancy, window_scores};
    use crate::testing::{Rng, assert_nmse, gpu};

    const LAMBDA: f32 = 0.3;
    fn f16_round(v: &[f32]) -> Vec<f32> {
        v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect()
    }

    /// The recipes' scoring stages chained on the GPU against the methods'
    /// references (snapkv::scores, rkv::scores, f64) on seeded inputs: candidate counts 1, non-multiples
    /// of the workgroup and several workgroups, head dims 64 and 128, f32 and
    /// f16 slots, both granularities and every GQA reduction. Tolerance: NMSE 1e-9.
    #[test]
    fn window_and_rkv_scores_match_the_cpu_twins() {
        let Some(ctx) = gpu() else { return };
        let mut rng = Rng::new(7);
        let cases = [
            // (hkv, group, t, d, window, kv_f16)
            (1, 1, 9, 64, 8, false),
            (2, 2, 300, 64, 8, false),
            (2, 4, 300, 128, 16, false),
            (1, 1, 520, 128, 8, false),
            (2, 4, 700, 128, 16, false),
            (1, 2, 261, 128, 4, true),
            // Past 2048 slots: R-KV's row pass uses the whole workgroup per row.
            (1, 1, 2200, 64, 8, false),
            // Past one score_stats range of 8192 slots (R-KV's T^2 twin skipped).
            (1, 2, 9000, 64, 8, true),
        ];
        for &(hkv, g, t, d, w, kv_f16) in &cases {
            let hq = hkv * g;
            let mut keys = rng.normals(hkv * t * d);
            // Some near-duplicate keys so the redundancy rule fires.
            for i in (5..t).step_by(7) {
                for j in 0..d {
                    keys[i * d + j] = keys[(i - 3) * d + j] + 0.01 * rng.normal();
                }
            }
            let queries = rng.normals(hq * w * d);
            let cpu_keys = if kv_f16 {
                f16_round(&keys)
            } else {
                keys.clone()
            };
            let x = Captured {
                keys: &keys,
                queries: &queries,
                hkv,
                hq,
                t,
                q_rows: w,
                d,
            };
            let xc = Captured {
                keys: &cpu_keys,
                ..x
            };
            let methods: &[(Method, Granularity, GqaAgg, Pooling)] = &[
                (
                    Method::SnapKv,
                    Granularity::KvHead,
                    GqaAgg::Mean,
                    Pooling::Max,
                ),
                (
                    Method::SnapKv,
                    Granularity::KvHead,
                    GqaAgg::Max,
                    Pooling::Avg,
                ),
                (
                    Method::SnapKv,
                    Granularity::QueryHead,
                    GqaAgg::Sum,
                    Pooling::Max,
                ),
                (
                    Method::AdaKv,
                    Granularity::KvHead,
                    GqaAgg::Sum,
                    Pooling::Max,
                ),
                (Method::H2o, Granularity::KvHead, GqaAgg::Mean, Pooling::Max),
                (Method::Rkv, Granularity::KvHead, GqaAgg::Mean, Pooling::Max),
            ];
            for &(method, granularity, agg, pooling) in methods {
                if method == Method::Rkv && t > 2400 {
                    continue;
                }
                let mut cfg = CompressConfig::new(method, w + 1);
                cfg.window = w;
                cfg.granularity = granularity;
                cfg.gqa_agg = agg;
                cfg.pooling = pooling;
                cfg.h2o_version = H2oVersion::V1;
                cfg.lambda = LAMBDA;
                let want: Vec<Vec<f32>> = if method == Method::Rkv {
                    rkv::scores(&cfg, &xc)
                } else if method == Method::H2o {
                    snapkv::scores(&cfg, &xc, false, false)
                } else if method == Method::AdaKv {
                    snapkv::scores(&cfg, &xc, true, true)
                } else {
                    snapkv::scores(&cfg, &xc, false, true)
                };
                let hpk = cfg.heads_per_kv(g);
                let order: Vec<usize> = {
                    let n = hkv * hpk * t.div_ceil(16);
                    let mut o: Vec<usize> = (0..n).collect();
                    for i in (1..n).rev() {
                        o.swap(i, rng.below(i + 1));
                    }
                    o
                };
                // Scratch longer than the heads: grids follow the heads, strides the scratch.
                let sp =
                    ScratchPool::upload(ctx, &x, hpk, kv_f16, Some(&order), t + 37, 1).unwrap();
                let job = sp.job(&x, 0, 1);
                let spec = ScoreSpec {
                    rkv: method == Method::Rkv,
                    mean: method == Method::AdaKv || method == Method::Rkv,
                    agg,
                    kernel: if method == Method::H2o { 1 } else { cfg.kernel },
                    pooling: if method == Method::Rkv {
                        Pooling::Max
                    } else {
                        pooling
                    },
                    window: w,
                    group: g,
                };
                let crate::kv::compression::ScoreSource::Queries(q) = &job.source else {
                    unreachable!()
                };
                let mut ds = window_scores(ctx, &job.kv, q, &spec, &sp.bufs, t).unwrap();
                if spec.rkv {
                    ds.extend(
                        rkv_redundancy(ctx, &job.kv, w, LAMBDA, 0.5, 1e-8, &sp.bufs, t).unwrap(),
                    );
                }
                ctx.run("test.scores", &ds.iter().collect::<Vec<_>>())
                    .unwrap();
                let got = sp.bufs.scores.read(ctx).unwrap();
                let c = t - w;
                for (s, want) in want.iter().enumerate() {
                    let w64: Vec<f64> = want.iter().map(|v| *v as f64).collect();
                    assert_nmse(
                        &format!(
                            "{method:?} {granularity:?} {agg:?} t={t} d={d} f16={kv_f16} head {s}"
                        ),
                        &got[s * sp.bufs.t_max..][..c],
                        &w64,
                        1e-9,
                    );
                }
            }
        }
    }
}
