//! CPU twins of the compression stages, one per stage, on plain arrays (no
//! method, no policy): what each kernel of `compress.wgsl` computes, in f64.
//! `tests.rs` runs every stage alone against its twin, so a wrong stage is
//! found on its own; the methods' references (`kv::compression`) are held
//! against whole recipes elsewhere.

use super::{GqaAgg, Pooling};

/// One stored head's slots as the stages read them: keys `[len][d]` and
/// each slot's position.
pub struct HostHead<'a> {
    pub keys: &'a [f32],
    pub positions: &'a [u32],
}

impl HostHead<'_> {
    fn len(&self) -> usize {
        self.positions.len()
    }
    fn key(&self, t: usize, d: usize) -> &[f32] {
        &self.keys[t * d..][..d]
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// How `score_accumulate` forms its units.
#[derive(Clone, Copy, Debug)]
pub struct SumSpec {
    pub d: usize,
    /// Query heads per model KV head.
    pub group: usize,
    /// Query heads feeding one stored head (1 with query-head granularity).
    pub units_per_head: usize,
    /// R-KV mode: a unit is a stored head whose logit is the max over its
    /// group's query heads, columns are the candidates `[0, len - window)`
    /// and nothing is masked.
    pub rkv: bool,
    pub window: usize,
}

/// `score_stats` + `score_accumulate`: `acc[u][t]`, the sum over the query
/// rows (`queries[r]` holds every query head, `qpos[r]` its position) of
/// unit u's attention probability of slot t. Outside R-KV mode unit u is
/// query head u on stored head `u / units_per_head`, and a row sees the
/// slots whose position is at most its own.
pub fn attention_sums_cpu(
    heads: &[HostHead],
    queries: &[Vec<f32>],
    qpos: &[u32],
    s: &SumSpec,
) -> Vec<Vec<f64>> {
    let d = s.d;
    let scale = (1.0 / (d as f32).sqrt()) as f64;
    let units = if s.rkv {
        heads.len()
    } else {
        heads.len() * s.units_per_head
    };
    (0..units)
        .map(|u| {
            let head = &heads[if s.rkv { u } else { u / s.units_per_head }];
            let cols = if s.rkv {
                head.len().saturating_sub(s.window)
            } else {
                head.len()
            };
            let mut sums = vec![0.0; cols];
            for (q, &qp) in queries.iter().zip(qpos) {
                let logit = |t: usize| -> Option<f64> {
                    if !s.rkv && head.positions[t] > qp {
                        return None;
                    }
                    let k = head.key(t, d);
                    Some(if s.rkv {
                        (0..s.group)
                            .map(|j| dot(&q[(u * s.group + j) * d..][..d], k) * scale)
                            .fold(f64::NEG_INFINITY, f64::max)
                    } else {
                        dot(&q[u * d..][..d], k) * scale
                    })
                };
                let logits: Vec<Option<f64>> = (0..cols).map(logit).collect();
                let m = logits
                    .iter()
                    .flatten()
                    .cloned()
                    .fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = logits.iter().flatten().map(|l| (l - m).exp()).sum();
                for (acc, l) in sums.iter_mut().zip(&logits) {
                    if let Some(l) = l {
                        *acc += (l - m).exp() / z;
                    }
                }
            }
            sums
        })
        .collect()
}

/// `score_reduce`: per stored head (its length `lens[s]`), per candidate
/// `t < len - window`: the head's units' sums (`acc[s * units_per_head + j]`)
/// scaled by `1 / n_rows` when `mean`, combined by `agg`.
pub fn reduce_cpu(
    acc: &[Vec<f64>],
    lens: &[usize],
    window: usize,
    units_per_head: usize,
    mean: Option<usize>,
    agg: GqaAgg,
) -> Vec<Vec<f64>> {
    lens.iter()
        .enumerate()
        .map(|(s, &len)| {
            (0..len.saturating_sub(window))
                .map(|t| {
                    let xs = (0..units_per_head)
                        .map(|j| acc[s * units_per_head + j][t] / mean.map_or(1.0, |n| n as f64));
                    match agg {
                        GqaAgg::Max => xs.fold(f64::NEG_INFINITY, f64::max),
                        GqaAgg::Sum => xs.sum(),
                        GqaAgg::Mean => xs.sum::<f64>() / units_per_head as f64,
                    }
                })
                .collect()
        })
        .collect()
}

/// `score_pool`: 1-D pooling of a row with an odd `kernel`, the window
/// clipped at the ends; avg divides by the kernel (zero padding).
pub fn pool_cpu(x: &[f64], kernel: usize, pooling: Pooling) -> Vec<f64> {
    let half = kernel / 2;
    (0..x.len())
        .map(|t| {
            let w = &x[t.saturating_sub(half)..(t + half + 1).min(x.len())];
            match pooling {
                Pooling::Max => w.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                Pooling::Avg => w.iter().sum::<f64>() / kernel as f64,
            }
        })
        .collect()
}

/// `key_norms` .. `rkv_combine` for one stored head of `len = keys.len() / d`
/// slots: `lambda * importance[t] - (1 - lambda) * softmax(colmean)[t]` for
/// the candidates `t < len - window`, where colmean is the column mean of
/// the cosine-similarity matrix (zero diagonal) without each row's entry at
/// `last(i)` (the last column over `threshold`, else 0).
pub fn redundancy_cpu(
    keys: &[f32],
    d: usize,
    window: usize,
    lambda: f64,
    threshold: f64,
    eps: f64,
    importance: &[f64],
) -> Vec<f64> {
    let t = keys.len() / d;
    let kn: Vec<Vec<f64>> = (0..t)
        .map(|s| {
            let k = &keys[s * d..][..d];
            let norm = k.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt() + eps;
            k.iter().map(|v| *v as f64 / norm).collect()
        })
        .collect();
    let mut colsum = vec![0.0f64; t];
    for i in 0..t {
        let row: Vec<f64> = (0..t)
            .map(|j| {
                if i == j {
                    0.0
                } else {
                    kn[i].iter().zip(&kn[j]).map(|(a, b)| a * b).sum()
                }
            })
            .collect();
        let last = (0..t).rev().find(|&j| row[j] > threshold).unwrap_or(0);
        for (j, v) in row.iter().enumerate() {
            if j != last {
                colsum[j] += v;
            }
        }
    }
    let colmean: Vec<f64> = colsum.iter().map(|v| v / t as f64).collect();
    let m = colmean.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = colmean.iter().map(|v| (v - m).exp()).sum();
    (0..t.saturating_sub(window))
        .map(|s| lambda * importance[s] - (1.0 - lambda) * (colmean[s] - m).exp() / z)
        .collect()
}
