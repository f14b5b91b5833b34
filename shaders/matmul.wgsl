// matmul.wgsl: C[m, c_offset + n] (+)= sum_k A[m, k] * W[n, k] (+ bias[c_offset + n]).
// The prefill projection: many tokens (rows of A) against a weight matrix in
// Hugging Face layout [out_features, in_features] (so C = A W^T).
//
// Dispatch: (ceil(n / 64), ceil(m / 64), 1) workgroups of 16 x 16. Each
// workgroup computes a 64 x 64 tile of C: it stages 64 x 16 slices of A and W
// in workgroup memory (k-major, so the inner loop reads broadcast-friendly
// rows), and each invocation keeps a 4 x 4 register block of C (rows
// ty + 16 i, columns tx + 16 j).
//
// Bindings (all entry points):
//   0 params  uniform Params
//   1 w       storage read  [n, row_words] u32: f32 bits, or two f16 per word
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

var<workgroup> tile_a: array<f32, 1024>; // [BK][BM]
var<workgroup> tile_w: array<f32, 1024>; // [BK][BN]

fn load_tile_a(m0: u32, k0: u32, lid: u32) {
    for (var i = 0u; i < BM * BK / THREADS; i = i + 1u) {
        let idx = lid + i * THREADS;
        let r = idx / BK;
        let kk = idx % BK;
        let gm = m0 + r;
        let gk = k0 + kk;
        var v = 0.0;
        if gm < p.m && gk < p.k {
            v = a[gm * p.a_stride + gk];
        }
        tile_a[kk * BM + r] = v;
    }
}

fn multiply_tiles(tx: u32, ty: u32, acc: ptr<function, array<vec4<f32>, 4>>) {
    for (var kk = 0u; kk < BK; kk = kk + 1u) {
        let ao = kk * BM + ty;
        let wo = kk * BN + tx;
        let av = vec4<f32>(tile_a[ao], tile_a[ao + 16u], tile_a[ao + 32u], tile_a[ao + 48u]);
        let wv = vec4<f32>(tile_w[wo], tile_w[wo + 16u], tile_w[wo + 32u], tile_w[wo + 48u]);
        (*acc)[0] = (*acc)[0] + av.x * wv;
        (*acc)[1] = (*acc)[1] + av.y * wv;
        (*acc)[2] = (*acc)[2] + av.z * wv;
        (*acc)[3] = (*acc)[3] + av.w * wv;
    }
}

fn store_tile(m0: u32, n0: u32, tx: u32, ty: u32, acc: array<vec4<f32>, 4>) {
    for (var i = 0u; i < 4u; i = i + 1u) {
        let gm = m0 + ty + 16u * i;
        for (var j = 0u; j < 4u; j = j + 1u) {
            let gn = n0 + tx + 16u * j;
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

@compute @workgroup_size(16, 16)
fn matmul_f32(
    @builtin(local_invocation_id) lid3: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
) {
    let n0 = wg.x * BN;
    let m0 = wg.y * BM;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < p.k; k0 = k0 + BK) {
        load_tile_a(m0, k0, lid);
        for (var i = 0u; i < BN * BK / THREADS; i = i + 1u) {
            let idx = lid + i * THREADS;
            let r = idx / BK;
            let kk = idx % BK;
            let gn = n0 + r;
            let gk = k0 + kk;
            var v = 0.0;
            if gn < p.n && gk < p.k {
                v = bitcast<f32>(w[gn * p.row_words + gk]);
            }
            tile_w[kk * BN + r] = v;
        }
        workgroupBarrier();
        multiply_tiles(lid3.x, lid3.y, &acc);
        workgroupBarrier();
    }
    store_tile(m0, n0, lid3.x, lid3.y, acc);
}

@compute @workgroup_size(16, 16)
fn matmul_f16(
    @builtin(local_invocation_id) lid3: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
) {
    let n0 = wg.x * BN;
    let m0 = wg.y * BM;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < p.k; k0 = k0 + BK) {
        load_tile_a(m0, k0, lid);
        // 64 rows x 8 words (16 halves) of W.
        for (var i = 0u; i < BN * (BK / 2u) / THREADS; i = i + 1u) {
            let idx = lid + i * THREADS;
            let r = idx / (BK / 2u);
            let kw = idx % (BK / 2u);
            let gn = n0 + r;
            let word = k0 / 2u + kw;
            var v = vec2<f32>(0.0);
            if gn < p.n && word < p.row_words {
                v = unpack2x16float(w[gn * p.row_words + word]);
            }
            tile_w[(2u * kw) * BN + r] = v.x;
            tile_w[(2u * kw + 1u) * BN + r] = v.y;
        }
        workgroupBarrier();
        multiply_tiles(lid3.x, lid3.y, &acc);
        workgroupBarrier();
    }
    store_tile(m0, n0, lid3.x, lid3.y, acc);
}
