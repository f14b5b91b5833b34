//! KNorm (kvpress's KnormPress): keep the window and the `budget - window`
//! prefix slots whose keys have the smallest L2 norm, exact ties to the
//! lower slot. Contract section "KNorm": no queries, no pooling; with
//! query-head granularity each query head selects on its own KV head's keys.
//! This file is the whole method: its policy, its CPU reference, its
//! scoring kernel (`-||k||` per candidate through the block tables) and the
//! tests that hold them together.

use bytemuck::{Pod, Zeroable};

use super::{Captured, CompressConfig, LayerCx, Policy, Records, Selection, Setting, common};
use crate::error::Result;
use crate::gpu::{Dispatch, Kernel, OptionalFeatures};
use crate::ops::{HostLayout, host_layout, pages, u32_of};

pub struct KNorm;

impl Policy for KNorm {
    fn name(&self) -> &'static str {
        "knorm"
    }

    fn settings(&self) -> &'static [Setting] {
        &[Setting::Granularity]
    }

    fn records(&self, _cfg: &CompressConfig) -> Records {
        Records::Nothing
    }

    fn select_cpu(&self, cfg: &CompressConfig, x: &Captured, _: usize, _: usize) -> Option<Selection> {
        let hpk = cfg.heads_per_kv(x.hq / x.hkv);
        let k = cfg.budget - cfg.window;
        let kept = (0..x.hkv * hpk)
            .map(|s| {
                let scores = scores_cpu(x.key_head(s / hpk), x.t - cfg.window, x.d);
                common::kept_with_window(common::topk_ranked(&scores, k), x.t, cfg.window)
            })
            .collect();
        Some(Selection {
            kept,
            reference: None,
        })
    }

    fn select_gpu(&self, cx: &mut LayerCx) -> Result<Option<Vec<usize>>> {
        let d = scores_gpu(cx)?;
        cx.dispatches.push(d);
        Ok(Some(cx.uniform(cx.cfg.budget - cx.cfg.window)))
    }

    fn kernels(&self) -> Vec<&'static Kernel> {
        vec![&KNORM_SCORES]
    }

    fn host_layouts(&self) -> Vec<HostLayout> {
        vec![
            host_layout!(KnormParams in [&KNORM_SCORES] as "Params" { n_heads, desc_base, t_stride, window, page_size, page_words, dw, _pad }),
        ]
    }
}

/// The score of each of the first `c` slots of `keys` (`[t][d]`): minus its
/// L2 norm, rounded to f32 (sums in f64).
pub fn scores_cpu(keys: &[f32], c: usize, d: usize) -> Vec<f32> {
    (0..c)
        .map(|t| {
            let ss: f64 = keys[t * d..][..d].iter().map(|v| (*v as f64).powi(2)).sum();
            -(ss.sqrt() as f32)
        })
        .collect()
}

static KNORM_SCORES: Kernel = Kernel {
    name: "knorm_scores",
    sources: &[pages::PAGES_WGSL, KNORM_WGSL],
    entries: &["knorm_scores"],
    needs: OptionalFeatures::NONE,
};

/// Per (candidate slot, stored head): `scores[s * t_stride + t] = -||k||`.
const KNORM_WGSL: &str = r#"
override KV_F16: bool = true;

struct Params {
    n_heads: u32,
    desc_base: u32,   // desc entry of stored head 0
    t_stride: u32,    // scores per stored head
    window: u32,
    page_size: u32,
    page_words: u32,
    dw: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> desc: array<u32>;
@group(0) @binding(2) var<storage, read> tables: array<u32>;
@group(0) @binding(3) var<storage, read> pool: array<u32>;
@group(0) @binding(4) var<storage, read_write> scores: array<f32>;

@compute @workgroup_size(256)
fn knorm_scores(@builtin(global_invocation_id) id: vec3<u32>) {
    let t = id.x;
    let s = id.y;
    let d = (p.desc_base + s) * 2u;
    let len = desc[d + 1u];
    if t >= len - min(len, p.window) {
        return;
    }
    let g = geom();
    let kb = slot_page(g, desc[d], t) + key_at(g, t % g.page_size);
    var ss = 0.0;
    for (var w = 0u; w < p.dw; w = w + 1u) {
        if KV_F16 {
            let k = unpack2x16float(pool[kb + w]);
            ss = ss + k.x * k.x + k.y * k.y;
        } else {
            let k = bitcast<f32>(pool[kb + w]);
            ss = ss + k * k;
        }
    }
    scores[s * p.t_stride + t] = -sqrt(ss);
}
"#;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct KnormParams {
    n_heads: u32,
    desc_base: u32,
    t_stride: u32,
    window: u32,
    page_size: u32,
    page_words: u32,
    dw: u32,
    _pad: u32,
}

