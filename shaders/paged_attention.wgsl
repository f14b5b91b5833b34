// paged_attention.wgsl: attention through the block tables of the paged KV
// pool: decode (split over pages, log-sum-exp merge) and prefill.
//
// attend_decode: one workgroup per (row, stored head, split). It serves all G
// query heads that read that stored head, so each K and V slot is read once
// for all of them. It walks its split in chunks of whole pages (up to
// CHUNK_SLOTS slots, and G * chunk <= MAX_GP): scores the chunk's slots
// (q . k * scale; slots past `len`, after the query's position, or outside the
// sliding window are masked by the positions stored in the page), updates a
// running max and sum per query head, and accumulates V — three barriers per
// chunk, not per page. It writes, per query head, the partial (acc[0..D],
// max, sum) of its split.
// merge_splits: one workgroup per (row, query head) combines the splits:
//   out = sum_j acc_j exp(m_j - M) / sum_j l_j exp(m_j - M),  M = max_j m_j.
//
// attend_prefill: one workgroup per (tile of BQ query tokens of one sequence,
// query head, split of pages); walks its pages for that head, up to its last
// query's slot, with the same masked online softmax per query row (causal by
// the stored positions), and writes the output rows directly (one split) or partials for merge_splits.
// Splits bound the work of one invocation: llvmpipe stops any invocation's
// loops after 65535 iterations in all, which a long prompt would pass.
//
// Pool page layout as in paged_kv_store.wgsl.
//
// Bindings (attend_decode):
//   0 params     uniform Params
//   1 positions  storage read  [n_rows] u32 (the query's position)
//   2 qkv        storage read  [n_rows, q_stride] f32 (query heads first)
//   3 desc       storage read  per (row, stored head) of this layer: {table offset, len}
//   4 tables     storage read  page indices
//   5 pool       storage read  pages of this layer's shard
//   6 partials   storage rw    [n_rows * n_heads * group, n_splits, head_dim + 2] f32
// Bindings (merge_splits):
//   0 params, 6 partials (read), 7 out rw [n_rows, n_heads * group * head_dim] f32
// Bindings (attend_prefill; n_rows = query tokens of one sequence, desc_base =
// its entry for stored head 0): 0-5 as attend_decode, 7 out rw [n_rows, n_heads * group * head_dim]

override WG: u32 = 64u;
override KV_F16: bool = true;
const MAX_GD: u32 = 2048u;   // group * head_dim
const MAX_GP: u32 = 512u;    // group * page_size
const MAX_G: u32 = 32u;
const CHUNK_SLOTS: u32 = 128u; // decode: slots scored per barrier round (serial per query head in the softmax)
const MAX_CHUNK_PAGES: u32 = 128u;
const ACC: u32 = 32u;        // MAX_GD / WG for WG >= 64
override BQ: u32 = 8u;       // query rows per prefill workgroup (BQ * head_dim <= MAX_GD, BQ * page_size <= MAX_GP, BQ <= MAX_G)
const NEG: f32 = -3.0e38;

