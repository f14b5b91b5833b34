//! Helpers shared by unit tests, integration tests and benches: the shared GPU
//! context, a seeded generator, and comparisons that print the first mismatch.

use std::sync::OnceLock;

use crate::gpu::{GpuContext, GpuOptions};

/// The GPU every test shares, chosen from the environment like the binary does.
/// Without an adapter: a failure when `CI` is set (a silent skip in CI would hide
/// everything), otherwise `None` after printing that the test skipped.
pub fn gpu() -> Option<&'static GpuContext> {
    static CTX: OnceLock<Result<GpuContext, String>> = OnceLock::new();
    let ctx = CTX.get_or_init(|| {
        GpuOptions::from_env()
            .and_then(|o| GpuContext::new(&o))
            .map_err(|e| e.to_string())
    });
    match ctx {
        Ok(c) => Some(c),
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("CI is set but no GPU adapter could be opened: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no GPU adapter ({e})");
            None
        }
    }
}

pub use crate::rng::Rng;

/// Rewrites the safetensors file at `path`, letting `edit(name, dtype,
/// shape, data)` change any tensor (tests that break checkpoints).
pub fn rewrite_safetensors(
    path: &std::path::Path,
    mut edit: impl FnMut(&str, &mut safetensors::Dtype, &mut Vec<usize>, &mut Vec<u8>),
) {
    let bytes = std::fs::read(path).expect("a safetensors file to rewrite");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut data: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    for (n, dt, sh, b) in data.iter_mut() {
        edit(n, dt, sh, b);
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, dt, sh, b)| {
            let view = safetensors::tensor::TensorView::new(*dt, sh.clone(), b)
                .expect("an edit that keeps shape and data consistent");
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("the rewritten file");
}

/// Every registered method and schedule the engine runs, with budget `budget` and
/// observation window `window` (decode-schedule buffer 8): each method at
/// prefill and at decode, H2O v1, SnapKV per query head, R-KV in the
/// reference slot order.
pub fn compression_configs(
    budget: usize,
    window: usize,
) -> Vec<crate::kv::compression::CompressConfig> {
    use crate::kv::compression::{
        CompressConfig, Granularity, H2oVersion, Method, Schedule, SlotOrder,
    };
    let with = |method, f: &dyn Fn(&mut CompressConfig)| {
        let mut c = CompressConfig::new(method, budget);
        c.window = window;
        c.buffer = 8;
        f(&mut c);
        c
    };
    let mut out = vec![];
    for method in Method::compressing() {
        for schedule in [Schedule::Prefill, Schedule::Decode] {
            out.push(with(method, &|c| c.schedule = schedule));
        }
    }
    out.push(with(Method::H2o, &|c| c.h2o_version = H2oVersion::V1));
    out.push(with(Method::SnapKv, &|c| {
        c.granularity = Granularity::QueryHead
    }));
    out.push(with(Method::Rkv, &|c| c.slot_order = SlotOrder::Reference));
    out
}

/// `n` blocks of `format` for tests and benches: q8_0 / q4_0 quantized from
/// uniform values in [-1, 1); q4_K / q6_K (which have no reference
/// quantizer) random bytes with modest f16 scales.
pub fn random_quant_blocks(
    format: crate::ops::quant::QuantFormat,
    n: usize,
    rng: &mut Rng,
) -> Vec<u8> {
    use crate::ops::quant::{QuantFormat, quantize_q4_0, quantize_q8_0};
    use half::f16;
    let mut uniform =
        |k: usize| -> Vec<f32> { (0..k).map(|_| rng.uniform() * 2.0 - 1.0).collect() };
    match format {
        QuantFormat::Q8_0 => quantize_q8_0(&uniform(32 * n)),
        QuantFormat::Q4_0 => quantize_q4_0(&uniform(32 * n)),
        _ => {
            let mut out = vec![];
            for _ in 0..n {
                let r = uniform(format.block_bytes() + 2);
                let mut b: Vec<u8> = r[..format.block_bytes()]
                    .iter()
                    .map(|v| ((v + 1.0) * 128.0) as u8)
                    .collect();
                let scale = |v: f32| f16::from_f32(v).to_le_bytes();
                let (a, c) = (
                    r[format.block_bytes()].abs(),
                    r[format.block_bytes() + 1].abs(),
                );
                if format == QuantFormat::Q4K {
                    b[0..2].copy_from_slice(&scale(0.01 + a * 0.01));
                    b[2..4].copy_from_slice(&scale(0.005 + c * 0.01));
                } else {
                    b[208..210].copy_from_slice(&scale(0.002 + a * 0.004));
                }
                out.extend(b);
            }
            out
        }
    }
}

/// A `[rows, cols]` matrix of random blocks of `format` on the GPU (see
/// [`random_quant_blocks`]) and the weights it holds (the CPU twin's input).
pub fn random_quant_matrix(
    ctx: &crate::gpu::GpuContext,
    format: crate::ops::quant::QuantFormat,
    rows: usize,
    cols: usize,
    rng: &mut Rng,
) -> (crate::gpu::GpuMatrix, Vec<f32>) {
    let bytes = random_quant_blocks(format, rows * cols / format.block_weights(), rng);
    let m = crate::ops::quant::upload_blocks(ctx, "random blocks", format, rows, cols, &bytes)
        .expect("upload random blocks");
    (m, crate::ops::quant::dequantize(format, &bytes))
}

/// Largest |got - want| over two rows of logits and where (a NaN counts as
/// the largest).
pub fn max_abs_diff(got: &[f32], want: &[f32]) -> (f32, usize) {
    assert_eq!(got.len(), want.len(), "logit count");
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold(
            (0.0, 0),
            |acc, (i, d)| if d > acc.0 || d.is_nan() { (d, i) } else { acc },
        )
}

/// Asserts logits `[tokens, vocab]` within `tol` of `want`, printing the
/// measured largest difference (the figure the tolerance is set from).
pub fn assert_logits_close(what: &str, got: &[f32], want: &[f32], vocab: usize, tol: f32) {
    let (d, i) = max_abs_diff(got, want);
    eprintln!("{what}: max |logit diff| {d:.2e}");
    assert!(
        d <= tol,
        "{what}: max |logit diff| {d:.3e} > {tol:.0e} at token {} id {}: got {}, want {}",
        i / vocab.max(1),
        i % vocab.max(1),
        got[i],
        want[i]
    );
}

/// Normalised mean squared error `sum (got-want)^2 / sum want^2` (the
/// measure llama.cpp's test-backend-ops uses).
pub fn nmse(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "nmse: length mismatch");
    let mut err = 0.0;
    let mut norm = 0.0;
    for (g, w) in got.iter().zip(want) {
        err += (*g as f64 - w).powi(2);
        norm += w * w;
    }
    if norm == 0.0 { err } else { err / norm }
}