/// Records the kernel over the layer's candidates.
fn scores_gpu(cx: &LayerCx) -> Result<Dispatch> {
    let (ctx, kv, bufs) = (cx.ctx, &cx.job.kv, cx.bufs);
    let l = kv.layout;
    let params = KnormParams {
        n_heads: u32_of("stored heads", kv.n_heads)?,
        desc_base: u32_of("desc base", kv.desc_base)?,
        t_stride: u32_of("t stride", bufs.t_max)?,
        window: u32_of("window", cx.cfg.window)?,
        page_size: u32_of("page size", l.page_size)?,
        page_words: u32_of("page words", l.page_words())?,
        dw: u32_of("dw", l.dw())?,
        _pad: 0,
    };
    let f16 = if l.kv_f16 { 1.0 } else { 0.0 };
    let pipeline = ctx.pipeline(&KNORM_SCORES, "knorm_scores", &[("KV_F16", f16)])?;
    Dispatch::with_params_at(
        ctx,
        pipeline,
        "kvsift.compress.knorm_scores".into(),
        &params,
        &[
            (1, kv.desc.binding()),
            (2, kv.tables.binding()),
            (3, kv.pool.binding()),
            (4, bufs.scores.binding()),
        ],
        [
            u32_of("workgroups", cx.slots().div_ceil(256).max(1))?,
            u32_of("stored heads", kv.n_heads)?,
            1,
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::compression::gpu::{ScratchPool, select_gpu, select_layer};
    use crate::kv::compression::{Granularity, Method, select_cpu};
    use crate::testing::{Rng, gpu};

    fn config(budget: usize, window: usize) -> CompressConfig {
        let mut c = CompressConfig::new(Method::KNorm, budget);
        c.window = window;
        c
    }

    /// The contract on a hand-made layer: candidate norms 3, 1, 2, 1, 5, 0.5
    /// and a window of 2. Budget 5 keeps the three smallest (0.5 and both
    /// 1s) plus the window; budget 4 breaks the tie of 1s to the lower slot.
    #[test]
    fn keeps_the_smallest_norms_with_ties_to_the_lower_slot() {
        let norms = [3.0f32, 1.0, 2.0, 1.0, 5.0, 0.5, 9.0, 9.0];
        // Keys along the first axis of d = 2.
        let keys: Vec<f32> = norms.iter().flat_map(|&n| [n, 0.0]).collect();
        let queries = vec![0.0; 2 * 2];
        let x = Captured {
            keys: &keys,
            queries: &queries,
            hkv: 1,
            hq: 1,
            t: norms.len(),
            q_rows: 2,
            d: 2,
        };
        let kept = |b| select_cpu(&config(b, 2), &x, 0, 1).unwrap().kept;
        assert_eq!(kept(5), [vec![1, 3, 5, 6, 7]]);
        // Budget 4: two of {0.5, 1 at slot 1, 1 at slot 3}: 0.5, then the lower 1.
        assert_eq!(kept(4), [vec![1, 5, 6, 7]]);
        // Shorter than the budget: everything.
        assert_eq!(kept(9), [(0..8).collect::<Vec<_>>()]);
    }

    /// Random layers through the GPU (f32 slots, `kvsift select`'s path)
    /// against the CPU reference: one candidate, non-multiples of the
    /// workgroup, several workgroups, head dims 64 and 128, both
    /// granularities with GQA.
    #[test]
    fn gpu_selection_equals_the_reference() {
        let Some(ctx) = gpu() else { return };
        let mut rng = Rng::new(41);
        for &(hkv, g, t, d, w, b) in &[
            (1, 1, 9, 64, 8, 9),
            (2, 2, 300, 64, 8, 40),
            (2, 4, 700, 128, 16, 100),
            (1, 2, 1025, 128, 4, 512),
        ] {
            let keys = rng.normals(hkv * t * d);
            let queries = rng.normals(hkv * g * w * d);
            let x = Captured {
                keys: &keys,
                queries: &queries,
                hkv,
                hq: hkv * g,
                t,
                q_rows: w,
                d,
            };
            for granularity in [Granularity::KvHead, Granularity::QueryHead] {
                let mut cfg = config(b, w);
                cfg.granularity = granularity;
                let want = select_cpu(&cfg, &x, 0, 1).unwrap();
                let got = select_gpu(ctx, &cfg, &x, 0, 1).unwrap();
                assert_eq!(got, want, "t={t} d={d} {granularity:?}");
            }
        }
    }

    /// f16 slots (the engine's default cache): the kernel's scores against
    /// the twin on the f16-rounded keys, through shuffled page tables and
    /// a scratch longer than the heads.
    #[test]
    fn gpu_scores_on_f16_slots_match_the_twin() {
        let Some(ctx) = gpu() else { return };
        let mut rng = Rng::new(43);
        let (hkv, t, d, w) = (2, 261, 128, 4);
        let keys = rng.normals(hkv * t * d);
        let rounded: Vec<f32> = keys
            .iter()
            .map(|v| half::f16::from_f32(*v).to_f32())
            .collect();
        let queries = vec![0.0; hkv * w * d];
        let x = Captured {
            keys: &keys,
            queries: &queries,
            hkv,
            hq: hkv,
            t,
            q_rows: w,
            d,
        };
        let n_pages = hkv * t.div_ceil(16);
        let mut order: Vec<usize> = (0..n_pages).collect();
        for i in (1..n_pages).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let sp = ScratchPool::upload(ctx, &x, 1, true, Some(&order), t + 37, 1).unwrap();
        let cfg = config(100, w);
        let job = sp.job(&x, 0, 1);
        let mut pending = vec![];
        let keep = select_layer(ctx, &cfg, &job, &sp.bufs, &mut pending)
            .unwrap()
            .unwrap();
        pending.extend(keep.dispatches);
        ctx.run("test.knorm", &pending.iter().collect::<Vec<_>>())
            .unwrap();
        let got = sp.bufs.scores.read(ctx).unwrap();
        for h in 0..hkv {
            let want = scores_cpu(&rounded[h * t * d..][..t * d], t - w, d);
            for (i, (a, b)) in got[h * sp.bufs.t_max..].iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs(),
                    "head {h} slot {i}: {a} vs {b}"
                );
            }
        }
    }
}
