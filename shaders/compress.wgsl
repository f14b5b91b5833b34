// compress.wgsl: KV-cache compression passes over the paged pool
// (shared/specs/kv-compression.md). Keys are read through the block tables
// (desc entry per stored head: {table offset, len}); every slot's position
// sits in its page (the layout is pages.wgsl's, joined in front).
//
// Score units: in the SnapKV family a unit is a query head (U = Hq) feeding
// stored head u / units_per_head; in R-KV mode (RKV = 1) a unit is a KV head
// whose logit is the max over its G query heads' raw logits, columns are the
// C = len - window candidates only and nothing is masked.
//
// Entry points, in pass order:
//   store_window_queries  (in the forward) the last `window` queries of each row
//                         group into the lane's ring, slot = position % window
//   score_stats           per (query row, unit, range of 8192 slots): max and
//                         exp-sum of the row's visible logits (visible: slot
//                         position <= query position), merged by score_accumulate
//   score_accumulate      per (group, unit, slot): sum over the group's rows of
//                         the probabilities; into acc (replacing, or adding: H2O)
//   score_reduce          per (stored head, candidate): row mean (optional) and
//                         GQA reduction (mean / max / sum) over the head's units
//   score_pool            per (stored head, candidate): max or avg pooling
//   fill_scores           per (stored head, candidate): a constant (rules that
//                         keep the first slots: top-k breaks ties to the lower)
//   key_norms             per (stored head, slot): 1 / (||k|| + eps)
//   redundancy_rows       per (stored head, row i): sum of cosine similarities
//                         to the other slots, last(i) and S[i, last(i)]
//                         (tiles of S = K K^T through workgroup memory)
//   redundancy_cols       per (stored head, column j): column mean of S with the
//                         last(i) entries removed (row-sum identity, S symmetric)
//   rkv_combine           per stored head: lambda * I - (1 - lambda) * softmax(colmean)
//   topk_select           per stored head: exact top-k by radix select on sortable
//                         score bits, exact ties to the lower slot; kept slots
//                         ascending, then the window
//   rank_reference        the selected slots by descending score (R-KV's layout)
//   compact_gather        kept slots (K, V, position, H2O accumulators) -> scratch
//   compact_scatter       scratch -> slots 0.. of the same head, accumulators past
//                         the new length zeroed (the host then frees the pages
//                         past the new length)

override WG: u32 = 256u;
override KV_F16: bool = true;
const SG: u32 = 256u;       // workgroup of score_stats
const TK: u32 = 256u;       // workgroup of topk_select
const STAT_SPLIT: u32 = 8192u;  // slots one score_stats workgroup covers

