//! The engine's side of KV compression: what the forward records for it
//! (each lane's ring of its last `window` queries, H2O's running attention
//! column sums) and the compression pass over one sequence: per layer the
//! method selects (`kv::compression::gpu`), the kept slots move to the
//! front of each head (`ops::compress::compact`), and the pages past the new
//! lengths go back to the pool.

use crate::error::{Error, Result};
use crate::gpu::buffer::checked_len;
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, Op};
use crate::kv::SeqTables;
use crate::kv::compression::gpu::select_layer;
use crate::kv::compression::{CompressConfig, LayerJob, Records, ScoreSource};
use crate::kv::paged::PagedKv;
use crate::model::config::ModelConfig;
use crate::ops::compress::{self, CompressBuffers, ScoreQueries, ScoreSpec};
use crate::ops::paged_attention::LayerKv;

/// The per-sequence state of the compressor, on the host while the
/// sequence is swapped out.
#[derive(Clone, Debug, Default)]
pub struct LaneState {
    ring: Vec<f32>,
    ring_pos: Vec<u32>,
    h2o: Vec<f32>,
}

impl LaneState {
    pub fn bytes(&self) -> usize {
        4 * (self.ring.len() + self.ring_pos.len() + self.h2o.len())
    }
}

/// What the compression passes did, for the API and `--json`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CompressionStats {
    /// Compression passes run (one per sequence and trigger).
    pub passes: u64,
    /// Pool bytes in use just before and just after the latest pass.
    pub bytes_before_last: u64,
    pub bytes_after_last: u64,
    /// Slots dropped by all passes (summed over layers and heads).
    pub slots_dropped: u64,
}

/// What the forward records for compression beyond what the engine's own
/// method needs, so that requests may bring methods that score from
/// something else ([`crate::engine::EngineConfig::recording`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recording {
    /// Each sequence's last `window` queries (every method but H2O v3,
    /// StreamingLLM and KNorm scores from them), at the engine's window.
    pub window_queries: bool,
    /// H2O v3's running attention sums: an extra pass over the cache per
    /// layer and step.
    pub attention_sums: bool,
}

impl Recording {
    /// What a method scores from, as a recording.
    pub fn of(records: Records) -> Self {
        Self {
            window_queries: records == Records::WindowQueries,
            attention_sums: records == Records::AttentionSums,
        }
    }

