//! Causal GQA attention over a contiguous per-layer KV cache
//! (`shaders/kv_store.wgsl`, `shaders/attention.wgsl`): keys (after RoPE) and
//! values of new tokens are written at their absolute positions, then each
//! query attends to positions `[lo, pos]` (`lo > 0` only with a sliding
//! window). Scores `q.k * scale`, softmax in f32, as transformers' eager
//! attention. The paged cache replaces the contiguous one later; these
//! kernels are its reference.

use bytemuck::{Pod, Zeroable};

use super::ensure;
use super::host_layout;
use super::{NO_FEATURES, REDUCE_SUBGROUP, REDUCE_WORKGROUP, ReducingKernel, SUBGROUPS, u32_of};
use crate::error::Result;
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, Kernel};

pub static KV_STORE: Kernel = Kernel {
    name: "kv_store",
    sources: &[include_str!("../../shaders/kv_store.wgsl")],
    entries: &["kv_store"],
    needs: NO_FEATURES,
};

const ATTENTION_SRC: &str = include_str!("../../shaders/attention.wgsl");

pub static ATTENTION: ReducingKernel = ReducingKernel {
    workgroup: Kernel {
        name: "attention",
        sources: &[REDUCE_WORKGROUP, ATTENTION_SRC],
        entries: &["attention"],
        needs: NO_FEATURES,
    },
    subgroup: Kernel {
        name: "attention_subgroup",
        sources: &[REDUCE_SUBGROUP, ATTENTION_SRC],
        entries: &["attention"],
        needs: SUBGROUPS,
    },
};

/// Workgroup size of the attention kernel; a head may have up to 4 x this many dims.
const ATTENTION_WG: u32 = 64;
/// `MAX_D` in attention.wgsl.
pub const MAX_HEAD_DIM: usize = 256;

/// Where q, k and v sit in the fused projection rows, and the cache shape.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub n_tokens: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Elements per token row of qkv: `(n_heads + 2 * n_kv_heads) * head_dim`.
    pub qkv_stride: usize,
    /// Cache positions per KV head.
    pub capacity: usize,
    /// Sliding window (keys with position > pos - window are visible); 0 = none.
    pub window: usize,
}

