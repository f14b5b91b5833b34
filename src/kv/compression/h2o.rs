//! H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
//! Inference of Large Language Models"): keep the slots with the largest
//! accumulated attention. Contract section "H2O": `v3` (current code) sums
//! the column of every prompt query under a full causal mask; `v1` (behind
//! the PyramidKV paper's numbers) is SnapKV without pooling.

use super::{Captured, CompressConfig, H2oVersion, Selection, common, per_stored_head, snapkv};

pub fn select(cfg: &CompressConfig, x: &Captured) -> Selection {
    let k = cfg.budget - cfg.window;
    let scores: Vec<Vec<f32>> = match cfg.h2o_version {
        H2oVersion::V1 => snapkv::scores(cfg, x, false, false),
        H2oVersion::V3 => {
            let g = x.hq / x.hkv;
            let rows: Vec<Vec<f64>> = (0..x.hq)
                .map(|h| {
                    let p = common::causal_probs(x.query_head(h), x.key_head(h / g), x.t, x.d);
                    common::reduce_rows(&p, x.t - cfg.window, false)
                })
                .collect();
            per_stored_head(cfg, x, rows)
                .iter()
                .map(|r| common::to_f32(r))
                .collect()
        }
    };
    Selection {
        kept: scores
            .iter()
            .map(|s| common::kept_with_window(common::topk_ranked(s, k), x.t, cfg.window))
            .collect(),
        reference: None,
    }
}
