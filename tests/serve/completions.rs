//! Completions: the same tokens as `generate`, per-request `kv`, several
//! prompts and echo, logprobs.

use serde_json::{Value, json};

use super::*;

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
        // Per head: the layer's heads sum to the layer's slots.
        let heads = ext["kv_slots_per_head"].as_array().unwrap();
        for (layer, hs) in heads.iter().enumerate() {
            let sum: u64 = hs
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h.as_u64().unwrap())
                .sum();
            assert_eq!(ext["kv_slots_per_layer"][layer], sum, "kv {kv}");
        }
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
