//! Building blocks shared by the methods (`docs/kv-compression.md`,
//! "Shared building blocks"), on the CPU: window attention probabilities, the
//! row and GQA-group reductions, pooling, and top-k with ties to the lower
//! slot index. Scores are computed in f64 and rounded to f32 before
//! selection, like the f32 reference, so exact ties (max pooling copies
//! values) stay exact.

use super::{GqaAgg, Pooling};

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Softmax over a row of logits in f64; masked entries are `None`.
fn softmax(logits: &[Option<f64>]) -> Vec<f64> {
    let m = logits
        .iter()
        .flatten()
        .cloned()
        .fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits
        .iter()
        .map(|l| l.map_or(0.0, |l| (l - m).exp()))
        .collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

/// Attention probabilities `P[i][t]` of `w` window queries (the queries of
/// the last `w` positions) over `t_len` keys; causal only inside the last
/// `w x w` block. `queries`: `[w][d]` of one query head, `keys`: `[t_len][d]`.
pub fn window_probs(
    queries: &[f32],
    keys: &[f32],
    w: usize,
    t_len: usize,
    d: usize,
) -> Vec<Vec<f64>> {
    let scale = 1.0 / (d as f64).sqrt();
    (0..w)
        .map(|i| {
            let q = &queries[i * d..][..d];
            let logits: Vec<Option<f64>> = (0..t_len)
                .map(|t| {
                    // Slot t is window column j = t - (t_len - w); query i sees j <= i.
                    let hidden = t + w >= t_len && t + w - t_len > i;
                    (!hidden).then(|| dot(q, &keys[t * d..][..d]) * scale)
                })
                .collect();
            softmax(&logits)
        })
        .collect()
}

/// Full causal attention probabilities of all `t_len` queries (H2O v3).
pub fn causal_probs(queries: &[f32], keys: &[f32], t_len: usize, d: usize) -> Vec<Vec<f64>> {
    let scale = 1.0 / (d as f64).sqrt();
    (0..t_len)
        .map(|i| {
            let q = &queries[i * d..][..d];
            let logits: Vec<Option<f64>> = (0..t_len)
                .map(|t| (t <= i).then(|| dot(q, &keys[t * d..][..d]) * scale))
                .collect();
            softmax(&logits)
        })
        .collect()
}

/// Sum (or mean) of `probs` rows over the prefix columns `[0, c)`.
pub fn reduce_rows(probs: &[Vec<f64>], c: usize, mean: bool) -> Vec<f64> {
    let mut s = vec![0.0; c];
    for r in probs {
        for (acc, p) in s.iter_mut().zip(r) {
            *acc += p;
        }
    }
    if mean {
        let n = probs.len() as f64;
        s.iter_mut().for_each(|v| *v /= n);
    }
    s
}

/// Reduces per-query-head rows over each GQA group of `g` heads.
pub fn group_reduce(rows: &[Vec<f64>], g: usize, agg: GqaAgg) -> Vec<Vec<f64>> {
    rows.chunks(g)
        .map(|group| {
            (0..group[0].len())
                .map(|c| {
                    let vals = group.iter().map(|r| r[c]);
                    match agg {
                        GqaAgg::Mean => vals.sum::<f64>() / g as f64,
                        GqaAgg::Sum => vals.sum(),
                        GqaAgg::Max => vals.fold(f64::NEG_INFINITY, f64::max),
                    }
                })
                .collect()
        })
        .collect()
}

/// 1-D pooling, stride 1, odd `kernel`, padding `kernel / 2`: max (padding
/// never wins) or average (zero padding, always divided by `kernel`).
pub fn pool(x: &[f64], kernel: usize, pooling: Pooling) -> Vec<f64> {
    let half = kernel / 2;
    (0..x.len())
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(x.len());
            let win = &x[lo..hi];
            match pooling {
                Pooling::Max => win.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                Pooling::Avg => win.iter().sum::<f64>() / kernel as f64,
            }
        })
        .collect()
}

/// Rounds scores to f32, as the reference computes them.
pub fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|v| *v as f32).collect()
}

/// Indices of the `k` largest scores, ties to the lower index, in score order
/// (highest first).
pub fn topk_ranked(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k.min(scores.len()));
    idx
}

/// The selected prefix slots plus the last `w` of `t_len`, ascending.
pub fn kept_with_window(mut selected: Vec<usize>, t_len: usize, w: usize) -> Vec<usize> {
    selected.extend(t_len - w.min(t_len)..t_len);
    selected.sort_unstable();
    selected
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_breaks_ties_to_the_lower_index() {
        let s = [1.0, 3.0, 3.0, 2.0, 3.0];
        assert_eq!(topk_ranked(&s, 2), vec![1, 2]);
        assert_eq!(topk_ranked(&s, 4), vec![1, 2, 4, 3]);
    }

    #[test]
    fn pooling_pads_as_torch() {
        let x = [1.0, 5.0, 2.0, 0.0];
        assert_eq!(pool(&x, 3, Pooling::Max), vec![5.0, 5.0, 5.0, 2.0]);
        assert_eq!(
            pool(&x, 3, Pooling::Avg),
            vec![2.0, 8.0 / 3.0, 7.0 / 3.0, 2.0 / 3.0]
        );
    }

    #[test]
    fn the_window_block_is_causal_and_the_prefix_visible() {
        // w = 2, t = 4, d = 1: query 0 sees slots 0..=2, query 1 sees all.
        let p = window_probs(&[1.0, 1.0], &[0.0, 0.0, 0.0, 0.0], 2, 4, 1);
        assert!((p[0][3]).abs() < 1e-12 && (p[0][2] - 1.0 / 3.0).abs() < 1e-12);
        assert!((p[1][3] - 0.25).abs() < 1e-12);
    }
}
