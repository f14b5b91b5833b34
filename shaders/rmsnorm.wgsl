// rmsnorm.wgsl: Llama RMSNorm over rows of `dim` values,
//   y = w * (x / sqrt(mean(x^2) + eps)),
// in three forms:
//   rmsnorm          out = norm(x)                       (same layout for x and out)
//   rmsnorm_inplace  out = norm(out)                     (Qwen3's per-head q/k norm inside qkv)
//   add_rmsnorm      residual += x; out = norm(residual) (fused residual add)
// Row r lives at token t = r / heads, head h = r % heads, offset
// t * token_stride + offset + h * dim: plain rows use heads = 1,
// token_stride = dim, offset = 0.
//
// Dispatch: one workgroup per row (grid folded into x/y). Needs a reduction
// prelude (reduce_workgroup.wgsl or reduce_subgroup.wgsl).
//
// Bindings:
//   0 params    uniform Params
//   1 w         storage read  [dim] f32
//   2 out       storage rw    rows as above, f32
//   3 x         storage read  rows as above, f32 (rmsnorm, add_rmsnorm)
//   4 residual  storage rw    rows as above, f32 (add_rmsnorm)

override WG: u32 = 256u;

struct Params {
    rows: u32,
    dim: u32,
    eps: f32,
    heads: u32,
    token_stride: u32,
    offset: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read_write> residual: array<f32>;

// Offset of row `row`'s first element, or 0xffffffff for workgroups past the end.
fn row_base(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    let row = wg.x + wg.y * nwg.x;
    if row >= p.rows {
        return 0xffffffffu;
    }
    return (row / p.heads) * p.token_stride + p.offset + (row % p.heads) * p.dim;
}

fn inv_rms(sum_squares: f32) -> f32 {
    return 1.0 / sqrt(sum_squares / f32(p.dim) + p.eps);
}

@compute @workgroup_size(WG)
fn rmsnorm(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let base = row_base(wg, nwg);
    if base == 0xffffffffu {
        return;
    }
    var ss = 0.0;
    for (var i = lane.lid; i < p.dim; i = i + WG) {
        let v = x[base + i];
        ss = ss + v * v;
    }
    let scale = inv_rms(workgroup_sum(ss, lane));
    for (var i = lane.lid; i < p.dim; i = i + WG) {
        out[base + i] = w[i] * (x[base + i] * scale);
    }
}

@compute @workgroup_size(WG)
fn rmsnorm_inplace(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let base = row_base(wg, nwg);
    if base == 0xffffffffu {
        return;
    }
    var ss = 0.0;
    for (var i = lane.lid; i < p.dim; i = i + WG) {
        let v = out[base + i];
        ss = ss + v * v;
    }
    // Every invocation has read its elements before any is overwritten:
    // workgroup_sum ends with a barrier.
    let scale = inv_rms(workgroup_sum(ss, lane));
    for (var i = lane.lid; i < p.dim; i = i + WG) {
        out[base + i] = w[i] * (out[base + i] * scale);
    }
}

@compute @workgroup_size(WG)
fn add_rmsnorm(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let base = row_base(wg, nwg);
    if base == 0xffffffffu {
        return;
    }
    var ss = 0.0;
    for (var i = lane.lid; i < p.dim; i = i + WG) {
        let v = residual[base + i] + x[base + i];
        residual[base + i] = v;
        ss = ss + v * v;
    }
    let scale = inv_rms(workgroup_sum(ss, lane));
    for (var i = lane.lid; i < p.dim; i = i + WG) {
        out[base + i] = w[i] * (residual[base + i] * scale);
    }
}
