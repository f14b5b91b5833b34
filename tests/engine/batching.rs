//! Logits against the CPU reference and transformers, batches as if alone, pages reused, chained decode.

use super::*;

#[test]
fn paged_scores_match_the_cpu_reference() {
    let Some(ctx) = gpu() else { return };
    for name in ["tiny-llama", "tiny-qwen3", "tiny-mistral"] {
        let tokens = prompt(3, 90);
        let mut r = Reference::load(&dir(name), WeightDtype::F32).unwrap();
        let want: Vec<f32> = tokens.iter().flat_map(|&t| r.forward(t)).collect();
        let (want_prefill, want_decode) = (&want, &want);
        for (kv_f16, tol) in [(false, 1e-4f32), (true, 2e-2)] {
            let config = EngineConfig {
                prefill_chunk: 32,
                pool: PoolConfig {
                    kv_f16,
                    page_size: 16,
                    bytes: Some(8 << 20),
                },
                ..Default::default()
            };
            let mut e = engine(ctx, name, config);
            let got = e.score(&tokens, 90, true).unwrap().logits.unwrap();
            let d = max_diff(&got, want_prefill);
            eprintln!("{name} kv_f16={kv_f16} prefill: max |diff| {d:.2e}");
            assert!(
                d <= tol,
                "{name} kv_f16={kv_f16} prefill logits differ by {d}"
            );
            let got = e.score(&tokens, 7, true).unwrap().logits.unwrap();
            let d = max_diff(&got, want_decode);
            eprintln!("{name} kv_f16={kv_f16} decode: max |diff| {d:.2e}");
            assert!(
                d <= tol,
                "{name} kv_f16={kv_f16} decode logits differ by {d}"
            );
            assert_eq!(e.stats().pool.pages_in_use, 0, "scoring returns its pages");
        }
    }
}

#[test]
fn batched_sequences_generate_as_if_alone() {
    let Some(ctx) = gpu() else { return };
    let reqs: Vec<Request> = (0..6)
        .map(|i| greedy(prompt(i, 5 + 9 * i as usize), 12 + i as usize))
        .collect();
    let mut e = engine(
        ctx,
        "tiny-qwen2",
        EngineConfig {
            max_batch: 6,
            pool: small_pool(8),
            ..Default::default()
        },
    );
    let alone: Vec<Vec<u32>> = reqs
        .iter()
        .map(|r| run(&mut e, std::slice::from_ref(r)).0.remove(0))
        .collect();
    let (together, _) = run(&mut e, &reqs);
    assert_eq!(
        together, alone,
        "batched generation differs from sequences run alone"
    );
    // Also with sampling: each request keeps its own seed and draws.
    let sampled: Vec<Request> = reqs
        .iter()
        .enumerate()
        .map(|(i, r)| Request {
            sampling: SamplingParams {
                temperature: 0.9,
                top_p: 0.95,
                seed: i as u64,
                ..SamplingParams::greedy()
            },
            ..r.clone()
        })
        .collect();
    let alone: Vec<Vec<u32>> = sampled
        .iter()
        .map(|r| run(&mut e, std::slice::from_ref(r)).0.remove(0))
        .collect();
    let (together, _) = run(&mut e, &sampled);
    assert_eq!(
        together, alone,
        "batched sampling differs from sequences run alone"
    );
    assert_eq!(e.stats().pool.pages_in_use, 0);
}

/// Per request: the logits of each of its steps.
fn run_logits(e: &mut Engine, reqs: &[Request]) -> Vec<Vec<Vec<f32>>> {
    e.capture_logits(true);
    let ids: Vec<_> = reqs
        .iter()
        .map(|r| e.add_request(r.clone()).unwrap())
        .collect();
    let mut out: HashMap<u64, Vec<Vec<f32>>> = HashMap::new();
    while e.has_work() {
        for ev in e.step().unwrap() {
            if let Event::Logits { id, logits } = ev {
                out.entry(id).or_default().push(logits);
            }
        }
    }
    e.capture_logits(false);
    ids.iter().map(|id| out.remove(id).unwrap()).collect()
}

#[test]
fn batched_logits_equal_each_sequence_alone() {
    let Some(ctx) = gpu() else { return };
    let reqs: Vec<Request> = (0..5)
        .map(|i| greedy(prompt(10 + i, 3 + 11 * i as usize), 9))
        .collect();
    let mut e = engine(
        ctx,
        "tiny-llama",
        EngineConfig {
            max_batch: 5,
            pool: small_pool(8),
            ..Default::default()
        },
    );
    let together = run_logits(&mut e, &reqs);
    for (i, r) in reqs.iter().enumerate() {
        let alone = run_logits(&mut e, std::slice::from_ref(r)).remove(0);
        assert_eq!(alone.len(), together[i].len());
        for (step, (a, b)) in alone.iter().zip(&together[i]).enumerate() {
            // Batched projections run as matmul, alone as matvec: f32 sums in
            // another order, and a K/V value a hair apart may round to the
            // neighbouring f16 in the pool. Measured up to 1.4e-5; 1e-4 is
            // far below the logits' spread (~1).
            let d = max_diff(a, b);
            assert!(
                d <= 1e-4,
                "request {i} step {step}: batched logits differ by {d}"
            );
        }
    }
}

