//! Kernel throughput: matvec in GB/s (weight bytes streamed, decimal GB) and
//! matmul in GFLOP/s (criterion prints it as "Gelem/s": one element = one flop).
//!
//!     WGPU_BACKEND=vulkan cargo bench --bench kernels
//!
//! Sizes: on a CPU adapter (lavapipe) small ones, on a real GPU decode- and
//! prefill-sized ones. Each sample submits REPS back-to-back dispatches in one
//! command buffer and waits, so submission overhead is amortised.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvsift::gpu::{Dispatch, GpuBuffer, GpuContext, GpuMatrix, WeightDtype};
use kvsift::ops::linear::{Linear, matmul, matvec};
use kvsift::testing::{Rng, gpu};

const REPS: u32 = 8;

fn time_reps(ctx: &GpuContext, ds: &[Dispatch], iters: u64) -> Duration {
    let list: Vec<&Dispatch> = (0..REPS).flat_map(|_| ds.iter()).collect();
    let start = Instant::now();
    for _ in 0..iters {
        ctx.run("bench", &list).unwrap();
        ctx.wait_idle().unwrap();
    }
    start.elapsed()
}

fn is_cpu(ctx: &GpuContext) -> bool {
    ctx.adapter_summary.device_type == wgpu::DeviceType::Cpu
}

fn bench_matvec(c: &mut Criterion) {
    let Some(ctx) = gpu() else { return };
    let sizes: &[(usize, usize)] = if is_cpu(ctx) {
        &[(1024, 1024), (2048, 2048)]
    } else {
        &[(2048, 2048), (4096, 4096), (14336, 4096)]
    };
    let mut g = c.benchmark_group("matvec");
    g.sample_size(10).warm_up_time(Duration::from_millis(500));
    for &(rows, cols) in sizes {
        for dtype in [WeightDtype::F32, WeightDtype::F16] {
            let mut rng = Rng::new(1);
            let w =
                GpuMatrix::upload(ctx, "w", rows, cols, dtype, &rng.normals(rows * cols)).unwrap();
            let x = GpuBuffer::from_slice(ctx, "x", &rng.normals(cols)).unwrap();
            let y = GpuBuffer::<f32>::zeros(ctx, "y", rows).unwrap();
            let args = Linear {
                weights: &w,
                bias: None,
                x: &x,
                y: &y,
                n_vecs: 1,
                accumulate: false,
            };
            let ds = matvec(ctx, &args).unwrap();
            let bytes = w.size_bytes() + (cols * 4 + rows * 4) as u64;
            g.throughput(Throughput::BytesDecimal(bytes * REPS as u64));
            g.bench_function(format!("{dtype:?} {rows}x{cols}"), |b| {
                b.iter_custom(|iters| time_reps(ctx, &ds, iters))
            });
        }
    }
    g.finish();
}

fn bench_matmul(c: &mut Criterion) {
    let Some(ctx) = gpu() else { return };
    let sizes: &[(usize, usize, usize)] = if is_cpu(ctx) {
        &[(64, 1024, 1024), (128, 2048, 2048)]
    } else {
        &[(512, 4096, 4096), (2048, 4096, 4096)]
    };
    let mut g = c.benchmark_group("matmul");
    g.sample_size(10).warm_up_time(Duration::from_millis(500));
    for &(m, n, k) in sizes {
        for dtype in [WeightDtype::F32, WeightDtype::F16] {
            let mut rng = Rng::new(2);
            let w = GpuMatrix::upload(ctx, "w", n, k, dtype, &rng.normals(n * k)).unwrap();
            let a = GpuBuffer::from_slice(ctx, "a", &rng.normals(m * k)).unwrap();
            let out = GpuBuffer::<f32>::zeros(ctx, "c", m * n).unwrap();
            let args = Linear {
                weights: &w,
                bias: None,
                x: &a,
                y: &out,
                n_vecs: m,
                accumulate: false,
            };
            let ds = matmul(ctx, &args).unwrap();
            g.throughput(Throughput::Elements(2 * (m * n * k) as u64 * REPS as u64));
            g.bench_function(format!("{dtype:?} m{m} n{n} k{k}"), |b| {
                b.iter_custom(|iters| time_reps(ctx, &ds, iters))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_matvec, bench_matmul);
criterion_main!(benches);
