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
mod tests {
    use super::*;
    use crate::testing::{Rng, gpu};

    fn gpu_sample(
        ctx: &GpuContext,
        kernel: &'static Kernel,
        logits: &[f32],
        seen: &[u32],
        params: &SamplingParams,
        us: &[f32],
    ) -> (Vec<u32>, Vec<u32>) {
        // All draws in one dispatch: row r samples the same logits with u[r],
        // each row with its own copy of the seen mask (lane r).
        let n = logits.len();
        let rows = us.len();
        let all_logits: Vec<f32> = (0..rows).flat_map(|_| logits.iter().copied()).collect();
        let all_seen: Vec<u32> = (0..rows).flat_map(|_| seen.iter().copied()).collect();
        let lb = GpuBuffer::from_slice(ctx, "logits", &all_logits).unwrap();
        let sb = GpuBuffer::from_slice(ctx, "seen", &all_seen).unwrap();
        let ob = GpuBuffer::<u32>::zeros(ctx, "out", rows).unwrap();
        let mut s = Sampler::with_kernel(ctx, kernel, n, rows).unwrap();
        let d = s.dispatch(ctx, rows, &lb, &sb, &ob).unwrap();
        s.set_rows(ctx, us.iter().enumerate().map(|(r, u)| (*params, r, *u)))
            .unwrap();
        ctx.run("test", &[&d]).unwrap();
        let got = ob.read(ctx).unwrap();
        let seen_after = sb.read(ctx).unwrap();
        // The last row's mask.
        let w = seen.len();
        (got, seen_after[(rows - 1) * w..].to_vec())
    }

    /// Draws within this relative distance of a CDF or top-p boundary are
    /// skipped: the f32 GPU sums and the f64 twin may round to either side.
    const MARGIN: f64 = 1e-4;

    fn near_boundary(logits: &[f32], seen: &[u32], params: &SamplingParams, u: f32) -> bool {
        let Distribution::Kept {
            weights: kept,
            scores: s,
        } = kept_distribution(logits, seen, params)
        else {
            return false;
        };
        let total: f64 = kept.iter().sum();
        let target = u as f64 * total;
        let mut acc = 0.0;
        for v in &kept {
            acc += v;
            if (acc - target).abs() <= MARGIN * total {
                return true;
            }
        }
        // top-p and min-p boundaries, when those filters are on
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
        let z: f64 = e.iter().sum();
        let near_p = params.top_p < 1.0
            && (0..e.len()).any(|j| {
                let above: f64 = e.iter().filter(|v| **v > e[j]).sum();
                (above - params.top_p as f64 * z).abs() <= MARGIN * z
            });
        let near_min =
            params.min_p > 0.0 && e.iter().any(|v| (v - params.min_p as f64).abs() <= MARGIN);
        near_p || near_min
    }

    #[test]
    fn sampling_matches_twin() {
        let Some(ctx) = gpu() else { return };
        let mut kernels = vec![&SAMPLE.workgroup];
        if ctx.caps.features.subgroups {
            kernels.push(&SAMPLE.subgroup);
        }
        let mut compared = 0;
        let mut skipped = 0;
        for (case, &n) in [1usize, 7, 64, 128, 300, 1000, 5003].iter().enumerate() {
            let mut rng = Rng::new(300 + case as u64);
            let logits: Vec<f32> = (0..n).map(|_| 3.0 * rng.normal()).collect();
            let mut seen = vec![0u32; seen_words(n)];
            let marked: Vec<u32> = (0..n / 5).map(|_| rng.below(n) as u32).collect();
            mark_seen(&mut seen, &marked);
            let settings = [
                SamplingParams {
                    temperature: 1.0,
                    ..SamplingParams::greedy()
                },
                SamplingParams {
                    temperature: 0.7,
                    top_k: 20,
                    top_p: 0.8,
                    repetition_penalty: 1.05,
                    ..SamplingParams::greedy()
                },
                SamplingParams {
                    temperature: 1.3,
                    top_k: 5,
                    ..SamplingParams::greedy()
                },
                SamplingParams {
                    temperature: 0.9,
                    top_p: 0.5,
                    min_p: 0.05,
                    ..SamplingParams::greedy()
                },
                SamplingParams {
                    repetition_penalty: 1.3,
                    ..SamplingParams::greedy()
                },
            ];
            let us: Vec<f32> = (0..12).map(|_| rng.uniform()).collect();
            for params in &settings {
                for kernel in &kernels {
                    let (got, seen_after) = gpu_sample(ctx, kernel, &logits, &seen, params, &us);
                    for (&u, &g) in us.iter().zip(&got) {
                        if near_boundary(&logits, &seen, params, u) {
                            skipped += 1;
                            continue;
                        }
                        let want = sample_cpu(&logits, &seen, params, u).unwrap();
                        assert_eq!(
                            g, want,
                            "{} n={n} {params:?} u={u}: got token {g}, want {want}",
                            kernel.name
                        );
                        compared += 1;
                    }
                    // The last chosen token is now marked seen.
                    let last = *got.last().unwrap() as usize;
                    assert_eq!(
                        (seen_after[last / 32] >> (last % 32)) & 1,
                        1,
                        "seen bit of {last}"
                    );
                }
            }
        }
        eprintln!("sampling: {compared} draws compared, {skipped} near a boundary skipped");
        assert!(
            skipped * 20 < compared,
            "too many draws skipped: {skipped} of {}",
            compared + skipped
        );
    }

