//! The compression flags shared by the subcommands.

use clap::Args;
use kvsift::kv::compression::{
    CompressConfig, GqaAgg, Granularity, H2oVersion, Method, Pooling, Schedule, SlotOrder,
};

#[derive(Args, Debug, Clone)]
pub struct CompressArgs {
    /// KV compression method: none, streamingllm, h2o, snapkv, pyramidkv, adakv, rkv.
    #[arg(long, default_value = "none")]
    pub kv: String,
    /// Slots kept per head per layer, window included.
    #[arg(long)]
    pub budget: Option<usize>,
    /// Observation window (the last W queries; always kept).
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Pooling kernel (odd).
    #[arg(long, default_value_t = 7)]
    pub kernel: usize,
    /// Pooling: max or avg.
    #[arg(long, default_value = "max")]
    pub pooling: String,
    /// Decode schedule: compress at positions p % buffer == 0.
    #[arg(long, default_value_t = 128)]
    pub buffer: usize,
    /// R-KV's mix: lambda * importance - (1 - lambda) * redundancy, in [0, 1].
    #[arg(long, default_value_t = 0.1)]
    pub lambda: f32,
    /// Selection per kv-head (memory-efficient) or per query-head (stores Hq heads).
    #[arg(long, default_value = "kv-head")]
    pub granularity: String,
    /// How a GQA group's scores combine at kv-head granularity: mean, max, sum.
    #[arg(long, default_value = "mean")]
    pub gqa_agg: String,
    /// When to compress: prefill or decode (default: decode for rkv, else prefill).
    #[arg(long)]
    pub schedule: Option<String>,
    /// H2O version: v3 (current code) or v1 (the PyramidKV paper's numbers).
    #[arg(long, default_value = "v3")]
    pub h2o_version: String,
    /// StreamingLLM's sink slots (default budget - window).
    #[arg(long)]
    pub sinks: Option<usize>,
    /// R-KV cache order across rounds: position or reference.
    #[arg(long, default_value = "position")]
    pub slot_order: String,
}

fn pick<T: Copy>(flag: &str, value: &str, options: &[(&str, T)]) -> anyhow::Result<T> {
    options
        .iter()
        .find(|(n, _)| *n == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            anyhow::anyhow!(
                "invalid value for {flag}: {value:?}: expected {}",
                names.join(" or ")
            )
        })
}

impl CompressArgs {
    /// The validated configuration.
    pub fn config(&self) -> anyhow::Result<CompressConfig> {
        let method: Method = self.kv.parse()?;
        let budget = match (method, self.budget) {
            (Method::None, b) => b.unwrap_or(0),
            (_, Some(b)) => b,
            (_, None) => anyhow::bail!("--kv {} needs --budget", self.kv),
        };
        let mut c = CompressConfig::new(method, budget);
        c.window = self.window;
        c.kernel = self.kernel;
        c.pooling = pick(
            "--pooling",
            &self.pooling,
            &[("max", Pooling::Max), ("avg", Pooling::Avg)],
        )?;
        c.buffer = self.buffer;
        c.lambda = self.lambda;
        c.granularity = pick(
            "--granularity",
            &self.granularity,
            &[
                ("kv-head", Granularity::KvHead),
                ("query-head", Granularity::QueryHead),
            ],
        )?;
        c.gqa_agg = pick(
            "--gqa-agg",
            &self.gqa_agg,
            &[
                ("mean", GqaAgg::Mean),
                ("max", GqaAgg::Max),
                ("sum", GqaAgg::Sum),
            ],
        )?;
        if let Some(s) = &self.schedule {
            c.schedule = pick(
                "--schedule",
                s,
                &[("prefill", Schedule::Prefill), ("decode", Schedule::Decode)],
            )?;
        }
        c.h2o_version = pick(
            "--h2o-version",
            &self.h2o_version,
            &[("v1", H2oVersion::V1), ("v3", H2oVersion::V3)],
        )?;
        c.sinks = self.sinks;
        c.slot_order = pick(
            "--slot-order",
            &self.slot_order,
            &[
                ("position", SlotOrder::Position),
                ("reference", SlotOrder::Reference),
            ],
        )?;
        c.validate()?;
        Ok(c)
    }
}
