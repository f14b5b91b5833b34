// matvec_common.wgsl: what every matvec kernel shares (matvec.wgsl, the
// portable one with a workgroup reduction; matvec_rows.wgsl and
// matvec_vec4.wgsl, a subgroup per 4 rows): Params, the bias and y
// bindings, where a block's rows start, and the store. The kernels declare
// w (binding 1) and x (binding 2) in their own views.
//
// Bindings declared here:
//   0 params  uniform Params
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
    row_blocks: u32, // ceil(rows / ROWS)
    eps: f32,        // matvec_vec4's RMSNorm prologue only
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

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