struct Params {
    n_rows: u32,
    n_heads: u32,      // stored heads
    group: u32,        // query heads per stored head
    head_dim: u32,
    dw: u32,
    page_size: u32,
    page_words: u32,
    q_stride: u32,
    desc_base: u32,
    n_splits: u32,
    split_pages: u32,
    window: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> positions: array<u32>;
@group(0) @binding(2) var<storage, read> qkv: array<f32>;
@group(0) @binding(3) var<storage, read> desc: array<u32>;
@group(0) @binding(4) var<storage, read> tables: array<u32>;
@group(0) @binding(5) var<storage, read> pool: array<u32>;
@group(0) @binding(6) var<storage, read_write> partials: array<f32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;

var<workgroup> q_sh: array<f32, MAX_GD>;
var<workgroup> sc_sh: array<f32, MAX_GP>;
var<workgroup> m_sh: array<f32, MAX_G>;
var<workgroup> l_sh: array<f32, MAX_G>;
var<workgroup> corr_sh: array<f32, MAX_G>;
var<workgroup> bounds: vec3<u32>;   // table offset, len, query position
var<workgroup> page_sh: array<u32, MAX_CHUNK_PAGES>;  // decode: first word of each page of the chunk

fn k_dot(base: u32, qoff: u32) -> f32 {
    var s = 0.0;
    if KV_F16 {
        for (var w = 0u; w < p.dw; w = w + 1u) {
            let k = unpack2x16float(pool[base + w]);
            s = s + q_sh[qoff + 2u * w] * k.x + q_sh[qoff + 2u * w + 1u] * k.y;
        }
    } else {
        for (var d = 0u; d < p.head_dim; d = d + 1u) {
            s = s + q_sh[qoff + d] * bitcast<f32>(pool[base + d]);
        }
    }
    return s;
}

fn v_at(base: u32, d: u32) -> f32 {
    if KV_F16 {
        let v = unpack2x16float(pool[base + d / 2u]);
        return select(v.x, v.y, (d & 1u) == 1u);
    }
    return bitcast<f32>(pool[base + d]);
}

// Is a slot holding `pos` visible to a query at `q_pos`?
fn visible(pos: u32, q_pos: u32) -> bool {
    return pos <= q_pos && (p.window == 0u || pos + p.window > q_pos);
}

// Online softmax over `cols` slots for `n_rows` rows of scores in sc_sh (row
// r at r * cols; NEG = masked): turns scores into weights exp(s - m_new),
// updates each row's running max and sum, and leaves its rescale factor in corr_sh.
fn softmax_rows(lid: u32, n_rows: u32, cols: u32) {
    if lid < n_rows {
        let r = lid;
        var pm = NEG;
        for (var i = 0u; i < cols; i = i + 1u) {
            pm = max(pm, sc_sh[r * cols + i]);
        }
        let new_m = max(m_sh[r], pm);
        var sum = 0.0;
        for (var i = 0u; i < cols; i = i + 1u) {
            let sv = sc_sh[r * cols + i];
            var e = 0.0;
            if sv > NEG {
                e = exp(sv - new_m);
            }
            sc_sh[r * cols + i] = e;
            sum = sum + e;
        }
        let corr = select(exp(m_sh[r] - new_m), 0.0, m_sh[r] <= NEG);
        corr_sh[r] = corr;
        l_sh[r] = l_sh[r] * corr + sum;
        m_sh[r] = new_m;
    }
}

// acc for the (row, d) elements this invocation owns (element lid + k * WG
// of n_rows * head_dim): acc = acc * corr[row] + sum_i w[row, i] * v[i, d].
fn accumulate_page(lid: u32, acc: ptr<function, array<f32, ACC>>, n_elems: u32, v_base: u32) {
    for (var k = 0u; k < ACC; k = k + 1u) {
        let e = lid + k * WG;
        if e < n_elems {
            let r = e / p.head_dim;
            let d = e % p.head_dim;
            var a = (*acc)[k] * corr_sh[r];
            for (var i = 0u; i < p.page_size; i = i + 1u) {
                let w = sc_sh[r * p.page_size + i];
                if w > 0.0 {
                    a = a + w * v_at(v_base + i * p.dw, d);
                }
            }
            (*acc)[k] = a;
        }
    }
}

@compute @workgroup_size(WG)
fn attend_decode(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let item = wg.x + wg.y * nwg.x;
    if item >= p.n_rows * p.n_heads * p.n_splits {
        return;
    }
    let j = item % p.n_splits;
    let s = (item / p.n_splits) % p.n_heads;
    let b = item / (p.n_splits * p.n_heads);
    let dim = p.head_dim;
    let gd = p.group * dim;
    let gp = p.group * p.page_size;
    let h0 = s * p.group;   // first query head of the group

    let qb = b * p.q_stride + h0 * dim;
    for (var i = lid; i < gd; i = i + WG) {
        q_sh[i] = qkv[qb + i];
    }
    if lid < p.group {
        m_sh[lid] = NEG;
        l_sh[lid] = 0.0;
    }
    if lid == 0u {
        let d = (p.desc_base + b * p.n_heads + s) * 2u;
        bounds = vec3<u32>(desc[d], desc[d + 1u], positions[b]);
    }
    let bd = workgroupUniformLoad(&bounds);
    let n_pages = (bd.y + p.page_size - 1u) / p.page_size;
    let p0 = j * p.split_pages;
    let p1 = min(p0 + p.split_pages, n_pages);

    var acc: array<f32, ACC>;
    for (var k = 0u; k < ACC; k = k + 1u) {
        acc[k] = 0.0;
    }
    // Pages per chunk: G * chunk slots fit sc_sh, at most CHUNK_SLOTS slots.
    let chunk_pages = max(1u, min(MAX_GP / gp, CHUNK_SLOTS / p.page_size));
    for (var pg = p0; pg < p1; pg = pg + chunk_pages) {
        let np = min(chunk_pages, p1 - pg);
        let n_slots = np * p.page_size;
        if lid < np {
            page_sh[lid] = tables[bd.x + pg + lid] * p.page_words;
        }
        for (var idx = lid; idx < p.group * n_slots; idx = idx + WG) {
            let g = idx / n_slots;
            let i = idx - g * n_slots;
            let q = i / p.page_size;
            let slot = i - q * p.page_size;
            let base = tables[bd.x + pg + q] * p.page_words;
            var score = NEG;
            if pg * p.page_size + i < bd.y && visible(pool[base + 2u * p.page_size * p.dw + slot], bd.z) {
                score = k_dot(base + slot * p.dw, g * dim) * p.scale;
            }
            sc_sh[g * n_slots + i] = score;
        }
        workgroupBarrier();
        softmax_rows(lid, p.group, n_slots);
        workgroupBarrier();
        // acc[(g, d)] = acc * corr[g] + sum over the chunk's slots of w * v.
        for (var k = 0u; k < ACC; k = k + 1u) {
            let e = lid + k * WG;
            if e < gd {
                let r = e / dim;
                let d = e % dim;
                var a = acc[k] * corr_sh[r];
                var wi = r * n_slots;
                for (var q = 0u; q < np; q = q + 1u) {
                    var v = page_sh[q] + p.page_size * p.dw;
                    for (var slot = 0u; slot < p.page_size; slot = slot + 1u) {
                        let w = sc_sh[wi];
                        if w > 0.0 {
                            a = a + w * v_at(v, d);
                        }
                        wi = wi + 1u;
                        v = v + p.dw;
                    }
                }
                acc[k] = a;
            }
        }
        workgroupBarrier();
    }
    let stride = dim + 2u;
    for (var k = 0u; k < ACC; k = k + 1u) {
        let e = lid + k * WG;
        if e < gd {
            let g = e / dim;
            let d = e % dim;
            let hq = b * p.n_heads * p.group + h0 + g;
            partials[(hq * p.n_splits + j) * stride + d] = acc[k];
        }
    }
    if lid < p.group {
        let hq = b * p.n_heads * p.group + h0 + lid;
        let o = (hq * p.n_splits + j) * stride + dim;
        partials[o] = m_sh[lid];
        partials[o + 1u] = l_sh[lid];
    }
}

@compute @workgroup_size(WG)
fn merge_splits(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let hq = wg.x + wg.y * nwg.x;   // row * (n_heads * group) + query head
    if hq >= p.n_rows * p.n_heads * p.group {
        return;
    }
    let dim = p.head_dim;
    let stride = dim + 2u;
    let first = hq * p.n_splits * stride;
    var big_m = NEG;
    for (var j = 0u; j < p.n_splits; j = j + 1u) {
        big_m = max(big_m, partials[first + j * stride + dim]);
    }
    var big_l = 0.0;
    for (var j = 0u; j < p.n_splits; j = j + 1u) {
        let m = partials[first + j * stride + dim];
        if m > NEG {
            big_l = big_l + partials[first + j * stride + dim + 1u] * exp(m - big_m);
        }
    }
    for (var d = lid; d < dim; d = d + WG) {
        var a = 0.0;
        for (var j = 0u; j < p.n_splits; j = j + 1u) {
            let m = partials[first + j * stride + dim];
            if m > NEG {
                a = a + partials[first + j * stride + d] * exp(m - big_m);
            }
        }
        out[hq * dim + d] = a / big_l;
    }
}

@compute @workgroup_size(WG)
fn attend_prefill(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let hq_count = p.n_heads * p.group;
    let tiles = (p.n_rows + BQ - 1u) / BQ;
    let item = wg.x + wg.y * nwg.x;
    if item >= tiles * hq_count * p.n_splits {
        return;
    }
    let j = item % p.n_splits;
    let h = (item / p.n_splits) % hq_count;
    let t0 = (item / (p.n_splits * hq_count)) * BQ;
    let nq = min(BQ, p.n_rows - t0);
    let s = h / p.group;
    let dim = p.head_dim;
    let rd = nq * dim;

    for (var i = lid; i < rd; i = i + WG) {
        q_sh[i] = qkv[(t0 + i / dim) * p.q_stride + h * dim + i % dim];
    }
    if lid < BQ {
        m_sh[lid] = NEG;
        l_sh[lid] = 0.0;
    }
    if lid == 0u {
        let d = (p.desc_base + s) * 2u;
        bounds = vec3<u32>(desc[d], desc[d + 1u], 0u);
    }
    let bd = workgroupUniformLoad(&bounds);
    // The n_rows query tokens fill the last n_rows slots in order, so slots
    // past this tile's last query are in its future: stop there (causal
    // skip; the masks below still decide visibility slot by slot).
    let len = bd.y - p.n_rows + t0 + nq;
    let n_pages = (len + p.page_size - 1u) / p.page_size;
    let p0 = j * p.split_pages;
    let p1 = min(p0 + p.split_pages, n_pages);
    let rp = nq * p.page_size;

    var acc: array<f32, ACC>;
    for (var k = 0u; k < ACC; k = k + 1u) {
        acc[k] = 0.0;
    }
    for (var pg = p0; pg < p1; pg = pg + 1u) {
        let base = tables[bd.x + pg] * p.page_words;
        let v_base = base + p.page_size * p.dw;
        let pos_base = base + 2u * p.page_size * p.dw;
        for (var idx = lid; idx < rp; idx = idx + WG) {
            let i = idx % p.page_size;
            let r = idx / p.page_size;
            var score = NEG;
            if pg * p.page_size + i < len && visible(pool[pos_base + i], positions[t0 + r]) {
                score = k_dot(base + i * p.dw, r * dim) * p.scale;
            }
            sc_sh[idx] = score;
        }
        workgroupBarrier();
        softmax_rows(lid, nq, p.page_size);
        workgroupBarrier();
        accumulate_page(lid, &acc, rd, v_base);
        workgroupBarrier();
    }
    if p.n_splits == 1u {
        let out_stride = hq_count * dim;
        for (var k = 0u; k < ACC; k = k + 1u) {
            let e = lid + k * WG;
            if e < rd {
                let r = e / dim;
                out[(t0 + r) * out_stride + h * dim + e % dim] = acc[k] / l_sh[r];
            }
        }
        return;
    }
    // Partials of this split, merged by merge_splits like decode's.
    let stride = dim + 2u;
    for (var k = 0u; k < ACC; k = k + 1u) {
        let e = lid + k * WG;
        if e < rd {
            let r = e / dim;
            let hq = (t0 + r) * hq_count + h;
            partials[(hq * p.n_splits + j) * stride + e % dim] = acc[k];
        }
    }
    if lid < nq {
        let o = (((t0 + lid) * hq_count + h) * p.n_splits + j) * stride + dim;
        partials[o] = m_sh[lid];
        partials[o + 1u] = l_sh[lid];
    }
}
