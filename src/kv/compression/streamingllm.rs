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
        // sinks = B - w: the budget is the sinks and the recent window.
        if cfg.sinks() + cfg.window != cfg.budget {
            return Err(Error::invalid(
                "--sinks",
                format!(
                    "{} sinks + window {} must make the budget {}: StreamingLLM keeps the \
                     first sinks and the last budget - sinks slots (give --sinks or --window)",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::compression::Method;

    #[test]
    fn four_sinks_keep_the_first_four_and_the_last_budget_minus_four() {
        let mut cfg = CompressConfig::new(Method::StreamingLlm, 64);
        cfg.set_sinks(4);
        assert_eq!(cfg.window, 60);
        cfg.validate().unwrap();
        let kept = &select(&cfg, 200, 2).kept;
        let want: Vec<usize> = (0..4).chain(140..200).collect();
        assert_eq!(kept, &vec![want.clone(), want]);
        // The default: sinks = budget - window.
        let cfg = CompressConfig::new(Method::StreamingLlm, 64);
        let want: Vec<usize> = (0..56).chain(192..200).collect();
        assert_eq!(select(&cfg, 200, 1).kept, vec![want]);
        // Sinks and a window that do not make the budget, or sinks at the budget.
        let mut cfg = CompressConfig::new(Method::StreamingLlm, 64);
        cfg.sinks = Some(4);
        assert!(cfg.validate().unwrap_err().to_string().contains("--sinks"));
        cfg.set_sinks(64);
        assert!(cfg.validate().unwrap_err().to_string().contains("--sinks"));
    }

    #[test]
    fn requests_derive_the_recent_part_from_their_budget_and_sinks() {
        use crate::kv::compression::json::from_json;
        use serde_json::json;
        let mut server = CompressConfig::new(Method::StreamingLlm, 128);
        server.set_sinks(4);
        // A new budget under the server's sinks: the last 64 - 4 stay.
        let c = from_json(&json!({"method": "streamingllm", "budget": 64}), &server).unwrap();
        assert_eq!((c.sinks, c.window), (Some(4), 60));
        let base = CompressConfig::new(Method::None, 0);
        let c = from_json(&json!({"method": "streamingllm", "budget": 64, "sinks": 4}), &base)
            .unwrap();
        assert_eq!((c.sinks, c.window), (Some(4), 60));
        // Sinks and a window that do not make the budget: named.
        let e = from_json(
            &json!({"method": "streamingllm", "budget": 64, "sinks": 4, "window": 8}),
            &base,
        )
        .unwrap_err();
        assert!(e.contains("kv.sinks"), "{e}");
    }
}
