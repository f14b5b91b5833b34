//! The stages against their CPU twins (`cpu.rs`) on seeded inputs.
use super::cpu::{HostHead, SumSpec, attention_sums_cpu, pool_cpu, reduce_cpu, redundancy_cpu};
use super::*;
use crate::testing::{Rng, assert_nmse, gpu};

/// Ranked top-k on the host: descending score, ties to the lower slot.
fn topk_ranked(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// A layer view of `heads` heads of `lens` slots over a pool that holds no
/// keys (for kernels that only read lengths and scores).
struct Bare {
    pool: GpuBuffer<u32>,
    desc: GpuBuffer<u32>,
    tables: GpuBuffer<u32>,
    layout: PoolLayout,
    heads: usize,
}

impl Bare {
    fn new(ctx: &GpuContext, lens: &[usize]) -> Self {
        let desc: Vec<u32> = lens.iter().flat_map(|&l| [0, l as u32]).collect();
        Self {
            pool: GpuBuffer::zeros(ctx, "bare.pool", 4).unwrap(),
            desc: GpuBuffer::from_slice(ctx, "bare.desc", &desc).unwrap(),
            tables: GpuBuffer::zeros(ctx, "bare.tables", 1).unwrap(),
            layout: PoolLayout {
                page_size: 1,
                head_dim: 2,
                kv_f16: false,
            },
            heads: lens.len(),
        }
    }
    fn kv(&self) -> LayerKv<'_> {
        LayerKv {
            layout: self.layout,
            pool: &self.pool,
            desc: &self.desc,
            tables: &self.tables,
            desc_base: 0,
            n_heads: self.heads,
            heads_per_kv: 1,
        }
    }
}

/// Radix top-k against sorting on the CPU: scores with many exact ties
/// (few distinct values, negatives and zeros), every k from 0 to C, up to
/// C = 131072 candidates; kept slots ascending then the window, and the
/// reference ranking (descending score, ties to the lower slot).
#[test]
fn topk_is_exact_with_ties_to_the_lower_slot() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng::new(11);
    let w = 4;
    for &(c, distinct) in &[(1usize, 3usize), (255, 5), (1000, 40), (131072, 1000)] {
        let heads = 2;
        let t = c + w;
        let bare = Bare::new(ctx, &vec![t; heads]);
        // Scratch longer than the heads: grids follow the heads, strides the scratch.
        let cap = t + 37;
        let bufs = CompressBuffers::new(ctx, bare.layout, heads, 1, 1, cap, 0, 2).unwrap();
        let mut scores = vec![0f32; heads * cap];
        for v in scores.iter_mut() {
            *v = (rng.below(distinct) as f32 - distinct as f32 / 3.0) * 0.125;
        }
        bufs.scores.write(ctx, 0, &scores).unwrap();
        let ks: Vec<usize> = if c < 4 {
            (0..=c).collect()
        } else {
            vec![0, 1, c / 3, c - 1, c]
        };
        for &k in &ks {
            // Layer 1's region: the base reaches the kernels.
            let base = bufs.write_kvec(ctx, 1, &[k, c - k]).unwrap();
            let ranked = c <= 1000;
            let ds = topk(ctx, &bare.kv(), w, &bufs, base, ranked, t).unwrap();
            ctx.run("test.topk", &ds.iter().collect::<Vec<_>>())
                .unwrap();
            let kept = bufs.kept.read(ctx).unwrap();
            let order = bufs.order.read(ctx).unwrap();
            for (s, k) in [k, c - k].into_iter().enumerate() {
                let sc = &scores[s * cap..][..c];
                let ranked_cpu = topk_ranked(sc, k);
                let mut want = ranked_cpu.clone();
                want.sort_unstable();
                want.extend(c..t);
                let got: Vec<usize> = kept[s * cap..][..k + w]
                    .iter()
                    .map(|&v| v as usize)
                    .collect();
                assert_eq!(got, want, "C={c} k={k} head {s}");
                if ranked {
                    let mut want = ranked_cpu;
                    want.extend(c..t);
                    let got: Vec<usize> = order[s * cap..][..k + w]
                        .iter()
                        .map(|&v| v as usize)
                        .collect();
                    assert_eq!(got, want, "reference order C={c} k={k} head {s}");
                }
            }
        }
    }
}