    pub fn union(self, other: Self) -> Self {
        Self {
            window_queries: self.window_queries || other.window_queries,
            attention_sums: self.attention_sums || other.attention_sums,
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.window_queries && !self.attention_sums
    }

    /// Whether a method that scores from `records` can run on it.
    pub fn covers(&self, records: Records) -> bool {
        match records {
            Records::Nothing => true,
            Records::WindowQueries => self.window_queries,
            Records::AttentionSums => self.attention_sums,
        }
    }
}

pub struct Compressor {
    /// The engine's own compression (its window is the recording's).
    pub cfg: CompressConfig,
    bufs: CompressBuffers,
    /// What the forward records: the method's needs and the extra asked for.
    records: Recording,
    /// Stored heads per KV head of the pool.
    heads_per_kv: usize,
    /// `[lane][layer][window][Hq * D]` and `[lane][window]`.
    ring: GpuBuffer<f32>,
    ring_pos: GpuBuffer<u32>,
    /// Lane of each row group of the step being run.
    lanes: GpuBuffer<u32>,
    /// H2O v3: `[lane][layer][Hq][capacity]` running column sums.
    h2o: Option<GpuBuffer<f32>>,
    h2o_stats: GpuBuffer<f32>,
    n_layers: usize,
    n_lanes: usize,
    n_q_heads: usize,
    group: usize,
    capacity: usize,
    pub stats: CompressionStats,
}

impl Compressor {
    /// Stored heads per KV head the pool needs for `cfg`.
    pub fn heads_per_kv(cfg: &CompressConfig, model: &ModelConfig) -> usize {
        cfg.heads_per_kv(model.n_heads / model.n_kv_heads)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &GpuContext,
        cfg: CompressConfig,
        extra: Recording,
        model: &ModelConfig,
        kv: &PagedKv,
        lanes: usize,
        rows: usize,
        capacity: usize,
    ) -> Result<Self> {
        cfg.validate()?;
        let hq = model.n_heads;
        let w = cfg.window;
        let records = Recording::of(cfg.method.policy().records(&cfg)).union(extra);
        let accumulates = records.attention_sums;
        let acc_units = if accumulates { hq / kv.n_heads } else { 0 };
        let h2o = if accumulates {
            let words = checked_len("H2O sums", &[lanes, model.n_layers, hq, capacity, 4])? / 4;
            if (words * 4) as u64 > ctx.caps.max_binding_bytes {
                return Err(Error::LimitExceeded {
                    what: format!(
                        "H2O attention sums of {lanes} sequences x {} layers x {hq} heads x {capacity} slots",
                        model.n_layers
                    ),
                    requested: (words * 4) as u64,
                    limit_name: "max_storage_buffer_binding_size",
                    limit: ctx.caps.max_binding_bytes,
                });
            }
            Some(GpuBuffer::zeros(ctx, "compress.h2o", words)?)
        } else {
            None
        };
        Ok(Self {
            bufs: CompressBuffers::new(
                ctx,
                kv.layout,
                kv.n_heads,
                hq,
                w,
                capacity,
                acc_units,
                model.n_layers,
            )?,
            records,
            heads_per_kv: kv.heads_per_kv,
            // Only a method that scores from the window queries needs them.
            ring: GpuBuffer::zeros(
                ctx,
                "compress.ring",
                if records.window_queries {
                    checked_len(
                        "compression window queries",
                        &[lanes, model.n_layers, w, hq, model.head_dim],
                    )?
                } else {
                    1
                },
            )?,
            ring_pos: GpuBuffer::zeros(
                ctx,
                "compress.ring_pos",
                if records.window_queries {
                    checked_len("compression window", &[lanes, w])?
                } else {
                    1
                },
            )?,
            lanes: GpuBuffer::zeros(ctx, "compress.lanes", rows.max(1))?,
            h2o,
            h2o_stats: GpuBuffer::zeros(
                ctx,
                "compress.h2o_stats",
                compress::stats_len(rows.max(1), hq, capacity),
            )?,
            n_layers: model.n_layers,
            n_lanes: lanes,
            n_q_heads: hq,
            group: model.n_heads / model.n_kv_heads,
            capacity,
            stats: CompressionStats::default(),
            cfg,
        })
    }

    fn needs_queries(&self) -> bool {
        self.records.window_queries
    }

    /// Which lane each row group of the next step belongs to.
    pub fn set_lanes(&self, ctx: &GpuContext, lanes: &[u32]) -> Result<()> {
        self.lanes.write(ctx, 0, lanes)
    }

    /// Words of one lane's window-query ring.
    fn ring_words(&self) -> usize {
        self.ring.len() / self.lane_count()
    }

    fn lane_count(&self) -> usize {
        self.n_lanes.max(1)
    }

    fn h2o_words(&self) -> usize {
        self.n_layers * self.n_q_heads * self.capacity
    }

    /// What the forward recorded for the sequence in `lane` (its window
    /// queries, H2O's sums), copied to the host when it is swapped out.
    pub fn save_lane(&self, ctx: &GpuContext, lane: usize) -> Result<LaneState> {
        let (rw, w) = (self.ring_words(), self.cfg.window);
        let rings = self.needs_queries();
        Ok(LaneState {
            ring: match rings {
                true => self.ring.read_range(ctx, lane * rw, rw)?,
                false => vec![],
            },
            ring_pos: match rings {
                true => self.ring_pos.read_range(ctx, lane * w, w)?,
                false => vec![],
            },
            h2o: match &self.h2o {
                Some(h2o) => h2o.read_range(ctx, lane * self.h2o_words(), self.h2o_words())?,
                None => vec![],
            },
        })
    }

