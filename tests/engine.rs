//! The paged, batched engine: the same logits as the CPU reference forward
//! (itself held to transformers by tests/golden.rs), batched sequences as if alone, page reuse, fragmentation,
//! pool exhaustion (swap and replay exact for every method), and failures
//! (non-finite logits, a GPU error at any point) that end requests cleanly.

use std::collections::HashMap;
use std::path::PathBuf;

use kvsift::engine::{Engine, EngineConfig, Event, Exhaustion, Request, StopReason};
use kvsift::gpu::{GpuContext, WeightDtype};
use kvsift::kv::compression::{CompressConfig, Method, Schedule};
use kvsift::kv::paged::PoolConfig;
use kvsift::model::llama::load_weights;
use kvsift::model::reference::Reference;
use kvsift::ops::sample::SamplingParams;
use kvsift::testing::gpu;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name)
}

fn engine<'c>(ctx: &'c GpuContext, name: &str, config: EngineConfig) -> Engine<'c> {
    let w = load_weights(ctx, &dir(name), WeightDtype::F32, false).unwrap();
    Engine::new(ctx, w, config).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Tokens of a prompt made of the vocabulary (the tiny models' ids < 500).
fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 7919 + seed * 104729) % 500)
        .collect()
}

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

/// Runs requests to completion; returns each request's tokens and all events.
fn run(e: &mut Engine, reqs: &[Request]) -> (Vec<Vec<u32>>, Vec<Event>) {
    let ids: Vec<_> = reqs
        .iter()
        .map(|r| e.add_request(r.clone()).unwrap())
        .collect();
    let mut out: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut all = vec![];
    let mut guard = 0;
    while e.has_work() {
        for ev in e.step().unwrap() {
            if let Event::Token { id, token } = ev {
                out.entry(id).or_default().push(token);
            }
            all.push(ev);
        }
        guard += 1;
        assert!(guard < 10_000, "engine did not finish");
    }
    (
        ids.iter()
            .map(|id| out.remove(id).unwrap_or_default())
            .collect(),
        all,
    )
}