#[test]
fn engine_matches_transformers_goldens() {
    let Some(ctx) = gpu() else { return };
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"] {
        let bytes = std::fs::read(dir(name).join("golden.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let ids: Vec<u32> = st
            .tensor("prompt_ids")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u32)
            .collect();
        let want: Vec<f32> = st
            .tensor("logits")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let config = EngineConfig {
            prefill_chunk: 40,
            pool: PoolConfig {
                kv_f16: false,
                ..small_pool(8)
            },
            ..Default::default()
        };
        let mut e = engine(ctx, name, config);
        for prefill in [ids.len(), 1] {
            let got = e.score(&ids, prefill, true).unwrap().logits.unwrap();
            let d = max_diff(&got, &want);
            assert!(d <= 1e-4, "{name} prefill {prefill}: {d}");
        }
    }
}

#[test]
fn pages_return_to_the_pool_and_are_reused_across_fragmentation() {
    let Some(ctx) = gpu() else { return };
    let mut e = engine(
        ctx,
        "tiny-qwen2",
        EngineConfig {
            max_batch: 4,
            pool: PoolConfig {
                page_size: 4,
                ..small_pool(1)
            },
            ..Default::default()
        },
    );
    let reqs: Vec<Request> = (0..6)
        .map(|i| greedy(prompt(20 + i, 6 + 5 * i as usize), 10))
        .collect();
    let alone: Vec<Vec<u32>> = reqs
        .iter()
        .map(|r| run(&mut e, std::slice::from_ref(r)).0.remove(0))
        .collect();
    assert_eq!(e.stats().pool.pages_in_use, 0);

    // Four start; two are cancelled mid-way, scattering free pages between the
    // survivors'; two new ones then take those pages.
    let ids: Vec<_> = reqs[..4]
        .iter()
        .map(|r| e.add_request(r.clone()).unwrap())
        .collect();
    let mut got: HashMap<u64, Vec<u32>> = HashMap::new();
    let collect = |evs: Vec<Event>, got: &mut HashMap<u64, Vec<u32>>| {
        for ev in evs {
            if let Event::Token { id, token } = ev {
                got.entry(id).or_default().push(token);
            }
        }
    };
    for _ in 0..3 {
        let evs = e.step().unwrap();
        collect(evs, &mut got);
    }
    let in_use = e.stats().pool.pages_in_use;
    assert!(e.cancel(ids[0]) && e.cancel(ids[2]));
    assert!(
        e.stats().pool.pages_in_use < in_use,
        "cancelled sequences free their pages"
    );
    let late: Vec<_> = reqs[4..]
        .iter()
        .map(|r| e.add_request(r.clone()).unwrap())
        .collect();
    while e.has_work() {
        let evs = e.step().unwrap();
        collect(evs, &mut got);
    }
    assert_eq!(got[&ids[1]], alone[1], "a survivor");
    assert_eq!(got[&ids[3]], alone[3], "a survivor");
    assert_eq!(got[&late[0]], alone[4], "a late request on recycled pages");
    assert_eq!(got[&late[1]], alone[5], "a late request on recycled pages");
    let s = e.stats();
    assert_eq!(s.pool.pages_in_use, 0);
    assert!(s.peak_pages_in_use <= s.pool.pages_total);
}

/// Chained decode (several steps per submission, tokens fed back on the
/// GPU) produces exactly the events of one step per submission: greedy and
/// seeded sampling, a stop token and max-token limits inside a chain, the
/// context limit, requests waiting for admission, and R-KV's decode
/// schedule (chains end at each compression trigger).
#[test]
fn chained_decode_gives_the_events_of_single_steps() {
    let Some(ctx) = gpu() else { return };
    let mut rkv = CompressConfig::new(Method::Rkv, 24);
    rkv.buffer = 8;
    for compression in [CompressConfig::new(Method::None, 0), rkv] {
        let run_with = |chain: usize, reqs: &[Request]| {
            let mut e = engine(
                ctx,
                "tiny-llama",
                EngineConfig {
                    max_batch: 4,
                    max_context: Some(72),
                    pool: small_pool(8),
                    compression: compression.clone(),
                    decode_chain: chain,
                    ..Default::default()
                },
            );
            let (tokens, events) = run(&mut e, reqs);
            (tokens, events, e.take_decode_timing())
        };
        let mut reqs: Vec<Request> = (0..5)
            .map(|i| greedy(prompt(i, 5 + 7 * i as usize), 13 + 5 * i as usize))
            .collect();
        // Runs into the context (72) before its token limit (without compression).
        reqs[4].max_tokens = 100;
        reqs[2].sampling = SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            seed: 7,
            ..SamplingParams::greedy()
        };
        // A stop token the first request meets mid-chain.
        let (plain, _, _) = run_with(1, &reqs);
        reqs[0].stop_ids = vec![plain[0][6]];
        let (want_tokens, want, single) = run_with(1, &reqs);
        assert!(want_tokens[0].len() <= 7);
        // R-KV keeps the heads within the context: the positions run on.
        if compression.method == Method::None {
            assert!(want_tokens[4].len() < 100);
        } else {
            assert_eq!(want_tokens[4].len(), 100);
        }
        assert_eq!(single.submissions, single.steps);
        for chain in [2, 7] {
            let (_, got, chained) = run_with(chain, &reqs);
            assert_eq!(
                format!("{got:?}"),
                format!("{want:?}"),
                "chain {chain}, {:?}: events differ from single steps",
                compression.method
            );
            assert_eq!(chained.steps, single.steps, "chain {chain}");
            assert!(
                chained.submissions < chained.steps,
                "chain {chain}: {} submissions for {} steps",
                chained.submissions,
                chained.steps
            );
        }
    }
}
