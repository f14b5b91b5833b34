// sample.wgsl: picks the next token from each row of logits (one sequence
// per row, each with its own settings), as transformers' sampling does, in
// its processor order:
//   repetition penalty (tokens in `seen`: l < 0 ? l * penalty : l / penalty)
//   -> temperature (l / T) -> top-k (keep l >= the k-th largest, ties kept)
//   -> top-p (keep j iff the mass of strictly more probable tokens < top_p)
//   -> min-p (keep p_j >= min_p * p_max) -> draw by inverse CDF in index order
// with the uniform `u` from the host's seeded generator. With `greedy` set it
// returns the first index of the largest penalised logit instead. The
// thresholds are found by radix search over the order-preserving bit patterns
// of the values (32 passes), so no sort is needed. The chosen token's bit is
// set in the row's `seen` mask (for the next step's penalty). A row whose
// scores hold a NaN or an infinity has no distribution: it gets NO_TOKEN
// (0xffffffff) and marks nothing seen.
//
// Dispatch: one workgroup per row (grid folded into x/y). Needs a reduction prelude.
//
// Bindings:
//   0 params  uniform Params
//   1 logits  storage read  [n_rows, n] f32
//   2 seen    storage rw    [lanes, seen_words] u32 bitmasks (row r uses lane rows[r].lane)
//   3 out     storage rw    [n_rows] u32
//   4 rows    storage read  [n_rows] Row: each row's settings and draw

override WG: u32 = 256u;
const NEG: f32 = -3.0e38;
const NO_TOKEN: u32 = 0xffffffffu;

struct Params {
    n: u32,
    seen_words: u32,
    n_rows: u32,
}

