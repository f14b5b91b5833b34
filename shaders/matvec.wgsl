// matvec.wgsl: y[v, r] (+)= sum_k W[r, k] * x[v, k] (+ bias[r]) for a few vectors v.
// The decode-step projection: one token (or a small batch) against a weight
// matrix in Hugging Face layout [out_features, in_features].
//
// Dispatch: grid over ceil(rows / 4) row blocks (folded into x/y, see
// GpuContext::grid), z = vector index. One workgroup computes 4 rows: each
// invocation walks a strided slice of k for all 4 rows (x read once for the
// 4), then one workgroup reduction of the 4 partial sums (reduction prelude:
// reduce_workgroup.wgsl or reduce_subgroup.wgsl; the rest from
// matvec_common.wgsl).
//
// Bindings (all entry points):
//   0 params  uniform Params
//   1 w       storage read  [rows, row_words] u32: f32 bits, or two f16 per word
//   2 x       storage read  [n_vecs, x_stride] f32
//   3 bias    storage read  [y_offset + rows] f32 (unused unless flags & 1)
//   4 y       storage rw    [n_vecs, y_stride] f32

// Params, bias / y bindings, row_starts and store: matvec_common.wgsl.
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;

@compute @workgroup_size(WG)
fn matvec_f32(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let block = wg.x + wg.y * nwg.x;
    if block >= p.row_blocks {
        return;
    }
    let v = wg.z;
    let r0 = block * ROWS;
    let rb = row_starts(r0, p.row_words);
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
    store(r0, v, workgroup_sum4(acc, lane), lane.lid);
}

@compute @workgroup_size(WG)
fn matvec_f16(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let block = wg.x + wg.y * nwg.x;
    if block >= p.row_blocks {
        return;
    }
    let v = wg.z;
    let r0 = block * ROWS;
    let rb = row_starts(r0, p.row_words);
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
    store(r0, v, workgroup_sum4(acc, lane), lane.lid);
}
