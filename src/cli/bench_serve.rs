//! `kvsift bench serve`: a bounded load test against a running `kvsift
//! serve` (or any OpenAI-compatible server): N concurrent clients, M
//! streamed completions each, fixed prompt and output lengths, once per
//! `--kv` setting; requests/s, output tokens/s, time to first token and
//! inter-token latency (p50, p99), and the KV each request peaked at.
//! Latencies are measured on the stream's text chunks: a token that shows
//! no text (a special token, part of a character) arrives with the next.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};

#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    /// The server's base address.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 4)]
    pub requests: usize,
    /// Prompt tokens of every request (from the server's /tokenize).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens every request generates (stop tokens ignored: `ignore_eos`).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// The requests' `kv` object, e.g. '{"method":"rkv","budget":64}', or
    /// `default` (no `kv` field: the server's). Repeat to compare; each is
    /// one run. Default: one run with the server's.
    #[arg(long)]
    pub kv: Vec<String>,
    /// Sampling temperature (each request its own seed): sampled text keeps
    /// a random-weight model off the special tokens that show no text.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "KVSIFT_API_KEY")]
    pub api_key: Option<String>,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// What one streamed request measured.
struct Sample {
    ttft: Duration,
    /// Gaps between consecutive text chunks.
    gaps: Vec<Duration>,
    tokens: u64,
    peak_kv_bytes: Option<u64>,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3600)))
        .build()
        .into()
}

fn post(
    a: &ureq::Agent,
    url: &str,
    key: Option<&str>,
    body: &Value,
) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
    let mut r = a.post(url);
    if let Some(k) = key {
        r = r.header("authorization", &format!("Bearer {k}"));
    }
    r.send_json(body)
        .map_err(|e| anyhow::anyhow!("POST {url}: {e}"))
}

/// A prompt of exactly `n` token ids, from the server's tokenizer.
fn prompt_ids(a: &ServeBenchArgs, n: usize) -> anyhow::Result<Vec<u64>> {
    let text = "The river ran past the old mill, and the miller counted the sacks of grain twice. "
        .repeat(n / 8 + 2);
    let url = format!("{}/tokenize", a.url);
    let mut r = post(
        &agent(),
        &url,
        a.api_key.as_deref(),
        &json!({"content": text}),
    )?;
    let body: Value = r.body_mut().read_json()?;
    let ids: Vec<u64> = body["tokens"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("{url}: no tokens in {body}"))?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    if ids.len() < n {
        anyhow::bail!("{url}: {} tokens, wanted {n}", ids.len());
    }
    Ok(ids[..n].to_vec())
}

/// One streamed completion.
fn one(a: &ServeBenchArgs, agent: &ureq::Agent, body: &Value) -> anyhow::Result<Sample> {
    let url = format!("{}/v1/completions", a.url);
    let start = Instant::now();
    let r = post(agent, &url, a.api_key.as_deref(), body)?;
    if r.status() != 200 {
        let status = r.status();
        let text = r.into_body().read_to_string().unwrap_or_default();
        anyhow::bail!("{url}: {status}: {text}");
    }
    let mut ttft = None;
    let mut last = start;
    let mut gaps = vec![];
    let mut tokens = 0;
    let mut peak_kv_bytes = None;
    for line in BufReader::new(r.into_body().into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data)?;
        if let Some(e) = chunk.get("error") {
            anyhow::bail!("{url}: {e}");
        }
        let now = Instant::now();
        let text = chunk["choices"][0]["text"].as_str().unwrap_or("");
        if !text.is_empty() {
            match ttft {
                None => ttft = Some(now - start),
                Some(_) => gaps.push(now - last),
            }
            last = now;
        }
        if let Some(p) = chunk["kvsift"]["peak_kv_bytes"].as_u64() {
            peak_kv_bytes = Some(p);
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            tokens = n;
        }
    }
    Ok(Sample {
        ttft: ttft.unwrap_or(last - start),
        gaps,
        tokens,
        peak_kv_bytes,
    })
}

/// The `q` quantile (nearest rank) of sorted milliseconds.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: &[Duration]) -> Vec<f64> {
    let mut v: Vec<f64> = d.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    v.sort_by(f64::total_cmp);
    v
}

