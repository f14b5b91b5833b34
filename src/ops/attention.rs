//! The attention math every attention kernel and twin shares: the largest
//! head dimension the kernels take, the score scale, and softmax attention
//! of one query in f64 (the CPU twins' and the reference model's).

/// Largest head dimension the attention kernels take.
pub const MAX_HEAD_DIM: usize = 256;

/// Softmax attention of one query over `(key, value)` pairs, in f64: the
/// math every attention twin shares. `scale` is applied to `q . k`.
pub fn attend_cpu<'a>(
    q: &[f32],
    slots: impl Iterator<Item = (&'a [f32], &'a [f32])> + Clone,
    scale: f64,
) -> Vec<f64> {
    let scores: Vec<f64> = slots
        .clone()
        .map(|(k, _)| {
            q.iter()
                .zip(k)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
    let z: f64 = w.iter().sum();
    let mut out = vec![0.0; q.len()];
    for (wi, (_, v)) in w.iter().zip(slots) {
        for (o, vv) in out.iter_mut().zip(v) {
            *o += wi / z * *vv as f64;
        }
    }
    out
}

/// The scale transformers uses, rounded to f32 as the kernels get it.
pub fn attention_scale(head_dim: usize) -> f64 {
    (1.0 / (head_dim as f64).sqrt()) as f32 as f64
}
