// matvec_rows.wgsl: y[v, r] (+)= sum_k W[r, k] * x[v, k] (+ bias[r]), one
// subgroup per 4 rows (needs subgroups). The lanes of a subgroup walk k with
// stride subgroup_size, so neighbouring lanes read neighbouring words, and
// subgroupAdd reduces: no workgroup memory, no barrier, whatever the row
// length. Subgroups walk the row blocks with a grid stride, so any subgroup
// size works (8 on lavapipe, 32 on NVIDIA, 32/64 on AMD) and the host
// dispatches for the largest one.
//
// Dispatch: grid over workgroups (folded into x/y), z = block of NV vectors.
//
// Bindings: as matvec.wgsl (0, 3, 4 declared in matvec_common.wgsl):
//   0 params  uniform Params
//   1 w       storage read  [rows, row_words] u32: f32 bits, or two f16 per word
//   2 x       storage read  [n_vecs, x_stride] f32
//   3 bias    storage read  [y_offset + rows] f32 (unused unless flags & 1)
//   4 y       storage rw    [n_vecs, y_stride] f32

// Params, bias, y, row_starts, store: matvec_common.wgsl; Sg, vec_of: matvec_blocks.wgsl.

@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;

// First element of vector j of the block (see vec_of).
fn x_row(v0: u32, j: u32, nv: u32) -> u32 {
    return vec_of(v0, j, nv) * p.x_stride;
}

// Each subgroup serves NV vectors at once (v0 = wg.z * NV ..): every weight
// word is read once for all of them.
@compute @workgroup_size(WG)
fn matvec_rows_f32(sg: Sg, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let v0 = wg.z * NV;
    let nv = min(NV, p.n_vecs - v0);
    let stride = nwg.x * nwg.y * sg.count;
    for (var first = (wg.x + wg.y * nwg.x) * sg.count; first < p.row_blocks; first = first + stride) {
        let block = first + sg.id;
        var acc: array<vec4<f32>, MAX_NV>;
        for (var j = 0u; j < NV; j = j + 1u) {
            acc[j] = vec4<f32>(0.0);
        }
        if block < p.row_blocks {
            let rb = row_starts(block * ROWS, p.row_words);
            for (var k = sg.lane; k < p.cols; k = k + sg.size) {
                let wk = vec4<f32>(
                    bitcast<f32>(w[rb.x + k]),
                    bitcast<f32>(w[rb.y + k]),
                    bitcast<f32>(w[rb.z + k]),
                    bitcast<f32>(w[rb.w + k]),
                );
                for (var j = 0u; j < NV; j = j + 1u) {
                    acc[j] = acc[j] + wk * x[x_row(v0, j, nv) + k];
                }
            }
        }
        for (var j = 0u; j < NV; j = j + 1u) {
            let sums = subgroupAdd(acc[j]);
            if block < p.row_blocks && j < nv {
                store(block * ROWS, v0 + j, sums, sg.lane);
            }
        }
    }
}

@compute @workgroup_size(WG)
fn matvec_rows_f16(sg: Sg, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let v0 = wg.z * NV;
    let nv = min(NV, p.n_vecs - v0);
    let stride = nwg.x * nwg.y * sg.count;
    for (var first = (wg.x + wg.y * nwg.x) * sg.count; first < p.row_blocks; first = first + stride) {
        let block = first + sg.id;
        var acc: array<vec4<f32>, MAX_NV>;
        for (var j = 0u; j < NV; j = j + 1u) {
            acc[j] = vec4<f32>(0.0);
        }
        if block < p.row_blocks {
            let rb = row_starts(block * ROWS, p.row_words);
            for (var i = sg.lane; i < p.row_words; i = i + sg.size) {
                let k = 2u * i;
                let a = unpack2x16float(w[rb.x + i]);
                let b = unpack2x16float(w[rb.y + i]);
                let c = unpack2x16float(w[rb.z + i]);
                let d = unpack2x16float(w[rb.w + i]);
                let lo = vec4<f32>(a.x, b.x, c.x, d.x);
                let hi = vec4<f32>(a.y, b.y, c.y, d.y);
                let has_hi = k + 1u < p.cols;
                for (var j = 0u; j < NV; j = j + 1u) {
                    let xb = x_row(v0, j, nv) + k;
                    var add = lo * x[xb];
                    if has_hi {
                        add = add + hi * x[xb + 1u];
                    }
                    acc[j] = acc[j] + add;
                }
            }
        }
        for (var j = 0u; j < NV; j = j + 1u) {
            let sums = subgroupAdd(acc[j]);
            if block < p.row_blocks && j < nv {
                store(block * ROWS, v0 + j, sums, sg.lane);
            }
        }
    }
}
