//! Rotary position embedding (`shaders/rope.wgsl`) in Hugging Face's
//! `rotate_half` layout, and the cos/sin table it reads.
//!
//! The inverse frequencies follow transformers' `rope_init_fn`s: the default
//! `1 / theta^(2i/d)`, `linear` (divide by `factor`) and `llama3` (smooth
//! interpolation between low and high frequency bands). The table holds
//! `cos/sin(position * inv_freq)` with the product rounded to f32 as torch
//! does, and cos/sin taken in f64, so the GPU's own sin/cos accuracy (poor for
//! large angles on some drivers) never matters.

use bytemuck::{Pod, Zeroable};

use super::ensure;
use super::host_layout;
use super::{NO_FEATURES, u32_of};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, Kernel};

pub static ROPE: Kernel = Kernel {
    name: "rope",
    sources: &[include_str!("../../shaders/rope.wgsl")],
    entries: &["rope"],
    needs: NO_FEATURES,
};

/// `rope_scaling` from a Hugging Face `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.x: long wavelengths divided by `factor`, short ones kept, a
    /// smooth blend in between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// One divisor per frequency (`head_dim / 2` of them): GGUF's
    /// `rope_freqs.weight`, which llama.cpp's converter computes from Llama
    /// 3.1's scaling (`theta_i = pos * inv_freq_i / factor_i`).
    Factors(Vec<f32>),
}

/// What the rotation needs from the model config.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub head_dim: usize,
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    pub fn validate(&self) -> Result<()> {
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(Error::invalid(
                "head_dim",
                format!(
                    "{} must be even and positive for rotary embeddings",
                    self.head_dim
                ),
            ));
        }
        if !(self.theta.is_finite() && self.theta > 1.0) {
            return Err(Error::invalid(
                "rope_theta",
                format!("{} must be > 1", self.theta),
            ));
        }
        match &self.scaling {
            RopeScaling::None => {}
            RopeScaling::Factors(factors) => {
                if factors.len() != self.head_dim / 2
                    || !factors.iter().all(|f| f.is_finite() && *f > 0.0)
                {
                    return Err(Error::invalid(
                        "rope frequency factors",
                        format!(
                            "{} positive finite factors needed for head_dim {}, got {:?}",
                            self.head_dim / 2,
                            self.head_dim,
                            &factors[..factors.len().min(8)]
                        ),
                    ));
                }
            }
            &RopeScaling::Linear { factor } => {
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(Error::invalid(
                        "rope_scaling.factor",
                        format!("{factor} must be positive"),
                    ));
                }
            }
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let all_finite = [
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                ]
                .iter()
                .all(|v| v.is_finite());
                if !(all_finite
                    && factor > 0.0
                    && low_freq_factor > 0.0
                    && high_freq_factor > low_freq_factor
                    && original_max_position_embeddings > 0.0)
                {
                    return Err(Error::invalid(
                        "rope_scaling (llama3)",
                        format!(
                            "need factor > 0, 0 < low_freq_factor < high_freq_factor, \
                             original_max_position_embeddings > 0; got {factor}, \
                             {low_freq_factor}, {high_freq_factor}, {original_max_position_embeddings}"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The `head_dim / 2` inverse frequencies, as f32 like transformers keeps them.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                // transformers: exponent (2i / d) in f32, then base ** exponent.
                let exponent = (2 * i) as f32 / d as f32;
                let f = 1.0 / self.theta.powf(exponent as f64);
                let f = match &self.scaling {
                    RopeScaling::None => f,
                    RopeScaling::Factors(factors) => f / factors[i] as f64,
                    &RopeScaling::Linear { factor } => f / factor,
                    &RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings: old,
                    } => {
                        let low_freq_wavelen = old / low_freq_factor;
                        let high_freq_wavelen = old / high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                };
                f as f32
            })
            .collect()
    }
}

/// Builds cos/sin rows for given positions without allocating.
pub struct RopeTable {
    inv_freq: Vec<f32>,
}

