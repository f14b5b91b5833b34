// paged_kv_store.wgsl: writes the new tokens' keys (after RoPE) and values
// from the fused qkv rows into their slots of the paged KV pool, with their
// positions. Slots come from the block tables: the new tokens of a row are
// the last `tokens_per_row` slots of each head (the host has already grown
// the tables, so `len` counts them).
//
// The page layout is pages.wgsl's (joined in front of this file).
//
// Dispatch: one invocation per (token, stored head, word), grid folded into x/y.
//
// Bindings:
//   0 params     uniform Params
//   1 positions  storage read  [n_tokens] u32
//   2 qkv        storage read  [n_tokens, qkv_stride] f32
//   3 desc       storage read  per (row, stored head) of this layer: {table offset, len}
//   4 tables     storage read  page indices
//   5 pool       storage rw    pages of this layer's shard

override WG: u32 = 256u;
override KV_F16: bool = true;

struct Params {
    n_tokens: u32,
    tokens_per_row: u32,  // 1 for a decode batch, n_tokens for one prefill chunk
    n_heads: u32,         // stored heads per layer
    heads_per_kv: u32,    // stored heads per model KV head (1, or G with query-head granularity)
    head_dim: u32,
    dw: u32,
    page_size: u32,
    page_words: u32,
    qkv_stride: u32,
    k_offset: u32,
    v_offset: u32,
    desc_base: u32,       // entry of (row 0, head 0) of this layer in desc
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> positions: array<u32>;
@group(0) @binding(2) var<storage, read> qkv: array<f32>;
@group(0) @binding(3) var<storage, read> desc: array<u32>;
@group(0) @binding(4) var<storage, read> tables: array<u32>;
@group(0) @binding(5) var<storage, read_write> pool: array<u32>;

fn pack(src: u32, w: u32) -> u32 {
    if KV_F16 {
        return pack2x16float(vec2<f32>(qkv[src + 2u * w], qkv[src + 2u * w + 1u]));
    }
    return bitcast<u32>(qkv[src + w]);
}

@compute @workgroup_size(WG)
fn paged_kv_store(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = (wg.x + wg.y * nwg.x) * WG + lid;
    let per_token = p.n_heads * p.dw;
    if idx >= p.n_tokens * per_token {
        return;
    }
    let t = idx / per_token;
    let s = (idx % per_token) / p.dw;
    let w = idx % p.dw;
    let row = t / p.tokens_per_row;
    let d = (p.desc_base + row * p.n_heads + s) * 2u;
    let slot = desc[d + 1u] - p.tokens_per_row + t % p.tokens_per_row;
    let g = geom();
    let base = slot_page(g, desc[d], slot);
    let i = slot % p.page_size;
    let kv_head = s / p.heads_per_kv;
    let src = t * p.qkv_stride + kv_head * p.head_dim;
    pool[base + key_at(g, i) + w] = pack(src + p.k_offset, w);
    pool[base + value_at(g, i) + w] = pack(src + p.v_offset, w);
    if w == 0u {
        pool[base + position_at(g, i)] = positions[t];
    }
}
