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

/// SplitMix64: tiny, seeded, reproducible everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Roughly standard normal (sum of 4 uniforms, scaled).
    pub fn normal(&mut self) -> f32 {
        let s: f32 = (0..4).map(|_| self.uniform()).sum();
        (s - 2.0) * 1.732_050_8
    }

    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
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
