//! `kvsift eval`: accuracy of a model's held-out task set (`eval/<task>.jsonl`
//! in the model directory: `{"prompt", "answer"}` per line) under a KV
//! compression method, greedy and batched on the engine; `--sweep` runs
//! every method over a list of budgets and writes the table as JSON and CSV.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use kvsift::engine::{Event, Request, RequestId};
use kvsift::gpu::GpuContext;
use kvsift::model::TextTokenizer;
use kvsift::model::config::GenerationDefaults;
use kvsift::ops::sample::SamplingParams;
use serde_json::json;

use super::common::ModelArgs;
use kvsift::kv::compression::{CompressConfig, Method};

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// needle (retrieval from a long filler text), reasoning (a worked
    /// chain whose answer needs the first lines), or all (with --sweep).
    #[arg(long, value_enum, default_value_t = TaskArg::Needle)]
    pub task: TaskArg,
    /// Examples to run (the first n of the set).
    #[arg(long, default_value_t = 200)]
    pub n: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Most generated tokens per example (default: 8 for needle, 1024 for reasoning).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Run every method (none, streamingllm, h2o, snapkv, pyramidkv, adakv,
    /// rkv) at every budget of --budgets on --task (or both tasks with --task all).
    #[arg(long)]
    pub sweep: bool,
    /// Budgets of the sweep.
    #[arg(long, value_delimiter = ',', default_value = "32,64,128,256")]
    pub budgets: Vec<usize>,
    /// Where the sweep writes sweep.json and sweep.csv.
    #[arg(long, default_value = "eval-results")]
    pub out_dir: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// `--task`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TaskArg {
    Needle,
    #[value(alias = "chain")]
    Reasoning,
    All,
}

impl TaskArg {
    fn name(self) -> &'static str {
        match self {
            TaskArg::Needle => "needle",
            TaskArg::Reasoning => "reasoning",
            TaskArg::All => "all",
        }
    }
}

struct Item {
    prompt: String,
    answer: String,
}

fn file_of(task: &str) -> anyhow::Result<&'static str> {
    match task {
        "needle" => Ok("needle"),
        "reasoning" | "chain" => Ok("chain"),
        other => anyhow::bail!("--task {other}: runs with --sweep only (one task otherwise)"),
    }
}

fn load_set(dir: &Path, task: &str, n: usize) -> anyhow::Result<Vec<Item>> {
    let path = dir.join("eval").join(format!("{}.jsonl", file_of(task)?));
    let text = std::fs::read_to_string(&path).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (the model has no held-out {task} set; models/tiny-reasoner ships them)",
            path.display()
        )
    })?;
    let mut items = vec![];
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
        let field = |k: &str| {
            v[k].as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow::anyhow!("{}:{}: no string {k:?}", path.display(), i + 1))
        };
        items.push(Item {
            prompt: field("prompt")?,
            answer: field("answer")?,
        });
        if items.len() == n {
            break;
        }
    }
    if items.is_empty() {
        anyhow::bail!("{}: no examples", path.display());
    }
    Ok(items)
}

