//! One compression pass against one decode step, per layer, at T slots per
//! head (Llama-3-8B's attention shape: 8 KV heads, 32 query heads, head dim
//! 128, f16 slots):
//!
//!     WGPU_BACKEND=vulkan cargo bench --bench compression [-- T ... [--profile]]
//!
//! - decode: one token's KV store + paged decode attention over T slots;
//! - snapkv / rkv: the layer's whole pass (window scores, R-KV redundancy,
//!   radix top-k to the budget, compaction of the kept slots).
//!
//! `--profile` also prints each pass's time per kernel (GPU timestamps where
//! the adapter has them, else each kernel submitted alone and timed on the
//! host). Wall time of submit-to-idle, median of the runs (the GPU idles between
//! them, so short kernels include a launch latency). `amortised` divides the
//! pass by `buffer` (128) decode steps, the R-KV schedule's period: the
//! fraction of decode attention time compression adds. Sizes default to
//! T = 1k, 4k, 16k, 32k on a GPU and 1k, 4k on a CPU adapter with 2 KV heads
//! (lavapipe runs R-KV's T^2 redundancy at a few GFLOP/s).

use std::time::Instant;

use kvsift::gpu::{Dispatch, GpuBuffer, GpuContext, Op};
use kvsift::kv::compression::gpu::{ScratchPool, select_layer};
use kvsift::kv::compression::{Captured, CompressConfig, Method};
use kvsift::ops::compress;
use kvsift::ops::paged_attention::{QkvRows, paged_decode, paged_kv_store, partials_len};
use kvsift::testing::{Rng, gpu};

fn median_ms(ctx: &GpuContext, ds: &[&Dispatch], runs: usize) -> f64 {
    ctx.run("warmup", ds).unwrap();
    ctx.wait_idle().unwrap();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            ctx.run("bench", ds).unwrap();
            ctx.wait_idle().unwrap();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

fn main() {
    let Some(ctx) = gpu() else { return };
    let cpu = ctx.adapter_summary.device_type == wgpu::DeviceType::Cpu;
    let args: Vec<usize> = std::env::args().filter_map(|a| a.parse().ok()).collect();
    let profile = std::env::args().any(|a| a == "--profile");
    let timing = if ctx.caps.features.timestamps {
        "GPU timestamps"
    } else {
        "host time, each kernel submitted alone"
    };
    let sizes = if !args.is_empty() {
        args
    } else if cpu {
        vec![1024, 4096]
    } else {
        vec![1024, 4096, 16384, 32768]
    };
    let (hkv, g, d, w, buffer) = (if cpu { 2 } else { 8 }, 4usize, 128usize, 8usize, 128usize);
    let hq = hkv * g;
    println!(
        "adapter: {} ({hkv} KV heads, {hq} query heads, head dim {d}, f16 slots, window {w})",
        ctx.adapter_summary.name
    );
    println!(
        "{:>7} {:>11} {:>10} {:>10} {:>14} {:>14}",
        "T", "decode ms", "snapkv ms", "rkv ms", "snapkv amort.", "rkv amort."
    );
    let mut rng = Rng::new(1);
    for &t in &sizes {
        let keys = rng.normals(hkv * t * d);
        let queries = rng.normals(hq * w * d);
        let x = Captured {
            keys: &keys,
            queries: &queries,
            hkv,
            hq,
            t,
            q_rows: w,
            d,
        };
        let budget = t / 10;
        let mut pass_ms = vec![];
        let mut decode_ms = 0.0;
        for method in [Method::SnapKv, Method::Rkv] {
            let cfg = CompressConfig::new(method, budget);
            let sp = ScratchPool::upload(ctx, &x, cfg.heads_per_kv(g), true, None, t, 1).unwrap();
            let job = sp.job(&x, 0, 1);
            let keep = select_layer(ctx, &cfg, &job, &sp.bufs, &mut vec![])
                .unwrap()
                .unwrap();
            let mut ds: Vec<Dispatch> = keep.dispatches.clone();
            ds.extend(
                compress::compact(
                    ctx,
                    &job.kv,
                    w,
                    &sp.bufs,
                    keep.kvec_base,
                    keep.list(&sp.bufs),
                    &sp.bufs.acc,
                    0,
                    sp.bufs.t_max,
                    0,
                    t,
                )
                .unwrap(),
            );
            let refs: Vec<&Dispatch> = ds.iter().collect();
            pass_ms.push(median_ms(ctx, &refs, if cpu { 3 } else { 11 }));
            if profile {
                let ops: Vec<Op> = ds.iter().cloned().map(Op::from).collect();
                let mut by_kernel: Vec<(String, f64)> = vec![];
                for (label, ns) in ctx.profile_ops("bench.profile", &[&ops]).unwrap() {
                    match by_kernel.iter_mut().find(|(l, _)| *l == label) {
                        Some((_, t)) => *t += ns,
                        None => by_kernel.push((label, ns)),
                    }
                }
                by_kernel.sort_by(|a, b| b.1.total_cmp(&a.1));
                let total: f64 = by_kernel.iter().map(|(_, t)| t).sum();
                println!("  {method:?} pass at T = {t}, per kernel ({timing}):");
                for (label, ns) in by_kernel {
                    let label = label.trim_start_matches("kvsift.compress.");
                    println!(
                        "    {label:<18} {:>10.3} ms {:>5.1}%",
                        ns / 1e6,
                        100.0 * ns / total
                    );
                }
            }
            if method == Method::SnapKv {
                // One decode token against the same T slots (its own slot is the last one).
                let qkv =
                    GpuBuffer::from_slice(ctx, "qkv", &rng.normals((hq + 2 * hkv) * d)).unwrap();
                let pos = GpuBuffer::from_slice(ctx, "pos", &[(t - 1) as u32]).unwrap();
                let q = QkvRows {
                    positions: &pos,
                    qkv: &qkv,
                    qkv_stride: (hq + 2 * hkv) * d,
                    n_q_heads: hq,
                    n_kv_heads: hkv,
                };
                let pages = t.div_ceil(16);
                let split_pages = pages.div_ceil(16);
                let splits = pages.div_ceil(split_pages);
                let partials =
                    GpuBuffer::zeros(ctx, "partials", partials_len(1, hq, splits, d)).unwrap();
                let out = GpuBuffer::zeros(ctx, "out", hq * d).unwrap();
                let mut ds = vec![paged_kv_store(ctx, &job.kv, &q, 1, 1).unwrap()];
                ds.extend(
                    paged_decode(ctx, &job.kv, &q, 1, 0, splits, split_pages, &partials, &out)
                        .unwrap(),
                );
                decode_ms = median_ms(
                    ctx,
                    &ds.iter().collect::<Vec<_>>(),
                    if cpu { 5 } else { 21 },
                );
            }
        }
        let amort = |p: f64| format!("{:.1}%", 100.0 * p / (buffer as f64 * decode_ms));
        println!(
            "{t:>7} {decode_ms:>11.3} {:>10.3} {:>10.3} {:>14} {:>14}",
            pass_ms[0],
            pass_ms[1],
            amort(pass_ms[0]),
            amort(pass_ms[1])
        );
    }
}
