//! Operating the server: concurrent streams and a client that leaves, bad
//! requests, shutdown, the load test.

use std::io::{BufRead, BufReader, Read};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;

#[test]
fn concurrent_streams_complete_and_a_client_that_leaves_frees_its_pages() {
    if kvsift::testing::gpu().is_none() {
        return;
    }
    let s = server(&["--parallel", "4"]);
    let prompts: Vec<String> = (0..16).map(|i| format!("{PROMPT} {i}")).collect();
    let whole: Vec<String> = prompts
        .iter()
        .map(|p| {
            let (_, j) = post(
                &s,
                "/v1/completions",
                json!({"prompt": p, "max_tokens": 16, "temperature": 0}),
            );
            j["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let s = &s;
                scope.spawn(move || {
                    let body =
                        json!({"prompt": p, "max_tokens": 16, "temperature": 0, "stream": true});
                    stream(s, "/v1/completions", body)
                        .iter()
                        .filter_map(|c| c["choices"][0]["text"].as_str())
                        .collect::<String>()
                })
            })
            .collect();
        for (h, want) in handles.into_iter().zip(&whole) {
            assert_eq!(&h.join().unwrap(), want);
        }
    });
    // /metrics is Prometheus text: every sample line is a name (with
    // labels), a number; histogram buckets never decrease.
    let mut r = ureq::get(&format!("{}/metrics", s.base)).call().unwrap();
    let text = r.body_mut().read_to_string().unwrap();
    let mut last_bucket: Option<(String, f64)> = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        assert!(name.starts_with("kvsift_"), "{line}");
        if let Some(base) = name
            .split("_bucket{")
            .next()
            .filter(|_| name.contains("_bucket{"))
        {
            if let Some((b, v)) = &last_bucket
                && b == base
            {
                assert!(value >= *v, "{line}");
            }
            last_bucket = Some((base.to_string(), value));
        }
    }
    assert!(metric(&s, "kvsift_completion_tokens_total") >= (16 * 16 * 2) as f64);
    assert!(metric(&s, "kvsift_time_to_first_token_seconds_count") >= 32.0);
    assert!(metric(&s, "kvsift_inter_token_latency_seconds_count") > 0.0);
    // Leave a long stream after its first chunk.
    let r = agent()
        .post(&format!("{}/v1/completions", s.base))
        .send_json(json!({"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": true}))
        .unwrap();
    let mut reader = r.into_body().into_reader();
    let mut first = [0u8; 16];
    reader.read_exact(&mut first).unwrap();
    drop(reader);
    let start = Instant::now();
    while metric(&s, "kvsift_kv_pages_in_use") > 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "pages never came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(metric(&s, "kvsift_kv_pages_peak") > 0.0);
}

