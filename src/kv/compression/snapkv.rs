//! SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before
//! Generation"): window-query attention summed over the window rows, pooled,
//! top `k` prefix slots plus the window. Contract section "SnapKV";
//! PyramidKV uses the same scorer with its own `k` per layer.

use super::{Captured, CompressConfig, Selection, common, per_stored_head, window_scores};

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
