// matvec_quant_rows.wgsl: y[v, r] (+)= sum_k W[r, k] * x[v, k] (+ bias[r])
// over llama.cpp's quantized blocks (quant_blocks.wgsl reads them), laid out
// as matvec_rows.wgsl: one subgroup per 4 rows, its lanes walking the units
// of the rows (16 weights of a block, whatever the format) with stride
// subgroup_size, subgroupAdd to reduce; no workgroup memory, no barrier.
// Each unit's quants are unpacked once, in registers, for the 4 rows, then
// meet NV vectors of x; the block scales multiply the dot products, not the
// weights. Params.row_words holds BYTES per row.
//
// PROLOGUE as in matvec_vec4.wgsl: 1 applies the RMSNorm before the
// projection (x^2 summed on the way, x times g from binding 5, the row sums
// scaled by rsqrt at the end), 2 reads silu(gate) * up from fused gate/up
// rows (x_stride = 2 cols); each lane meets every x element of its units
// once, so the sums of squares partition x as the products do.
//
// Dispatch: grid over workgroups (folded into x/y), z = block of NV vectors.
//
// Bindings: as matvec_rows.wgsl (0, 3, 4 declared in matvec_common.wgsl):
//   0 params  uniform Params (row_words: bytes per row)
//   1 w       storage read  [rows * row_bytes, padded to words] blocks
//   2 x       storage read  [n_vecs, x_stride] f32
//   3 bias    storage read  [y_offset + rows] f32 (unused unless flags & 1)
//   4 y       storage rw    [n_vecs, y_stride] f32
//   5 norm_w  storage read  [cols] f32: the RMSNorm weight g (read only when PROLOGUE = 1)

// What the kernel does to x first: 0 nothing, 1 RMSNorm, 2 SwiGLU.
override PROLOGUE: u32 = 0u;
const NORM: u32 = 1u;
const SWIGLU: u32 = 2u;

@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(5) var<storage, read> norm_w: array<f32>;

fn x4(at: u32) -> vec4<f32> {
    return vec4<f32>(x[at], x[at + 1u], x[at + 2u], x[at + 3u]);
}

// x[k .. k + 3] of the row starting at `base`, as the projection sees it:
// silu(gate) * up under SWIGLU.
fn x_in(base: u32, k: u32) -> vec4<f32> {
    let v = x4(base + k);
    if PROLOGUE == SWIGLU {
        return v / (1.0 + exp(-v)) * x4(base + p.cols + k);
    }
    return v;
}

// Per vector of the pass: the row sums, and (NORM) this lane's x^2.
struct Acc {
    sums: array<vec4<f32>, MAX_NV>,
    squares: array<f32, MAX_NV>,
}

// acc += s * (the 4 rows' integer quants qa..qd: 4 consecutive k each, one
// row per component of s) . x[v0 + j, k .. k + 3], minus m * sum(x) for
// formats with an offset, for the NV vectors of the pass: the scales meet
// the dot products, not every weight.
fn add_quad(acc: ptr<function, Acc>, qa: vec4<f32>, qb: vec4<f32>, qc: vec4<f32>, qd: vec4<f32>, s: vec4<f32>, m: vec4<f32>, k: u32, v0: u32, nv: u32) {
    for (var j = 0u; j < NV; j = j + 1u) {
        var xv = x_in(vec_of(v0, j, nv) * p.x_stride, k);
        if PROLOGUE == NORM {
            (*acc).squares[j] = (*acc).squares[j] + dot(xv, xv);
            xv = xv * vec4<f32>(norm_w[k], norm_w[k + 1u], norm_w[k + 2u], norm_w[k + 3u]);
        }
        let dots = vec4<f32>(dot(qa, xv), dot(qb, xv), dot(qc, xv), dot(qd, xv));
        (*acc).sums[j] = (*acc).sums[j] + s * dots - m * (xv.x + xv.y + xv.z + xv.w);
    }
}

fn i8s(u: u32) -> vec4<f32> {
    return vec4<f32>(unpack4xI8(u));
}

fn u8s(u: u32) -> vec4<u32> {
    return unpack4xU8(u);
}

// q8_0: 2 units a block of 32, 4 words of int8 each (16 weights).
fn unit_q8_0(acc: ptr<function, Acc>, rb: vec4<u32>, u: u32, v0: u32, nv: u32) {
    let at = rb + vec4<u32>(34u * (u / 2u));
    let o = 2u + 16u * (u % 2u);
    let d = vec4<f32>(half_at(at.x), half_at(at.y), half_at(at.z), half_at(at.w));
    let k = 16u * u;
    for (var i = 0u; i < 4u; i = i + 1u) {
        let q = 4u * i + o;
        add_quad(acc, i8s(word_at(at.x + q)), i8s(word_at(at.y + q)), i8s(word_at(at.z + q)), i8s(word_at(at.w + q)), d, vec4<f32>(0.0), k + 4u * i, v0, nv);
    }
}

