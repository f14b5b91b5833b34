//! Seeded mutations of the shipped checkpoints and the files beside them
//! (bit flips, truncations, safetensors header edits, JSON field deletions
//! and type swaps, shard index edits), each loaded as `kvsift generate`
//! would: no case may panic or hang; each either fails with an error or
//! loads a model whose logits are finite (or whose non-finite logits the
//! runtime reports as an error). A watchdog turns a hang into a failure
//! naming the case. Some cases also run through the binary.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use kvsift::Error;
use kvsift::engine::{Engine, EngineConfig, Event, Request};
use kvsift::gpu::WeightDtype;
use kvsift::model::config::{GenerationDefaults, ModelConfig};
use kvsift::model::llama::load_weights;
use kvsift::model::{Message, TextTokenizer};
use kvsift::rng::Rng;
use kvsift::testing::gpu;
use serde_json::Value;

const MODELS: [&str; 5] = [
    "tiny-llama",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-mistral",
    "tiny-reasoner",
];
const FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];
/// Cases in the run (seeds 0..CASES); `KVSIFT_FUZZ_CASES` runs more (or
/// `KVSIFT_FUZZ_FROM` other seeds) for a deeper search.
const CASES: u64 = 1000;
/// Of them, those also run through the `kvsift` binary.
const CLI_CASES: u64 = 24;
/// Seeds past the run that once panicked (found by deeper runs), always run:
/// a post-processor naming a deleted special token (tokenizers panics in
/// encode).
const REGRESSIONS: [u64; 3] = [25793, 44212, 44889];

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")
}

/// Values that break assumptions about a JSON field.
fn evil_value(rng: &mut Rng) -> Value {
    let options: [Value; 18] = [
        Value::Null,
        true.into(),
        "x".into(),
        "".into(),
        (-1).into(),
        0.into(),
        1.into(),
        3.into(),
        (1u64 << 53).into(),
        u64::MAX.into(),
        i64::MIN.into(),
        1e308.into(),
        (-1e308).into(),
        0.5.into(),
        Value::Array(vec![]),
        serde_json::json!({}),
        serde_json::json!([1, "a", null]),
        "{% for i in range(99999) %}{% for j in range(99999) %}{{ i }}{% endfor %}{% endfor %}"
            .into(),
    ];
    options[rng.below(options.len())].clone()
}

/// One JSON edit at a random place: delete a key or element, swap a value
/// for an evil one, or nudge a number. Returns what it did.
fn mutate_json(v: &mut Value, rng: &mut Rng, depth: usize) -> String {
    let descend = depth < 6 && rng.below(3) > 0;
    match v {
        Value::Object(map) if !map.is_empty() => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = keys[rng.below(keys.len())].clone();
            let child_is_container = matches!(map[&key], Value::Object(_) | Value::Array(_));
            if descend && child_is_container {
                let inner = mutate_json(map.get_mut(&key).unwrap(), rng, depth + 1);
                return format!("{key}.{inner}");
            }
            match rng.below(4) {
                0 => {
                    map.remove(&key);
                    format!("{key}: deleted")
                }
                1 if map[&key].is_number() => {
                    let n = map[&key].as_f64().unwrap_or(0.0);
                    let new =
                        [n * 1e6, -n, n + 1.0, n * 0.5, f64::from(u32::MAX) + n][rng.below(5)];
                    map.insert(key.clone(), new.into());
                    format!("{key}: {n} -> {new}")
                }
                _ => {
                    let new = evil_value(rng);
                    let s = format!("{key}: -> {new}");
                    map.insert(key, new);
                    s
                }
            }
        }
        Value::Array(list) if !list.is_empty() => {
            let i = rng.below(list.len());
            if descend && matches!(list[i], Value::Object(_) | Value::Array(_)) {
                let inner = mutate_json(&mut list[i], rng, depth + 1);
                return format!("[{i}].{inner}");
            }
            if rng.below(2) == 0 {
                list.remove(i);
                format!("[{i}]: deleted")
            } else {
                list[i] = evil_value(rng);
                format!("[{i}]: -> {}", list[i])
            }
        }
        other => {
            *other = evil_value(rng);
            format!("-> {other}")
        }
    }
}

