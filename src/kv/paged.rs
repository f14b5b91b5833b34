//! The paged KV pool on the GPU and the GPU copies of the block tables.
//!
//! - pool: shards of pages (`PoolLayout`: keys, values, positions per page),
//!   each shard one buffer that fits a storage binding;
//! - tables: for every (lane, layer, stored head) a fixed region of
//!   `max_pages` page indices, so a sequence's table never moves while it
//!   runs and a new page is one 4-byte write;
//! - desc: for every (layer, row, stored head) `{table offset, len}`,
//!   rewritten before each step for the rows that step runs.
//!
//! Which page belongs to whom is decided on the host (`pool.rs`, `table.rs`).

use crate::error::{Error, Result};
use crate::gpu::{GpuBuffer, GpuContext, Op, StagedInput};
use crate::model::config::ModelConfig;
use crate::ops::paged_attention::{LayerKv, PoolLayout};

use super::pool::PageAllocator;
use super::table::{NewPage, SeqTables};

/// Default pool size when the user gives none.
pub const DEFAULT_POOL_MB: f64 = 512.0;

/// How to build the pool.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Bytes for pages (`--kv-pool-mb`); default [`DEFAULT_POOL_MB`] (at
    /// most one storage binding per layer).
    pub bytes: Option<u64>,
    /// Slots per page (`--page-size`).
    pub page_size: usize,
    /// f16 K/V (`--kv-dtype f16`, default) or f32.
    pub kv_f16: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            bytes: None,
            page_size: 16,
            kv_f16: true,
        }
    }
}

/// Pages and bytes of the pool, for the API and `--json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolUsage {
    pub pages_total: usize,
    pub pages_in_use: usize,
    pub page_bytes: usize,
    pub bytes_total: u64,
    pub bytes_in_use: u64,
}

pub struct PagedKv {
    pub layout: PoolLayout,
    pub n_layers: usize,
    /// Stored heads per layer.
    pub n_heads: usize,
    /// Stored heads per model KV head.
    pub heads_per_kv: usize,
    pub alloc: PageAllocator,
    shards: Vec<GpuBuffer<u32>>,
    desc: GpuBuffer<u32>,
    tables: GpuBuffer<u32>,
    desc_host: Vec<u32>,
    /// Chained decode: each step's descriptors.
    desc_staged: Option<StagedInput<u32>>,
    max_rows: usize,
    lanes: usize,
    max_pages: usize,
}

