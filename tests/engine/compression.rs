//! Compression in the engine: decode schedule past the context, per-request settings.

use super::*;

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
            logprobs: None,
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
            logprobs: None,
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
            logprobs: None,
            ..greedy(prompt(1, 9), 3)
        };
        let err = e.add_request(r).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // An engine built without compression records nothing to score from.
    let mut plain = engine(ctx, "tiny-llama", EngineConfig::default());
    let r = Request {
        compression: Some(base),
        logprobs: None,
        ..greedy(prompt(1, 9), 3)
    };
    let err = plain.add_request(r).unwrap_err().to_string();
    assert!(err.contains("without compression"), "{err}");
}
