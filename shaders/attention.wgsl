// attention.wgsl: causal multi-head attention with grouped KV heads (GQA) over
// a contiguous per-layer KV cache, for a prefill chunk or one decode token:
//   out[t, h, :] = sum_j softmax_j(q[t,h] . k[g, j] * scale) v[g, j, :]
// over cache positions j in [lo, positions[t]] (lo = 0, or positions[t] + 1 -
// window for a sliding window), g = h / (n_heads / n_kv_heads). Softmax in f32,
// computed online (running max and sum) over blocks of WG keys.
//
// Dispatch: one workgroup per (token, query head), grid folded into x/y.
// Each invocation scores one key of the block, then owns output dims
// lid, lid + WG, ... (head_dim <= 4 * WG and <= MAX_D). Needs a reduction
// prelude (reduce_workgroup.wgsl or reduce_subgroup.wgsl).
//
// Bindings:
//   0 params     uniform Params
//   1 positions  storage read  [n_tokens] u32 (absolute position of each query)
//   2 qkv        storage read  [n_tokens, q_stride] f32 (q heads at q_offset)
//   3 cache_k    storage read  [n_kv_heads, capacity, head_dim] f32
//   4 cache_v    storage read  [n_kv_heads, capacity, head_dim] f32
//   5 out        storage rw    [n_tokens, out_stride] f32 (head h at h * head_dim)

override WG: u32 = 64u;
const MAX_D: u32 = 256u;
const NEG: f32 = -3.0e38;

struct Params {
    n_tokens: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    q_stride: u32,
    q_offset: u32,
    capacity: u32,
    window: u32,
    out_stride: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> positions: array<u32>;
@group(0) @binding(2) var<storage, read> qkv: array<f32>;
@group(0) @binding(3) var<storage, read> cache_k: array<f32>;
@group(0) @binding(4) var<storage, read> cache_v: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

var<workgroup> q_shared: array<f32, MAX_D>;
var<workgroup> p_shared: array<f32, WG>;
var<workgroup> query_pos: u32;

@compute @workgroup_size(WG)
fn attention(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let item = wg.x + wg.y * nwg.x;
    if item >= p.n_tokens * p.n_heads {
        return;
    }
    let t = item / p.n_heads;
    let h = item % p.n_heads;
    let g = h / (p.n_heads / p.n_kv_heads);
    let dim = p.head_dim;
    let qb = t * p.q_stride + p.q_offset + h * dim;
    for (var d = lane.lid; d < dim; d = d + WG) {
        q_shared[d] = qkv[qb + d];
    }
    if lane.lid == 0u {
        query_pos = positions[t];
    }
    // The loop bounds must be uniform across the workgroup for its barriers.
    let pos = workgroupUniformLoad(&query_pos);
    var lo = 0u;
    if p.window > 0u && pos + 1u > p.window {
        lo = pos + 1u - p.window;
    }
    let kv_base = g * p.capacity;

    var m = NEG;
    var l = 0.0;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var j0 = lo; j0 <= pos; j0 = j0 + WG) {
        let j = j0 + lane.lid;
        var s = NEG;
        if j <= pos {
            let kb = (kv_base + j) * dim;
            var dot = 0.0;
            for (var d = 0u; d < dim; d = d + 1u) {
                dot = dot + q_shared[d] * cache_k[kb + d];
            }
            s = dot * p.scale;
        }
        let new_m = max(m, workgroup_max(s, lane));
        var pj = 0.0;
        if j <= pos {
            pj = exp(s - new_m);
        }
        p_shared[lane.lid] = pj;
        let correction = exp(m - new_m);
        // workgroup_sum's barriers also publish p_shared.
        l = l * correction + workgroup_sum(pj, lane);
        m = new_m;
        let n = min(WG, pos + 1u - j0);
        for (var k = 0u; k < 4u; k = k + 1u) {
            acc[k] = acc[k] * correction;
        }
        for (var jj = 0u; jj < n; jj = jj + 1u) {
            let pv = p_shared[jj];
            let vb = (kv_base + j0 + jj) * dim;
            for (var k = 0u; k < 4u; k = k + 1u) {
                let d = lane.lid + k * WG;
                if d < dim {
                    acc[k] = acc[k] + pv * cache_v[vb + d];
                }
            }
        }
        workgroupBarrier();
    }
    let ob = t * p.out_stride + h * dim;
    for (var k = 0u; k < 4u; k = k + 1u) {
        let d = lane.lid + k * WG;
        if d < dim {
            out[ob + d] = acc[k] / l;
        }
    }
}
