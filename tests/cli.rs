//! The `kvsift` binary end to end: it runs on the shipped models, and every
//! bad input a user can give ends in a clear error and a non-zero exit, never
//! a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn gpu_available() -> bool {
    kvsift::testing::gpu().is_some()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// The tiny random Llama most tests run on (the default model is the
/// trained tiny-reasoner; these tests depend on tiny-llama's vocabulary and
/// context).
const TINY: &str = "models/tiny-llama";

fn kvsift(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_kvsift"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A copy of models/tiny-llama in a temp dir, to break.
fn model_copy(tag: &str) -> PathBuf {
    copy_of("tiny-llama", tag)
}

/// A copy of models/`name` in a temp dir.
fn copy_of(name: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("kvsift-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    let src = repo().join("models").join(name);
    for f in std::fs::read_dir(&src).unwrap() {
        let p = f.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

/// `generate` on tiny-llama with a one-token prompt plus `extra` flags must
/// fail with an error naming `needle`.
fn expect_generate_error(extra: &[&str], needle: &str) {
    let mut args = vec![
        "generate",
        "--model",
        TINY,
        "--prompt",
        "x",
        "--max-tokens",
        "1",
    ];
    args.extend_from_slice(extra);
    expect_error(&kvsift(&args), &[needle]);
}

fn expect_error(r: &Run, needles: &[&str]) {
    assert_ne!(r.code, 0, "expected failure; stdout {}", r.stdout);
    assert!(
        !r.stderr.contains("panicked"),
        "panic instead of an error:\n{}",
        r.stderr
    );
    for n in needles {
        assert!(
            r.stderr.contains(n),
            "stderr should mention {n:?}:\n{}",
            r.stderr
        );
    }
}

fn generate_with(dir: &Path) -> Run {
    kvsift(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hello",
        "--max-tokens",
        "2",
    ])
}

/// The first `n` held-out examples (prompt, answer) of the default model's
/// `task` set.
fn first_examples(task: &str, n: usize) -> Vec<(String, String)> {
    let path = repo().join(format!("models/tiny-reasoner/eval/{task}.jsonl"));
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .take(n)
        .map(|line| {
            let j: serde_json::Value = serde_json::from_str(line).unwrap();
            (
                j["prompt"].as_str().unwrap().to_string(),
                j["answer"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Runs `examples` as one batch on the default model; the texts it wrote.
fn generate_default(examples: &[(String, String)], max_tokens: &str) -> Vec<String> {
    let mut args = vec!["generate", "--max-tokens", max_tokens, "--json"];
    for (prompt, _) in examples {
        args.extend(["--prompt", prompt.as_str()]);
    }
    let r = kvsift(&args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(j["model"].as_str().unwrap().ends_with("tiny-reasoner"));
    j["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_default_model_answers_its_tasks() {
    if !gpu_available() {
        return;
    }
    // No --model: the trained tiny-reasoner, greedy by its generation config.
    // Its held-out accuracy is >= 90% on both tasks (README); 3 of 4 here.
    let needles = first_examples("needle", 4);
    let texts = generate_default(&needles, "8");
    let right = needles
        .iter()
        .zip(&texts)
        .filter(|((_, key), text)| text.trim() == key)
        .count();
    assert!(right >= 3, "needle: {right}/4 right: {texts:?}");

    let chains = first_examples("chain", 4);
    let texts = generate_default(&chains, "600");
    let right = chains
        .iter()
        .zip(&texts)
        .filter(|((_, answer), text)| {
            let last = text.trim().lines().last().unwrap_or("");
            last.split_once('=').map(|(_, v)| v) == Some(answer.as_str())
        })
        .count();
    assert!(right >= 3, "chain: {right}/4 right: {texts:?}");
}

#[test]
fn generate_and_score_run_on_tiny_llama() {
    if !gpu_available() {
        return;
    }
    let r = kvsift(&[
        "generate",
        "--model",
        TINY,
        "--prompt",
        "The cache",
        "--max-tokens",
        "5",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["tokens"].as_array().unwrap().len(), 5);
    assert!(j["decode_tok_s"].as_f64().unwrap() > 0.0);
    let r = kvsift(&[
        "score",
        "--model",
        TINY,
        "--tokens",
        "0,461,363,429,86",
        "--prefill",
        "2",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["scored"], 4);
    assert!(j["perplexity"].as_f64().unwrap() > 1.0);
}

#[test]
fn score_dumps_logits_as_safetensors() {
    if !gpu_available() {
        return;
    }
    let path =
        std::env::temp_dir().join(format!("kvsift-logits-{}.safetensors", std::process::id()));
    let r = kvsift(&[
        "score",
        "--model",
        TINY,
        "--tokens",
        "0,461,363",
        "--prefill",
        "1",
        "--dump-logits",
        path.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.shape(), &[3, 512]);
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
}

#[test]
fn bad_model_files_are_clear_errors() {
    if !gpu_available() {
        return;
    }
    // Missing weights.
    let d = model_copy("missing");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    expect_error(&generate_with(&d), &["model.safetensors"]);

    // Truncated weights.
    let d = model_copy("truncated");
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    expect_error(
        &generate_with(&d),
        &["model.safetensors", "not a valid safetensors file"],
    );

    // Corrupt header.
    let d = model_copy("corrupt");
    let mut bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    for b in &mut bytes[8..40] {
        *b = b'#';
    }
    std::fs::write(d.join("model.safetensors"), &bytes).unwrap();
    expect_error(&generate_with(&d), &["model.safetensors"]);

    // A tensor whose shape disagrees with the config.
    let d = model_copy("shape");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"intermediate_size\": 256", "\"intermediate_size\": 200"),
    )
    .unwrap();
    expect_error(&generate_with(&d), &["gate_proj.weight", "shape"]);

    // Unknown architecture.
    let d = model_copy("arch");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("LlamaForCausalLM", "GPTNeoXForCausalLM"),
    )
    .unwrap();
    expect_error(&generate_with(&d), &["GPTNeoXForCausalLM", "unsupported"]);

    // Missing tokenizer.
    let d = model_copy("tok");
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    expect_error(&generate_with(&d), &["tokenizer.json"]);

    // Not a model directory at all.
    expect_error(
        &generate_with(Path::new("/nonexistent/kvsift")),
        &["config.json"],
    );
}

#[test]
fn a_prompt_longer_than_the_context_is_a_clear_error() {
    if !gpu_available() {
        return;
    }
    let long: Vec<String> = (0..600).map(|i| (i % 500).to_string()).collect();
    let r = kvsift(&["score", "--model", TINY, "--tokens", &long.join(",")]);
    expect_error(&r, &["600 tokens", "512"]);
    let r = kvsift(&[
        "generate",
        "--model",
        TINY,
        "--prompt",
        "a b c d e f g",
        "--max-context",
        "4",
    ]);
    expect_error(&r, &["--max-context"]);
    let r = kvsift(&[
        "generate",
        "--model",
        TINY,
        "--prompt",
        "hi",
        "--max-context",
        "100000",
    ]);
    expect_error(&r, &["--max-context", "max_position_embeddings"]);
}

#[test]
fn bad_flags_are_clear_errors() {
    if !gpu_available() {
        return;
    }
    for (args, needle) in [
        (
            vec![
                "generate",
                "--model",
                TINY,
                "--prompt",
                "x",
                "--temperature=-1",
            ],
            "--temperature",
        ),
        (
            vec!["generate", "--model", TINY, "--prompt", "x", "--top-p", "0"],
            "--top-p",
        ),
        (
            vec![
                "generate",
                "--model",
                TINY,
                "--prompt",
                "x",
                "--weights-dtype",
                "int3",
            ],
            "--weights-dtype",
        ),
        (
            vec!["score", "--model", TINY, "--tokens", "1,2,99999"],
            "99999",
        ),
        (
            vec![
                "score",
                "--model",
                TINY,
                "--tokens",
                "1,2,3",
                "--prefill",
                "0",
            ],
            "--prefill",
        ),
        (
            vec!["score", "--model", TINY, "--tokens", "1"],
            "at least 2 tokens",
        ),
    ] {
        expect_error(&kvsift(&args), &[needle]);
    }
    // Missing required flags are clap's errors.
    expect_error(&kvsift(&["generate"]), &["--prompt"]);
    expect_error(&kvsift(&["score"]), &["--text"]);
}

#[test]
fn weights_beyond_the_f16_range_ask_for_f32() {
    if !gpu_available() {
        return;
    }
    // tiny-qwen2 is bf16 on disk; put 1e6 (fine in bf16, inf in f16) into one weight.
    let d = copy_of("tiny-qwen2", "f16");
    let name = "model.layers.0.mlp.up_proj.weight";
    rewrite_tensors(&d, |n, _, _, data| {
        if n == name {
            data[..2].copy_from_slice(&half::bf16::from_f32(1e6).to_le_bytes());
        }
    });

    let dir = d.to_str().unwrap();
    let r = kvsift(&[
        "generate",
        "--model",
        dir,
        "--prompt",
        "hi",
        "--max-tokens",
        "1",
    ]);
    expect_error(&r, &[name, "--weights-dtype f32"]);
    let r = kvsift(&[
        "generate",
        "--model",
        dir,
        "--prompt",
        "hi",
        "--max-tokens",
        "1",
        "--weights-dtype",
        "f32",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn several_prompts_and_batches_run_concurrently() {
    if !gpu_available() {
        return;
    }
    let r = kvsift(&[
        "generate",
        "--model",
        TINY,
        "--prompt",
        "The cache",
        "--prompt",
        "A budget of ten",
        "--batch",
        "2",
        "--max-tokens",
        "4",
        "--temperature",
        "0.8",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let reqs = j["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 4);
    for q in reqs {
        assert_eq!(q["tokens"].as_array().unwrap().len(), 4);
    }
    // The two copies of a prompt draw with different seeds.
    assert_eq!(reqs[0]["prompt_ids"], reqs[1]["prompt_ids"]);
    assert!(j["kv"]["peak_pages_in_use"].as_u64().unwrap() > 0);
    assert_eq!(j["kv"]["pool"]["pages_in_use"], 0);
    let r = kvsift(&[
        "generate",
        "--model",
        TINY,
        "--prompt",
        "a",
        "--prompt",
        "b",
        "--max-tokens",
        "3",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("[0]") && r.stdout.contains("[1]"),
        "{}",
        r.stdout
    );
}

#[test]
fn bad_kv_flags_are_clear_errors() {
    if !gpu_available() {
        return;
    }
    for (flag, value, needle) in [
        ("--kv-dtype", "int8", "--kv-dtype"),
        ("--on-exhaustion", "panic", "--on-exhaustion"),
        ("--kv-pool-mb", "0", "--kv-pool-mb"),
        ("--kv-pool-mb", "0.0001", "--kv-pool-mb"),
        ("--page-size", "0", "--page-size"),
        ("--batch", "0", "--batch"),
        ("--steps-per-submit", "0", "--steps-per-submit"),
        ("--steps-per-submit", "65", "--steps-per-submit"),
    ] {
        expect_generate_error(&[flag, value], needle);
    }
}

#[test]
fn select_reproduces_a_vector_and_rejects_bad_settings() {
    let v = repo().join("tests/vectors/rkv_004.safetensors");
    let v = v.to_str().unwrap();
    let bytes = std::fs::read(v).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("expected").unwrap();
    let want: Vec<i64> = t
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
        .collect();
    // The CPU reference and the GPU kernels (the default).
    for path in [&["--cpu"][..], &[]] {
        let mut args = vec![
            "select", "--method", "rkv", "--input", v, "--budget", "48", "--window", "8",
            "--lambda", "0.3",
        ];
        args.extend(path);
        let r = kvsift(&args);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let got: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let got: Vec<i64> = got["kept"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|h| h.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
            .collect();
        assert_eq!(got, want, "select {path:?}");
    }

    let snap = repo().join("tests/vectors/snapkv_000.safetensors");
    let snap = snap.to_str().unwrap();
    for (extra, needle) in [
        (
            vec!["--method", "snapkv", "--budget", "8", "--window", "8"],
            "--budget",
        ),
        (
            vec!["--method", "snapkv", "--budget", "42", "--kernel", "4"],
            "--kernel",
        ),
        (
            vec!["--method", "rkv", "--budget", "42", "--lambda", "1.5"],
            "--lambda",
        ),
        (
            vec![
                "--method",
                "streamingllm",
                "--budget",
                "42",
                "--sinks",
                "42",
            ],
            "--sinks",
        ),
        (vec!["--method", "lru", "--budget", "42"], "lru"),
        (vec!["--method", "snapkv"], "--budget"),
        (
            vec![
                "--method",
                "snapkv",
                "--budget",
                "42",
                "--pooling",
                "median",
            ],
            "--pooling",
        ),
        // The vector's queries cover a window of 8, not 4.
        (
            vec!["--method", "snapkv", "--budget", "42", "--window", "4"],
            "window",
        ),
        // H2O v3 needs all T queries.
        (vec!["--method", "h2o", "--budget", "42"], "all T queries"),
        // A setting of another method.
        (
            vec!["--method", "snapkv", "--budget", "42", "--lambda", "0.3"],
            "does not apply to --kv snapkv",
        ),
        (
            vec!["--method", "h2o", "--budget", "42", "--sinks", "4"],
            "it is a setting of streamingllm",
        ),
    ] {
        for path in [&["--cpu"][..], &[]] {
            let mut args = vec!["select", "--input", snap];
            args.extend(path);
            args.extend(extra.iter());
            expect_error(&kvsift(&args), &[needle]);
        }
    }
    // Not safetensors, or missing tensors.
    let junk = std::env::temp_dir().join(format!("kvsift-junk-{}.safetensors", std::process::id()));
    std::fs::write(&junk, b"junk").unwrap();
    expect_error(
        &kvsift(&[
            "select",
            "--method",
            "snapkv",
            "--budget",
            "9",
            "--input",
            junk.to_str().unwrap(),
            "--cpu",
        ]),
        &["safetensors"],
    );
}

#[test]
fn generate_with_compression_reports_slots_and_pool_bytes() {
    let r = kvsift(&[
        "generate",
        "--model",
        TINY,
        "--prompt",
        "the quick brown fox jumps over the lazy dog, again and again and again",
        "--max-tokens",
        "60",
        "--temperature",
        "0",
        "--kv",
        "rkv",
        "--budget",
        "24",
        "--buffer",
        "16",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let c = &j["kv"]["compression"];
    assert!(c["passes"].as_u64().unwrap() >= 2, "{c}");
    assert!(
        c["bytes_after_last"].as_u64() < c["bytes_before_last"].as_u64(),
        "{c}"
    );
    assert_eq!(j["kv_compression"]["method"], "rkv");
    // tiny-llama: 2 KV heads per layer, at most budget + buffer slots each.
    let slots = j["kv_slots_per_layer"].as_array().unwrap();
    assert_eq!(slots.len(), 2);
    for s in slots {
        let s = s.as_u64().unwrap();
        assert!(s > 0 && s <= 2 * (24 + 16), "slots {s}");
    }
    for (extra, needle) in [
        (vec!["--kv", "snapkv"], "--budget"),
        (vec!["--kv", "snapkv", "--budget", "4"], "--budget"),
        (vec!["--kv", "lru", "--budget", "40"], "lru"),
        (
            vec!["--kv", "rkv", "--budget", "40", "--lambda", "2"],
            "--lambda",
        ),
        (
            vec!["--kv", "snapkv", "--budget", "40", "--kernel", "6"],
            "--kernel",
        ),
        (
            vec!["--kv", "snapkv", "--budget", "40", "--schedule", "never"],
            "--schedule",
        ),
    ] {
        expect_generate_error(&extra, needle);
    }
}

#[test]
fn bench_prints_pp_tg_roofline_profile_and_throughput() {
    let r = kvsift(&[
        "bench",
        "--model",
        TINY,
        "-p",
        "32",
        "-n",
        "8",
        "-r",
        "2",
        "--profile",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let results = j["results"].as_array().unwrap();
    assert_eq!(results[0]["test"], "pp32");
    assert_eq!(results[1]["test"], "tg8");
    for row in results {
        assert!(row["t_s"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["repetitions"], 2);
    }
    let frac = results[1]["roofline_fraction"].as_f64().unwrap();
    assert!(frac > 0.0 && frac < 1.5, "roofline fraction {frac}");
    assert!(j["roofline_gb_s"].as_f64().unwrap() > 0.0);
    // Host and wait time of the timed decode steps: 2 runs of 7 steps (the
    // first of 8 tokens comes from the prefill).
    assert_eq!(j["decode_steps"], 14, "{j}");
    assert!(j["decode_host_ms"].as_f64().unwrap() > 0.0);
    assert!(j["decode_wait_ms"].as_f64().unwrap() > 0.0);
    // --profile also times the prefill's kernels.
    let prefill = j["prefill_profile"].as_array().unwrap();
    assert!(
        prefill.iter().any(|k| k["kernel"]
            .as_str()
            .unwrap()
            .contains("paged_attention.prefill")),
        "{prefill:?}"
    );
    let profile = j["profile"].as_array().unwrap();
    assert!(
        profile
            .iter()
            .any(|k| k["kernel"].as_str().unwrap().contains("paged_attention")),
        "{profile:?}"
    );
    // The table form.
    let r = kvsift(&["bench", "--model", TINY, "-p", "16", "-n", "4", "-r", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("| model | size | params | backend | test | t/s |")
    );
    assert!(r.stdout.contains("pp16") && r.stdout.contains("tg4"));
    assert!(r.stdout.contains("of the copy roofline"));

    let r = kvsift(&["bench", "roofline", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(j["copy_gb_s"].as_f64().unwrap() > 0.0);

    // Fixed memory: R-KV at budget 32 fits more sequences than the full cache.
    let r = kvsift(&[
        "bench",
        "throughput",
        "--model",
        TINY,
        "--pool-mb",
        "0.25",
        "--prompt-len",
        "24",
        "--gen-len",
        "60",
        "--kv",
        "rkv",
        "--budget",
        "16",
        "--buffer",
        "8",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let runs = j["runs"].as_array().unwrap();
    let full = runs[0]["max_concurrent"].as_u64().unwrap();
    let rkv = runs[1]["max_concurrent"].as_u64().unwrap();
    assert!(
        full >= 1 && rkv > full,
        "concurrency full {full}, rkv {rkv}"
    );
    assert!(j["concurrency_ratio"].as_f64().unwrap() > 1.0);

    for (args, needle) in [
        (vec!["bench", "--model", TINY, "-p", "5000"], "context"),
        (vec!["bench", "--model", TINY, "-r", "0"], "-r"),
        (
            vec!["bench", "--model", TINY, "-p", "0", "-n", "0"],
            "nothing to measure",
        ),
        (
            vec!["bench", "sideways"],
            "unrecognized subcommand 'sideways'",
        ),
        (
            vec!["bench", "throughput", "--kv", "rkv", "--budget", "16"],
            "--kv-pool-mb",
        ),
        (vec!["bench", "throughput", "--pool-mb", "1"], "--kv"),
        (vec!["bench", "soak", "--tokens", "0"], "--tokens"),
        (vec!["bench", "soak", "--samples", "0"], "--samples"),
        (
            vec!["bench", "soak", "--model", TINY, "--prompt-len", "600"],
            "--prompt-len",
        ),
        (vec!["bench", "soak", "--kv", "rkv"], "--budget"),
    ] {
        expect_error(&kvsift(&args), &[needle]);
    }
}

#[test]
fn eval_runs_a_held_out_set_and_sweeps() {
    // tiny-llama plus a two-example needle set (its answers are not expected
    // to be right: this checks the plumbing, not the model).
    let dir = std::env::temp_dir().join(format!("kvsift-eval-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("eval")).unwrap();
    for f in std::fs::read_dir(repo().join("models/tiny-llama")).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() {
            std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
        }
    }
    let filler = "the cat sat on the mat ".repeat(6);
    let set = format!(
        "{}\n{}\n",
        serde_json::json!({"prompt": format!("{filler}the key is 12345. {filler}\nq: what is the key?\na: "), "answer": "12345"}),
        serde_json::json!({"prompt": format!("the key is 99999. {filler}\nq: what is the key?\na: "), "answer": "99999"}),
    );
    std::fs::write(dir.join("eval/needle.jsonl"), set).unwrap();
    let d = dir.to_str().unwrap();
    let r = kvsift(&[
        "eval", "--model", d, "--task", "needle", "--n", "2", "--kv", "snapkv", "--budget", "24",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["n"], 2);
    assert_eq!(j["kv"], "snapkv");
    let acc = j["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(j["peak_kv_bytes"].as_u64().unwrap() > 0);
    // Compressed to 24 slots per head at prefill, then 8 tokens at most.
    assert!(j["mean_slots_per_head"].as_f64().unwrap() <= 24.0 + 8.0);

    let out = dir.join("sweep");
    let r = kvsift(&[
        "eval",
        "--model",
        d,
        "--task",
        "needle",
        "--n",
        "1",
        "--sweep",
        "--budgets",
        "16,32",
        "--max-tokens",
        "2",
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("needle accuracy | full cache | B=16 | B=32"),
        "{}",
        r.stdout
    );
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    // A header, the full cache, then every registered method at both budgets.
    let methods = kvsift::kv::compression::Method::compressing().count();
    assert_eq!(csv.lines().count(), 1 + 1 + 2 * methods, "{csv}");

    expect_error(
        &kvsift(&["eval", "--model", d, "--task", "reasoning", "--n", "1"]),
        &["reasoning", "chain.jsonl"],
    );
    expect_error(
        &kvsift(&["eval", "--model", d, "--task", "sums"]),
        &["--task"],
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Rewrites `dir/model.safetensors`, letting `edit(name, dtype, shape, data)` change any tensor.
fn rewrite_tensors(
    dir: &Path,
    edit: impl FnMut(&str, &mut safetensors::Dtype, &mut Vec<usize>, &mut Vec<u8>),
) {
    kvsift::testing::rewrite_safetensors(&dir.join("model.safetensors"), edit);
}

/// Replaces `from` by `to` in `dir/file`.
fn edit_file(dir: &Path, file: &str, from: &str, to: &str) {
    let text = std::fs::read_to_string(dir.join(file)).unwrap();
    assert!(text.contains(from), "{file} has no {from:?}");
    std::fs::write(dir.join(file), text.replacen(from, to, 1)).unwrap();
}

/// Runs kvsift with stdout sent to `stdout` (a closed pipe, /dev/full).
fn kvsift_to(args: &[&str], stdout: std::process::Stdio) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_kvsift"))
        .args(args)
        .current_dir(repo())
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::new(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn a_closed_or_full_stdout_ends_cleanly() {
    if !gpu_available() {
        return;
    }
    let full = || std::fs::File::create("/dev/full").unwrap().into();
    for args in [
        vec!["info"],
        vec!["info", "--json"],
        vec!["bench", "roofline"],
        vec![
            "generate",
            "--model",
            TINY,
            "--prompt",
            "x",
            "--max-tokens",
            "2",
        ],
    ] {
        let r = kvsift_to(&args, full());
        expect_error(&r, &["writing the output", "No space left"]);
    }
    // `kvsift info | head -1`: the reader is gone before kvsift writes.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let r = kvsift_to(&["info"], writer.into());
    assert_eq!(r.code, 0, "a closed pipe ends quietly: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn broken_checkpoints_are_clear_errors() {
    if !gpu_available() {
        return;
    }
    // An index whose weight_map names nothing, a shard that is not a string,
    // a shard that is missing (its OS error said once).
    let d = model_copy("index");
    std::fs::rename(d.join("model.safetensors"), d.join("part-1.safetensors")).unwrap();
    for (index, needles) in [
        (r#"{"weight_map": {}}"#, vec!["index.json", "empty"]),
        (
            r#"{"weight_map": {"model.norm.weight": 7}}"#,
            vec!["model.norm.weight", "not the name of a shard"],
        ),
        (
            r#"{"weight_map": {"model.norm.weight": "part-2.safetensors"}}"#,
            vec!["part-2.safetensors", "No such file"],
        ),
    ] {
        std::fs::write(d.join("model.safetensors.index.json"), index).unwrap();
        let r = generate_with(&d);
        expect_error(&r, &needles);
        assert!(r.stderr.matches("os error").count() <= 1, "{}", r.stderr);
    }
    // A directory where the weights file should be.
    let d = model_copy("dir");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    std::fs::create_dir(d.join("model.safetensors")).unwrap();
    expect_error(&generate_with(&d), &["model.safetensors", "is a directory"]);

    // Configs that disagree with any checkpoint, or with themselves.
    for (from, to, needles) in [
        (
            "\"num_hidden_layers\": 2",
            "\"num_hidden_layers\": 18446744073709551615",
            vec!["num_hidden_layers"],
        ),
        (
            "\"num_hidden_layers\": 2",
            "\"num_hidden_layers\": 1000000000",
            vec!["num_hidden_layers"],
        ),
        (
            "\"num_hidden_layers\": 2",
            "\"num_hidden_layers\": 3",
            vec!["num_hidden_layers", "2 layers"],
        ),
        (
            "\"head_dim\": 32,",
            "",
            vec!["num_attention_heads", "hidden_size"],
        ),
        (
            "\"vocab_size\": 512",
            "\"vocab_size\": 99999999999",
            vec!["vocab_size"],
        ),
        (
            "\"rope_type\": \"llama3\"",
            "\"unused\": 0",
            vec!["rope_scaling", "rope_type"],
        ),
    ] {
        let d = model_copy("config");
        edit_file(&d, "config.json", from, to);
        if from.contains("head_dim") {
            edit_file(
                &d,
                "config.json",
                "\"hidden_size\": 128",
                "\"hidden_size\": 130",
            );
        }
        expect_error(&generate_with(&d), &needles);
    }

    // Non-finite weights, in every dtype kvsift reads and with either
    // --weights-dtype: refused at load, naming the tensor.
    let nan_f16 = 0x7e00u16.to_le_bytes();
    for (tensor, dtype, weights_dtype) in [
        ("model.norm.weight", safetensors::Dtype::F32, "f16"),
        ("model.norm.weight", safetensors::Dtype::F32, "f32"),
        (
            "model.layers.1.mlp.up_proj.weight",
            safetensors::Dtype::F16,
            "f16",
        ),
        (
            "model.layers.1.mlp.up_proj.weight",
            safetensors::Dtype::F16,
            "f32",
        ),
        ("model.embed_tokens.weight", safetensors::Dtype::F32, "f32"),
    ] {
        let d = model_copy("nan");
        rewrite_tensors(&d, |name, dt, _, data| {
            if name != tensor {
                return;
            }
            if dtype == safetensors::Dtype::F16 {
                // The tensor as f16 with a NaN in the middle.
                let vals: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                *data = vals
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect();
                let mid = data.len() / 4 * 2;
                data[mid..mid + 2].copy_from_slice(&nan_f16);
            } else {
                let mid = data.len() / 8 * 4;
                data[mid..mid + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
            }
            *dt = dtype;
        });
        let r = kvsift(&[
            "generate",
            "--model",
            d.to_str().unwrap(),
            "--prompt",
            "hi",
            "--max-tokens",
            "2",
            "--weights-dtype",
            weights_dtype,
        ]);
        expect_error(&r, &[tensor, "finite"]);
        assert!(!r.stderr.contains("f16 range"), "{}", r.stderr);
    }
}

/// Finite weights whose logits overflow: the request fails, it does not
/// emit tokens outside the vocabulary.
#[test]
fn logits_that_overflow_fail_the_request() {
    if !gpu_available() {
        return;
    }
    let d = model_copy("overflow");
    rewrite_tensors(&d, |name, _, _, data| {
        if name == "model.norm.weight" {
            for c in data.chunks_exact_mut(4) {
                c.copy_from_slice(&3e38f32.to_le_bytes());
            }
        }
    });
    for extra in [&["--temperature", "0"][..], &["--temperature", "0.7"][..]] {
        let mut args = vec![
            "generate",
            "--model",
            d.to_str().unwrap(),
            "--prompt",
            "hi",
            "--max-tokens",
            "5",
            "--weights-dtype",
            "f32",
            "--json",
        ];
        args.extend_from_slice(extra);
        let r = kvsift(&args);
        expect_error(&r, &["NaN or infinity"]);
        let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(j["tokens"], serde_json::json!([]), "{}", r.stdout);
    }
}

#[test]
fn runaway_chat_templates_stop_with_an_error_naming_their_file() {
    if !gpu_available() {
        return;
    }
    let d = model_copy("template");
    let cfg = std::fs::read_to_string(d.join("tokenizer_config.json")).unwrap();
    let mut j: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    for (template, needle) in [
        (
            "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}",
            "steps",
        ),
        ("{% for m in messages %}{{ m.content ", "does not parse"),
        ("{{ raise_exception('no system role') }}", "no system role"),
    ] {
        j["chat_template"] = template.into();
        std::fs::write(d.join("tokenizer_config.json"), j.to_string()).unwrap();
        let r = kvsift(&[
            "generate",
            "--model",
            d.to_str().unwrap(),
            "--prompt",
            "hi",
            "--chat",
            "--max-tokens",
            "1",
        ]);
        expect_error(&r, &["tokenizer_config.json", "chat template", needle]);
    }
}

#[test]
fn edge_values_of_flags_do_what_they_say() {
    if !gpu_available() {
        return;
    }
    let json = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "generate",
            "--model",
            TINY,
            "--prompt",
            "The cache",
            "--json",
        ];
        args.extend_from_slice(extra);
        let r = kvsift(&args);
        assert_eq!(r.code, 0, "{extra:?}: {}", r.stderr);
        serde_json::from_str(&r.stdout).unwrap()
    };
    // --max-tokens 0: no token (as the library's generate).
    let j = json(&["--max-tokens", "0"]);
    assert_eq!(j["tokens"], serde_json::json!([]));
    assert_eq!(j["stop"], "max_tokens");
    // A temperature too small to divide by samples greedily.
    let greedy = json(&["--max-tokens", "6", "--temperature", "0"]);
    for t in ["1e-45", "1e-9"] {
        let tiny = json(&["--max-tokens", "6", "--temperature", t]);
        assert_eq!(tiny["tokens"], greedy["tokens"], "--temperature {t}");
    }
    // Sizes that would wrap are refused by name.
    expect_generate_error(&["--kv-pool-mb", "8650752.2"], "--kv-pool-mb");
    expect_generate_error(&["--kv-pool-mb", "1e300"], "--kv-pool-mb");
    expect_generate_error(&["--batch", "9223372036854775808"], "--batch");
    expect_generate_error(&["--batch", "18446744073709551615"], "--batch");
    expect_generate_error(&["--max-context", "18446744073709551615"], "--max-context");
    expect_generate_error(
        &["--on-exhaustion", "swapp"],
        "possible values: swap, recompute, reject",
    );
    // A binding cap too small to plan with is refused where it is set.
    let out = Command::new(env!("CARGO_BIN_EXE_kvsift"))
        .args([
            "generate",
            "--model",
            TINY,
            "--prompt",
            "x",
            "--max-tokens",
            "1",
        ])
        .env("KVSIFT_MAX_BINDING_MB", "0.01")
        .current_dir(repo())
        .output()
        .unwrap();
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    expect_error(&r, &["KVSIFT_MAX_BINDING_MB", "at least 1"]);
    // A batch larger than the lanes queues instead of failing.
    let j = json(&["--max-tokens", "2", "--batch", "1500"]);
    assert_eq!(j["requests"].as_array().unwrap().len(), 1500);
}

/// What `generate` streams is what `--json` reports, to the last byte
/// (an incomplete UTF-8 character at the end included).
#[test]
fn streamed_text_equals_the_json_text() {
    if !gpu_available() {
        return;
    }
    // tiny-qwen2 writes byte tokens: some of these end inside a character.
    let mut ends_inside = 0;
    for n in ["3", "5", "8", "13"] {
        let args = [
            "generate",
            "--model",
            "models/tiny-qwen2",
            "--prompt",
            "caf\u{e9} \u{20ac}",
            "--max-tokens",
            n,
            "--temperature",
            "0.9",
            "--seed",
            "4",
        ];
        let streamed = kvsift(&args);
        assert_eq!(streamed.code, 0, "{}", streamed.stderr);
        let mut with_json = args.to_vec();
        with_json.push("--json");
        let r = kvsift(&with_json);
        let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let text = j["text"].as_str().unwrap();
        ends_inside += text.ends_with('\u{FFFD}') as usize;
        assert_eq!(
            streamed.stdout.strip_suffix('\n').unwrap(),
            text,
            "--max-tokens {n}"
        );
    }
    eprintln!("{ends_inside} of 4 texts end inside a character");
}

#[test]
fn select_refuses_non_finite_or_empty_inputs() {
    if !gpu_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kvsift-cli-select-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, keys: (&[usize], Vec<f32>), queries: (&[usize], Vec<f32>)| {
        let kb: Vec<u8> = keys.1.iter().flat_map(|v| v.to_le_bytes()).collect();
        let qb: Vec<u8> = queries.1.iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            (
                "keys",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, keys.0.to_vec(), &kb)
                    .unwrap(),
            ),
            (
                "queries",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    queries.0.to_vec(),
                    &qb,
                )
                .unwrap(),
            ),
        ];
        let path = dir.join(name);
        safetensors::serialize_to_file(views, None, &path).unwrap();
        path
    };
    let (t, w, d) = (40, 8, 16);
    let vals = |n: usize| {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect::<Vec<f32>>()
    };
    let mut nan_keys = vals(2 * t * d);
    nan_keys[77] = f32::NAN;
    let mut inf_queries = vals(4 * w * d);
    inf_queries[5] = f32::INFINITY;
    let cases = [
        write(
            "nan.st",
            (&[2, t, d], nan_keys),
            (&[4, w, d], vals(4 * w * d)),
        ),
        write(
            "inf.st",
            (&[2, t, d], vals(2 * t * d)),
            (&[4, w, d], inf_queries),
        ),
        write("d0.st", (&[2, t, 0], vec![]), (&[4, w, 0], vec![])),
    ];
    for (path, needle) in cases.iter().zip(["keys[", "queries[", "head dim 0"]) {
        for cpu in [false, true] {
            let mut args = vec![
                "select",
                "--method",
                "snapkv",
                "--budget",
                "16",
                "--input",
                path.to_str().unwrap(),
            ];
            if cpu {
                args.push("--cpu");
            }
            expect_error(&kvsift(&args), &[needle]);
        }
    }
}

/// Many prompts under R-KV in a pool they outgrow after admission (short
/// prompts grow to budget + buffer), so sequences are preempted: each
/// request's output equals its output alone, under swap and recompute.
#[test]
fn preempted_requests_under_compression_write_what_they_write_alone() {
    if !gpu_available() {
        return;
    }
    // Openings of a held-out chain problem.
    let (problem, _) = first_examples("chain", 1).remove(0);
    let prompts: Vec<String> = [10, 15, 20, 25, 12, 18, 8, 22]
        .iter()
        .map(|&n| problem.chars().take(n).collect())
        .collect();
    let base = [
        "generate",
        "--max-tokens",
        "160",
        "--kv",
        "rkv",
        "--budget",
        "32",
        "--buffer",
        "16",
        "--json",
    ];
    let alone: Vec<serde_json::Value> = prompts
        .iter()
        .map(|p| {
            let mut args = base.to_vec();
            args.extend(["--prompt", p.as_str()]);
            let r = kvsift(&args);
            assert_eq!(r.code, 0, "{}", r.stderr);
            let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
            j["tokens"].clone()
        })
        .collect();
    for (mode, pool) in [("swap", "0.3"), ("swap", "0.5"), ("recompute", "0.3")] {
        let mut args = base.to_vec();
        args.extend(["--kv-pool-mb", pool, "--on-exhaustion", mode]);
        for p in &prompts {
            args.extend(["--prompt", p.as_str()]);
        }
        let r = kvsift(&args);
        assert_eq!(r.code, 0, "{mode}: {}", r.stderr);
        let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let preemptions = j["kv"]["preemptions"].as_u64().unwrap();
        assert!(preemptions > 0, "{mode} {pool}: no preemption");
        for (i, q) in j["requests"].as_array().unwrap().iter().enumerate() {
            assert_eq!(
                q["tokens"], alone[i],
                "{mode} {pool} ({preemptions} preemptions): request {i}"
            );
        }
    }
}

/// `bench soak`: under R-KV the cache stays within budget + buffer slots per
/// head for a run far past the context, for one sequence and a batch, and
/// the process's memory does not grow; without compression the cache grows
/// until the context is full.
#[test]
fn soak_keeps_the_rkv_cache_flat_and_memory_steady() {
    if !gpu_available() {
        return;
    }
    let soak = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["bench", "soak", "--json", "--samples", "8"];
        args.extend_from_slice(extra);
        let r = kvsift(&args);
        assert_eq!(r.code, 0, "{extra:?}: {}", r.stderr);
        serde_json::from_str(&r.stdout).unwrap()
    };
    for (batch, tokens) in [("1", "2500"), ("3", "700")] {
        let j = soak(&[
            "--tokens", tokens, "--batch", batch, "--kv", "rkv", "--budget", "32", "--buffer", "16",
        ]);
        assert_eq!(j["tokens_per_sequence"].as_u64(), tokens.parse().ok());
        assert_eq!(j["within_bound"], true, "batch {batch}: {j}");
        let bound = j["bound_kv_bytes"].as_u64().unwrap();
        for s in j["samples"].as_array().unwrap().iter().skip(2) {
            assert!(s["kv_bytes_in_use"].as_u64().unwrap() <= bound, "{s}");
            assert!(s["longest_head"].as_u64().unwrap() <= 48, "{s}");
        }
        if let Some(growth) = j["settled_rss_growth_bytes"].as_i64() {
            assert!(growth < 16 << 20, "resident memory grew {growth} bytes");
        }
    }
    // The full cache grows with the sequence and stops at the context.
    let j = soak(&["--model", TINY, "--tokens", "240", "--max-context", "300"]);
    assert_eq!(j["stopped_at_context"], true);
    assert!(j["samples"].as_array().unwrap().len() >= 6, "{j}");
    let kv: Vec<u64> = j["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kv_bytes_in_use"].as_u64().unwrap())
        .collect();
    assert!(kv.windows(2).take(4).all(|w| w[1] > w[0]), "{kv:?}");
}
