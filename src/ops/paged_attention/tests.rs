//! The paged KV store and attention kernels against their CPU twins.

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
    fn new(ctx: &GpuContext, pool: &[u32], sc: &Scenario, positions: &[u32], qkv: &[f32]) -> Self {
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
        let attend = paged_prefill(ctx, &kv, &q, chunk, c.window, splits, &partials, &out).unwrap();
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
