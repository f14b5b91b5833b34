//! Paged KV cache kernels (`shaders/paged_kv_store.wgsl`,
//! `shaders/paged_attention.wgsl`): writing new keys/values into pool slots
//! found through the block tables, decode attention split over pages with a
//! log-sum-exp merge (all query heads of a KV group in one workgroup), and
//! prefill attention. K/V are stored f16 (two per `u32`) or f32; every slot
//! records its token position, and masking uses those positions.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::ensure;
use super::host_layout;
pub use super::pages::{LayerKv, PoolLayout};
use super::{NO_FEATURES, u32_of};
use crate::error::Result;
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, Kernel};

pub static PAGED_KV_STORE: Kernel = Kernel {
    name: "paged_kv_store",
    sources: &[
        super::pages::PAGES_WGSL,
        include_str!("../../shaders/paged_kv_store.wgsl"),
    ],
    entries: &["paged_kv_store"],
    needs: NO_FEATURES,
};

pub static PAGED_ATTENTION: Kernel = Kernel {
    name: "paged_attention",
    sources: &[
        super::pages::PAGES_WGSL,
        include_str!("../../shaders/paged_attention.wgsl"),
    ],
    entries: &["attend_decode", "merge_splits", "attend_prefill"],
    needs: NO_FEATURES,
};

/// Limits of paged_attention.wgsl (MAX_GD, MAX_GP, MAX_G, BQ).
pub const MAX_GROUP_DIMS: usize = 2048;
pub const MAX_GROUP_PAGE: usize = 512;
pub const MAX_GROUP: usize = 32;
/// Query rows of one prefill workgroup (BQ): a power of two, at most 32
/// (the rows of its S tile), with BQ * head_dim <= MAX_GD (two vec4 columns
/// of the output tile per invocation; head_dim <= 256, so BQ >= 8). More
/// rows per workgroup means each key and value is read (with its barriers)
/// fewer times.
fn prefill_rows(l: PoolLayout) -> usize {
    let rows = (MAX_GROUP_DIMS / l.head_dim).clamp(4, 32);
    1 << rows.ilog2()
}
/// Workgroup size of the attention kernels (attend_prefill's 8 x 8 layout of
/// its S tile needs 64).
const ATTENTION_WG: f64 = 64.0;

/// Where the rows' q, k and v sit.
pub struct QkvRows<'a> {
    pub positions: &'a GpuBuffer<u32>,
    pub qkv: &'a GpuBuffer<f32>,
    pub qkv_stride: usize,
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
}