    /// Puts a swapped-out sequence's state back, in its new `lane`.
    pub fn restore_lane(&self, ctx: &GpuContext, lane: usize, state: &LaneState) -> Result<()> {
        if self.needs_queries() {
            self.ring
                .write(ctx, lane * self.ring_words(), &state.ring)?;
            self.ring_pos
                .write(ctx, lane * self.cfg.window, &state.ring_pos)?;
        }
        if let Some(h2o) = &self.h2o {
            h2o.write(ctx, lane * self.h2o_words(), &state.h2o)?;
        }
        Ok(())
    }

    /// A new sequence in `lane` starts from zero attention sums.
    pub fn reset_lane(&self, ctx: &GpuContext, lane: usize) -> Result<()> {
        if let Some(h2o) = &self.h2o {
            let words = (self.n_layers * self.n_q_heads * self.capacity) as u64;
            let mut enc = ctx.encoder("kvsift.compress.reset");
            enc.clear_buffer(h2o.raw(), lane as u64 * words * 4, Some(words * 4));
            ctx.checked("resetting H2O sums", || ctx.queue.submit([enc.finish()]))?;
        }
        Ok(())
    }

    /// What layer `layer`'s forward records after the attention of `n_rows`
    /// query rows (`rows_per_group` per sequence): the window queries, or
    /// H2O's column sums over heads of at most `slots` slots (a prefill
    /// chunk's length; the capacity for the cached decode plans).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_ops(
        &self,
        ctx: &GpuContext,
        kv: &LayerKv,
        positions: &GpuBuffer<u32>,
        qkv: &GpuBuffer<f32>,
        qkv_stride: usize,
        layer: usize,
        n_rows: usize,
        rows_per_group: usize,
        slots: usize,
    ) -> Result<Vec<Op>> {
        let mut ops = vec![];
        if self.needs_queries() {
            ops.push(
                compress::store_window_queries(
                    ctx,
                    kv,
                    positions,
                    qkv,
                    qkv_stride,
                    self.n_q_heads,
                    n_rows,
                    rows_per_group,
                    &self.lanes,
                    &self.ring,
                    &self.ring_pos,
                    layer,
                    self.n_layers,
                    self.cfg.window,
                )?
                .into(),
            );
        }
        if let Some(h2o) = &self.h2o {
            let q = ScoreQueries {
                queries: qkv,
                positions,
                base: 0,
                row_stride: qkv_stride,
                pos_base: 0,
                n_rows,
                rows_per_group,
                n_q_heads: self.n_q_heads,
            };
            let per_lane = self.n_layers * self.n_q_heads * self.capacity;
            ops.extend(
                compress::score_accumulate(
                    ctx,
                    kv,
                    &q,
                    &self.spec(),
                    &self.h2o_stats,
                    h2o,
                    &self.lanes,
                    layer * self.n_q_heads * self.capacity,
                    per_lane,
                    self.capacity,
                    slots,
                    true,
                )?
                .into_iter()
                .map(Op::from),
            );
        }
        Ok(ops)
    }

    fn spec(&self) -> ScoreSpec {
        ScoreSpec {
            rkv: false,
            mean: false,
            agg: self.cfg.gqa_agg,
            kernel: 1,
            pooling: self.cfg.pooling,
            window: self.cfg.window,
            group: self.group,
        }
    }

    /// Whether a request may compress with `cfg` in this engine: the same
    /// stored heads per KV head (the pool's layout), and what its method
    /// scores from is what the forward records (the same window).
    pub fn accepts(&self, cfg: &CompressConfig) -> Result<()> {
        cfg.validate()?;
        let bad = |why: String| Err(Error::invalid("request compression", why));
        let hpk = cfg.heads_per_kv(self.group);
        if hpk != self.heads_per_kv {
            return bad(format!(
                "--kv {} stores {hpk} heads per KV head; this engine's pool stores {}                  (build the engine with the same --granularity)",
                cfg.method, self.heads_per_kv
            ));
        }
        let needs = cfg.method.policy().records(cfg);
        if !self.records.covers(needs) {
            let hint = match needs {
                Records::AttentionSums => "--record-attention-sums",
                _ => "a method that scores from them",
            };
            return bad(format!(
                "--kv {} scores from {needs:?}, which this engine's forward does not record \
                 (build it with {hint})",
                cfg.method
            ));
        }
        if needs != Records::Nothing && cfg.window != self.cfg.window {
            return bad(format!(
                "--kv {}: window {}; this engine records window {}",
                cfg.method, cfg.window, self.cfg.window
            ));
        }
        Ok(())
    }

