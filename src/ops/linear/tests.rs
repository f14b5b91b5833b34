//! The projection kernels against their CPU twins.

use super::*;
use crate::gpu::GpuOptions;
use crate::testing::{Rng, assert_nmse, gpu};

/// f32 accumulation over k terms against the f64 twin: NMSE stays near
/// k * 2^-48; 1e-9 leaves a wide margin yet catches any indexing error.
const LINEAR_NMSE: f64 = 1e-9;

#[derive(Clone, Copy)]
enum Which {
    Matvec(&'static Kernel),
    Matmul,
}

fn variants(ctx: &GpuContext, n_vecs: usize) -> Vec<(String, Which)> {
    let mut v = vec![("matmul".to_string(), Which::Matmul)];
    if n_vecs <= 64 {
        v.push(("matvec".into(), Which::Matvec(&MATVEC.workgroup)));
        if ctx.caps.features.subgroups {
            v.push(("matvec_subgroup".into(), Which::Matvec(&MATVEC.subgroup)));
            v.push(("matvec_rows".into(), Which::Matvec(&MATVEC_ROWS)));
        }
    }
    v
}

/// Adds `matvec_vec4` where it applies to this case.
fn variants_for(ctx: &GpuContext, args: &Linear) -> Vec<(String, Which)> {
    let mut v = variants(ctx, args.n_vecs);
    if ctx.caps.features.subgroups && fits_vec4(args) && args.n_vecs <= 64 {
        v.push(("matvec_vec4".into(), Which::Matvec(&MATVEC_VEC4)));
    }
    v
}

#[allow(clippy::too_many_arguments)]
fn check_case(
    ctx: &GpuContext,
    seed: u64,
    rows: usize,
    cols: usize,
    n_vecs: usize,
    dtype: WeightDtype,
    with_bias: bool,
    accumulate: bool,
) {
    let mut rng = Rng::new(seed);
    let w: Vec<f32> = rng.normals(rows * cols);
    let x = rng.normals(n_vecs * cols);
    let bias = with_bias.then(|| rng.normals(rows));
    let y0 = rng.normals(n_vecs * rows);
    let stored: Vec<f32> = w.iter().map(|v| dtype.round(*v)).collect();
    let mut want: Vec<f64> = y0.iter().map(|v| *v as f64).collect();
    linear_cpu(&stored, cols, bias.as_deref(), &x, &mut want, accumulate);

    let wm = GpuMatrix::upload(ctx, "test.w", rows, cols, dtype, &w).unwrap();
    let xb = GpuBuffer::from_slice(ctx, "test.x", &x).unwrap();
    let bb = bias
        .as_ref()
        .map(|b| GpuBuffer::from_slice(ctx, "test.bias", b).unwrap());
    let probe_y = GpuBuffer::<f32>::zeros(ctx, "test.probe", 1).unwrap();
    let probe = Linear {
        weights: &wm,
        bias: bb.as_ref(),
        x: &xb,
        y: &probe_y,
        n_vecs,
        accumulate,
    };
    for (name, which) in variants_for(ctx, &probe) {
        let yb = GpuBuffer::from_slice(ctx, "test.y", &y0).unwrap();
        let args = Linear { y: &yb, ..probe };
        let ds = match which {
            Which::Matvec(k) => matvec_with(ctx, k, &args),
            Which::Matmul => matmul(ctx, &args),
        }
        .unwrap();
        ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
        let got = yb.read(ctx).unwrap();
        assert_nmse(
            &format!(
                "{name} {dtype:?} rows {rows} cols {cols} vecs {n_vecs} bias {with_bias} acc {accumulate}"
            ),
            &got,
            &want,
            LINEAR_NMSE,
        );
    }
}

#[test]
fn linear_matches_twin_across_sizes_and_dtypes() {
    let Some(ctx) = gpu() else { return };
    // (rows, cols, vectors): size 1, non-multiples of the workgroup / tile,
    // many workgroups, head dims 64 and 128, odd k for f16 padding.
    let cases = [
        (1, 1, 1),
        (5, 7, 1),
        (3, 300, 2),
        (64, 64, 1),
        (128, 128, 3),
        (257, 129, 4),
        (1000, 33, 1),
        (130, 200, 65),
        (77, 64, 129),
        // matvec_rows' blocks of NV vectors (the power of two covering
        // the batch, at most 8): 3 -> 4 (partial), 6 -> 8 (partial), a
        // partial second block of 8, two full.
        (40, 72, 6),
        (50, 96, 9),
        (33, 65, 16),
        // matvec_vec4 (cols % 4 f32 / % 8 f16): one row, a row shorter
        // than a subgroup's stride, rows not a multiple of the block, many
        // workgroups and grid-stride passes; batches of 2, 5 (NV 8,
        // partial) and 12 (a full and a partial block).
        (1, 8, 1),
        (7, 12, 1),
        (77, 128, 1),
        (3001, 64, 1),
        (1029, 520, 1),
        (31, 24, 2),
        (300, 64, 5),
        (65, 128, 12),
    ];
    for (i, &(rows, cols, n)) in cases.iter().enumerate() {
        for dtype in [WeightDtype::F32, WeightDtype::F16] {
            check_case(
                ctx,
                100 + i as u64,
                rows,
                cols,
                n,
                dtype,
                i % 2 == 0,
                i % 3 == 1,
            );
        }
    }
}

/// `y (+)= W rmsnorm(x) (+ bias)` against the twins of rmsnorm and linear,
/// fused (one vector, rows of whole vec4s) and not.
#[test]
fn norm_linear_matches_rmsnorm_then_linear() {
    let Some(ctx) = gpu() else { return };
    // (rows, cols, vectors): fused where rows fill vec4s (cols % 8 for
    // f16; 12 columns fuse for f32 only), one vector or a batch.
    let cases = [
        (1, 8, 1),
        (77, 64, 1),
        (3001, 128, 1),
        (20, 12, 1),
        (33, 64, 3),
        (9, 16, 16),
        (40, 20, 5),
        // Quantized rows (fused by matvec_quant_rows): one block, a pass of
        // NV 4, two passes (9 vectors), super-blocks.
        (5, 32, 1),
        (33, 96, 3),
        (9, 64, 9),
        (21, 256, 2),
    ];
    for (i, &(rows, cols, n)) in cases.iter().enumerate() {
        for dtype in dtypes_for(cols) {
            let mut rng = Rng::new(300 + i as u64);
            let (wm, stored) = test_matrix(ctx, &mut rng, dtype, rows, cols);
            let x: Vec<f32> = rng.normals(n * cols).iter().map(|v| 3.0 * v).collect();
            let g: Vec<f32> = rng.normals(cols);
            let bias = rng.normals(rows);
            let y0 = rng.normals(n * rows);
            let eps = 1e-5;
            let accumulate = i % 2 == 1;
            let shape = NormShape::rows(n, cols, eps);
            let x64: Vec<f64> = x.iter().map(|v| *v as f64).collect();
            let mut normed = vec![0.0; n * cols];
            crate::ops::rmsnorm::rmsnorm_cpu(&shape, &x64, &g, &mut normed);
            let normed32: Vec<f32> = normed.iter().map(|v| *v as f32).collect();
            let mut want: Vec<f64> = y0.iter().map(|v| *v as f64).collect();
            linear_cpu(&stored, cols, Some(&bias), &normed32, &mut want, accumulate);

            let xb = GpuBuffer::from_slice(ctx, "test.x", &x).unwrap();
            let gb = GpuBuffer::from_slice(ctx, "test.g", &g).unwrap();
            let bb = GpuBuffer::from_slice(ctx, "test.bias", &bias).unwrap();
            let yb = GpuBuffer::from_slice(ctx, "test.y", &y0).unwrap();
            let scratch = GpuBuffer::<f32>::zeros(ctx, "test.normed", n * cols).unwrap();
            let args = Linear {
                weights: &wm,
                bias: Some(&bb),
                x: &xb,
                y: &yb,
                n_vecs: n,
                accumulate,
            };
            let norm = PreNorm {
                weight: &gb,
                eps,
                scratch: &scratch,
            };
            let can_fuse = fuses_prologue(ctx, &args);
            let per_quad = match dtype {
                WeightDtype::F32 => 4,
                WeightDtype::F16 => 8,
                // Every quantized row fuses.
                WeightDtype::Quant(_) => 1,
            };
            if ctx.caps.features.subgroups && ctx.caps.subgroup_max_size <= super::super::WG {
                assert_eq!(can_fuse, cols % per_quad == 0, "case {i} {dtype:?}");
            }
            let what = format!("norm_linear {dtype:?} rows {rows} cols {cols} vecs {n}");
            check_both_paths(
                ctx,
                &what,
                can_fuse,
                &yb,
                &y0,
                &want,
                LINEAR_NMSE,
                |fused| norm_linear_with(ctx, &norm, &args, fused).unwrap(),
            );
        }
    }
}

/// `y (+)= W (silu(gate) * up) (+ bias)` against the twins of silu_mul and
/// linear, fused and not.
#[test]
fn swiglu_linear_matches_silu_mul_then_linear() {
    let Some(ctx) = gpu() else { return };
    let cases = [
        (1, 8, 1),
        (64, 128, 1),
        (1500, 512, 1),
        (9, 12, 1),
        (17, 64, 2),
        (30, 40, 7),
        (5, 8, 16),
        (7, 32, 1),
        (40, 128, 5),
        (3, 512, 12),
    ];
    for (i, &(rows, cols, n)) in cases.iter().enumerate() {
        for dtype in dtypes_for(cols) {
            let mut rng = Rng::new(500 + i as u64);
            let (wm, stored) = test_matrix(ctx, &mut rng, dtype, rows, cols);
            let gate_up: Vec<f32> = rng.normals(n * 2 * cols).iter().map(|v| 4.0 * v).collect();
            let y0 = rng.normals(n * rows);
            let accumulate = i % 2 == 0;
            let act: Vec<f32> = crate::ops::silu_mul::silu_mul_cpu(&gate_up, cols)
                .iter()
                .map(|v| *v as f32)
                .collect();
            let mut want: Vec<f64> = y0.iter().map(|v| *v as f64).collect();
            linear_cpu(&stored, cols, None, &act, &mut want, accumulate);

            let xb = GpuBuffer::from_slice(ctx, "test.gate_up", &gate_up).unwrap();
            let yb = GpuBuffer::from_slice(ctx, "test.y", &y0).unwrap();
            let act_b = GpuBuffer::<f32>::zeros(ctx, "test.act", n * cols).unwrap();
            let args = Linear {
                weights: &wm,
                bias: None,
                x: &xb,
                y: &yb,
                n_vecs: n,
                accumulate,
            };
            let what = format!("swiglu_linear {dtype:?} rows {rows} cols {cols} vecs {n}");
            let can_fuse = fuses_prologue(ctx, &args);
            // exp on the GPU is accurate to a few ulp (see silu_mul's test).
            check_both_paths(ctx, &what, can_fuse, &yb, &y0, &want, 1e-8, |fused| {
                swiglu_linear_with(ctx, &act_b, &args, fused).unwrap()
            });
        }
    }
}

/// The dtypes a row of `cols` weights can be stored in.
fn dtypes_for(cols: usize) -> Vec<WeightDtype> {
    let mut out = vec![WeightDtype::F32, WeightDtype::F16];
    out.extend(
        crate::gpu::QuantFormat::ALL
            .into_iter()
            .map(WeightDtype::Quant)
            .filter(|d| d.fits(cols)),
    );
    out
}

/// A random `[rows, cols]` matrix in `dtype` and the values it holds:
/// normals for f32/f16, random blocks for the quantized formats.
fn test_matrix(
    ctx: &GpuContext,
    rng: &mut Rng,
    dtype: WeightDtype,
    rows: usize,
    cols: usize,
) -> (GpuMatrix, Vec<f32>) {
    match dtype.quant() {
        Some(f) => crate::testing::random_quant_matrix(ctx, f, rows, cols, rng),
        None => {
            let w = rng.normals(rows * cols);
            let m = GpuMatrix::upload(ctx, "test.w", rows, cols, dtype, &w).unwrap();
            (m, w.iter().map(|v| dtype.round(*v)).collect())
        }
    }
}

/// Runs `build(fused)` unfused (a prologue dispatch, then the projection)
/// and, where the device can, fused (one dispatch), each from `y = y0`,
/// and compares `y` with `want`.
#[allow(clippy::too_many_arguments)]
fn check_both_paths(
    ctx: &GpuContext,
    what: &str,
    can_fuse: bool,
    y: &GpuBuffer<f32>,
    y0: &[f32],
    want: &[f64],
    nmse: f64,
    build: impl Fn(bool) -> Vec<Dispatch>,
) {
    for fused in [false, true] {
        if fused && !can_fuse {
            continue;
        }
        y.write(ctx, 0, y0).unwrap();
        let ds = build(fused);
        assert_eq!(ds.len(), if fused { 1 } else { 2 });
        ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
        assert_nmse(
            &format!("{what} fused {fused}"),
            &y.read(ctx).unwrap(),
            want,
            nmse,
        );
    }
}

#[test]
fn linear_with_bias_and_accumulate() {
    let Some(ctx) = gpu() else { return };
    for (i, dtype) in [WeightDtype::F32, WeightDtype::F16].into_iter().enumerate() {
        check_case(ctx, 7 + i as u64, 96, 128, 2, dtype, true, true);
        check_case(ctx, 9 + i as u64, 96, 128, 70, dtype, true, true);
    }
}

#[test]
fn matrices_split_across_bindings_give_the_same_result() {
    if gpu().is_none() {
        return;
    }
    // A device whose binding limit kvsift plans with is 4 KiB: a 100 x 37
    // f32 matrix (148 B per row) becomes 4 parts, f16 (76 B per row) 2.
    let opts = GpuOptions {
        max_binding_bytes: Some(4096),
        ..GpuOptions::from_env().unwrap()
    };
    let ctx = GpuContext::new(&opts).unwrap();
    let w = GpuMatrix::upload(&ctx, "t", 100, 37, WeightDtype::F32, &[0.5; 3700]).unwrap();
    assert_eq!(w.parts.len(), 4);
    for dtype in [WeightDtype::F32, WeightDtype::F16] {
        check_case(&ctx, 11, 100, 37, 1, dtype, true, false);
        check_case(&ctx, 12, 100, 37, 67, dtype, true, true);
    }
}

#[test]
fn a_matrix_larger_than_the_real_binding_limit_works() {
    let Some(ctx) = gpu() else { return };
    // Just over the device's own limit (128 MiB on lavapipe), when the device
    // can hold it; on desktop GPUs with multi-GiB limits this is skipped.
    let limit = ctx.caps.max_binding_bytes;
    let cols = 4096usize;
    let rows = (limit as usize / (cols * 4)) + 3;
    if (rows * cols * 4) as u64 > 512 << 20 {
        eprintln!("skipped: binding limit {limit} too large to exceed cheaply");
        return;
    }
    let mut rng = Rng::new(5);
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() - 0.5).collect();
    let x = rng.normals(cols);
    let wm = GpuMatrix::upload(ctx, "big", rows, cols, WeightDtype::F32, &w).unwrap();
    assert!(
        wm.parts.len() >= 2,
        "expected a split, got {} part",
        wm.parts.len()
    );
    let xb = GpuBuffer::from_slice(ctx, "x", &x).unwrap();
    let yb = GpuBuffer::<f32>::zeros(ctx, "y", rows).unwrap();
    let args = Linear {
        weights: &wm,
        bias: None,
        x: &xb,
        y: &yb,
        n_vecs: 1,
        accumulate: false,
    };
    let ds = matvec(ctx, &args).unwrap();
    ctx.run("big", &ds.iter().collect::<Vec<_>>()).unwrap();
    let mut want = vec![0.0; rows];
    linear_cpu(&w, cols, None, &x, &mut want, false);
    assert_nmse(
        "matvec over the binding limit",
        &yb.read(ctx).unwrap(),
        &want,
        LINEAR_NMSE,
    );
}