/// Fails with the NMSE and the worst element if `nmse(got, want) > max_nmse`.
pub fn assert_nmse(what: &str, got: &[f32], want: &[f64], max_nmse: f64) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: got {} values, want {}",
        got.len(),
        want.len()
    );
    let e = nmse(got, want);
    if e.is_nan() || e > max_nmse {
        let (i, _) = got
            .iter()
            .zip(want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .enumerate()
            .fold(
                (0, -1.0),
                |a, (i, d)| if d > a.1 || d.is_nan() { (i, d) } else { a },
            );
        let first = got
            .iter()
            .zip(want)
            .position(|(g, w)| (*g as f64 - w).abs() > 1e-3 * w.abs().max(1e-3) || g.is_nan());
        panic!(
            "{what}: NMSE {e:.3e} > {max_nmse:.1e}; worst index {i}: got {}, want {}; first mismatch: {}",
            got[i],
            want[i],
            first.map_or("none".into(), |j| format!(
                "index {j}: got {}, want {}",
                got[j], want[j]
            ))
        );
    }
}

/// Fails at the first element with `|got - want| > atol + rtol * |want|`.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: got {} values, want {}",
        got.len(),
        want.len()
    );
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (*g as f64 - w).abs();
        if d.is_nan() || d > atol + rtol * w.abs() {
            panic!(
                "{what}: first mismatch at index {i}: got {g}, want {w} (|diff| {d:.3e} > atol {atol:.1e} + rtol {rtol:.1e})"
            );
        }
    }
}
