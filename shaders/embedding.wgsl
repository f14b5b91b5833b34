// embedding.wgsl: gather rows of the token-embedding table,
//   out[t, d] = w[ids[t], d]
// for the ids that fall in this part of the table [first_row, first_row + part_rows)
// (a table larger than one storage binding is split by rows; one dispatch per
// part). Ids are validated on the host.
//
// Dispatch: one invocation per output element, grid folded into x/y.
//
// Bindings (both entry points):
//   0 params  uniform Params
//   1 w       storage read  [part_rows, row_words] u32: f32 bits or two f16 per
//             word, or quantized blocks (row_words: BYTES per row; read by
//             quant_blocks.wgsl, joined in front)
//   2 ids     storage read  [n_tokens] u32
//   3 out     storage rw    [n_tokens, dim] f32

override WG: u32 = 256u;

struct Params {
    n_tokens: u32,
    dim: u32,
    row_words: u32,
    first_row: u32,
    part_rows: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// The table row of output element `idx`, or -1 if it is not in this part.
fn part_row(idx: u32) -> i32 {
    let id = ids[idx / p.dim];
    if id < p.first_row || id - p.first_row >= p.part_rows {
        return -1;
    }
    return i32(id - p.first_row);
}

@compute @workgroup_size(WG)
fn embed_f32(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = (wg.x + wg.y * nwg.x) * WG + lid;
    if idx >= p.n_tokens * p.dim {
        return;
    }
    let r = part_row(idx);
    if r >= 0 {
        out[idx] = bitcast<f32>(w[u32(r) * p.row_words + idx % p.dim]);
    }
}

@compute @workgroup_size(WG)
fn embed_f16(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = (wg.x + wg.y * nwg.x) * WG + lid;
    if idx >= p.n_tokens * p.dim {
        return;
    }
    let r = part_row(idx);
    if r >= 0 {
        let d = idx % p.dim;
        let pair = unpack2x16float(w[u32(r) * p.row_words + d / 2u]);
        out[idx] = select(pair.x, pair.y, (d & 1u) == 1u);
    }
}

fn embed_quant(format: u32, lid: u32, wg: vec3<u32>, nwg: vec3<u32>) {
    let idx = (wg.x + wg.y * nwg.x) * WG + lid;
    if idx >= p.n_tokens * p.dim {
        return;
    }
    let r = part_row(idx);
    if r >= 0 {
        out[idx] = weight_at(format, u32(r) * p.row_words, idx % p.dim);
    }
}

@compute @workgroup_size(WG)
fn embed_q8_0(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    embed_quant(Q8_0, lid, wg, nwg);
}

@compute @workgroup_size(WG)
fn embed_q4_0(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    embed_quant(Q4_0, lid, wg, nwg);
}

@compute @workgroup_size(WG)
fn embed_q4_k(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    embed_quant(Q4_K, lid, wg, nwg);
}

@compute @workgroup_size(WG)
fn embed_q6_k(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    embed_quant(Q6_K, lid, wg, nwg);
}
