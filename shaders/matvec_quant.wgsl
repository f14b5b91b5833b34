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
// x/y), z = vector; each invocation walks a strided set of block units (a
// word of a block) for all 4 rows (x read once for the 4), then one
// workgroup reduction (prelude:
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

// Each invocation takes units of a block, not whole blocks, so a row of a
// few blocks (q4_K: 4 super-blocks in 1024 weights) still keeps the
// workgroup busy. Unit `u` of the rows, against x at `xb`:

// Each unit is computed for the 4 rows at once (`rb`: their starting
// bytes), x read once for them.

// q8_0: 8 units a block, one word of 4 int8 each.
fn unit_q8_0(rb: vec4<u32>, u: u32, xb: u32) -> vec4<f32> {
    let b = u / 8u;
    let j = u % 8u;
    let xv = x4(xb + 32u * b + 4u * j);
    let at = rb + vec4<u32>(b * 34u);
    let o = 2u + 4u * j;
    return vec4<f32>(
        half_at(at.x) * dot(i8x4(word_at(at.x + o)), xv),
        half_at(at.y) * dot(i8x4(word_at(at.y + o)), xv),
        half_at(at.z) * dot(i8x4(word_at(at.z + o)), xv),
        half_at(at.w) * dot(i8x4(word_at(at.w + o)), xv),
    );
}

// q4_0: 4 units a block; word j of the nibbles holds weights 4j..4j+3
// (low) and 16+4j..16+4j+3 (high).
fn q4_0_row(at: u32, o: u32, xl: vec4<f32>, xh: vec4<f32>) -> f32 {
    let q = word_at(at + o);
    return half_at(at) * (dot(nibbles(q, 0u), xl) + dot(nibbles(q, 4u), xh));
}

