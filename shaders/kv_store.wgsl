// kv_store.wgsl: writes the new tokens' keys (after RoPE) and values from the
// fused qkv rows into a contiguous per-layer KV cache at their positions,
//   cache_k[g, positions[t], d] = qkv[t * qkv_stride + k_offset + g * head_dim + d]
//   cache_v[g, positions[t], d] = qkv[t * qkv_stride + v_offset + g * head_dim + d]
//
// Dispatch: one invocation per (token, kv head, d), grid folded into x/y.
//
// Bindings:
//   0 params     uniform Params
//   1 positions  storage read  [n_tokens] u32
//   2 qkv        storage read  [n_tokens, qkv_stride] f32
//   3 cache_k    storage rw    [n_kv_heads, capacity, head_dim] f32
//   4 cache_v    storage rw    [n_kv_heads, capacity, head_dim] f32

override WG: u32 = 256u;

struct Params {
    n_tokens: u32,
    n_kv_heads: u32,
    head_dim: u32,
    qkv_stride: u32,
    k_offset: u32,
    v_offset: u32,
    capacity: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> positions: array<u32>;
@group(0) @binding(2) var<storage, read> qkv: array<f32>;
@group(0) @binding(3) var<storage, read_write> cache_k: array<f32>;
@group(0) @binding(4) var<storage, read_write> cache_v: array<f32>;

@compute @workgroup_size(WG)
fn kv_store(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = (wg.x + wg.y * nwg.x) * WG + lid;
    let per_token = p.n_kv_heads * p.head_dim;
    if idx >= p.n_tokens * per_token {
        return;
    }
    let t = idx / per_token;
    let gd = idx % per_token; // g * head_dim + d
    let g = gd / p.head_dim;
    let d = gd % p.head_dim;
    let slot = (g * p.capacity + positions[t]) * p.head_dim + d;
    cache_k[slot] = qkv[t * p.qkv_stride + p.k_offset + gd];
    cache_v[slot] = qkv[t * p.qkv_stride + p.v_offset + gd];
}