/// Raw byte damage: bit flips, a truncation, garbage, or a zeroed range.
fn mutate_bytes(bytes: &mut Vec<u8>, rng: &mut Rng, header_bias: bool) -> String {
    if bytes.is_empty() {
        bytes.extend_from_slice(b"\xff\xfe");
        return "garbage into an empty file".into();
    }
    // Most damage near the start (a safetensors header) when asked.
    let at = |rng: &mut Rng, len: usize| {
        if header_bias && rng.below(2) == 0 {
            rng.below(len.min(600))
        } else {
            rng.below(len)
        }
    };
    match rng.below(4) {
        0 => {
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let i = at(rng, bytes.len());
                bytes[i] ^= 1 << rng.below(8);
            }
            format!("{n} bit flips")
        }
        1 => {
            let len = at(rng, bytes.len());
            bytes.truncate(len);
            format!("truncated to {len} bytes")
        }
        2 => {
            let i = at(rng, bytes.len());
            let n = 1 + rng.below(64);
            let junk: Vec<u8> = (0..n).map(|_| rng.below(256) as u8).collect();
            bytes.splice(i..i, junk);
            format!("{n} random bytes inserted at {i}")
        }
        _ => {
            let i = at(rng, bytes.len());
            let n = (1 + rng.below(256)).min(bytes.len() - i);
            bytes[i..i + n].fill(0);
            format!("{n} bytes zeroed at {i}")
        }
    }
}

/// Edits the JSON header of a safetensors file (dtype, shape, offsets,
/// entries), or its 8-byte length.
fn mutate_safetensors_header(bytes: &mut Vec<u8>, rng: &mut Rng) -> String {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    if rng.below(6) == 0 {
        let n = n as u64;
        let new = [
            0,
            1,
            n.wrapping_add(1),
            n.wrapping_sub(1),
            u64::MAX,
            1 << 40,
        ][rng.below(6)];
        bytes[..8].copy_from_slice(&new.to_le_bytes());
        return format!("header length {n} -> {new}");
    }
    let parsed = bytes
        .get(8..8usize.saturating_add(n))
        .and_then(|h| serde_json::from_slice::<Value>(h).ok());
    let Some(mut header) = parsed else {
        // Already damaged by an earlier edit.
        return mutate_bytes(bytes, rng, true);
    };
    let what = mutate_json(&mut header, rng, 0);
    let text = header.to_string();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    *bytes = out;
    format!("header {what}")
}

/// Splits the checkpoint into two shards and an index, then damages the index or a shard.
fn mutate_sharded(dir: &Path, rng: &mut Rng) -> String {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let Ok(st) = safetensors::SafeTensors::deserialize(&bytes) else {
        return "not sharded (already damaged)".into();
    };
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let half = names.len() / 2;
    let mut map = serde_json::Map::new();
    for (part, chunk) in [&names[..half], &names[half..]].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", part + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = chunk
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in chunk.iter() {
            map.insert(n.clone(), file.clone().into());
        }
    }
    std::fs::remove_file(&path).unwrap();
    let mut index = serde_json::json!({"metadata": {"total_size": bytes.len()}, "weight_map": map});
    let what = match rng.below(4) {
        0 => {
            let shard = dir.join("model-00002-of-00002.safetensors");
            let mut b = std::fs::read(&shard).unwrap();
            let w = mutate_bytes(&mut b, rng, true);
            std::fs::write(&shard, b).unwrap();
            format!("shard 2: {w}")
        }
        1 => {
            std::fs::remove_file(dir.join("model-00001-of-00002.safetensors")).unwrap();
            "shard 1 missing".into()
        }
        _ => {
            let mut w = String::new();
            for _ in 0..1 + rng.below(2) {
                w += &mutate_json(&mut index, rng, 0);
                w += "; ";
            }
            format!("index {w}")
        }
    };
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    what
}