/// Compaction moves each head's listed slots (K, V, position words and
/// the accumulators) to slots 0.. through shuffled tables, bit-exact
/// against a host gather, f32 and f16 layouts.
#[test]
fn compaction_moves_the_listed_slots_bit_exactly() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng::new(5);
    for kv_f16 in [false, true] {
        let layout = PoolLayout {
            page_size: 16,
            head_dim: 64,
            kv_f16,
        };
        let (heads, t, w, acc_units) = (3usize, 70usize, 4usize, 2usize);
        let per_head = t.div_ceil(16);
        let mut order: Vec<usize> = (0..heads * per_head).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let (_, desc, tables) =
            pool_from_keys(layout, &vec![0.0; heads * t * 64], heads, t, Some(&order));
        let pool: Vec<u32> = (0..heads * per_head * layout.page_words())
            .map(|_| rng.next_u64() as u32)
            .collect();
        let acc: Vec<f32> = rng.normals(heads * acc_units * t);
        let g_pool = GpuBuffer::from_slice(ctx, "pool", &pool).unwrap();
        let g_desc = GpuBuffer::from_slice(ctx, "desc", &desc).unwrap();
        let g_tables = GpuBuffer::from_slice(ctx, "tables", &tables).unwrap();
        let g_acc = GpuBuffer::from_slice(ctx, "acc", &acc).unwrap();
        let kv = LayerKv {
            layout,
            pool: &g_pool,
            desc: &g_desc,
            tables: &g_tables,
            desc_base: 0,
            n_heads: heads,
            heads_per_kv: 1,
        };
        // Scratch longer than the heads: the grid follows the heads, list strides the scratch.
        let cap = t + 37;
        let bufs = CompressBuffers::new(ctx, layout, heads, 1, 1, cap, acc_units, 3).unwrap();
        // Per head: a random subset of the candidates (shuffled for one head) plus the window.
        let c = t - w;
        let ks = [0usize, 17, c];
        let mut lists = vec![0u32; heads * cap];
        let mut want_lists = vec![];
        for (s, &k) in ks.iter().enumerate() {
            let mut pick: Vec<usize> = (0..c).collect();
            for i in (1..c).rev() {
                pick.swap(i, rng.below(i + 1));
            }
            pick.truncate(k);
            if s != 1 {
                pick.sort_unstable();
            }
            pick.extend(c..t);
            for (n, &v) in pick.iter().enumerate() {
                lists[s * cap + n] = v as u32;
            }
            want_lists.push(pick);
        }
        let list = GpuBuffer::from_slice(ctx, "list", &lists).unwrap();
        let base = bufs.write_kvec(ctx, 2, &ks).unwrap();
        let ds = compact(ctx, &kv, w, &bufs, base, &list, &g_acc, 0, t, acc_units, t).unwrap();
        ctx.run("test.compact", &ds.iter().collect::<Vec<_>>())
            .unwrap();
        let after = g_pool.read(ctx).unwrap();
        let acc_after = g_acc.read(ctx).unwrap();
        let dw = layout.dw();
        let slot = |s: usize, n: usize| {
            let page = tables[s * per_head + n / 16] as usize;
            (
                layout.page_start(page) + layout.key_at(n % 16),
                layout.page_start(page) + layout.value_at(n % 16),
                layout.page_start(page) + layout.position_at(n % 16),
            )
        };
        for (s, list) in want_lists.iter().enumerate() {
            for (n, &src) in list.iter().enumerate() {
                let (k1, v1, p1) = slot(s, n);
                let (k0, v0, p0) = slot(s, src);
                assert_eq!(after[k1..k1 + dw], pool[k0..k0 + dw], "K head {s} slot {n}");
                assert_eq!(after[v1..v1 + dw], pool[v0..v0 + dw], "V head {s} slot {n}");
                assert_eq!(after[p1], pool[p0], "position head {s} slot {n}");
                for u in 0..acc_units {
                    let row = (s * acc_units + u) * t;
                    assert_eq!(
                        acc_after[row + n].to_bits(),
                        acc[row + src].to_bits(),
                        "acc head {s} unit {u} slot {n}"
                    );
                }
            }
            // Accumulators past the new length start from zero again.
            for n in list.len()..t {
                for u in 0..acc_units {
                    assert_eq!(
                        acc_after[(s * acc_units + u) * t + n],
                        0.0,
                        "acc past the end"
                    );
                }
            }
        }
    }
}

