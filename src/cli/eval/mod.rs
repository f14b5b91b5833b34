//! `kvsift eval`: accuracy under a KV compression method, on the engine
//! (batched): a model's held-out task set (`eval/<task>.jsonl` in the model
//! directory: needle, tally) or any JSONL file (`--data`: `{"prompt" |
//! "question", "answer"}` per line, `--chat` to wrap it in the chat
//! template), the answer read by `--extract`, pass@1 over `--samples` per
//! example. `--sweep` runs every method (and `--ablations`) over a list of
//! budgets and writes the runs as JSON and CSV, every example as JSONL, and
//! an accuracy-vs-budget plot (SVG).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use kvsift::engine::{Event, Request, RequestId};
use kvsift::gpu::GpuContext;
use kvsift::kv::compression::{CompressConfig, Method};
use kvsift::model::config::GenerationDefaults;
use kvsift::model::{Message, TextTokenizer};
use kvsift::ops::sample::SamplingParams;
use serde_json::json;

use super::common::ModelArgs;

pub mod extract;

pub use extract::Extract;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A held-out set shipped with the model (eval/<task>.jsonl): needle
    /// (retrieval from a long filler text), tally (a short problem behind a
    /// long, redundant worked trace), or all (with --sweep: every set the
    /// model ships).
    #[arg(long, value_enum, conflicts_with = "data")]
    pub task: Option<TaskArg>,
    /// A JSONL file of examples: {"prompt": ..., "answer": ...} or
    /// {"question": ..., "answer": ...} per line.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// How the answer is read from the generated text (default: first-line
    /// for needle, tally for tally, auto for --data).
    #[arg(long, value_enum)]
    pub extract: Option<Extract>,
    /// Render each prompt as a user message through the model's chat
    /// template (with the generation prompt).
    #[arg(long)]
    pub chat: bool,
    /// Examples to run (the first n of the set).
    #[arg(long, default_value_t = 200)]
    pub n: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Most generated tokens per example (default: 8 for needle, 1536 for
    /// tally, 4096 for --data).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Samples per example; accuracy is pass@1 averaged over them (as the
    /// R-KV paper reports it with 64 samples at temperature 0.6, top-p 0.95).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Sampling temperature (default 0, greedy, for one sample; 0.6 for more).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling (default 1.0 for one sample; 0.95 for more).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed of the first sample (sample k uses seed + k).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run the full cache and every method (none, streamingllm, h2o,
    /// snapkv, pyramidkv, adakv, rkv, ...) at every budget of --budgets;
    /// the compression flags given (e.g. --schedule decode --buffer 128)
    /// apply to every method that reads them.
    #[arg(long)]
    pub sweep: bool,
    /// With --sweep: also R-KV with lambda 1 (importance only, no
    /// redundancy) and StreamingLLM with 4 sink tokens and the last B - 4
    /// (LongBench's setting).
    #[arg(long)]
    pub ablations: bool,
    /// Budgets of the sweep.
    #[arg(long, value_delimiter = ',', default_value = "32,64,128,256")]
    pub budgets: Vec<usize>,
    /// Where the sweep writes sweep.json, sweep.csv, examples.jsonl and
    /// accuracy.svg.
    #[arg(long, default_value = "eval-results")]
    pub out_dir: PathBuf,
    /// Run nothing: redraw the tables, sweep.csv and plots into --out-dir
    /// from sweep.json files of earlier sweeps (repeat to merge them; a
    /// later file's run of the same task, method and budget replaces an
    /// earlier one's). examples.jsonl is left as it is.
    #[arg(long, value_name = "SWEEP_JSON", conflicts_with_all = ["data", "task", "sweep"])]
    pub from: Vec<PathBuf>,
    /// One JSON object: the run and each example.
    #[arg(long)]
    pub json: bool,
}

/// `--task`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TaskArg {
    Needle,
    Tally,
    All,
}

