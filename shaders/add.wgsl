// add.wgsl: residual add in place, acc[i] += x[i].
//
// Dispatch: one invocation per element, grid folded into x/y.
//
// Bindings:
//   0 params  uniform Params
//   1 x       storage read  [n] f32
//   2 acc     storage rw    [n] f32

override WG: u32 = 256u;

struct Params {
    n: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> acc: array<f32>;

@compute @workgroup_size(WG)
fn add_inplace(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * WG + lid;
    if i >= p.n {
        return;
    }
    acc[i] = acc[i] + x[i];
}
