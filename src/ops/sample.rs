//! Token sampling on the GPU (`shaders/sample.wgsl`), in transformers' order:
//! repetition penalty, temperature, top-k, top-p, min-p, then a draw by
//! inverse CDF with a uniform from the host's seeded generator; or greedy
//! (argmax of the penalised logits). Only the chosen token is read back.
//!
//! Non-finite values: a row whose penalised, tempered scores (f32, as the
//! kernel computes them) hold a NaN or an infinity has no distribution to
//! draw from; the sampler returns [`NO_TOKEN`] for it (and marks nothing
//! seen), and the engine fails that request with a clear error.

use bytemuck::{Pod, Zeroable};

use super::host_layout;
use super::{NO_FEATURES, REDUCE_SUBGROUP, REDUCE_WORKGROUP, ReducingKernel, SUBGROUPS, u32_of};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, Kernel, Op, StagedInput};

const SRC: &str = include_str!("../../shaders/sample.wgsl");

pub static SAMPLE: ReducingKernel = ReducingKernel {
    workgroup: Kernel {
        name: "sample",
        sources: &[REDUCE_WORKGROUP, SRC],
        entries: &["sample"],
        needs: NO_FEATURES,
    },
    subgroup: Kernel {
        name: "sample_subgroup",
        sources: &[REDUCE_SUBGROUP, SRC],
        entries: &["sample"],
        needs: SUBGROUPS,
    },
};

/// Largest vocabulary the sampler serves: token indices are exact in f32
/// below 2^24.
pub const MAX_VOCAB: usize = (1 << 24) - 1;

/// What the sampler returns for a row with a NaN or infinite score (never
/// a token id: vocabularies are below 2^24).
pub const NO_TOKEN: u32 = u32::MAX;

/// Temperatures below this sample greedily (as vLLM does): dividing logits
/// by a near-zero temperature only overflows toward the same argmax.
pub const GREEDY_BELOW: f32 = 1e-5;

/// How to pick the next token. `temperature` 0 (or below [`GREEDY_BELOW`]) means greedy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW
    }

    /// Rejects values transformers would reject, naming the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &str, why: String| Err(Error::invalid(flag, why));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "--temperature",
                format!(
                    "{} must be >= 0 (0 = greedy; below {GREEDY_BELOW} samples greedily)",
                    self.temperature
                ),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("--top-p", format!("{} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("--min-p", format!("{} must be in [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "--repetition-penalty",
                format!("{} must be positive (1 = off)", self.repetition_penalty),
            );
        }
        Ok(())
    }

    fn row(&self, lane: usize, u: f32) -> Result<RowParams> {
        Ok(RowParams {
            top_k: u32::try_from(self.top_k).unwrap_or(u32::MAX),
            greedy: self.is_greedy() as u32,
            lane: u32::try_from(lane).map_err(|_| Error::invalid("sampler", "lane past u32"))?,
            temperature: if self.is_greedy() {
                1.0
            } else {
                self.temperature
            },
            top_p: self.top_p,
            min_p: self.min_p,
            penalty: self.repetition_penalty,
            u,
        })
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SampleParams {
    n: u32,
    seen_words: u32,
    n_rows: u32,
}

/// One row's settings as the kernel reads them (`Row` in sample.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct RowParams {
    top_k: u32,
    greedy: u32,
    lane: u32,
    temperature: f32,
    top_p: f32,
    min_p: f32,
    penalty: f32,
    u: f32,
}

/// Words of the `seen` bitmask for a vocabulary of `n`.
pub fn seen_words(n: usize) -> usize {
    n.div_ceil(32)
}

/// Sets the bits of `tokens` in a host bitmask (ids past its end mark nothing).
pub fn mark_seen(mask: &mut [u32], tokens: &[u32]) {
    for &t in tokens {
        if let Some(w) = mask.get_mut(t as usize / 32) {
            *w |= 1 << (t % 32);
        }
    }
}

/// Per-row sampling on the GPU: the rows' settings live in a small storage
/// buffer that [`Sampler::set_rows`] rewrites before each step (new draws),
/// so the recorded dispatches never change.
pub struct Sampler {
    kernel: &'static Kernel,
    n: usize,
    seen_words: usize,
    rows: GpuBuffer<RowParams>,
    host_rows: Vec<RowParams>,
    /// Chained decode: each step's rows.
    staged: Option<StagedInput<RowParams>>,
}

