//! KV compression in the engine on real (tiny) models: the equivalence gate
//! (a budget that holds the whole sequence gives bit-identical logits to no
//! compression), the pool really shrinking to what the kept slots need,
//! compression changing what a long sequence sees, and bad settings.

use std::path::PathBuf;

use kvsift::engine::{Engine, EngineConfig, Event, Request};
use kvsift::gpu::{GpuContext, WeightDtype};
use kvsift::kv::compression::{CompressConfig, Method, SlotOrder};
use kvsift::kv::paged::PoolConfig;
use kvsift::model::llama::load_weights;
use kvsift::ops::sample::SamplingParams;
use kvsift::testing::gpu;

fn engine<'c>(ctx: &'c GpuContext, name: &str, compression: CompressConfig) -> Engine<'c> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name);
    let w = load_weights(ctx, &dir, WeightDtype::F32, false).unwrap();
    let config = EngineConfig {
        max_batch: 4,
        prefill_chunk: 16,
        pool: PoolConfig {
            bytes: Some(8 << 20),
            page_size: 8,
            kv_f16: true,
        },
        compression,
        ..Default::default()
    };
    Engine::new(ctx, w, config).unwrap()
}

fn tokens(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 7919 + seed * 104729) % 500)
        .collect()
}

/// Every method and schedule the engine runs, with budget `b`.
fn configs(b: usize) -> Vec<CompressConfig> {
    kvsift::testing::compression_configs(b, 8)
}

/// A budget equal to the prompt: every method's pass runs after the prefill
/// (scores, top-k keeping every slot) and the decode steps after it see
/// bit-identical logits to no compression. R-KV in the reference slot order
/// really compacts (its kept slots move into score order): attention over
/// the permuted slots is the same up to summation order.
#[test]
fn a_budget_that_holds_the_sequence_gives_bit_identical_logits() {
    let Some(ctx) = gpu() else { return };
    let seq = tokens(1, 40);
    let prompt = 33;
    let want = engine(ctx, "tiny-llama", CompressConfig::new(Method::None, 0))
        .score(&seq, prompt, true)
        .unwrap()
        .logits
        .unwrap();
    for cfg in configs(prompt) {
        let what = format!(
            "{:?} {:?} {:?} {:?}",
            cfg.method, cfg.schedule, cfg.granularity, cfg.slot_order
        );
        let reorders =
            cfg.method.policy().ranks_reference() && cfg.slot_order == SlotOrder::Reference;
        let mut e = engine(ctx, "tiny-llama", cfg);
        let got = e.score(&seq, prompt, true).unwrap().logits.unwrap();
        let stats = e.stats().compression.unwrap();
        assert!(stats.passes >= 1, "{what}: the pass did not run");
        assert_eq!(stats.slots_dropped, 0, "{what}: nothing to drop");
        if reorders {
            let d = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            eprintln!("{what}: max |diff| {d:.2e} after reordering");
            assert!(d < 1e-5, "{what}: logits differ by {d} after reordering");
        } else {
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{what}: logits differ from no compression");
        }
    }
}

#[test]
fn compression_changes_what_a_long_sequence_sees_and_drops_slots() {
    let Some(ctx) = gpu() else { return };
    let seq = tokens(2, 60);
    let want = engine(ctx, "tiny-llama", CompressConfig::new(Method::None, 0))
        .score(&seq, 30, true)
        .unwrap()
        .logits
        .unwrap();
    let v = want.len() / 60;
    for cfg in configs(20) {
        let what = format!("{:?} {:?}", cfg.method, cfg.schedule);
        let mut e = engine(ctx, "tiny-llama", cfg.clone());
        let got = e.score(&seq, 30, true).unwrap().logits.unwrap();
        // The prefill's own logits used the full prompt.
        assert!(
            got[..30 * v]
                .iter()
                .zip(&want[..30 * v])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: prefill logits changed"
        );
        let diff = got[30 * v..]
            .iter()
            .zip(&want[30 * v..])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff > 1e-4,
            "{what}: decode after compression to 20 of 30+ slots should differ (max diff {diff})"
        );
        let stats = e.stats().compression.unwrap();
        assert!(stats.slots_dropped > 0, "{what}: dropped nothing");
        assert!(
            stats.bytes_after_last < stats.bytes_before_last,
            "{what}: pool did not shrink"
        );
    }
}

/// Runs one request to the end; returns the pool pages in use after each step.
fn pages_during(e: &mut Engine, prompt: Vec<u32>, max_tokens: usize) -> Vec<(usize, usize)> {
    e.add_request(Request {
        prompt,
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
        compression: None,
        logprobs: None,
    })
    .unwrap();
    let mut seen = vec![];
    while e.has_work() {
        let events = e.step().unwrap();
        assert!(
            !events.iter().any(|ev| matches!(ev, Event::Failed { .. })),
            "{events:?}"
        );
        let s = e.stats();
        seen.push((s.pool.pages_in_use, s.slots_per_layer.iter().sum()));
    }
    seen
}

#[test]
fn the_pool_shrinks_to_what_the_kept_slots_need() {
    let Some(ctx) = gpu() else { return };
    // tiny-llama: 2 layers x 2 KV heads, pages of 8 slots.
    let mut full = engine(ctx, "tiny-llama", CompressConfig::new(Method::None, 0));
    let full_pages = pages_during(&mut full, tokens(3, 50), 60);
    let mut rkv = CompressConfig::new(Method::Rkv, 24);
    rkv.buffer = 16;
    let mut e = engine(ctx, "tiny-llama", rkv);
    let pages = pages_during(&mut e, tokens(3, 50), 60);
    for &(p, slots) in &pages {
        if slots > 0 {
            // Every head holds slots / 4 of them: exactly ceil(len / 8) pages each.
            assert_eq!(
                p,
                4 * (slots / 4).div_ceil(8),
                "pages {p} for {slots} slots"
            );
        }
    }
    let peak = pages.iter().map(|x| x.0).max().unwrap();
    let full_peak = full_pages.iter().map(|x| x.0).max().unwrap();
    eprintln!("peak pages: R-KV budget 24 {peak}, full cache {full_peak}");
    // Budget 24 + buffer 16 = at most 40 slots = 5 pages per head, vs 110 / 8 = 14.
    assert!(peak <= 4 * 5, "R-KV peak {peak} pages");
    assert!(full_peak >= 4 * 13, "full cache peak {full_peak} pages");
}

#[test]
fn bad_compression_settings_are_clear_errors() {
    let Some(ctx) = gpu() else { return };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llama");
    for (cfg, needle) in [
        (CompressConfig::new(Method::SnapKv, 8), "--budget"),
        (
            {
                let mut c = CompressConfig::new(Method::SnapKv, 32);
                c.kernel = 4;
                c
            },
            "--kernel",
        ),
        (
            {
                let mut c = CompressConfig::new(Method::Rkv, 32);
                c.lambda = -0.5;
                c
            },
            "--lambda",
        ),
    ] {
        let w = load_weights(ctx, &dir, WeightDtype::F32, false).unwrap();
        let err = Engine::new(
            ctx,
            w,
            EngineConfig {
                compression: cfg,
                ..Default::default()
            },
        )
        .err()
        .expect("rejected");
        assert!(err.to_string().contains(needle), "{err}");
    }
}
