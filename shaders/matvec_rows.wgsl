// matvec_rows.wgsl: y[v, r] (+)= sum_k W[r, k] * x[v, k] (+ bias[r]), one
// subgroup per 4 rows (needs subgroups). The lanes of a subgroup walk k with
// stride subgroup_size, so neighbouring lanes read neighbouring words, and
// subgroupAdd reduces: no workgroup memory, no barrier, whatever the row
// length. Subgroups walk the row blocks with a grid stride, so any subgroup
// size works (8 on lavapipe, 32 on NVIDIA, 32/64 on AMD) and the host
// dispatches for the largest one.
//
// Dispatch: grid over workgroups (folded into x/y), z = vector index.
//
// Bindings: as matvec.wgsl:
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
    rows: u32,
    cols: u32,
    row_words: u32,
    n_vecs: u32,
    x_stride: u32,
    y_stride: u32,
    y_offset: u32,
    flags: u32,
    row_blocks: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

struct Sg {
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) size: u32,
    @builtin(subgroup_id) id: u32,
    @builtin(num_subgroups) count: u32,
}

fn row_bases(r0: u32) -> vec4<u32> {
    let last = p.rows - 1u;
    return vec4<u32>(
        min(r0, last) * p.row_words,
        min(r0 + 1u, last) * p.row_words,
        min(r0 + 2u, last) * p.row_words,
        min(r0 + 3u, last) * p.row_words,
    );
}

fn store(r0: u32, v: u32, sums: vec4<f32>, lane: u32) {
    let r = r0 + lane;
    if lane < ROWS && r < p.rows {
        let out_row = p.y_offset + r;
        var value = sums[lane];
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
fn matvec_rows_f32(sg: Sg, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let v = wg.z;
    let xb = v * p.x_stride;
    let stride = nwg.x * nwg.y * sg.count;
    for (var first = (wg.x + wg.y * nwg.x) * sg.count; first < p.row_blocks; first = first + stride) {
        let block = first + sg.id;
        var acc = vec4<f32>(0.0);
        if block < p.row_blocks {
            let rb = row_bases(block * ROWS);
            for (var k = sg.lane; k < p.cols; k = k + sg.size) {
                let xk = x[xb + k];
                acc = acc + vec4<f32>(
                    bitcast<f32>(w[rb.x + k]),
                    bitcast<f32>(w[rb.y + k]),
                    bitcast<f32>(w[rb.z + k]),
                    bitcast<f32>(w[rb.w + k]),
                ) * xk;
            }
        }
        let sums = subgroupAdd(acc);
        if block < p.row_blocks {
            store(block * ROWS, v, sums, sg.lane);
        }
    }
}

@compute @workgroup_size(WG)
fn matvec_rows_f16(sg: Sg, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let v = wg.z;
    let xb = v * p.x_stride;
    let stride = nwg.x * nwg.y * sg.count;
    for (var first = (wg.x + wg.y * nwg.x) * sg.count; first < p.row_blocks; first = first + stride) {
        let block = first + sg.id;
        var acc = vec4<f32>(0.0);
        if block < p.row_blocks {
            let rb = row_bases(block * ROWS);
            for (var j = sg.lane; j < p.row_words; j = j + sg.size) {
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
        }
        let sums = subgroupAdd(acc);
        if block < p.row_blocks {
            store(block * ROWS, v, sums, sg.lane);
        }
    }
}
