//! PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on
//! Pyramidal Information Funneling"): SnapKV's scorer with more prefix slots
//! in lower layers and fewer in upper ones. Contract section "PyramidKV":
//! integer arithmetic, floor division.

use super::{Captured, CompressConfig, LayerCx, Policy, Selection, Setting, snapkv};
use crate::error::{Error, Result};

pub struct PyramidKv;

impl Policy for PyramidKv {
    fn name(&self) -> &'static str {
        "pyramidkv"
    }

    fn settings(&self) -> &'static [Setting] {
        &[
            Setting::Kernel,
            Setting::Pooling,
            Setting::Granularity,
            Setting::GqaAgg,
            Setting::Beta,
        ]
    }

    fn validate(&self, cfg: &CompressConfig) -> Result<()> {
        if cfg.beta == 0 {
            return Err(Error::invalid("--beta", "must be positive"));
        }
        Ok(())
    }

    fn select_cpu(
        &self,
        cfg: &CompressConfig,
        x: &Captured,
        layer: usize,
        n_layers: usize,
    ) -> Option<Selection> {
        let k = layer_topk(cfg.budget, cfg.window, x.t, n_layers, layer, cfg.beta)?;
        Some(snapkv::select(cfg, x, k))
    }

    /// The schedule is per layer; heads of a layer have one length here.
    fn select_gpu(&self, cx: &mut LayerCx) -> Result<Option<Vec<usize>>> {
        let (cfg, job) = (cx.cfg, cx.job);
        let Some(k) = layer_topk(cfg.budget, cfg.window, cx.slots(), job.n_layers, job.layer, cfg.beta)
        else {
            return Ok(None);
        };
        cx.attention_scores(&snapkv::spec(cx, false, true))?;
        Ok(Some(cx.uniform(k)))
    }
}

/// Prefix slots layer `layer` of `n_layers` keeps (the window comes on top),
/// or `None` when nothing is compressed (`t < budget`).
pub fn layer_topk(
    budget: usize,
    window: usize,
    t: usize,
    n_layers: usize,
    layer: usize,
    beta: usize,
) -> Option<usize> {
    if t < budget {
        return None;
    }
    let (b, w, t) = (budget as i64, window as i64, t as i64);
    let base = b - w;
    if t < 2 * base {
        return Some(base as usize);
    }
    let mut lo = base.div_euclid(beta as i64);
    let mut hi = 2 * base - lo;
    if hi >= t - w {
        hi = t - w;
        lo = 2 * base - hi;
    }
    let step = if n_layers > 1 {
        (hi - lo).div_euclid(n_layers as i64 - 1)
    } else {
        0
    };
    Some((hi - layer as i64 * step).max(0) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_example() {
        // w = 8, L = 32, T = 7500, B = 128: layer 0 keeps 242, layer 31 keeps 25.
        assert_eq!(
            layer_topk(128, 8, 7500, 32, 0, 20).map(|k| k + 8),
            Some(242)
        );
        assert_eq!(
            layer_topk(128, 8, 7500, 32, 31, 20).map(|k| k + 8),
            Some(25)
        );
        let mean: f64 = (0..32)
            .map(|l| (layer_topk(128, 8, 7500, 32, l, 20).unwrap() + 8) as f64)
            .sum::<f64>()
            / 32.0;
        assert_eq!(mean, 133.5);
    }

    #[test]
    fn the_shared_schedule_table() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/pyramid_schedule.json"
        ))
        .unwrap();
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        let rows = j["rows"].as_array().unwrap();
        assert!(rows.len() > 20);
        for r in rows {
            let v: Vec<i64> = r
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            let got = layer_topk(
                v[0] as usize,
                v[1] as usize,
                v[2] as usize,
                v[3] as usize,
                v[4] as usize,
                20,
            );
            let want = (v[5] >= 0).then_some(v[5] as usize);
            assert_eq!(got, want, "row {v:?}");
        }
    }
}
