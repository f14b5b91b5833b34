// matvec_vec4.wgsl: y[v, r] (+)= sum_k W[r, k] * x[v, k] (+ bias[r]) for a
// few vectors (decode: one per running sequence), with 16-byte loads: each
// lane reads a vec4<u32> of a row per step (4 f32 or 8 f16 weights) and a
// vec4<f32> of each x, so a subgroup of 32 reads 512 contiguous bytes of a
// row per load. One subgroup per 4 rows, subgroupAdd, no workgroup memory or
// barrier, and a grid stride over row blocks as in matvec_rows.wgsl (needs
// subgroups). A subgroup serves NV vectors per pass (a pipeline constant, the
// power of two covering the batch, <= MAX_NV), so each weight is read once
// per NV vectors; every per-vector loop runs NV times (x rows past the batch
// repeat its last one and are never stored), so acc stays in registers.
//
// With PROLOGUE = 1 it also applies the RMSNorm that precedes a projection in
// Llama, y = W (g * x * rsqrt(mean(x^2) + eps)): each subgroup walks all of x
// anyway, so it sums x^2 on the way, multiplies x by g (binding 5) and scales
// its row sums by rsqrt at the end — the norm costs no dispatch of its own.
// With PROLOGUE = 2 (down_proj) each x row is the fused gate/up row [gate
// (cols), up (cols)] (x_stride = 2 cols) and the kernel reads silu(gate) * up,
// the SwiGLU product, in place of x: silu_mul needs no dispatch either.
// PROLOGUE is a pipeline constant, so the plain projection carries neither.
//
// Needs rows whose words fill whole vec4s: cols % 4 == 0 (f32) or
// cols % 8 == 0 (f16); the host falls back to matvec_rows otherwise.
//
// Dispatch: grid over workgroups (folded into x/y), z = block of NV vectors.
//
// Bindings: as matvec.wgsl (0, 3, 4 declared in matvec_common.wgsl), with vec4 views:
//   0 params  uniform Params
//   1 w       storage read  [rows, row_words / 4] vec4<u32>: f32 bits, or two f16 per word
//   2 x       storage read  [n_vecs, x_stride / 4] vec4<f32>
//   3 bias    storage read  [y_offset + rows] f32 (unused unless flags & 1)
//   4 y       storage rw    [n_vecs, y_stride] f32
//   5 norm_w  storage read  [cols / 4] vec4<f32>: the RMSNorm weight g (read only when PROLOGUE = 1)

// Params, bias, y, row_starts, store: matvec_common.wgsl; Sg, vec_of: matvec_blocks.wgsl.

// What the kernel does to x first: 0 nothing, 1 RMSNorm, 2 SwiGLU.
override PROLOGUE: u32 = 0u;
const NORM: u32 = 1u;
const SWIGLU: u32 = 2u;

@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> norm_w: array<vec4<f32>>;

// First vec4 of vector j of the block of x (see vec_of).
fn x_base(v0: u32, j: u32, nv: u32) -> u32 {
    return vec_of(v0, j, nv) * (p.x_stride / 4u);
}

// The row sums, scaled by the RMSNorm's rsqrt under PROLOGUE = NORM
// (sum_squares: this lane's share of x^2; every lane must call this).
fn finish(acc: vec4<f32>, sum_squares: f32) -> vec4<f32> {
    let sums = subgroupAdd(acc);
    if PROLOGUE == NORM {
        let total = subgroupAdd(sum_squares);
        return sums * inverseSqrt(total / f32(p.cols) + p.eps);
    }
    return sums;
}

// Quad i of the x row starting at quad `base`: silu(gate[i]) * up[i] under
// SWIGLU, else x as stored.
fn x_in(base: u32, i: u32) -> vec4<f32> {
    if PROLOGUE == SWIGLU {
        let g = x[base + i];
        return g / (1.0 + exp(-g)) * x[base + p.cols / 4u + i];
    }
    return x[base + i];
}

// Under NORM: v's share of the sum of squares, and v times g (quad i).
fn squares(v: vec4<f32>) -> f32 {
    if PROLOGUE == NORM {
        return dot(v, v);
    }
    return 0.0;
}

