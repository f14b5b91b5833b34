//! KV-cache compression methods: each a scorer plus a budget rule, following
//! `docs/kv-compression.md` (the contract). This module is policy: it
//! validates the settings and, on the CPU, selects the slots to keep from
//! captured keys and queries (`kvsift select --cpu`, and the reference the
//! GPU passes are held against).

pub mod adakv;
pub mod common;
pub mod gpu;
pub mod h2o;
pub mod pyramidkv;
pub mod rkv;
pub mod snapkv;
pub mod streamingllm;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    None,
    StreamingLlm,
    H2o,
    SnapKv,
    PyramidKv,
    AdaKv,
    Rkv,
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "none" | "fullkv" | "full" => Method::None,
            "streamingllm" => Method::StreamingLlm,
            "h2o" => Method::H2o,
            "snapkv" => Method::SnapKv,
            "pyramidkv" => Method::PyramidKv,
            "adakv" => Method::AdaKv,
            "rkv" | "r-kv" => Method::Rkv,
            _ => {
                return Err(Error::invalid(
                    "--kv",
                    format!(
                        "unknown method {s:?}; expected none, streamingllm, h2o, snapkv, pyramidkv, adakv or rkv"
                    ),
                ));
            }
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    KvHead,
    QueryHead,
}

// The score kernels' own knobs; the policy picks them.
pub use crate::ops::compress::{GqaAgg, Pooling};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum H2oVersion {
    V1,
    V3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotOrder {
    Position,
    Reference,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Prefill,
    Decode,
}

/// Every setting of every method, with the contract's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct CompressConfig {
    pub method: Method,
    /// Slots kept per head per layer, window included.
    pub budget: usize,
    pub window: usize,
    pub kernel: usize,
    pub pooling: Pooling,
    /// Decode schedule: compress at positions `p % buffer == 0`.
    pub buffer: usize,
    /// R-KV's mix of importance and redundancy.
    pub lambda: f32,
    pub granularity: Granularity,
    pub gqa_agg: GqaAgg,
    pub schedule: Schedule,
    pub h2o_version: H2oVersion,
    /// StreamingLLM's sinks (default `budget - window`).
    pub sinks: Option<usize>,
    pub slot_order: SlotOrder,
    /// PyramidKV's beta.
    pub beta: usize,
    /// AdaKV's floor fraction.
    pub floor: f64,
    /// R-KV's similarity threshold and norm epsilon.
    pub sim_threshold: f32,
    pub eps: f32,
}

impl CompressConfig {
    /// The contract's defaults for `method` with `budget`.
    pub fn new(method: Method, budget: usize) -> Self {
        let rkv = method == Method::Rkv;
        Self {
            method,
            budget,
            window: 8,
            kernel: 7,
            pooling: Pooling::Max,
            buffer: 128,
            lambda: 0.1,
            granularity: Granularity::KvHead,
            gqa_agg: GqaAgg::Mean,
            schedule: if rkv {
                Schedule::Decode
            } else {
                Schedule::Prefill
            },
            h2o_version: H2oVersion::V3,
            sinks: None,
            slot_order: SlotOrder::Position,
            beta: 20,
            floor: 0.2,
            sim_threshold: 0.5,
            eps: 1e-8,
        }
    }

    /// Sinks StreamingLLM keeps.
    pub fn sinks(&self) -> usize {
        self.sinks
            .unwrap_or(self.budget.saturating_sub(self.window))
    }

    /// Rejects settings the methods cannot run with, naming the flag.
    pub fn validate(&self) -> Result<()> {
        if self.method == Method::None {
            return Ok(());
        }
        let bad = |flag: &str, why: String| Err(Error::invalid(flag, why));
        if self.window == 0 {
            return bad("--window", "must be at least 1".into());
        }
        if self.budget <= self.window {
            return bad(
                "--budget",
                format!(
                    "{} must exceed the window ({}): the budget includes the window",
                    self.budget, self.window
                ),
            );
        }
        if self.kernel == 0 || self.kernel.is_multiple_of(2) {
            return bad("--kernel", format!("{} must be odd", self.kernel));
        }
        if !(0.0..=1.0).contains(&self.lambda) {
            return bad("--lambda", format!("{} must be in [0, 1]", self.lambda));
        }
        if self.buffer == 0 {
            return bad("--buffer", "must be at least 1".into());
        }
        if self.method == Method::StreamingLlm && self.sinks() + self.window > self.budget {
            return bad(
                "--sinks",
                format!(
                    "{} sinks + window {} exceed the budget {}",
                    self.sinks(),
                    self.window,
                    self.budget
                ),
            );
        }
        if self.sinks.is_some_and(|s| s >= self.budget) {
            return bad(
                "--sinks",
                format!("{} must be below the budget {}", self.sinks(), self.budget),
            );
        }
        if self.method == Method::PyramidKv && self.beta == 0 {
            return bad("--beta", "must be positive".into());
        }
        Ok(())
    }
}

/// Captured tensors of one layer (`kvsift select` input): post-RoPE keys
/// `[hkv, t, d]` and queries `[hq, q_rows, d]` (the window's, or all `t` for H2O v3).
/// Largest magnitude a captured key or query may have (f16's largest value).
pub const MAX_CAPTURED_ABS: f32 = 65504.0;