/// Builds case `seed`: a copy of a shipped model (unchanged files linked)
/// with one or two mutations. Returns its directory and what was done.
fn make_case(seed: u64, root: &Path) -> (PathBuf, String) {
    let mut rng = Rng::new(0xf022 + seed);
    let model = MODELS[rng.below(MODELS.len())];
    let src = models_dir().join(model);
    let dir = root.join(format!("case-{seed}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in FILES {
        if src.join(f).exists() {
            std::os::unix::fs::symlink(src.join(f), dir.join(f)).unwrap();
        }
    }
    let mut what = vec![model.to_string()];
    let edits = if rng.below(10) == 0 { 2 } else { 1 };
    for _ in 0..edits {
        let kind = rng.below(100);
        let file = match kind {
            0..25 => "model.safetensors",
            25..40 => "model.safetensors",
            40..62 => "config.json",
            62..72 => "tokenizer.json",
            72..84 => "tokenizer_config.json",
            84..94 => "index",
            _ => "generation_config.json",
        };
        if file == "index" {
            if dir.join("model.safetensors").exists() {
                // Materialise the link before splitting.
                let b = std::fs::read(dir.join("model.safetensors")).unwrap();
                std::fs::remove_file(dir.join("model.safetensors")).unwrap();
                std::fs::write(dir.join("model.safetensors"), b).unwrap();
                what.push(mutate_sharded(&dir, &mut rng));
            }
            continue;
        }
        let path = dir.join(file);
        let Ok(mut bytes) = std::fs::read(&path) else {
            continue;
        };
        let json_edit = file.ends_with(".json") && rng.below(4) > 0;
        let w = if file == "model.safetensors" && kind < 25 {
            mutate_bytes(&mut bytes, &mut rng, true)
        } else if file == "model.safetensors" {
            if bytes.len() < 8 {
                continue;
            }
            mutate_safetensors_header(&mut bytes, &mut rng)
        } else if json_edit {
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(mut v) => {
                    let w = mutate_json(&mut v, &mut rng, 0);
                    bytes = v.to_string().into_bytes();
                    w
                }
                Err(_) => mutate_bytes(&mut bytes, &mut rng, false),
            }
        } else {
            mutate_bytes(&mut bytes, &mut rng, false)
        };
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, bytes).unwrap();
        what.push(format!("{file}: {w}"));
    }
    (dir, what.join(" | "))
}

#[derive(Debug, PartialEq)]
enum Outcome {
    /// Refused with an error (the message).
    Refused(String),
    /// Loaded, finite logits.
    Ran,
    /// Loaded; its logits overflow, which generation reports as an error.
    NonFiniteReported,
}