/// The final answer in generated text (as tools/train/tasks.py answer_of).
pub fn answer_of(task: &str, text: &str) -> String {
    if task == "needle" {
        return text.trim().lines().next().unwrap_or("").trim().to_string();
    }
    text.trim()
        .lines()
        .rev()
        .find_map(|l| l.split_once('=').map(|(_, v)| v))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// One configuration's result.
#[derive(serde::Serialize)]
struct Score {
    task: String,
    kv: String,
    budget: Option<usize>,
    n: usize,
    accuracy: f64,
    mean_slots_per_head: f64,
    peak_kv_bytes: u64,
    generated_tokens: usize,
    tok_s: f64,
}

fn run_one(
    ctx: &GpuContext,
    model: &ModelArgs,
    compression: &CompressConfig,
    task: &str,
    a: &EvalArgs,
) -> anyhow::Result<Score> {
    let dir = model.dir()?;
    let tokenizer = TextTokenizer::load(&dir)?;
    let defaults = GenerationDefaults::load(&dir)?;
    let items = load_set(&dir, task, a.n)?;
    let mut engine = model.engine_with(ctx, a.batch.max(1), compression.clone())?;
    let mut stop_ids = defaults.eos_token_ids.clone();
    stop_ids.extend(tokenizer.eos_id());
    let max_tokens = a
        .max_tokens
        .unwrap_or(if task == "needle" { 8 } else { 1024 });
    let mut ids: Vec<RequestId> = vec![];
    for it in &items {
        ids.push(engine.add_request(Request {
            prompt: tokenizer.encode(&it.prompt, true)?,
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop_ids: stop_ids.clone(),
            compression: None,
            logprobs: None,
        })?);
    }
    let mut out: Vec<Vec<u32>> = vec![vec![]; items.len()];
    let start = Instant::now();
    while engine.has_work() {
        for ev in engine.step()? {
            match ev {
                Event::Token { id, token } => out[id as usize - ids[0] as usize].push(token),
                Event::Failed { error, .. } => anyhow::bail!("{error}"),
                _ => {}
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let mut correct = 0;
    let mut slots = 0.0;
    let heads_layers = (engine.cfg.n_layers * engine.cfg.n_kv_heads) as f64;
    for ((it, toks), id) in items.iter().zip(&out).zip(&ids) {
        let text = tokenizer.decode(toks, true)?;
        if answer_of(task, &text) == it.answer {
            correct += 1;
        }
        let held: usize = engine.final_slots(*id).map_or(0, |s| s.iter().sum());
        slots += held as f64 / heads_layers;
    }
    let stats = engine.stats();
    let cfg = compression;
    let generated: usize = out.iter().map(Vec::len).sum();
    Ok(Score {
        task: if task == "needle" {
            "needle"
        } else {
            "reasoning"
        }
        .into(),
        kv: cfg.method.name().to_string(),
        budget: cfg.method.policy().compresses().then_some(cfg.budget),
        n: items.len(),
        accuracy: correct as f64 / items.len() as f64,
        mean_slots_per_head: slots / items.len() as f64,
        peak_kv_bytes: (stats.peak_pages_in_use * stats.pool.page_bytes) as u64,
        generated_tokens: generated,
        tok_s: generated as f64 / secs.max(1e-9),
    })
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    if a.n == 0 || a.batch == 0 {
        anyhow::bail!("--n and --batch must be at least 1");
    }
    let ctx = GpuContext::from_env()?;
    let mut stdout = std::io::stdout().lock();
    if !a.sweep {
        file_of(a.task.name())?;
        let s = run_one(
            &ctx,
            &a.model,
            &a.model.compress.config()?,
            a.task.name(),
            &a,
        )?;
        if a.json {
            writeln!(stdout, "{}", serde_json::to_string_pretty(&s)?)?;
        } else {
            writeln!(
                stdout,
                "{} kv={} budget={}: accuracy {:.3} ({} examples), mean KV slots per head {:.1}, peak KV {} B, {:.1} tok/s",
                s.task,
                s.kv,
                s.budget.map_or("-".into(), |b| b.to_string()),
                s.accuracy,
                s.n,
                s.mean_slots_per_head,
                s.peak_kv_bytes,
                s.tok_s
            )?;
        }
        return Ok(());
    }
    let tasks: Vec<&str> = if a.task == TaskArg::All {
        vec!["needle", "reasoning"]
    } else {
        vec![a.task.name()]
    };
    let mut scores = vec![];
    for task in &tasks {
        let full = CompressConfig::new(Method::None, 0);
        scores.push(run_one(&ctx, &a.model, &full, task, &a)?);
        note!(
            "{task} none: {:.3}",
            scores.last().map_or(0.0, |s| s.accuracy)
        );
        for &b in &a.budgets {
            for m in Method::compressing() {
                let cfg = a.model.compress.config_for(m, Some(b))?;
                scores.push(run_one(&ctx, &a.model, &cfg, task, &a)?);
                note!(
                    "{task} {} {b}: {:.3}",
                    m.name(),
                    scores.last().map_or(0.0, |s| s.accuracy)
                );
            }
        }
    }
    let write = |name: &str, text: String| -> anyhow::Result<()> {
        let path = a.out_dir.join(name);
        std::fs::create_dir_all(&a.out_dir)
            .and_then(|()| std::fs::write(&path, text))
            .map_err(|e| anyhow::anyhow!("--out-dir: writing {}: {e}", path.display()))
    };
    write(
        "sweep.json",
        serde_json::to_string_pretty(&json!({ "results": &scores }))?,
    )?;
    let mut csv =
        String::from("task,kv,budget,n,accuracy,mean_slots_per_head,peak_kv_bytes,tok_s\n");
    for s in &scores {
        csv += &format!(
            "{},{},{},{},{:.4},{:.1},{},{:.1}\n",
            s.task,
            s.kv,
            s.budget.map_or(String::new(), |b| b.to_string()),
            s.n,
            s.accuracy,
            s.mean_slots_per_head,
            s.peak_kv_bytes,
            s.tok_s
        );
    }
    write("sweep.csv", csv)?;
    // Accuracy table: one row per task and method, one column per budget.
    for task in &tasks {
        let label = if *task == "needle" {
            "needle"
        } else {
            "reasoning"
        };
        write!(stdout, "\n{label} accuracy | full cache")?;
        for b in &a.budgets {
            write!(stdout, " | B={b}")?;
        }
        writeln!(stdout)?;
        let full = scores
            .iter()
            .find(|s| s.task == label && s.budget.is_none())
            .map_or(0.0, |s| s.accuracy);
        for m in Method::compressing() {
            write!(stdout, "{} | {full:.3}", m.name())?;
            for b in &a.budgets {
                let acc = scores
                    .iter()
                    .find(|s| s.task == label && s.kv == m.name() && s.budget == Some(*b))
                    .map_or(0.0, |s| s.accuracy);
                write!(stdout, " | {acc:.3}")?;
            }
            writeln!(stdout)?;
        }
    }
    writeln!(
        stdout,
        "\nwritten: {}, {}",
        a.out_dir.join("sweep.json").display(),
        a.out_dir.join("sweep.csv").display()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::answer_of;

    #[test]
    fn answers_are_read_as_the_task_generators_write_them() {
        assert_eq!(answer_of("needle", " 80636\nq: more"), "80636");
        assert_eq!(answer_of("needle", ""), "");
        let solution = "wk>cm\ncm>kb\ncheck wk>cm\ntn=72\n";
        assert_eq!(answer_of("chain", solution), "72");
        // The last value line counts; a solution that never ends has no answer.
        assert_eq!(answer_of("chain", "ab=1\ncd=35"), "35");
        assert_eq!(answer_of("chain", "wk>cm\ncm>kb\n"), "");
    }
}