fn small_pool(mb: u64) -> PoolConfig {
    PoolConfig {
        bytes: Some(mb << 20),
        ..Default::default()
    }
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
        prompt,
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
        compression: None,
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

/// A pool of `pages` pages of 4 slots for tiny-qwen2 (1 KV head, f16, dim 32).
fn pool_of_pages(pages: u64) -> PoolConfig {
    let page_bytes = (2 * 4 * 16 + 4) * 4;
    PoolConfig {
        bytes: Some(pages * page_bytes),
        page_size: 4,
        kv_f16: true,
    }
}

#[test]
fn exhaustion_preempts_and_recomputes_or_rejects() {
    let Some(ctx) = gpu() else { return };
    // Each request ends at 10 + 20 = 30 slots: 8 pages per layer, 16 in all.
    let reqs: Vec<Request> = (0..3).map(|i| greedy(prompt(40 + i, 10), 20)).collect();
    let roomy = EngineConfig {
        max_batch: 3,
        pool: pool_of_pages(200),
        ..Default::default()
    };
    let mut e = engine(ctx, "tiny-qwen2", roomy);
    let alone: Vec<Vec<u32>> = reqs
        .iter()
        .map(|r| run(&mut e, std::slice::from_ref(r)).0.remove(0))
        .collect();

    // 30 pages hold all three prompts but not all three finished sequences.
    let tight = EngineConfig {
        max_batch: 3,
        pool: pool_of_pages(30),
        on_exhaustion: Exhaustion::Recompute,
        ..Default::default()
    };
    let mut e = engine(ctx, "tiny-qwen2", tight.clone());
    let (got, events) = run(&mut e, &reqs);
    assert_eq!(
        got, alone,
        "preempted sequences are recomputed to the same tokens"
    );
    assert!(
        events
            .iter()
            .any(|ev| matches!(ev, Event::Preempted { .. }))
    );
    assert!(e.stats().preemptions > 0);
    assert!(e.stats().peak_pages_in_use <= 30);
    assert_eq!(e.stats().pool.pages_in_use, 0);

    let mut e = engine(
        ctx,
        "tiny-qwen2",
        EngineConfig {
            on_exhaustion: Exhaustion::Reject,
            ..tight
        },
    );
    let (got, events) = run(&mut e, &reqs);
    let failed: Vec<&String> = events
        .iter()
        .filter_map(|ev| {
            if let Event::Failed { error, .. } = ev {
                Some(error)
            } else {
                None
            }
        })
        .collect();
    assert!(!failed.is_empty(), "a sequence that cannot grow fails");
    assert!(
        failed[0].contains("KV pool exhausted") && failed[0].contains("--kv-pool-mb"),
        "{}",
        failed[0]
    );
    // The ones that finished are correct; the failed one stopped early.
    let finished: Vec<_> = events
        .iter()
        .filter(|ev| {
            matches!(
                ev,
                Event::Finished {
                    reason: StopReason::MaxTokens,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(finished.len() + failed.len(), 3);
    for (g, a) in got.iter().zip(&alone) {
        assert_eq!(
            g[..],
            a[..g.len()],
            "tokens before a failure are the right ones"
        );
    }
    assert_eq!(e.stats().pool.pages_in_use, 0);

    // A prompt the whole pool cannot hold fails at once, clearly.
    let mut e = engine(
        ctx,
        "tiny-qwen2",
        EngineConfig {
            pool: pool_of_pages(8),
            ..Default::default()
        },
    );
    let (_, events) = run(&mut e, &[greedy(prompt(1, 40), 5)]);
    match &events[..] {
        [Event::Failed { error, .. }] => assert!(
            error.contains("KV pages") && error.contains("--kv-pool-mb"),
            "{error}"
        ),
        other => panic!("expected one failure, got {other:?}"),
    }
}

#[test]
fn bad_requests_and_settings_are_clear_errors() {
    let Some(ctx) = gpu() else { return };
    let mut e = engine(
        ctx,
        "tiny-qwen2",
        EngineConfig {
            pool: small_pool(1),
            max_context: Some(64),
            ..Default::default()
        },
    );
    let e1 = e.add_request(greedy(vec![], 3)).unwrap_err().to_string();
    assert!(e1.contains("empty"), "{e1}");
    let e2 = e
        .add_request(greedy(vec![1, 99999], 3))
        .unwrap_err()
        .to_string();
    assert!(e2.contains("99999"), "{e2}");
    let e3 = e
        .add_request(greedy(prompt(1, 64), 3))
        .unwrap_err()
        .to_string();
    assert!(e3.contains("64") && e3.contains("--max-context"), "{e3}");
    let w = load_weights(ctx, &dir("tiny-qwen2"), WeightDtype::F32, false).unwrap();
    let bad = Engine::new(
        ctx,
        w,
        EngineConfig {
            pool: PoolConfig {
                page_size: 0,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    assert!(bad.err().unwrap().to_string().contains("--page-size"));
    let w = load_weights(ctx, &dir("tiny-qwen2"), WeightDtype::F32, false).unwrap();
    let bad = Engine::new(
        ctx,
        w,
        EngineConfig {
            pool: PoolConfig {
                bytes: Some(100),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    assert!(bad.err().unwrap().to_string().contains("--kv-pool-mb"));
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

/// The full cache, then every method and schedule the engine runs
/// (window 4, budget `b`, decode-schedule buffer 8).
fn every_method(b: usize) -> Vec<CompressConfig> {
    let mut out = vec![CompressConfig::new(Method::None, 0)];
    out.extend(kvsift::testing::compression_configs(b, 4));
    out
}

fn events_of(events: &[Event], id: u64) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| match e {
            Event::Token { id: i, .. }
            | Event::Finished { id: i, .. }
            | Event::Preempted { id: i }
            | Event::Failed { id: i, .. }
            | Event::Logits { id: i, .. } => *i == id,
        })
        .collect()
}

/// Under a pool too small for every sequence at once, preempted sequences
/// (swapped to host memory, or replayed) resume with exactly the cache
/// they had: every request's tokens (greedy, and one seeded sampler) equal
/// its tokens alone, for every method and schedule.
#[test]
fn preemption_gives_each_request_its_tokens_alone_for_every_method() {
    let Some(ctx) = gpu() else { return };
    use kvsift::kv::compression::Schedule;
    // Prompts past the budget (compressed after the prefill, then growing
    // a slot per token), and short ones for the decode schedule (growing up
    // to budget + buffer and compressed every 8 tokens): either way the
    // sequences outgrow the pool after admission.
    // One request samples (seeded, with a repetition penalty): its draws
    // and its seen-token mask survive a preemption too.
    let sampled = |mut r: Request| {
        r.sampling = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            repetition_penalty: 1.3,
            seed: 11,
            ..SamplingParams::greedy()
        };
        r
    };
    let mut long: Vec<Request> = (0..4)
        .map(|i| greedy(prompt(60 + i, 10 + 4 * i as usize), 28))
        .collect();
    let mut short: Vec<Request> = (0..4)
        .map(|i| greedy(prompt(60 + i, 2 + i as usize), 40))
        .collect();
    long[3] = sampled(long[3].clone());
    short[3] = sampled(short[3].clone());
    for compression in every_method(12) {
        let decode_time =
            compression.method != Method::None && compression.schedule == Schedule::Decode;
        let reqs = if decode_time { &short } else { &long };
        let what = format!("{:?} {:?}", compression.method, compression.schedule);
        let config = |pages: u64, on_exhaustion| EngineConfig {
            max_batch: 4,
            pool: pool_of_pages(pages),
            on_exhaustion,
            compression: compression.clone(),
            ..Default::default()
        };
        let mut roomy = engine(ctx, "tiny-qwen2", config(400, Exhaustion::Reject));
        let mut peaks = vec![];
        let alone: Vec<Vec<u32>> = reqs
            .iter()
            .map(|r| {
                let mut e = engine(ctx, "tiny-qwen2", config(400, Exhaustion::Reject));
                let tokens = run(&mut e, std::slice::from_ref(r)).0.remove(0);
                peaks.push(e.stats().peak_pages_in_use as u64);
                tokens
            })
            .collect();
        // The same requests together, in a roomy pool: batching alone changes nothing.
        assert_eq!(run(&mut roomy, reqs).0, alone, "{what}: batched");
        // Room for the largest sequence and about half of the others.
        let biggest = *peaks.iter().max().unwrap();
        let pages = biggest + (peaks.iter().sum::<u64>() - biggest) / 2;
        for mode in [Exhaustion::Swap, Exhaustion::Recompute] {
            let mut e = engine(ctx, "tiny-qwen2", config(pages, mode));
            let (got, events) = run(&mut e, reqs);
            let stats = e.stats();
            assert!(
                stats.preemptions > 0,
                "{what} {mode:?}: no preemption in {pages} pages (peaks {peaks:?})"
            );
            assert!(
                !events.iter().any(|ev| matches!(ev, Event::Failed { .. })),
                "{what} {mode:?}: {events:?}"
            );
            assert_eq!(got, alone, "{what} {mode:?}: preempted requests differ");
            assert_eq!(stats.pool.pages_in_use, 0, "{what} {mode:?}");
            assert_eq!(stats.swapped_bytes, 0, "{what} {mode:?}");
            assert!(stats.peak_pages_in_use as u64 <= pages);
        }
    }
}

#[test]
fn zero_max_tokens_finishes_at_once_without_tokens() {
    let Some(ctx) = gpu() else { return };
    let mut e = engine(ctx, "tiny-llama", EngineConfig::default());
    let (tokens, events) = run(&mut e, &[greedy(prompt(3, 9), 0), greedy(prompt(4, 5), 2)]);
    assert_eq!(tokens[0], Vec::<u32>::new());
    assert_eq!(tokens[1].len(), 2);
    assert!(matches!(
        events_of(&events, 0)[..],
        [Event::Finished {
            reason: StopReason::MaxTokens,
            ..
        }]
    ));
    assert_eq!(e.stats().pool.pages_in_use, 0);
}

/// A copy of tiny-llama whose final norm weight is finite but so large that
/// the logits overflow to infinity (loadable with f32 weights only).
pub fn overflowing_model(tag: &str) -> PathBuf {
    let src = dir("tiny-llama");
    let dst = std::env::temp_dir().join(format!("kvsift-overflow-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let p = f.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    kvsift::testing::rewrite_safetensors(&dst.join("model.safetensors"), |name, dtype, _, data| {
        if name == "model.norm.weight" {
            *dtype = safetensors::Dtype::F32;
            *data = (0..data.len() / 4)
                .flat_map(|_| 3e38f32.to_le_bytes())
                .collect();
        }
    });
    dst
}

/// Logits that overflow fail the request with a clear error, never a token
/// outside the vocabulary; other requests are unaffected.
#[test]
fn non_finite_logits_fail_the_request_not_the_engine() {
    let Some(ctx) = gpu() else { return };
    let bad = overflowing_model("engine");
    let w = load_weights(ctx, &bad, WeightDtype::F32, false).unwrap();
    for chain in [1, 4] {
        for sampling in [
            SamplingParams::greedy(),
            SamplingParams {
                temperature: 0.8,
                top_k: 5,
                ..SamplingParams::greedy()
            },
        ] {
            let w = load_weights(ctx, &bad, WeightDtype::F32, false).unwrap();
            let mut e = Engine::new(
                ctx,
                w,
                EngineConfig {
                    decode_chain: chain,
                    ..Default::default()
                },
            )
            .unwrap();
            let r = Request {
                sampling,
                ..greedy(prompt(5, 7), 6)
            };
            let (tokens, events) = run(&mut e, &[r]);
            assert!(tokens[0].is_empty(), "{tokens:?}");
            match &events[..] {
                [Event::Failed { error, .. }] => {
                    assert!(error.contains("NaN or infinity"), "{error}")
                }
                other => panic!("expected one failure, got {other:?}"),
            }
            assert_eq!(e.stats().pool.pages_in_use, 0);
        }
    }
    drop(w);
}

/// Requests after `n` GPU calls of a run: for every fault point, each
/// request either ends as it does without faults or fails with an event,
/// the pool returns to zero pages, and the engine then serves the same
/// requests correctly.
#[test]
fn a_gpu_fault_at_any_point_fails_requests_cleanly_and_the_engine_goes_on() {
    if gpu().is_none() {
        return;
    }
    // Its own device: faults must not reach tests running beside it.
    let ctx = GpuContext::from_env().unwrap();
    let mut rkv = CompressConfig::new(Method::Rkv, 12);
    rkv.window = 4;
    rkv.buffer = 8;
    let reqs: Vec<Request> = (0..3)
        .map(|i| greedy(prompt(80 + i, 9 + 5 * i as usize), 20))
        .collect();
    for (mode, compression, pages) in [
        (Exhaustion::Swap, rkv.clone(), 26),
        (Exhaustion::Recompute, rkv, 26),
        (Exhaustion::Swap, CompressConfig::new(Method::None, 0), 30),
    ] {
        let mut e = engine(
            &ctx,
            "tiny-qwen2",
            EngineConfig {
                max_batch: 3,
                pool: pool_of_pages(pages),
                on_exhaustion: mode,
                compression,
                ..Default::default()
            },
        );
        let before = ctx.gpu_calls();
        let (want, events) = run(&mut e, &reqs);
        let calls = ctx.gpu_calls() - before;
        assert!(
            events
                .iter()
                .any(|ev| matches!(ev, Event::Preempted { .. })),
            "{mode:?}: the run should preempt"
        );
        // Every early call, then points spread over the rest.
        let mut points: Vec<u64> = (1..=12.min(calls)).collect();
        points.extend((1..=30).map(|k| 12 + k * calls.saturating_sub(12) / 30));
        points.dedup();
        let mut failing_points = 0;
        for (i, &n) in points.iter().enumerate() {
            let sticky = i % 5 == 4;
            ctx.inject_fault(n, sticky);
            let ids: Vec<u64> = reqs
                .iter()
                .map(|r| e.add_request(r.clone()).unwrap())
                .collect();
            let mut got: HashMap<u64, Vec<u32>> = HashMap::new();
            let mut ended: HashMap<u64, bool> = HashMap::new();
            let mut guard = 0;
            while e.has_work() {
                for ev in e.step().unwrap() {
                    match ev {
                        Event::Token { id, token } => got.entry(id).or_default().push(token),
                        Event::Finished { id, .. } => {
                            ended.insert(id, true);
                        }
                        Event::Failed { id, .. } => {
                            ended.insert(id, false);
                        }
                        _ => {}
                    }
                }
                guard += 1;
                assert!(guard < 1000, "fault at {n}: the engine did not finish");
            }
            ctx.clear_faults();
            failing_points += ended.values().any(|ok| !ok) as usize;
            for (k, id) in ids.iter().enumerate() {
                let tokens = got.remove(id).unwrap_or_default();
                match ended.get(id) {
                    Some(true) => assert_eq!(tokens, want[k], "fault at {n}: request {k}"),
                    Some(false) => assert_eq!(
                        tokens[..],
                        want[k][..tokens.len()],
                        "fault at {n}: request {k} before its failure"
                    ),
                    None => panic!("fault at {n}: request {k} neither finished nor failed"),
                }
            }
            let s = e.stats();
            assert_eq!(s.pool.pages_in_use, 0, "fault at {n} ({mode:?})");
            assert_eq!((s.running, s.waiting, s.swapped_bytes), (0, 0, 0));
        }
        eprintln!(
            "{mode:?}: {calls} GPU calls, {} fault points, {failing_points} failed a request",
            points.len()
        );
        // A fault in a call the run needs fails a request; a few points may
        // fall on calls that only build plans that are retried.
        assert!(
            failing_points * 2 > points.len(),
            "{mode:?}: only {failing_points} of {} faults reached a request",
            points.len()
        );
        assert_eq!(run(&mut e, &reqs).0, want, "{mode:?}: after the faults");
    }
}

/// `--max-context` bounds a head's slots. Without compression (or with a
/// prefill-schedule method, whose decode tokens accumulate) a sequence
/// stops when its heads are full; under a decode-schedule method its heads
/// stay within budget + buffer while its positions run past the context.
#[test]
fn decode_schedule_compression_runs_past_the_context_with_bounded_slots() {
    let Some(ctx) = gpu() else { return };
    use kvsift::kv::compression::Schedule;
    let mut rkv = CompressConfig::new(Method::Rkv, 16);
    rkv.buffer = 8;
    let mut snap_prefill = CompressConfig::new(Method::SnapKv, 16);
    snap_prefill.schedule = Schedule::Prefill;
    for (compression, runs_on) in [
        (CompressConfig::new(Method::None, 0), false),
        (snap_prefill, false),
        (rkv, true),
    ] {
        let mut e = engine(
            ctx,
            "tiny-llama",
            EngineConfig {
                max_context: Some(48),
                compression: compression.clone(),
                ..Default::default()
            },
        );
        let (tokens, events) = run(&mut e, &[greedy(prompt(9, 20), 150)]);
        let slots = e.final_slots(0).unwrap().to_vec();
        let what = format!("{:?}", compression.method);
        if runs_on {
            assert_eq!(tokens[0].len(), 150, "{what}");
            // 2 KV heads per layer: at most budget + buffer slots each.
            assert!(
                slots.iter().all(|&s| s <= 2 * (16 + 8)),
                "{what}: {slots:?}"
            );
        } else {
            assert_eq!(
                events.last(),
                Some(&Event::Finished {
                    id: 0,
                    reason: StopReason::Context
                }),
                "{what}"
            );
            assert!(tokens[0].len() < 150, "{what}");
        }
    }
}

/// Requests with their own compression in one engine: each gets the tokens
/// it gets alone in an engine built with its settings; settings the engine
/// cannot run (another window, granularity, or what the forward records)
/// are errors at `add_request`.
#[test]
fn requests_with_their_own_compression_generate_as_alone() {
    let Some(ctx) = gpu() else { return };
    let with = |method, budget, f: &dyn Fn(&mut CompressConfig)| {
        let mut c = CompressConfig::new(method, budget);
        c.window = 4;
        c.buffer = 8;
        f(&mut c);
        c
    };
    let base = with(Method::Rkv, 24, &|_| {});
    let own = [
        None,
        Some(with(Method::SnapKv, 16, &|c| {
            c.schedule = Schedule::Prefill
        })),
        Some(with(Method::KNorm, 20, &|c| c.schedule = Schedule::Decode)),
        Some(with(Method::StreamingLlm, 12, &|_| {})),
        Some(CompressConfig::new(Method::None, 0)),
    ];
    let reqs: Vec<Request> = own
        .iter()
        .enumerate()
        .map(|(i, c)| Request {
            compression: c.clone(),
            ..greedy(prompt(i as u32 + 1, 20 + 3 * i), 30)
        })
        .collect();
    let config = |compression| EngineConfig {
        max_batch: 8,
        prefill_chunk: 16,
        compression,
        ..Default::default()
    };
    let mut e = engine(ctx, "tiny-llama", config(base.clone()));
    let (together, _) = run(&mut e, &reqs);
    for (i, r) in reqs.iter().enumerate() {
        let alone_cfg = r.compression.clone().unwrap_or(base.clone());
        let mut alone = engine(ctx, "tiny-llama", config(alone_cfg));
        let single = Request {
            compression: None,
            ..r.clone()
        };
        let (tokens, _) = run(&mut alone, &[single]);
        assert_eq!(together[i], tokens[0], "request {i} ({:?})", own[i]);
    }
    assert!(e.stats().compression.unwrap().passes > 0);

    for (bad, needle) in [
        (with(Method::SnapKv, 16, &|c| c.window = 8), "window"),
        (
            with(Method::SnapKv, 16, &|c| {
                c.granularity = kvsift::kv::compression::Granularity::QueryHead
            }),
            "granularity",
        ),
        (with(Method::H2o, 16, &|_| {}), "AttentionSums"),
        (with(Method::SnapKv, 4, &|_| {}), "--budget"),
    ] {
        let r = Request {
            compression: Some(bad),
            ..greedy(prompt(1, 9), 3)
        };
        let err = e.add_request(r).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // An engine built without compression records nothing to score from.
    let mut plain = engine(ctx, "tiny-llama", EngineConfig::default());
    let r = Request {
        compression: Some(base),
        ..greedy(prompt(1, 9), 3)
    };
    let err = plain.add_request(r).unwrap_err().to_string();
    assert!(err.contains("without compression"), "{err}");
}
