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
// query head, split of pages); walks its split's slots for that head in
// tiles of PK = 32, up to its last query's slot: S = Q K^T of the tile
// through workgroup memory (a GEMM tile, 4 x 4 per invocation), the same
// masked online softmax per query row (causal by the stored positions),
// then V of the tile staged as f32; writes the output rows directly (one
// split) or partials for merge_splits. Needs WG = 64.
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
override BQ: u32 = 8u;       // query rows per prefill workgroup (BQ * head_dim <= MAX_GD, BQ <= 32)
const NEG: f32 = -3.0e38;
const PK: u32 = 32u;         // prefill: slots per tile (columns of S)
const PKC: u32 = 32u;        // prefill: head dims staged per step
const SC_LEN: u32 = 1024u;   // scores in workgroup memory: decode G * chunk <= MAX_GP, prefill BQ * PK

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
var<workgroup> sc_sh: array<f32, SC_LEN>;
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

// Dims 4c..4c+3 of the value at word `base` (zero past head_dim).
fn v4_at(base: u32, c: u32) -> vec4<f32> {
    if KV_F16 {
        var w0 = 0u;
        var w1 = 0u;
        if 2u * c < p.dw {
            w0 = pool[base + 2u * c];
        }
        if 2u * c + 1u < p.dw {
            w1 = pool[base + 2u * c + 1u];
        }
        return vec4<f32>(unpack2x16float(w0), unpack2x16float(w1));
    }
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i = i + 1u) {
        if 4u * c + i < p.dw {
            v[i] = bitcast<f32>(pool[base + 4u * c + i]);
        }
    }
    return v;
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

