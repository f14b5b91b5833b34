//! Kernel throughput: matvec (alone, over f32 / f16 / quantized blocks, and
//! after an RMSNorm, fused or not) in GB/s (weight bytes streamed, decimal GB),
//! matmul in GFLOP/s (criterion prints it as "Gelem/s": one element = one
//! flop), paged decode attention in GB/s of KV read. The compression passes
//! have their own bench (benches/compression.rs).
//!
//!     WGPU_BACKEND=vulkan cargo bench --bench kernels
//!
//! Sizes: on a CPU adapter (lavapipe) small ones, on a real GPU decode- and
//! prefill-sized ones. Each sample submits REPS back-to-back dispatches in one
//! command buffer and waits, so submission overhead is amortised.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvsift::gpu::{Dispatch, GpuBuffer, GpuContext, GpuMatrix, WeightDtype};
use kvsift::ops::compress::pool_from_keys;
use kvsift::ops::linear::{
    Linear, MATVEC, PreNorm, fuses_prologue, matmul, matvec, matvec_with, norm_linear_with,
};
use kvsift::ops::paged_attention::{LayerKv, PoolLayout, QkvRows, paged_decode, partials_len};
use kvsift::ops::quant::QuantFormat;
use kvsift::testing::{Rng, gpu, random_quant_matrix};

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

/// One vector against a `rows x cols` matrix of random weights.
struct MatvecCase {
    w: GpuMatrix,
    x: GpuBuffer<f32>,
    y: GpuBuffer<f32>,
}

impl MatvecCase {
    fn new(ctx: &GpuContext, rng: &mut Rng, rows: usize, cols: usize, dtype: WeightDtype) -> Self {
        Self {
            w: GpuMatrix::upload(ctx, "w", rows, cols, dtype, &rng.normals(rows * cols)).unwrap(),
            x: GpuBuffer::from_slice(ctx, "x", &rng.normals(cols)).unwrap(),
            y: GpuBuffer::<f32>::zeros(ctx, "y", rows).unwrap(),
        }
    }

    fn args(&self) -> Linear<'_> {
        Linear {
            weights: &self.w,
            bias: None,
            x: &self.x,
            y: &self.y,
            n_vecs: 1,
            accumulate: false,
        }
    }

    /// Bytes one product streams: the weights, x and y.
    fn bytes(&self) -> u64 {
        self.w.size_bytes() + ((self.w.cols + self.w.rows) * 4) as u64
    }
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
            let case = MatvecCase::new(ctx, &mut Rng::new(1), rows, cols, dtype);
            let ds = matvec(ctx, &case.args()).unwrap();
            g.throughput(Throughput::BytesDecimal(case.bytes() * REPS as u64));
            g.bench_function(format!("{dtype:?} {rows}x{cols}"), |b| {
                b.iter_custom(|iters| time_reps(ctx, &ds, iters))
            });
        }
    }
    // The workgroup-reduction kernel (the fallback without subgroups) over
    // f16, against the subgroup kernels above.
    for &(rows, cols) in sizes {
        let case = MatvecCase::new(ctx, &mut Rng::new(1), rows, cols, WeightDtype::F16);
        let ds = matvec_with(ctx, MATVEC.pick(ctx), &case.args()).unwrap();
        g.throughput(Throughput::BytesDecimal(case.bytes() * REPS as u64));
        g.bench_function(format!("F16 workgroup-kernel {rows}x{cols}"), |b| {
            b.iter_custom(|iters| time_reps(ctx, &ds, iters))
        });
    }
    // Quantized blocks as GGUF stores them, through `matvec` (the kernel it
    // picks: shaders/matvec_quant_rows.wgsl where subgroups fit).
    for &(rows, cols) in sizes {
        for format in QuantFormat::ALL {
            let mut rng = Rng::new(1);
            let (w, _) = random_quant_matrix(ctx, format, rows, cols, &mut rng);
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
            let bytes = (format.bytes_for(rows * cols) + (rows + cols) * 4) as u64;
            g.throughput(Throughput::BytesDecimal(bytes * REPS as u64));
            g.bench_function(format!("{} {rows}x{cols}", format.name()), |b| {
                b.iter_custom(|iters| time_reps(ctx, &ds, iters))
            });
        }
    }
    g.finish();
}

