// matvec_quant.wgsl: y[v, r] (+)= sum_k W[r, k] * x[v, k] (+ bias[r]) with W
// in llama.cpp's quantized blocks, as GGUF stores them (src/ops/quant.rs):
//   q8_0: 34-byte blocks of 32 weights: f16 d, 32 int8 q;     w = d * q
//   q4_0: 18-byte blocks of 32 weights: f16 d, 16 nibble bytes (low nibbles
//         weights 0-15, high 16-31);                          w = d * (q - 8)
//   q4_K: 144-byte super-blocks of 256: f16 d, f16 dmin, 12 bytes of 6-bit
//         scales and mins, 128 nibble bytes;                  w = d*sc*q - dmin*m
//   q6_K: 210-byte super-blocks of 256: 128 bytes of low nibbles, 64 of
//         2-bit highs, 16 int8 scales, f16 d;                 w = d*sc*(q - 32)
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

// The byte at offset `at`.
fn byte_at(at: u32) -> u32 {
    return (w[at >> 2u] >> ((at & 3u) * 8u)) & 0xffu;
}

// The four bytes of a word.
fn bytes4(u: u32) -> vec4<u32> {
    return vec4<u32>(u & 0xffu, (u >> 8u) & 0xffu, (u >> 16u) & 0xffu, u >> 24u);
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

// q4_K sub-block j's 6-bit scale and min, from the 12 scale bytes at `at`
// (llama.cpp's get_scale_min_k4).
fn scale_min_k4(at: u32, j: u32) -> vec2<f32> {
    if j < 4u {
        return vec2<f32>(f32(byte_at(at + j) & 63u), f32(byte_at(at + j + 4u) & 63u));
    }
    let sc = (byte_at(at + j + 4u) & 0xfu) | ((byte_at(at + j - 4u) >> 6u) << 4u);
    let m = (byte_at(at + j + 4u) >> 4u) | ((byte_at(at + j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}

// Super-block `b` (256 weights) of a q4_K row: each 32 nibble bytes hold
// two 32-weight sub-blocks (low nibbles, then high).
fn dot_q4_k(row: u32, b: u32, xb: u32) -> f32 {
    let at = row + b * 144u;
    let dm = vec2<f32>(half_at(at), half_at(at + 2u));
    let xk = xb + 256u * b;
    var s = 0.0;
    for (var pair = 0u; pair < 4u; pair = pair + 1u) {
        let sm_lo = scale_min_k4(at + 4u, 2u * pair);
        let sm_hi = scale_min_k4(at + 4u, 2u * pair + 1u);
        var q_lo = 0.0;
        var q_hi = 0.0;
        var x_lo = 0.0;
        var x_hi = 0.0;
        for (var j = 0u; j < 8u; j = j + 1u) {
            let u = word_at(at + 16u + 32u * pair + 4u * j);
            let xl = x4(xk + 64u * pair + 4u * j);
            let xh = x4(xk + 64u * pair + 32u + 4u * j);
            q_lo = q_lo + dot(vec4<f32>(bytes4(u) & vec4<u32>(0xfu)), xl);
            q_hi = q_hi + dot(vec4<f32>(bytes4(u) >> vec4<u32>(4u)), xh);
            x_lo = x_lo + dot(xl, vec4<f32>(1.0));
            x_hi = x_hi + dot(xh, vec4<f32>(1.0));
        }
        s = s + dm.x * (sm_lo.x * q_lo + sm_hi.x * q_hi) - dm.y * (sm_lo.y * x_lo + sm_hi.y * x_hi);
    }
    return s;
}

// Super-block `b` of a q6_K row: per 128-weight half, ql bytes l and l+32
// (low and high nibbles) with qh byte l's four 2-bit pairs make weights l,
// l+32, l+64, l+96 of the half; 16 int8 scales, one per 16 weights.
fn dot_q6_k(row: u32, b: u32, xb: u32) -> f32 {
    let at = row + b * 210u;
    var s = 0.0;
    for (var h = 0u; h < 2u; h = h + 1u) {
        let ql = at + 64u * h;
        let qh = at + 128u + 32u * h;
        let sc = at + 192u + 8u * h;
        let xk = xb + 256u * b + 128u * h;
        for (var l = 0u; l < 32u; l = l + 4u) {
            let a = bytes4(word_at(ql + l));
            let c = bytes4(word_at(ql + 32u + l));
            let hb = bytes4(word_at(qh + l));
            let q1 = vec4<f32>((a & vec4<u32>(0xfu)) | ((hb & vec4<u32>(3u)) << vec4<u32>(4u))) - 32.0;
            let q2 = vec4<f32>((c & vec4<u32>(0xfu)) | (((hb >> vec4<u32>(2u)) & vec4<u32>(3u)) << vec4<u32>(4u))) - 32.0;
            let q3 = vec4<f32>((a >> vec4<u32>(4u)) | (((hb >> vec4<u32>(4u)) & vec4<u32>(3u)) << vec4<u32>(4u))) - 32.0;
            let q4 = vec4<f32>((c >> vec4<u32>(4u)) | (((hb >> vec4<u32>(6u)) & vec4<u32>(3u)) << vec4<u32>(4u))) - 32.0;
            let is = l / 16u;
            let s1 = f32(bitcast<i32>(byte_at(sc + is) << 24u) >> 24u);
            let s2 = f32(bitcast<i32>(byte_at(sc + is + 2u) << 24u) >> 24u);
            let s3 = f32(bitcast<i32>(byte_at(sc + is + 4u) << 24u) >> 24u);
            let s4 = f32(bitcast<i32>(byte_at(sc + is + 6u) << 24u) >> 24u);
            s = s + s1 * dot(q1, x4(xk + l)) + s2 * dot(q2, x4(xk + 32u + l))
                + s3 * dot(q3, x4(xk + 64u + l)) + s4 * dot(q4, x4(xk + 96u + l));
        }
    }
    return half_at(at + 208u) * s;
}

const Q8_0: u32 = 0u;
const Q4_0: u32 = 1u;
const Q4_K: u32 = 2u;
const Q6_K: u32 = 3u;

// Weights per block of each format.
fn block_weights(format: u32) -> u32 {
    return select(32u, 256u, format >= Q4_K);
}

fn block_dot(format: u32, row: u32, b: u32, xb: u32) -> f32 {
    switch format {
        case 0u: { return dot_q8_0(row, b, xb); }
        case 1u: { return dot_q4_0(row, b, xb); }
        case 2u: { return dot_q4_k(row, b, xb); }
        default: { return dot_q6_k(row, b, xb); }
    }
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
    for (var b = lane.lid; b < p.cols / block_weights(format); b = b + WG) {
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

@compute @workgroup_size(WG)
fn matvec_q4_k(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    matvec_blocks(Q4_K, lane, wg, nwg);
}

@compute @workgroup_size(WG)
fn matvec_q6_k(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    matvec_blocks(Q6_K, lane, wg, nwg);
}
