// matvec_vec4.wgsl: y[r] (+)= sum_k W[r, k] * x[k] (+ bias[r]) for ONE
// vector, the decode hot path, with 16-byte loads: each lane reads a vec4<u32>
// of a row per step (4 f32 or 8 f16 weights) and a vec4<f32> of x, so a
// subgroup of 32 reads 512 contiguous bytes of a row per load instead of 128.
// One subgroup per 4 rows, subgroupAdd, no workgroup memory or barrier, and a
// grid stride over row blocks as in matvec_rows.wgsl (needs subgroups).
//
// With PROLOGUE = 1 it also applies the RMSNorm that precedes a projection in
// Llama, y = W (g * x * rsqrt(mean(x^2) + eps)): each subgroup walks all of x
// anyway, so it sums x^2 on the way, multiplies x by g (binding 5) and scales
// its row sums by rsqrt at the end — the norm costs no dispatch of its own.
// With PROLOGUE = 2 (down_proj) x is the fused gate/up row [gate (cols), up
// (cols)] and the kernel reads silu(gate) * up, the SwiGLU product, in place
// of x: silu_mul needs no dispatch either. PROLOGUE is a pipeline constant,
// so the plain projection carries neither branch.
//
// Needs rows whose words fill whole vec4s: cols % 4 == 0 (f32) or
// cols % 8 == 0 (f16); the host falls back to matvec_rows otherwise.
//
// Dispatch: grid over workgroups (folded into x/y), z = 1.
//
// Bindings: as matvec.wgsl, with vec4 views:
//   0 params  uniform Params (n_vecs, y_stride unused: one vector)
//   1 w       storage read  [rows, row_words / 4] vec4<u32>: f32 bits, or two f16 per word
//   2 x       storage read  [cols / 4] vec4<f32> ([2 * cols / 4] when PROLOGUE = 2)
//   3 bias    storage read  [y_offset + rows] f32 (unused unless flags & 1)
//   4 y       storage rw    [y_offset + rows] f32
//   5 norm_w  storage read  [cols / 4] vec4<f32>: the RMSNorm weight g (read only when PROLOGUE = 1)

override WG: u32 = 256u;
const ROWS: u32 = 4u;
const FLAG_BIAS: u32 = 1u;
const FLAG_ACCUMULATE: u32 = 2u;
// What the kernel does to x first: 0 nothing, 1 RMSNorm, 2 SwiGLU.
override PROLOGUE: u32 = 0u;
const NORM: u32 = 1u;
const SWIGLU: u32 = 2u;

struct Params {
    rows: u32,
    cols: u32,
    row_words: u32,
    n_vecs: u32,
    x_stride: u32,
    y_stride: u32,
    y_offset: u32,
    flags: u32,
    row_blocks: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> norm_w: array<vec4<f32>>;

struct Sg {
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) size: u32,
    @builtin(subgroup_id) id: u32,
    @builtin(num_subgroups) count: u32,
}

// First vec4 of rows r0..r0+3 (rows past the end repeat the last row; their
// sums are never stored).
fn row_quads(r0: u32, quads: u32) -> vec4<u32> {
    let last = p.rows - 1u;
    return vec4<u32>(
        min(r0, last) * quads,
        min(r0 + 1u, last) * quads,
        min(r0 + 2u, last) * quads,
        min(r0 + 3u, last) * quads,
    );
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

// x[i] (times g[i] under NORM, adding its squares to *ss; or
// silu(gate[i]) * up[i] under SWIGLU).
fn x_at(i: u32, ss: ptr<function, f32>) -> vec4<f32> {
    if PROLOGUE == SWIGLU {
        let g = x[i];
        return g / (1.0 + exp(-g)) * x[p.cols / 4u + i];
    }
    let v = x[i];
    if PROLOGUE == NORM {
        *ss = *ss + dot(v, v);
        return v * norm_w[i];
    }
    return v;
}

fn store(r0: u32, sums: vec4<f32>, lane: u32) {
    let r = r0 + lane;
    if lane < ROWS && r < p.rows {
        let out_row = p.y_offset + r;
        var value = sums[lane];
        if (p.flags & FLAG_BIAS) != 0u {
            value = value + bias[out_row];
        }
        if (p.flags & FLAG_ACCUMULATE) != 0u {
            value = y[out_row] + value;
        }
        y[out_row] = value;
    }
}

// Dot product of 8 packed f16 weights with x[8q .. 8q + 8].
fn dot8(q: vec4<u32>, lo: vec4<f32>, hi: vec4<f32>) -> f32 {
    let a = vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y));
    let b = vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w));
    return dot(a, lo) + dot(b, hi);
}

@compute @workgroup_size(WG)
fn matvec_vec4_f32(sg: Sg, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let quads = p.row_words / 4u;
    let stride = nwg.x * nwg.y * sg.count;
    for (var first = (wg.x + wg.y * nwg.x) * sg.count; first < p.row_blocks; first = first + stride) {
        let block = first + sg.id;
        var acc = vec4<f32>(0.0);
        var ss = 0.0;
        if block < p.row_blocks {
            let rb = row_quads(block * ROWS, quads);
            for (var i = sg.lane; i < quads; i = i + sg.size) {
                let xv = x_at(i, &ss);
                acc = acc + vec4<f32>(
                    dot(bitcast<vec4<f32>>(w[rb.x + i]), xv),
                    dot(bitcast<vec4<f32>>(w[rb.y + i]), xv),
                    dot(bitcast<vec4<f32>>(w[rb.z + i]), xv),
                    dot(bitcast<vec4<f32>>(w[rb.w + i]), xv),
                );
            }
        }
        let sums = finish(acc, ss);
        if block < p.row_blocks {
            store(block * ROWS, sums, sg.lane);
        }
    }
}

@compute @workgroup_size(WG)
fn matvec_vec4_f16(sg: Sg, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let quads = p.row_words / 4u;
    let stride = nwg.x * nwg.y * sg.count;
    for (var first = (wg.x + wg.y * nwg.x) * sg.count; first < p.row_blocks; first = first + stride) {
        let block = first + sg.id;
        var acc = vec4<f32>(0.0);
        var ss = 0.0;
        if block < p.row_blocks {
            let rb = row_quads(block * ROWS, quads);
            for (var i = sg.lane; i < quads; i = i + sg.size) {
                let lo = x_at(2u * i, &ss);
                let hi = x_at(2u * i + 1u, &ss);
                acc = acc + vec4<f32>(
                    dot8(w[rb.x + i], lo, hi),
                    dot8(w[rb.y + i], lo, hi),
                    dot8(w[rb.z + i], lo, hi),
                    dot8(w[rb.w + i], lo, hi),
                );
            }
        }
        let sums = finish(acc, ss);
        if block < p.row_blocks {
            store(block * ROWS, sums, sg.lane);
        }
    }
}