impl RopeTable {
    pub fn new(cfg: &RopeConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            inv_freq: cfg.inv_freq(),
        })
    }

    pub fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// Fills `cos`/`sin` (`[positions.len(), half]`) for these absolute positions.
    pub fn fill(&self, positions: &[u32], cos: &mut [f32], sin: &mut [f32]) -> Result<()> {
        let h = self.half();
        ensure!(
            cos.len() >= positions.len() * h && sin.len() >= positions.len() * h,
            "RopeTable::fill: {} positions need {} values per table",
            positions.len(),
            positions.len() * h
        );
        for (t, &pos) in positions.iter().enumerate() {
            for (i, f) in self.inv_freq.iter().enumerate() {
                // Product in f32 (as torch computes freqs), trig in f64.
                let angle = (pos as f32 * f) as f64;
                cos[t * h + i] = angle.cos() as f32;
                sin[t * h + i] = angle.sin() as f32;
            }
        }
        Ok(())
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n_tokens: u32,
    n_heads: u32,
    half: u32,
    token_stride: u32,
    head_offset: u32,
}

/// Where the heads to rotate sit: token `t`, head `h` starts at
/// `t * token_stride + head_offset + h * head_dim` (so q and k inside a fused
/// qkv row work too).
#[derive(Clone, Copy, Debug)]
pub struct RopeShape {
    pub n_tokens: usize,
    pub n_heads: usize,
    pub head_dim: usize,
    pub token_stride: usize,
    pub head_offset: usize,
}

/// Rotates `x` in place with the table rows `cos`/`sin` (`[n_tokens, head_dim/2]`).
pub fn rope(
    ctx: &GpuContext,
    s: RopeShape,
    cos: &GpuBuffer<f32>,
    sin: &GpuBuffer<f32>,
    x: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    let half = s.head_dim / 2;
    ensure!(
        s.head_dim.is_multiple_of(2)
            && cos.len() >= s.n_tokens * half
            && sin.len() >= s.n_tokens * half
            && s.head_offset + s.n_heads * s.head_dim <= s.token_stride
            && x.len() >= s.n_tokens * s.token_stride,
        "rope: {s:?} against x {} values, cos {}, sin {}",
        x.len(),
        cos.len(),
        sin.len()
    );
    let pipeline = ctx.pipeline(&ROPE, "rope", &super::wg_constants())?;
    let params = Params {
        n_tokens: u32_of("tokens", s.n_tokens)?,
        n_heads: u32_of("heads", s.n_heads)?,
        half: u32_of("half", half)?,
        token_stride: u32_of("token stride", s.token_stride)?,
        head_offset: u32_of("head offset", s.head_offset)?,
    };
    Dispatch::with_params(
        ctx,
        pipeline,
        "kvsift.rope".into(),
        &params,
        &[cos.binding(), sin.binding(), x.binding()],
        ctx.grid(super::blocks(s.n_tokens * s.n_heads * half)?),
    )
}

/// CPU twin (f64 arithmetic on the same table values).
pub fn rope_cpu(s: RopeShape, cos: &[f32], sin: &[f32], x: &mut [f64]) {
    let half = s.head_dim / 2;
    for t in 0..s.n_tokens {
        for h in 0..s.n_heads {
            let base = t * s.token_stride + s.head_offset + h * s.head_dim;
            for i in 0..half {
                let (c, sn) = (cos[t * half + i] as f64, sin[t * half + i] as f64);
                let (x1, x2) = (x[base + i], x[base + i + half]);
                x[base + i] = x1 * c - x2 * sn;
                x[base + i + half] = x2 * c + x1 * sn;
            }
        }
    }
}