/// A layer of `lens.len()` stored heads holding random keys (slot t at
/// position t) through shuffled page tables, f32 or f16 slots; also the
/// keys as the slots hold them (f16-rounded) for the twins.
struct Keyed {
    pool: GpuBuffer<u32>,
    desc: GpuBuffer<u32>,
    tables: GpuBuffer<u32>,
    layout: PoolLayout,
    lens: Vec<usize>,
    stored: Vec<f32>,
    t: usize,
}

impl Keyed {
    fn new(ctx: &GpuContext, rng: &mut Rng, lens: &[usize], d: usize, kv_f16: bool) -> Self {
        let layout = PoolLayout {
            page_size: 16,
            head_dim: d,
            kv_f16,
        };
        let (heads, t) = (lens.len(), lens.iter().copied().max().unwrap_or(1));
        let mut keys = rng.normals(heads * t * d);
        // Near-duplicates, so R-KV's last(i) rule fires.
        for i in (5..heads * t).step_by(7) {
            for j in 0..d {
                keys[i * d + j] = keys[(i - 3) * d + j] + 0.01 * rng.normal();
            }
        }
        let stored: Vec<f32> = if kv_f16 {
            keys.iter()
                .map(|v| half::f16::from_f32(*v).to_f32())
                .collect()
        } else {
            keys.clone()
        };
        let n_pages = heads * t.div_ceil(16);
        let mut order: Vec<usize> = (0..n_pages).collect();
        for i in (1..n_pages).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let (pool, mut desc, tables) = pool_from_keys(layout, &keys, heads, t, Some(&order));
        for (h, &len) in lens.iter().enumerate() {
            desc[2 * h + 1] = len as u32;
        }
        Self {
            pool: GpuBuffer::from_slice(ctx, "keyed.pool", &pool).unwrap(),
            desc: GpuBuffer::from_slice(ctx, "keyed.desc", &desc).unwrap(),
            tables: GpuBuffer::from_slice(ctx, "keyed.tables", &tables).unwrap(),
            layout,
            lens: lens.to_vec(),
            stored,
            t,
        }
    }

    fn kv(&self) -> LayerKv<'_> {
        LayerKv {
            layout: self.layout,
            pool: &self.pool,
            desc: &self.desc,
            tables: &self.tables,
            desc_base: 0,
            n_heads: self.lens.len(),
            heads_per_kv: 1,
        }
    }

    /// Head h's keys `[len][d]` as stored.
    fn keys(&self, h: usize) -> &[f32] {
        let d = self.layout.head_dim;
        &self.stored[h * self.t * d..][..self.lens[h] * d]
    }
}

fn run(ctx: &GpuContext, ds: &[Dispatch]) {
    ctx.run("test.stage", &ds.iter().collect::<Vec<_>>())
        .unwrap();
}

