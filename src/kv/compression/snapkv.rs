//! SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before
//! Generation"): window-query attention summed over the window rows, pooled,
//! top `k` prefix slots plus the window. Contract section "SnapKV";
//! PyramidKV uses the same scorer with its own `k` per layer.

use super::{
    Captured, CompressConfig, LayerCx, Policy, Selection, Setting, common, per_stored_head,
    window_scores,
};
use crate::error::Result;
use crate::ops::compress::ScoreSpec;

pub struct SnapKv;

/// The settings of SnapKV's scorer (PyramidKV and AdaKV read them too).
pub const SCORER_SETTINGS: [Setting; 4] = [
    Setting::Kernel,
    Setting::Pooling,
    Setting::Granularity,
    Setting::GqaAgg,
];

impl Policy for SnapKv {
    fn name(&self) -> &'static str {
        "snapkv"
    }

    fn settings(&self) -> &'static [Setting] {
        &SCORER_SETTINGS
    }

    fn select_cpu(&self, cfg: &CompressConfig, x: &Captured, _: usize, _: usize) -> Option<Selection> {
        Some(select(cfg, x, cfg.budget - cfg.window))
    }

    fn select_gpu(&self, cx: &mut LayerCx) -> Result<Option<Vec<usize>>> {
        cx.attention_scores(&spec(cx, false, true))?;
        Ok(Some(cx.uniform(cx.cfg.budget - cx.cfg.window)))
    }
}

/// The GPU scorer's settings: row `mean` (else sum), pooled or not.
pub fn spec(cx: &LayerCx, mean: bool, pooled: bool) -> ScoreSpec {
    ScoreSpec {
        rkv: false,
        mean,
        agg: cx.cfg.gqa_agg,
        kernel: if pooled { cx.cfg.kernel } else { 1 },
        pooling: cx.cfg.pooling,
        window: cx.cfg.window,
        group: cx.job.group,
    }
}

/// Pooled per-stored-head scores of the prefix `[0, t - w)`.
pub fn scores(cfg: &CompressConfig, x: &Captured, mean: bool, pool: bool) -> Vec<Vec<f32>> {
    let rows = per_stored_head(cfg, x, window_scores(x, cfg.window, mean));
    rows.iter()
        .map(|r| {
            let r = if pool {
                common::pool(r, cfg.kernel, cfg.pooling)
            } else {
                r.clone()
            };
            common::to_f32(&r)
        })
        .collect()
}

/// Keep the top `k` prefix slots of every stored head plus the window.
pub fn select(cfg: &CompressConfig, x: &Captured, k: usize) -> Selection {
    Selection {
        kept: scores(cfg, x, false, true)
            .iter()
            .map(|s| common::kept_with_window(common::topk_ranked(s, k), x.t, cfg.window))
            .collect(),
        reference: None,
    }
}
