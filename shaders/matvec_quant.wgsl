// matvec_quant.wgsl: y[v, r] (+)= sum_k W[r, k] * x[v, k] (+ bias[r]) with W
// in llama.cpp's quantized blocks, as GGUF stores them (src/ops/quant.rs):
//   q8_0: 34-byte blocks of 32 weights: f16 d, 32 int8 q;     w = d * q
//   q4_0: 18-byte blocks of 32 weights: f16 d, 16 nibble bytes (low nibbles
//         weights 0-15, high 16-31);                          w = d * (q - 8)
// Blocks are not word-sized: a row of `row_words` BYTES (Params.row_words
// holds bytes here) starts at an even byte offset, and each block's bytes
// are gathered from the u32 words that hold them (no 8- or 16-bit storage).
//
// Dispatch as matvec.wgsl: one workgroup per 4 rows (row blocks folded into
// x/y), z = vector; each invocation walks a strided set of blocks for all 4
// rows (x read once for the 4), then one workgroup reduction (prelude:
// reduce_workgroup.wgsl or reduce_subgroup.wgsl; Params, bias, y, row_starts
// and store from matvec_common.wgsl).
//
// Bindings:
//   0 params  uniform Params (row_words: bytes per row)
//   1 w       storage read  [rows * row_bytes, padded to words] blocks
//   2 x       storage read  [n_vecs, x_stride] f32
//   3 bias    storage read  [y_offset + rows] f32 (unused unless flags & 1)
//   4 y       storage rw    [n_vecs, y_stride] f32

@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;

// The 4 bytes at byte offset `at` (even), as one little-endian word.
fn word_at(at: u32) -> u32 {
    let i = at >> 2u;
    if (at & 3u) == 0u {
        return w[i];
    }
    return (w[i] >> 16u) | (w[i + 1u] << 16u);
}

// The f16 at byte offset `at` (even).
fn half_at(at: u32) -> f32 {
    let word = w[at >> 2u];
    let bits = select(word & 0xffffu, word >> 16u, (at & 2u) != 0u);
    return unpack2x16float(bits).x;
}

// The four int8 of a word, in byte order.
fn i8x4(u: u32) -> vec4<f32> {
    return vec4<f32>(
        f32(bitcast<i32>(u << 24u) >> 24u),
        f32(bitcast<i32>(u << 16u) >> 24u),
        f32(bitcast<i32>(u << 8u) >> 24u),
        f32(bitcast<i32>(u) >> 24u),
    );
}

// The four nibbles (low, or high with shift 4) of a word, minus 8.
fn nibbles(u: u32, shift: u32) -> vec4<f32> {
    let q = (u >> shift) & 0x0f0f0f0fu;
    return vec4<f32>(
        f32(q & 0xffu),
        f32((q >> 8u) & 0xffu),
        f32((q >> 16u) & 0xffu),
        f32(q >> 24u),
    ) - vec4<f32>(8.0);
}

fn x4(at: u32) -> vec4<f32> {
    return vec4<f32>(x[at], x[at + 1u], x[at + 2u], x[at + 3u]);
}

// Block `b` of the row starting at byte `row` against x at `xb` (q8_0).
fn dot_q8_0(row: u32, b: u32, xb: u32) -> f32 {
    let at = row + b * 34u;
    var s = 0.0;
    for (var j = 0u; j < 8u; j = j + 1u) {
        s = s + dot(i8x4(word_at(at + 2u + 4u * j)), x4(xb + 32u * b + 4u * j));
    }
    return half_at(at) * s;
}

// The same for q4_0: word j of the nibbles holds weights 4j..4j+3 (low) and
// 16+4j..16+4j+3 (high).
fn dot_q4_0(row: u32, b: u32, xb: u32) -> f32 {
    let at = row + b * 18u;
    let xk = xb + 32u * b;
    var s = 0.0;
    for (var j = 0u; j < 4u; j = j + 1u) {
        let u = word_at(at + 2u + 4u * j);
        s = s + dot(nibbles(u, 0u), x4(xk + 4u * j)) + dot(nibbles(u, 4u), x4(xk + 16u + 4u * j));
    }
    return half_at(at) * s;
}

const Q8_0: u32 = 0u;
const Q4_0: u32 = 1u;

fn block_dot(format: u32, row: u32, b: u32, xb: u32) -> f32 {
    if format == Q8_0 {
        return dot_q8_0(row, b, xb);
    }
    return dot_q4_0(row, b, xb);
}

// Both entry points: rows r0..r0+3 of vector v against their blocks.
fn matvec_blocks(format: u32, lane: Lane, wg: vec3<u32>, nwg: vec3<u32>) {
    let block = wg.x + wg.y * nwg.x;
    if block >= p.row_blocks {
        return;
    }
    let v = wg.z;
    let r0 = block * ROWS;
    let rb = row_starts(r0, p.row_words);
    let xb = v * p.x_stride;
    var acc = vec4<f32>(0.0);
    for (var b = lane.lid; b < p.cols / 32u; b = b + WG) {
        acc = acc + vec4<f32>(
            block_dot(format, rb.x, b, xb),
            block_dot(format, rb.y, b, xb),
            block_dot(format, rb.z, b, xb),
            block_dot(format, rb.w, b, xb),
        );
    }
    store(r0, v, workgroup_sum4(acc, lane), lane.lid);
}

@compute @workgroup_size(WG)
fn matvec_q8_0(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    matvec_blocks(Q8_0, lane, wg, nwg);
}

@compute @workgroup_size(WG)
fn matvec_q4_0(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    matvec_blocks(Q4_0, lane, wg, nwg);
}
