//! `kvsift serve` end to end over loopback HTTP (ureq as the client): the
//! same tokens as `kvsift generate`, whole and streamed, per-request `kv`
//! settings, stop strings, concurrent streams, a client that leaves
//! mid-stream, and bad requests with OpenAI-shaped errors.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TINY: &str = "models/tiny-llama";
const PROMPT: &str = "the quiet grey cat sat on the mat near the river";

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `kvsift serve` on a free loopback port and waits for /health.
fn server(extra: &[&str]) -> Server {
    server_for(TINY, extra)
}

fn server_for(model: &str, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvsift"))
        .args(["serve", "--model", model, "--port", "0"])
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("serve exited before listening")
            .unwrap();
        if let Some(at) = line.find("http://") {
            let url = line[at..].split_whitespace().next().unwrap().to_string();
            break url;
        }
    };
    // Keep draining stderr so the server never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    let s = Server { child, base };
    let start = Instant::now();
    loop {
        if let Ok(r) = ureq::get(&format!("{}/health", s.base)).call()
            && r.status() == 200
        {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the model never loaded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn post(s: &Server, path: &str, body: Value) -> (u16, Value) {
    let mut r = agent()
        .post(&format!("{}{path}", s.base))
        .send_json(&body)
        .unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A streamed completion: each data chunk's JSON, up to `[DONE]`.
fn stream(s: &Server, path: &str, body: Value) -> Vec<Value> {
    let r = agent()
        .post(&format!("{}{path}", s.base))
        .send_json(&body)
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut out = vec![];
    let mut done = false;
    for line in BufReader::new(r.into_body().into_reader()).lines() {
        let line = line.unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            if data == "[DONE]" {
                done = true;
                break;
            }
            out.push(serde_json::from_str(data).unwrap());
        }
    }
    assert!(done, "no [DONE]");
    out
}

/// `kvsift generate`'s greedy text for the prompt, with extra flags.
fn generate(flags: &[&str], max_tokens: usize) -> String {
    generate_json(flags, max_tokens)["text"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `kvsift generate --json` for the prompt, greedy, with extra flags.
fn generate_json(flags: &[&str], max_tokens: usize) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_kvsift"))
        .args([
            "generate",
            "--model",
            TINY,
            "--prompt",
            PROMPT,
            "--temperature",
            "0",
        ])
        .args(["--max-tokens", &max_tokens.to_string(), "--json"])
        .args(flags)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn metric(s: &Server, name: &str) -> f64 {
    let mut r = ureq::get(&format!("{}/metrics", s.base)).call().unwrap();
    let text = r.body_mut().read_to_string().unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn completions_whole_and_streamed_equal_generate() {
    if kvsift::testing::gpu().is_none() {
        return;
    }
    let s = server(&[]);
    let want = generate(&[], 24);
    let body = json!({"prompt": PROMPT, "max_tokens": 24, "temperature": 0});
    let (status, j) = post(&s, "/v1/completions", body.clone());
    assert_eq!(status, 200, "{j}");
    assert_eq!(j["choices"][0]["text"], want.as_str());
    assert_eq!(j["choices"][0]["finish_reason"], "length");
    assert_eq!(j["usage"]["completion_tokens"], 24);
    assert_eq!(j["object"], "text_completion");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = stream(&s, "/v1/completions", streamed);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, want);
    let last_choice = chunks
        .iter()
        .rev()
        .find(|c| c["choices"][0]["finish_reason"].is_string());
    assert_eq!(
        last_choice.unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 24);

    // A stop string is matched across tokens and never emitted.
    let stop: String = want.chars().skip(6).take(3).collect();
    let mut with_stop = body.clone();
    with_stop["stop"] = json!([stop]);
    let (_, j) = post(&s, "/v1/completions", with_stop.clone());
    let cut = &want[..want.find(&stop).unwrap()];
    assert_eq!(j["choices"][0]["text"], cut);
    assert_eq!(j["choices"][0]["finish_reason"], "stop");
    with_stop["stream"] = json!(true);
    let text: String = stream(&s, "/v1/completions", with_stop)
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, cut);
}

#[test]
fn per_request_kv_equals_generate_with_the_same_flags() {
    if kvsift::testing::gpu().is_none() {
        return;
    }
    // The server records window queries (R-KV's), so any window-4 method fits.
    let s = server(&[
        "--kv", "rkv", "--budget", "24", "--window", "4", "--buffer", "8",
    ]);
    for (kv, flags) in [
        (
            json!({"method": "snapkv", "budget": 16, "window": 4}),
            vec!["--kv", "snapkv", "--budget", "16", "--window", "4"],
        ),
        (
            json!({"budget": 20}),
            vec![
                "--kv", "rkv", "--budget", "20", "--window", "4", "--buffer", "8",
            ],
        ),
        (json!({"method": "none"}), vec![]),
    ] {
        let want = generate_json(&flags, 40);
        let body = json!({"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "kv": kv});
        let (status, j) = post(&s, "/v1/completions", body);
        assert_eq!(status, 200, "{j}");
        assert_eq!(j["choices"][0]["text"], want["text"], "kv {kv}");
        // The request's own figures are what the engine counted for it
        // alone in `generate` (engine-wide there: one request).
        let ext = &j["kvsift"];
        assert_eq!(
            ext["kv_slots_per_layer"], want["kv_slots_per_layer"],
            "kv {kv}"
        );
        let engine = &want["kv"];
        let passes = engine["compression"]["passes"].as_u64().unwrap_or(0);
        assert_eq!(ext["compression_passes"], passes, "kv {kv}: {ext}");
        let dropped = engine["compression"]["slots_dropped"].as_u64().unwrap_or(0);
        assert_eq!(ext["slots_dropped"], dropped, "kv {kv}: {ext}");
        let peak = engine["peak_pages_in_use"].as_u64().unwrap()
            * engine["pool"]["page_bytes"].as_u64().unwrap();
        assert_eq!(ext["peak_kv_bytes"], peak, "kv {kv}: {ext}");
        if kv["method"] != "none" {
            assert!(passes > 0 && dropped > 0, "kv {kv}: {want}");
        }
    }
    assert!(metric(&s, "kvsift_compression_passes_total") > 0.0);

    // A server started without compression records window queries: any
    // method that scores from them may be asked for (at its window, 8 by
    // default); H2O v3 needs --record-attention-sums.
    let plain = server(&[]);
    let rkv = json!({"method": "rkv", "budget": 20, "buffer": 8});
    let want = generate(&["--kv", "rkv", "--budget", "20", "--buffer", "8"], 40);
    let body = json!({"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "kv": rkv});
    let (status, j) = post(&plain, "/v1/completions", body);
    assert_eq!(status, 200, "{j}");
    assert_eq!(j["choices"][0]["text"], want.as_str());
    let h2o = json!({"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "kv": {"method": "h2o", "budget": 20}});
    let (status, j) = post(&plain, "/v1/completions", h2o.clone());
    assert_eq!(status, 400, "{j}");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--record-attention-sums"),
        "{j}"
    );
    drop(plain);
    let sums = server(&["--record-attention-sums"]);
    let want = generate(&["--kv", "h2o", "--budget", "20"], 40);
    let (status, j) = post(&sums, "/v1/completions", h2o);
    assert_eq!(status, 200, "{j}");
    assert_eq!(j["choices"][0]["text"], want.as_str());
}

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

/// A completions request with several prompts (strings or token-id lists)
/// answers each with its `n` choices, indexed prompt by prompt, each what
/// the prompt alone gets; `echo` puts the prompt before its text.
#[test]
fn batched_prompts_and_echo() {
    if kvsift::testing::gpu().is_none() {
        return;
    }
    let s = server(&[]);
    let prompts = ["the quiet grey cat", "down by the river"];
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            let (_, j) = post(
                &s,
                "/v1/completions",
                json!({"prompt": p, "max_tokens": 8, "temperature": 0}),
            );
            j["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    let (_, ids) = post(
        &s,
        "/tokenize",
        json!({"content": prompts[1], "add_special": true}),
    );
    let body =
        json!({"prompt": [prompts[0], ids["tokens"]], "max_tokens": 8, "temperature": 0, "n": 2});
    let (status, j) = post(&s, "/v1/completions", body.clone());
    assert_eq!(status, 200, "{j}");
    let choices = j["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (k, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], k);
        assert_eq!(c["text"], alone[k / 2].as_str(), "choice {k}");
    }
    assert_eq!(j["usage"]["completion_tokens"], 4 * 8);
    let mut echo = json!({"prompt": prompts[0], "max_tokens": 8, "temperature": 0, "echo": true});
    let (_, j) = post(&s, "/v1/completions", echo.clone());
    assert_eq!(
        j["choices"][0]["text"],
        format!("{}{}", prompts[0], alone[0])
    );
    echo["stream"] = json!(true);
    let text: String = stream(&s, "/v1/completions", echo)
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, format!("{}{}", prompts[0], alone[0]));
}

#[test]
fn chat_completions_whole_and_streamed_agree() {
    if kvsift::testing::gpu().is_none() {
        return;
    }
    let s = server(&[]);
    let body = json!({
        "model": "tiny-llama",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}],
        "max_completion_tokens": 20,
        "temperature": 0,
    });
    let (status, j) = post(&s, "/v1/chat/completions", body.clone());
    assert_eq!(status, 200, "{j}");
    assert_eq!(j["object"], "chat.completion");
    assert_eq!(j["choices"][0]["message"]["role"], "assistant");
    let whole = j["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(j["usage"]["completion_tokens"], 20);
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let chunks = stream(&s, "/v1/chat/completions", streamed);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, whole);
    let (status, j) = post(&s, "/v1/chat/completions", json!({"messages": []}));
    assert_eq!(status, 400, "{j}");
}

/// `n` choices are n requests with seeds seed, seed + 1, ...: each equals
/// the single request with its seed, whole and streamed.
#[test]
fn n_choices_are_the_requests_with_consecutive_seeds() {
    if kvsift::testing::gpu().is_none() {
        return;
    }
    let s = server(&[]);
    let body = |n: u64, seed: u64| json!({"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": seed, "n": n});
    let (status, j) = post(&s, "/v1/completions", body(3, 5));
    assert_eq!(status, 200, "{j}");
    let choices = j["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let mut texts = vec![];
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let (_, one) = post(&s, "/v1/completions", body(1, 5 + i as u64));
        assert_eq!(c["text"], one["choices"][0]["text"], "choice {i}");
        texts.push(c["text"].as_str().unwrap().to_string());
    }
    assert_eq!(j["usage"]["completion_tokens"], 36);
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "seeds made no difference"
    );
    let mut streamed = body(3, 5);
    streamed["stream"] = json!(true);
    let chunks = stream(&s, "/v1/completions", streamed);
    for (i, want) in texts.iter().enumerate() {
        let got: String = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == i)
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(&got, want, "streamed choice {i}");
    }
    let (status, _) = post(&s, "/v1/completions", body(0, 5));
    assert_eq!(status, 400);
}

/// A template whose generation prompt opens `<think>` (as DeepSeek-R1's and
/// Qwen3's do): the answer goes to `reasoning_content` until `</think>`
/// (this random model never writes it), whole and streamed alike.
#[test]
fn a_think_block_opened_by_the_template_goes_to_reasoning_content() {
    if kvsift::testing::gpu().is_none() {
        return;
    }
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(TINY);
    let dir = std::env::temp_dir().join(format!("kvsift-think-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let p = f.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let t = cfg["chat_template"].as_str().unwrap().to_string();
    // Qwen3's rule: thinking unless enable_thinking is false.
    cfg["chat_template"] = json!(format!(
        "{t}{{% if add_generation_prompt and (enable_thinking is not defined or enable_thinking) %}}<think>\n{{% endif %}}"
    ));
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let s = server_for(dir.to_str().unwrap(), &[]);
    let body = json!({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16, "temperature": 0});
    let (status, j) = post(&s, "/v1/chat/completions", body.clone());
    assert_eq!(status, 200, "{j}");
    let m = &j["choices"][0]["message"];
    assert_eq!(m["content"], "", "{j}");
    let reasoning = m["reasoning_content"].as_str().unwrap().to_string();
    assert!(!reasoning.is_empty());
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let chunks = stream(&s, "/v1/chat/completions", streamed);
    let r: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    let c: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(r, reasoning);
    assert_eq!(c, "");
    // chat_template_kwargs reach the template: no thinking, a plain answer.
    let off = json!({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16,
        "temperature": 0, "chat_template_kwargs": {"enable_thinking": false}});
    let (status, j) = post(&s, "/v1/chat/completions", off);
    assert_eq!(status, 200, "{j}");
    let m = &j["choices"][0]["message"];
    assert!(m.get("reasoning_content").is_none(), "{j}");
    assert!(!m["content"].as_str().unwrap().is_empty(), "{j}");
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Logprobs in OpenAI's two shapes: completions' parallel lists (one entry
/// per generated token; greedy picks the most likely, so each token's
/// logprob is its top alternative's) and chat's entries whose bytes spell
/// the content, the same whole and streamed.
#[test]
fn logprobs_cover_every_token_whole_and_streamed() {
    if kvsift::testing::gpu().is_none() {
        return;
    }
    let s = server(&[]);
    let body = json!({"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 3});
    let (status, j) = post(&s, "/v1/completions", body);
    assert_eq!(status, 200, "{j}");
    let lp = &j["choices"][0]["logprobs"];
    let logprobs = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(logprobs.len(), 12, "{lp}");
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 12);
    assert_eq!(lp["text_offset"][0], 0);
    for (got, top) in logprobs.iter().zip(lp["top_logprobs"].as_array().unwrap()) {
        let best = top
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::NEG_INFINITY, f64::max);
        let got = got.as_f64().unwrap();
        assert!(got <= 0.0 && (got - best).abs() < 1e-6, "{got} vs {top}");
    }

    let chat = json!({
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 10, "temperature": 0, "logprobs": true, "top_logprobs": 2,
    });
    let (status, j) = post(&s, "/v1/chat/completions", chat.clone());
    assert_eq!(status, 200, "{j}");
    let entries = j["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(entries.len(), 10);
    let bytes: Vec<u8> = entries
        .iter()
        .flat_map(|e| {
            e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
        })
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        j["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert!(
        entries
            .iter()
            .all(|e| e["top_logprobs"].as_array().unwrap().len() == 2)
    );
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let chunks = stream(&s, "/v1/chat/completions", streamed);
    let streamed_entries: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .cloned()
        .collect();
    assert_eq!(streamed_entries, entries);

    for (bad, field) in [
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (json!({"logprobs": "yes"}), "logprobs"),
    ] {
        let mut body = chat.clone();
        body.as_object_mut().unwrap().remove("logprobs");
        body.as_object_mut().unwrap().remove("top_logprobs");
        body.as_object_mut()
            .unwrap()
            .extend(bad.as_object().unwrap().clone());
        let (status, j) = post(&s, "/v1/chat/completions", body);
        assert_eq!(status, 400, "{bad}: {j}");
        assert!(
            j["error"]["message"].as_str().unwrap().contains(field),
            "{j}"
        );
    }
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
        let mut done = false;
        for line in lines {
            let line = line.unwrap();
            if let Some(data) = line.strip_prefix("data: ") {
                if data == "[DONE]" {
                    done = true;
                    break;
                }
                chunks.push(serde_json::from_str(data).unwrap());
            }
        }
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
