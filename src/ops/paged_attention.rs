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
mod tests;
