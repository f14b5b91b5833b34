// silu_mul.wgsl: the SwiGLU gate of the Llama MLP,
//   out[i] = silu(gate[i]) * up[i],  silu(g) = g / (1 + exp(-g)).
//
// Dispatch: one invocation per element, grid folded into x/y.
//
// Bindings:
//   0 params  uniform Params
//   1 gate    storage read  [n] f32
//   2 up      storage read  [n] f32
//   3 out     storage rw    [n] f32

override WG: u32 = 256u;

struct Params {
    n: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gate: array<f32>;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn silu_mul(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = (wg.x + wg.y * nwg.x) * WG + lid;
    if i >= p.n {
        return;
    }
    let g = gate[i];
    out[i] = g / (1.0 + exp(-g)) * up[i];
}