// q4_0: 2 units a block, 2 words of nibbles each; word j holds weights
// 4j..4j+3 (low nibbles) and 16+4j.. (high); w = d*q - 8d.
fn unit_q4_0(acc: ptr<function, Acc>, rb: vec4<u32>, u: u32, v0: u32, nv: u32) {
    let b = u / 2u;
    let at = rb + vec4<u32>(18u * b);
    let d = vec4<f32>(half_at(at.x), half_at(at.y), half_at(at.z), half_at(at.w));
    let m = 8.0 * d;
    let low = vec4<u32>(0xfu);
    for (var i = 0u; i < 2u; i = i + 1u) {
        let jw = 2u * (u % 2u) + i;
        let o = 2u + 4u * jw;
        let qa = u8s(word_at(at.x + o));
        let qb = u8s(word_at(at.y + o));
        let qc = u8s(word_at(at.z + o));
        let qd = u8s(word_at(at.w + o));
        let k = 32u * b + 4u * jw;
        add_quad(acc, vec4<f32>(qa & low), vec4<f32>(qb & low), vec4<f32>(qc & low), vec4<f32>(qd & low), d, m, k, v0, nv);
        add_quad(acc, vec4<f32>(qa >> vec4<u32>(4u)), vec4<f32>(qb >> vec4<u32>(4u)), vec4<f32>(qc >> vec4<u32>(4u)), vec4<f32>(qd >> vec4<u32>(4u)), d, m, k + 16u, v0, nv);
    }
}

// q4_K: 16 units a super-block of 256; each 32 nibble bytes (a pair)
// hold two 32-weight sub-blocks (low nibbles, then high): a unit is 2
// words of a pair, 8 weights of each sub-block; w = (d*sc) q - dmin*m.
// Pair `pair` of one row: the low sub-block's scale and offset (xy), the
// high one's (zw).
fn q4_k_scales(at: u32, pair: u32) -> vec4<f32> {
    let dm = vec2<f32>(half_at(at), half_at(at + 2u));
    let lo = scale_min_k4(at + 4u, 2u * pair);
    let hi = scale_min_k4(at + 4u, 2u * pair + 1u);
    return vec4<f32>(dm * lo, dm * hi);
}

fn unit_q4_k(acc: ptr<function, Acc>, rb: vec4<u32>, u: u32, v0: u32, nv: u32) {
    let b = u / 16u;
    let pair = (u % 16u) / 4u;
    let at = rb + vec4<u32>(144u * b);
    let sa = q4_k_scales(at.x, pair);
    let sb = q4_k_scales(at.y, pair);
    let sc = q4_k_scales(at.z, pair);
    let sd = q4_k_scales(at.w, pair);
    let low = vec4<u32>(0xfu);
    for (var i = 0u; i < 2u; i = i + 1u) {
        let jw = 2u * (u % 4u) + i;
        let o = 16u + 32u * pair + 4u * jw;
        let qa = u8s(word_at(at.x + o));
        let qb = u8s(word_at(at.y + o));
        let qc = u8s(word_at(at.z + o));
        let qd = u8s(word_at(at.w + o));
        let k = 256u * b + 64u * pair + 4u * jw;
        add_quad(acc, vec4<f32>(qa & low), vec4<f32>(qb & low), vec4<f32>(qc & low), vec4<f32>(qd & low),
            vec4<f32>(sa.x, sb.x, sc.x, sd.x), vec4<f32>(sa.y, sb.y, sc.y, sd.y), k, v0, nv);
        add_quad(acc, vec4<f32>(qa >> vec4<u32>(4u)), vec4<f32>(qb >> vec4<u32>(4u)), vec4<f32>(qc >> vec4<u32>(4u)), vec4<f32>(qd >> vec4<u32>(4u)),
            vec4<f32>(sa.z, sb.z, sc.z, sd.z), vec4<f32>(sa.w, sb.w, sc.w, sd.w), k + 32u, v0, nv);
    }
}

// q6_K: 16 units a super-block; per 128-weight half h, ql bytes l..l+3 and
// l+32..l+35 (low and high nibbles) with qh bytes l..l+3 (four 2-bit pairs
// each) make weights l, l+32, l+64, l+96 (and the next 3) of the half; one
// int8 scale per 16 weights; w = (d*sc) q - 32 d*sc. What one row's unit
// reads, once: the two ql words, the qh word, the 4 quarters' scales.
struct Q6Unit {
    ql0: vec4<u32>,
    ql1: vec4<u32>,
    qh: vec4<u32>,
    scales: vec4<f32>,
}