impl AttentionShape {
    pub fn k_offset(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn v_offset(&self) -> usize {
        (self.n_heads + self.n_kv_heads) * self.head_dim
    }
    pub fn cache_len(&self) -> usize {
        self.n_kv_heads * self.capacity * self.head_dim
    }
    fn check(&self, kernel: &str, positions: usize, qkv: usize, k: usize, v: usize) -> Result<()> {
        ensure!(
            self.n_kv_heads > 0
                && self.n_heads.is_multiple_of(self.n_kv_heads)
                && self.head_dim <= MAX_HEAD_DIM
                && self.qkv_stride >= self.v_offset() + self.n_kv_heads * self.head_dim
                && positions >= self.n_tokens
                && qkv >= self.n_tokens * self.qkv_stride
                && k >= self.cache_len()
                && v >= self.cache_len(),
            "{kernel}: {self:?} against positions {positions}, qkv {qkv}, cache k {k}, v {v}"
        );
        Ok(())
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct KvStoreParams {
    n_tokens: u32,
    n_kv_heads: u32,
    head_dim: u32,
    qkv_stride: u32,
    k_offset: u32,
    v_offset: u32,
    capacity: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AttentionParams {
    n_tokens: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    q_stride: u32,
    q_offset: u32,
    capacity: u32,
    window: u32,
    out_stride: u32,
    scale: f32,
}

/// Writes the k and v heads of `qkv` into the caches at `positions`.
/// Positions must be below the capacity (the caller checks; a user's prompt
/// that is too long is rejected before it gets here).
pub fn kv_store(
    ctx: &GpuContext,
    s: &AttentionShape,
    positions: &GpuBuffer<u32>,
    qkv: &GpuBuffer<f32>,
    cache_k: &GpuBuffer<f32>,
    cache_v: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    s.check(
        "kv_store",
        positions.len(),
        qkv.len(),
        cache_k.len(),
        cache_v.len(),
    )?;
    let pipeline = ctx.pipeline(&KV_STORE, "kv_store", &super::wg_constants())?;
    let params = KvStoreParams {
        n_tokens: u32_of("tokens", s.n_tokens)?,
        n_kv_heads: u32_of("kv heads", s.n_kv_heads)?,
        head_dim: u32_of("head dim", s.head_dim)?,
        qkv_stride: u32_of("qkv stride", s.qkv_stride)?,
        k_offset: u32_of("k offset", s.k_offset())?,
        v_offset: u32_of("v offset", s.v_offset())?,
        capacity: u32_of("capacity", s.capacity)?,
    };
    Dispatch::with_params(
        ctx,
        pipeline,
        "kvsift.kv_store".into(),
        &params,
        &[
            positions.binding(),
            qkv.binding(),
            cache_k.binding(),
            cache_v.binding(),
        ],
        ctx.grid(super::blocks(s.n_tokens * s.n_kv_heads * s.head_dim)?),
    )
}

/// `out[t, h*D..] = attention of query head h of token t` (`out` `[n_tokens, n_heads * head_dim]`).
pub fn attention(
    ctx: &GpuContext,
    s: &AttentionShape,
    positions: &GpuBuffer<u32>,
    qkv: &GpuBuffer<f32>,
    cache_k: &GpuBuffer<f32>,
    cache_v: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    attention_with(
        ctx,
        ATTENTION.pick(ctx),
        s,
        positions,
        qkv,
        cache_k,
        cache_v,
        out,
    )
}

#[allow(clippy::too_many_arguments)]
pub fn attention_with(
    ctx: &GpuContext,
    kernel: &'static Kernel,
    s: &AttentionShape,
    positions: &GpuBuffer<u32>,
    qkv: &GpuBuffer<f32>,
    cache_k: &GpuBuffer<f32>,
    cache_v: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    s.check(
        "attention",
        positions.len(),
        qkv.len(),
        cache_k.len(),
        cache_v.len(),
    )?;
    let out_stride = s.n_heads * s.head_dim;
    ensure!(
        out.len() >= s.n_tokens * out_stride,
        "attention: out has {} values, need {}",
        out.len(),
        s.n_tokens * out_stride
    );
    let pipeline = ctx.pipeline(kernel, "attention", &[("WG", ATTENTION_WG as f64)])?;
    let params = AttentionParams {
        n_tokens: u32_of("tokens", s.n_tokens)?,
        n_heads: u32_of("heads", s.n_heads)?,
        n_kv_heads: u32_of("kv heads", s.n_kv_heads)?,
        head_dim: u32_of("head dim", s.head_dim)?,
        q_stride: u32_of("q stride", s.qkv_stride)?,
        q_offset: 0,
        capacity: u32_of("capacity", s.capacity)?,
        window: u32_of("window", s.window)?,
        out_stride: u32_of("out stride", out_stride)?,
        scale: (1.0 / (s.head_dim as f64).sqrt()) as f32,
    };
    Dispatch::with_params(
        ctx,
        pipeline,
        "kvsift.attention".into(),
        &params,
        &[
            positions.binding(),
            qkv.binding(),
            cache_k.binding(),
            cache_v.binding(),
            out.binding(),
        ],
        ctx.grid(u32_of("attention items", s.n_tokens * s.n_heads)?),
    )
}

/// CPU twin of `kv_store`.
pub fn kv_store_cpu(
    s: &AttentionShape,
    positions: &[u32],
    qkv: &[f32],
    cache_k: &mut [f32],
    cache_v: &mut [f32],
) {
    let d = s.head_dim;
    for (t, &pos) in positions.iter().enumerate().take(s.n_tokens) {
        for g in 0..s.n_kv_heads {
            let slot = (g * s.capacity + pos as usize) * d;
            let row = t * s.qkv_stride;
            cache_k[slot..slot + d].copy_from_slice(&qkv[row + s.k_offset() + g * d..][..d]);
            cache_v[slot..slot + d].copy_from_slice(&qkv[row + s.v_offset() + g * d..][..d]);
        }
    }
}

/// Softmax attention of one query over `(key, value)` pairs, in f64: the
/// math every attention twin shares. `scale` is applied to `q . k`.
pub fn attend_cpu<'a>(
    q: &[f32],
    slots: impl Iterator<Item = (&'a [f32], &'a [f32])> + Clone,
    scale: f64,
) -> Vec<f64> {
    let scores: Vec<f64> = slots
        .clone()
        .map(|(k, _)| {
            q.iter()
                .zip(k)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
    let z: f64 = w.iter().sum();
    let mut out = vec![0.0; q.len()];
    for (wi, (_, v)) in w.iter().zip(slots) {
        for (o, vv) in out.iter_mut().zip(v) {
            *o += wi / z * *vv as f64;
        }
    }
    out
}

/// The scale transformers uses, rounded to f32 as the kernels get it.
pub fn attention_scale(head_dim: usize) -> f64 {
    (1.0 / (head_dim as f64).sqrt()) as f32 as f64
}

/// CPU twin of `attention` (f64): returns `[n_tokens, n_heads * head_dim]`.
pub fn attention_cpu(
    s: &AttentionShape,
    positions: &[u32],
    qkv: &[f32],
    cache_k: &[f32],
    cache_v: &[f32],
) -> Vec<f64> {
    let d = s.head_dim;
    let group = s.n_heads / s.n_kv_heads;
    let mut out = Vec::with_capacity(s.n_tokens * s.n_heads * d);
    for (t, &pos) in positions.iter().enumerate().take(s.n_tokens) {
        let pos = pos as usize;
        let lo = if s.window > 0 {
            (pos + 1).saturating_sub(s.window)
        } else {
            0
        };
        for h in 0..s.n_heads {
            let base = (h / group) * s.capacity;
            let slots = (lo..=pos).map(|j| {
                (
                    &cache_k[(base + j) * d..][..d],
                    &cache_v[(base + j) * d..][..d],
                )
            });
            out.extend(attend_cpu(
                &qkv[t * s.qkv_stride + h * d..][..d],
                slots,
                attention_scale(d),
            ));
        }
    }
    out
}

/// The structs this module's kernels read (checked against the WGSL in
/// tests/shader_portability.rs).
pub(crate) fn host_layouts() -> Vec<super::HostLayout> {
    vec![
        host_layout!(KvStoreParams in [&KV_STORE] as "Params" { n_tokens, n_kv_heads, head_dim, qkv_stride, k_offset, v_offset, capacity }),
        host_layout!(AttentionParams in [&ATTENTION.workgroup, &ATTENTION.subgroup] as "Params" { n_tokens, n_heads, n_kv_heads, head_dim, q_stride, q_offset, capacity, window, out_stride, scale }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, assert_close, gpu};

    /// Softmax-weighted sums in f32 (online, blockwise) vs f64: 2e-5 relative
    /// + 2e-6 absolute per element.
    const RTOL: f64 = 2e-5;
    const ATOL: f64 = 2e-6;

    struct Case {
        heads: usize,
        kv_heads: usize,
        dim: usize,
        prefill: usize,
        decode: usize,
        window: usize,
    }

    fn run(ctx: &GpuContext, kernel: &'static Kernel, c: &Case, seed: u64) {
        let mut rng = Rng::new(seed);
        let capacity = c.prefill + c.decode + 3;
        let stride = (c.heads + 2 * c.kv_heads) * c.dim;
        let shape = |n_tokens| AttentionShape {
            n_tokens,
            n_heads: c.heads,
            n_kv_heads: c.kv_heads,
            head_dim: c.dim,
            qkv_stride: stride,
            capacity,
            window: c.window,
        };
        let cache_len = c.kv_heads * capacity * c.dim;
        let (ck, cv) = (
            GpuBuffer::<f32>::zeros(ctx, "k", cache_len).unwrap(),
            GpuBuffer::<f32>::zeros(ctx, "v", cache_len).unwrap(),
        );
        let (mut k_cpu, mut v_cpu) = (vec![0.0; cache_len], vec![0.0; cache_len]);
        // One prefill chunk, then single-token decode steps, as the model runs them.
        let mut steps = vec![(0..c.prefill as u32).collect::<Vec<_>>()];
        steps.extend((c.prefill..c.prefill + c.decode).map(|p| vec![p as u32]));
        for positions in steps {
            let s = shape(positions.len());
            let qkv: Vec<f32> = rng.normals(positions.len() * stride);
            let pb = GpuBuffer::from_slice(ctx, "pos", &positions).unwrap();
            let qb = GpuBuffer::from_slice(ctx, "qkv", &qkv).unwrap();
            let out =
                GpuBuffer::<f32>::zeros(ctx, "out", positions.len() * c.heads * c.dim).unwrap();
            let d1 = kv_store(ctx, &s, &pb, &qb, &ck, &cv).unwrap();
            let d2 = attention_with(ctx, kernel, &s, &pb, &qb, &ck, &cv, &out).unwrap();
            ctx.run("test", &[&d1, &d2]).unwrap();
            kv_store_cpu(&s, &positions, &qkv, &mut k_cpu, &mut v_cpu);
            let want = attention_cpu(&s, &positions, &qkv, &k_cpu, &v_cpu);
            let what = format!(
                "{} heads {}/{} dim {} window {} at positions {:?}..",
                kernel.name,
                c.heads,
                c.kv_heads,
                c.dim,
                c.window,
                positions.first()
            );
            assert_close(&what, &out.read(ctx).unwrap(), &want, ATOL, RTOL);
        }
        assert_eq!(ck.read(ctx).unwrap(), k_cpu, "cache k after all steps");
        assert_eq!(cv.read(ctx).unwrap(), v_cpu, "cache v after all steps");
    }

    #[test]
    fn attention_matches_twin() {
        let Some(ctx) = gpu() else { return };
        let mut kernels = vec![&ATTENTION.workgroup];
        if ctx.caps.features.subgroups {
            kernels.push(&ATTENTION.subgroup);
        }
        let cases = [
            Case {
                heads: 1,
                kv_heads: 1,
                dim: 1,
                prefill: 1,
                decode: 1,
                window: 0,
            },
            Case {
                heads: 4,
                kv_heads: 2,
                dim: 64,
                prefill: 5,
                decode: 3,
                window: 0,
            },
            Case {
                heads: 4,
                kv_heads: 1,
                dim: 128,
                prefill: 70,
                decode: 2,
                window: 0,
            },
            Case {
                heads: 2,
                kv_heads: 2,
                dim: 7,
                prefill: 130,
                decode: 1,
                window: 0,
            },
            Case {
                heads: 6,
                kv_heads: 3,
                dim: 256,
                prefill: 3,
                decode: 2,
                window: 0,
            },
            Case {
                heads: 4,
                kv_heads: 2,
                dim: 64,
                prefill: 90,
                decode: 4,
                window: 24,
            },
        ];
        for kernel in kernels {
            for (i, c) in cases.iter().enumerate() {
                run(ctx, kernel, c, 200 + i as u64);
            }
        }
    }
}
