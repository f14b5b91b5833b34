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

/// An engine that compresses nothing itself but records both window queries
/// and attention sums (as `kvsift serve` does with
/// `--record-attention-sums`) serves every method per request: each gets
/// the tokens it gets alone in an engine built with it.
#[test]
fn an_engine_recording_everything_serves_every_method_per_request() {
    let Some(ctx) = gpu() else { return };
    use kvsift::engine::compressor::Recording;
    let mut none = CompressConfig::new(Method::None, 0);
    none.window = 4;
    // The pool stores one head per KV head: query-head granularity needs
    // an engine built for it.
    let configs: Vec<CompressConfig> = kvsift::testing::compression_configs(16, 4)
        .into_iter()
        .filter(|c| c.granularity == kvsift::kv::compression::Granularity::KvHead)
        .collect();
    assert!(configs.iter().any(|c| c.method == Method::H2o));
    let reqs: Vec<Request> = configs
        .iter()
        .enumerate()
        .map(|(i, c)| Request {
            compression: Some(c.clone()),
            ..greedy(prompt(i as u32 + 3, 18 + 2 * i), 24)
        })
        .collect();
    let config = |compression: CompressConfig, recording| EngineConfig {
        max_batch: 8,
        compression,
        recording,
        ..Default::default()
    };
    let everything = Recording {
        window_queries: true,
        attention_sums: true,
    };
    let mut e = engine(ctx, "tiny-llama", config(none.clone(), everything));
    let (together, _) = run(&mut e, &reqs);
    for (i, r) in reqs.iter().enumerate() {
        let own = r.compression.clone().unwrap();
        let mut alone = engine(ctx, "tiny-llama", config(own.clone(), Recording::default()));
        let (tokens, _) = run(
            &mut alone,
            &[Request {
                compression: None,
                ..r.clone()
            }],
        );
        assert_eq!(together[i], tokens[0], "{own:?}");
    }
    // Recording only the queries: H2O v3 is refused, naming the flag.
    let mut queries = engine(
        ctx,
        "tiny-llama",
        config(
            none,
            Recording {
                window_queries: true,
                attention_sums: false,
            },
        ),
    );
    let h2o = configs.iter().find(|c| c.method == Method::H2o).unwrap();
    let err = queries
        .add_request(Request {
            compression: Some(h2o.clone()),
            ..greedy(prompt(1, 9), 3)
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("--record-attention-sums"), "{err}");
}