pub struct Captured<'a> {
    pub keys: &'a [f32],
    pub queries: &'a [f32],
    pub hkv: usize,
    pub hq: usize,
    pub t: usize,
    pub q_rows: usize,
    pub d: usize,
}

impl Captured<'_> {
    /// Checks the shapes against the settings (a user's input file).
    pub fn check(&self, cfg: &CompressConfig) -> Result<()> {
        let bad = |why: String| Err(Error::invalid("select input", why));
        if self.d == 0 || self.d > crate::ops::attention::MAX_HEAD_DIM {
            return bad(format!(
                "head dim {}: expected 1 to {}",
                self.d,
                crate::ops::attention::MAX_HEAD_DIM
            ));
        }
        let len = |dims: &[usize]| dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if len(&[self.hkv, self.t, self.d]) != Some(self.keys.len())
            || len(&[self.hq, self.q_rows, self.d]) != Some(self.queries.len())
        {
            return bad("tensor sizes disagree with their shapes".into());
        }
        // What the cache could hold (f16): scores stay finite on either side.
        for (name, x, rows) in [
            ("keys", self.keys, self.t),
            ("queries", self.queries, self.q_rows),
        ] {
            if let Some(i) = x
                .iter()
                .position(|v| !v.is_finite() || v.abs() > MAX_CAPTURED_ABS)
            {
                let (h, r, c) = (i / (rows * self.d), i / self.d % rows, i % self.d);
                return bad(format!(
                    "{name}[{h}, {r}, {c}] = {}: values must be finite and within \
                     ±{MAX_CAPTURED_ABS} (the f16 range of the KV cache)",
                    x[i]
                ));
            }
        }
        if self.hkv == 0 || self.hq == 0 || !self.hq.is_multiple_of(self.hkv) {
            return bad(format!(
                "queries have {} heads, not a multiple of the keys' {}",
                self.hq, self.hkv
            ));
        }
        let want_rows = if cfg.method == Method::H2o && cfg.h2o_version == H2oVersion::V3 {
            self.t
        } else {
            cfg.window
        };
        if cfg.method != Method::None
            && cfg.method != Method::StreamingLlm
            && self.q_rows != want_rows
        {
            return bad(format!(
                "queries have {} rows; this method needs {want_rows} ({})",
                self.q_rows,
                if want_rows == self.t {
                    "all T queries"
                } else {
                    "the window"
                }
            ));
        }
        if self.t == 0 {
            return bad("no keys".into());
        }
        Ok(())
    }

    fn key_head(&self, h: usize) -> &[f32] {
        &self.keys[h * self.t * self.d..][..self.t * self.d]
    }

    fn query_head(&self, h: usize) -> &[f32] {
        &self.queries[h * self.q_rows * self.d..][..self.q_rows * self.d]
    }
}

/// What a selection keeps: per stored head, the slots ascending; for R-KV
/// also the reference layout order.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    pub kept: Vec<Vec<usize>>,
    pub reference: Option<Vec<Vec<usize>>>,
}

/// Selects on the CPU (the contract's reference path).
pub fn select_cpu(
    cfg: &CompressConfig,
    x: &Captured,
    layer: usize,
    n_layers: usize,
) -> Result<Selection> {
    cfg.validate()?;
    x.check(cfg)?;
    let heads_out = match (cfg.method, cfg.granularity) {
        (Method::Rkv, _) | (_, Granularity::KvHead) => x.hkv,
        (_, Granularity::QueryHead) => x.hq,
    };
    let all = || Selection {
        kept: vec![(0..x.t).collect(); heads_out],
        reference: (cfg.method == Method::Rkv).then(|| vec![(0..x.t).collect(); heads_out]),
    };
    if cfg.method == Method::None || x.t < cfg.budget {
        return Ok(all());
    }
    Ok(match cfg.method {
        Method::None => unreachable!(),
        Method::StreamingLlm => streamingllm::select(cfg, x.t, heads_out),
        Method::H2o => h2o::select(cfg, x),
        Method::SnapKv => snapkv::select(cfg, x, cfg.budget - cfg.window),
        Method::PyramidKv => {
            match pyramidkv::layer_topk(cfg.budget, cfg.window, x.t, n_layers, layer, cfg.beta) {
                Some(k) => snapkv::select(cfg, x, k),
                None => all(),
            }
        }
        Method::AdaKv => adakv::select(cfg, x),
        Method::Rkv => rkv::select(cfg, x),
    })
}

/// Per-query-head window scores of the SnapKV family: probabilities of the
/// window queries, reduced over the rows on the prefix `[0, t - w)`.
pub(crate) fn window_scores(x: &Captured, w: usize, mean: bool) -> Vec<Vec<f64>> {
    let g = x.hq / x.hkv;
    (0..x.hq)
        .map(|h| {
            let p = common::window_probs(x.query_head(h), x.key_head(h / g), w, x.t, x.d);
            common::reduce_rows(&p, x.t - w, mean)
        })
        .collect()
}

/// Rows of per-query-head scores turned into rows per stored head.
pub(crate) fn per_stored_head(
    cfg: &CompressConfig,
    x: &Captured,
    rows: Vec<Vec<f64>>,
) -> Vec<Vec<f64>> {
    match cfg.granularity {
        Granularity::QueryHead => rows,
        Granularity::KvHead => common::group_reduce(&rows, x.hq / x.hkv, cfg.gqa_agg),
    }
}
