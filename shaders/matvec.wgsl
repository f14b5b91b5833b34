// matvec.wgsl: y[v, r] (+)= sum_k W[r, k] * x[v, k] (+ bias[r]) for a few vectors v.
// The decode-step projection: one token (or a small batch) against a weight
// matrix in Hugging Face layout [out_features, in_features].
//
// Dispatch: grid over ceil(rows / 4) row blocks (folded into x/y, see
// GpuContext::grid), z = vector index. One workgroup computes 4 rows: each
// invocation walks a strided slice of k for all 4 rows (x read once for the
// 4), then one workgroup reduction of the 4 partial sums (reduction prelude:
// reduce_workgroup.wgsl or reduce_subgroup.wgsl).
//
// Bindings (all entry points):
//   0 params  uniform Params
//   1 w       storage read  [rows, row_words] u32: f32 bits, or two f16 per word
//   2 x       storage read  [n_vecs, x_stride] f32
//   3 bias    storage read  [y_offset + rows] f32 (unused unless flags & 1)
//   4 y       storage rw    [n_vecs, y_stride] f32

override WG: u32 = 256u;
const ROWS: u32 = 4u;
const FLAG_BIAS: u32 = 1u;
const FLAG_ACCUMULATE: u32 = 2u;

struct Params {
    rows: u32,       // rows in this part of W
    cols: u32,       // k: elements per row
    row_words: u32,  // u32 words per stored row
    n_vecs: u32,
    x_stride: u32,   // elements between consecutive vectors of x
    y_stride: u32,   // elements between consecutive vectors of y
    y_offset: u32,   // output index of this part's first row
    flags: u32,      // FLAG_BIAS | FLAG_ACCUMULATE
    row_blocks: u32, // ceil(rows / ROWS)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

// Word offsets of the 4 rows of this block; rows past the end re-read the last
// row (their results are never stored).
fn row_bases(r0: u32) -> vec4<u32> {
    let last = p.rows - 1u;
    return vec4<u32>(
        min(r0, last) * p.row_words,
        min(r0 + 1u, last) * p.row_words,
        min(r0 + 2u, last) * p.row_words,
        min(r0 + 3u, last) * p.row_words,
    );
}

fn store_rows(r0: u32, v: u32, sums: vec4<f32>, lane: Lane) {
    let r = r0 + lane.lid;
    if lane.lid < ROWS && r < p.rows {
        let out_row = p.y_offset + r;
        var value = sums[lane.lid];
        if (p.flags & FLAG_BIAS) != 0u {
            value = value + bias[out_row];
        }
        let i = v * p.y_stride + out_row;
        if (p.flags & FLAG_ACCUMULATE) != 0u {
            value = y[i] + value;
        }
        y[i] = value;
    }
}

@compute @workgroup_size(WG)
fn matvec_f32(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let block = wg.x + wg.y * nwg.x;
    if block >= p.row_blocks {
        return;
    }
    let v = wg.z;
    let r0 = block * ROWS;
    let rb = row_bases(r0);
    let xb = v * p.x_stride;
    var acc = vec4<f32>(0.0);
    for (var k = lane.lid; k < p.cols; k = k + WG) {
        let xk = x[xb + k];
        let wk = vec4<f32>(
            bitcast<f32>(w[rb.x + k]),
            bitcast<f32>(w[rb.y + k]),
            bitcast<f32>(w[rb.z + k]),
            bitcast<f32>(w[rb.w + k]),
        );
        acc = acc + wk * xk;
    }
    store_rows(r0, v, workgroup_sum4(acc, lane), lane);
}

@compute @workgroup_size(WG)
fn matvec_f16(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let block = wg.x + wg.y * nwg.x;
    if block >= p.row_blocks {
        return;
    }
    let v = wg.z;
    let r0 = block * ROWS;
    let rb = row_bases(r0);
    let xb = v * p.x_stride;
    var acc = vec4<f32>(0.0);
    for (var j = lane.lid; j < p.row_words; j = j + WG) {
        let k = 2u * j;
        var xj = vec2<f32>(x[xb + k], 0.0);
        if k + 1u < p.cols {
            xj.y = x[xb + k + 1u];
        }
        acc = acc + vec4<f32>(
            dot(unpack2x16float(w[rb.x + j]), xj),
            dot(unpack2x16float(w[rb.y + j]), xj),
            dot(unpack2x16float(w[rb.z + j]), xj),
            dot(unpack2x16float(w[rb.w + j]), xj),
        );
    }
    store_rows(r0, v, workgroup_sum4(acc, lane), lane);
}