fn q6_k_unit(at: u32, h: u32, l: u32) -> Q6Unit {
    let d = half_at(at + 208u);
    let sc = at + 192u + 8u * h + l / 16u;
    return Q6Unit(
        u8s(word_at(at + 64u * h + l)),
        u8s(word_at(at + 64u * h + l + 32u)),
        u8s(word_at(at + 128u + 32u * h + l)),
        d * vec4<f32>(i8_at(sc), i8_at(sc + 2u), i8_at(sc + 4u), i8_at(sc + 6u)),
    );
}

// Quarter `s` (0..3: weights l + 32 s ..) of a row's unit: its 6-bit quants.
fn q6_k_quants(q: Q6Unit, s: u32) -> vec4<f32> {
    let low = select(q.ql0, q.ql1, (s & 1u) == 1u) >> vec4<u32>(4u * (s / 2u));
    let high = q.qh >> vec4<u32>(2u * s);
    return vec4<f32>((low & vec4<u32>(0xfu)) | ((high & vec4<u32>(3u)) << vec4<u32>(4u)));
}

fn unit_q6_k(acc: ptr<function, Acc>, rb: vec4<u32>, u: u32, v0: u32, nv: u32) {
    let b = u / 16u;
    let h = (u % 16u) / 8u;
    let l = 4u * (u % 8u);
    let at = rb + vec4<u32>(210u * b);
    let k = 256u * b + 128u * h + l;
    let qa = q6_k_unit(at.x, h, l);
    let qb = q6_k_unit(at.y, h, l);
    let qc = q6_k_unit(at.z, h, l);
    let qd = q6_k_unit(at.w, h, l);
    for (var s = 0u; s < 4u; s = s + 1u) {
        let sc = vec4<f32>(qa.scales[s], qb.scales[s], qc.scales[s], qd.scales[s]);
        add_quad(acc, q6_k_quants(qa, s), q6_k_quants(qb, s), q6_k_quants(qc, s), q6_k_quants(qd, s), sc, 32.0 * sc, k + 32u * s, v0, nv);
    }
}

// Units in a row of `cols` weights: 16 weights each, whatever the format.
fn units_of(cols: u32) -> u32 {
    return cols / 16u;
}

fn matvec_quant_rows(format: u32, sg: Sg, wg: vec3<u32>, nwg: vec3<u32>) {
    let v0 = wg.z * NV;
    let nv = min(NV, p.n_vecs - v0);
    let stride = nwg.x * nwg.y * sg.count;
    let units = units_of(p.cols);
    for (var first = (wg.x + wg.y * nwg.x) * sg.count; first < p.row_blocks; first = first + stride) {
        let block = first + sg.id;
        var acc: Acc;
        for (var j = 0u; j < NV; j = j + 1u) {
            acc.sums[j] = vec4<f32>(0.0);
            acc.squares[j] = 0.0;
        }
        if block < p.row_blocks {
            let rb = row_starts(block * ROWS, p.row_words);
            for (var u = sg.lane; u < units; u = u + sg.size) {
                switch format {
                    case 0u: { unit_q8_0(&acc, rb, u, v0, nv); }
                    case 1u: { unit_q4_0(&acc, rb, u, v0, nv); }
                    case 2u: { unit_q4_k(&acc, rb, u, v0, nv); }
                    default: { unit_q6_k(&acc, rb, u, v0, nv); }
                }
            }
        }
        for (var j = 0u; j < NV; j = j + 1u) {
            var sums = subgroupAdd(acc.sums[j]);
            if PROLOGUE == NORM {
                sums = sums * inverseSqrt(subgroupAdd(acc.squares[j]) / f32(p.cols) + p.eps);
            }
            if block < p.row_blocks && j < nv {
                store(block * ROWS, v0 + j, sums, sg.lane);
            }
        }
    }
}

@compute @workgroup_size(WG)
fn matvec_rows_q8_0(sg: Sg, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    matvec_quant_rows(Q8_0, sg, wg, nwg);
}

@compute @workgroup_size(WG)
fn matvec_rows_q4_0(sg: Sg, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    matvec_quant_rows(Q4_0, sg, wg, nwg);
}

@compute @workgroup_size(WG)
fn matvec_rows_q4_k(sg: Sg, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    matvec_quant_rows(Q4_K, sg, wg, nwg);
}

@compute @workgroup_size(WG)
fn matvec_rows_q6_k(sg: Sg, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    matvec_quant_rows(Q6_K, sg, wg, nwg);
}
