//! `kvsift serve` end to end over loopback HTTP (ureq as the client):
//! completions (the same tokens as `kvsift generate`, whole and streamed;
//! per-request `kv` and its report; stop strings; several prompts, echo;
//! logprobs), chat (n choices, reasoning content), and operations
//! (concurrent streams, a client that leaves mid-stream, bad requests with
//! OpenAI-shaped errors, shutdown, the load test).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

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
    let (out, done) = sse_chunks(BufReader::new(r.into_body().into_reader()).lines());
    assert!(done, "no [DONE]");
    out
}

/// The JSON of each `data:` line up to `[DONE]`, and whether it came.
fn sse_chunks(lines: impl Iterator<Item = std::io::Result<String>>) -> (Vec<Value>, bool) {
    let mut out = vec![];
    for line in lines {
        let line = line.unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            if data == "[DONE]" {
                return (out, true);
            }
            out.push(serde_json::from_str(data).unwrap());
        }
    }
    (out, false)
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

mod chat;
mod completions;
mod operations;
