//! The block formats against llama.cpp's Python package
//! (`tools/make_gguf_vectors.py`): quantized blocks bit for bit, and the
//! dequantized weights bit for bit, for every format.

use super::*;

/// What the package wrote (the blocks as hex, as `model::gguf`'s test reads
/// them back from the file).
fn sample() -> serde_json::Value {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf");
    serde_json::from_str(&std::fs::read_to_string(dir.join("sample.json")).unwrap()).unwrap()
}

fn blocks(want: &serde_json::Value, name: &str) -> Vec<u8> {
    let hex = want["tensors"][name]["hex"].as_str().unwrap();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn quantizers_equal_the_reference_bit_for_bit() {
    let want = sample();
    for (name, quantize) in [
        ("q8_0.weight", quantize_q8_0 as fn(&[f32]) -> Vec<u8>),
        ("q4_0.weight", quantize_q4_0),
    ] {
        let source = floats(&want["tensors"][name]["source"]);
        let quantized = quantize(&source);
        assert_eq!(quantized, blocks(&want, name), "{name}");
    }
}

#[test]
fn dequantizers_equal_the_reference_bit_for_bit() {
    let want = sample();
    for (name, format) in [
        ("q8_0.weight", QuantFormat::Q8_0),
        ("q4_0.weight", QuantFormat::Q4_0),
        ("q4_k.weight", QuantFormat::Q4K),
        ("q6_k.weight", QuantFormat::Q6K),
    ] {
        let got = dequantize(format, &blocks(&want, name));
        let deq = floats(&want["tensors"][name]["dequantized"]);
        assert_eq!(got.len(), deq.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&deq).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: {g} vs {w}");
        }
    }
}

/// Round trips stay within each format's step: half a step for q8_0 (d =
/// max/127); for q4_0 (d = -max/8, levels -8d..7d) half a step, or one
/// where the far side clips at 7 steps.
#[test]
fn round_trips_stay_within_half_a_step() {
    let mut rng = crate::rng::Rng::new(5);
    let x: Vec<f32> = (0..32 * 9).map(|_| rng.uniform() * 4.0 - 2.0).collect();
    for (format, blocks, steps, bound) in [
        (QuantFormat::Q8_0, quantize_q8_0(&x), 127.0f32, 0.5f32),
        (QuantFormat::Q4_0, quantize_q4_0(&x), 8.0, 1.0),
    ] {
        assert_eq!(blocks.len(), format.bytes_for(x.len()));
        let y = dequantize(format, &blocks);
        for (b, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let step = amax / steps;
            for (a, c) in xs.iter().zip(ys) {
                assert!(
                    (a - c).abs() <= step * bound + step * 1e-2,
                    "{format:?} block {b}: {a} -> {c}"
                );
            }
        }
    }
    // An all-zero block has a zero scale and zero weights.
    assert_eq!(
        dequantize(QuantFormat::Q8_0, &quantize_q8_0(&[0.0; 32])),
        vec![0.0; 32]
    );
    assert_eq!(
        dequantize(QuantFormat::Q4_0, &quantize_q4_0(&[0.0; 32])),
        vec![0.0; 32]
    );
}

/// Every projection over quantized blocks against its twin (the blocks
/// dequantized, then the f64 projection): the decode matvec (both reduction
/// variants), the prefill matmul and `linear`'s pick, on sizes of one row
/// and one block, odd block counts (rows that start mid-word), row counts
/// off the 4-row blocks and the 64-row tiles, many workgroups, head-sized
/// and wide rows, several vectors, bias, accumulation; every format (q4_K
/// and q6_K on 256-weight super-blocks). The matvec scales each block's
/// integer dot product once, the twin each weight: f32 rounding over k
/// terms, NMSE far below 1e-9.
#[test]
fn quantized_projections_match_their_twin() {
    let Some(ctx) = crate::testing::gpu() else {
        return;
    };
    let small = [
        (1, 32, 1, false, false),
        (3, 96, 1, false, true),
        (5, 64, 2, true, false),
        (13, 32 * 33, 3, false, false),
        (67, 128, 1, true, true),
        (301, 256, 4, false, false),
        (70, 96, 67, true, true),
        // The rows kernel's passes of NV vectors: 3 -> 4, 9 -> 8 + 1, 16.
        (41, 96, 3, true, false),
        (40, 64, 9, false, true),
        (9, 32, 16, true, true),
    ];
    // Super-blocks of 256: one, an odd count (q6_K rows then start
    // mid-word), rows off the 4-row blocks, several vectors, a prefill.
    let large = [
        (1, 256, 1, false, false),
        (3, 256 * 3, 2, true, true),
        (13, 512, 1, false, false),
        (67, 256, 3, false, false),
        (65, 256, 70, true, false),
        (7, 512, 12, false, true),
    ];
    for format in QuantFormat::ALL {
        let shapes: &[_] = if format.block_weights() == 32 {
            &small
        } else {
            &large
        };
        for (i, &(rows, cols, n_vecs, bias, accumulate)) in shapes.iter().enumerate() {
            check_projection(
                ctx,
                40 + i as u64,
                format,
                rows,
                cols,
                n_vecs,
                bias,
                accumulate,
            );
        }
    }
}

