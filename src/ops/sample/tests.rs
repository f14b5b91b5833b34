//! The sampler against its CPU twin.

use super::*;
use crate::testing::{Rng, gpu};

fn gpu_sample(
    ctx: &GpuContext,
    kernel: &'static Kernel,
    logits: &[f32],
    seen: &[u32],
    params: &SamplingParams,
    us: &[f32],
) -> (Vec<u32>, Vec<u32>) {
    // All draws in one dispatch: row r samples the same logits with u[r],
    // each row with its own copy of the seen mask (lane r).
    let n = logits.len();
    let rows = us.len();
    let all_logits: Vec<f32> = (0..rows).flat_map(|_| logits.iter().copied()).collect();
    let all_seen: Vec<u32> = (0..rows).flat_map(|_| seen.iter().copied()).collect();
    let lb = GpuBuffer::from_slice(ctx, "logits", &all_logits).unwrap();
    let sb = GpuBuffer::from_slice(ctx, "seen", &all_seen).unwrap();
    let ob = GpuBuffer::<u32>::zeros(ctx, "out", rows).unwrap();
    let mut s = Sampler::with_kernel(ctx, kernel, n, rows).unwrap();
    let d = s.dispatch(ctx, rows, &lb, &sb, &ob).unwrap();
    s.set_rows(ctx, us.iter().enumerate().map(|(r, u)| (*params, r, *u)))
        .unwrap();
    ctx.run("test", &[&d]).unwrap();
    let got = ob.read(ctx).unwrap();
    let seen_after = sb.read(ctx).unwrap();
    // The last row's mask.
    let w = seen.len();
    (got, seen_after[(rows - 1) * w..].to_vec())
}

/// Draws within this relative distance of a CDF or top-p boundary are
/// skipped: the f32 GPU sums and the f64 twin may round to either side.
const MARGIN: f64 = 1e-4;

fn near_boundary(logits: &[f32], seen: &[u32], params: &SamplingParams, u: f32) -> bool {
    let Distribution::Kept {
        weights: kept,
        scores: s,
    } = kept_distribution(logits, seen, params)
    else {
        return false;
    };
    let total: f64 = kept.iter().sum();
    let target = u as f64 * total;
    let mut acc = 0.0;
    for v in &kept {
        acc += v;
        if (acc - target).abs() <= MARGIN * total {
            return true;
        }
    }
    // top-p and min-p boundaries, when those filters are on
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
    let z: f64 = e.iter().sum();
    let near_p = params.top_p < 1.0
        && (0..e.len()).any(|j| {
            let above: f64 = e.iter().filter(|v| **v > e[j]).sum();
            (above - params.top_p as f64 * z).abs() <= MARGIN * z
        });
    let near_min =
        params.min_p > 0.0 && e.iter().any(|v| (v - params.min_p as f64).abs() <= MARGIN);
    near_p || near_min
}

#[test]
fn sampling_matches_twin() {
    let Some(ctx) = gpu() else { return };
    let mut kernels = vec![&SAMPLE.workgroup];
    if ctx.caps.features.subgroups {
        kernels.push(&SAMPLE.subgroup);
    }
    let mut compared = 0;
    let mut skipped = 0;
    for (case, &n) in [1usize, 7, 64, 128, 300, 1000, 5003].iter().enumerate() {
        let mut rng = Rng::new(300 + case as u64);
        let logits: Vec<f32> = (0..n).map(|_| 3.0 * rng.normal()).collect();
        let mut seen = vec![0u32; seen_words(n)];
        let marked: Vec<u32> = (0..n / 5).map(|_| rng.below(n) as u32).collect();
        mark_seen(&mut seen, &marked);
        let settings = [
            SamplingParams {
                temperature: 1.0,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                temperature: 0.7,
                top_k: 20,
                top_p: 0.8,
                repetition_penalty: 1.05,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                temperature: 1.3,
                top_k: 5,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                temperature: 0.9,
                top_p: 0.5,
                min_p: 0.05,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                repetition_penalty: 1.3,
                ..SamplingParams::greedy()
            },
        ];
        let us: Vec<f32> = (0..12).map(|_| rng.uniform()).collect();
        for params in &settings {
            for kernel in &kernels {
                let (got, seen_after) = gpu_sample(ctx, kernel, &logits, &seen, params, &us);
                for (&u, &g) in us.iter().zip(&got) {
                    if near_boundary(&logits, &seen, params, u) {
                        skipped += 1;
                        continue;
                    }
                    let want = sample_cpu(&logits, &seen, params, u).unwrap();
                    assert_eq!(
                        g, want,
                        "{} n={n} {params:?} u={u}: got token {g}, want {want}",
                        kernel.name
                    );
                    compared += 1;
                }
                // The last chosen token is now marked seen.
                let last = *got.last().unwrap() as usize;
                assert_eq!(
                    (seen_after[last / 32] >> (last % 32)) & 1,
                    1,
                    "seen bit of {last}"
                );
            }
        }
    }
    eprintln!("sampling: {compared} draws compared, {skipped} near a boundary skipped");
    assert!(
        skipped * 20 < compared,
        "too many draws skipped: {skipped} of {}",
        compared + skipped
    );
}