/// RMSNorm then the projection of one vector: as two dispatches (rmsnorm,
/// matvec_vec4) and fused into one (matvec_vec4 norming x as it reads it).
/// GB/s of weight + vector bytes, as matvec.
fn bench_norm_matvec(c: &mut Criterion) {
    let Some(ctx) = gpu() else { return };
    let sizes: &[(usize, usize)] = if is_cpu(ctx) {
        &[(2048, 2048), (32000, 256)]
    } else {
        &[(4096, 4096), (32000, 768)]
    };
    let mut g = c.benchmark_group("norm_matvec");
    g.sample_size(10).warm_up_time(Duration::from_millis(500));
    for &(rows, cols) in sizes {
        for dtype in [WeightDtype::F32, WeightDtype::F16] {
            let mut rng = Rng::new(4);
            let case = MatvecCase::new(ctx, &mut rng, rows, cols, dtype);
            let args = case.args();
            let gain = GpuBuffer::from_slice(ctx, "g", &rng.normals(cols)).unwrap();
            let scratch = GpuBuffer::<f32>::zeros(ctx, "normed", cols).unwrap();
            let norm = PreNorm {
                weight: &gain,
                eps: 1e-5,
                scratch: &scratch,
            };
            if !fuses_prologue(ctx, &args) {
                continue;
            }
            g.throughput(Throughput::BytesDecimal(case.bytes() * REPS as u64));
            for fused in [false, true] {
                let ds = norm_linear_with(ctx, &norm, &args, fused).unwrap();
                let how = if fused { "fused" } else { "rmsnorm+matvec" };
                g.bench_function(format!("{how} {dtype:?} {rows}x{cols}"), |b| {
                    b.iter_custom(|iters| time_reps(ctx, &ds, iters))
                });
            }
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

/// Paged decode attention of one token per sequence over T slots (f16 K/V,
/// pages of 16, head dim 128, GQA 4): GB/s of K, V and positions read.
fn bench_decode_attention(c: &mut Criterion) {
    let Some(ctx) = gpu() else { return };
    let (hkv, g, d) = (8usize, 4usize, 128usize);
    let sizes: &[(usize, usize)] = if is_cpu(ctx) {
        &[(1, 1024), (4, 1024)]
    } else {
        &[(1, 4096), (1, 32768), (16, 4096)]
    };
    let mut grp = c.benchmark_group("decode_attention");
    grp.sample_size(10).warm_up_time(Duration::from_millis(500));
    for &(rows, t) in sizes {
        let mut rng = Rng::new(3);
        let layout = PoolLayout {
            page_size: 16,
            head_dim: d,
            kv_f16: true,
        };
        // Every row reads the same sequence's pages (identity tables).
        let (pool, desc1, tables) = pool_from_keys(layout, &rng.normals(hkv * t * d), hkv, t, None);
        let desc: Vec<u32> = (0..rows).flat_map(|_| desc1.iter().copied()).collect();
        let pool = GpuBuffer::from_slice(ctx, "pool", &pool).unwrap();
        let desc = GpuBuffer::from_slice(ctx, "desc", &desc).unwrap();
        let tables = GpuBuffer::from_slice(ctx, "tables", &tables).unwrap();
        let kv = LayerKv {
            layout,
            pool: &pool,
            desc: &desc,
            tables: &tables,
            desc_base: 0,
            n_heads: hkv,
            heads_per_kv: 1,
        };
        let stride = (hkv * g + 2 * hkv) * d;
        let qkv = GpuBuffer::from_slice(ctx, "qkv", &rng.normals(rows * stride)).unwrap();
        let pos = GpuBuffer::from_slice(ctx, "pos", &vec![t as u32; rows]).unwrap();
        let q = QkvRows {
            positions: &pos,
            qkv: &qkv,
            qkv_stride: stride,
            n_q_heads: hkv * g,
            n_kv_heads: hkv,
        };
        let pages = t.div_ceil(16);
        let split_pages = pages.div_ceil(16);
        let splits = pages.div_ceil(split_pages);
        let partials =
            GpuBuffer::zeros(ctx, "partials", partials_len(rows, hkv * g, splits, d)).unwrap();
        let out = GpuBuffer::zeros(ctx, "out", rows * hkv * g * d).unwrap();
        let ds: Vec<Dispatch> =
            paged_decode(ctx, &kv, &q, rows, 0, splits, split_pages, &partials, &out)
                .unwrap()
                .into();
        let bytes = (rows * hkv * t * layout.page_bytes() / 16) as u64;
        grp.throughput(Throughput::BytesDecimal(bytes * REPS as u64));
        grp.bench_function(format!("rows {rows} T {t}"), |b| {
            b.iter_custom(|iters| time_reps(ctx, &ds, iters))
        });
    }
    grp.finish();
}

criterion_group!(
    benches,
    bench_matvec,
    bench_norm_matvec,
    bench_matmul,
    bench_decode_attention
);
criterion_main!(benches);