/// Matrices split across bindings (a part per few rows) by every kernel:
/// each part starts its rows at byte 0 of its own binding and writes its
/// rows of y.
#[test]
fn quantized_matrices_split_across_bindings() {
    if crate::testing::gpu().is_none() {
        return;
    }
    let opts = crate::gpu::GpuOptions {
        max_binding_bytes: Some(2048),
        ..crate::gpu::GpuOptions::from_env().unwrap()
    };
    let ctx = GpuContext::new(&opts).unwrap();
    for (format, rows, cols) in [
        (QuantFormat::Q8_0, 61, 96),
        (QuantFormat::Q4_0, 50, 128),
        (QuantFormat::Q4K, 30, 256),
        (QuantFormat::Q6K, 21, 512),
    ] {
        let parts = check_projection(&ctx, 60, format, rows, cols, 2, true, true);
        assert!(parts >= 2, "{} split into {parts} parts", format.name());
        check_projection(&ctx, 61, format, rows, cols, 70, false, false);
    }
}

/// One case against the twin through every path; returns the part count.
#[allow(clippy::too_many_arguments)]
fn check_projection(
    ctx: &GpuContext,
    seed: u64,
    format: QuantFormat,
    rows: usize,
    cols: usize,
    n_vecs: usize,
    bias: bool,
    accumulate: bool,
) -> usize {
    use crate::gpu::GpuBuffer;
    use crate::ops::linear::{linear, linear_cpu, matmul};
    use crate::testing::{assert_nmse, random_quant_matrix};
    let mut rng = crate::rng::Rng::new(seed);
    let (w, stored) = random_quant_matrix(ctx, format, rows, cols, &mut rng);
    let mut uniform =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect() };
    let x = uniform(n_vecs * cols);
    let y0 = uniform(n_vecs * rows);
    let b = bias.then(|| uniform(rows));
    let mut want: Vec<f64> = y0.iter().map(|&v| v as f64).collect();
    linear_cpu(&stored, cols, b.as_deref(), &x, &mut want, accumulate);
    let xb = GpuBuffer::from_slice(ctx, "x", &x).unwrap();
    let bb = b.map(|b| GpuBuffer::from_slice(ctx, "bias", &b).unwrap());
    let mut paths: Vec<&str> = vec!["matmul", "linear"];
    if n_vecs <= 64 {
        paths.push("matvec_quant");
        if ctx.caps.features.subgroups {
            paths.push("matvec_quant_subgroup");
        }
        if ctx.caps.features.subgroups && ctx.caps.subgroup_max_size <= crate::ops::WG {
            paths.push("matvec_quant_rows");
        }
    }
    for path in paths {
        let yb = GpuBuffer::from_slice(ctx, "y", &y0).unwrap();
        let args = Linear {
            weights: &w,
            bias: bb.as_ref(),
            x: &xb,
            y: &yb,
            n_vecs,
            accumulate,
        };
        let ds = match path {
            "matmul" => matmul(ctx, &args),
            "linear" => linear(ctx, &args),
            "matvec_quant" => matvec_quant_with(ctx, &MATVEC_QUANT.workgroup, &args),
            "matvec_quant_rows" => matvec_quant_with(ctx, &MATVEC_QUANT_ROWS, &args),
            _ => matvec_quant_with(ctx, &MATVEC_QUANT.subgroup, &args),
        }
        .unwrap();
        ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
        let got = yb.read(ctx).unwrap();
        let what = format!(
            "{path} {} [{rows}, {cols}] x{n_vecs} bias {bias} acc {accumulate}",
            format.name()
        );
        assert_nmse(&what, &got, &want, 1e-9);
    }
    w.parts.len()
}

