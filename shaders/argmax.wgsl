// argmax.wgsl: index of the largest value of each row of [rows, n]; exact ties
// go to the lower index (the greedy sampler's rule, same as torch.argmax on
// CPU). A row holding a NaN or an infinity yields 0xffffffff (NO_TOKEN, the
// sampler's rule: no token is picked from non-finite logits).
//
// Dispatch: one workgroup per row (grid folded into x/y).
//
// Bindings:
//   0 params  uniform Params
//   1 x       storage read  [rows, n] f32
//   2 out     storage rw    [rows] u32

override WG: u32 = 256u;
const NONE: u32 = 0xffffffffu;

struct Params {
    rows: u32,
    n: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

var<workgroup> best_value: array<f32, WG>;
var<workgroup> best_index: array<u32, WG>;
var<workgroup> non_finite: array<u32, WG>;

// Bit test rather than comparisons, which fast-math compilers may fold away.
fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

// Does candidate (v, i) beat the current best (bv, bi)?
fn beats(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    if i == NONE {
        return false;
    }
    if bi == NONE {
        return true;
    }
    return v > bv || (v == bv && i < bi);
}

@compute @workgroup_size(WG)
fn argmax(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wg.x + wg.y * nwg.x;
    if row >= p.rows {
        return;
    }
    let base = row * p.n;
    var bv = 0.0;
    var bi = NONE;
    var bad = 0u;
    for (var i = lid; i < p.n; i = i + WG) {
        let v = x[base + i];
        if !is_finite(v) {
            bad = 1u;
        } else if beats(v, i, bv, bi) {
            bv = v;
            bi = i;
        }
    }
    best_value[lid] = bv;
    best_index[lid] = bi;
    non_finite[lid] = bad;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if lid < s {
            if beats(best_value[lid + s], best_index[lid + s], best_value[lid], best_index[lid]) {
                best_value[lid] = best_value[lid + s];
                best_index[lid] = best_index[lid + s];
            }
            non_finite[lid] = max(non_finite[lid], non_finite[lid + s]);
        }
        workgroupBarrier();
    }
    if lid == 0u {
        out[row] = select(best_index[0], NONE, non_finite[0] != 0u);
    }
}
