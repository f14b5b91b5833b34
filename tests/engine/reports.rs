//! What a request reports: logprobs of its tokens, and what compression
//! did to its cache (passes, slots dropped, peak KV).

use super::*;

/// log-softmax of one row, in f64, written here apart from the engine's.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row
        .iter()
        .map(|&x| x as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let lse = max
        + row
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// A request asking for logprobs gets, before each token, that token's
/// log-probability and the most likely alternatives: the log-softmax of the
/// logits it was drawn from (captured by a second run). Its neighbour in the
/// batch, which did not ask, gets none, and both get the tokens they get
/// without logprobs (the engine then steps singly, not in chains).
#[test]
fn logprobs_are_the_log_softmax_of_the_logits_each_token_came_from() {
    let Some(ctx) = gpu() else { return };
    let config = EngineConfig {
        max_batch: 4,
        pool: small_pool(8),
        decode_chain: 4,
        ..Default::default()
    };
    let mut sampled = greedy(prompt(3, 9), 12);
    sampled.sampling = SamplingParams {
        temperature: 0.8,
        seed: 11,
        ..SamplingParams::greedy()
    };
    let plain = [greedy(prompt(1, 6), 10), sampled];
    let mut asking = plain.clone();
    asking[1].logprobs = Some(3);
    let (want, _) = run(&mut engine(ctx, "tiny-llama", config.clone()), &plain);
    let mut e = engine(ctx, "tiny-llama", config);
    e.capture_logits(true);
    let (got, events) = run(&mut e, &asking);
    assert_eq!(got, want, "logprobs change no token");
    assert!(
        !events_of(&events, 0)
            .iter()
            .any(|e| matches!(e, Event::Logprobs { .. }))
    );
    let mine = events_of(&events, 1);
    let mut checked = 0;
    for (i, ev) in mine.iter().enumerate() {
        let Event::Logprobs { logprobs, .. } = ev else {
            continue;
        };
        // Then the logits it came from, then the token.
        let Event::Logits { logits, .. } = mine[i + 1] else {
            panic!("{:?}", mine[i + 1])
        };
        let Event::Token { token, .. } = mine[i + 2] else {
            panic!("{:?}", mine[i + 2])
        };
        assert_eq!(logprobs.token, *token);
        let want = log_softmax(logits);
        assert!((logprobs.logprob as f64 - want[*token as usize]).abs() < 1e-5);
        let mut order: Vec<usize> = (0..want.len()).collect();
        order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
        assert_eq!(logprobs.top.len(), 3);
        for (&(id, lp), &best) in logprobs.top.iter().zip(&order) {
            assert_eq!(id as usize, best);
            assert!((lp as f64 - want[best]).abs() < 1e-5);
        }
        checked += 1;
    }
    assert_eq!(checked, got[1].len(), "one Logprobs event per token");
    let mut too_many = greedy(prompt(1, 4), 2);
    too_many.logprobs = Some(21);
    assert!(
        e.add_request(too_many)
            .unwrap_err()
            .to_string()
            .contains("at most 20")
    );
}

/// Each request's report counts its own passes and dropped slots (together
/// the engine's totals), its slots at the end, and the most KV it held: the
/// pages before its first pass, more than it keeps.
#[test]
fn reports_count_each_requests_passes_dropped_slots_and_peak_kv() {
    let Some(ctx) = gpu() else { return };
    let mut rkv = CompressConfig::new(Method::Rkv, 16);
    rkv.buffer = 8;
    let mut e = engine(
        ctx,
        "tiny-llama",
        EngineConfig {
            max_batch: 4,
            pool: small_pool(8),
            compression: rkv,
            ..Default::default()
        },
    );
    let reqs = [greedy(prompt(2, 40), 30), greedy(prompt(5, 8), 6)];
    run(&mut e, &reqs);
    let stats = e.stats().compression.unwrap();
    let (long, short) = (e.report(0).unwrap().clone(), e.report(1).unwrap().clone());
    // The long prompt is compressed after prefill and then every 8 tokens.
    assert!(long.compression_passes >= 4, "{long:?}");
    assert_eq!(
        short.slots_dropped, 0,
        "8 + 6 tokens stay under 16: {short:?}"
    );
    assert_eq!(
        long.compression_passes + short.compression_passes,
        stats.passes
    );
    assert_eq!(
        long.slots_dropped + short.slots_dropped,
        stats.slots_dropped
    );
    assert!(long.slots_dropped > 0);
    // Its peak: 40 prompt slots in every head before the first pass.
    let at_prompt = e.kv_bytes_for_slots(40);
    assert_eq!(long.peak_kv_bytes, at_prompt, "{long:?}");
    assert!(long.peak_kv_bytes > e.kv_bytes_for_slots(long.slots_per_layer[0] / 2));
    assert_eq!(short.peak_kv_bytes, e.kv_bytes_for_slots(8 + 6 - 1));
    assert_eq!(e.final_slots(1), Some(&short.slots_per_layer[..]));
    assert!(e.take_report(0).is_some() && e.report(0).is_none());
}
