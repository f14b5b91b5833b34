// matmul.wgsl: C[m, c_offset + n] (+)= sum_k A[m, k] * W[n, k] (+ bias[c_offset + n]).
// The prefill projection: many tokens (rows of A) against a weight matrix in
// Hugging Face layout [out_features, in_features] (so C = A W^T).
//
// Dispatch: (ceil(n / 64), ceil(m / 64), 1) workgroups of 16 x 16. Each
// workgroup computes a 64 x 64 tile of C: it stages 64 x 16 slices of A and W
// in workgroup memory as vec4s of 4 adjacent rows (k-major), and each
// invocation keeps a 4 x 4 register block of C (rows 4 ty .. + 3, columns
// 4 tx .. + 3): per k step one vec4 of A and one of W feed 16 FMAs.
//
// Bindings (all entry points):
//   0 params  uniform Params
//   1 w       storage read  [n, row_words] u32: f32 bits, or two f16 per word,
//             or quantized blocks (row_words then holds BYTES per row;
//             quant_blocks.wgsl, joined in front, dequantizes them)
//   2 a       storage read  [m, a_stride] f32
//   3 bias    storage read  [c_offset + n] f32 (unused unless flags & 1)
//   4 c       storage rw    [m, c_stride] f32

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;
const THREADS: u32 = 256u;
const FLAG_BIAS: u32 = 1u;
const FLAG_ACCUMULATE: u32 = 2u;

struct Params {
    m: u32,          // rows of A and C (tokens)
    n: u32,          // rows of W in this part (output columns)
    k: u32,          // inner dimension
    row_words: u32,  // u32 words per stored row of W
    a_stride: u32,   // elements between rows of A
    c_stride: u32,   // elements between rows of C
    c_offset: u32,   // output column of this part's first row of W
    flags: u32,      // FLAG_BIAS | FLAG_ACCUMULATE
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

var<workgroup> tile_a: array<vec4<f32>, 256>; // [BK][BM / 4]: rows 4q..4q+3 at k
var<workgroup> tile_w: array<vec4<f32>, 256>; // [BK][BN / 4]: W rows (C columns) 4q..4q+3 at k

// One quad of A rows per invocation: rows m0 + 4q .. + 3 at column k0 + kk.
fn load_tile_a(m0: u32, k0: u32, lid: u32) {
    let q = lid / BK;
    let kk = lid % BK;
    let gk = k0 + kk;
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i = i + 1u) {
        let gm = m0 + 4u * q + i;
        if gm < p.m && gk < p.k {
            v[i] = a[gm * p.a_stride + gk];
        }
    }
    tile_a[kk * (BM / 4u) + q] = v;
}

// C rows ty*4 .. +3, columns tx*4 .. +3 of the tile: acc[i][j].
fn multiply_tiles(tx: u32, ty: u32, acc: ptr<function, array<vec4<f32>, 4>>) {
    for (var kk = 0u; kk < BK; kk = kk + 1u) {
        let av = tile_a[kk * (BM / 4u) + ty];
        let wv = tile_w[kk * (BN / 4u) + tx];
        (*acc)[0] = (*acc)[0] + av.x * wv;
        (*acc)[1] = (*acc)[1] + av.y * wv;
        (*acc)[2] = (*acc)[2] + av.z * wv;
        (*acc)[3] = (*acc)[3] + av.w * wv;
    }
}

fn store_tile(m0: u32, n0: u32, tx: u32, ty: u32, acc: array<vec4<f32>, 4>) {
    for (var i = 0u; i < 4u; i = i + 1u) {
        let gm = m0 + 4u * ty + i;
        for (var j = 0u; j < 4u; j = j + 1u) {
            let gn = n0 + 4u * tx + j;
            if gm < p.m && gn < p.n {
                let col = p.c_offset + gn;
                var value = acc[i][j];
                if (p.flags & FLAG_BIAS) != 0u {
                    value = value + bias[col];
                }
                let idx = gm * p.c_stride + col;
                if (p.flags & FLAG_ACCUMULATE) != 0u {
                    value = c[idx] + value;
                }
                c[idx] = value;
            }
        }
    }
}