/// Loads `dir` as `kvsift generate --chat` does and runs one forward.
fn load_and_run(dir: &Path) -> Result<Outcome, Error> {
    let ctx = gpu().expect("a GPU");
    ModelConfig::load(dir)?;
    let tokenizer = TextTokenizer::load(dir)?;
    let defaults = GenerationDefaults::load(dir)?;
    defaults.sampling.validate()?;
    let mut ids = tokenizer.encode("The cache", true)?;
    if tokenizer.has_chat_template() {
        let text = tokenizer.apply_chat_template(
            &[Message {
                role: "user".into(),
                content: "hi".into(),
            }],
            true,
        )?;
        ids = tokenizer.encode(&text, false)?;
    }
    tokenizer.decode(&ids, true)?;
    let weights = load_weights(ctx, dir, WeightDtype::F16, false)?;
    let config = EngineConfig {
        max_context: Some(64),
        max_batch: 1,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(ctx, weights, config)?;
    engine.capture_logits(true);
    let prompt: Vec<u32> = ids.into_iter().take(32).collect();
    if prompt.is_empty() {
        return Ok(Outcome::Refused("empty prompt".into()));
    }
    engine.add_request(Request::greedy(prompt, 2))?;
    let (mut logits, mut failed) = (None, None);
    while engine.has_work() {
        for ev in engine.step()? {
            match ev {
                Event::Logits { logits: l, .. } if logits.is_none() => logits = Some(l),
                Event::Failed { error, .. } => failed = Some(error),
                _ => {}
            }
        }
    }
    let finite = logits.is_some_and(|l| l.iter().all(|v| v.is_finite()));
    match failed {
        None if finite => Ok(Outcome::Ran),
        Some(e) if !finite && e.contains("NaN or infinity") => Ok(Outcome::NonFiniteReported),
        Some(e) if finite => Err(Error::invalid("request", e)),
        other => panic!("finite logits: {finite}, but the request ended with {other:?}"),
    }
}

/// Runs `kvsift generate --chat` on the case: an error or a completion, never a panic.
fn run_cli(dir: &Path) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvsift"))
        .args(["generate", "--model", dir.to_str().unwrap()])
        .args([
            "--prompt",
            "hello",
            "--max-tokens",
            "2",
            "--max-context",
            "64",
        ])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn mutated_checkpoints_load_or_fail_cleanly() {
    if gpu().is_none() {
        return;
    }
    let root = std::env::temp_dir().join(format!("kvsift-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    // The unchanged models load and run.
    for m in MODELS {
        assert_eq!(
            load_and_run(&models_dir().join(m)).map_err(|e| e.to_string()),
            Ok(Outcome::Ran),
            "{m}"
        );
    }
    // A hang is a failure that names its case.
    let (beat, watch) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut current = String::from("(start)");
        loop {
            match watch.recv_timeout(Duration::from_secs(60)) {
                Ok(case) => current = case,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    eprintln!("loader fuzz: case hung for 60 s: {current}");
                    std::process::abort();
                }
            }
        }
    });
    let mut panics = vec![];
    let (mut refused, mut ran, mut overflowed) = (0, 0, 0);
    let env = |k: &str, default: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (from, cases) = (env("KVSIFT_FUZZ_FROM", 0), env("KVSIFT_FUZZ_CASES", CASES));
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for seed in (from..from + cases).chain(REGRESSIONS) {
        let (dir, what) = make_case(seed, &root);
        let _ = beat.send(format!("seed {seed}: {what}"));
        let result = std::panic::catch_unwind(|| load_and_run(&dir));
        match result {
            Err(_) => panics.push(format!("seed {seed}: {what}")),
            Ok(Err(e)) => {
                refused += 1;
                let kind = format!("{e:?}");
                *reasons
                    .entry(kind.split([' ', '(', '{']).next().unwrap_or("").to_string())
                    .or_default() += 1;
            }
            Ok(Ok(Outcome::Refused(_))) => refused += 1,
            Ok(Ok(Outcome::Ran)) => ran += 1,
            Ok(Ok(Outcome::NonFiniteReported)) => overflowed += 1,
        }
        if (from..from + CLI_CASES).contains(&seed) {
            let (code, stderr) = run_cli(&dir);
            if !(code == 0 || code == 1) || stderr.contains("panicked") {
                panics.push(format!("seed {seed} (cli exit {code}): {what}\n{stderr}"));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    drop(beat);
    eprintln!(
        "loader fuzz: {cases} cases: {refused} refused {reasons:?}, {ran} ran with finite \
         logits, {overflowed} overflowed (reported)"
    );
    assert!(panics.is_empty(), "panics:\n{}", panics.join("\n"));
    // The mutations reach both outcomes.
    assert!(
        refused > cases / 4 && ran > cases / 10,
        "{refused} refused, {ran} ran"
    );
}
