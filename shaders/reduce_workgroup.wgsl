// reduce_workgroup.wgsl: workgroup-wide reductions through workgroup memory.
// The portable path: needs no optional feature.
//
// Joined in front of a kernel body that declares `override WG: u32` (a power of
// two, the workgroup size) and receives a `Lane` in its entry point. Every
// invocation gets the result. The summation order is fixed, so results are
// bit-identical from run to run. reduce_subgroup.wgsl has the same interface.

struct Lane {
    @builtin(local_invocation_index) lid: u32,
}

var<workgroup> reduce_scratch: array<vec4<f32>, WG>;

// Sums four independent values at once (e.g. four matrix rows).
fn workgroup_sum4(x: vec4<f32>, lane: Lane) -> vec4<f32> {
    reduce_scratch[lane.lid] = x;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if lane.lid < s {
            reduce_scratch[lane.lid] = reduce_scratch[lane.lid] + reduce_scratch[lane.lid + s];
        }
        workgroupBarrier();
    }
    let total = reduce_scratch[0];
    workgroupBarrier();
    return total;
}

fn workgroup_sum(x: f32, lane: Lane) -> f32 {
    return workgroup_sum4(vec4<f32>(x, 0.0, 0.0, 0.0), lane).x;
}

fn workgroup_max(x: f32, lane: Lane) -> f32 {
    reduce_scratch[lane.lid].x = x;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if lane.lid < s {
            reduce_scratch[lane.lid].x = max(reduce_scratch[lane.lid].x, reduce_scratch[lane.lid + s].x);
        }
        workgroupBarrier();
    }
    let m = reduce_scratch[0].x;
    workgroupBarrier();
    return m;
}
