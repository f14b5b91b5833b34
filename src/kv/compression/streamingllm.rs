//! StreamingLLM (Xiao et al., "Efficient Streaming Language Models with
//! Attention Sinks"): keep the first `sinks` slots and the last `window`.
//! Contract section "StreamingLLM". On the GPU: equal scores, so top-k's
//! ties to the lower slot keep exactly the first `sinks`.

use super::{Captured, CompressConfig, LayerCx, Policy, Records, Selection, Setting};
use crate::error::{Error, Result};

pub struct StreamingLlm;

impl Policy for StreamingLlm {
    fn name(&self) -> &'static str {
        "streamingllm"
    }

    fn settings(&self) -> &'static [Setting] {
        // Per query head stores Hq heads, as the others (the sets are equal).
        &[Setting::Sinks, Setting::Granularity]
    }

    fn validate(&self, cfg: &CompressConfig) -> Result<()> {
        if cfg.sinks.is_some_and(|s| s >= cfg.budget) || cfg.sinks() + cfg.window > cfg.budget {
            return Err(Error::invalid(
                "--sinks",
                format!(
                    "{} sinks + window {} exceed the budget {}",
                    cfg.sinks(),
                    cfg.window,
                    cfg.budget
                ),
            ));
        }
        Ok(())
    }

    fn records(&self, _cfg: &CompressConfig) -> Records {
        Records::Nothing
    }

    fn select_cpu(&self, cfg: &CompressConfig, x: &Captured, _: usize, _: usize) -> Option<Selection> {
        let heads = x.hkv * cfg.heads_per_kv(x.hq / x.hkv);
        Some(select(cfg, x.t, heads))
    }

    fn select_gpu(&self, cx: &mut LayerCx) -> Result<Option<Vec<usize>>> {
        cx.constant_scores(0.0)?;
        Ok(Some(cx.uniform(cx.cfg.sinks())))
    }
}

pub fn select(cfg: &CompressConfig, t: usize, heads: usize) -> Selection {
    let sinks = cfg.sinks().min(t);
    let mut kept: Vec<usize> = (0..sinks).collect();
    kept.extend((t - cfg.window.min(t)).max(sinks)..t);
    Selection {
        kept: vec![kept; heads],
        reference: None,
    }
}
