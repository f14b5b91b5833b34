//! Chat completions: whole and streamed alike, n choices, reasoning content.

use serde_json::{Value, json};

use super::*;

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