pub fn run(a: &ServeBenchArgs) -> anyhow::Result<()> {
    if a.clients == 0 || a.requests == 0 || a.prompt_tokens == 0 || a.max_tokens == 0 {
        anyhow::bail!("--clients, --requests, --prompt-tokens and --max-tokens must be at least 1");
    }
    let kvs: Vec<Option<Value>> = if a.kv.is_empty() {
        vec![None]
    } else {
        a.kv.iter()
            .map(|k| match k.as_str() {
                "default" => Ok(None),
                k => serde_json::from_str(k)
                    .map(Some)
                    .map_err(|e| anyhow::anyhow!("--kv {k}: not JSON ({e})")),
            })
            .collect::<anyhow::Result<_>>()?
    };
    let prompt = prompt_ids(a, a.prompt_tokens)?;
    let mut rows = vec![];
    for kv in &kvs {
        let mut body = json!({
            "prompt": prompt, "max_tokens": a.max_tokens, "temperature": a.temperature,
            "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
        });
        if let Some(kv) = kv {
            body["kv"] = kv.clone();
        }
        let start = Instant::now();
        let results: Vec<anyhow::Result<Vec<Sample>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..a.clients)
                .map(|c| {
                    let body = &body;
                    scope.spawn(move || {
                        let agent = agent();
                        (0..a.requests)
                            .map(|r| {
                                let mut body = body.clone();
                                body["seed"] = json!(c * a.requests + r);
                                one(a, &agent, &body)
                            })
                            .collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a client thread panicked")))
                })
                .collect()
        });
        let wall = start.elapsed().as_secs_f64();
        let mut samples = vec![];
        for r in results {
            samples.extend(r?);
        }
        let tokens: u64 = samples.iter().map(|s| s.tokens).sum();
        let ttft = ms(&samples.iter().map(|s| s.ttft).collect::<Vec<_>>());
        let itl = ms(&samples
            .iter()
            .flat_map(|s| s.gaps.iter().copied())
            .collect::<Vec<_>>());
        let peaks: Vec<u64> = samples.iter().filter_map(|s| s.peak_kv_bytes).collect();
        rows.push(json!({
            "kv": kv.clone().unwrap_or(json!("default")),
            "clients": a.clients,
            "requests": samples.len(),
            "prompt_tokens": a.prompt_tokens,
            "max_tokens": a.max_tokens,
            "output_tokens": tokens,
            "seconds": wall,
            "requests_per_s": samples.len() as f64 / wall,
            "output_tok_per_s": tokens as f64 / wall,
            "ttft_ms_p50": quantile(&ttft, 0.5),
            "ttft_ms_p99": quantile(&ttft, 0.99),
            "itl_ms_p50": quantile(&itl, 0.5),
            "itl_ms_p99": quantile(&itl, 0.99),
            "peak_kv_bytes_mean": (!peaks.is_empty()).then(|| peaks.iter().sum::<u64>() as f64 / peaks.len() as f64),
        }));
    }
    if a.json {
        outln!("{}", json!({"url": a.url, "runs": rows}));
        return Ok(());
    }
    outln!(
        "{} clients x {} requests, {} prompt + {} output tokens each, against {}",
        a.clients,
        a.requests,
        a.prompt_tokens,
        a.max_tokens,
        a.url
    );
    outln!(
        "{:<40} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12}",
        "kv",
        "req/s",
        "out tok/s",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "peak KV/req"
    );
    for r in &rows {
        let kv = match &r["kv"] {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let peak = r["peak_kv_bytes_mean"]
            .as_f64()
            .map_or("-".into(), |b| format!("{:.1} KiB", b / 1024.0));
        outln!(
            "{:<40} {:>7.2} {:>9.1} {:>7.1}ms {:>7.1}ms {:>7.2}ms {:>7.2}ms {:>12}",
            kv,
            r["requests_per_s"].as_f64().unwrap_or(0.0),
            r["output_tok_per_s"].as_f64().unwrap_or(0.0),
            r["ttft_ms_p50"].as_f64().unwrap_or(f64::NAN),
            r["ttft_ms_p99"].as_f64().unwrap_or(f64::NAN),
            r["itl_ms_p50"].as_f64().unwrap_or(f64::NAN),
            r["itl_ms_p99"].as_f64().unwrap_or(f64::NAN),
            peak
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
