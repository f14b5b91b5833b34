// rope.wgsl: rotary position embedding in Hugging Face's rotate_half layout,
// in place on q or k:
//   x1 = x[i], x2 = x[i + half]  (i < half = head_dim / 2)
//   x[i]        = x1 * cos[t, i] - x2 * sin[t, i]
//   x[i + half] = x2 * cos[t, i] + x1 * sin[t, i]
// cos/sin come from a per-step table computed on the host in f64 (so the
// angle's accuracy does not depend on the GPU's sin/cos); rope_theta and the
// llama3 / linear rope_scaling live in that table (src/ops/rope.rs).
//
// Dispatch: one invocation per (token, head, i < half), grid folded into x/y.
//
// Bindings:
//   0 params  uniform Params
//   1 cos     storage read  [n_tokens, half] f32
//   2 sin     storage read  [n_tokens, half] f32
//   3 x       storage rw    token t, head h at t * token_stride + head_offset + h * 2 * half

override WG: u32 = 256u;

struct Params {
    n_tokens: u32,
    n_heads: u32,
    half: u32,
    token_stride: u32,
    head_offset: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> cos_table: array<f32>;
@group(0) @binding(2) var<storage, read> sin_table: array<f32>;
@group(0) @binding(3) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(WG)
fn rope(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = (wg.x + wg.y * nwg.x) * WG + lid;
    if idx >= p.n_tokens * p.n_heads * p.half {
        return;
    }
    let i = idx % p.half;
    let h = (idx / p.half) % p.n_heads;
    let t = idx / (p.half * p.n_heads);
    let base = t * p.token_stride + p.head_offset + h * 2u * p.half;
    let c = cos_table[t * p.half + i];
    let s = sin_table[t * p.half + i];
    let x1 = x[base + i];
    let x2 = x[base + i + p.half];
    x[base + i] = x1 * c - x2 * s;
    x[base + i + p.half] = x2 * c + x1 * s;
}
