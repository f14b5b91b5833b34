//! Bad requests, non-finite logits and GPU faults end requests cleanly.

use super::*;

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
