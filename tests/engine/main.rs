//! The paged, batched engine: the same logits as the CPU reference forward
//! (itself held to transformers by tests/golden.rs), batched sequences as if alone, page reuse, fragmentation,
//! pool exhaustion (swap and replay exact for every method), and failures
//! (non-finite logits, a GPU error at any point) that end requests cleanly,
//! and what a request reports (logprobs, its compression and peak KV).

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
        logprobs: None,
    }
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

fn events_of(events: &[Event], id: u64) -> Vec<&Event> {
    events.iter().filter(|e| e.id() == id).collect()
}

/// The full cache, then every method and schedule the engine runs
/// (window 4, budget `b`, decode-schedule buffer 8).
fn every_method(b: usize) -> Vec<CompressConfig> {
    let mut out = vec![CompressConfig::new(Method::None, 0)];
    out.extend(kvsift::testing::compression_configs(b, 4));
    out
}

mod batching;
mod compression;
mod exhaustion;
mod failures;
mod reports;
