//! A full pool: swap, recompute and reject, exact for every method.

use super::*;

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
        let reports = |e: &Engine| -> Vec<_> {
            (0..reqs.len() as u64)
                .map(|id| e.report(id).cloned())
                .collect()
        };
        let unpreempted = reports(&roomy);
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
            // Each request's report (slots, passes, drops, peak) counts its
            // cache's history once, however often it was swapped or replayed.
            assert_eq!(reports(&e), unpreempted, "{what} {mode:?}: reports differ");
            assert_eq!(stats.pool.pages_in_use, 0, "{what} {mode:?}");
            assert_eq!(stats.swapped_bytes, 0, "{what} {mode:?}");
            assert!(stats.peak_pages_in_use as u64 <= pages);
        }
    }
}
