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
use crate::gpu::buffer::checked_len;
use crate::gpu::{GpuBuffer, GpuContext, Op, StagedInput};
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

/// What the pool stores per layer: the model's KV heads and their size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// A sequence's KV held in host memory while it is swapped out.
#[derive(Clone, Debug, Default)]
pub struct HostKv {
    /// Each head's length, `[layer * n_heads + head]`.
    pub lens: Vec<usize>,
    /// The pages' words (keys, values, positions), in table order.
    pub words: Vec<u32>,
}

impl HostKv {
    pub fn bytes(&self) -> usize {
        self.words.len() * 4
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
        cfg: KvShape,
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
        let n_layers = cfg.n_layers;
        // The largest pool the device can bind: one storage binding per layer.
        let max_pool = ctx.caps.max_binding_bytes.saturating_mul(n_layers as u64);
        let bytes = pc
            .bytes
            .unwrap_or_else(|| ((DEFAULT_POOL_MB * 1024.0 * 1024.0) as u64).min(max_pool));
        let total = bytes / page_bytes;
        if total == 0 {
            return Err(Error::invalid(
                "--kv-pool-mb",
                format!("{bytes} bytes hold no page of {page_bytes} bytes"),
            ));
        }
        if bytes > max_pool {
            return Err(Error::LimitExceeded {
                what: format!(
                    "KV pool of {bytes} bytes (--kv-pool-mb) over {n_layers} layers, one storage binding each"
                ),
                requested: bytes,
                limit_name: "max_storage_buffer_binding_size x layers",
                limit: max_pool,
            });
        }
        // The fewest shards whose largest (proportional to its layers) fits a binding.
        let per_shard_max = ctx.caps.max_binding_bytes / page_bytes;
        let shard_pages = |k: usize| -> Vec<u64> {
            (0..k)
                .map(|s| {
                    let layers = (s..n_layers).step_by(k).count() as u64;
                    // total <= max_pool / page_bytes, so this product fits u64.
                    total * layers / n_layers as u64
                })
                .collect()
        };
        let k = (1..=n_layers)
            .find(|&k| shard_pages(k).iter().all(|&p| p <= per_shard_max))
            .ok_or_else(|| Error::LimitExceeded {
                what: format!("KV pool of {bytes} bytes over {n_layers} layers"),
                requested: bytes / n_layers as u64,
                limit_name: "max_storage_buffer_binding_size per layer",
                limit: ctx.caps.max_binding_bytes,
            })?;
        let pages = shard_pages(k)
            .into_iter()
            .map(|p| {
                u32::try_from(p).map_err(|_| {
                    Error::invalid(
                        "--kv-pool-mb",
                        format!("{p} pages in one shard: more than a page index holds"),
                    )
                })
            })
            .collect::<Result<Vec<u32>>>()?;
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
        let desc_len = checked_len("KV row descriptors", &[n_layers, max_rows, n_heads, 2])?;
        let tables_len = checked_len("KV block tables", &[lanes, n_layers, n_heads, max_pages])?;
        Ok(Self {
            layout,
            n_layers,
            n_heads,
            heads_per_kv,
            alloc: PageAllocator::new(&pages, n_layers)?,
            shards,
            desc: GpuBuffer::zeros(ctx, "kv.desc", desc_len)?,
            tables: GpuBuffer::zeros(ctx, "kv.tables", tables_len)?,
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
    pub fn write_pages(&self, ctx: &GpuContext, lane: usize, new: &[NewPage]) -> Result<()> {
        self.check_lane(lane)?;
        for p in new {
            if p.slot_page >= self.max_pages {
                return Err(Error::invalid(
                    "KV tables",
                    format!(
                        "page {} of a head in lane {lane}: the tables hold {} per head (the context)",
                        p.slot_page, self.max_pages
                    ),
                ));
            }
            let at = self.table_base(lane, p.layer, p.head) + p.slot_page;
            self.tables.write(ctx, at, &[p.page.index])?;
        }
        Ok(())
    }

    fn check_lane(&self, lane: usize) -> Result<()> {
        if lane >= self.lanes {
            return Err(Error::invalid(
                "KV tables",
                format!("lane {lane} of {}", self.lanes),
            ));
        }
        Ok(())
    }

    /// Rewrites a sequence's whole GPU tables (after compaction or re-admission).
    pub fn write_all_pages(&self, ctx: &GpuContext, lane: usize, seq: &SeqTables) -> Result<()> {
        self.check_lane(lane)?;
        for layer in 0..self.n_layers {
            for head in 0..self.n_heads {
                let pages: Vec<u32> = seq
                    .head(layer, head)
                    .pages
                    .iter()
                    .map(|p| p.index)
                    .collect();
                if pages.len() > self.max_pages {
                    return Err(Error::invalid(
                        "KV tables",
                        format!(
                            "{} pages of a head; room for {}",
                            pages.len(),
                            self.max_pages
                        ),
                    ));
                }
                self.tables
                    .write(ctx, self.table_base(lane, layer, head), &pages)?;
            }
        }
        Ok(())
    }

    /// Makes step row `row` read the tables of the sequence in `lane`; with
    /// `len`, every head reports that many slots (a prefill chunk in progress).
    ///
    /// # Panics
    /// On a row or lane past those the pool was built for: the engine
    /// assigns both from its own ranges, so this is a bug, not an input.
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
                self.desc_host[d + 1] = self.desc_host[d + 1].saturating_sub(back as u32);
            }
        }
    }