#[test]
fn non_finite_rows_give_no_token_and_mark_nothing() {
    let Some(ctx) = gpu() else { return };
    let mut kernels = vec![&SAMPLE.workgroup];
    if ctx.caps.features.subgroups {
        kernels.push(&SAMPLE.subgroup);
    }
    let n = 300;
    let mut rng = Rng::new(77);
    let base: Vec<f32> = (0..n).map(|_| 3.0 * rng.normal()).collect();
    let spoil = |at: usize, v: f32| {
        let mut l = base.clone();
        l[at] = v;
        l
    };
    let greedy = SamplingParams::greedy();
    let warm = SamplingParams {
        temperature: 0.8,
        top_k: 40,
        ..greedy
    };
    let cold = SamplingParams {
        temperature: 2e-5,
        ..greedy
    };
    // (logits, params, a token or not)
    let cases = [
        (spoil(0, f32::NAN), greedy, false),
        (spoil(n - 1, f32::NAN), warm, false),
        (spoil(17, f32::INFINITY), greedy, false),
        (spoil(17, f32::NEG_INFINITY), warm, false),
        // finite logits whose tempered scores overflow f32
        (spoil(5, 1e34), cold, false),
        (base.clone(), warm, true),
        (base.clone(), greedy, true),
    ];
    for kernel in &kernels {
        for (i, (logits, params, has_token)) in cases.iter().enumerate() {
            let seen = vec![0u32; seen_words(n)];
            let (got, seen_after) = gpu_sample(ctx, kernel, logits, &seen, params, &[0.3]);
            let want = sample_cpu(logits, &seen, params, 0.3);
            assert_eq!(want.is_some(), *has_token, "case {i}: twin {want:?}");
            assert_eq!(
                got[0],
                want.unwrap_or(NO_TOKEN),
                "{} case {i}: got {}, twin {want:?}",
                kernel.name,
                got[0]
            );
            let marked: u32 = seen_after.iter().map(|w| w.count_ones()).sum();
            assert_eq!(marked, *has_token as u32, "case {i}: seen bits {marked}");
        }
    }
}

#[test]
fn bad_sampling_flags_are_errors() {
    for (p, flag) in [
        (
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            "--temperature",
        ),
        (
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            "--top-p",
        ),
        (
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
            "--top-p",
        ),
        (
            SamplingParams {
                min_p: 2.0,
                ..Default::default()
            },
            "--min-p",
        ),
        (
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            "--repetition-penalty",
        ),
    ] {
        let e = p.validate().unwrap_err().to_string();
        assert!(e.contains(flag), "{e}");
    }
    assert!(SamplingParams::default().validate().is_ok());
}

#[test]
fn the_twin_defines_non_finite_rows_for_every_setting() {
    let mut logits = vec![0.5f32; 40];
    logits[3] = f32::NAN;
    for params in [
        SamplingParams::greedy(),
        SamplingParams {
            temperature: 0.7,
            top_k: 5,
            top_p: 0.9,
            min_p: 0.1,
            repetition_penalty: 1.2,
            ..SamplingParams::greedy()
        },
    ] {
        assert_eq!(sample_cpu(&logits, &[u32::MAX; 2], &params, 0.5), None);
        assert_eq!(
            kept_distribution(&logits, &[], &params),
            Distribution::NonFinite
        );
    }
    // An empty row, a short seen mask, a temperature near zero.
    assert_eq!(sample_cpu(&[], &[], &SamplingParams::greedy(), 0.5), None);
    let cold = SamplingParams {
        temperature: 1e-30,
        ..SamplingParams::greedy()
    };
    assert!(cold.validate().is_ok() && cold.is_greedy());
    assert_eq!(sample_cpu(&[1.0, 3.0, 2.0], &[], &cold, 0.9), Some(1));
    let mut mask = vec![0u32; 1];
    mark_seen(&mut mask, &[3, 1000]);
    assert_eq!(mask, vec![8]);
}