impl QkvRows<'_> {
    fn k_offset(&self, d: usize) -> usize {
        self.n_q_heads * d
    }
    fn v_offset(&self, d: usize) -> usize {
        (self.n_q_heads + self.n_kv_heads) * d
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct StoreParams {
    n_tokens: u32,
    tokens_per_row: u32,
    n_heads: u32,
    heads_per_kv: u32,
    head_dim: u32,
    dw: u32,
    page_size: u32,
    page_words: u32,
    qkv_stride: u32,
    k_offset: u32,
    v_offset: u32,
    desc_base: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AttentionParams {
    n_rows: u32,
    n_heads: u32,
    group: u32,
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

/// Writes the k/v heads of `n_tokens` qkv rows into the last slots of their
/// heads: rows of `tokens_per_row` tokens each (1 for a decode batch, all
/// tokens for one sequence's prefill chunk).
pub fn paged_kv_store(
    ctx: &GpuContext,
    kv: &LayerKv,
    q: &QkvRows,
    n_tokens: usize,
    tokens_per_row: usize,
) -> Result<Dispatch> {
    let l = kv.layout;
    ensure!(
        tokens_per_row > 0
            && n_tokens.is_multiple_of(tokens_per_row)
            && kv.n_heads == q.n_kv_heads * kv.heads_per_kv
            && q.qkv.len() >= n_tokens * q.qkv_stride
            && q.positions.len() >= n_tokens
            && l.head_dim.is_multiple_of(2),
        "paged_kv_store: {n_tokens} tokens ({tokens_per_row} per row), {} stored heads for {} kv heads x {}",
        kv.n_heads,
        q.n_kv_heads,
        kv.heads_per_kv
    );
    let pipeline = ctx.pipeline(
        &PAGED_KV_STORE,
        "paged_kv_store",
        &l.constants(super::WG as f64),
    )?;
    let params = StoreParams {
        n_tokens: u32_of("tokens", n_tokens)?,
        tokens_per_row: u32_of("tokens per row", tokens_per_row)?,
        n_heads: u32_of("heads", kv.n_heads)?,
        heads_per_kv: u32_of("heads per kv", kv.heads_per_kv)?,
        head_dim: u32_of("head dim", l.head_dim)?,
        dw: u32_of("dw", l.dw())?,
        page_size: u32_of("page size", l.page_size)?,
        page_words: u32_of("page words", l.page_words())?,
        qkv_stride: u32_of("qkv stride", q.qkv_stride)?,
        k_offset: u32_of("k offset", q.k_offset(l.head_dim))?,
        v_offset: u32_of("v offset", q.v_offset(l.head_dim))?,
        desc_base: u32_of("desc base", kv.desc_base)?,
    };
    Dispatch::with_params(
        ctx,
        pipeline,
        "kvsift.paged_kv_store".into(),
        &params,
        &[
            q.positions.binding(),
            q.qkv.binding(),
            kv.desc.binding(),
            kv.tables.binding(),
            kv.pool.binding(),
        ],
        ctx.grid(super::blocks(n_tokens * kv.n_heads * l.dw())?),
    )
}

fn attention_params(
    kv: &LayerKv,
    q: &QkvRows,
    n_rows: usize,
    window: usize,
    n_splits: usize,
    split_pages: usize,
) -> Result<AttentionParams> {
    let l = kv.layout;
    let group = q.n_q_heads / kv.n_heads;
    ensure!(
        group * kv.n_heads == q.n_q_heads
            && group <= MAX_GROUP
            && group * l.head_dim <= MAX_GROUP_DIMS
            && group * l.page_size <= MAX_GROUP_PAGE
            && l.head_dim <= MAX_GROUP_DIMS
            && l.page_size <= MAX_GROUP_PAGE,
        "paged attention: {} query heads over {} stored heads, head_dim {}, page size {} exceed the kernel's limits",
        q.n_q_heads,
        kv.n_heads,
        l.head_dim,
        l.page_size
    );
    Ok(AttentionParams {
        n_rows: u32_of("rows", n_rows)?,
        n_heads: u32_of("heads", kv.n_heads)?,
        group: u32_of("group", group)?,
        head_dim: u32_of("head dim", l.head_dim)?,
        dw: u32_of("dw", l.dw())?,
        page_size: u32_of("page size", l.page_size)?,
        page_words: u32_of("page words", l.page_words())?,
        q_stride: u32_of("q stride", q.qkv_stride)?,
        desc_base: u32_of("desc base", kv.desc_base)?,
        n_splits: u32_of("splits", n_splits)?,
        split_pages: u32_of("split pages", split_pages)?,
        window: u32_of("window", window)?,
        scale: (1.0 / (l.head_dim as f64).sqrt()) as f32,
    })
}

/// Scratch floats the decode partials need.
pub fn partials_len(n_rows: usize, n_q_heads: usize, n_splits: usize, head_dim: usize) -> usize {
    n_rows * n_q_heads * n_splits * (head_dim + 2)
}

/// Decode attention for `n_rows` rows (one query token each), each split
/// covering `split_pages` pages: the split pass and the merge into `out`
/// (`[n_rows, n_q_heads * head_dim]`). `n_splits * split_pages` pages must
/// cover the longest head; splits past a head's pages cost one early exit.
#[allow(clippy::too_many_arguments)]
pub fn paged_decode(
    ctx: &GpuContext,
    kv: &LayerKv,
    q: &QkvRows,
    n_rows: usize,
    window: usize,
    n_splits: usize,
    split_pages: usize,
    partials: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
) -> Result<[Dispatch; 2]> {
    let l = kv.layout;
    ensure!(
        n_splits > 0
            && split_pages > 0
            && partials.len() >= partials_len(n_rows, q.n_q_heads, n_splits, l.head_dim)
            && out.len() >= n_rows * q.n_q_heads * l.head_dim,
        "paged_decode: {n_rows} rows, {n_splits} splits: partials {}, out {}",
        partials.len(),
        out.len()
    );
    let params = attention_params(kv, q, n_rows, window, n_splits, split_pages)?;
    let pipeline = ctx.pipeline(
        &PAGED_ATTENTION,
        "attend_decode",
        &l.constants(ATTENTION_WG),
    )?;
    let split = Dispatch::with_params(
        ctx,
        pipeline,
        "kvsift.paged_attention.decode".into(),
        &params,
        &[
            q.positions.binding(),
            q.qkv.binding(),
            kv.desc.binding(),
            kv.tables.binding(),
            kv.pool.binding(),
            partials.binding(),
        ],
        ctx.grid(u32_of("decode items", n_rows * kv.n_heads * n_splits)?),
    )?;
    let merge = merge_splits(
        ctx,
        l,
        &params,
        partials,
        out,
        n_rows * q.n_q_heads,
        "merge",
    )?;
    Ok([split, merge])
}

/// The log-sum-exp merge of `items` (row, query head) partials into `out`,
/// shared by split decode and split prefill.
fn merge_splits(
    ctx: &GpuContext,
    l: PoolLayout,
    params: &AttentionParams,
    partials: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
    items: usize,
    what: &str,
) -> Result<Dispatch> {
    let pipeline = ctx.pipeline(&PAGED_ATTENTION, "merge_splits", &l.constants(ATTENTION_WG))?;
    Dispatch::with_params_at(
        ctx,
        pipeline,
        format!("kvsift.paged_attention.{what}"),
        params,
        &[(6, partials.binding()), (7, out.binding())],
        ctx.grid(u32_of("merge items", items)?),
    )
}

/// Slots one prefill split covers at most: keeps each invocation's loops
/// short (llvmpipe ends an invocation's loops after 65535 iterations in all).
pub const PREFILL_SPLIT_SLOTS: usize = 512;

/// Page splits of a prefill over `len` slots: `(n_splits, split_pages)`, at
/// most `max_splits` (then longer splits).
pub fn prefill_splits(len: usize, page_size: usize, max_splits: usize) -> (usize, usize) {
    let pages = len.div_ceil(page_size).max(1);
    let split_pages = (PREFILL_SPLIT_SLOTS / page_size)
        .max(1)
        .max(pages.div_ceil(max_splits.max(1)));
    (pages.div_ceil(split_pages), split_pages)
}

/// Prefill attention for the `n_tokens` newest tokens of one sequence (its
/// descriptors at `kv.desc_base`), into `out` `[n_tokens, n_q_heads * head_dim]`,
/// over `n_splits` splits of `split_pages` pages (see [`prefill_splits`]);
/// with more than one, partials go through `partials` and a merge.
#[allow(clippy::too_many_arguments)]
pub fn paged_prefill(
    ctx: &GpuContext,
    kv: &LayerKv,
    q: &QkvRows,
    n_tokens: usize,
    window: usize,
    (n_splits, split_pages): (usize, usize),
    partials: &GpuBuffer<f32>,
    out: &GpuBuffer<f32>,
) -> Result<Vec<Dispatch>> {
    let l = kv.layout;
    ensure!(
        out.len() >= n_tokens * q.n_q_heads * l.head_dim
            && (n_splits == 1
                || partials.len() >= partials_len(n_tokens, q.n_q_heads, n_splits, l.head_dim)),
        "paged_prefill: out {} / partials {} for {n_tokens} tokens, {n_splits} splits",
        out.len(),
        partials.len()
    );
    let params = attention_params(kv, q, n_tokens, window, n_splits, split_pages)?;
    let bq = prefill_rows(l);
    ensure!(
        bq * l.head_dim <= MAX_GROUP_DIMS,
        "paged_prefill: head_dim {} over the kernel's 512",
        l.head_dim
    );
    let [wg, f16] = l.constants(ATTENTION_WG);
    let pipeline = ctx.pipeline(
        &PAGED_ATTENTION,
        "attend_prefill",
        &[wg, f16, ("BQ", bq as f64)],
    )?;
    let attend = Dispatch::with_params_at(
        ctx,
        pipeline,
        "kvsift.paged_attention.prefill".into(),
        &params,
        &[
            (1, q.positions.binding()),
            (2, q.qkv.binding()),
            (3, kv.desc.binding()),
            (4, kv.tables.binding()),
            (5, kv.pool.binding()),
            (6, partials.binding()),
            (7, out.binding()),
        ],
        ctx.grid(u32_of(
            "prefill items",
            n_tokens.div_ceil(bq) * q.n_q_heads * n_splits,
        )?),
    )?;
    if n_splits == 1 {
        return Ok(vec![attend]);
    }
    let merge = merge_splits(
        ctx,
        l,
        &params,
        partials,
        out,
        n_tokens * q.n_q_heads,
        "prefill_merge",
    )?;
    Ok(vec![attend, merge])
}

// ---- CPU twins -------------------------------------------------------------

fn pack(kv_f16: bool, x: &[f32], out: &mut [u32]) {
    if kv_f16 {
        for (w, o) in out.iter_mut().enumerate() {
            *o = f16::from_f32(x[2 * w]).to_bits() as u32
                | ((f16::from_f32(x[2 * w + 1]).to_bits() as u32) << 16);
        }
    } else {
        for (o, v) in out.iter_mut().zip(x) {
            *o = v.to_bits();
        }
    }
}

fn unpack(kv_f16: bool, words: &[u32], d: usize) -> Vec<f32> {
    if kv_f16 {
        words
            .iter()
            .flat_map(|w| {
                [
                    f16::from_bits(*w as u16).to_f32(),
                    f16::from_bits((*w >> 16) as u16).to_f32(),
                ]
            })
            .take(d)
            .collect()
    } else {
        words.iter().map(|w| f32::from_bits(*w)).collect()
    }
}

/// Host copies of one layer's descriptors and tables, for the twins.
pub struct HostKv<'a> {
    pub layout: PoolLayout,
    pub desc: &'a [u32],
    pub tables: &'a [u32],
    pub desc_base: usize,
    pub n_heads: usize,
    pub heads_per_kv: usize,
}

impl HostKv<'_> {
    fn head(&self, row: usize, s: usize) -> (usize, usize) {
        let d = (self.desc_base + row * self.n_heads + s) * 2;
        (self.desc[d] as usize, self.desc[d + 1] as usize)
    }

    fn slot_base(&self, offset: usize, slot: usize) -> (usize, usize) {
        let l = self.layout;
        (
            l.page_start(self.tables[offset + slot / l.page_size] as usize),
            slot % l.page_size,
        )
    }

    /// (position, k, v) of every slot of (row, stored head).
    pub fn gather(&self, pool: &[u32], row: usize, s: usize) -> Vec<(u32, Vec<f32>, Vec<f32>)> {
        let l = self.layout;
        let (offset, len) = self.head(row, s);
        (0..len)
            .map(|slot| {
                let (base, i) = self.slot_base(offset, slot);
                let k = unpack(l.kv_f16, &pool[base + l.key_at(i)..][..l.dw()], l.head_dim);
                let v = unpack(
                    l.kv_f16,
                    &pool[base + l.value_at(i)..][..l.dw()],
                    l.head_dim,
                );
                (pool[base + l.position_at(i)], k, v)
            })
            .collect()
    }
}

/// Host copies of the rows' positions and qkv, for the twins.
pub struct HostQkv<'a> {
    pub positions: &'a [u32],
    pub qkv: &'a [f32],
    pub qkv_stride: usize,
    pub n_q_heads: usize,
    pub n_kv_heads: usize,
}

