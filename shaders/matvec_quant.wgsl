// matvec_quant.wgsl: y[v, r] (+)= sum_k W[r, k] * x[v, k] (+ bias[r]) with W
// in llama.cpp's quantized blocks, as GGUF stores them (src/ops/quant.rs):
// quant_blocks.wgsl, joined in front, reads the blocks (their layouts are
// there); Params.row_words holds BYTES per row here.
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
