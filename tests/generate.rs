//! Generation on a shipped model through the engine: GPU sampling against
//! its CPU twin on the model's real logits, seeds, stop tokens, streamed text.

use std::path::PathBuf;

use kvsift::engine::{Engine, EngineConfig, Event, Request, StopReason};
use kvsift::gpu::{GpuContext, WeightDtype};
use kvsift::model::llama::load_weights;
use kvsift::ops::sample::{SamplingParams, mark_seen, sample_cpu, seen_words};
use kvsift::testing::gpu;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-qwen2")
}

const PROMPT: &[u32] = &[461, 363, 429, 86, 390, 89, 323, 419, 436];

fn engine(ctx: &GpuContext) -> Engine<'_> {
    let w = load_weights(ctx, &dir(), WeightDtype::F16, false).unwrap();
    Engine::new(ctx, w, EngineConfig::default()).unwrap()
}

/// Runs one request alone: its tokens, why it stopped, and the logits of
/// its first token when captured.
fn run(e: &mut Engine, req: Request) -> (Vec<u32>, StopReason, Option<Vec<f32>>) {
    e.add_request(req).unwrap();
    let (mut tokens, mut stop, mut logits) = (vec![], None, None);
    while e.has_work() {
        for ev in e.step().unwrap() {
            match ev {
                Event::Token { token, .. } => tokens.push(token),
                Event::Finished { reason, .. } => stop = Some(reason),
                Event::Logits { logits: l, .. } if logits.is_none() => logits = Some(l),
                Event::Failed { error, .. } => panic!("{error}"),
                _ => {}
            }
        }
    }
    (tokens, stop.unwrap(), logits)
}

/// The GPU sampler draws exactly what its CPU twin draws from the same
/// logits (the model's real ones, read back with the token) and the same
/// uniform: every one of 20 seeded draws with every filter on.
#[test]
fn sampled_tokens_equal_the_twins_on_real_logits() {
    let Some(ctx) = gpu() else { return };
    let mut e = engine(ctx);
    e.capture_logits(true);
    let v = e.cfg.vocab_size;
    let params = SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.9,
        min_p: 0.02,
        repetition_penalty: 1.2,
        seed: 11,
    };
    let mut seen = vec![0u32; seen_words(v)];
    mark_seen(&mut seen, PROMPT);
    let mut drawn = std::collections::HashSet::new();
    for seed in 0..20u64 {
        let p = SamplingParams { seed, ..params };
        let req = Request {
            sampling: p,
            ..Request::greedy(PROMPT.to_vec(), 1)
        };
        let (tokens, _, logits) = run(&mut e, req);
        // The engine drew u = the first uniform of Rng::new(seed).
        let u = kvsift::rng::Rng::new(seed).uniform();
        let want = sample_cpu(&logits.unwrap(), &seen, &p, u).expect("finite logits");
        assert_eq!(tokens, [want], "seed {seed}");
        drawn.insert(want);
    }
    // The draws are real draws: more than one token came out.
    assert!(drawn.len() > 1, "{drawn:?}");

    // Greedy through the sampler equals the argmax of the logits.
    let (tokens, _, logits) = run(&mut e, Request::greedy(PROMPT.to_vec(), 1));
    let logits = logits.unwrap();
    let argmax = (0..v).fold(0, |b, i| if logits[i] > logits[b] { i } else { b });
    assert_eq!(tokens, [argmax as u32]);
}

#[test]
fn seeds_reproduce_and_differ_and_stop_tokens_stop() {
    let Some(ctx) = gpu() else { return };
    let mut e = engine(ctx);
    let mut go = |seed, stop_ids: Vec<u32>| {
        let req = Request {
            sampling: SamplingParams {
                temperature: 1.0,
                seed,
                ..SamplingParams::greedy()
            },
            stop_ids,
            ..Request::greedy(PROMPT.to_vec(), 16)
        };
        run(&mut e, req)
    };
    let a = go(1, vec![]);
    let b = go(1, vec![]);
    let c = go(2, vec![]);
    assert_eq!(a.0, b.0, "same seed, same tokens");
    assert_ne!(a.0, c.0, "different seeds, different tokens");
    assert_eq!(a.1, StopReason::MaxTokens);
    assert_eq!(a.0.len(), 16);
    // Stopping at the 4th token when it is declared a stop token.
    let stop = a.0[3];
    let first = a.0.iter().position(|t| *t == stop).unwrap();
    let d = go(1, vec![stop]);
    assert_eq!(d.1, StopReason::Eos);
    assert_eq!(d.0, a.0[..=first].to_vec());
}

/// Streamed text ends as the whole decode does: bytes held back for an
/// incomplete UTF-8 character at the end come out when the stream finishes.
#[test]
fn a_stream_ends_with_the_text_a_whole_decode_gives() {
    use kvsift::model::{TextStream, TextTokenizer};
    let tok = TextTokenizer::load(&dir()).unwrap();
    // "a€b" is byte tokens here: the euro sign's three bytes are three tokens.
    let ids = tok.encode("a\u{20ac}b \u{1F600}", false).unwrap();
    assert!(ids.len() >= 8, "{ids:?}");
    // A longer text through every shipped tokenizer (the stream decodes a
    // window of tokens, not the whole).
    let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    for name in ["tiny-qwen3", "tiny-mistral", "tiny-reasoner"] {
        let t = TextTokenizer::load(&models.join(name)).unwrap();
        let text = "the quiet grey cat, naïve \u{1F600} café\n\tsat on the mat ".repeat(4);
        let long = t.encode(&text, false).unwrap();
        let mut stream = TextStream::new(&t);
        let mut printed = String::new();
        for &id in &long {
            printed += &stream.push(id).unwrap();
        }
        printed += &stream.finish().unwrap();
        assert_eq!(printed, t.decode(&long, true).unwrap(), "{name}");
    }
    for cut in 1..=ids.len() {
        let mut stream = TextStream::new(&tok);
        let mut printed = String::new();
        for &id in &ids[..cut] {
            printed += &stream.push(id).unwrap();
        }
        printed += &stream.finish().unwrap();
        let whole = tok.decode(&ids[..cut], true).unwrap();
        assert_eq!(printed, whole, "after {cut} tokens");
    }
}
