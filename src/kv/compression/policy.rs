//! What a compression method is: a [`Policy`], one file per method holding
//! its CPU reference (the contract, `docs/kv-compression.md`) and the GPU
//! recipe that scores a layer's slots and turns the scores into per-head
//! budgets. The runner (`gpu.rs`) and the engine know only this trait; the
//! GPU stages a recipe strings together are the ops of `ops::compress`,
//! reached through [`LayerCx`].

use super::{Captured, CompressConfig, Granularity, Schedule, Selection};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, Kernel};
use crate::ops::HostLayout;
use crate::ops::compress::{self, CompressBuffers, ScoreQueries, ScoreSpec};
use crate::ops::paged_attention::LayerKv;

/// A setting a method may read beyond budget, window, schedule and buffer
/// (which every compressing method reads). A flag for a setting the chosen
/// method does not read is an error ([`CompressConfig::check_given`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    Kernel,
    Pooling,
    Lambda,
    Granularity,
    GqaAgg,
    H2oVersion,
    Sinks,
    SlotOrder,
    Beta,
    Floor,
    SimThreshold,
    Eps,
    /// The settings every compressing method reads.
    Budget,
    Window,
    Schedule,
    Buffer,
}

impl Setting {
    /// Read by every method that compresses.
    pub const COMMON: [Setting; 4] = [
        Setting::Budget,
        Setting::Window,
        Setting::Schedule,
        Setting::Buffer,
    ];

    /// Every setting.
    pub const ALL: [Setting; 16] = [
        Setting::Budget,
        Setting::Window,
        Setting::Schedule,
        Setting::Buffer,
        Setting::Kernel,
        Setting::Pooling,
        Setting::Lambda,
        Setting::Granularity,
        Setting::GqaAgg,
        Setting::H2oVersion,
        Setting::Sinks,
        Setting::SlotOrder,
        Setting::Beta,
        Setting::Floor,
        Setting::SimThreshold,
        Setting::Eps,
    ];

    /// Its name as a JSON field (the server's `kv` object): the flag in
    /// snake case, `--gqa-agg` -> `gqa_agg`.
    pub fn field(self) -> String {
        self.flag().trim_start_matches("--").replace('-', "_")
    }

    /// The command-line flag that sets it.
    pub fn flag(self) -> &'static str {
        match self {
            Setting::Kernel => "--kernel",
            Setting::Pooling => "--pooling",
            Setting::Lambda => "--lambda",
            Setting::Granularity => "--granularity",
            Setting::GqaAgg => "--gqa-agg",
            Setting::H2oVersion => "--h2o-version",
            Setting::Sinks => "--sinks",
            Setting::SlotOrder => "--slot-order",
            Setting::Beta => "--beta",
            Setting::Floor => "--floor",
            Setting::SimThreshold => "--sim-threshold",
            Setting::Eps => "--eps",
            Setting::Budget => "--budget",
            Setting::Window => "--window",
            Setting::Schedule => "--schedule",
            Setting::Buffer => "--buffer",
        }
    }
}

/// What the forward must record for a method to score from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Records {
    /// Nothing (the keys alone, or a fixed rule).
    Nothing,
    /// Each lane's last `window` post-RoPE queries.
    WindowQueries,
    /// Running column sums of every query's attention probabilities, per
    /// query head (H2O v3).
    AttentionSums,
}

/// A compression method. Implement it in `kv/compression/<method>.rs` and
/// register the type with one line in the `methods!` list of `mod.rs`.
pub trait Policy: Sync {
    /// The `--kv` value.
    fn name(&self) -> &'static str;

    /// Other spellings `--kv` accepts.
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether it ever drops a slot (false only for the full cache).
    fn compresses(&self) -> bool {
        true
    }

    /// The settings it reads beyond [`Setting::COMMON`].
    fn settings(&self) -> &'static [Setting] {
        &[]
    }

    /// Its schedule when none is asked for.
    fn default_schedule(&self) -> Schedule {
        Schedule::Prefill
    }

    /// Checks of its own settings (after the common ones), naming the flag.
    fn validate(&self, _cfg: &CompressConfig) -> Result<()> {
        Ok(())
    }

    /// Stored heads per KV head (1: one selection per KV head; the group
    /// size when each query head selects on its own).
    fn heads_per_kv(&self, cfg: &CompressConfig, group: usize) -> usize {
        match cfg.granularity {
            Granularity::QueryHead if self.settings().contains(&Setting::Granularity) => group,
            _ => 1,
        }
    }

    /// What the forward records for it.
    fn records(&self, _cfg: &CompressConfig) -> Records {
        Records::WindowQueries
    }

    /// Query rows per head a captured input (`kvsift select`) must carry
    /// for a sequence of `t` tokens; None: any (the queries are unused).
    fn query_rows(&self, cfg: &CompressConfig, _t: usize) -> Option<usize> {
        match self.records(cfg) {
            Records::Nothing => None,
            _ => Some(cfg.window),
        }
    }

    /// Whether its selection also has a reference layout order (R-KV).
    fn ranks_reference(&self) -> bool {
        false
    }

    /// The contract's selection for one layer of captured tensors with
    /// `x.t >= budget`, or None when the layer keeps everything.
    fn select_cpu(
        &self,
        cfg: &CompressConfig,
        x: &Captured,
        layer: usize,
        n_layers: usize,
    ) -> Option<Selection>;

    /// Records the stages that leave each stored head's candidate scores in
    /// `cx.bufs.scores` and returns how many prefix slots each head keeps
    /// (the window comes on top; ties to the lower slot). None: the layer
    /// keeps everything.
    fn select_gpu(&self, cx: &mut LayerCx) -> Result<Option<Vec<usize>>>;

    /// Kernels of its own (checked by the portability tests like the ops').
    fn kernels(&self) -> Vec<&'static Kernel> {
        vec![]
    }

    /// Its kernels' host parameter structs, checked against their WGSL.
    fn host_layouts(&self) -> Vec<HostLayout> {
        vec![]
    }
}

