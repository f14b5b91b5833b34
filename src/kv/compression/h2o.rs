//! H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
//! Inference of Large Language Models"): keep the slots with the largest
//! accumulated attention. Contract section "H2O": `v3` (current code) sums
//! the column of every prompt query under a full causal mask (the engine
//! keeps the sums as it goes); `v1` (behind the PyramidKV paper's numbers)
//! is SnapKV without pooling.

use super::{
    Captured, CompressConfig, H2oVersion, LayerCx, Policy, Records, Selection, Setting, common,
    per_stored_head, snapkv,
};
use crate::error::Result;

pub struct H2o;

impl Policy for H2o {
    fn name(&self) -> &'static str {
        "h2o"
    }

    fn settings(&self) -> &'static [Setting] {
        &[Setting::H2oVersion, Setting::Granularity, Setting::GqaAgg]
    }

    fn records(&self, cfg: &CompressConfig) -> Records {
        match cfg.h2o_version {
            H2oVersion::V1 => Records::WindowQueries,
            H2oVersion::V3 => Records::AttentionSums,
        }
    }

    fn query_rows(&self, cfg: &CompressConfig, t: usize) -> Option<usize> {
        match cfg.h2o_version {
            H2oVersion::V1 => Some(cfg.window),
            H2oVersion::V3 => Some(t),
        }
    }

    fn select_cpu(&self, cfg: &CompressConfig, x: &Captured, _: usize, _: usize) -> Option<Selection> {
        Some(select(cfg, x))
    }

    fn select_gpu(&self, cx: &mut LayerCx) -> Result<Option<Vec<usize>>> {
        // The source is the window queries (v1) or the engine's sums (v3).
        cx.attention_scores(&snapkv::spec(cx, false, false))?;
        Ok(Some(cx.uniform(cx.cfg.budget - cx.cfg.window)))
    }
}

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
