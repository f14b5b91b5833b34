// matvec_blocks.wgsl: what the two subgroup matvec kernels share
// (matvec_rows.wgsl, 4-byte loads; matvec_vec4.wgsl, 16-byte loads). Each
// subgroup computes blocks of ROWS rows for NV vectors, walks the row blocks
// with a grid stride, reduces with subgroupAdd and writes through `store`.
// The kernels declare w (binding 1) and x (binding 2) in their own views.
//
// Bindings declared here:
//   0 params  uniform Params
//   3 bias    storage read  [y_offset + rows] f32 (unused unless flags & 1)
//   4 y       storage rw    [n_vecs, y_stride] f32

override WG: u32 = 256u;
// Vectors one subgroup serves per pass (a pipeline constant, 1..=MAX_NV:
// the host picks the power of two that covers the batch).
override NV: u32 = 1u;
const MAX_NV: u32 = 8u;
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
    eps: f32,        // matvec_vec4's RMSNorm prologue only
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

struct Sg {
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) size: u32,
    @builtin(subgroup_id) id: u32,
    @builtin(num_subgroups) count: u32,
}

// Where rows r0..r0+3 start, in units of `stride` per row (rows past the end
// repeat the last row; their sums are never stored).
fn row_starts(r0: u32, stride: u32) -> vec4<u32> {
    let last = p.rows - 1u;
    return vec4<u32>(
        min(r0, last) * stride,
        min(r0 + 1u, last) * stride,
        min(r0 + 2u, last) * stride,
        min(r0 + 3u, last) * stride,
    );
}

// Vector v0 + j of the block (past the batch's nv vectors: its last one), so
// every per-vector loop runs NV (a constant) times and the compiler can
// unroll it and keep the accumulators in registers (a loop bounded by nv
// indexes them dynamically, which spills them to memory on GPUs); the extra
// sums are never stored.
fn vec_of(v0: u32, j: u32, nv: u32) -> u32 {
    return v0 + min(j, nv - 1u);
}

// Lane `lane` < ROWS writes row r0 + lane of vector v (bias, accumulate).
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