fn unit_q4_0(rb: vec4<u32>, u: u32, xb: u32) -> vec4<f32> {
    let b = u / 4u;
    let j = u % 4u;
    let xk = xb + 32u * b + 4u * j;
    let xl = x4(xk);
    let xh = x4(xk + 16u);
    let at = rb + vec4<u32>(b * 18u);
    let o = 2u + 4u * j;
    return vec4<f32>(q4_0_row(at.x, o, xl, xh), q4_0_row(at.y, o, xl, xh), q4_0_row(at.z, o, xl, xh), q4_0_row(at.w, o, xl, xh));
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

// q4_K: 32 units a super-block of 256; each 32 nibble bytes hold two
// 32-weight sub-blocks (low nibbles, then high): a unit is one word of it.
// `sx`: the sums of xl and xh (for the mins).
fn q4_k_row(at: u32, pair: u32, j: u32, xl: vec4<f32>, xh: vec4<f32>, sx: vec2<f32>) -> f32 {
    let dm = vec2<f32>(half_at(at), half_at(at + 2u));
    let lo = scale_min_k4(at + 4u, 2u * pair);
    let hi = scale_min_k4(at + 4u, 2u * pair + 1u);
    let q = bytes4(word_at(at + 16u + 32u * pair + 4u * j));
    return dm.x * (lo.x * dot(vec4<f32>(q & vec4<u32>(0xfu)), xl) + hi.x * dot(vec4<f32>(q >> vec4<u32>(4u)), xh))
        - dm.y * (lo.y * sx.x + hi.y * sx.y);
}

fn unit_q4_k(rb: vec4<u32>, u: u32, xb: u32) -> vec4<f32> {
    let b = u / 32u;
    let pair = (u % 32u) / 8u;
    let j = u % 8u;
    let xk = xb + 256u * b + 64u * pair + 4u * j;
    let xl = x4(xk);
    let xh = x4(xk + 32u);
    let one = vec4<f32>(1.0);
    let sx = vec2<f32>(dot(xl, one), dot(xh, one));
    let at = rb + vec4<u32>(b * 144u);
    return vec4<f32>(
        q4_k_row(at.x, pair, j, xl, xh, sx),
        q4_k_row(at.y, pair, j, xl, xh, sx),
        q4_k_row(at.z, pair, j, xl, xh, sx),
        q4_k_row(at.w, pair, j, xl, xh, sx),
    );
}

fn i8_at(at: u32) -> f32 {
    return f32(bitcast<i32>(byte_at(at) << 24u) >> 24u);
}

// q6_K: 16 units a super-block; per 128-weight half, ql bytes l..l+3 and
// l+32..l+35 (low and high nibbles) with qh bytes l..l+3 (four 2-bit pairs
// each) make weights l, l+32, l+64, l+96 (and the next 3) of the half; 16
// int8 scales, one per 16 weights. `xs`: x at l, l+32, l+64, l+96.
fn q6_k_row(at: u32, h: u32, l: u32, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>, x4v: vec4<f32>) -> f32 {
    let ql = at + 64u * h;
    let sc = at + 192u + 8u * h + l / 16u;
    let a = bytes4(word_at(ql + l));
    let c = bytes4(word_at(ql + 32u + l));
    let hb = bytes4(word_at(at + 128u + 32u * h + l));
    let m4 = vec4<u32>(0xfu);
    let m2 = vec4<u32>(3u);
    let q1 = vec4<f32>((a & m4) | ((hb & m2) << vec4<u32>(4u))) - 32.0;
    let q2 = vec4<f32>((c & m4) | (((hb >> vec4<u32>(2u)) & m2) << vec4<u32>(4u))) - 32.0;
    let q3 = vec4<f32>((a >> vec4<u32>(4u)) | (((hb >> vec4<u32>(4u)) & m2) << vec4<u32>(4u))) - 32.0;
    let q4 = vec4<f32>((c >> vec4<u32>(4u)) | (((hb >> vec4<u32>(6u)) & m2) << vec4<u32>(4u))) - 32.0;
    let s = i8_at(sc) * dot(q1, x1) + i8_at(sc + 2u) * dot(q2, x2)
        + i8_at(sc + 4u) * dot(q3, x3) + i8_at(sc + 6u) * dot(q4, x4v);
    return half_at(at + 208u) * s;
}

fn unit_q6_k(rb: vec4<u32>, u: u32, xb: u32) -> vec4<f32> {
    let b = u / 16u;
    let h = (u % 16u) / 8u;
    let l = 4u * (u % 8u);
    let xk = xb + 256u * b + 128u * h + l;
    let x1 = x4(xk);
    let x2 = x4(xk + 32u);
    let x3 = x4(xk + 64u);
    let x4v = x4(xk + 96u);
    let at = rb + vec4<u32>(b * 210u);
    return vec4<f32>(
        q6_k_row(at.x, h, l, x1, x2, x3, x4v),
        q6_k_row(at.y, h, l, x1, x2, x3, x4v),
        q6_k_row(at.z, h, l, x1, x2, x3, x4v),
        q6_k_row(at.w, h, l, x1, x2, x3, x4v),
    );
}

const Q8_0: u32 = 0u;
const Q4_0: u32 = 1u;
const Q4_K: u32 = 2u;
const Q6_K: u32 = 3u;

// Units in a row of `cols` weights.
fn row_units(format: u32, cols: u32) -> u32 {
    switch format {
        case 0u: { return cols / 4u; }
        case 1u: { return cols / 8u; }
        case 2u: { return cols / 8u; }
        default: { return cols / 16u; }
    }
}

fn unit_dot(format: u32, rb: vec4<u32>, u: u32, xb: u32) -> vec4<f32> {
    switch format {
        case 0u: { return unit_q8_0(rb, u, xb); }
        case 1u: { return unit_q4_0(rb, u, xb); }
        case 2u: { return unit_q4_k(rb, u, xb); }
        default: { return unit_q6_k(rb, u, xb); }
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
    for (var u = lane.lid; u < row_units(format, p.cols); u = u + WG) {
        acc = acc + unit_dot(format, rb, u, xb);
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
