//! The compression flags shared by the subcommands. Enumerated flags are
//! clap `ValueEnum`s (so `--help` lists their values and clap refuses the
//! rest), each mapped onto the library's type.

use clap::{Args, ValueEnum};
use kvsift::kv::compression::{
    CompressConfig, GqaAgg, Granularity, H2oVersion, Method, Pooling, Schedule, SlotOrder,
};

/// `--kv`: the compression method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KvMethod {
    #[value(alias = "full", alias = "fullkv")]
    None,
    #[value(name = "streamingllm")]
    StreamingLlm,
    H2o,
    #[value(name = "snapkv")]
    SnapKv,
    #[value(name = "pyramidkv")]
    PyramidKv,
    #[value(name = "adakv")]
    AdaKv,
    #[value(alias = "r-kv")]
    Rkv,
}

impl KvMethod {
    /// Every method that compresses, in the order tables list them.
    pub const COMPRESSING: [KvMethod; 6] = [
        KvMethod::StreamingLlm,
        KvMethod::H2o,
        KvMethod::SnapKv,
        KvMethod::PyramidKv,
        KvMethod::AdaKv,
        KvMethod::Rkv,
    ];

    /// The flag's spelling (`rkv`, `snapkv`, ...).
    pub fn name(self) -> &'static str {
        match self {
            KvMethod::None => "none",
            KvMethod::StreamingLlm => "streamingllm",
            KvMethod::H2o => "h2o",
            KvMethod::SnapKv => "snapkv",
            KvMethod::PyramidKv => "pyramidkv",
            KvMethod::AdaKv => "adakv",
            KvMethod::Rkv => "rkv",
        }
    }
}

impl From<KvMethod> for Method {
    fn from(m: KvMethod) -> Self {
        match m {
            KvMethod::None => Method::None,
            KvMethod::StreamingLlm => Method::StreamingLlm,
            KvMethod::H2o => Method::H2o,
            KvMethod::SnapKv => Method::SnapKv,
            KvMethod::PyramidKv => Method::PyramidKv,
            KvMethod::AdaKv => Method::AdaKv,
            KvMethod::Rkv => Method::Rkv,
        }
    }
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

#[derive(Args, Debug, Clone)]
pub struct CompressArgs {
    /// KV compression method.
    #[arg(long, value_enum, default_value_t = KvMethod::None)]
    pub kv: KvMethod,
    /// Slots kept per head per layer, window included.
    #[arg(long)]
    pub budget: Option<usize>,
    /// Observation window (the last W queries; always kept).
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Pooling kernel (odd).
    #[arg(long, default_value_t = 7)]
    pub kernel: usize,
    /// Pooling of the scores over neighbouring slots.
    #[arg(long, value_enum, default_value_t = PoolingArg::Max)]
    pub pooling: PoolingArg,
    /// Decode schedule: compress at positions p % buffer == 0.
    #[arg(long, default_value_t = 128)]
    pub buffer: usize,
    /// R-KV's mix: lambda * importance - (1 - lambda) * redundancy, in [0, 1].
    #[arg(long, default_value_t = 0.1)]
    pub lambda: f32,
    /// Selection per kv-head (memory-efficient) or per query-head (stores Hq heads).
    #[arg(long, value_enum, default_value_t = GranularityArg::KvHead)]
    pub granularity: GranularityArg,
    /// How a GQA group's scores combine at kv-head granularity.
    #[arg(long, value_enum, default_value_t = GqaAggArg::Mean)]
    pub gqa_agg: GqaAggArg,
    /// When to compress (default: decode for rkv, else prefill).
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleArg>,
    /// H2O version: v3 (current code) or v1 (the PyramidKV paper's numbers).
    #[arg(long, value_enum, default_value_t = H2oVersionArg::V3)]
    pub h2o_version: H2oVersionArg,
    /// StreamingLLM's sink slots (default budget - window).
    #[arg(long)]
    pub sinks: Option<usize>,
    /// R-KV cache order across rounds.
    #[arg(long, value_enum, default_value_t = SlotOrderArg::Position)]
    pub slot_order: SlotOrderArg,
}

impl CompressArgs {
    /// The validated configuration.
    pub fn config(&self) -> anyhow::Result<CompressConfig> {
        let method: Method = self.kv.into();
        let budget = match (method, self.budget) {
            (Method::None, b) => b.unwrap_or(0),
            (_, Some(b)) => b,
            (_, None) => anyhow::bail!("--kv {} needs --budget", self.kv.name()),
        };
        let mut c = CompressConfig::new(method, budget);
        c.window = self.window;
        c.kernel = self.kernel;
        c.pooling = match self.pooling {
            PoolingArg::Max => Pooling::Max,
            PoolingArg::Avg => Pooling::Avg,
        };
        c.buffer = self.buffer;
        c.lambda = self.lambda;
        c.granularity = match self.granularity {
            GranularityArg::KvHead => Granularity::KvHead,
            GranularityArg::QueryHead => Granularity::QueryHead,
        };
        c.gqa_agg = match self.gqa_agg {
            GqaAggArg::Mean => GqaAgg::Mean,
            GqaAggArg::Max => GqaAgg::Max,
            GqaAggArg::Sum => GqaAgg::Sum,
        };
        if let Some(s) = self.schedule {
            c.schedule = match s {
                ScheduleArg::Prefill => Schedule::Prefill,
                ScheduleArg::Decode => Schedule::Decode,
            };
        }
        c.h2o_version = match self.h2o_version {
            H2oVersionArg::V1 => H2oVersion::V1,
            H2oVersionArg::V3 => H2oVersion::V3,
        };
        c.sinks = self.sinks;
        c.slot_order = match self.slot_order {
            SlotOrderArg::Position => SlotOrder::Position,
            SlotOrderArg::Reference => SlotOrder::Reference,
        };
        c.validate()?;
        Ok(c)
    }
}
