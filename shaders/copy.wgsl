// copy.wgsl: dst[i] = src[i] over vec4<u32> words: the bandwidth probe of
// `kvsift bench roofline` (every byte read once and written once).
//
// Dispatch: one invocation per vec4, grid folded into x/y.
//
// Bindings:
//   0 params  uniform Params
//   1 src     storage read  [n] vec4<u32>
//   2 dst     storage rw    [n] vec4<u32>

override WG: u32 = 256u;

struct Params {
    n: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(WG)
fn copy_vec4(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * WG + lid;
    if i >= p.n {
        return;
    }
    dst[i] = src[i];
}
