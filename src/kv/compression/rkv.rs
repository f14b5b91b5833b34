//! R-KV (Cai et al., "R-KV: Redundancy-aware KV Cache Compression for
//! Reasoning Models"): per KV head, score = lambda * importance -
//! (1 - lambda) * redundancy; keep the top `budget - window` candidates plus
//! the window. Contract section "R-KV"; the slots are taken in the order
//! they are given (position order, or the reference layout order).

use super::{Captured, CompressConfig, LayerCx, Policy, Pooling, Schedule, Selection, Setting, common};
use crate::error::{Error, Result};
use crate::ops::compress::ScoreSpec;
use crate::ops::compress::cpu::redundancy_cpu;

pub struct Rkv;

impl Policy for Rkv {
    fn name(&self) -> &'static str {
        "rkv"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["r-kv"]
    }

    fn settings(&self) -> &'static [Setting] {
        &[
            Setting::Kernel,
            Setting::Lambda,
            Setting::SlotOrder,
            Setting::SimThreshold,
            Setting::Eps,
        ]
    }

    fn default_schedule(&self) -> Schedule {
        Schedule::Decode
    }

    fn validate(&self, cfg: &CompressConfig) -> Result<()> {
        if !(cfg.eps > 0.0 && cfg.eps.is_finite()) {
            return Err(Error::invalid("--eps", format!("{} must be positive", cfg.eps)));
        }
        if !cfg.sim_threshold.is_finite() {
            return Err(Error::invalid(
                "--sim-threshold",
                format!("{} must be finite", cfg.sim_threshold),
            ));
        }
        Ok(())
    }

    fn ranks_reference(&self) -> bool {
        true
    }

    fn select_cpu(&self, cfg: &CompressConfig, x: &Captured, _: usize, _: usize) -> Option<Selection> {
        Some(select(cfg, x))
    }

    /// Importance (group max of raw logits, softmax over the candidates,
    /// row mean, max pooling), then the redundancy mixed in.
    fn select_gpu(&self, cx: &mut LayerCx) -> Result<Option<Vec<usize>>> {
        let cfg = cx.cfg;
        cx.attention_scores(&ScoreSpec {
            rkv: true,
            mean: true,
            agg: cfg.gqa_agg,
            kernel: cfg.kernel,
            pooling: Pooling::Max,
            window: cfg.window,
            group: cx.job.group,
        })?;
        cx.redundancy(cfg.lambda, cfg.sim_threshold, cfg.eps)?;
        Ok(Some(cx.uniform(cfg.budget - cfg.window)))
    }
}

/// The R-KV scores of the `t - w` candidate slots of every KV head.
pub fn scores(cfg: &CompressConfig, x: &Captured) -> Vec<Vec<f32>> {
    let (w, t, d) = (cfg.window, x.t, x.d);
    let c = t - w;
    let g = x.hq / x.hkv;
    let scale = 1.0 / (d as f64).sqrt();
    (0..x.hkv)
        .map(|kh| {
            let keys = x.key_head(kh);
            // Importance: group max over raw logits, softmax over the C candidates, mean over w.
            let mut importance = vec![0.0f64; c];
            for i in 0..w {
                let logits: Vec<f64> = (0..c)
                    .map(|s| {
                        (0..g)
                            .map(|j| {
                                let q = &x.query_head(kh * g + j)[i * d..][..d];
                                q.iter()
                                    .zip(&keys[s * d..][..d])
                                    .map(|(a, b)| *a as f64 * *b as f64)
                                    .sum::<f64>()
                                    * scale
                            })
                            .fold(f64::NEG_INFINITY, f64::max)
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (acc, v) in importance.iter_mut().zip(e) {
                    *acc += v / z / w as f64;
                }
            }
            let importance = common::pool(&importance, cfg.kernel, Pooling::Max);

            // Redundancy: cosine similarity of normalised keys, the last(i)
            // rule, column means, mixed in (the redundancy stage's twin).
            redundancy_cpu(
                &keys[..t * d],
                d,
                w,
                cfg.lambda as f64,
                cfg.sim_threshold as f64,
                cfg.eps as f64,
                &importance,
            )
            .into_iter()
            .map(|v| v as f32)
            .collect()
        })
        .collect()
}

pub fn select(cfg: &CompressConfig, x: &Captured) -> Selection {
    let k = cfg.budget - cfg.window;
    let mut kept = vec![];
    let mut reference = vec![];
    for s in scores(cfg, x) {
        let ranked = common::topk_ranked(&s, k);
        let mut r = ranked.clone();
        r.extend(x.t - cfg.window..x.t);
        reference.push(r);
        kept.push(common::kept_with_window(ranked, x.t, cfg.window));
    }
    Selection {
        kept,
        reference: Some(reference),
    }
}