/// `score_stats` + `score_accumulate` against `attention_sums_cpu`: window
/// rows (masked inside the window) and all rows of a prompt, GQA groups of
/// 1, 2 and 4, query-head granularity, R-KV's group-max units over the
/// candidates, heads of different lengths, f32 and f16 slots, head dims 64
/// and 128, one to several workgroups of slots. Tolerance: NMSE 1e-9.
#[test]
fn attention_sums_match_their_twin() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng::new(21);
    // (stored-head lens, group, units per stored head, rows, d, rkv, f16)
    type Case<'a> = (&'a [usize], usize, usize, usize, usize, bool, bool);
    let cases: &[Case] = &[
        (&[9], 1, 1, 8, 64, false, false),
        (&[300, 297], 2, 2, 8, 64, false, true),
        (&[520, 511], 4, 4, 16, 128, false, false),
        (&[40, 40, 33, 40], 2, 1, 40, 64, false, false),
        (&[300, 290], 2, 2, 8, 128, true, false),
        (&[700], 4, 4, 4, 64, true, true),
    ];
    for &(lens, group, uph, rows, d, rkv, f16) in cases {
        let layer = Keyed::new(ctx, &mut rng, lens, d, f16);
        let n_heads = lens.len();
        let hq = if uph == 1 { n_heads } else { n_heads * group };
        let t = layer.t;
        let queries: Vec<Vec<f32>> = (0..rows).map(|_| rng.normals(hq * d)).collect();
        let qpos: Vec<u32> = (t - rows..t).map(|p| p as u32).collect();
        let flat: Vec<f32> = queries.concat();
        let qbuf = GpuBuffer::from_slice(ctx, "q", &flat).unwrap();
        let pbuf = GpuBuffer::from_slice(ctx, "qpos", &qpos).unwrap();
        let units = if rkv { n_heads } else { hq };
        let cap = t + 37;
        let bufs =
            CompressBuffers::new(ctx, layer.layout, n_heads, units, rows, cap, 0, 1).unwrap();
        let q = ScoreQueries {
            queries: &qbuf,
            positions: &pbuf,
            base: 0,
            row_stride: hq * d,
            pos_base: 0,
            n_rows: rows,
            rows_per_group: rows,
            n_q_heads: hq,
        };
        let w = 4;
        let spec = ScoreSpec {
            rkv,
            mean: false,
            agg: GqaAgg::Mean,
            kernel: 1,
            pooling: Pooling::Max,
            window: w,
            group,
        };
        let kv = layer.kv();
        run(
            ctx,
            &score_accumulate(
                ctx,
                &kv,
                &q,
                &spec,
                &bufs.stats,
                &bufs.acc,
                &bufs.lane0,
                0,
                0,
                cap,
                t,
                false,
            )
            .unwrap(),
        );
        let got = bufs.acc.read(ctx).unwrap();
        let positions: Vec<Vec<u32>> = lens.iter().map(|&l| (0..l as u32).collect()).collect();
        let heads: Vec<HostHead> = (0..n_heads)
            .map(|h| HostHead {
                keys: layer.keys(h),
                positions: &positions[h],
            })
            .collect();
        let want = attention_sums_cpu(
            &heads,
            &queries,
            &qpos,
            &SumSpec {
                d,
                group,
                units_per_head: hq / n_heads,
                rkv,
                window: w,
            },
        );
        for (u, want) in want.iter().enumerate() {
            assert_nmse(
                &format!("lens {lens:?} group {group} rkv {rkv} f16 {f16} unit {u}"),
                &got[u * cap..][..want.len()],
                want,
                1e-9,
            );
        }
    }
}

/// `score_reduce` alone against `reduce_cpu`: every GQA reduction, row sum
/// and mean, one and four units per head, heads of different lengths.
#[test]
fn reduce_matches_its_twin() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng::new(22);
    let lens = [300usize, 9, 281];
    let (w, rows, cap) = (8, 5, 320);
    for uph in [1usize, 4] {
        for agg in [GqaAgg::Mean, GqaAgg::Max, GqaAgg::Sum] {
            for mean in [false, true] {
                let bare = Bare::new(ctx, &lens);
                let units = lens.len() * uph;
                let bufs =
                    CompressBuffers::new(ctx, bare.layout, lens.len(), units, rows, cap, 0, 1)
                        .unwrap();
                let acc: Vec<f32> = (0..units * cap).map(|_| rng.uniform()).collect();
                bufs.acc.write(ctx, 0, &acc).unwrap();
                let q = ScoreQueries {
                    queries: &bufs.acc,
                    positions: &bufs.lane0,
                    base: 0,
                    row_stride: 0,
                    pos_base: 0,
                    n_rows: rows,
                    rows_per_group: rows,
                    n_q_heads: units,
                };
                let spec = ScoreSpec {
                    rkv: false,
                    mean,
                    agg,
                    kernel: 1,
                    pooling: Pooling::Max,
                    window: w,
                    group: uph,
                };
                let [reduce, _] =
                    reduce_and_pool(ctx, &bare.kv(), &q, &spec, &bufs.acc, 0, &bufs, 300).unwrap();
                run(ctx, &[reduce]);
                let got = bufs.raw.read(ctx).unwrap();
                let acc64: Vec<Vec<f64>> = acc
                    .chunks(cap)
                    .map(|r| r.iter().map(|v| *v as f64).collect())
                    .collect();
                let want = reduce_cpu(&acc64, &lens, w, uph, mean.then_some(rows), agg);
                for (s, want) in want.iter().enumerate() {
                    assert_nmse(
                        &format!("{agg:?} mean {mean} uph {uph} head {s}"),
                        &got[s * cap..][..want.len()],
                        want,
                        1e-12,
                    );
                }
            }
        }
    }
}

