//! The `kvsift` binary end to end: it runs on the shipped models, and every
//! bad input a user can give ends in a clear error and a non-zero exit, never
//! a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether the binary can open a GPU: without one a test returns early
/// ("skipped: no GPU adapter" on stderr), and under `CI` it fails instead.
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

mod errors;
mod generate;
mod measure;
mod select;
