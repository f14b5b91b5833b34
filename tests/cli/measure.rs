//! bench (pp/tg, roofline, profile, throughput, soak) and eval.

use super::*;

#[test]
fn bench_prints_pp_tg_roofline_profile_and_throughput() {
    if !gpu_available() {
        return;
    }
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

    // Prompts from a JSONL file, and the comparison drawn as SVG bars.
    let dir = std::env::temp_dir().join(format!("kvsift-tp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"The cache keeps every key\"}\n{\"prompt\": \"and value\"}\n",
    )
    .unwrap();
    let plot = dir.join("tp.svg");
    let r = kvsift(&[
        "bench",
        "throughput",
        "--model",
        TINY,
        "--pool-mb",
        "0.25",
        "--gen-len",
        "40",
        "--kv",
        "snapkv",
        "--budget",
        "16",
        "--prompts",
        prompts.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(
        j["prompt_len"].as_f64().unwrap() < 10.0,
        "the file's prompts: {j}"
    );
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("full cache") && svg.contains("snapkv B=16"));
    std::fs::remove_dir_all(&dir).ok();

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
    if !gpu_available() {
        return;
    }
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
            .contains("| needle accuracy | full cache | B=16 | B=32 |"),
        "{}",
        r.stdout
    );
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    // A header, the full cache, then every registered method at both budgets.
    let methods = kvsift::kv::compression::Method::compressing().count();
    assert_eq!(csv.lines().count(), 1 + 1 + 2 * methods, "{csv}");
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    assert!(r.stdout.contains(&md), "sweep.md is the printed tables");
    assert_eq!(
        md.lines().filter(|l| l.starts_with("| snapkv |")).count(),
        3,
        "a row in the accuracy table and one run per budget: {md}"
    );
    let svg = std::fs::read_to_string(out.join("needle.accuracy.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("full cache"),
        "{svg}"
    );
    let lines = std::fs::read_to_string(out.join("examples.jsonl")).unwrap();
    assert_eq!(
        lines.lines().count(),
        1 + 2 * methods,
        "one line per example per run"
    );

    // --from: the same tables and CSV again from sweep.json, twice merged
    // into one (the second file's runs replace the first's).
    let again = dir.join("again");
    let from = out.join("sweep.json");
    let from = from.to_str().unwrap();
    let r = kvsift(&[
        "eval",
        "--from",
        from,
        "--from",
        from,
        "--out-dir",
        again.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(again.join("sweep.csv")).unwrap(),
        csv
    );
    assert_eq!(std::fs::read_to_string(again.join("sweep.md")).unwrap(), md);
    assert!(!again.join("examples.jsonl").exists());
    // A sweep's bad budget is refused before anything runs.
    let r = kvsift(&[
        "eval",
        "--model",
        d,
        "--task",
        "needle",
        "--sweep",
        "--budgets",
        "0",
    ]);
    expect_error(&r, &["--budget", "0"]);
    assert!(!r.stdout.contains("accuracy"), "{}", r.stdout);
    expect_error(
        &kvsift(&["eval", "--from", "/nonexistent.json"]),
        &["--from", "/nonexistent.json"],
    );

    expect_error(
        &kvsift(&["eval", "--model", d, "--task", "tally", "--n", "1"]),
        &["tally", "tally.jsonl"],
    );

    // --data: "question" lines, per-example results, pass@1 over samples.
    let data = dir.join("data.jsonl");
    std::fs::write(
        &data,
        format!(
            "{}\n{}\n",
            serde_json::json!({"question": format!("{filler}the key is 12345. {filler}\nq: what is the key?\na: "), "answer": "12345"}),
            serde_json::json!({"question": "the key is 7.\nq: what is the key?\na: ", "answer": 7}),
        ),
    )
    .unwrap();
    let r = kvsift(&[
        "eval",
        "--model",
        d,
        "--data",
        data.to_str().unwrap(),
        "--max-tokens",
        "3",
        "--samples",
        "2",
        "--extract",
        "last-number",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!((j["n"].as_u64(), j["samples"].as_u64()), (Some(2), Some(2)));
    let examples = j["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 4, "2 examples x 2 samples");
    let correct = examples.iter().filter(|e| e["correct"] == true).count();
    assert!((j["accuracy"].as_f64().unwrap() - correct as f64 / 4.0).abs() < 1e-9);
    assert!(
        examples
            .iter()
            .all(|e| e["generated_tokens"].as_u64().unwrap() <= 3)
    );
    expect_error(
        &kvsift(&["eval", "--model", d, "--data", "/nonexistent.jsonl"]),
        &["/nonexistent.jsonl"],
    );
    std::fs::write(&data, "{\"prompt\": 5}\n").unwrap();
    expect_error(
        &kvsift(&["eval", "--model", d, "--data", data.to_str().unwrap()]),
        &["data.jsonl:1", "prompt"],
    );
    expect_error(
        &kvsift(&["eval", "--model", d, "--task", "sums"]),
        &["--task"],
    );
    std::fs::remove_dir_all(&dir).ok();
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