struct Params {
    n_heads: u32,          // stored heads
    units: u32,            // score units
    units_per_head: u32,   // units feeding one stored head
    group: u32,            // query heads per KV head (R-KV's max)
    head_dim: u32,
    dw: u32,
    page_size: u32,
    page_words: u32,
    n_rows: u32,           // query rows
    rows_per_group: u32,   // rows sharing one sequence (one acc region)
    q_base: u32,
    q_row_stride: u32,
    qpos_base: u32,
    desc_base: u32,        // desc entry of (row 0, stored head 0)
    acc_base: u32,         // acc offset of lane 0 (this layer)
    acc_lane_stride: u32,
    t_stride: u32,         // slots per unit / head in acc, scores, norms, ...
    window: u32,
    kernel: u32,
    rkv: u32,
    mean: u32,             // score_reduce: divide by n_rows
    agg: u32,              // 0 mean, 1 max, 2 sum
    pooling: u32,          // 0 max, 1 avg
    accumulate: u32,       // score_accumulate adds to acc
    k_stride: u32,         // kept list stride per head
    acc_units: u32,        // accumulator units per stored head moved by compaction (0: none)
    ring_lane_rows: u32,   // store_window_queries: ring rows per lane (layers * window)
    scale: f32,
    lambda: f32,
    threshold: f32,
    eps: f32,
    stat_splits: u32,      // score_stats: slot ranges of STAT_SPLIT per (row, unit)
    slots: u32,            // the longest head's length this pass covers (compaction's scratch layout)
    row_lanes: u32,        // score_stats: threads per (row, unit, split) (power of two <= SG)
    kvec_base: u32,        // topk_select, rank_reference, compaction: this layer's kvec entries
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> qpos: array<u32>;
@group(0) @binding(2) var<storage, read_write> queries: array<f32>;
@group(0) @binding(3) var<storage, read> desc: array<u32>;
@group(0) @binding(4) var<storage, read> tables: array<u32>;
@group(0) @binding(5) var<storage, read_write> pool: array<u32>;
@group(0) @binding(6) var<storage, read_write> stats: array<f32>;
@group(0) @binding(7) var<storage, read_write> acc: array<f32>;
@group(0) @binding(8) var<storage, read> lanes: array<u32>;
@group(0) @binding(9) var<storage, read_write> raw: array<f32>;
@group(0) @binding(10) var<storage, read_write> scores: array<f32>;
@group(0) @binding(11) var<storage, read_write> norms: array<f32>;
@group(0) @binding(12) var<storage, read_write> rowstat: array<f32>;
@group(0) @binding(13) var<storage, read_write> last: array<u32>;
@group(0) @binding(14) var<storage, read> kvec: array<u32>;
@group(0) @binding(15) var<storage, read_write> kept: array<u32>;
@group(0) @binding(16) var<storage, read_write> order: array<u32>;
@group(0) @binding(17) var<storage, read_write> scratch: array<u32>;
// store_window_queries only: the step's rows
@group(0) @binding(18) var<storage, read> positions: array<u32>;
@group(0) @binding(19) var<storage, read> qkv: array<f32>;

fn flat_id(wg: vec3<u32>, nwg: vec3<u32>, lid: u32, size: u32) -> u32 {
    return (wg.x + wg.y * nwg.x) * size + lid;
}

fn head_len(s: u32) -> u32 {
    return desc[(p.desc_base + s) * 2u + 1u];
}

// Word index in the pool of slot t's key of stored head s, for the desc entry `d`.
fn slot_base(d: u32, t: u32) -> u32 {
    let g = geom();
    return slot_page(g, desc[d * 2u], t) + key_at(g, t % g.page_size);
}

fn slot_pos(d: u32, t: u32) -> u32 {
    let g = geom();
    return pool[slot_page(g, desc[d * 2u], t) + position_at(g, t % g.page_size)];
}

// q (queries[qoff..]) . key at word `kb`.
fn q_dot(qoff: u32, kb: u32) -> f32 {
    var s = 0.0;
    if KV_F16 {
        for (var w = 0u; w < p.dw; w = w + 1u) {
            let k = unpack2x16float(pool[kb + w]);
            s = s + queries[qoff + 2u * w] * k.x + queries[qoff + 2u * w + 1u] * k.y;
        }
    } else {
        for (var w = 0u; w < p.dw; w = w + 1u) {
            s = s + queries[qoff + w] * bitcast<f32>(pool[kb + w]);
        }
    }
    return s;
}

fn k_dot(a: u32, b: u32) -> f32 {
    var s = 0.0;
    if KV_F16 {
        for (var w = 0u; w < p.dw; w = w + 1u) {
            let x = unpack2x16float(pool[a + w]);
            let y = unpack2x16float(pool[b + w]);
            s = s + x.x * y.x + x.y * y.y;
        }
    } else {
        for (var w = 0u; w < p.dw; w = w + 1u) {
            s = s + bitcast<f32>(pool[a + w]) * bitcast<f32>(pool[b + w]);
        }
    }
    return s;
}

// Stored head a unit reads.
fn unit_head(u: u32) -> u32 {
    if p.rkv == 1u {
        return u;
    }
    return u / p.units_per_head;
}

// Logit of query row r, unit u against the key at word kb (R-KV: max over the group).
fn unit_logit(r: u32, u: u32, kb: u32) -> f32 {
    let row = p.q_base + r * p.q_row_stride;
    if p.rkv == 1u {
        var m = -3.0e38;
        for (var g = 0u; g < p.group; g = g + 1u) {
            m = max(m, q_dot(row + (u * p.group + g) * p.head_dim, kb) * p.scale);
        }
        return m;
    }
    return q_dot(row + u * p.head_dim, kb) * p.scale;
}

// Columns a unit's softmax runs over, for a head of `len` slots.
fn columns(len: u32) -> u32 {
    if p.rkv == 1u {
        return len - min(len, p.window);
    }
    return len;
}

fn desc_of_row(r: u32, s: u32) -> u32 {
    return p.desc_base + (r / p.rows_per_group) * p.rows_per_group * p.n_heads + s;
}

// ---------------------------------------------------------------------------

@compute @workgroup_size(WG)
fn store_window_queries(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let width = p.units * p.head_dim;          // query heads * head_dim
    let idx = flat_id(wg, nwg, lid, WG);
    if idx >= p.n_rows * width {
        return;
    }
    let n = idx / width;
    let i = idx % width;
    let g = n / p.rows_per_group;
    if n % p.rows_per_group + p.window < p.rows_per_group {
        return;   // not among the last `window` rows of its group
    }
    let lane = lanes[g];
    let pos = positions[n];
    let slot = pos % p.window;
    queries[p.q_base + (lane * p.ring_lane_rows + slot) * width + i] = qkv[n * p.q_row_stride + i];
    if i == 0u {
        qpos[lane * p.window + slot] = pos;
    }
}

var<workgroup> red_m: array<f32, SG>;
var<workgroup> red_z: array<f32, SG>;

// `row_lanes` threads per (row, unit, split) (a power of two <= SG, from
// the head length), SG / row_lanes of them per workgroup.
@compute @workgroup_size(SG)
fn score_stats(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let lanes = p.row_lanes;
    let lane = lid % lanes;
    // (row * units + unit) * stat_splits + split
    let id = (wg.x + wg.y * nwg.x) * (SG / lanes) + lid / lanes;
    let valid = id < p.n_rows * p.units * p.stat_splits;
    let split = id % p.stat_splits;
    let r = id / (p.units * p.stat_splits);
    let u = (id / p.stat_splits) % p.units;
    let s = unit_head(u);
    var m = -3.0e38;
    var z = 0.0;
    if valid {
        let d = desc_of_row(r, s);
        let n = min(columns(desc[d * 2u + 1u]), (split + 1u) * STAT_SPLIT);
        let qp = qpos[p.qpos_base + r];
        for (var t = split * STAT_SPLIT + lane; t < n; t = t + lanes) {
            if p.rkv == 1u || slot_pos(d, t) <= qp {
                let l = unit_logit(r, u, slot_base(d, t));
                let m2 = max(m, l);
                z = z * exp(m - m2) + exp(l - m2);
                m = m2;
            }
        }
    }
    red_m[lid] = m;
    red_z[lid] = z;
    workgroupBarrier();
    for (var h = lanes / 2u; h > 0u; h = h >> 1u) {
        if lane < h {
            let ma = red_m[lid];
            let mb = red_m[lid + h];
            let mm = max(ma, mb);
            red_z[lid] = red_z[lid] * exp(ma - mm) + red_z[lid + h] * exp(mb - mm);
            red_m[lid] = mm;
        }
        workgroupBarrier();
    }
    if valid && lane == 0u {
        stats[id * 2u] = red_m[lid];
        stats[id * 2u + 1u] = red_z[lid];
    }
}

@compute @workgroup_size(WG)
fn score_accumulate(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    // x: slot blocks, y: unit, z: row group
    let t = wg.x * WG + lid;
    let u = wg.y;
    let g = wg.z;
    let s = unit_head(u);
    let r0 = g * p.rows_per_group;
    let d = desc_of_row(r0, s);
    let n = columns(desc[d * 2u + 1u]);
    if t >= n {
        return;
    }
    let kb = slot_base(d, t);
    let tp = slot_pos(d, t);
    var sum = 0.0;
    for (var r = r0; r < min(r0 + p.rows_per_group, p.n_rows); r = r + 1u) {
        if p.rkv == 1u || tp <= qpos[p.qpos_base + r] {
            // Merge the row's split statistics.
            let st = (r * p.units + u) * p.stat_splits * 2u;
            var m = -3.0e38;
            for (var j = 0u; j < p.stat_splits; j = j + 1u) {
                m = max(m, stats[st + 2u * j]);
            }
            var z = 0.0;
            for (var j = 0u; j < p.stat_splits; j = j + 1u) {
                let zj = stats[st + 2u * j + 1u];
                if zj > 0.0 {
                    z = z + zj * exp(stats[st + 2u * j] - m);
                }
            }
            sum = sum + exp(unit_logit(r, u, kb) - m) / z;
        }
    }
    let a = p.acc_base + lanes[g] * p.acc_lane_stride + u * p.t_stride + t;
    if p.accumulate == 1u {
        acc[a] = acc[a] + sum;
    } else {
        acc[a] = sum;
    }
}

@compute @workgroup_size(WG)
fn score_reduce(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let t = wg.x * WG + lid;
    let s = wg.y;
    let len = head_len(s);
    if t >= len - min(len, p.window) {
        return;
    }
    var per_row = 1.0;
    if p.mean == 1u {
        per_row = 1.0 / f32(p.n_rows);
    }
    var v = 0.0;
    if p.agg == 1u {
        v = -3.0e38;
    }
    let ups = select(p.units_per_head, 1u, p.rkv == 1u);
    for (var j = 0u; j < ups; j = j + 1u) {
        let x = acc[p.acc_base + (s * ups + j) * p.t_stride + t] * per_row;
        if p.agg == 1u {
            v = max(v, x);
        } else {
            v = v + x;
        }
    }
    if p.agg == 0u {
        v = v / f32(ups);
    }
    raw[s * p.t_stride + t] = v;
}

@compute @workgroup_size(WG)
fn score_pool(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let t = wg.x * WG + lid;
    let s = wg.y;
    let len = head_len(s);
    let c = len - min(len, p.window);
    if t >= c {
        return;
    }
    let half = p.kernel / 2u;
    let lo = t - min(t, half);
    let hi = min(t + half + 1u, c);
    let base = s * p.t_stride;
    var v = 0.0;
    if p.pooling == 0u {
        v = -3.0e38;
        for (var j = lo; j < hi; j = j + 1u) {
            v = max(v, raw[base + j]);
        }
    } else {
        for (var j = lo; j < hi; j = j + 1u) {
            v = v + raw[base + j];
        }
        v = v / f32(p.kernel);
    }
    scores[base + t] = v;
}

@compute @workgroup_size(WG)
fn fill_scores(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let t = wg.x * WG + lid;
    let s = wg.y;
    let len = head_len(s);
    if t >= len - min(len, p.window) {
        return;
    }
    scores[s * p.t_stride + t] = p.lambda;
}

@compute @workgroup_size(WG)
fn key_norms(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let t = wg.x * WG + lid;
    let s = wg.y;
    let d = p.desc_base + s;
    if t >= desc[d * 2u + 1u] {
        return;
    }
    let kb = slot_base(d, t);
    norms[s * p.t_stride + t] = 1.0 / (sqrt(k_dot(kb, kb)) + p.eps);
}

const RT: u32 = 32u;        // redundancy_rows: rows and columns of S per tile
const KC: u32 = 32u;        // redundancy_rows: key dims staged per step
const RW: u32 = 64u;        // redundancy_rows: workgroup (8 x 8 threads, 4 x 4 of S each)

// Tiles as vec4s of 4 adjacent slots: [KC dims][RT / 4], so a thread reads
// one vec4 of rows and one of columns per 16 multiply-adds.
var<workgroup> rt_rows: array<vec4<f32>, 256>;  // the row tile's keys, dims k0..k0+KC
var<workgroup> rt_cols: array<vec4<f32>, 256>;  // the column tile's keys
var<workgroup> rt_rbase: array<u32, RT>;         // pool word of each row slot's key
var<workgroup> rt_cbase: array<u32, RT>;         // ... and each column slot's
var<workgroup> rr_sum: array<f32, 256>;    // [RT rows][8 column threads]
var<workgroup> rr_hit: array<u32, 256>;    // largest j with S > threshold, plus one (0: none)
var<workgroup> rr_val: array<f32, 256>;
var<workgroup> rr_first: array<f32, RT>;   // S[i, 0]

// Dims k0..k0+KC of the keys of slots t0..t0+RT (zero past the head's `n`
// slots or head_dim) into the row or column tile, as f32.
fn stage_keys(t0: u32, n: u32, k0: u32, lid: u32, rows: bool) {
    var wpc = KC;                       // words per slot of the chunk
    if KV_F16 {
        wpc = KC / 2u;
    }
    let w0 = k0 * wpc / KC;
    for (var q = lid; q < RT * wpc; q = q + RW) {
        let r = q / wpc;
        let w = w0 + q % wpc;
        var word = 0u;
        if t0 + r < n && w < p.dw {
            if rows {
                word = pool[rt_rbase[r] + w];
            } else {
                word = pool[rt_cbase[r] + w];
            }
        }
        var x = vec2<f32>(bitcast<f32>(word), 0.0);
        if KV_F16 {
            x = unpack2x16float(word);
        }
        let k = (q % wpc) * (KC / wpc);          // dim within the chunk
        let at = k * (RT / 4u) + r / 4u;
        if rows {
            rt_rows[at][r % 4u] = x.x;
            if KV_F16 {
                rt_rows[at + RT / 4u][r % 4u] = x.y;
            }
        } else {
            rt_cols[at][r % 4u] = x.x;
            if KV_F16 {
                rt_cols[at + RT / 4u][r % 4u] = x.y;
            }
        }
    }
}

// One workgroup per tile of RT rows i of one stored head (z: the head),
// sweeping the columns j in tiles of RT: S = K K^T staged through
// workgroup memory KC dims at a time (a GEMM tile; each thread holds a
// 4 x 4 block of S in registers), then per row: the sum of its cosine
// similarities to the other slots, last(i) (the largest j != i with
// S > threshold, else 0) and S[i, last(i)].
@compute @workgroup_size(RW)
fn redundancy_rows(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i0 = (wg.x + wg.y * nwg.x) * RT;
    let s = wg.z;
    let d = p.desc_base + s;
    let n = desc[d * 2u + 1u];
    let tr = lid / 8u;      // rows 4 tr .. 4 tr + 3 of the tile
    let tc = lid % 8u;      // columns 4 tc .. 4 tc + 3
    var ni = vec4<f32>(0.0);
    for (var a = 0u; a < 4u; a = a + 1u) {
        let i = i0 + 4u * tr + a;
        if i < n {
            ni[a] = norms[s * p.t_stride + i];
        }
    }
    if lid < RT && i0 + lid < n {
        rt_rbase[lid] = slot_base(d, i0 + lid);
    }
    var sum = vec4<f32>(0.0);
    var hit = vec4<u32>(0u);
    var val = vec4<f32>(0.0);
    var first = vec4<f32>(0.0);
    // Uniform per workgroup: every thread runs the same tiles and barriers.
    let live = i0 < n;
    for (var j0 = 0u; live && j0 < n; j0 = j0 + RT) {
        workgroupBarrier();
        if lid < RT && j0 + lid < n {
            rt_cbase[lid] = slot_base(d, j0 + lid);
        }
        var acc0 = vec4<f32>(0.0);
        var acc1 = vec4<f32>(0.0);
        var acc2 = vec4<f32>(0.0);
        var acc3 = vec4<f32>(0.0);
        for (var k0 = 0u; k0 < p.head_dim; k0 = k0 + KC) {
            workgroupBarrier();
            stage_keys(i0, n, k0, lid, true);
            stage_keys(j0, n, k0, lid, false);
            workgroupBarrier();
            for (var k = 0u; k < KC; k = k + 1u) {
                let rv = rt_rows[k * (RT / 4u) + tr];
                let cv = rt_cols[k * (RT / 4u) + tc];
                acc0 = acc0 + rv.x * cv;
                acc1 = acc1 + rv.y * cv;
                acc2 = acc2 + rv.z * cv;
                acc3 = acc3 + rv.w * cv;
            }
        }
        var nj = vec4<f32>(0.0);
        for (var b = 0u; b < 4u; b = b + 1u) {
            let j = j0 + 4u * tc + b;
            if j < n {
                nj[b] = norms[s * p.t_stride + j];
            }
        }
        let dots = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
        for (var a = 0u; a < 4u; a = a + 1u) {
            let i = i0 + 4u * tr + a;
            for (var b = 0u; b < 4u; b = b + 1u) {
                let j = j0 + 4u * tc + b;
                if i < n && j < n {
                    var sim = 0.0;
                    if j != i {
                        sim = dots[a][b] * (ni[a] * nj[b]);
                    }
                    sum[a] = sum[a] + sim;
                    if j == 0u {
                        first[a] = sim;   // S[i, 0] (0 when i == 0: the diagonal)
                    }
                    if j != i && sim > p.threshold {
                        hit[a] = j + 1u;   // columns ascend: the last hit is the largest j
                        val[a] = sim;
                    }
                }
            }
        }
    }
    for (var a = 0u; a < 4u; a = a + 1u) {
        let r = 4u * tr + a;
        rr_sum[r * 8u + tc] = sum[a];
        rr_hit[r * 8u + tc] = hit[a];
        rr_val[r * 8u + tc] = val[a];
        if tc == 0u {
            rr_first[r] = first[a];
        }
    }
    workgroupBarrier();
    let i = i0 + lid;
    if lid < RT && i < n {
        var total = 0.0;
        var h = 0u;
        var v = 0.0;
        for (var c = 0u; c < 8u; c = c + 1u) {
            total = total + rr_sum[lid * 8u + c];
            if rr_hit[lid * 8u + c] > h {
                h = rr_hit[lid * 8u + c];
                v = rr_val[lid * 8u + c];
            }
        }
        let at = s * p.t_stride + i;
        rowstat[at * 2u] = total;
        if h == 0u {
            last[at] = 0u;
            rowstat[at * 2u + 1u] = rr_first[lid];
        } else {
            last[at] = h - 1u;
            rowstat[at * 2u + 1u] = v;
        }
    }
}

var<workgroup> tile_last: array<u32, WG>;
var<workgroup> tile_val: array<f32, WG>;

@compute @workgroup_size(WG)
fn redundancy_cols(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let j = wg.x * WG + lid;
    let s = wg.y;
    let n = head_len(s);
    var fix = 0.0;
    for (var i0 = 0u; i0 < n; i0 = i0 + WG) {
        let i = i0 + lid;
        if i < n {
            tile_last[lid] = last[s * p.t_stride + i];
            tile_val[lid] = rowstat[(s * p.t_stride + i) * 2u + 1u];
        } else {
            tile_last[lid] = 0xffffffffu;
        }
        workgroupBarrier();
        for (var k = 0u; k < min(WG, n - i0); k = k + 1u) {
            if tile_last[k] == j {
                fix = fix + tile_val[k];
            }
        }
        workgroupBarrier();
    }
    if j < n {
        raw[s * p.t_stride + j] = (rowstat[(s * p.t_stride + j) * 2u] - fix) / f32(n);
    }
}

var<workgroup> comb: array<f32, WG>;

@compute @workgroup_size(WG)
fn rkv_combine(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let s = wg.x;
    let n = head_len(s);
    let base = s * p.t_stride;
    var m = -3.0e38;
    for (var t = lid; t < n; t = t + WG) {
        m = max(m, raw[base + t]);
    }
    comb[lid] = m;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h = h >> 1u) {
        if lid < h {
            comb[lid] = max(comb[lid], comb[lid + h]);
        }
        workgroupBarrier();
    }
    m = comb[0];
    workgroupBarrier();
    var z = 0.0;
    for (var t = lid; t < n; t = t + WG) {
        z = z + exp(raw[base + t] - m);
    }
    comb[lid] = z;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h = h >> 1u) {
        if lid < h {
            comb[lid] = comb[lid] + comb[lid + h];
        }
        workgroupBarrier();
    }
    z = comb[0];
    let c = n - min(n, p.window);
    for (var t = lid; t < c; t = t + WG) {
        scores[base + t] = p.lambda * scores[base + t] - (1.0 - p.lambda) * (exp(raw[base + t] - m) / z);
    }
}

