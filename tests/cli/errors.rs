//! Bad input through the binary: clear errors, never a panic.

use super::*;

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