/// CPU twin of `paged_kv_store`.
pub fn paged_kv_store_cpu(kv: &HostKv, q: &HostQkv, tokens_per_row: usize, pool: &mut [u32]) {
    let l = kv.layout;
    let d = l.head_dim;
    let (qkv, qkv_stride, n_q_heads, n_kv_heads) = (q.qkv, q.qkv_stride, q.n_q_heads, q.n_kv_heads);
    for (t, &pos) in q.positions.iter().enumerate() {
        let (row, i) = (t / tokens_per_row, t % tokens_per_row);
        for s in 0..kv.n_heads {
            let (offset, len) = kv.head(row, s);
            let (base, slot) = kv.slot_base(offset, len - tokens_per_row + i);
            let src = t * qkv_stride + (s / kv.heads_per_kv) * d;
            let k = &qkv[src + n_q_heads * d..][..d];
            let v = &qkv[src + (n_q_heads + n_kv_heads) * d..][..d];
            pack(l.kv_f16, k, &mut pool[base + l.key_at(slot)..][..l.dw()]);
            pack(l.kv_f16, v, &mut pool[base + l.value_at(slot)..][..l.dw()]);
            pool[base + l.position_at(slot)] = pos;
        }
    }
}

/// CPU twin of both attention kernels (f64): for query token `t` of row
/// `rows[t]`, every visible slot of its stored head.
pub fn paged_attention_cpu(
    kv: &HostKv,
    pool: &[u32],
    q: &HostQkv,
    rows: &[usize],
    window: usize,
) -> Vec<f64> {
    let d = kv.layout.head_dim;
    let group = q.n_q_heads / kv.n_heads;
    let mut out = Vec::with_capacity(q.positions.len() * q.n_q_heads * d);
    for (t, (&q_pos, &row)) in q.positions.iter().zip(rows).enumerate() {
        for h in 0..q.n_q_heads {
            let slots: Vec<_> = kv
                .gather(pool, row, h / group)
                .into_iter()
                .filter(|(pos, _, _)| {
                    *pos <= q_pos && (window == 0 || (*pos as usize) + window > q_pos as usize)
                })
                .collect();
            let pairs = slots.iter().map(|(_, k, v)| (&k[..], &v[..]));
            out.extend(super::attention::attend_cpu(
                &q.qkv[t * q.qkv_stride + h * d..][..d],
                pairs,
                super::attention::attention_scale(d),
            ));
        }
    }
    out
}