// Sortable key: larger float -> larger u32.
fn sort_key(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if (b & 0x80000000u) != 0u {
        return ~b;
    }
    return b | 0x80000000u;
}

var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> sel: array<u32, 4>;      // prefix, mask, remaining, count
var<workgroup> scan: array<u32, TK>;
var<workgroup> carry: array<u32, 2>;    // equal so far, kept so far

// Inclusive workgroup scan of x (Hillis-Steele); returns the inclusive sum.
fn scan_tk(x: u32, lid: u32) -> u32 {
    scan[lid] = x;
    workgroupBarrier();
    for (var o = 1u; o < TK; o = o << 1u) {
        var v = 0u;
        if lid >= o {
            v = scan[lid - o];
        }
        workgroupBarrier();
        scan[lid] = scan[lid] + v;
        workgroupBarrier();
    }
    let r = scan[lid];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(TK)
fn topk_select(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let s = wg.x;
    let base = s * p.t_stride;
    if lid == 0u {
        let len = head_len(s);
        let c = len - min(len, p.window);
        sel[0] = 0u;
        sel[1] = 0u;
        sel[2] = min(kvec[p.kvec_base + s], c);
        sel[3] = c;
    }
    let c = workgroupUniformLoad(&sel[3]);
    let k = workgroupUniformLoad(&sel[2]);
    // Radix select: 4 passes of 8 bits find the k-th largest key; `remaining`
    // ends as how many keys equal to it are kept (the lowest slots).
    if k > 0u && k < c {
        for (var round = 0u; round < 4u; round = round + 1u) {
            let shift = 24u - 8u * round;
            atomicStore(&hist[lid], 0u);
            workgroupBarrier();
            let prefix = sel[0];
            let mask = sel[1];
            for (var t = lid; t < c; t = t + TK) {
                let key = sort_key(scores[base + t]);
                if (key & mask) == prefix {
                    atomicAdd(&hist[(key >> shift) & 255u], 1u);
                }
            }
            workgroupBarrier();
            if lid == 0u {
                var above = 0u;
                var b = 255u;
                loop {
                    let h = atomicLoad(&hist[b]);
                    if above + h >= sel[2] || b == 0u {
                        break;
                    }
                    above = above + h;
                    b = b - 1u;
                }
                sel[2] = sel[2] - above;
                sel[0] = sel[0] | (b << shift);
                sel[1] = sel[1] | (255u << shift);
            }
            workgroupBarrier();
        }
    }
    let thr = workgroupUniformLoad(&sel[0]);
    let need_eq = workgroupUniformLoad(&sel[2]);
    if lid == 0u {
        carry[0] = 0u;
        carry[1] = 0u;
    }
    workgroupBarrier();
    let out = s * p.k_stride;
    for (var t0 = 0u; t0 < c; t0 = t0 + TK) {
        let t = t0 + lid;
        var key = 0u;
        if t < c {
            key = sort_key(scores[base + t]);
        }
        let eq = select(0u, 1u, t < c && key == thr);
        let eq_incl = scan_tk(eq, lid);
        let eq_before = carry[0] + eq_incl - eq;
        var keep = 0u;
        if t < c {
            if k >= c {
                keep = 1u;
            } else if k > 0u && (key > thr || (eq == 1u && eq_before < need_eq)) {
                keep = 1u;
            }
        }
        let keep_incl = scan_tk(keep, lid);
        if keep == 1u {
            kept[out + carry[1] + keep_incl - 1u] = t;
        }
        workgroupBarrier();
        if lid == TK - 1u {
            carry[0] = carry[0] + eq_incl;
            carry[1] = carry[1] + keep_incl;
        }
        workgroupBarrier();
    }
    // the window
    let len = c + min(head_len(s), p.window);
    for (var t = c + lid; t < len; t = t + TK) {
        kept[out + k + t - c] = t;
    }
}

@compute @workgroup_size(WG)
fn rank_reference(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let n = wg.x * WG + lid;
    let s = wg.y;
    let len = head_len(s);
    let c = len - min(len, p.window);
    let k = min(kvec[p.kvec_base + s], c);
    let out = s * p.k_stride;
    if n < k {
        let me = kept[out + n];
        let v = scores[s * p.t_stride + me];
        var rank = 0u;
        for (var m = 0u; m < k; m = m + 1u) {
            let o = kept[out + m];
            let w = scores[s * p.t_stride + o];
            if w > v || (w == v && o < me) {
                rank = rank + 1u;
            }
        }
        order[out + rank] = me;
    } else if n < k + len - c {
        order[out + n] = kept[out + n];
    }
}

// Words per moved slot: key, value, position, then the H2O accumulators.
fn slot_words() -> u32 {
    return 2u * p.dw + 1u + p.acc_units;
}

@compute @workgroup_size(WG)
fn compact_gather(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let sw = slot_words();
    let idx = flat_id(wg, nwg, lid, WG);
    let per_head = p.slots * sw;
    let s = idx / per_head;
    if s >= p.n_heads {
        return;
    }
    let n = (idx % per_head) / sw;
    let w = idx % sw;
    if n >= kvec[p.kvec_base + s] + p.window {
        return;
    }
    let d = p.desc_base + s;
    let src = kept[s * p.k_stride + n];
    var v = 0u;
    let kb = slot_base(d, src);
    if w < p.dw {
        v = pool[kb + w];
    } else if w < 2u * p.dw {
        v = pool[kb + value_offset(geom()) + w - p.dw];
    } else if w == 2u * p.dw {
        v = slot_pos(d, src);
    } else {
        v = bitcast<u32>(acc[p.acc_base + (s * p.acc_units + w - 2u * p.dw - 1u) * p.t_stride + src]);
    }
    scratch[idx] = v;
}

@compute @workgroup_size(WG)
fn compact_scatter(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let sw = slot_words();
    let idx = flat_id(wg, nwg, lid, WG);
    let per_head = p.slots * sw;
    let s = idx / per_head;
    if s >= p.n_heads {
        return;
    }
    let n = (idx % per_head) / sw;
    let w = idx % sw;
    let d = p.desc_base + s;
    if n >= kvec[p.kvec_base + s] + p.window {
        // Slots past the new length start again from zero accumulators.
        if w > 2u * p.dw && n < desc[d * 2u + 1u] {
            acc[p.acc_base + (s * p.acc_units + w - 2u * p.dw - 1u) * p.t_stride + n] = 0.0;
        }
        return;
    }
    let v = scratch[idx];
    let kb = slot_base(d, n);
    if w < p.dw {
        pool[kb + w] = v;
    } else if w < 2u * p.dw {
        pool[kb + value_offset(geom()) + w - p.dw] = v;
    } else if w == 2u * p.dw {
        let g = geom();
        pool[slot_page(g, desc[d * 2u], n) + position_at(g, n % g.page_size)] = v;
    } else {
        acc[p.acc_base + (s * p.acc_units + w - 2u * p.dw - 1u) * p.t_stride + n] = bitcast<f32>(v);
    }
}
