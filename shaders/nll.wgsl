// nll.wgsl: negative log-likelihood of a target token under each row of logits,
//   out[row_offset + r] = log(sum_j exp(x[r, j] - m)) + m - x[r, targets[row_offset + r]],
// m = max_j x[r, j]
// (teacher-forced scoring: the mean of these is the log-perplexity).
//
// Dispatch: one workgroup per row (grid folded into x/y). Needs a reduction
// prelude (reduce_workgroup.wgsl or reduce_subgroup.wgsl).
//
// Bindings:
//   0 params   uniform Params
//   1 logits   storage read  [rows, n] f32
//   2 targets  storage read  [row_offset + rows] u32
//   3 out      storage rw    [row_offset + rows] f32

override WG: u32 = 256u;

struct Params {
    rows: u32,
    n: u32,
    row_offset: u32, // where rows start in targets and out (per-step, see Dispatch::write_params)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn nll(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wg.x + wg.y * nwg.x;
    if row >= p.rows {
        return;
    }
    let base = row * p.n;
    var m = -3.4028235e38;
    for (var i = lane.lid; i < p.n; i = i + WG) {
        m = max(m, logits[base + i]);
    }
    m = workgroup_max(m, lane);
    var s = 0.0;
    for (var i = lane.lid; i < p.n; i = i + WG) {
        s = s + exp(logits[base + i] - m);
    }
    let log_z = log(workgroup_sum(s, lane)) + m;
    if lane.lid == 0u {
        out[p.row_offset + row] = log_z - logits[base + targets[p.row_offset + row]];
    }
}
