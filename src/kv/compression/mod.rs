//! KV-cache compression methods: each a scorer plus a budget rule, following
//! `docs/kv-compression.md` (the contract). This module is policy: it
//! validates the settings and, on the CPU, selects the slots to keep from
//! captured keys and queries (`kvsift select --cpu`, and the reference the
//! GPU passes are held against).

pub mod common;
pub mod gpu;
pub mod json;
mod policy;

pub use policy::{LayerCx, LayerJob, Policy, Records, ScoreSource, Setting};

use crate::error::{Error, Result};

/// A compression method: a handle to its registered [`Policy`]. Compare,
/// print and parse it by name; `Method::ALL` lists every method.
#[derive(Clone, Copy)]
pub struct Method(&'static dyn Policy);

/// The registry: `Name => module::Type,` declares `pub mod module;` and the
/// constant `Method::Name` and lists it in `Method::ALL`. Adding a method is
/// its file plus one line here.
macro_rules! methods {
    ($($name:ident => $module:ident :: $ty:ident,)*) => {
        $(pub mod $module;)*
        #[allow(non_upper_case_globals)]
        impl Method {
            $(pub const $name: Method = Method(&$module::$ty);)*
            /// Every registered method, the full cache first.
            pub const ALL: &'static [Method] = &[$(Method::$name),*];
        }
    };
}

methods! {
    None => fullcache::FullCache,
    StreamingLlm => streamingllm::StreamingLlm,
    H2o => h2o::H2o,
    SnapKv => snapkv::SnapKv,
    PyramidKv => pyramidkv::PyramidKv,
    AdaKv => adakv::AdaKv,
    Rkv => rkv::Rkv,
    KNorm => knorm::KNorm,
}

impl Method {
    pub fn policy(self) -> &'static dyn Policy {
        self.0
    }

    /// The `--kv` value.
    pub fn name(self) -> &'static str {
        self.0.name()
    }

    /// Every method that compresses, in registration order.
    pub fn compressing() -> impl Iterator<Item = Method> {
        Method::ALL.iter().copied().filter(|m| m.0.compresses())
    }

    /// The method named `name` (or one of its aliases), any case.
    pub fn from_name(name: &str) -> Option<Method> {
        let name = name.to_ascii_lowercase();
        Method::ALL
            .iter()
            .copied()
            .find(|m| m.name() == name || m.0.aliases().contains(&name.as_str()))
    }
}

impl PartialEq for Method {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Method {}

impl std::hash::Hash for Method {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name().hash(state)
    }
}

impl std::fmt::Debug for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Method::from_name(s).ok_or_else(|| {
            let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
            Error::invalid(
                "--kv",
                format!("unknown method {s:?}; expected one of {}", names.join(", ")),
            )
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
    /// StreamingLLM's sinks (default `budget - window`). The contract's
    /// `sinks = B - w`: set it with [`CompressConfig::set_sinks`], which
    /// makes the recent part (the window) `budget - sinks`.
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
            schedule: method.policy().default_schedule(),
            h2o_version: H2oVersion::V3,
            sinks: None,
            slot_order: SlotOrder::Position,
            beta: 20,
            floor: 0.2,
            sim_threshold: 0.5,
            eps: 1e-8,
        }
    }

    /// StreamingLLM keeping the first `sinks` slots and the last
    /// `budget - sinks` (the contract's `sinks = B - w`; the LongBench
    /// setting is 4 sinks). Set the budget first.
    pub fn set_sinks(&mut self, sinks: usize) {
        self.sinks = Some(sinks);
        self.window = self.budget.saturating_sub(sinks);
    }

    /// Sinks StreamingLLM keeps.
    pub fn sinks(&self) -> usize {
        self.sinks
            .unwrap_or(self.budget.saturating_sub(self.window))
    }

    /// Rejects settings the methods cannot run with, naming the flag.
    pub fn validate(&self) -> Result<()> {
        let policy = self.method.policy();
        if !policy.compresses() {
            return Ok(());
        }
        let bad = |flag: &str, why: String| Err(Error::invalid(flag, why));
        if let Some(s) = self.sinks.filter(|_| self.method == Method::StreamingLlm) {
            if s == 0 || s >= self.budget {
                return bad(
                    "--sinks",
                    format!(
                        "{s} must be at least 1 and below the budget ({})",
                        self.budget
                    ),
                );
            }
        }
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
        policy.validate(self)?;
        Ok(())
    }

    /// Refuses settings the user gave (`given`) that the method does not
    /// read: the error names the flag, the method, and the methods it is for.
    pub fn check_given(&self, given: &[Setting]) -> Result<()> {
        let policy = self.method.policy();
        for &s in given {
            let reads = policy.compresses()
                && (Setting::COMMON.contains(&s) || policy.settings().contains(&s));
            if !reads {
                let users: Vec<&str> = Method::compressing()
                    .filter(|m| Setting::COMMON.contains(&s) || m.policy().settings().contains(&s))
                    .map(|m| m.name())
                    .collect();
                return Err(Error::invalid(
                    s.flag(),
                    format!(
                        "does not apply to --kv {} (it is a setting of {})",
                        self.method,
                        users.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether the decode schedule compresses after the step whose token
    /// has position `pos`.
    pub fn compresses_after_decode(&self, pos: usize) -> bool {
        self.method.policy().compresses()
            && self.schedule == Schedule::Decode
            && pos.is_multiple_of(self.buffer)
    }

    /// Decode steps from the step whose token has position `pos` to the
    /// next step that compresses (0: this one); None without a decode schedule.
    pub fn steps_to_trigger(&self, pos: usize) -> Option<usize> {
        if !self.method.policy().compresses() || self.schedule != Schedule::Decode {
            return None;
        }
        let b = self.buffer;
        Some((b - pos % b) % b)
    }

    /// Whether a prompt of `len` tokens is compressed after its prefill.
    pub fn compresses_after_prefill(&self, len: usize) -> bool {
        self.method.policy().compresses() && len >= self.budget
    }

    /// Stored heads per KV head the pool needs for these settings.
    pub fn heads_per_kv(&self, group: usize) -> usize {
        self.method.policy().heads_per_kv(self, group)
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
        if let Some(want_rows) = cfg.method.policy().query_rows(cfg, self.t)
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

    pub fn key_head(&self, h: usize) -> &[f32] {
        &self.keys[h * self.t * self.d..][..self.t * self.d]
    }

    pub fn query_head(&self, h: usize) -> &[f32] {
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
    let policy = cfg.method.policy();
    let heads_out = x.hkv * cfg.heads_per_kv(x.hq / x.hkv);
    let all = || Selection {
        kept: vec![(0..x.t).collect(); heads_out],
        reference: policy
            .ranks_reference()
            .then(|| vec![(0..x.t).collect(); heads_out]),
    };
    if !policy.compresses() || x.t < cfg.budget {
        return Ok(all());
    }
    Ok(policy
        .select_cpu(cfg, x, layer, n_layers)
        .unwrap_or_else(all))
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
