// reduce_subgroup.wgsl: workgroup-wide reductions with subgroup operations
// (needs wgpu's SUBGROUP feature; naga 30 takes the subgroup builtins without
// the standard `enable subgroups;`, which it does not parse yet).
// Same interface as reduce_workgroup.wgsl: each subgroup reduces in registers, subgroup leaders write one partial each,
// and every invocation then sums the partials in subgroup order (a fixed order,
// so results are bit-identical from run to run on one device). Works for any
// subgroup size (8 on lavapipe, 32/64 elsewhere) up to WG.

struct Lane {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) n_sg: u32,
}

var<workgroup> reduce_scratch: array<vec4<f32>, WG>;

fn workgroup_sum4(x: vec4<f32>, lane: Lane) -> vec4<f32> {
    let partial = subgroupAdd(x);
    if lane.sg_lane == 0u {
        reduce_scratch[lane.sg_id] = partial;
    }
    workgroupBarrier();
    var total = vec4<f32>(0.0);
    for (var i = 0u; i < lane.n_sg; i = i + 1u) {
        total = total + reduce_scratch[i];
    }
    workgroupBarrier();
    return total;
}

fn workgroup_sum(x: f32, lane: Lane) -> f32 {
    return workgroup_sum4(vec4<f32>(x, 0.0, 0.0, 0.0), lane).x;
}

fn workgroup_max(x: f32, lane: Lane) -> f32 {
    let partial = subgroupMax(x);
    if lane.sg_lane == 0u {
        reduce_scratch[lane.sg_id].x = partial;
    }
    workgroupBarrier();
    var m = reduce_scratch[0].x;
    for (var i = 1u; i < lane.n_sg; i = i + 1u) {
        m = max(m, reduce_scratch[i].x);
    }
    workgroupBarrier();
    return m;
}