fn gained(v: vec4<f32>, i: u32) -> vec4<f32> {
    if PROLOGUE == NORM {
        return v * norm_w[i];
    }
    return v;
}

// Dot products of one quad of 4 rows with x quad xv.
fn dot4(w0: vec4<f32>, w1: vec4<f32>, w2: vec4<f32>, w3: vec4<f32>, xv: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(dot(w0, xv), dot(w1, xv), dot(w2, xv), dot(w3, xv));
}

fn unpack8(q: vec4<u32>) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(
        vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y)),
        vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w)),
    );
}

@compute @workgroup_size(WG)
fn matvec_vec4_f32(sg: Sg, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let quads = p.row_words / 4u;
    let v0 = wg.z * NV;
    let nv = min(NV, p.n_vecs - v0);
    let stride = nwg.x * nwg.y * sg.count;
    for (var first = (wg.x + wg.y * nwg.x) * sg.count; first < p.row_blocks; first = first + stride) {
        let block = first + sg.id;
        var acc: array<vec4<f32>, MAX_NV>;
        var ss: array<f32, MAX_NV>;
        for (var j = 0u; j < NV; j = j + 1u) {
            acc[j] = vec4<f32>(0.0);
            ss[j] = 0.0;
        }
        if block < p.row_blocks {
            let rb = row_starts(block * ROWS, quads);
            for (var i = sg.lane; i < quads; i = i + sg.size) {
                let w0 = bitcast<vec4<f32>>(w[rb.x + i]);
                let w1 = bitcast<vec4<f32>>(w[rb.y + i]);
                let w2 = bitcast<vec4<f32>>(w[rb.z + i]);
                let w3 = bitcast<vec4<f32>>(w[rb.w + i]);
                for (var j = 0u; j < NV; j = j + 1u) {
                    let xv = x_in(x_base(v0, j, nv), i);
                    ss[j] = ss[j] + squares(xv);
                    acc[j] = acc[j] + dot4(w0, w1, w2, w3, gained(xv, i));
                }
            }
        }
        for (var j = 0u; j < NV; j = j + 1u) {
            let sums = finish(acc[j], ss[j]);
            if block < p.row_blocks && j < nv {
                store(block * ROWS, v0 + j, sums, sg.lane);
            }
        }
    }
}

@compute @workgroup_size(WG)
fn matvec_vec4_f16(sg: Sg, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let quads = p.row_words / 4u;
    let v0 = wg.z * NV;
    let nv = min(NV, p.n_vecs - v0);
    let stride = nwg.x * nwg.y * sg.count;
    for (var first = (wg.x + wg.y * nwg.x) * sg.count; first < p.row_blocks; first = first + stride) {
        let block = first + sg.id;
        var acc: array<vec4<f32>, MAX_NV>;
        var ss: array<f32, MAX_NV>;
        for (var j = 0u; j < NV; j = j + 1u) {
            acc[j] = vec4<f32>(0.0);
            ss[j] = 0.0;
        }
        if block < p.row_blocks {
            let rb = row_starts(block * ROWS, quads);
            for (var i = sg.lane; i < quads; i = i + sg.size) {
                // 8 weights of each row: cols 8i .. 8i + 8 = x quads 2i, 2i + 1.
                let a = unpack8(w[rb.x + i]);
                let b = unpack8(w[rb.y + i]);
                let c = unpack8(w[rb.z + i]);
                let d = unpack8(w[rb.w + i]);
                for (var j = 0u; j < NV; j = j + 1u) {
                    let base = x_base(v0, j, nv);
                    let lo = x_in(base, 2u * i);
                    let hi = x_in(base, 2u * i + 1u);
                    ss[j] = ss[j] + squares(lo) + squares(hi);
                    acc[j] = acc[j] + dot4(a[0], b[0], c[0], d[0], gained(lo, 2u * i))
                        + dot4(a[1], b[1], c[1], d[1], gained(hi, 2u * i + 1u));
                }
            }
        }
        for (var j = 0u; j < NV; j = j + 1u) {
            let sums = finish(acc[j], ss[j]);
            if block < p.row_blocks && j < nv {
                store(block * ROWS, v0 + j, sums, sg.lane);
            }
        }
    }
}