/// The structs this module's kernels read (checked against the WGSL in
/// tests/shader_portability.rs).
pub(crate) fn host_layouts() -> Vec<super::HostLayout> {
    vec![
        host_layout!(Params in [&ROPE] as "Params" { n_tokens, n_heads, half, token_stride, head_offset }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, assert_close, gpu};

    fn plain(head_dim: usize) -> RopeConfig {
        RopeConfig {
            head_dim,
            theta: 10000.0,
            scaling: RopeScaling::None,
        }
    }

    #[test]
    fn default_inv_freq_is_theta_to_the_minus_2i_over_d() {
        let f = plain(64).inv_freq();
        assert_eq!(f.len(), 32);
        assert_eq!(f[0], 1.0);
        assert!((f[16] as f64 - 0.01).abs() < 1e-9, "{}", f[16]); // 10000^(-1/2)
        let lin = RopeConfig {
            scaling: RopeScaling::Linear { factor: 4.0 },
            ..plain(64)
        }
        .inv_freq();
        assert_eq!(lin[16], f[16] / 4.0);
    }

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_blends_the_middle() {
        let base = RopeConfig {
            head_dim: 128,
            theta: 500000.0,
            scaling: RopeScaling::None,
        };
        let scaled = RopeConfig {
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
            ..base.clone()
        };
        let (f, g) = (base.inv_freq(), scaled.inv_freq());
        let (mut kept, mut divided, mut blended) = (0, 0, 0);
        for (a, b) in f.iter().zip(&g) {
            let wavelen = 2.0 * std::f64::consts::PI / *a as f64;
            if wavelen < 2048.0 {
                assert_eq!(a, b);
                kept += 1;
            } else if wavelen > 8192.0 {
                assert!((*b as f64 - *a as f64 / 8.0).abs() <= 1e-7 * *a as f64);
                divided += 1;
            } else {
                assert!(b < a && *b as f64 > *a as f64 / 8.0, "{a} -> {b}");
                blended += 1;
            }
        }
        assert!(
            kept > 0 && divided > 0 && blended > 0,
            "{kept} {divided} {blended}"
        );
    }

    #[test]
    fn bad_rope_configs_are_errors() {
        assert!(RopeTable::new(&plain(63)).is_err());
        let bad = RopeConfig {
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 4.0,
                high_freq_factor: 1.0,
                original_max_position_embeddings: 8192.0,
            },
            ..plain(64)
        };
        assert!(RopeTable::new(&bad).is_err());
    }

    #[test]
    fn rope_matches_twin() {
        let Some(ctx) = gpu() else { return };
        // (tokens, heads, head_dim, extra leading/trailing elements per token row)
        let cases = [
            (1, 1, 2, 0),
            (3, 5, 64, 0),
            (7, 3, 128, 0),
            (2, 14, 64, 96),
            (33, 2, 128, 10),
        ];
        for (i, &(n_tokens, n_heads, head_dim, pad)) in cases.iter().enumerate() {
            let s = RopeShape {
                n_tokens,
                n_heads,
                head_dim,
                token_stride: n_heads * head_dim + pad,
                head_offset: pad / 2,
            };
            let table = RopeTable::new(&plain(head_dim)).unwrap();
            let mut rng = Rng::new(60 + i as u64);
            let positions: Vec<u32> = (0..n_tokens).map(|_| rng.below(40000) as u32).collect();
            let half = head_dim / 2;
            let (mut c, mut sn) = (vec![0.0; n_tokens * half], vec![0.0; n_tokens * half]);
            table.fill(&positions, &mut c, &mut sn).unwrap();
            let x = rng.normals(n_tokens * s.token_stride);
            let xb = GpuBuffer::from_slice(ctx, "x", &x).unwrap();
            let cb = GpuBuffer::from_slice(ctx, "cos", &c).unwrap();
            let sb = GpuBuffer::from_slice(ctx, "sin", &sn).unwrap();
            let d = rope(ctx, s, &cb, &sb, &xb).unwrap();
            ctx.run("test", &[&d]).unwrap();
            let mut want: Vec<f64> = x.iter().map(|v| *v as f64).collect();
            rope_cpu(s, &c, &sn, &mut want);
            // Two f32 products and a sum per element: 1e-6 relative + 1e-6 absolute.
            assert_close(
                &format!("rope {s:?}"),
                &xb.read(ctx).unwrap(),
                &want,
                1e-6,
                1e-6,
            );
        }
    }
}