impl Sampler {
    /// For a vocabulary of `n` and up to `max_rows` rows per step.
    pub fn new(ctx: &GpuContext, n: usize, max_rows: usize) -> Result<Self> {
        Self::with_kernel(ctx, SAMPLE.pick(ctx), n, max_rows)
    }

    pub fn with_kernel(
        ctx: &GpuContext,
        kernel: &'static Kernel,
        n: usize,
        max_rows: usize,
    ) -> Result<Self> {
        if n == 0 || n > MAX_VOCAB {
            return Err(Error::invalid(
                "sampler",
                format!(
                    "vocabulary of {n}: must be 1 to {} (exact f32 indices)",
                    MAX_VOCAB
                ),
            ));
        }
        Ok(Self {
            kernel,
            n,
            seen_words: seen_words(n),
            rows: GpuBuffer::zeros(ctx, "kvsift.sample.rows", max_rows.max(1))?,
            host_rows: Vec::with_capacity(max_rows.max(1)),
            staged: None,
        })
    }

    /// A dispatch sampling `n_rows` rows of `logits` into `out`, row r using
    /// the seen mask of its lane.
    pub fn dispatch(
        &self,
        ctx: &GpuContext,
        n_rows: usize,
        logits: &GpuBuffer<f32>,
        seen: &GpuBuffer<u32>,
        out: &GpuBuffer<u32>,
    ) -> Result<Dispatch> {
        if n_rows > self.rows.len()
            || logits.len() < n_rows * self.n
            || out.len() < n_rows
            || seen.len() < self.seen_words
        {
            return Err(Error::invalid(
                "sampler",
                format!(
                    "{n_rows} rows of {} against logits {}, seen {}, out {}",
                    self.n,
                    logits.len(),
                    seen.len(),
                    out.len()
                ),
            ));
        }
        let pipeline = ctx.pipeline(self.kernel, "sample", &super::wg_constants())?;
        let params = SampleParams {
            n: u32_of("vocab", self.n)?,
            seen_words: u32_of("seen words", self.seen_words)?,
            n_rows: u32_of("rows", n_rows)?,
        };
        Dispatch::with_params(
            ctx,
            pipeline,
            "kvsift.sample".into(),
            &params,
            &[
                logits.binding(),
                seen.binding(),
                out.binding(),
                self.rows.binding(),
            ],
            ctx.grid(u32_of("rows", n_rows)?),
        )
    }

    /// The settings of rows `0..` for the next step: (params, lane, uniform draw).
    pub fn set_rows(
        &mut self,
        ctx: &GpuContext,
        rows: impl IntoIterator<Item = (SamplingParams, usize, f32)>,
    ) -> Result<()> {
        self.fill_host_rows(rows)?;
        self.rows.write(ctx, 0, &self.host_rows)
    }

    fn fill_host_rows(
        &mut self,
        rows: impl IntoIterator<Item = (SamplingParams, usize, f32)>,
    ) -> Result<()> {
        self.host_rows.clear();
        for (p, lane, u) in rows {
            self.host_rows.push(p.row(lane, u)?);
        }
        if self.host_rows.len() > self.rows.len() {
            return Err(Error::invalid(
                "sampler",
                format!(
                    "{} rows; it holds {}",
                    self.host_rows.len(),
                    self.rows.len()
                ),
            ));
        }
        Ok(())
    }

    /// Room for the rows of `steps` chained decode steps.
    pub fn enable_chain(&mut self, ctx: &GpuContext, steps: usize) -> Result<()> {
        let rows = self.rows.len();
        self.staged = Some(StagedInput::new(ctx, "kvsift.sample.staged", steps, rows)?);
        Ok(())
    }

    /// Like [`Sampler::set_rows`], for chained step `step`.
    pub fn stage_rows(
        &mut self,
        ctx: &GpuContext,
        step: usize,
        rows: impl IntoIterator<Item = (SamplingParams, usize, f32)>,
    ) -> Result<()> {
        self.fill_host_rows(rows)?;
        self.staged()?.write(ctx, step, &self.host_rows)
    }

    fn staged(&self) -> Result<&StagedInput<RowParams>> {
        self.staged
            .as_ref()
            .ok_or_else(|| Error::invalid("chained decode", "enable_chain was not called"))
    }

    /// The copy of staged step `step`'s `n` rows into the rows the kernel reads.
    pub fn staged_rows_op(&self, step: usize, n: usize) -> Result<Op> {
        self.staged()?.copy_op(step, &self.rows, n)
    }
}

