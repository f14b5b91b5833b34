// softmax.wgsl: numerically stable softmax over each row of [rows, n], in place,
//   x[r, i] = exp(x[r, i] - max_r) / sum_j exp(x[r, j] - max_r).
//
// Dispatch: one workgroup per row (grid folded into x/y). Needs a reduction
// prelude (reduce_workgroup.wgsl or reduce_subgroup.wgsl).
//
// Bindings:
//   0 params  uniform Params
//   1 x       storage rw  [rows, n] f32

override WG: u32 = 256u;

struct Params {
    rows: u32,
    n: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(WG)
fn softmax(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wg.x + wg.y * nwg.x;
    if row >= p.rows {
        return;
    }
    let base = row * p.n;
    var m = -3.4028235e38;
    for (var i = lane.lid; i < p.n; i = i + WG) {
        m = max(m, x[base + i]);
    }
    m = workgroup_max(m, lane);
    var s = 0.0;
    for (var i = lane.lid; i < p.n; i = i + WG) {
        let e = exp(x[base + i] - m);
        x[base + i] = e;
        s = s + e;
    }
    let inv = 1.0 / workgroup_sum(s, lane);
    for (var i = lane.lid; i < p.n; i = i + WG) {
        x[base + i] = x[base + i] * inv;
    }
}
