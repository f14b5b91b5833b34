//! AdaKV and H2O v3 on the decode schedule, where the engine's heads end
//! with different lengths (AdaKV shares the budget between them) or scores
//! accumulate over every query the cache has seen (H2O v3): a CPU replay
//! that follows each head's own slots and each slot's running sum, against
//! the engine's pool, rings, sums and compression passes.

use super::*;

/// Per KV head, the positions it holds in slot order after replaying the
/// stream `c` with `cfg` (AdaKV or H2O v3), heads free to differ in length.
fn replay_ragged(c: &Case, cfg: &CompressConfig) -> Vec<Vec<usize>> {
    let (ks, keys) = c.f32s("keys");
    let (qs, queries) = c.f32s("queries");
    let (hkv, n, d, hq) = (ks[0], ks[1], ks[2], qs[0]);
    let g = hq / hkv;
    let (p_len, w, b) = (c.u("prompt_len"), cfg.window, cfg.budget);
    let key = |h: usize, p: usize| &keys[(h * n + p) * d..][..d];
    let query = |h: usize, p: usize| &queries[(h * n + p) * d..][..d];
    let h2o = cfg.method == Method::H2o;
    let mut cache: Vec<Vec<usize>> = vec![vec![]; hkv];
    // H2O's running column sums per query head, by position (a slot's sum
    // moves with it).
    let mut sums = vec![vec![0f64; n]; hq];
    let scale = 1.0 / (d as f64).sqrt();
    let attend = |sums: &mut Vec<Vec<f64>>, cache: &[Vec<usize>], p: usize| {
        for (h, row) in sums.iter_mut().enumerate() {
            let slots: Vec<usize> = cache[h / g].iter().copied().filter(|&s| s <= p).collect();
            let logits: Vec<f64> = slots
                .iter()
                .map(|&s| {
                    let (q, k) = (query(h, p), key(h / g, s));
                    q.iter()
                        .zip(k)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            for (&s, l) in slots.iter().zip(&logits) {
                row[s] += (l - m).exp() / z;
            }
        }
    };
    let compress = |cache: &mut Vec<Vec<usize>>, sums: &Vec<Vec<f64>>, q_end: usize| {
        if cache.iter().map(Vec::len).max().unwrap_or(0) < b {
            return;
        }
        let scores: Vec<Vec<f32>> = (0..hkv)
            .map(|kh| {
                let slots = &cache[kh];
                let c = slots.len().saturating_sub(w);
                if h2o {
                    let rows: Vec<Vec<f64>> = (0..g)
                        .map(|j| slots[..c].iter().map(|&s| sums[kh * g + j][s]).collect())
                        .collect();
                    common::to_f32(&common::group_reduce(&rows, g, cfg.gqa_agg)[0])
                } else {
                    let kbuf: Vec<f32> = slots.iter().flat_map(|&s| key(kh, s).to_vec()).collect();
                    let qbuf: Vec<f32> = (0..g)
                        .flat_map(|j| {
                            (q_end + 1 - w..=q_end).flat_map(move |p| query(kh * g + j, p).to_vec())
                        })
                        .collect();
                    let x = Captured {
                        keys: &kbuf,
                        queries: &qbuf,
                        hkv: 1,
                        hq: g,
                        t: slots.len(),
                        q_rows: w,
                        d,
                    };
                    snapkv::scores(cfg, &x, true, true).remove(0)
                }
            })
            .collect();
        let caps: Vec<usize> = if h2o {
            cache
                .iter()
                .map(|s| {
                    if s.len() < b {
                        s.len() - w.min(s.len())
                    } else {
                        b - w
                    }
                })
                .collect()
        } else {
            if scores.iter().all(|s| b - w > s.len()) {
                return;
            }
            adakv::head_caps(&scores, b - w, cfg.floor).0
        };
        for (kh, slots) in cache.iter_mut().enumerate() {
            let ranked = common::topk_ranked(&scores[kh], caps[kh]);
            let kept = common::kept_with_window(ranked, slots.len(), w);
            *slots = kept.iter().map(|&s| slots[s]).collect();
        }
    };
    for slots in cache.iter_mut() {
        slots.extend(0..p_len);
    }
    if h2o {
        for p in 0..p_len {
            attend(&mut sums, &cache, p);
        }
    }
    if p_len >= b {
        compress(&mut cache, &sums, p_len - 1);
    }
    for p in p_len..n {
        for slots in cache.iter_mut() {
            slots.push(p);
        }
        if h2o {
            attend(&mut sums, &cache, p);
        }
        if cfg.schedule == Schedule::Decode && p % cfg.buffer == 0 {
            compress(&mut cache, &sums, p);
        }
    }
    cache
}

/// The replay agrees with the uniform one where heads stay equal (AdaKV at
/// prefill, once), so it replays the contract.
#[test]
fn the_ragged_replay_equals_the_uniform_one_at_prefill() {
    for c in &cases("rkv_stream") {
        let base = config(c);
        let mut cfg = CompressConfig::new(Method::AdaKv, base.budget);
        cfg.window = base.window;
        cfg.schedule = Schedule::Prefill;
        assert_eq!(replay_ragged(c, &cfg), replay_cpu(c, &cfg), "{}", c.name);
    }
}

#[test]
fn adakv_and_h2o_v3_on_the_decode_schedule_follow_the_cpu_replay() {
    let Some(ctx) = kvsift::testing::gpu() else {
        return;
    };
    let mut ragged = 0;
    for c in &cases("rkv_stream") {
        let base = config(c);
        for method in [Method::AdaKv, Method::H2o] {
            let mut cfg = CompressConfig::new(method, base.budget);
            cfg.window = base.window;
            cfg.buffer = base.buffer;
            cfg.schedule = Schedule::Decode;
            let (got, _, _) = replay_on_the_engine(ctx, c, &cfg, false, 5);
            let want = replay_ragged(c, &cfg);
            assert_eq!(got, want, "{} {method:?} decode (engine vs cpu)", c.name);
            ragged += (want.iter().map(Vec::len).min() != want.iter().map(Vec::len).max()) as usize;
        }
    }
    // AdaKV really left heads of different lengths somewhere.
    assert!(ragged > 0, "no stream ended with ragged heads");
}
