// silu_mul.wgsl: the SwiGLU gate of the Llama MLP on the fused gate/up
// projection output,
//   out[t, i] = silu(gate_up[t, i]) * gate_up[t, dim + i],  silu(g) = g / (1 + exp(-g)).
//
// Dispatch: one invocation per output element, grid folded into x/y.
//
// Bindings:
//   0 params   uniform Params
//   1 gate_up  storage read  [n_tokens, 2 * dim] f32 (gate then up)
//   2 out      storage rw    [n_tokens, dim] f32

override WG: u32 = 256u;

struct Params {
    n_tokens: u32,
    dim: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gate_up: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn silu_mul(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = (wg.x + wg.y * nwg.x) * WG + lid;
    if idx >= p.n_tokens * p.dim {
        return;
    }
    let t = idx / p.dim;
    let i = idx % p.dim;
    let g = gate_up[t * 2u * p.dim + i];
    out[idx] = g / (1.0 + exp(-g)) * gate_up[t * 2u * p.dim + p.dim + i];
}