/// One example: its prompt, the reference answer.
struct Item {
    prompt: String,
    answer: String,
}

/// A set of examples and how to read and bound its answers.
struct TaskSet {
    name: String,
    items: Vec<Item>,
    extract: Extract,
    max_tokens: usize,
}

fn read_jsonl(path: &Path, n: usize, hint: &str) -> anyhow::Result<Vec<Item>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}{hint}", path.display()))?;
    let mut items = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let prompt = v
            .get("prompt")
            .or_else(|| v.get("question"))
            .and_then(|p| p.as_str())
            .ok_or_else(|| anyhow::anyhow!("{}: no string \"prompt\" or \"question\"", at()))?;
        let answer = match v.get("answer") {
            Some(serde_json::Value::String(s)) => s.clone(),
            // Numeric answers (math sets) compare as their text.
            Some(serde_json::Value::Number(x)) => x.to_string(),
            _ => anyhow::bail!("{}: no string or number \"answer\"", at()),
        };
        items.push(Item {
            prompt: prompt.to_string(),
            answer,
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

/// The sets a run covers: --data, or the model's held-out task sets.
fn task_sets(a: &EvalArgs, dir: &Path) -> anyhow::Result<Vec<TaskSet>> {
    if let Some(path) = &a.data {
        let name = path
            .file_stem()
            .map_or("data".into(), |s| s.to_string_lossy().into_owned());
        return Ok(vec![TaskSet {
            name,
            items: read_jsonl(path, a.n, "")?,
            extract: a.extract.unwrap_or(Extract::Auto),
            max_tokens: a.max_tokens.unwrap_or(4096),
        }]);
    }
    let tasks: &[&str] = match a.task.unwrap_or(TaskArg::Needle) {
        TaskArg::Needle => &["needle"],
        TaskArg::Tally => &["tally"],
        TaskArg::All if a.sweep => {
            let all: Vec<&str> = ["needle", "tally"]
                .into_iter()
                .filter(|t| dir.join("eval").join(format!("{t}.jsonl")).exists())
                .collect();
            if all.is_empty() {
                anyhow::bail!("{}: no held-out sets (eval/*.jsonl)", dir.display());
            }
            return all.into_iter().map(|t| held_out(a, dir, t)).collect();
        }
        TaskArg::All => anyhow::bail!("--task all runs with --sweep only (one task otherwise)"),
    };
    tasks.iter().map(|&task| held_out(a, dir, task)).collect()
}

/// The model's held-out set `task` (eval/<task>.jsonl).
fn held_out(a: &EvalArgs, dir: &Path, task: &str) -> anyhow::Result<TaskSet> {
    let path = dir.join("eval").join(format!("{task}.jsonl"));
    let hint = format!(
        " (the model has no held-out {task} set; models/tiny-reasoner ships them, \
         or pass --data FILE.jsonl)"
    );
    let (extract, max_tokens) = match task {
        "needle" => (Extract::FirstLine, 8),
        _ => (Extract::Tally, 1536),
    };
    Ok(TaskSet {
        name: task.to_string(),
        items: read_jsonl(&path, a.n, &hint)?,
        extract: a.extract.unwrap_or(extract),
        max_tokens: a.max_tokens.unwrap_or(max_tokens),
    })
}

/// One configuration's result.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Score {
    pub task: String,
    /// The method, or an ablation's name ("rkv-lambda1", "streamingllm-sinks4").
    pub kv: String,
    pub budget: Option<usize>,
    pub n: usize,
    pub samples: usize,
    /// pass@1: correct samples / all samples.
    pub accuracy: f64,
    pub mean_generated_tokens: f64,
    /// Prompt + generated tokens, averaged over samples.
    pub mean_final_length: f64,
    /// budget / mean_final_length (None for the full cache).
    pub budget_fraction: Option<f64>,
    /// KV slots per head when each sample ended, averaged over heads and samples.
    pub mean_slots_per_head: f64,
    /// The most slots one head held, the mean over samples and the maximum.
    pub mean_peak_slots_per_head: f64,
    pub max_peak_slots_per_head: usize,
    pub peak_kv_bytes: u64,
    pub generated_tokens: usize,
    pub tok_s: f64,
}

/// One sample of one example.
#[derive(serde::Serialize)]
struct ExampleResult {
    task: String,
    kv: String,
    budget: Option<usize>,
    example: usize,
    sample: usize,
    answer: String,
    extracted: Option<String>,
    correct: bool,
    prompt_tokens: usize,
    generated_tokens: usize,
    slots_per_head: f64,
    peak_slots_per_head: usize,
    /// What the model wrote (for analyses beyond the answer, e.g. how far a
    /// trace stayed right).
    text: String,
}

fn sampling(a: &EvalArgs, k: usize) -> anyhow::Result<SamplingParams> {
    let many = a.samples > 1;
    let mut s = SamplingParams::greedy();
    s.temperature = a.temperature.unwrap_or(if many { 0.6 } else { 0.0 });
    s.top_p = a.top_p.unwrap_or(if many { 0.95 } else { 1.0 });
    s.seed = a.seed.wrapping_add(k as u64);
    s.validate()?;
    Ok(s)
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    ctx: &GpuContext,
    a: &EvalArgs,
    compression: &CompressConfig,
    label: &str,
    set: &TaskSet,
    tokenizer: &TextTokenizer,
    defaults: &GenerationDefaults,
    examples: &mut Vec<ExampleResult>,
) -> anyhow::Result<Score> {
    let mut engine = a
        .model
        .engine_with(ctx, a.batch.max(1), compression.clone())?;
    let mut stop_ids = defaults.eos_token_ids.clone();
    stop_ids.extend(tokenizer.eos_id());
    let mut prompts = vec![];
    for it in &set.items {
        prompts.push(if a.chat {
            let text = tokenizer.apply_chat_template(
                &[Message {
                    role: "user".into(),
                    content: it.prompt.clone(),
                }],
                true,
            )?;
            tokenizer.encode(&text, false)?
        } else {
            tokenizer.encode(&it.prompt, true)?
        });
    }
    // Request k * n + i is sample k of example i.
    let mut ids: Vec<RequestId> = vec![];
    for k in 0..a.samples {
        let sampling = sampling(a, k)?;
        for p in &prompts {
            ids.push(engine.add_request(Request {
                prompt: p.clone(),
                max_tokens: set.max_tokens,
                sampling,
                stop_ids: stop_ids.clone(),
                compression: None,
                logprobs: None,
            })?);
        }
    }
    let first = ids[0];
    let mut out: Vec<Vec<u32>> = vec![vec![]; ids.len()];
    let start = Instant::now();
    while engine.has_work() {
        for ev in engine.step()? {
            match ev {
                Event::Token { id, token } => out[(id - first) as usize].push(token),
                Event::Failed { error, .. } => anyhow::bail!("{error}"),
                _ => {}
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let n = set.items.len();
    let heads = (engine.cfg.n_layers * engine.cfg.n_kv_heads) as f64;
    let (mut correct, mut slots, mut peak_sum, mut peak_max, mut length) = (0, 0.0, 0.0, 0, 0.0);
    for (r, (toks, id)) in out.iter().zip(&ids).enumerate() {
        let (i, k) = (r % n, r / n);
        let text = tokenizer.decode(toks, true)?;
        let ok = set.extract.is_correct(&text, &set.items[i].answer);
        correct += usize::from(ok);
        let report = engine.take_report(*id);
        let held: usize = report
            .as_ref()
            .map_or(0, |r| r.slots_per_head.iter().flatten().sum());
        let peak = report.as_ref().map_or(0, |r| r.peak_slots_per_head);
        slots += held as f64 / heads;
        peak_sum += peak as f64;
        peak_max = peak_max.max(peak);
        length += (prompts[i].len() + toks.len()) as f64;
        examples.push(ExampleResult {
            task: set.name.clone(),
            kv: label.to_string(),
            budget: compression
                .method
                .policy()
                .compresses()
                .then_some(compression.budget),
            example: i,
            sample: k,
            answer: set.items[i].answer.clone(),
            extracted: set.extract.answer(&text),
            correct: ok,
            prompt_tokens: prompts[i].len(),
            generated_tokens: toks.len(),
            slots_per_head: held as f64 / heads,
            peak_slots_per_head: peak,
            text: text.clone(),
        });
    }
    let runs = out.len() as f64;
    let stats = engine.stats();
    let generated: usize = out.iter().map(Vec::len).sum();
    let budget = compression
        .method
        .policy()
        .compresses()
        .then_some(compression.budget);
    let mean_final_length = length / runs;
    Ok(Score {
        task: set.name.clone(),
        kv: label.to_string(),
        budget,
        n,
        samples: a.samples,
        accuracy: correct as f64 / runs,
        mean_generated_tokens: generated as f64 / runs,
        mean_final_length,
        budget_fraction: budget.map(|b| b as f64 / mean_final_length.max(1.0)),
        mean_slots_per_head: slots / runs,
        mean_peak_slots_per_head: peak_sum / runs,
        max_peak_slots_per_head: peak_max,
        peak_kv_bytes: (stats.peak_pages_in_use * stats.pool.page_bytes) as u64,
        generated_tokens: generated,
        tok_s: generated as f64 / secs.max(1e-9),
    })
}

/// The configurations of a sweep at budget `b`: every compressing method,
/// then (with --ablations) R-KV with lambda 1 and StreamingLLM with 4 sinks.
fn sweep_configs(a: &EvalArgs, b: usize) -> anyhow::Result<Vec<(String, CompressConfig)>> {
    let mut out = vec![];
    for m in Method::compressing() {
        out.push((
            m.name().to_string(),
            a.model.compress.config_for(m, Some(b))?,
        ));
    }
    if a.ablations {
        let mut rkv = a.model.compress.config_for(Method::Rkv, Some(b))?;
        rkv.lambda = 1.0;
        rkv.validate()?;
        out.push(("rkv-lambda1".into(), rkv));
        let mut sinks = a.model.compress.config_for(Method::StreamingLlm, Some(b))?;
        sinks.set_sinks(4);
        sinks.validate()?;
        out.push(("streamingllm-sinks4".into(), sinks));
    }
    Ok(out)
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    if !a.from.is_empty() {
        return redraw(&a);
    }
    if a.n == 0 || a.batch == 0 || a.samples == 0 {
        anyhow::bail!("--n, --batch and --samples must be at least 1");
    }
    if a.ablations && !a.sweep {
        anyhow::bail!("--ablations runs with --sweep");
    }
    let dir = a.model.dir()?;
    let sets = task_sets(&a, &dir)?;
    let tokenizer = TextTokenizer::load(&dir)?;
    let defaults = GenerationDefaults::load(&dir)?;
    // Check the sampling settings before loading anything heavy.
    sampling(&a, 0)?;
    // And every configuration of a sweep, before the full cache runs.
    if a.sweep {
        for &b in &a.budgets {
            sweep_configs(&a, b)?;
        }
    }
    let ctx = GpuContext::from_env()?;
    let mut stdout = std::io::stdout().lock();
    let mut examples = vec![];
    if !a.sweep {
        let set = &sets[0];
        let cfg = a.model.compress.config()?;
        let s = run_one(
            &ctx,
            &a,
            &cfg,
            cfg.method.name(),
            set,
            &tokenizer,
            &defaults,
            &mut examples,
        )?;
        if a.json {
            let mut j = serde_json::to_value(&s)?;
            j["examples"] = serde_json::to_value(&examples)?;
            writeln!(stdout, "{}", serde_json::to_string_pretty(&j)?)?;
        } else {
            writeln!(
                stdout,
                "{} kv={} budget={}: accuracy {:.3} ({} examples x {} samples), mean length {:.0} tokens, \
                 KV slots per head {:.1} at the end, peak {:.1} (max {}), peak KV {} B, {:.1} tok/s",
                s.task,
                s.kv,
                s.budget.map_or("-".into(), |b| b.to_string()),
                s.accuracy,
                s.n,
                s.samples,
                s.mean_final_length,
                s.mean_slots_per_head,
                s.mean_peak_slots_per_head,
                s.max_peak_slots_per_head,
                s.peak_kv_bytes,
                s.tok_s
            )?;
        }
        return Ok(());
    }
    let mut scores = vec![];
    for set in &sets {
        let full = CompressConfig::new(Method::None, 0);
        let mut one = |label: &str, cfg: &CompressConfig| -> anyhow::Result<()> {
            let s = run_one(
                &ctx,
                &a,
                cfg,
                label,
                set,
                &tokenizer,
                &defaults,
                &mut examples,
            )?;
            note!(
                "{} {label} {}: accuracy {:.3}, {:.1} tok/s",
                set.name,
                s.budget.map_or("full".into(), |b| b.to_string()),
                s.accuracy,
                s.tok_s
            );
            scores.push(s);
            Ok(())
        };
        one("none", &full)?;
        for &b in &a.budgets {
            for (label, cfg) in sweep_configs(&a, b)? {
                one(&label, &cfg)?;
            }
        }
    }
    let settings = json!({
        "samples": a.samples, "budgets": a.budgets, "chat": a.chat,
        "compression_flags": format!("{:?}", a.model.compress),
    });
    write_sweep(
        &a,
        &a.budgets,
        settings,
        &scores,
        Some(&examples),
        &mut stdout,
    )
}

/// `--from`: the merged runs of earlier sweep.json files, written again.
fn redraw(a: &EvalArgs) -> anyhow::Result<()> {
    let mut scores: Vec<Score> = vec![];
    let mut budgets: Vec<usize> = vec![];
    let mut settings = vec![];
    for path in &a.from {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--from {}: {e}", path.display()))?;
        #[derive(serde::Deserialize)]
        struct Sweep {
            #[serde(default)]
            settings: serde_json::Value,
            results: Vec<Score>,
        }
        let sweep: Sweep = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("--from {}: not a sweep.json: {e}", path.display()))?;
        settings.push(sweep.settings);
        for s in sweep.results {
            if let Some(b) = s.budget.filter(|b| !budgets.contains(b)) {
                budgets.push(b);
            }
            let same = |o: &Score| o.task == s.task && o.kv == s.kv && o.budget == s.budget;
            match scores.iter_mut().find(|o| same(o)) {
                Some(o) => *o = s,
                None => scores.push(s),
            }
        }
    }
    budgets.sort();
    let settings = json!({
        "budgets": budgets,
        "merged_from": a.from.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "settings_of_each": settings,
    });
    write_sweep(
        a,
        &budgets,
        settings,
        &scores,
        None,
        &mut std::io::stdout().lock(),
    )
}

/// sweep.json, sweep.csv, examples.jsonl, <task>.accuracy.svg, and the
/// tables (sweep.md, also printed).
fn write_sweep(
    a: &EvalArgs,
    budgets: &[usize],
    settings: serde_json::Value,
    scores: &[Score],
    examples: Option<&[ExampleResult]>,
    stdout: &mut impl Write,
) -> anyhow::Result<()> {
    let write = |name: &str, text: String| -> anyhow::Result<PathBuf> {
        let path = a.out_dir.join(name);
        std::fs::create_dir_all(&a.out_dir)
            .and_then(|()| std::fs::write(&path, text))
            .map_err(|e| anyhow::anyhow!("--out-dir: writing {}: {e}", path.display()))?;
        Ok(path)
    };
    let mut written = vec![write(
        "sweep.json",
        serde_json::to_string_pretty(&json!({ "settings": settings, "results": scores }))?,
    )?];
    let mut csv = String::from(
        "task,kv,budget,n,samples,accuracy,mean_final_length,budget_fraction,mean_slots_per_head,\
         mean_peak_slots_per_head,max_peak_slots_per_head,peak_kv_bytes,tok_s\n",
    );
    for s in scores {
        csv += &format!(
            "{},{},{},{},{},{:.4},{:.1},{},{:.1},{:.1},{},{},{:.1}\n",
            s.task,
            s.kv,
            s.budget.map_or(String::new(), |b| b.to_string()),
            s.n,
            s.samples,
            s.accuracy,
            s.mean_final_length,
            s.budget_fraction
                .map_or(String::new(), |f| format!("{f:.4}")),
            s.mean_slots_per_head,
            s.mean_peak_slots_per_head,
            s.max_peak_slots_per_head,
            s.peak_kv_bytes,
            s.tok_s
        );
    }
    written.push(write("sweep.csv", csv)?);
    if let Some(examples) = examples {
        let mut lines = String::new();
        for e in examples {
            lines += &serde_json::to_string(e)?;
            lines.push('\n');
        }
        written.push(write("examples.jsonl", lines)?);
    }
    let tasks: Vec<&str> = {
        let mut t: Vec<&str> = scores.iter().map(|s| s.task.as_str()).collect();
        t.dedup();
        t
    };
    let mut md = String::new();
    for task in &tasks {
        let runs: Vec<&Score> = scores.iter().filter(|s| s.task == *task).collect();
        let svg = super::plot::accuracy_svg(task, &runs)?;
        written.push(write(&format!("{task}.accuracy.svg"), svg)?);
        md += &markdown_tables(task, budgets, &runs);
    }
    write!(stdout, "{md}")?;
    written.push(write("sweep.md", md)?);
    let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    writeln!(stdout, "\nwritten: {}", names.join(", "))?;
    Ok(())
}

/// Two Markdown tables of one task's sweep: accuracy by method and budget
/// (the full cache as a column), then every run's figures.
fn markdown_tables(task: &str, budgets: &[usize], runs: &[&Score]) -> String {
    let mut md = format!("\n| {task} accuracy | full cache |");
    for b in budgets {
        md += &format!(" B={b} |");
    }
    md += &format!("\n|---|---|{}\n", "---|".repeat(budgets.len()));
    let full = runs.iter().find(|s| s.budget.is_none());
    let full_acc = full.map_or(String::new(), |s| format!("{:.3}", s.accuracy));
    // Methods in the order they ran.
    let mut labels: Vec<&str> = vec![];
    for s in runs.iter().filter(|s| s.budget.is_some()) {
        if !labels.contains(&s.kv.as_str()) {
            labels.push(&s.kv);
        }
    }
    for label in &labels {
        md += &format!("| {label} | {full_acc} |");
        for b in budgets {
            match runs.iter().find(|s| s.kv == *label && s.budget == Some(*b)) {
                Some(s) => md += &format!(" {:.3} |", s.accuracy),
                None => md += " |",
            }
        }
        md.push('\n');
    }
    md += "\n| method | B | B / mean length | accuracy | mean length | KV slots per head at the end | peak slots per head (mean, max) | tok/s |\n\
           |---|---|---|---|---|---|---|---|\n";
    for s in runs {
        md += &format!(
            "| {} | {} | {} | {:.3} | {:.0} | {:.1} | {:.1}, {} | {:.1} |\n",
            s.kv,
            s.budget.map_or("-".into(), |b| b.to_string()),
            s.budget_fraction
                .map_or("-".into(), |f| format!("{:.1}%", 100.0 * f)),
            s.accuracy,
            s.mean_final_length,
            s.mean_slots_per_head,
            s.mean_peak_slots_per_head,
            s.max_peak_slots_per_head,
            s.tok_s
        );
    }
    md
}