/// A matrix of segments in several dtypes (a GGUF Q4_K_M q/k/v: q4_K q and
/// k, a q6_K v; here f16, q8_0, q4_K): neighbours of one dtype share a part,
/// and every path (matvec, matmul, the fused norm) gives the twin's result.
#[test]
fn mixed_dtype_matrices_run_each_part_in_its_kernel() {
    use crate::gpu::{GpuBuffer, GpuMatrix, Segment, WeightDtype};
    use crate::ops::linear::{Linear, PreNorm, linear_cpu, matmul, matvec, norm_linear};
    use crate::testing::{assert_nmse, random_quant_blocks};
    let Some(ctx) = crate::testing::gpu() else {
        return;
    };
    let mut rng = crate::rng::Rng::new(71);
    let cols = 256;
    let segments = [
        Segment {
            rows: 5,
            dtype: WeightDtype::F16,
        },
        Segment {
            rows: 3,
            dtype: WeightDtype::F16,
        },
        Segment {
            rows: 6,
            dtype: WeightDtype::Q8_0,
        },
        Segment {
            rows: 7,
            dtype: WeightDtype::Quant(QuantFormat::Q4K),
        },
    ];
    // Each row as stored, and its values.
    let mut rows: Vec<(WeightDtype, Vec<u8>, Vec<f32>)> = vec![];
    for seg in &segments {
        for _ in 0..seg.rows {
            let row = match seg.dtype.quant() {
                Some(f) => {
                    let b = random_quant_blocks(f, cols / f.block_weights(), &mut rng);
                    let v = dequantize(f, &b);
                    (seg.dtype, b, v)
                }
                None => {
                    let v: Vec<f32> = rng
                        .normals(cols)
                        .iter()
                        .map(|x| seg.dtype.round(*x))
                        .collect();
                    (seg.dtype, vec![], v)
                }
            };
            rows.push(row);
        }
    }
    let w = GpuMatrix::upload_segments(ctx, "mixed", cols, &segments, |r, dtype, out| {
        let (d, bytes, values) = &rows[r];
        assert_eq!(*d, dtype);
        match dtype.quant() {
            Some(_) => {
                bytemuck::cast_slice_mut::<u32, u8>(out)[..bytes.len()].copy_from_slice(bytes);
                Ok(())
            }
            None => crate::gpu::matrix::pack_row(dtype, values, out),
        }
    })
    .unwrap();
    assert_eq!(w.parts.len(), 3, "f16 neighbours share a part");
    assert_eq!(w.dtype_names(), "f16+q8_0+q4_K");
    let stored: Vec<f32> = rows.iter().flat_map(|(_, _, v)| v.clone()).collect();
    let n_rows = stored.len() / cols;
    for n_vecs in [1, 3, 70] {
        let x: Vec<f32> = rng.normals(n_vecs * cols);
        let g: Vec<f32> = rng.normals(cols);
        let xb = GpuBuffer::from_slice(ctx, "x", &x).unwrap();
        let gb = GpuBuffer::from_slice(ctx, "g", &g).unwrap();
        let scratch = GpuBuffer::<f32>::zeros(ctx, "normed", n_vecs * cols).unwrap();
        let mut want = vec![0.0; n_vecs * n_rows];
        linear_cpu(&stored, cols, None, &x, &mut want, false);
        let shape = crate::ops::rmsnorm::NormShape::rows(n_vecs, cols, 1e-5);
        let x64: Vec<f64> = x.iter().map(|v| *v as f64).collect();
        let mut normed = vec![0.0; n_vecs * cols];
        crate::ops::rmsnorm::rmsnorm_cpu(&shape, &x64, &g, &mut normed);
        let normed: Vec<f32> = normed.iter().map(|v| *v as f32).collect();
        let mut want_norm = vec![0.0; n_vecs * n_rows];
        linear_cpu(&stored, cols, None, &normed, &mut want_norm, false);
        for (path, want) in [
            ("matvec", &want),
            ("matmul", &want),
            ("norm_linear", &want_norm),
        ] {
            if path == "matvec" && n_vecs > 16 {
                continue;
            }
            let yb = GpuBuffer::<f32>::zeros(ctx, "y", n_vecs * n_rows).unwrap();
            let args = Linear {
                weights: &w,
                bias: None,
                x: &xb,
                y: &yb,
                n_vecs,
                accumulate: false,
            };
            let norm = PreNorm {
                weight: &gb,
                eps: 1e-5,
                scratch: &scratch,
            };
            let ds = match path {
                "matvec" => matvec(ctx, &args),
                "matmul" => matmul(ctx, &args),
                _ => norm_linear(ctx, &norm, &args),
            }
            .unwrap();
            ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
            assert_nmse(
                &format!("mixed {path} x{n_vecs}"),
                &yb.read(ctx).unwrap(),
                want,
                1e-9,
            );
        }
    }
}
