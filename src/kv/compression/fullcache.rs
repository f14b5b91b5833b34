//! The full cache (`--kv none`): every slot kept, nothing recorded.

use super::{Captured, CompressConfig, LayerCx, Policy, Records, Selection};
use crate::error::Result;

pub struct FullCache;

impl Policy for FullCache {
    fn name(&self) -> &'static str {
        "none"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["full", "fullkv"]
    }

    fn compresses(&self) -> bool {
        false
    }

    fn records(&self, _cfg: &CompressConfig) -> Records {
        Records::Nothing
    }

    fn select_cpu(&self, _: &CompressConfig, _: &Captured, _: usize, _: usize) -> Option<Selection> {
        None
    }

    fn select_gpu(&self, _cx: &mut LayerCx) -> Result<Option<Vec<usize>>> {
        Ok(None)
    }
}
