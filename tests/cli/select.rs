//! `kvsift select`: the shared vectors reproduced, bad inputs refused.

use super::*;

#[test]
fn select_reproduces_a_vector_and_rejects_bad_settings() {
    if !gpu_available() {
        return;
    }
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