    /// Uploads the row descriptors set since the last step (one write).
    pub fn upload_rows(&self, ctx: &GpuContext) -> Result<()> {
        self.desc.write(ctx, 0, &self.desc_host)
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
    pub fn stage_rows(&self, ctx: &GpuContext, step: usize) -> Result<()> {
        self.staged()?.write(ctx, step, &self.desc_host)
    }

    /// The copy of staged step `step`'s descriptors into the live ones.
    pub fn staged_rows_op(&self, step: usize) -> Result<Op> {
        self.staged()?
            .copy_op(step, &self.desc, self.desc_host.len())
    }

    fn staged(&self) -> Result<&StagedInput<u32>> {
        self.desc_staged
            .as_ref()
            .ok_or_else(|| Error::invalid("chained decode", "enable_chain was not called"))
    }

    /// Copies a sequence's pages to host memory (swapping it out): every
    /// head's length and its pages' words in table order. One submission.
    pub fn read_sequence(&self, ctx: &GpuContext, seq: &SeqTables) -> Result<HostKv> {
        let page_bytes = self.layout.page_bytes() as u64;
        let mut ranges = vec![];
        for layer in 0..self.n_layers {
            let shard = &self.shards[self.alloc.shard_of_layer(layer) as usize];
            for head in 0..self.n_heads {
                for p in &seq.head(layer, head).pages {
                    ranges.push((shard.raw(), p.index as u64 * page_bytes, page_bytes));
                }
            }
        }
        let bytes = crate::gpu::buffer::read_ranges(ctx, "kv.swap_out", &ranges)?;
        Ok(HostKv {
            lens: seq.lens(),
            words: bytemuck::pod_collect_to_vec(&bytes),
        })
    }

    /// Writes `host`'s page words into the pages `seq` now holds (allocated
    /// for `host.lens`, in the same table order).
    pub fn write_sequence(&self, ctx: &GpuContext, seq: &SeqTables, host: &HostKv) -> Result<()> {
        let pw = self.layout.page_words();
        let mut at = 0;
        for layer in 0..self.n_layers {
            let shard = &self.shards[self.alloc.shard_of_layer(layer) as usize];
            for head in 0..self.n_heads {
                for p in &seq.head(layer, head).pages {
                    let words = host.words.get(at..at + pw).ok_or_else(|| {
                        Error::invalid("swapped KV", "fewer pages than the tables hold")
                    })?;
                    shard.write(ctx, p.index as usize * pw, words)?;
                    at += pw;
                }
            }
        }
        Ok(())
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