/// `score_pool` alone against `pool_cpu` (kernels 1, 3, 7; max and avg),
/// and `fill_scores`: every candidate, nothing past them.
#[test]
fn pool_and_fill_match_their_twins() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng::new(23);
    let lens = [300usize, 9, 1];
    let (w, cap) = (8, 310);
    let bare = Bare::new(ctx, &lens);
    let bufs = CompressBuffers::new(ctx, bare.layout, lens.len(), 1, 1, cap, 0, 1).unwrap();
    for kernel in [1usize, 3, 7] {
        for pooling in [Pooling::Max, Pooling::Avg] {
            let raw = rng.normals(lens.len() * cap);
            bufs.raw.write(ctx, 0, &raw).unwrap();
            let q = ScoreQueries {
                queries: &bufs.acc,
                positions: &bufs.lane0,
                base: 0,
                row_stride: 0,
                pos_base: 0,
                n_rows: 1,
                rows_per_group: 1,
                n_q_heads: lens.len(),
            };
            let spec = ScoreSpec {
                rkv: false,
                mean: false,
                agg: GqaAgg::Mean,
                kernel,
                pooling,
                window: w,
                group: 1,
            };
            let [_, pool] =
                reduce_and_pool(ctx, &bare.kv(), &q, &spec, &bufs.acc, 0, &bufs, 300).unwrap();
            run(ctx, &[pool]);
            let got = bufs.scores.read(ctx).unwrap();
            for (s, &len) in lens.iter().enumerate() {
                let c = len.saturating_sub(w);
                let row: Vec<f64> = raw[s * cap..][..c].iter().map(|v| *v as f64).collect();
                let want = pool_cpu(&row, kernel, pooling);
                assert_nmse(
                    &format!("{pooling:?} kernel {kernel} head {s}"),
                    &got[s * cap..][..c],
                    &want,
                    1e-12,
                );
            }
        }
    }
    bufs.scores
        .write(ctx, 0, &vec![7.0; lens.len() * cap])
        .unwrap();
    run(
        ctx,
        &[fill_scores(ctx, &bare.kv(), w, 0.25, &bufs, 300).unwrap()],
    );
    let got = bufs.scores.read(ctx).unwrap();
    for (s, &len) in lens.iter().enumerate() {
        let c = len.saturating_sub(w);
        for (t, v) in got[s * cap..][..cap].iter().enumerate() {
            assert_eq!(*v, if t < c { 0.25 } else { 7.0 }, "head {s} slot {t}");
        }
    }
}

/// `key_norms` .. `rkv_combine` against `redundancy_cpu`: the importance in
/// `scores` mixed with the redundancy, one head to several, heads of
/// different lengths, past one 32-row tile and past 2048 slots, f32 and f16
/// slots. Tolerance: NMSE 1e-9.
#[test]
fn redundancy_matches_its_twin() {
    let Some(ctx) = gpu() else { return };
    let mut rng = Rng::new(24);
    let cases: &[(&[usize], usize, bool)] = &[
        (&[9], 64, false),
        (&[300, 263], 128, true),
        (&[700], 64, false),
        (&[2200], 64, true),
    ];
    for &(lens, d, f16) in cases {
        let layer = Keyed::new(ctx, &mut rng, lens, d, f16);
        let (w, lambda) = (8, 0.3f32);
        let cap = layer.t + 37;
        let bufs = CompressBuffers::new(ctx, layer.layout, lens.len(), 1, 1, cap, 0, 1).unwrap();
        let importance: Vec<f32> = (0..lens.len() * cap)
            .map(|_| rng.uniform() * 0.01)
            .collect();
        bufs.scores.write(ctx, 0, &importance).unwrap();
        run(
            ctx,
            &rkv_redundancy(ctx, &layer.kv(), w, lambda, 0.5, 1e-8, &bufs, layer.t).unwrap(),
        );
        let got = bufs.scores.read(ctx).unwrap();
        for (s, _) in lens.iter().enumerate() {
            let imp: Vec<f64> = importance[s * cap..][..cap]
                .iter()
                .map(|v| *v as f64)
                .collect();
            let want = redundancy_cpu(layer.keys(s), d, w, lambda as f64, 0.5, 1e-8, &imp);
            assert_nmse(
                &format!("lens {lens:?} f16 {f16} head {s}"),
                &got[s * cap..][..want.len()],
                &want,
                1e-9,
            );
        }
    }
}
