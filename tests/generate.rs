//! The generation loop on a shipped model: GPU sampling against its CPU twin
//! on the model's real logits, seeds, stop tokens.

use std::path::PathBuf;

use kvsift::engine::{GenerateOptions, StopReason, generate};
use kvsift::model::{LoadOptions, Model, Readout};
use kvsift::ops::sample::{SamplingParams, mark_seen, sample_cpu, seen_words};
use kvsift::testing::gpu;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-qwen2")
}

const PROMPT: &[u32] = &[461, 363, 429, 86, 390, 89, 323, 419, 436];

#[test]
fn sampled_tokens_follow_the_twin_on_real_logits() {
    let Some(ctx) = gpu() else { return };
    let mut m = Model::load(ctx, &dir(), &LoadOptions::default()).unwrap();
    let v = m.cfg.vocab_size;
    let params = SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.9,
        min_p: 0.02,
        repetition_penalty: 1.2,
        seed: 11,
    };
    // The model's logits after the prompt, then the GPU's draw from the same state.
    let logits = m.forward(PROMPT, Readout::Logits).unwrap().logits.unwrap();
    let mut seen = vec![0u32; seen_words(v)];
    mark_seen(&mut seen, PROMPT);
    let mut agree = 0;
    for seed in 0..20u64 {
        let p = SamplingParams { seed, ..params };
        m.set_sampling(p).unwrap();
        m.reset();
        let got = m.forward(PROMPT, Readout::Sample).unwrap().token.unwrap();
        // The model drew u = the first uniform of Rng::new(seed).
        let u = kvsift::rng::Rng::new(seed).uniform();
        let want = sample_cpu(&logits, &seen, &p, u).expect("finite logits");
        agree += (got == want) as usize;
    }
    // Draws near a CDF boundary may round either way; on these logits all agree.
    assert!(
        agree >= 19,
        "GPU and twin agreed on {agree} of 20 seeded draws"
    );

    // Greedy through the sampler (penalty 1) equals plain argmax.
    m.set_sampling(SamplingParams::greedy()).unwrap();
    m.reset();
    let a = m.forward(PROMPT, Readout::Sample).unwrap().token.unwrap();
    m.reset();
    let b = m.forward(PROMPT, Readout::Argmax).unwrap().token.unwrap();
    assert_eq!(a, b);
}

#[test]
fn seeds_reproduce_and_differ_and_stop_tokens_stop() {
    let Some(ctx) = gpu() else { return };
    let mut m = Model::load(ctx, &dir(), &LoadOptions::default()).unwrap();
    let run = |m: &mut Model, seed, stop_ids: Vec<u32>| {
        let opts = GenerateOptions {
            max_tokens: 16,
            sampling: SamplingParams {
                temperature: 1.0,
                seed,
                ..SamplingParams::greedy()
            },
            stop_ids,
        };
        generate(m, PROMPT, &opts, |_| true).unwrap()
    };
    let a = run(&mut m, 1, vec![]);
    let b = run(&mut m, 1, vec![]);
    let c = run(&mut m, 2, vec![]);
    assert_eq!(a.tokens, b.tokens, "same seed, same tokens");
    assert_ne!(a.tokens, c.tokens, "different seeds, different tokens");
    assert_eq!(a.stop, StopReason::MaxTokens);
    assert_eq!(a.tokens.len(), 16);
    // Stopping at the 4th token when it is declared a stop token.
    let stop = a.tokens[3];
    let first = a.tokens.iter().position(|t| *t == stop).unwrap();
    let d = run(&mut m, 1, vec![stop]);
    assert_eq!(d.stop, StopReason::Eos);
    assert_eq!(d.tokens, a.tokens[..=first].to_vec());
}

/// Streamed text ends as the whole decode does: bytes held back for an
/// incomplete UTF-8 character at the end come out when the stream finishes.
#[test]
fn a_stream_ends_with_the_text_a_whole_decode_gives() {
    use kvsift::engine::TextStream;
    use kvsift::model::TextTokenizer;
    let tok = TextTokenizer::load(&dir()).unwrap();
    // "a€b" is byte tokens here: the euro sign's three bytes are three tokens.
    let ids = tok.encode("a\u{20ac}b \u{1F600}", false).unwrap();
    assert!(ids.len() >= 8, "{ids:?}");
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