impl PagedKv {
    /// A pool for `lanes` concurrent sequences of up to `max_context` slots
    /// per head, steps of up to `max_rows` rows.
    pub fn new(
        ctx: &GpuContext,
        cfg: &ModelConfig,
        pc: &PoolConfig,
        lanes: usize,
        max_rows: usize,
        max_context: usize,
        heads_per_kv: usize,
    ) -> Result<Self> {
        if pc.page_size == 0 || pc.page_size > 64 {
            return Err(Error::invalid(
                "--page-size",
                format!("{}: must be between 1 and 64", pc.page_size),
            ));
        }
        let layout = PoolLayout {
            page_size: pc.page_size,
            head_dim: cfg.head_dim,
            kv_f16: pc.kv_f16,
        };
        let page_bytes = layout.page_bytes() as u64;
        // Default: DEFAULT_POOL_MB, at most one binding per layer.
        let bytes = pc.bytes.unwrap_or_else(|| {
            ((DEFAULT_POOL_MB * 1024.0 * 1024.0) as u64)
                .min(ctx.caps.max_binding_bytes * cfg.n_layers as u64)
        });
        let total = bytes / page_bytes;
        if total == 0 {
            return Err(Error::invalid(
                "--kv-pool-mb",
                format!("{bytes} bytes hold no page of {page_bytes} bytes"),
            ));
        }
        let n_layers = cfg.n_layers;
        // The fewest shards whose largest (proportional to its layers) fits a binding.
        let per_shard_max = ctx.caps.max_binding_bytes / page_bytes;
        let shard_pages = |k: usize| -> Vec<u32> {
            (0..k)
                .map(|s| {
                    let layers = (s..n_layers).step_by(k).count() as u64;
                    (total * layers / n_layers as u64) as u32
                })
                .collect()
        };
        let k = (1..=n_layers)
            .find(|&k| shard_pages(k).iter().all(|&p| p as u64 <= per_shard_max))
            .ok_or_else(|| Error::LimitExceeded {
                what: format!("KV pool of {bytes} bytes over {n_layers} layers"),
                requested: bytes / n_layers as u64,
                limit_name: "max_storage_buffer_binding_size per layer",
                limit: ctx.caps.max_binding_bytes,
            })?;
        let pages = shard_pages(k);
        if pages.contains(&0) {
            return Err(Error::invalid(
                "--kv-pool-mb",
                format!("{bytes} bytes are too few pages for {n_layers} layers"),
            ));
        }
        let shards = pages
            .iter()
            .enumerate()
            .map(|(s, &p)| {
                GpuBuffer::zeros(
                    ctx,
                    &format!("kv.pool.shard{s}"),
                    p as usize * layout.page_words(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        // wgpu zero-fills a new buffer at its first use; do it now, at load,
        // rather than inside the first request.
        let mut enc = ctx.encoder("kvsift.kv.pool.clear");
        for shard in &shards {
            enc.clear_buffer(shard.raw(), 0, None);
        }
        ctx.checked("clearing the KV pool", || ctx.queue.submit([enc.finish()]))?;
        ctx.wait_idle()?;
        let n_heads = cfg.n_kv_heads * heads_per_kv;
        let max_pages = max_context.div_ceil(pc.page_size).max(1);
        let desc_len = n_layers * max_rows * n_heads * 2;
        Ok(Self {
            layout,
            n_layers,
            n_heads,
            heads_per_kv,
            alloc: PageAllocator::new(&pages, n_layers),
            shards,
            desc: GpuBuffer::zeros(ctx, "kv.desc", desc_len)?,
            tables: GpuBuffer::zeros(ctx, "kv.tables", lanes * n_layers * n_heads * max_pages)?,
            desc_host: vec![0; desc_len],
            desc_staged: None,
            max_rows,
            lanes,
            max_pages,
        })
    }

    /// Empty block tables for a new sequence.
    pub fn new_tables(&self) -> SeqTables {
        SeqTables::new(self.n_layers, self.n_heads, self.layout.page_size)
    }

    /// The view of layer `l` the paged kernels take.
    pub fn layer(&self, l: usize) -> LayerKv<'_> {
        LayerKv {
            layout: self.layout,
            pool: &self.shards[self.alloc.shard_of_layer(l) as usize],
            desc: &self.desc,
            tables: &self.tables,
            desc_base: l * self.max_rows * self.n_heads,
            n_heads: self.n_heads,
            heads_per_kv: self.heads_per_kv,
        }
    }

    fn table_base(&self, lane: usize, layer: usize, head: usize) -> usize {
        ((lane * self.n_layers + layer) * self.n_heads + head) * self.max_pages
    }

    /// Copies pages a sequence in `lane` just got into its GPU tables.
    pub fn write_pages(&self, ctx: &GpuContext, lane: usize, new: &[NewPage]) {
        for p in new {
            assert!(
                p.slot_page < self.max_pages,
                "table of lane {lane} overflows its region"
            );
            let at = self.table_base(lane, p.layer, p.head) + p.slot_page;
            self.tables.write(ctx, at, &[p.page.index]);
        }
    }

    /// Rewrites a sequence's whole GPU tables (after compaction or re-admission).
    pub fn write_all_pages(&self, ctx: &GpuContext, lane: usize, seq: &SeqTables) {
        for layer in 0..self.n_layers {
            for head in 0..self.n_heads {
                let pages: Vec<u32> = seq
                    .head(layer, head)
                    .pages
                    .iter()
                    .map(|p| p.index)
                    .collect();
                if !pages.is_empty() {
                    self.tables
                        .write(ctx, self.table_base(lane, layer, head), &pages);
                }
            }
        }
    }

    /// Makes step row `row` read the tables of the sequence in `lane`; with
    /// `len`, every head reports that many slots (a prefill chunk in progress).
    pub fn set_row(&mut self, row: usize, lane: usize, seq: &SeqTables, len: Option<usize>) {
        assert!(
            row < self.max_rows && lane < self.lanes,
            "row {row} / lane {lane} out of range"
        );
        for layer in 0..self.n_layers {
            for head in 0..self.n_heads {
                let d = ((layer * self.max_rows + row) * self.n_heads + head) * 2;
                self.desc_host[d] = self.table_base(lane, layer, head) as u32;
                self.desc_host[d + 1] = len.unwrap_or(seq.head(layer, head).len) as u32;
            }
        }
    }

    /// Like [`PagedKv::set_row`] for step `back` steps before the newest of
    /// a chained decode: each head's length minus `back` (its slots were
    /// appended for the whole chain).
    pub fn set_row_before(&mut self, row: usize, lane: usize, seq: &SeqTables, back: usize) {
        self.set_row(row, lane, seq, None);
        for layer in 0..self.n_layers {
            for head in 0..self.n_heads {
                let d = ((layer * self.max_rows + row) * self.n_heads + head) * 2;
                self.desc_host[d + 1] -= back as u32;
            }
        }
    }

    /// Uploads the row descriptors set since the last step (one write).
    pub fn upload_rows(&self, ctx: &GpuContext) {
        self.desc.write(ctx, 0, &self.desc_host);
    }

    /// Room for the row descriptors of `steps` chained decode steps.
    pub fn enable_chain(&mut self, ctx: &GpuContext, steps: usize) -> Result<()> {
        self.desc_staged = Some(StagedInput::new(
            ctx,
            "kv.staged.desc",
            steps,
            self.desc_host.len(),
        )?);
        Ok(())
    }

    /// Stages the row descriptors set since the last step as chained step `step`'s.
    pub fn stage_rows(&self, ctx: &GpuContext, step: usize) {
        let st = self.desc_staged.as_ref().expect("enable_chain first");
        st.write(ctx, step, &self.desc_host);
    }

    /// The copy of staged step `step`'s descriptors into the live ones.
    pub fn staged_rows_op(&self, step: usize) -> Op {
        let st = self.desc_staged.as_ref().expect("enable_chain first");
        st.copy_op(step, &self.desc, self.desc_host.len())
    }

    pub fn usage(&self) -> PoolUsage {
        let page_bytes = self.layout.page_bytes();
        let total = self.alloc.total_pages();
        let used = self.alloc.pages_in_use();
        PoolUsage {
            pages_total: total,
            pages_in_use: used,
            page_bytes,
            bytes_total: (total * page_bytes) as u64,
            bytes_in_use: (used * page_bytes) as u64,
        }
    }

    /// Pages one head needs for `len` slots.
    pub fn pages_for(&self, len: usize) -> usize {
        len.div_ceil(self.layout.page_size)
    }

    pub fn n_shards(&self) -> usize {
        self.shards.len()
    }
}
