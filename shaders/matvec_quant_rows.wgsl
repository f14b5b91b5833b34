// matvec_quant_rows.wgsl: y[v, r] (+)= sum_k W[r, k] * x[v, k] (+ bias[r])
// over llama.cpp's quantized blocks (quant_blocks.wgsl reads them), laid out
// as matvec_rows.wgsl: one subgroup per 4 rows, its lanes walking the units
// of the rows (a word of a block: 4 weights of q8_0, 8 of q4_0 and q4_K, 16
// of q6_K) with stride subgroup_size, subgroupAdd to reduce; no workgroup
// memory, no barrier. Each unit is dequantized once, in registers, for the
// 4 rows, then meets NV vectors of x. Params.row_words holds BYTES per row.
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

// acc += the 4 rows' weights (a, b, c, d: 4 consecutive k each) against
// x[v0 + j, k .. k + 3], for the NV vectors of the pass.
fn add_quad(acc: ptr<function, Acc>, a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, d: vec4<f32>, k: u32, v0: u32, nv: u32) {
    for (var j = 0u; j < NV; j = j + 1u) {
        var xv = x_in(vec_of(v0, j, nv) * p.x_stride, k);
        if PROLOGUE == NORM {
            (*acc).squares[j] = (*acc).squares[j] + dot(xv, xv);
            xv = xv * vec4<f32>(norm_w[k], norm_w[k + 1u], norm_w[k + 2u], norm_w[k + 3u]);
        }
        (*acc).sums[j] = (*acc).sums[j] + vec4<f32>(dot(a, xv), dot(b, xv), dot(c, xv), dot(d, xv));
    }
}

// q8_0: 8 units a block of 32, one word of 4 int8.
fn q8_0_quad(at: u32, o: u32) -> vec4<f32> {
    return half_at(at) * i8x4(word_at(at + o));
}

fn unit_q8_0(acc: ptr<function, Acc>, rb: vec4<u32>, u: u32, v0: u32, nv: u32) {
    let b = u / 8u;
    let j = u % 8u;
    let at = rb + vec4<u32>(34u * b);
    let o = 2u + 4u * j;
    add_quad(acc, q8_0_quad(at.x, o), q8_0_quad(at.y, o), q8_0_quad(at.z, o), q8_0_quad(at.w, o), 32u * b + 4u * j, v0, nv);
}

// q4_0: 4 units a block; word j of the nibbles holds weights 4j..4j+3 (low)
// and 16+4j.. (high).
fn unit_q4_0(acc: ptr<function, Acc>, rb: vec4<u32>, u: u32, v0: u32, nv: u32) {
    let b = u / 4u;
    let j = u % 4u;
    let at = rb + vec4<u32>(18u * b);
    let o = 2u + 4u * j;
    let q = vec4<u32>(word_at(at.x + o), word_at(at.y + o), word_at(at.z + o), word_at(at.w + o));
    let d = vec4<f32>(half_at(at.x), half_at(at.y), half_at(at.z), half_at(at.w));
    let k = 32u * b + 4u * j;
    add_quad(acc, d.x * nibbles(q.x, 0u), d.y * nibbles(q.y, 0u), d.z * nibbles(q.z, 0u), d.w * nibbles(q.w, 0u), k, v0, nv);
    add_quad(acc, d.x * nibbles(q.x, 4u), d.y * nibbles(q.y, 4u), d.z * nibbles(q.z, 4u), d.w * nibbles(q.w, 4u), k + 16u, v0, nv);
}

// q4_K: 32 units a super-block of 256; each 32 nibble bytes hold two
// 32-weight sub-blocks (low nibbles, then high): a unit is one word of them,
// 4 weights of each sub-block. Returns the low (xy) or high (zw) half's
// weights d*sc*q - dmin*m of one row.
fn q4_k_quad(at: u32, pair: u32, j: u32, high: u32) -> vec4<f32> {
    let sm = scale_min_k4(at + 4u, 2u * pair + high);
    let q = bytes4(word_at(at + 16u + 32u * pair + 4u * j)) >> vec4<u32>(4u * high);
    return half_at(at) * sm.x * vec4<f32>(q & vec4<u32>(0xfu)) - vec4<f32>(half_at(at + 2u) * sm.y);
}

fn unit_q4_k(acc: ptr<function, Acc>, rb: vec4<u32>, u: u32, v0: u32, nv: u32) {
    let b = u / 32u;
    let pair = (u % 32u) / 8u;
    let j = u % 8u;
    let at = rb + vec4<u32>(144u * b);
    let k = 256u * b + 64u * pair + 4u * j;
    add_quad(acc, q4_k_quad(at.x, pair, j, 0u), q4_k_quad(at.y, pair, j, 0u), q4_k_quad(at.z, pair, j, 0u), q4_k_quad(at.w, pair, j, 0u), k, v0, nv);
    add_quad(acc, q4_k_quad(at.x, pair, j, 1u), q4_k_quad(at.y, pair, j, 1u), q4_k_quad(at.z, pair, j, 1u), q4_k_quad(at.w, pair, j, 1u), k + 32u, v0, nv);
}

// q6_K: 16 units a super-block; per 128-weight half h, ql bytes l..l+3 and
// l+32..l+35 (low and high nibbles) with qh bytes l..l+3 (four 2-bit pairs
// each) make weights l, l+32, l+64, l+96 (and the next 3) of the half; one
// int8 scale per 16 weights. Quarter `s` (0..3) of one row:
fn q6_k_quad(at: u32, h: u32, l: u32, s: u32) -> vec4<f32> {
    let low = bytes4(word_at(at + 64u * h + l + 32u * (s % 2u))) >> vec4<u32>(4u * (s / 2u));
    let high = bytes4(word_at(at + 128u + 32u * h + l)) >> vec4<u32>(2u * s);
    let q = vec4<f32>((low & vec4<u32>(0xfu)) | ((high & vec4<u32>(3u)) << vec4<u32>(4u))) - 32.0;
    return half_at(at + 208u) * i8_at(at + 192u + 8u * h + l / 16u + 2u * s) * q;
}

fn unit_q6_k(acc: ptr<function, Acc>, rb: vec4<u32>, u: u32, v0: u32, nv: u32) {
    let b = u / 16u;
    let h = (u % 16u) / 8u;
    let l = 4u * (u % 8u);
    let at = rb + vec4<u32>(210u * b);
    let k = 256u * b + 128u * h + l;
    for (var s = 0u; s < 4u; s = s + 1u) {
        add_quad(acc, q6_k_quad(at.x, h, l, s), q6_k_quad(at.y, h, l, s), q6_k_quad(at.z, h, l, s), q6_k_quad(at.w, h, l, s), k + 32u * s, v0, nv);
    }
}

fn matvec_quant_rows(format: u32, sg: Sg, wg: vec3<u32>, nwg: vec3<u32>) {
    let v0 = wg.z * NV;
    let nv = min(NV, p.n_vecs - v0);
    let stride = nwg.x * nwg.y * sg.count;
    let units = row_units(format, p.cols);
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
