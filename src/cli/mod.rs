//! clap subcommands; each lives in its own file.

/// `writeln!` to stdout: a full or closed stdout is an error the subcommand
/// returns (main leaves quietly on a closed pipe, as `head` expects).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

/// `writeln!` to stderr for progress and summaries; a closed stderr is
/// ignored (there is nowhere left to report it).
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

mod bench;
mod bench_serve;
mod common;
mod compress;
mod eval;
mod generate;
mod info;
mod plot;
mod score;
mod select;
mod serve;
mod soak;

use clap::{Parser, Subcommand};

/// LLM inference on any GPU through wgpu/WGSL, with a paged KV cache and GPU
/// KV-cache compression.
///
/// Environment: WGPU_BACKEND (vulkan, metal, dx12, gl; comma list),
/// WGPU_ADAPTER_NAME (substring of the adapter name), KVSIFT_DISABLE_FEATURES
/// (f16, subgroups, timestamps: force the portable paths), KVSIFT_MAX_BINDING_MB
/// (plan with a smaller storage-binding limit), RUST_LOG.
#[derive(Parser, Debug)]
#[command(name = "kvsift", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List GPU adapters, the one kvsift would use, its features and limits.
    Info(info::InfoArgs),
    /// Generate a completion of a prompt, streaming the text.
    Generate(generate::GenerateArgs),
    /// Teacher-forced scoring: mean negative log-likelihood and perplexity.
    Score(score::ScoreArgs),
    /// Which KV slots a compression method keeps, from captured keys and queries.
    Select(select::SelectArgs),
    /// llama-bench-style pp/tg figures; `bench roofline`, `bench throughput`, `bench soak`.
    Bench(Box<bench::BenchArgs>),
    /// Accuracy on a model's held-out task set under KV compression; --sweep for every method.
    Eval(eval::EvalArgs),
    /// An OpenAI-compatible HTTP server (chat and text completions, streaming,
    /// per-request KV compression in the `kv` field).
    Serve(Box<serve::ServeArgs>),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Score(a) => score::run(a),
        Command::Select(a) => select::run(a),
        Command::Bench(a) => bench::run(*a),
        Command::Eval(a) => eval::run(a),
        Command::Serve(a) => serve::run(*a),
    }
}
