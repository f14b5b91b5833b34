//! StreamingLLM (Xiao et al., "Efficient Streaming Language Models with
//! Attention Sinks"): keep the first `sinks` slots and the last `window`.
//! Contract section "StreamingLLM".

use super::{CompressConfig, Selection};

pub fn select(cfg: &CompressConfig, t: usize, heads: usize) -> Selection {
    let sinks = cfg.sinks().min(t);
    let mut kept: Vec<usize> = (0..sinks).collect();
    kept.extend((t - cfg.window.min(t)).max(sinks)..t);
    Selection {
        kept: vec![kept; heads],
        reference: None,
    }
}
