//! AdaKV / Ada-SnapKV (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by
//! Adaptive Budget Allocation"): SnapKV scores with the row mean, then the
//! heads share `H * (budget - window)` prefix slots by score, with a floor.
//! Contract section "AdaKV".

use super::{Captured, CompressConfig, LayerCx, Policy, Selection, Setting, common, snapkv};
use crate::error::{Error, Result};

pub struct AdaKv;

impl Policy for AdaKv {
    fn name(&self) -> &'static str {
        "adakv"
    }

    fn settings(&self) -> &'static [Setting] {
        &[
            Setting::Kernel,
            Setting::Pooling,
            Setting::Granularity,
            Setting::GqaAgg,
            Setting::Floor,
        ]
    }

    fn validate(&self, cfg: &CompressConfig) -> Result<()> {
        if !(0.0..=1.0).contains(&cfg.floor) {
            return Err(Error::invalid(
                "--floor",
                format!("{} must be in [0, 1]", cfg.floor),
            ));
        }
        Ok(())
    }

    fn select_cpu(&self, cfg: &CompressConfig, x: &Captured, _: usize, _: usize) -> Option<Selection> {
        Some(select(cfg, x))
    }

    /// SnapKV's scores with the row mean, read back once per layer: the
    /// heads share the budget on the host.
    fn select_gpu(&self, cx: &mut LayerCx) -> Result<Option<Vec<usize>>> {
        let base = cx.cfg.budget - cx.cfg.window;
        if cx.candidates().iter().all(|&c| base > c) {
            return Ok(None);
        }
        cx.attention_scores(&snapkv::spec(cx, true, true))?;
        let scores = cx.read_scores()?;
        Ok(Some(head_caps(&scores, base, cx.cfg.floor).0))
    }
}

/// Round half to even, as numpy and torch round.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// Per-head slot counts (window excluded) of AdaKV's budget rule over each
/// head's candidate scores (heads may have different lengths): steps 1-4
/// of the contract. Also returns each head's slots by descending score.
pub fn head_caps(scores: &[Vec<f32>], base: usize, floor: f64) -> (Vec<usize>, Vec<Vec<usize>>) {
    let heads = scores.len();
    // 1. each head's slots by descending score (ties: lower slot first)
    let ranked: Vec<Vec<usize>> = scores
        .iter()
        .map(|s| common::topk_ranked(s, s.len()))
        .collect();
    // 2. normalise each head's sorted scores by its top-base share
    let mut flat: Vec<(f32, usize)> = vec![];
    for (h, (s, order)) in scores.iter().zip(&ranked).enumerate() {
        let total: f32 = s.iter().sum();
        let top: f32 = order.iter().take(base).map(|&i| s[i]).sum();
        let factor = top / total;
        flat.extend(order.iter().map(|&i| (s[i] * factor, h)));
    }
    // 3. the top H * base of all heads, ties to the lower flat index
    let vals: Vec<f32> = flat.iter().map(|(v, _)| *v).collect();
    let mut count = vec![0usize; heads];
    for i in common::topk_ranked(&vals, heads * base) {
        count[flat[i].1] += 1;
    }
    // 4. cap = round_half_even(count * (1 - floor) + floor(floor * base))
    let floor_slots = (floor * base as f64).floor();
    let caps = count
        .iter()
        .zip(scores)
        .map(|(&c, s)| {
            (round_half_even(c as f64 * (1.0 - floor) + floor_slots) as usize).min(s.len())
        })
        .collect();
    (caps, ranked)
}

pub fn select(cfg: &CompressConfig, x: &Captured) -> Selection {
    let base = cfg.budget - cfg.window;
    let scores = snapkv::scores(cfg, x, true, true);
    let (caps, ranked) = head_caps(&scores, base, cfg.floor);
    // 5. each head keeps its first cap sorted slots plus the window
    Selection {
        kept: ranked
            .iter()
            .zip(&caps)
            .map(|(order, &cap)| {
                common::kept_with_window(order.iter().take(cap).copied().collect(), x.t, cfg.window)
            })
            .collect(),
        reference: None,
    }
}