    #[test]
    fn non_finite_rows_give_no_token_and_mark_nothing() {
        let Some(ctx) = gpu() else { return };
        let mut kernels = vec![&SAMPLE.workgroup];
        if ctx.caps.features.subgroups {
            kernels.push(&SAMPLE.subgroup);
        }
        let n = 300;
        let mut rng = Rng::new(77);
        let base: Vec<f32> = (0..n).map(|_| 3.0 * rng.normal()).collect();
        let spoil = |at: usize, v: f32| {
            let mut l = base.clone();
            l[at] = v;
            l
        };
        let greedy = SamplingParams::greedy();
        let warm = SamplingParams {
            temperature: 0.8,
            top_k: 40,
            ..greedy
        };
        let cold = SamplingParams {
            temperature: 2e-5,
            ..greedy
        };
        // (logits, params, a token or not)
        let cases = [
            (spoil(0, f32::NAN), greedy, false),
            (spoil(n - 1, f32::NAN), warm, false),
            (spoil(17, f32::INFINITY), greedy, false),
            (spoil(17, f32::NEG_INFINITY), warm, false),
            // finite logits whose tempered scores overflow f32
            (spoil(5, 1e34), cold, false),
            (base.clone(), warm, true),
            (base.clone(), greedy, true),
        ];
        for kernel in &kernels {
            for (i, (logits, params, has_token)) in cases.iter().enumerate() {
                let seen = vec![0u32; seen_words(n)];
                let (got, seen_after) = gpu_sample(ctx, kernel, logits, &seen, params, &[0.3]);
                let want = sample_cpu(logits, &seen, params, 0.3);
                assert_eq!(want.is_some(), *has_token, "case {i}: twin {want:?}");
                assert_eq!(
                    got[0],
                    want.unwrap_or(NO_TOKEN),
                    "{} case {i}: got {}, twin {want:?}",
                    kernel.name,
                    got[0]
                );
                let marked: u32 = seen_after.iter().map(|w| w.count_ones()).sum();
                assert_eq!(marked, *has_token as u32, "case {i}: seen bits {marked}");
            }
        }
    }

    #[test]
    fn bad_sampling_flags_are_errors() {
        for (p, flag) in [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "--temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "--top-p",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "--top-p",
            ),
            (
                SamplingParams {
                    min_p: 2.0,
                    ..Default::default()
                },
                "--min-p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "--repetition-penalty",
            ),
        ] {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
        assert!(SamplingParams::default().validate().is_ok());
    }

    #[test]
    fn the_twin_defines_non_finite_rows_for_every_setting() {
        let mut logits = vec![0.5f32; 40];
        logits[3] = f32::NAN;
        for params in [
            SamplingParams::greedy(),
            SamplingParams {
                temperature: 0.7,
                top_k: 5,
                top_p: 0.9,
                min_p: 0.1,
                repetition_penalty: 1.2,
                ..SamplingParams::greedy()
            },
        ] {
            assert_eq!(sample_cpu(&logits, &[u32::MAX; 2], &params, 0.5), None);
            assert_eq!(
                kept_distribution(&logits, &[], &params),
                Distribution::NonFinite
            );
        }
        // An empty row, a short seen mask, a temperature near zero.
        assert_eq!(sample_cpu(&[], &[], &SamplingParams::greedy(), 0.5), None);
        let cold = SamplingParams {
            temperature: 1e-30,
            ..SamplingParams::greedy()
        };
        assert!(cold.validate().is_ok() && cold.is_greedy());
        assert_eq!(sample_cpu(&[1.0, 3.0, 2.0], &[], &cold, 0.9), Some(1));
        let mut mask = vec![0u32; 1];
        mark_seen(&mut mask, &[3, 1000]);
        assert_eq!(mask, vec![8]);
    }
}