#[test]
fn bad_requests_get_openai_shaped_errors() {
    if kvsift::testing::gpu().is_none() {
        return;
    }
    let s = server(&["--api-key", "sekrit"]);
    let send = |body: &str, key: Option<&str>| -> (u16, Value) {
        let mut req = agent().post(&format!("{}/v1/completions", s.base));
        if let Some(k) = key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        let mut r = req.content_type("application/json").send(body).unwrap();
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap(),
        )
    };
    let ok = Some("sekrit");
    let long = format!("{{\"prompt\": \"{}\"}}", "x ".repeat(3000));
    for (body, key, status, needle) in [
        (r#"{"prompt": "hi"}"#, None, 401, "API key"),
        (r#"{"prompt": "hi"}"#, Some("wrong"), 401, "API key"),
        ("{not json", ok, 400, "not JSON"),
        (r#"{"prompt": 3}"#, ok, 400, "prompt"),
        (
            r#"{"prompt": "hi", "max_tokens": -1}"#,
            ok,
            400,
            "max_tokens",
        ),
        (
            r#"{"prompt": "hi", "temperature": "hot"}"#,
            ok,
            400,
            "temperature",
        ),
        (
            r#"{"prompt": "hi", "kv": {"method": "lru"}}"#,
            ok,
            400,
            "kv.method",
        ),
        (
            r#"{"prompt": "hi", "kv": {"method": "snapkv", "budget": 4}}"#,
            ok,
            400,
            "kv.budget",
        ),
        (
            r#"{"prompt": "hi", "kv": {"method": "snapkv", "budget": 32, "lambda": 0.2}}"#,
            ok,
            400,
            "kv.lambda",
        ),
        (
            r#"{"prompt": "hi", "kv": {"method": "rkv"}}"#,
            ok,
            400,
            "kv.budget",
        ),
        (r#"{"prompt": "hi", "stop": 7}"#, ok, 400, "stop"),
        (&long, ok, 400, "exceed"),
        // Sampling errors name the JSON field, not the command-line flag.
        (
            r#"{"prompt": "hi", "temperature": -1}"#,
            ok,
            400,
            "for temperature",
        ),
        (r#"{"prompt": "hi", "top_p": 0}"#, ok, 400, "for top_p"),
        // What kvsift does not do is refused, never silently ignored.
        (
            r#"{"prompt": "hi", "presence_penalty": 0.5}"#,
            ok,
            400,
            "presence_penalty",
        ),
        (
            r#"{"prompt": "hi", "logit_bias": {"5": 10}}"#,
            ok,
            400,
            "logit_bias",
        ),
        (r#"{"prompt": "hi", "suffix": "end"}"#, ok, 400, "suffix"),
        (r#"{"prompt": "hi", "best_of": 3}"#, ok, 400, "best_of"),
        (
            r#"{"prompt": "hi", "echo": true, "logprobs": 1}"#,
            ok,
            400,
            "echo",
        ),
        (r#"{"prompt": [[1, 2], "x", 3]}"#, ok, 400, "prompt"),
        (r#"{"prompt": [999999]}"#, ok, 400, "vocabulary"),
        (r#"{"prompt": ["a", "b", "c"], "n": 30}"#, ok, 400, "n"),
    ] {
        let (got, j) = send(body, key);
        assert_eq!(got, status, "{body}: {j}");
        let msg = j["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{body}: {msg}");
        assert!(j["error"]["type"].is_string(), "{j}");
    }
    // The neutral values of what is refused above are accepted.
    let (got, j) = send(
        r#"{"prompt": "hi", "max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "best_of": 1, "top_k": -1}"#,
        ok,
    );
    assert_eq!(got, 200, "{j}");
    let chat = |body: &str| -> (u16, Value) {
        let mut r = agent()
            .post(&format!("{}/v1/chat/completions", s.base))
            .header("Authorization", "Bearer sekrit")
            .content_type("application/json")
            .send(body)
            .unwrap();
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap(),
        )
    };
    let m = r#""messages": [{"role": "user", "content": "hi"}], "max_tokens": 2"#;
    for (extra, status, needle) in [
        (
            r#""response_format": {"type": "json_object"}"#,
            400,
            "response_format",
        ),
        (
            r#""tools": [{"type": "function", "function": {"name": "f"}}]"#,
            400,
            "tools",
        ),
        (
            r#""tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none""#,
            200,
            "",
        ),
        (r#""response_format": {"type": "text"}"#, 200, ""),
    ] {
        let (got, j) = chat(&format!("{{{m}, {extra}}}"));
        assert_eq!(got, status, "{extra}: {j}");
        assert!(
            j["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(needle),
            "{j}"
        );
    }
    let mut r = agent()
        .post(&format!("{}/detokenize", s.base))
        .header("Authorization", "Bearer sekrit")
        .send_json(json!({"tokens": [4000000000u64]}))
        .unwrap();
    assert_eq!(
        r.status(),
        400,
        "{}",
        r.body_mut().read_to_string().unwrap()
    );
    // A body past the limit and a wrong method: OpenAI-shaped too.
    let big = format!("{{\"prompt\": \"{}\"}}", "x".repeat(65 << 20));
    let (got, j) = send(&big, ok);
    assert_eq!(got, 413, "{j}");
    assert!(j["error"]["message"].is_string(), "{j}");
    let mut r = agent()
        .get(&format!("{}/v1/completions", s.base))
        .call()
        .unwrap();
    assert_eq!(r.status(), 405);
    let j: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert!(j["error"]["message"].is_string(), "{j}");
    for (id, status) in [("tiny-llama", 200), ("gpt-4", 404)] {
        let r = agent()
            .get(&format!("{}/v1/models/{id}", s.base))
            .header("Authorization", "Bearer sekrit")
            .call()
            .unwrap();
        assert_eq!(r.status(), status, "{id}");
    }
    // The server goes on serving.
    let (got, _) = send(r#"{"prompt": "hi", "max_tokens": 2}"#, ok);
    assert_eq!(got, 200);
}

/// SIGTERM mid-stream: the listener closes, the running stream finishes
/// within the deadline (all its tokens), then the server exits 0; with a
/// deadline of 0 the stream is stopped at once and ends with
/// finish_reason "abort" and `[DONE]`.
#[cfg(unix)]
#[test]
fn sigterm_drains_running_streams_up_to_the_deadline() {
    if kvsift::testing::gpu().is_none() {
        return;
    }
    for (deadline, finishes) in [("30", true), ("0", false)] {
        let mut s = server(&[
            "--kv",
            "rkv",
            "--budget",
            "24",
            "--window",
            "4",
            "--buffer",
            "8",
            "--shutdown-timeout",
            deadline,
        ]);
        let body = json!({"prompt": PROMPT, "max_tokens": 500, "temperature": 0, "stream": true});
        let r = agent()
            .post(&format!("{}/v1/completions", s.base))
            .send_json(&body)
            .unwrap();
        let mut lines = BufReader::new(r.into_body().into_reader()).lines();
        let first = lines.next().unwrap().unwrap();
        assert!(first.starts_with("data: "), "{first}");
        let term = Command::new("kill")
            .args(["-TERM", &s.child.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
        let mut chunks: Vec<Value> = vec![serde_json::from_str(&first[6..]).unwrap()];
        let (rest, done) = sse_chunks(lines);
        chunks.extend(rest);
        assert!(done, "deadline {deadline}: no [DONE]");
        let reason = chunks
            .iter()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str())
            .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(st) = s.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "deadline {deadline}: still running"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "deadline {deadline}: {status}");
        if finishes {
            assert_eq!(reason, "length");
        } else {
            assert_eq!(reason, "abort");
        }
    }
}

/// `kvsift bench serve` against a server: every request streamed to its
/// `max_tokens` (stop tokens ignored), per `kv` setting, with latencies and
/// each request's peak KV (smaller under R-KV than with the full cache).
#[test]
fn bench_serve_measures_a_load_with_and_without_kv() {
    if kvsift::testing::gpu().is_none() {
        return;
    }
    let s = server(&["--parallel", "4"]);
    let out = Command::new(env!("CARGO_BIN_EXE_kvsift"))
        .args([
            "bench",
            "serve",
            "--url",
            &s.base,
            "--clients",
            "3",
            "--requests",
            "2",
        ])
        .args([
            "--prompt-tokens",
            "48",
            "--max-tokens",
            "40",
            "--json",
            "--kv",
            "default",
        ])
        .args(["--kv", r#"{"method": "rkv", "budget": 24, "buffer": 8}"#])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = j["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for r in runs {
        assert_eq!(r["requests"], 6, "{r}");
        assert_eq!(r["output_tokens"], 6 * 40, "{r}");
        for k in [
            "requests_per_s",
            "output_tok_per_s",
            "ttft_ms_p50",
            "ttft_ms_p99",
            "itl_ms_p50",
            "itl_ms_p99",
        ] {
            assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
        }
        assert!(r["ttft_ms_p50"].as_f64() <= r["ttft_ms_p99"].as_f64());
    }
    let peak = |i: usize| runs[i]["peak_kv_bytes_mean"].as_f64().unwrap();
    assert!(
        peak(1) < peak(0),
        "R-KV holds less: {} vs {}",
        peak(1),
        peak(0)
    );
}
