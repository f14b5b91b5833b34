//! The paged KV pool's layout, stated once for the host ([`PoolLayout`])
//! and once for the kernels ([`PAGES_WGSL`], `shaders/pages.wgsl`, joined in
//! front of every kernel that reads or writes pages). A page of
//! `page_size` slots holds `[page_size][dw]` keys, `[page_size][dw]` values
//! and `[page_size]` positions in u32 words (`dw`: head_dim, or half of it
//! with f16 pairs); a stored head's descriptor is `{table offset, length}`.

use crate::gpu::GpuBuffer;

/// The WGSL prelude of the page layout.
pub const PAGES_WGSL: &str = include_str!("../../shaders/pages.wgsl");

/// How slots are laid out in a page of the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLayout {
    pub page_size: usize,
    pub head_dim: usize,
    /// K and V stored as f16 pairs in `u32` words (else f32).
    pub kv_f16: bool,
}

impl PoolLayout {
    /// Words per stored K (or V) row.
    pub fn dw(&self) -> usize {
        if self.kv_f16 {
            self.head_dim / 2
        } else {
            self.head_dim
        }
    }
    /// Words per page: keys, values, positions.
    pub fn page_words(&self) -> usize {
        2 * self.page_size * self.dw() + self.page_size
    }
    pub fn page_bytes(&self) -> usize {
        self.page_words() * 4
    }
    /// First word of pool page `page`.
    pub fn page_start(&self, page: usize) -> usize {
        page * self.page_words()
    }
    /// Within a page: slot `i`'s key, value (`dw` words each) and position word.
    pub fn key_at(&self, i: usize) -> usize {
        i * self.dw()
    }
    pub fn value_at(&self, i: usize) -> usize {
        (self.page_size + i) * self.dw()
    }
    pub fn position_at(&self, i: usize) -> usize {
        2 * self.page_size * self.dw() + i
    }
    /// The kernels' `WG` and `KV_F16` overrides.
    pub(crate) fn constants(&self, wg: f64) -> [(&'static str, f64); 2] {
        [("WG", wg), ("KV_F16", if self.kv_f16 { 1.0 } else { 0.0 })]
    }
}

/// One layer's view of the paged cache: the shard holding its pages, the
/// per-(row, stored head) descriptors `{table offset, len}` and the tables.
pub struct LayerKv<'a> {
    pub layout: PoolLayout,
    pub pool: &'a GpuBuffer<u32>,
    pub desc: &'a GpuBuffer<u32>,
    pub tables: &'a GpuBuffer<u32>,
    /// Descriptor index of (row 0, stored head 0) of this layer.
    pub desc_base: usize,
    /// Stored heads per layer.
    pub n_heads: usize,
    /// Stored heads per model KV head (1; or the GQA group with query-head granularity).
    pub heads_per_kv: usize,
}