struct Row {
    top_k: u32,     // 0 = off
    greedy: u32,    // 1 = argmax of the penalised logits
    lane: u32,      // which seen mask
    temperature: f32,
    top_p: f32,     // 1 = off
    min_p: f32,     // 0 = off
    penalty: f32,   // 1 = off
    u: f32,         // uniform draw in [0, 1), new each step
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> seen: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;
@group(0) @binding(4) var<storage, read> rows: array<Row>;

var<workgroup> chunk_mass: array<f32, WG>;
var<workgroup> row_sh: Row;
var<workgroup> non_finite_sh: f32;
// The current row's settings and offsets (uniform across the workgroup).
var<private> p: Row;
var<private> logit_base: u32;
var<private> seen_base: u32;

fn score(i: u32) -> f32 {
    var l = logits[logit_base + i];
    if p.penalty != 1.0 && ((seen[seen_base + (i >> 5u)] >> (i & 31u)) & 1u) == 1u {
        l = select(l / p.penalty, l * p.penalty, l < 0.0);
    }
    if p.greedy == 0u {
        l = l / p.temperature;
    }
    return l;
}

// Bit test rather than comparisons, which fast-math compilers may fold away.
fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

// Order-preserving map of f32 to u32.
fn key(f: f32) -> u32 {
    let b = bitcast<u32>(f);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

fn finish(row: u32, token: u32) {
    out[row] = token;
    let w = seen_base + (token >> 5u);
    seen[w] = seen[w] | (1u << (token & 31u));
}

@compute @workgroup_size(WG)
fn sample(lane: Lane, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wg.x + wg.y * nwg.x;
    if row >= params.n_rows {
        return;
    }
    if lane.lid == 0u {
        row_sh = rows[row];
    }
    p = workgroupUniformLoad(&row_sh);
    let n = params.n;
    logit_base = row * n;
    seen_base = p.lane * params.seen_words;
    var m = NEG;
    var non_finite = 0.0;
    for (var i = lane.lid; i < n; i = i + WG) {
        let s = score(i);
        m = max(m, s);
        non_finite = select(non_finite, 1.0, !is_finite(s));
    }
    m = workgroup_max(m, lane);
    non_finite = workgroup_max(non_finite, lane);
    if lane.lid == 0u {
        non_finite_sh = non_finite;
    }
    if workgroupUniformLoad(&non_finite_sh) > 0.0 {
        if lane.lid == 0u {
            out[row] = NO_TOKEN;
        }
        return;
    }

    if p.greedy != 0u {
        // The lowest index holding the maximum (as -index, exact below 2^24).
        var best = NEG;
        for (var i = lane.lid; i < n; i = i + WG) {
            if score(i) == m {
                best = max(best, -f32(i));
            }
        }
        best = workgroup_max(best, lane);
        if lane.lid == 0u {
            finish(row, u32(-best));
        }
        return;
    }

    // top-k: the largest threshold key with at least k values at or above it.
    var k_key = 0u;
    if p.top_k > 0u && p.top_k < n {
        for (var b = 0u; b < 32u; b = b + 1u) {
            let cand = k_key | (0x80000000u >> b);
            var c = 0.0;
            for (var i = lane.lid; i < n; i = i + WG) {
                if key(score(i)) >= cand {
                    c = c + 1.0;
                }
            }
            if workgroup_sum(c, lane) >= f32(p.top_k) {
                k_key = cand;
            }
        }
    }

    // Mass of the top-k survivors, e = exp(l - max).
    var z = 0.0;
    for (var i = lane.lid; i < n; i = i + WG) {
        let s = score(i);
        if key(s) >= k_key {
            z = z + exp(s - m);
        }
    }
    z = workgroup_sum(z, lane);

    // top-p: the largest key v with mass(e > v) >= top_p * z; keep e > v.
    var p_key = 0u;
    let use_top_p = p.top_p < 1.0;
    if use_top_p {
        let goal = p.top_p * z;
        for (var b = 0u; b < 32u; b = b + 1u) {
            let cand = p_key | (0x80000000u >> b);
            var f = 0.0;
            for (var i = lane.lid; i < n; i = i + WG) {
                let s = score(i);
                let e = exp(s - m);
                if key(s) >= k_key && key(e) > cand {
                    f = f + e;
                }
            }
            if workgroup_sum(f, lane) >= goal {
                p_key = cand;
            }
        }
    }

    // Kept mass per contiguous chunk, then one invocation walks the CDF.
    let chunk = (n + WG - 1u) / WG;
    let start = lane.lid * chunk;
    let stop = min(start + chunk, n);
    var cm = 0.0;
    for (var i = start; i < stop; i = i + 1u) {
        let s = score(i);
        let e = exp(s - m);
        if key(s) >= k_key && (!use_top_p || key(e) > p_key) && e >= p.min_p {
            cm = cm + e;
        }
    }
    chunk_mass[lane.lid] = cm;
    workgroupBarrier();
    if lane.lid == 0u {
        var total = 0.0;
        for (var c = 0u; c < WG; c = c + 1u) {
            total = total + chunk_mass[c];
        }
        let goal = p.u * total;
        var acc = 0.0;
        var chosen = 0xffffffffu;
        var last_kept = 0u;
        for (var c = 0u; c < WG && chosen == 0xffffffffu; c = c + 1u) {
            if acc + chunk_mass[c] > goal {
                for (var i = c * chunk; i < min(c * chunk + chunk, n); i = i + 1u) {
                    let s = score(i);
                    let e = exp(s - m);
                    if key(s) >= k_key && (!use_top_p || key(e) > p_key) && e >= p.min_p {
                        acc = acc + e;
                        last_kept = i;
                        if acc > goal {
                            chosen = i;
                            break;
                        }
                    }
                }
                if chosen == 0xffffffffu {
                    // Rounding put the goal past this chunk's own sum: its last kept token.
                    chosen = last_kept;
                }
            } else {
                acc = acc + chunk_mass[c];
            }
        }
        if chosen == 0xffffffffu {
            // Rounding put the goal past the total: the last kept token.
            chosen = 0u;
            for (var i = n; i > 0u; i = i - 1u) {
                let s = score(i - 1u);
                let e = exp(s - m);
                if key(s) >= k_key && (!use_top_p || key(e) > p_key) && e >= p.min_p {
                    chosen = i - 1u;
                    break;
                }
            }
        }
        finish(row, chosen);
    }
}