/// Where a layer's attention scores come from.
pub enum ScoreSource<'a> {
    /// Attention of these query rows (the window's; all prompt rows for H2O
    /// v3 in `select`).
    Queries(ScoreQueries<'a>),
    /// H2O's running column sums (per query head) kept by the engine.
    Accumulated {
        acc: &'a crate::gpu::GpuBuffer<f32>,
        base: usize,
        t_stride: usize,
    },
}

/// One (sequence, layer) to compress.
pub struct LayerJob<'a> {
    /// The sequence's view: `desc_base` points at its entry for stored head 0.
    pub kv: LayerKv<'a>,
    /// Slots each stored head holds.
    pub lens: Vec<usize>,
    pub source: ScoreSource<'a>,
    pub layer: usize,
    pub n_layers: usize,
    pub n_q_heads: usize,
    /// Query heads per model KV head.
    pub group: usize,
    /// Also rank R-KV's kept slots in the reference layout (`bufs.order`)
    /// even when the cache keeps position order (`kvsift select` reports both).
    pub rank_reference: bool,
}

/// What a method's GPU recipe works with: the layer, the settings, the
/// scratch, and the stages (each records dispatches into `dispatches`, run
/// in order after the ones already pending).
pub struct LayerCx<'a, 'j> {
    pub ctx: &'a GpuContext,
    pub cfg: &'a CompressConfig,
    pub job: &'a LayerJob<'j>,
    pub bufs: &'a CompressBuffers,
    /// Dispatches of earlier layers not yet submitted (run first when a
    /// recipe reads scores back).
    pub pending: &'a mut Vec<Dispatch>,
    pub dispatches: Vec<Dispatch>,
}

impl LayerCx<'_, '_> {
    /// The longest head's length.
    pub fn slots(&self) -> usize {
        self.job.lens.iter().copied().max().unwrap_or(0)
    }

    /// Candidate (prefix) slots of each stored head: its length less the window.
    pub fn candidates(&self) -> Vec<usize> {
        let w = self.cfg.window;
        self.job.lens.iter().map(|&t| t.saturating_sub(w)).collect()
    }

    /// `k` prefix slots for every head (at most its candidates); heads
    /// shorter than the budget keep everything.
    pub fn uniform(&self, k: usize) -> Vec<usize> {
        self.job
            .lens
            .iter()
            .zip(self.candidates())
            .map(|(&t, c)| if t < self.cfg.budget { c } else { k.min(c) })
            .collect()
    }

    /// Attention scores of the layer's source (window queries, or H2O's
    /// sums), reduced over rows and GQA groups and pooled as `spec` says,
    /// into `bufs.scores`.
    pub fn attention_scores(&mut self, spec: &ScoreSpec) -> Result<()> {
        let (ctx, job, bufs, slots) = (self.ctx, self.job, self.bufs, self.slots());
        let ds = match &job.source {
            ScoreSource::Queries(q) => compress::window_scores(ctx, &job.kv, q, spec, bufs, slots)?,
            ScoreSource::Accumulated {
                acc,
                base,
                t_stride,
            } => {
                if *t_stride != bufs.t_max {
                    return Err(Error::invalid(
                        "compression",
                        format!(
                            "accumulators of stride {t_stride} against scratch of {}",
                            bufs.t_max
                        ),
                    ));
                }
                // The reduction only needs the query-head count and the rows (sum, no mean).
                let q = ScoreQueries {
                    queries: acc,
                    positions: &bufs.lane0,
                    base: 0,
                    row_stride: 0,
                    pos_base: 0,
                    n_rows: 1,
                    rows_per_group: 1,
                    n_q_heads: job.n_q_heads,
                };
                compress::reduce_and_pool(ctx, &job.kv, &q, spec, acc, *base, bufs, slots)?.into()
            }
        };
        self.dispatches.extend(ds);
        Ok(())
    }

    /// R-KV's redundancy, mixed into the importance in `bufs.scores`.
    pub fn redundancy(&mut self, lambda: f32, threshold: f32, eps: f32) -> Result<()> {
        let ds = compress::rkv_redundancy(
            self.ctx,
            &self.job.kv,
            self.cfg.window,
            lambda,
            threshold,
            eps,
            self.bufs,
            self.slots(),
        )?;
        self.dispatches.extend(ds);
        Ok(())
    }

    /// Every candidate scores `value` (a rule that keeps the first slots:
    /// top-k breaks the ties to the lower slot).
    pub fn constant_scores(&mut self, value: f32) -> Result<()> {
        let d = compress::fill_scores(
            self.ctx,
            &self.job.kv,
            self.cfg.window,
            value,
            self.bufs,
            self.slots(),
        )?;
        self.dispatches.push(d);
        Ok(())
    }

    /// Runs what is recorded (after the pending dispatches) and reads back
    /// each head's candidate scores.
    pub fn read_scores(&mut self) -> Result<Vec<Vec<f32>>> {
        self.pending.append(&mut self.dispatches);
        let refs: Vec<&Dispatch> = self.pending.iter().collect();
        self.ctx.run("kvsift.compress.scores", &refs)?;
        self.pending.clear();
        let t_max = self.bufs.t_max;
        let all = self
            .bufs
            .scores
            .read_range(self.ctx, 0, self.job.kv.n_heads * t_max)?;
        Ok(self
            .candidates()
            .iter()
            .enumerate()
            .map(|(s, &c)| all[s * t_max..][..c].to_vec())
            .collect())
    }
}
