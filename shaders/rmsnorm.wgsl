// rmsnorm.wgsl: Llama RMSNorm over the rows of a [rows, dim] tensor,
//   out[r, i] = w[i] * (x[r, i] / sqrt(mean_i(x[r, i]^2) + eps)),
// and the fused form that first adds a delta into the residual stream:
//   residual[r, :] += x[r, :];  out[r, :] = rmsnorm(residual[r, :]).
//
// Dispatch: one workgroup per row (grid folded into x/y). Needs a reduction
// prelude (reduce_workgroup.wgsl or reduce_subgroup.wgsl).
//
// Bindings:
//   0 params    uniform Params
//   1 x         storage read  [rows, dim] f32 (add_rmsnorm: the delta)
//   2 w         storage read  [dim] f32
//   3 out       storage rw    [rows, dim] f32
//   4 residual  storage rw    [rows, dim] f32 (add_rmsnorm only)

override WG: u32 = 256u;

struct Params {
    rows: u32,
    dim: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read_write> residual: array<f32>;

fn row_index(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.x + wg.y * nwg.x;
}

fn inv_rms(sum_squares: f32) -> f32 {
    return 1.0 / sqrt(sum_squares / f32(p.dim) + p.eps);
}

@compute @workgroup_size(WG)
fn rmsnorm(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = row_index(wg, nwg);
    if row >= p.rows {
        return;
    }
    let base = row * p.dim;
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
fn add_rmsnorm(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = row_index(wg, nwg);
    if row >= p.rows {
        return;
    }
    let base = row * p.dim;
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