/// CPU twin: the same rules stated directly (sorting instead of radix
/// search), in f64; `None` where the kernel returns [`NO_TOKEN`].
pub fn sample_cpu(logits: &[f32], seen: &[u32], params: &SamplingParams, u: f32) -> Option<u32> {
    match kept_distribution(logits, seen, params) {
        Distribution::NonFinite => None,
        Distribution::Greedy(token) => Some(token),
        Distribution::Kept { weights, .. } => {
            let total: f64 = weights.iter().sum();
            let target = u as f64 * total;
            let mut acc = 0.0;
            for (i, v) in weights.iter().enumerate() {
                if *v > 0.0 {
                    acc += v;
                    if acc > target {
                        return Some(i as u32);
                    }
                }
            }
            Some(weights.iter().rposition(|v| *v > 0.0).unwrap_or(0) as u32)
        }
    }
}

/// What the sampling rules leave of a row of logits.
#[derive(Clone, Debug, PartialEq)]
pub enum Distribution {
    /// Greedy: the first index of the largest penalised logit.
    Greedy(u32),
    /// The unnormalised kept weights `exp(s - max)` (0 where dropped) and
    /// the penalised, tempered scores `s`.
    Kept { weights: Vec<f64>, scores: Vec<f64> },
    /// A score is NaN or infinite (checked in f32, as the kernel computes it).
    NonFinite,
}

/// Whether a row of `seen` marks token `i`.
fn is_seen(seen: &[u32], i: usize) -> bool {
    seen.get(i / 32).is_some_and(|w| (w >> (i % 32)) & 1 == 1)
}

/// Applies the rules to one row of logits (`seen`: the row's bitmask; a
/// short mask marks nothing past its end).
pub fn kept_distribution(logits: &[f32], seen: &[u32], params: &SamplingParams) -> Distribution {
    let pen = params.repetition_penalty;
    let penalised = |i: usize, l: f32| -> f32 {
        if pen != 1.0 && is_seen(seen, i) {
            if l < 0.0 { l * pen } else { l / pen }
        } else {
            l
        }
    };
    // The kernel's f32 scores decide whether the row has a distribution.
    let finite = logits.iter().enumerate().all(|(i, l)| {
        let s = penalised(i, *l);
        if params.is_greedy() {
            s.is_finite()
        } else {
            (s / params.temperature).is_finite()
        }
    });
    if !finite || logits.is_empty() {
        return Distribution::NonFinite;
    }
    let penalised: Vec<f64> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let l = *l as f64;
            let pen = pen as f64;
            if pen != 1.0 && is_seen(seen, i) {
                if l < 0.0 { l * pen } else { l / pen }
            } else {
                l
            }
        })
        .collect();
    if params.is_greedy() {
        let m = penalised.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        return Distribution::Greedy(penalised.iter().position(|v| *v == m).unwrap_or(0) as u32);
    }
    let s: Vec<f64> = penalised
        .iter()
        .map(|l| l / params.temperature as f64)
        .collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut keep = vec![true; s.len()];
    if params.top_k > 0 && params.top_k < s.len() {
        let mut sorted = s.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[params.top_k - 1];
        for (k, v) in keep.iter_mut().zip(&s) {
            *k = *v >= kth;
        }
    }
    let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
    if params.top_p < 1.0 {
        let z: f64 = e
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(v, _)| v)
            .sum();
        let before = keep.clone();
        for j in 0..e.len() {
            if before[j] {
                let above: f64 = (0..e.len())
                    .filter(|&i| before[i] && e[i] > e[j])
                    .map(|i| e[i])
                    .sum();
                keep[j] = above < params.top_p as f64 * z;
            }
        }
    }
    let weights: Vec<f64> = e
        .iter()
        .zip(&keep)
        .map(|(v, k)| {
            if *k && *v >= params.min_p as f64 {
                *v
            } else {
                0.0
            }
        })
        .collect();
    Distribution::Kept { weights, scores: s }
}

/// The structs this module's kernels read (checked against the WGSL in
/// tests/shader_portability.rs).
pub(crate) fn host_layouts() -> Vec<super::HostLayout> {
    vec![
        host_layout!(SampleParams in [&SAMPLE.workgroup, &SAMPLE.subgroup] as "Params" { n, seen_words, n_rows }),
        host_layout!(RowParams in [&SAMPLE.workgroup, &SAMPLE.subgroup] as "Row" { top_k, greedy, lane, temperature, top_p, min_p, penalty, u }),
    ]
}

#[cfg(test)]
mod tests;
