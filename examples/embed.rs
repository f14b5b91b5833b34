//! kvsift in your own program: load a model, serve two requests with
//! different KV compression in one engine, and stream their text as the
//! tokens come.
//!
//!     cargo run --example embed [-- MODEL_DIR]
//!
//! MODEL_DIR is a Hugging Face checkpoint directory (default: the small
//! trained model in models/tiny-reasoner). Set WGPU_BACKEND=vulkan to pick
//! Vulkan (lavapipe on a machine without a GPU).

use std::io::Write;
use std::path::PathBuf;

use kvsift::engine::{Engine, Event, Request};
use kvsift::gpu::GpuContext;
use kvsift::kv::compression::{CompressConfig, Method};
use kvsift::model::{TextStream, TextTokenizer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-reasoner"));
    let ctx = GpuContext::from_env()?;
    let tokenizer = TextTokenizer::load(&dir)?;

    // The engine compresses with R-KV (decode schedule: every 16 tokens,
    // 40 slots per head kept), what the R-KV paper does for reasoning.
    let mut rkv = CompressConfig::new(Method::Rkv, 40);
    rkv.buffer = 16;
    let mut engine = Engine::builder(&ctx)
        .max_batch(2)
        .compression(rkv)
        .load(&dir)?;

    // The second request brings its own: SnapKV once after its prefill, 24 slots.
    let mut snapkv = CompressConfig::new(Method::SnapKv, 24);
    snapkv.schedule = kvsift::kv::compression::Schedule::Prefill;
    let prompts = [
        (
            "rkv",
            "values: ab=3 cd=5 ef=7\nlinks: ab>cd cd>ef\nquestion: ef?\n",
            None,
        ),
        (
            "snapkv",
            "in a the and grey the near cat birds cat quiet old to the mat\n",
            Some(snapkv),
        ),
    ];
    let mut streams = vec![];
    for (name, text, compression) in &prompts {
        let id = engine.add_request(Request {
            compression: compression.clone(),
            logprobs: None,
            ..Request::greedy(tokenizer.encode(text, true)?, 48)
        })?;
        streams.push((id, *name, TextStream::new(&tokenizer)));
    }

    let mut out = std::io::stdout().lock();
    while engine.has_work() {
        for event in engine.step()? {
            match event {
                Event::Token { id, token } => {
                    let (_, name, stream) = &mut streams[id as usize];
                    let text = stream.push(token)?;
                    if !text.is_empty() {
                        writeln!(out, "[{name}] {text:?}")?;
                    }
                }
                Event::Finished { id, reason } => {
                    let (_, name, stream) = &mut streams[id as usize];
                    let rest = stream.finish()?;
                    let slots: usize = engine.final_slots(id).unwrap_or_default().iter().sum();
                    writeln!(
                        out,
                        "[{name}] {rest:?} finished ({}), {slots} KV slots held at the end",
                        reason.as_str()
                    )?;
                }
                Event::Failed { id, error } => {
                    return Err(format!("request {id} failed: {error}").into());
                }
                Event::Preempted { .. } | Event::Logits { .. } | Event::Logprobs { .. } => {}
            }
        }
    }
    let stats = engine.stats();
    if let Some(c) = stats.compression {
        writeln!(
            out,
            "{} compression passes dropped {} slots; peak pool use {} pages",
            c.passes, c.slots_dropped, stats.peak_pages_in_use
        )?;
    }
    Ok(())
}
