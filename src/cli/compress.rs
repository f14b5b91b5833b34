//! The compression flags shared by the subcommands. `--kv` takes the
//! registered methods' names (`Method::ALL`, so `--help` lists them and a
//! new method appears without touching this file); enumerated settings are
//! clap `ValueEnum`s. Settings left out take the library's defaults
//! (`CompressConfig::new`); a setting the chosen method does not read is an
//! error naming both.

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, ValueEnum};
use kvsift::kv::compression::{
    CompressConfig, GqaAgg, Granularity, H2oVersion, Method, Pooling, Schedule, Setting, SlotOrder,
};

/// `--kv`'s parser: every registered method's name, with its aliases.
pub fn method_parser() -> impl TypedValueParser<Value = Method> {
    let values: Vec<PossibleValue> = Method::ALL
        .iter()
        .map(|m| PossibleValue::new(m.name()).aliases(m.policy().aliases().iter().copied()))
        .collect();
    PossibleValuesParser::new(values).map(|s| Method::from_name(&s).unwrap_or(Method::None))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PoolingArg {
    Max,
    Avg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GranularityArg {
    KvHead,
    QueryHead,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GqaAggArg {
    Mean,
    Max,
    Sum,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    Prefill,
    Decode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum H2oVersionArg {
    V1,
    V3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SlotOrderArg {
    Position,
    Reference,
}

/// Settings left out take the contract's defaults (docs/kv-compression.md).
#[derive(Args, Debug, Clone)]
pub struct CompressArgs {
    /// KV compression method.
    #[arg(long, default_value = "none", value_parser = method_parser())]
    pub kv: Method,
    /// Slots kept per head per layer, window included.
    #[arg(long)]
    pub budget: Option<usize>,
    /// Observation window: the last W queries score, the last W slots stay [default: 8].
    #[arg(long)]
    pub window: Option<usize>,
    /// Decode schedule: compress at positions p % buffer == 0 [default: 128].
    #[arg(long)]
    pub buffer: Option<usize>,
    /// When to compress [default: decode for rkv, else prefill].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleArg>,
    /// Pooling kernel, odd [default: 7].
    #[arg(long)]
    pub kernel: Option<usize>,
    /// Pooling of the scores over neighbouring slots [default: max].
    #[arg(long, value_enum)]
    pub pooling: Option<PoolingArg>,
    /// Selection per kv-head (memory-efficient) or per query-head (stores Hq heads) [default: kv-head].
    #[arg(long, value_enum)]
    pub granularity: Option<GranularityArg>,
    /// How a GQA group's scores combine at kv-head granularity [default: mean].
    #[arg(long, value_enum)]
    pub gqa_agg: Option<GqaAggArg>,
    /// R-KV's mix: lambda * importance - (1 - lambda) * redundancy, in [0, 1] [default: 0.1].
    #[arg(long)]
    pub lambda: Option<f32>,
    /// R-KV's cosine similarity threshold of the last(i) rule [default: 0.5].
    #[arg(long)]
    pub sim_threshold: Option<f32>,
    /// R-KV's key norm epsilon [default: 1e-8].
    #[arg(long)]
    pub eps: Option<f32>,
    /// R-KV cache order across rounds [default: position].
    #[arg(long, value_enum)]
    pub slot_order: Option<SlotOrderArg>,
    /// H2O version: v3 (current code) or v1 (the PyramidKV paper's numbers) [default: v3].
    #[arg(long, value_enum)]
    pub h2o_version: Option<H2oVersionArg>,
    /// StreamingLLM's sink slots; the last budget - sinks slots stay with them (4: LongBench's setting) [default: budget - window].
    #[arg(long)]
    pub sinks: Option<usize>,
    /// PyramidKV's beta (the top layer keeps about (budget - window) / beta) [default: 20].
    #[arg(long)]
    pub beta: Option<usize>,
    /// AdaKV's floor: the share of each head's budget it keeps whatever its scores [default: 0.2].
    #[arg(long)]
    pub floor: Option<f64>,
}

impl CompressArgs {
    /// The validated configuration; a setting the method does not read is an error.
    pub fn config(&self) -> anyhow::Result<CompressConfig> {
        let c = self.build()?;
        c.check_given(&self.given())?;
        c.validate()?;
        Ok(c)
    }

    /// The configuration of `method` from these flags, taking only the
    /// settings it reads (sweeps over methods share one set of flags).
    pub fn config_for(
        &self,
        method: Method,
        budget: Option<usize>,
    ) -> anyhow::Result<CompressConfig> {
        let mut a = self.clone();
        a.kv = method;
        a.budget = budget;
        let c = a.build()?;
        c.validate()?;
        Ok(c)
    }

    /// The settings given on the command line.
    fn given(&self) -> Vec<Setting> {
        [
            (self.budget.is_some(), Setting::Budget),
            (self.window.is_some(), Setting::Window),
            (self.buffer.is_some(), Setting::Buffer),
            (self.schedule.is_some(), Setting::Schedule),
            (self.kernel.is_some(), Setting::Kernel),
            (self.pooling.is_some(), Setting::Pooling),
            (self.granularity.is_some(), Setting::Granularity),
            (self.gqa_agg.is_some(), Setting::GqaAgg),
            (self.lambda.is_some(), Setting::Lambda),
            (self.sim_threshold.is_some(), Setting::SimThreshold),
            (self.eps.is_some(), Setting::Eps),
            (self.slot_order.is_some(), Setting::SlotOrder),
            (self.h2o_version.is_some(), Setting::H2oVersion),
            (self.sinks.is_some(), Setting::Sinks),
            (self.beta.is_some(), Setting::Beta),
            (self.floor.is_some(), Setting::Floor),
        ]
        .into_iter()
        .filter_map(|(given, s)| given.then_some(s))
        .collect()
    }

    /// The library's defaults for the method, with the given settings on top.
    fn build(&self) -> anyhow::Result<CompressConfig> {
        let method = self.kv;
        let budget = match self.budget {
            Some(b) => b,
            None if !method.policy().compresses() => 0,
            None => anyhow::bail!("--kv {method} needs --budget"),
        };
        let mut c = CompressConfig::new(method, budget);
        let set = |dst: &mut _, v: Option<_>| {
            if let Some(v) = v {
                *dst = v;
            }
        };
        set(&mut c.window, self.window);
        set(&mut c.buffer, self.buffer);
        set(&mut c.kernel, self.kernel);
        set(&mut c.beta, self.beta);
        if let Some(v) = self.lambda {
            c.lambda = v;
        }
        if let Some(v) = self.sim_threshold {
            c.sim_threshold = v;
        }
        if let Some(v) = self.eps {
            c.eps = v;
        }
        if let Some(v) = self.floor {
            c.floor = v;
        }
        // StreamingLLM's recent part is budget - sinks unless --window is
        // given too (a mismatch is then validate's error).
        match self.sinks {
            Some(s) if method == Method::StreamingLlm && self.window.is_none() => c.set_sinks(s),
            sinks => c.sinks = sinks,
        }
        if let Some(s) = self.schedule {
            c.schedule = match s {
                ScheduleArg::Prefill => Schedule::Prefill,
                ScheduleArg::Decode => Schedule::Decode,
            };
        }
        if let Some(p) = self.pooling {
            c.pooling = match p {
                PoolingArg::Max => Pooling::Max,
                PoolingArg::Avg => Pooling::Avg,
            };
        }
        if let Some(g) = self.granularity {
            c.granularity = match g {
                GranularityArg::KvHead => Granularity::KvHead,
                GranularityArg::QueryHead => Granularity::QueryHead,
            };
        }
        if let Some(a) = self.gqa_agg {
            c.gqa_agg = match a {
                GqaAggArg::Mean => GqaAgg::Mean,
                GqaAggArg::Max => GqaAgg::Max,
                GqaAggArg::Sum => GqaAgg::Sum,
            };
        }
        if let Some(v) = self.h2o_version {
            c.h2o_version = match v {
                H2oVersionArg::V1 => H2oVersion::V1,
                H2oVersionArg::V3 => H2oVersion::V3,
            };
        }
        if let Some(o) = self.slot_order {
            c.slot_order = match o {
                SlotOrderArg::Position => SlotOrder::Position,
                SlotOrderArg::Reference => SlotOrder::Reference,
            };
        }
        Ok(c)
    }
}