@compute @workgroup_size(WG)
fn attend_decode(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let pg_geom = geom();
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

    // Output cells: (query head g, vec4 column c) of G x ceil(D / 4), cell
    // lid + k * WG (at most 8 per invocation: G * D <= MAX_GD).
    let dv = (dim + 3u) / 4u;
    let cells = p.group * dv;
    var acc: array<vec4<f32>, 8>;
    // Pages per chunk: G * chunk slots fit sc_sh, at most CHUNK_SLOTS slots.
    let chunk_pages = max(1u, min(MAX_GP / gp, CHUNK_SLOTS / p.page_size));
    for (var pg = p0; pg < p1; pg = pg + chunk_pages) {
        let np = min(chunk_pages, p1 - pg);
        let n_slots = np * p.page_size;
        if lid < np {
            page_sh[lid] = page_start(pg_geom, tables[bd.x + pg + lid]);
        }
        for (var idx = lid; idx < p.group * n_slots; idx = idx + WG) {
            let g = idx / n_slots;
            let i = idx - g * n_slots;
            let q = i / p.page_size;
            let slot = i - q * p.page_size;
            let base = page_start(pg_geom, tables[bd.x + pg + q]);
            var score = NEG;
            if pg * p.page_size + i < bd.y && visible(pool[base + position_at(pg_geom, slot)], bd.z) {
                score = k_dot(base + key_at(pg_geom, slot), g * dim) * p.scale;
            }
            sc_sh[g * n_slots + i] = score;
        }
        workgroupBarrier();
        softmax_rows(lid, p.group, n_slots);
        workgroupBarrier();
        // acc[(g, c)] = acc * corr[g] + sum over the chunk's slots of w * v[4c..4c+4].
        for (var k = 0u; k < 8u; k = k + 1u) {
            let e = lid + k * WG;
            if e < cells {
                let r = e / dv;
                let c = e % dv;
                var a = acc[k] * corr_sh[r];
                var wi = r * n_slots;
                for (var q = 0u; q < np; q = q + 1u) {
                    var v = page_sh[q] + value_offset(pg_geom);
                    for (var slot = 0u; slot < p.page_size; slot = slot + 1u) {
                        let w = sc_sh[wi];
                        if w > 0.0 {
                            a = a + w * v4_at(v, c);
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
    for (var k = 0u; k < 8u; k = k + 1u) {
        let e = lid + k * WG;
        if e < cells {
            let g = e / dv;
            let c = e % dv;
            let hq = b * p.n_heads * p.group + h0 + g;
            for (var i = 0u; i < 4u; i = i + 1u) {
                if 4u * c + i < dim {
                    partials[(hq * p.n_splits + j) * stride + 4u * c + i] = acc[k][i];
                }
            }
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

// Prefill tiles: S = Q K^T for up to 32 query rows x PK slots, staged
// through workgroup memory PKC dims at a time as vec4s of 4 rows (Q) / 4
// slots (K), each invocation a 4 x 4 block of S in registers; then V of
// the tile's slots, as f32, in groups that fit `tile_sh`.
var<workgroup> tile_sh: array<vec4<f32>, 512>;   // Q chunk [PKC][8] | K chunk [PKC][8]; V [slots][head_dim]
var<workgroup> kb_sh: array<u32, PK>;            // word of each tile slot's key
var<workgroup> kpos_sh: array<u32, PK>;          // its position

@compute @workgroup_size(WG)
fn attend_prefill(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let pg_geom = geom();
    let hq_count = p.n_heads * p.group;
    let tiles = (p.n_rows + BQ - 1u) / BQ;
    let item = wg.x + wg.y * nwg.x;
    // Uniform per workgroup (every invocation returns or none does).
    if item >= tiles * hq_count * p.n_splits {
        return;
    }
    let j = item % p.n_splits;
    let h = (item / p.n_splits) % hq_count;
    let t0 = (item / (p.n_splits * hq_count)) * BQ;
    let nq = min(BQ, p.n_rows - t0);
    let s = h / p.group;
    let dim = p.head_dim;
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
    let s0 = j * p.split_pages * p.page_size;
    let s1 = min(s0 + p.split_pages * p.page_size, len);
    let tr = lid / 8u;      // S rows 4 tr .. 4 tr + 3
    let tc = lid % 8u;      // S columns 4 tc .. 4 tc + 3
    // Words per slot of a staged K chunk.
    var kwords = PKC;
    if KV_F16 {
        kwords = PKC / 2u;
    }
    // The output tile BQ x head_dim as vec4 columns: invocation (rg, cg)
    // owns rows 4 rg .. 4 rg + 3 and vec4 columns cg and cg + CG (BQ is a
    // power of two <= 32 with BQ * head_dim <= 2048, so two suffice).
    let dv = (dim + 3u) / 4u;
    let cgs = 256u / BQ;                 // CG: invocations per 4 rows
    let rg = lid / cgs;
    let cg = lid % cgs;
    let v_slots = min(PK, 512u / dv);    // V slots staged at once
    var acc: array<vec4<f32>, 8>;        // [row 0..4][column 0..2]
    for (var ts = s0; ts < s1; ts = ts + PK) {
        let n_cols = min(PK, s1 - ts);
        workgroupBarrier();
        if lid < PK && lid < n_cols {
            let t = ts + lid;
            let page = slot_page(pg_geom, bd.x, t);
            kb_sh[lid] = page + key_at(pg_geom, t % pg_geom.page_size);
            kpos_sh[lid] = pool[page + position_at(pg_geom, t % pg_geom.page_size)];
        }
        var s_0 = vec4<f32>(0.0);
        var s_1 = vec4<f32>(0.0);
        var s_2 = vec4<f32>(0.0);
        var s_3 = vec4<f32>(0.0);
        for (var k0 = 0u; k0 < dim; k0 = k0 + PKC) {
            workgroupBarrier();
            // Q rows t0.., dims k0..k0+PKC (zero past nq or head_dim).
            for (var e = lid; e < 32u * PKC; e = e + WG) {
                let r = e / PKC;
                let k = e % PKC;
                var x = 0.0;
                if r < nq && k0 + k < dim {
                    x = qkv[(t0 + r) * p.q_stride + h * dim + k0 + k];
                }
                tile_sh[k * 8u + r / 4u][r % 4u] = x;
            }
            // K of the tile's slots, the same dims.
            for (var e = lid; e < PK * kwords; e = e + WG) {
                let c = e / kwords;
                let w = e % kwords;
                let wi = k0 * kwords / PKC + w;
                var word = 0u;
                if c < n_cols && wi < p.dw {
                    word = pool[kb_sh[c] + wi];
                }
                if KV_F16 {
                    let x = unpack2x16float(word);
                    tile_sh[256u + (2u * w) * 8u + c / 4u][c % 4u] = x.x;
                    tile_sh[256u + (2u * w + 1u) * 8u + c / 4u][c % 4u] = x.y;
                } else {
                    tile_sh[256u + w * 8u + c / 4u][c % 4u] = bitcast<f32>(word);
                }
            }
            workgroupBarrier();
            for (var k = 0u; k < PKC; k = k + 1u) {
                let rv = tile_sh[k * 8u + tr];
                let cv = tile_sh[256u + k * 8u + tc];
                s_0 = s_0 + rv.x * cv;
                s_1 = s_1 + rv.y * cv;
                s_2 = s_2 + rv.z * cv;
                s_3 = s_3 + rv.w * cv;
            }
        }
        // Scores of this tile, masked by the stored positions (rows past
        // nq weigh 0; the softmax leaves them alone).
        let blk = array<vec4<f32>, 4>(s_0, s_1, s_2, s_3);
        for (var a = 0u; a < 4u; a = a + 1u) {
            let r = 4u * tr + a;
            if r < BQ {
                for (var b = 0u; b < 4u; b = b + 1u) {
                    let c = 4u * tc + b;
                    var score = 0.0;
                    if r < nq {
                        score = NEG;
                        if c < n_cols && visible(kpos_sh[c], positions[t0 + r]) {
                            score = blk[a][b] * p.scale;
                        }
                    }
                    sc_sh[r * PK + c] = score;
                }
            }
        }
        workgroupBarrier();
        softmax_rows(lid, nq, PK);
        workgroupBarrier();
        for (var k = 0u; k < 4u; k = k + 1u) {
            let corr = corr_sh[4u * rg + k];
            acc[2u * k] = acc[2u * k] * corr;
            acc[2u * k + 1u] = acc[2u * k + 1u] * corr;
        }
        // acc += weights x V, V staged as vec4s, v_slots slots at a time.
        for (var v0 = 0u; v0 < n_cols; v0 = v0 + v_slots) {
            workgroupBarrier();
            for (var e = lid; e < v_slots * dv; e = e + WG) {
                let i = e / dv;
                let q = e % dv;
                var v = vec4<f32>(0.0);
                if v0 + i < n_cols {
                    v = v4_at(kb_sh[v0 + i] + value_offset(pg_geom), q);
                }
                tile_sh[i * dv + q] = v;
            }
            workgroupBarrier();
            let n_v = min(v_slots, n_cols - v0);
            let q1 = cg + cgs;
            for (var i = 0u; i < n_v; i = i + 1u) {
                let wr = vec4<f32>(
                    sc_sh[(4u * rg) * PK + v0 + i],
                    sc_sh[(4u * rg + 1u) * PK + v0 + i],
                    sc_sh[(4u * rg + 2u) * PK + v0 + i],
                    sc_sh[(4u * rg + 3u) * PK + v0 + i],
                );
                var va = vec4<f32>(0.0);
                var vb = vec4<f32>(0.0);
                if cg < dv {
                    va = tile_sh[i * dv + cg];
                }
                if q1 < dv {
                    vb = tile_sh[i * dv + q1];
                }
                acc[0] = acc[0] + wr.x * va;
                acc[1] = acc[1] + wr.x * vb;
                acc[2] = acc[2] + wr.y * va;
                acc[3] = acc[3] + wr.y * vb;
                acc[4] = acc[4] + wr.z * va;
                acc[5] = acc[5] + wr.z * vb;
                acc[6] = acc[6] + wr.w * va;
                acc[7] = acc[7] + wr.w * vb;
            }
        }
    }
    // Rows 4 rg + k, dims 4 (cg + m * CG) + c of the output tile.
    let out_stride = hq_count * dim;
    let stride = dim + 2u;
    for (var k = 0u; k < 4u; k = k + 1u) {
        let r = 4u * rg + k;
        if r < nq {
            for (var m = 0u; m < 2u; m = m + 1u) {
                let q = cg + m * cgs;
                for (var c = 0u; c < 4u; c = c + 1u) {
                    let d = 4u * q + c;
                    if q < dv && d < dim {
                        let x = acc[2u * k + m][c];
                        if p.n_splits == 1u {
                            out[(t0 + r) * out_stride + h * dim + d] = x / l_sh[r];
                        } else {
                            let hq = (t0 + r) * hq_count + h;
                            partials[(hq * p.n_splits + j) * stride + d] = x;
                        }
                    }
                }
            }
        }
    }
    if p.n_splits > 1u && lid < nq {
        let o = (((t0 + lid) * hq_count + h) * p.n_splits + j) * stride + dim;
        partials[o] = m_sh[lid];
        partials[o + 1u] = l_sh[lid];
    }
}