/// The structs this module's kernels read (checked against the WGSL in
/// tests/shader_portability.rs).
pub(crate) fn host_layouts() -> Vec<super::HostLayout> {
    vec![
        host_layout!(StoreParams in [&PAGED_KV_STORE] as "Params" { n_tokens, tokens_per_row, n_heads, heads_per_kv, head_dim, dw, page_size, page_words, qkv_stride, k_offset, v_offset, desc_base }),
        host_layout!(AttentionParams in [&PAGED_ATTENTION] as "Params" { n_rows, n_heads, group, head_dim, dw, page_size, page_words, q_stride, desc_base, n_splits, split_pages, window, scale }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{PageAllocator, SeqTables};
    use crate::testing::{Rng, assert_close, gpu};

    /// A pool scenario: `lens[r]` slots per head for each row, pages handed
    /// out interleaved across rows (fragmented), descriptors and tables.
    struct Scenario {
        desc: Vec<u32>,
        tables: Vec<u32>,
        total_pages: usize,
    }

    fn scenario(rng: &mut Rng, layout: PoolLayout, n_heads: usize, lens: &[usize]) -> Scenario {
        let max_len = lens.iter().max().copied().unwrap_or(1);
        let pages_needed: usize = lens
            .iter()
            .map(|l| l.div_ceil(layout.page_size))
            .sum::<usize>()
            * n_heads;
        let total = pages_needed + 7;
        let mut alloc = PageAllocator::new(&[total as u32], 1).unwrap();
        // Scramble the free list: allocate everything, free in random order.
        let mut all: Vec<_> = (0..total).map(|_| alloc.alloc(0).unwrap()).collect();
        for i in (1..all.len()).rev() {
            all.swap(i, rng.below(i + 1));
        }
        for p in all {
            alloc.free(p);
        }
        let mut seqs: Vec<SeqTables> = lens
            .iter()
            .map(|_| SeqTables::new(1, n_heads, layout.page_size))
            .collect();
        // Grow the rows one page-worth at a time, interleaved.
        for step in 0..max_len.div_ceil(layout.page_size) {
            for (r, &len) in lens.iter().enumerate() {
                let have = step * layout.page_size;
                if have < len {
                    seqs[r]
                        .append((len - have).min(layout.page_size), &mut alloc)
                        .unwrap();
                }
            }
        }
        let max_pages = max_len.div_ceil(layout.page_size).max(1);
        let mut desc = vec![];
        let mut tables = vec![0u32; lens.len() * n_heads * max_pages];
        for (r, seq) in seqs.iter().enumerate() {
            for s in 0..n_heads {
                let offset = (r * n_heads + s) * max_pages;
                let t = seq.head(0, s);
                for (i, p) in t.pages.iter().enumerate() {
                    tables[offset + i] = p.index;
                }
                desc.extend([offset as u32, t.len as u32]);
            }
        }
        Scenario {
            desc,
            tables,
            total_pages: total,
        }
    }

    /// The scenario's descriptors and tables as the twins read them.
    fn host_kv<'a>(sc: &'a Scenario, c: &Case, layout: PoolLayout) -> HostKv<'a> {
        HostKv {
            layout,
            desc: &sc.desc,
            tables: &sc.tables,
            desc_base: 0,
            n_heads: c.kv_heads * c.heads_per_kv,
            heads_per_kv: c.heads_per_kv,
        }
    }

    /// Rows' positions and qkv as the twins read them.
    fn host_qkv<'a>(c: &Case, positions: &'a [u32], qkv: &'a [f32]) -> HostQkv<'a> {
        HostQkv {
            positions,
            qkv,
            qkv_stride: (c.q_heads + 2 * c.kv_heads) * c.dim,
            n_q_heads: c.q_heads,
            n_kv_heads: c.kv_heads,
        }
    }

    /// A scenario's buffers on the GPU.
    struct Uploaded {
        pool: GpuBuffer<u32>,
        desc: GpuBuffer<u32>,
        tables: GpuBuffer<u32>,
        positions: GpuBuffer<u32>,
        qkv: GpuBuffer<f32>,
    }

    impl Uploaded {
        fn new(
            ctx: &GpuContext,
            pool: &[u32],
            sc: &Scenario,
            positions: &[u32],
            qkv: &[f32],
        ) -> Self {
            Self {
                pool: GpuBuffer::from_slice(ctx, "pool", pool).unwrap(),
                desc: GpuBuffer::from_slice(ctx, "desc", &sc.desc).unwrap(),
                tables: GpuBuffer::from_slice(ctx, "tables", &sc.tables).unwrap(),
                positions: GpuBuffer::from_slice(ctx, "pos", positions).unwrap(),
                qkv: GpuBuffer::from_slice(ctx, "qkv", qkv).unwrap(),
            }
        }

        fn views(&self, c: &Case, layout: PoolLayout) -> (LayerKv<'_>, QkvRows<'_>) {
            let kv = LayerKv {
                layout,
                pool: &self.pool,
                desc: &self.desc,
                tables: &self.tables,
                desc_base: 0,
                n_heads: c.kv_heads * c.heads_per_kv,
                heads_per_kv: c.heads_per_kv,
            };
            let q = QkvRows {
                positions: &self.positions,
                qkv: &self.qkv,
                qkv_stride: (c.q_heads + 2 * c.kv_heads) * c.dim,
                n_q_heads: c.q_heads,
                n_kv_heads: c.kv_heads,
            };
            (kv, q)
        }
    }

    struct Case {
        q_heads: usize,
        kv_heads: usize,
        heads_per_kv: usize,
        dim: usize,
        page_size: usize,
        kv_f16: bool,
        window: usize,
    }

    const CASES: &[Case] = &[
        Case {
            q_heads: 1,
            kv_heads: 1,
            heads_per_kv: 1,
            dim: 2,
            page_size: 1,
            kv_f16: false,
            window: 0,
        },
        Case {
            q_heads: 4,
            kv_heads: 2,
            heads_per_kv: 1,
            dim: 64,
            page_size: 16,
            kv_f16: true,
            window: 0,
        },
        Case {
            q_heads: 8,
            kv_heads: 2,
            heads_per_kv: 1,
            dim: 128,
            page_size: 16,
            kv_f16: false,
            window: 0,
        },
        Case {
            q_heads: 4,
            kv_heads: 1,
            heads_per_kv: 4,
            dim: 64,
            page_size: 8,
            kv_f16: true,
            window: 0,
        },
        Case {
            q_heads: 6,
            kv_heads: 3,
            heads_per_kv: 1,
            dim: 16,
            page_size: 4,
            kv_f16: true,
            window: 9,
        },
        Case {
            q_heads: 2,
            kv_heads: 1,
            heads_per_kv: 1,
            dim: 256,
            page_size: 16,
            kv_f16: true,
            window: 0,
        },
    ];

    /// f16 K/V are compared as the twin decodes the same stored halves; the
    /// remaining difference is f32 accumulation: 2e-5 relative + 2e-6 absolute.
    const RTOL: f64 = 2e-5;
    const ATOL: f64 = 2e-6;

    #[test]
    fn decode_store_and_attention_match_twin() {
        let Some(ctx) = gpu() else { return };
        for (ci, c) in CASES.iter().enumerate() {
            let mut rng = Rng::new(400 + ci as u64);
            let layout = PoolLayout {
                page_size: c.page_size,
                head_dim: c.dim,
                kv_f16: c.kv_f16,
            };
            let n_heads = c.kv_heads * c.heads_per_kv;
            // Rows of different lengths; the last slot of each is this step's
            // token. 300 slots span several of decode's chunks (128 slots) in
            // a 64-page split, the last one partial.
            let lens = [1usize, 37, 5, 70, 16, 300];
            let sc = scenario(&mut rng, layout, n_heads, &lens);
            let b = lens.len();
            let stride = (c.q_heads + 2 * c.kv_heads) * c.dim;
            // Fill all but the last slot of each row with random content via the twin.
            let mut pool: Vec<u32> = vec![0; sc.total_pages * layout.page_words()];
            for (r, &len) in lens.iter().enumerate() {
                for slot in 0..len - 1 {
                    let host = host_kv(&sc, c, layout);
                    let mut d = sc.desc.clone();
                    for s in 0..n_heads {
                        d[(r * n_heads + s) * 2 + 1] = (slot + 1) as u32;
                    }
                    let host1 = HostKv { desc: &d, ..host };
                    let qkv = rng.normals(stride);
                    let pos = [(slot * 2) as u32]; // positions need not be dense
                    let rows_desc = HostKv {
                        desc_base: r * n_heads,
                        ..host1
                    };
                    paged_kv_store_cpu(&rows_desc, &host_qkv(c, &pos, &qkv), 1, &mut pool);
                }
            }
            // This step: one token per row at position 2 * (len - 1).
            let positions: Vec<u32> = lens.iter().map(|l| (2 * (l - 1)) as u32).collect();
            let qkv = rng.normals(b * stride);
            let host = host_kv(&sc, c, layout);
            let mut want_pool = pool.clone();
            paged_kv_store_cpu(&host, &host_qkv(c, &positions, &qkv), 1, &mut want_pool);

            let g = Uploaded::new(ctx, &pool, &sc, &positions, &qkv);
            let gpool = &g.pool;
            let (kv, q) = g.views(c, layout);
            let store = paged_kv_store(ctx, &kv, &q, b, 1).unwrap();
            ctx.run("test", &[&store]).unwrap();
            let got_pool = gpool.read(ctx).unwrap();
            let mismatch = (0..pool.len()).find(|&i| got_pool[i] != want_pool[i]);
            assert!(
                mismatch.is_none(),
                "case {ci}: pool word {:?} differs after store",
                mismatch
            );

            let want = paged_attention_cpu(
                &host,
                &want_pool,
                &host_qkv(c, &positions, &qkv),
                &(0..b).collect::<Vec<_>>(),
                c.window,
            );
            let max_pages = lens.iter().max().unwrap().div_ceil(c.page_size);
            for split_pages in [1usize, 2, 64] {
                let n_splits = max_pages.div_ceil(split_pages);
                let partials = GpuBuffer::<f32>::zeros(
                    ctx,
                    "partials",
                    partials_len(b, c.q_heads, n_splits, c.dim),
                )
                .unwrap();
                let out = GpuBuffer::<f32>::zeros(ctx, "out", b * c.q_heads * c.dim).unwrap();
                let [d1, d2] = paged_decode(
                    ctx,
                    &kv,
                    &q,
                    b,
                    c.window,
                    n_splits,
                    split_pages,
                    &partials,
                    &out,
                )
                .unwrap();
                ctx.run("test", &[&d1, &d2]).unwrap();
                let what = format!("case {ci} decode, {split_pages} pages per split");
                assert_close(&what, &out.read(ctx).unwrap(), &want, ATOL, RTOL);
            }
        }
    }

    #[test]
    fn prefill_attention_matches_twin() {
        let Some(ctx) = gpu() else { return };
        // A short prefix (one split) and a long one (several splits and a merge).
        for (ci, c, prefix) in CASES
            .iter()
            .enumerate()
            .flat_map(|(ci, c)| [(ci, c, 21usize), (ci, c, 1500)])
        {
            let mut rng = Rng::new(500 + ci as u64);
            let layout = PoolLayout {
                page_size: c.page_size,
                head_dim: c.dim,
                kv_f16: c.kv_f16,
            };
            let n_heads = c.kv_heads * c.heads_per_kv;
            // One sequence: a prefix from earlier chunks, then a 19-token chunk.
            let chunk = 19usize;
            let sc = scenario(&mut rng, layout, n_heads, &[prefix + chunk]);
            let stride = (c.q_heads + 2 * c.kv_heads) * c.dim;
            let mut pool: Vec<u32> = vec![0; sc.total_pages * layout.page_words()];
            let mut d = sc.desc.clone();
            for s in 0..n_heads {
                d[s * 2 + 1] = prefix as u32;
            }
            let prefix_qkv = rng.normals(prefix * stride);
            let prefix_pos: Vec<u32> = (0..prefix as u32).collect();
            let host_prefix = HostKv {
                layout,
                desc: &d,
                tables: &sc.tables,
                desc_base: 0,
                n_heads,
                heads_per_kv: c.heads_per_kv,
            };
            paged_kv_store_cpu(
                &host_prefix,
                &host_qkv(c, &prefix_pos, &prefix_qkv),
                prefix,
                &mut pool,
            );

            let positions: Vec<u32> = (prefix as u32..(prefix + chunk) as u32).collect();
            let qkv = rng.normals(chunk * stride);
            let host = host_kv(&sc, c, layout);
            let mut want_pool = pool.clone();
            paged_kv_store_cpu(&host, &host_qkv(c, &positions, &qkv), chunk, &mut want_pool);

            let g = Uploaded::new(ctx, &pool, &sc, &positions, &qkv);
            let gpool = &g.pool;
            let (kv, q) = g.views(c, layout);
            let out = GpuBuffer::<f32>::zeros(ctx, "out", chunk * c.q_heads * c.dim).unwrap();
            let store = paged_kv_store(ctx, &kv, &q, chunk, chunk).unwrap();
            let splits = prefill_splits(prefix + chunk, c.page_size, 16);
            assert_eq!(splits.0 > 1, prefix > 500, "case {ci}: splits {splits:?}");
            let partials = GpuBuffer::<f32>::zeros(
                ctx,
                "partials",
                partials_len(chunk, c.q_heads, splits.0, c.dim),
            )
            .unwrap();
            let attend =
                paged_prefill(ctx, &kv, &q, chunk, c.window, splits, &partials, &out).unwrap();
            let mut ds = vec![&store];
            ds.extend(attend.iter());
            ctx.run("test", &ds).unwrap();
            assert_eq!(
                gpool.read(ctx).unwrap(),
                want_pool,
                "case {ci}: pool after the prefill store"
            );
            let want = paged_attention_cpu(
                &host,
                &want_pool,
                &host_qkv(c, &positions, &qkv),
                &vec![0; chunk],
                c.window,
            );
            assert_close(
                &format!("case {ci} prefill after {prefix} slots"),
                &out.read(ctx).unwrap(),
                &want,
                ATOL,
                RTOL,
            );
        }
    }
}
