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

/// The quantized matvec against its twin (the blocks dequantized, then the
/// f64 projection): sizes of one row and one block, odd block counts (rows
/// that start mid-word), row counts off the 4-row blocks, many workgroups,
/// head-sized and wide rows, several vectors, accumulation; both reduction
/// variants; every format (q4_K and q6_K on 256-weight super-blocks). The
/// kernel scales each block's integer dot product once, the twin each
/// weight: f32 rounding over k terms, NMSE far below 1e-9.
#[test]
fn matvec_quant_matches_its_twin() {
    use crate::ops::linear::linear_cpu;
    use crate::testing::{assert_nmse, gpu};
    let Some(ctx) = gpu() else { return };
    let mut kernels = vec![&MATVEC_QUANT.workgroup];
    if ctx.caps.features.subgroups {
        kernels.push(&MATVEC_QUANT.subgroup);
    }
    let mut rng = crate::rng::Rng::new(11);
    let mut rng2 = crate::rng::Rng::new(12);
    let mut normal = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect() };
    let small = [
        (1, 32, 1, false),
        (3, 96, 1, false),
        (5, 64, 2, true),
        (13, 32 * 33, 3, false),
        (67, 128, 1, true),
        (301, 256, 4, false),
    ];
    // Super-blocks of 256: one, an odd count (q6_K rows then start
    // mid-word), rows off the 4-row blocks, several vectors.
    let large = [
        (1, 256, 1, false),
        (3, 256 * 3, 2, true),
        (13, 512, 1, false),
        (67, 256, 3, false),
    ];
    for format in [
        QuantFormat::Q8_0,
        QuantFormat::Q4_0,
        QuantFormat::Q4K,
        QuantFormat::Q6K,
    ] {
        let shapes: &[(usize, usize, usize, bool)] = if format.block_weights() == 32 {
            &small
        } else {
            &large
        };
        for &(rows, cols, n_vecs, accumulate) in shapes {
            // q8_0/q4_0 quantized from random values; the K formats (no
            // reference quantizer, the gguf package has none either) random
            // blocks with modest f16 scales.
            let n_blocks = rows * cols / format.block_weights();
            let blocks = crate::testing::random_quant_blocks(format, n_blocks, &mut rng2);
            let w = QuantMatrix::upload(ctx, "w", format, rows, cols, &blocks).unwrap();
            let x = normal(n_vecs * cols);
            let y0 = normal(n_vecs * rows);
            let mut want: Vec<f64> = y0.iter().map(|&v| v as f64).collect();
            linear_cpu(
                &dequantize(format, &blocks),
                cols,
                None,
                &x,
                &mut want,
                accumulate,
            );
            let xb = GpuBuffer::from_slice(ctx, "x", &x).unwrap();
            for kernel in &kernels {
                let yb = GpuBuffer::from_slice(ctx, "y", &y0).unwrap();
                let d = matvec_quant(ctx, kernel, &w, &xb, &yb, n_vecs, accumulate).unwrap();
                ctx.run("test", &[&d]).unwrap();
                let got = yb.read(ctx).unwrap();
                let what = format!(
                    "{} {} [{rows}, {cols}] x{n_vecs} acc {accumulate}",
                    kernel.name,
                    format.name()
                );
                assert_nmse(&what, &got, &want, 1e-9);
            }
        }
    }
}