// One quad of W rows per invocation (f32 words): rows n0 + 4q .. + 3 at column k0 + kk.
fn load_tile_w_f32(n0: u32, k0: u32, lid: u32) {
    let q = lid / BK;
    let kk = lid % BK;
    let gk = k0 + kk;
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i = i + 1u) {
        let gn = n0 + 4u * q + i;
        if gn < p.n && gk < p.k {
            v[i] = bitcast<f32>(w[gn * p.row_words + gk]);
        }
    }
    tile_w[kk * (BN / 4u) + q] = v;
}

// 16 quads of W rows x 8 words (16 halves): half the invocations each read
// one word of 4 rows and write two k columns.
fn load_tile_w_f16(n0: u32, k0: u32, lid: u32) {
    if lid < (BN / 4u) * (BK / 2u) {
        let q = lid / (BK / 2u);
        let kw = lid % (BK / 2u);
        let word = k0 / 2u + kw;
        var lo = vec4<f32>(0.0);
        var hi = vec4<f32>(0.0);
        for (var i = 0u; i < 4u; i = i + 1u) {
            let gn = n0 + 4u * q + i;
            if gn < p.n && word < p.row_words {
                let h = unpack2x16float(w[gn * p.row_words + word]);
                lo[i] = h.x;
                hi[i] = h.y;
            }
        }
        tile_w[(2u * kw) * (BN / 4u) + q] = lo;
        tile_w[(2u * kw + 1u) * (BN / 4u) + q] = hi;
    }
}

// One quad of W rows per invocation, dequantized one weight at a time:
// rows n0 + 4q .. + 3 at column k0 + kk.
fn load_tile_w_quant(format: u32, n0: u32, k0: u32, lid: u32) {
    let q = lid / BK;
    let kk = lid % BK;
    let gk = k0 + kk;
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i = i + 1u) {
        let gn = n0 + 4u * q + i;
        if gn < p.n && gk < p.k {
            v[i] = weight_at(format, gn * p.row_words, gk);
        }
    }
    tile_w[kk * (BN / 4u) + q] = v;
}

const KIND_F32: u32 = 100u;
const KIND_F16: u32 = 101u;

// The tile of C at workgroup `wg`: A and W tiles through workgroup memory,
// W read as f32 words, packed f16 pairs, or blocks of quant format `kind`
// (Q8_0 .. Q6_K of quant_blocks.wgsl).
fn matmul_tile(lid3: vec3<u32>, lid: u32, wg: vec3<u32>, kind: u32) {
    let n0 = wg.x * BN;
    let m0 = wg.y * BM;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < p.k; k0 = k0 + BK) {
        load_tile_a(m0, k0, lid);
        if kind == KIND_F16 {
            load_tile_w_f16(n0, k0, lid);
        } else if kind == KIND_F32 {
            load_tile_w_f32(n0, k0, lid);
        } else {
            load_tile_w_quant(kind, n0, k0, lid);
        }
        workgroupBarrier();
        multiply_tiles(lid3.x, lid3.y, &acc);
        workgroupBarrier();
    }
    store_tile(m0, n0, lid3.x, lid3.y, acc);
}

@compute @workgroup_size(16, 16)
fn matmul_f32(
    @builtin(local_invocation_id) lid3: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
) {
    matmul_tile(lid3, lid, wg, KIND_F32);
}

@compute @workgroup_size(16, 16)
fn matmul_f16(
    @builtin(local_invocation_id) lid3: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
) {
    matmul_tile(lid3, lid, wg, KIND_F16);
}

@compute @workgroup_size(16, 16)
fn matmul_q8_0(
    @builtin(local_invocation_id) lid3: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
) {
    matmul_tile(lid3, lid, wg, Q8_0);
}

@compute @workgroup_size(16, 16)
fn matmul_q4_0(
    @builtin(local_invocation_id) lid3: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
) {
    matmul_tile(lid3, lid, wg, Q4_0);
}

@compute @workgroup_size(16, 16)
fn matmul_q4_k(
    @builtin(local_invocation_id) lid3: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
) {
    matmul_tile(lid3, lid, wg, Q4_K);
}

@compute @workgroup_size(16, 16)
fn matmul_q6_k(
    @builtin(local_invocation_id) lid3: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
) {
    matmul_tile(lid3, lid, wg, Q6_K);
}