    /// Compresses the sequence in `lane` (every layer), frees the pages past
    /// the new lengths; true if any slot was dropped. Uses step row 0's
    /// descriptors (rewritten before the next step).
    pub fn compress(
        &mut self,
        ctx: &GpuContext,
        kv: &mut PagedKv,
        lane: usize,
        tables: &mut SeqTables,
        cfg: &CompressConfig,
    ) -> Result<u64> {
        let before = kv.usage().bytes_in_use;
        let started = std::time::Instant::now();
        let slots_before: usize = tables.slots_per_layer().iter().sum();
        kv.set_row(0, lane, tables, None);
        kv.upload_rows(ctx)?;
        let (w, hq, d) = (cfg.window, self.n_q_heads, kv.layout.head_dim);
        let mut dropped = 0u64;
        // One submission for all layers (they share the scratch buffers, in
        // order); a method that reads its scores back runs what is pending
        // first.
        let mut pending: Vec<Dispatch> = vec![];
        let mut truncations: Vec<(usize, Vec<usize>)> = vec![];
        for layer in 0..self.n_layers {
            let lens: Vec<usize> = (0..kv.n_heads).map(|h| tables.head(layer, h).len).collect();
            let layer_kv = kv.layer(layer);
            let per_lane = self.n_layers * hq * self.capacity;
            let acc_base = lane * per_lane + layer * hq * self.capacity;
            let source = match (cfg.method.policy().records(cfg), &self.h2o) {
                (Records::AttentionSums, Some(acc)) => ScoreSource::Accumulated {
                    acc,
                    base: acc_base,
                    t_stride: self.capacity,
                },
                _ => ScoreSource::Queries(ScoreQueries {
                    queries: &self.ring,
                    positions: &self.ring_pos,
                    base: (lane * self.n_layers + layer) * w * hq * d,
                    row_stride: hq * d,
                    pos_base: lane * w,
                    n_rows: w,
                    rows_per_group: w,
                    n_q_heads: hq,
                }),
            };
            let job = LayerJob {
                kv: layer_kv,
                lens: lens.clone(),
                source,
                layer,
                n_layers: self.n_layers,
                n_q_heads: hq,
                group: self.group,
                rank_reference: false,
            };
            let Some(keep) = select_layer(ctx, cfg, &job, &self.bufs, &mut pending)? else {
                continue;
            };
            if keep.new_lens == lens && !keep.reference {
                continue; // everything kept, in place
            }
            let (acc, acc_units) = match &self.h2o {
                Some(acc) => (acc, hq / kv.n_heads),
                None => (&self.bufs.acc, 0),
            };
            let ds = &mut pending;
            ds.extend(keep.dispatches.iter().cloned());
            ds.extend(compress::compact(
                ctx,
                &job.kv,
                w,
                &self.bufs,
                keep.kvec_base,
                keep.list(&self.bufs),
                acc,
                acc_base,
                self.capacity,
                acc_units,
                lens.iter().copied().max().unwrap_or(0),
            )?);
            for (&old, &new) in lens.iter().zip(&keep.new_lens) {
                dropped += (old - new) as u64;
            }
            truncations.push((layer, keep.new_lens.clone()));
        }
        if !pending.is_empty() {
            ctx.run("kvsift.compress", &pending.iter().collect::<Vec<_>>())?;
        }
        for (layer, lens) in truncations {
            for (h, new) in lens.into_iter().enumerate() {
                tables.truncate(layer, h, new, &mut kv.alloc);
            }
        }
        log::debug!(
            "compression pass on lane {lane}: {slots_before} -> {} slots, {:.2} ms",
            slots_before as u64 - dropped,
            started.elapsed().as_secs_f64() * 1e3
        );
        self.stats.passes += 1;
        self.stats.slots_dropped += dropped;
        self.stats.bytes_before_last = before;
        self.stats.bytes_after_last = kv.usage().bytes_in_use;
        Ok(dropped)
    }
}
