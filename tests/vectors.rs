//! Every case in tests/vectors (copied from ../shared/vectors, produced by an
//! independent implementation of the contract) through the CPU selection,
//! including the R-KV decode streams replayed round by round.

use std::path::PathBuf;

use kvsift::kv::compression::*;
use safetensors::SafeTensors;
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

struct Case {
    name: String,
    meta: Value,
    tensors: std::collections::HashMap<String, (Vec<usize>, Vec<u8>)>,
}

fn cases(prefix: &str) -> Vec<Case> {
    let mut names: Vec<_> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(prefix) && n.ends_with(".safetensors"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let bytes = std::fs::read(dir().join(&name)).unwrap();
            let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
            let meta: Value =
                serde_json::from_str(&meta.metadata().as_ref().unwrap()["case"]).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let tensors = st
                .tensors()
                .into_iter()
                .map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec())))
                .collect();
            Case {
                name,
                meta,
                tensors,
            }
        })
        .collect()
}

impl Case {
    fn f32s(&self, n: &str) -> (Vec<usize>, Vec<f32>) {
        let (s, b) = &self.tensors[n];
        (
            s.clone(),
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }
    fn i32s(&self, n: &str) -> (Vec<usize>, Vec<usize>) {
        let (s, b) = &self.tensors[n];
        (
            s.clone(),
            b.chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
                .collect(),
        )
    }
    /// The stream cut to its first `n` positions.
    fn clone_prefix(&self, n: usize) -> Case {
        let mut tensors = std::collections::HashMap::new();
        for name in ["keys", "queries"] {
            let (shape, data) = self.f32s(name);
            let (h, t, d) = (shape[0], shape[1], shape[2]);
            let mut bytes = vec![];
            for head in 0..h {
                for v in &data[head * t * d..][..n * d] {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
            tensors.insert(name.to_string(), (vec![h, n, d], bytes));
        }
        Case {
            name: self.name.clone(),
            meta: self.meta.clone(),
            tensors,
        }
    }

    fn u(&self, k: &str) -> usize {
        self.meta[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: {k}", self.name)) as usize
    }
}

fn config(c: &Case) -> CompressConfig {
    let m = &c.meta;
    let method: Method = m["method"].as_str().unwrap().parse().unwrap();
    let mut cfg = CompressConfig::new(method, c.u("budget"));
    cfg.window = c.u("window");
    if let Some(k) = m["kernel"].as_u64() {
        cfg.kernel = k as usize;
    }
    match m["pooling"].as_str() {
        Some("avgpool") => cfg.pooling = Pooling::Avg,
        Some("maxpool") => cfg.pooling = Pooling::Max,
        _ => {}
    }
    if m["granularity"].as_str() == Some("query_head") {
        cfg.granularity = Granularity::QueryHead;
    }
    cfg.gqa_agg = match m["gqa_agg"].as_str() {
        Some("max") => GqaAgg::Max,
        Some("sum") => GqaAgg::Sum,
        _ => GqaAgg::Mean,
    };
    if m["version"].as_str() == Some("v1") {
        cfg.h2o_version = H2oVersion::V1;
    }
    if let Some(s) = m["sinks"].as_u64() {
        cfg.sinks = Some(s as usize);
    }
    if let Some(b) = m["beta"].as_u64() {
        cfg.beta = b as usize;
    }
    if let Some(f) = m["floor"].as_f64() {
        cfg.floor = f;
    }
    if let Some(l) = m["mix_lambda"].as_f64() {
        cfg.lambda = l as f32;
    }
    if let Some(b) = m["buffer"].as_u64() {
        cfg.buffer = b as usize;
    }
    cfg
}

fn expected_lists(c: &Case) -> Vec<Vec<usize>> {
    let (shape, flat) = c.i32s("expected");
    if let Some((_, lens)) = c
        .tensors
        .get("expected_lens")
        .map(|_| c.i32s("expected_lens"))
    {
        let mut out = vec![];
        let mut at = 0;
        for l in lens {
            out.push(flat[at..at + l].to_vec());
            at += l;
        }
        return out;
    }
    flat.chunks(shape[1]).map(|r| r.to_vec()).collect()
}

#[test]
fn every_selection_vector_passes_on_the_cpu() {
    every_selection_vector_passes(None);
}

#[test]
fn every_selection_vector_passes_on_the_gpu() {
    let Some(ctx) = kvsift::testing::gpu() else {
        return;
    };
    every_selection_vector_passes(Some(ctx));
}

/// Runs every selection vector through the CPU reference (`ctx` None) or the GPU kernels.
fn every_selection_vector_passes(ctx: Option<&kvsift::gpu::GpuContext>) {
    let mut n = 0;
    for prefix in [
        "streamingllm",
        "h2o_v1",
        "h2o_v3",
        "snapkv",
        "pyramidkv",
        "adakv",
        "rkv_0",
    ] {
        for c in cases(prefix) {
            let cfg = config(&c);
            let (ks, keys) = c.f32s("keys");
            let (qs, queries) = c.f32s("queries");
            let x = Captured {
                keys: &keys,
                queries: &queries,
                hkv: ks[0],
                hq: qs[0],
                t: ks[1],
                q_rows: qs[1],
                d: ks[2],
            };
            let (layer, layers) = (
                c.meta["layer"].as_u64().unwrap_or(0) as usize,
                c.meta["num_layers"].as_u64().unwrap_or(1) as usize,
            );
            let sel = match ctx {
                None => select_cpu(&cfg, &x, layer, layers).unwrap(),
                Some(ctx) => gpu::select_gpu(ctx, &cfg, &x, layer, layers).unwrap(),
            };
            let want = expected_lists(&c);
            let path = if ctx.is_some() { "gpu" } else { "cpu" };
            let name = format!("{} ({path})", c.name);
            assert_eq!(sel.kept.len(), want.len(), "{name}: head count");
            for (h, (got, want)) in sel.kept.iter().zip(&want).enumerate() {
                assert_eq!(got, want, "{name}: head {h}");
            }
            if c.tensors.contains_key("expected_reference") {
                let (s, r) = c.i32s("expected_reference");
                let want: Vec<Vec<usize>> = r.chunks(s[1]).map(|v| v.to_vec()).collect();
                assert_eq!(
                    sel.reference.as_ref().unwrap(),
                    &want,
                    "{name}: reference order"
                );
            }
            n += 1;
        }
    }
    eprintln!(
        "{n} selection vectors passed ({})",
        if ctx.is_some() { "gpu" } else { "cpu" }
    );
    assert_eq!(n, 84, "every selection vector was read");
}

/// Replays an R-KV stream on the CPU: prompt, then one token at a time,
/// compressing at positions p % buffer == 0 once the cache holds the budget.
fn replay(c: &Case, order: SlotOrder) -> Vec<Vec<usize>> {
    let mut cfg = config(c);
    cfg.slot_order = order;
    replay_cpu(c, &cfg)
}

/// The CPU replay of a stream's keys and queries under any method and schedule.
fn replay_cpu(c: &Case, cfg: &CompressConfig) -> Vec<Vec<usize>> {
    let order = cfg.slot_order;
    let (ks, keys) = c.f32s("keys");
    let (qs, queries) = c.f32s("queries");
    let (hkv, n, d, hq) = (ks[0], ks[1], ks[2], qs[0]);
    let (p_len, w, b) = (c.u("prompt_len"), cfg.window, cfg.budget);
    // Per KV head: the positions held, in slot order.
    let mut cache: Vec<Vec<usize>> = vec![(0..p_len).collect(); hkv];
    let compress = |cache: &mut Vec<Vec<usize>>, q_end: usize| {
        let t = cache[0].len();
        let mut kbuf = Vec::with_capacity(hkv * t * d);
        for (h, slots) in cache.iter().enumerate() {
            for &p in slots {
                kbuf.extend_from_slice(&keys[(h * n + p) * d..][..d]);
            }
        }
        let mut qbuf = Vec::with_capacity(hq * w * d);
        for h in 0..hq {
            for p in q_end + 1 - w..=q_end {
                qbuf.extend_from_slice(&queries[(h * n + p) * d..][..d]);
            }
        }
        let x = Captured {
            keys: &kbuf,
            queries: &qbuf,
            hkv,
            hq,
            t,
            q_rows: w,
            d,
        };
        let sel = select_cpu(cfg, &x, 0, 1).unwrap();
        let lists = match order {
            SlotOrder::Position => sel.kept,
            SlotOrder::Reference => sel.reference.unwrap(),
        };
        for (h, l) in lists.iter().enumerate() {
            cache[h] = l.iter().map(|&s| cache[h][s]).collect();
        }
    };
    if p_len >= b {
        compress(&mut cache, p_len - 1);
    }
    for p in p_len..n {
        for slots in cache.iter_mut() {
            slots.push(p);
        }
        if cfg.schedule == Schedule::Decode && p % cfg.buffer == 0 && cache[0].len() >= b {
            compress(&mut cache, p);
        }
    }
    cache
}

#[test]
fn rkv_streams_replay_on_the_cpu_in_both_slot_orders() {
    let streams = cases("rkv_stream");
    assert_eq!(streams.len(), 6);
    for c in &streams {
        for (order, tensor) in [
            (SlotOrder::Position, "expected_position"),
            (SlotOrder::Reference, "expected_reference"),
        ] {
            let got = replay(c, order);
            let (s, flat) = c.i32s(tensor);
            let want: Vec<Vec<usize>> = flat.chunks(s[1]).map(|v| v.to_vec()).collect();
            assert_eq!(got, want, "{} {order:?}", c.name);
        }
    }
}

/// Replays an R-KV stream through the engine's machinery: the paged pool,
/// `paged_kv_store` writing each token's key, the forward's window-query
/// ring, and the engine's compression pass (`Compressor::compress`: GPU
/// selection, compaction, table truncation) on its real schedule. Returns
/// the positions each head holds, in slot order, read from the pool.
fn replay_on_the_engine(
    ctx: &kvsift::gpu::GpuContext,
    c: &Case,
    cfg: &CompressConfig,
    kv_f16: bool,
    prefill_chunk: usize,
) -> (Vec<Vec<usize>>, usize, usize) {
    use kvsift::engine::compressor::Compressor;
    use kvsift::gpu::GpuBuffer;
    use kvsift::kv::paged::{PagedKv, PoolConfig};
    use kvsift::model::config::ModelConfig;
    use kvsift::ops::paged_attention::{QkvRows, paged_kv_store};

    let (ks, keys) = c.f32s("keys");
    let (qs, queries) = c.f32s("queries");
    let (hkv, n, d, hq) = (ks[0], ks[1], ks[2], qs[0]);
    let p_len = c.u("prompt_len");
    let model = ModelConfig::from_json(
        std::path::Path::new("stream"),
        &serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": hq * d,
            "num_attention_heads": hq, "num_key_value_heads": hkv, "head_dim": d,
            "num_hidden_layers": 1, "vocab_size": 8, "intermediate_size": 8,
            "max_position_embeddings": n, "rms_norm_eps": 1e-5,
        }),
    )
    .unwrap();
    let pool = PoolConfig {
        bytes: Some(4 << 20),
        page_size: 16,
        kv_f16,
    };
    let shape = kvsift::kv::paged::KvShape {
        n_layers: model.n_layers,
        n_kv_heads: model.n_kv_heads,
        head_dim: model.head_dim,
    };
    let mut kv = PagedKv::new(ctx, shape, &pool, 1, n, n, 1).unwrap();
    let mut comp =
        Compressor::new(ctx, cfg.clone(), Default::default(), &model, &kv, 1, n, n).unwrap();
    let mut tables = kv.new_tables();
    let qkv_dim = (hq + 2 * hkv) * d;
    // Rows of fused qkv for positions [from, to): queries, keys, zero values.
    let rows = |from: usize, to: usize| -> Vec<f32> {
        let mut out = vec![0f32; (to - from) * qkv_dim];
        for (r, p) in (from..to).enumerate() {
            for h in 0..hq {
                out[r * qkv_dim + h * d..][..d].copy_from_slice(&queries[(h * n + p) * d..][..d]);
            }
            for h in 0..hkv {
                out[r * qkv_dim + (hq + h) * d..][..d]
                    .copy_from_slice(&keys[(h * n + p) * d..][..d]);
            }
        }
        out
    };
    let mut peak_pages = 0;
    let step = |kv: &mut PagedKv,
                comp: &Compressor,
                tables: &mut kvsift::kv::SeqTables,
                from: usize,
                to: usize| {
        let m = to - from;
        let new = tables.append(m, &mut kv.alloc).unwrap();
        kv.write_pages(ctx, 0, &new).unwrap();
        kv.set_row(0, 0, tables, None);
        kv.upload_rows(ctx).unwrap();
        let qkv = GpuBuffer::from_slice(ctx, "qkv", &rows(from, to)).unwrap();
        let pos: Vec<u32> = (from as u32..to as u32).collect();
        let positions = GpuBuffer::from_slice(ctx, "pos", &pos).unwrap();
        let layer = kv.layer(0);
        let q = QkvRows {
            positions: &positions,
            qkv: &qkv,
            qkv_stride: qkv_dim,
            n_q_heads: hq,
            n_kv_heads: hkv,
        };
        comp.set_lanes(ctx, &[0]).unwrap();
        let mut ops = vec![paged_kv_store(ctx, &layer, &q, m, m).unwrap().into()];
        ops.extend(
            comp.forward_ops(ctx, &layer, &positions, &qkv, qkv_dim, 0, m, m, to)
                .unwrap(),
        );
        ctx.run_ops("replay", &[&ops]).unwrap();
    };
    for from in (0..p_len).step_by(prefill_chunk) {
        step(
            &mut kv,
            &comp,
            &mut tables,
            from,
            p_len.min(from + prefill_chunk),
        );
    }
    peak_pages = peak_pages.max(kv.alloc.pages_in_use());
    if cfg.compresses_after_prefill(p_len) {
        comp.compress(ctx, &mut kv, 0, &mut tables, cfg).unwrap();
    }
    for p in p_len..n {
        step(&mut kv, &comp, &mut tables, p, p + 1);
        peak_pages = peak_pages.max(kv.alloc.pages_in_use());
        if cfg.compresses_after_decode(p) {
            comp.compress(ctx, &mut kv, 0, &mut tables, cfg).unwrap();
        }
    }
    // Positions per head in slot order, from the pool through the tables.
    let layout = kv.layout;
    let words = kv.layer(0).pool.read(ctx).unwrap();
    let held = (0..hkv)
        .map(|h| {
            let t = tables.head(0, h);
            (0..t.len)
                .map(|s| {
                    let page = t.pages[s / 16].index as usize;
                    words[layout.page_start(page) + layout.position_at(s % 16)] as usize
                })
                .collect()
        })
        .collect();
    // Pages in use must be what the kept slots need.
    let need: usize = (0..hkv).map(|h| tables.head(0, h).len.div_ceil(16)).sum();
    assert_eq!(
        kv.alloc.pages_in_use(),
        need,
        "pool holds only the kept slots"
    );
    (held, peak_pages, need)
}

#[test]
fn rkv_streams_replay_through_the_engine_in_both_slot_orders() {
    let Some(ctx) = kvsift::testing::gpu() else {
        return;
    };
    for c in &cases("rkv_stream") {
        for (order, tensor) in [
            (SlotOrder::Position, "expected_position"),
            (SlotOrder::Reference, "expected_reference"),
        ] {
            let mut cfg = config(c);
            cfg.slot_order = order;
            let (got, peak, end) = replay_on_the_engine(ctx, c, &cfg, false, usize::MAX);
            let (s, flat) = c.i32s(tensor);
            let want: Vec<Vec<usize>> = flat.chunks(s[1]).map(|v| v.to_vec()).collect();
            assert_eq!(got, want, "{} {order:?} (engine)", c.name);
            eprintln!("{} {order:?}: peak {peak} pages, {end} at the end", c.name);
        }
    }
}

/// Every method on the streams' keys and queries, prefill and decode
/// schedules, through the engine's machinery against the CPU replay (f32
/// slots; prompts prefilled in chunks of 5 so the rings and H2O's sums
/// span chunks). H2O v3's engine scores are its running sums over every
/// prompt query, checked against the contract's all-T-queries selection;
/// per-head lengths (AdaKV) only in the prefill schedule, where the CPU
/// replay can follow them.
#[test]
fn every_method_replays_through_the_engine_like_the_cpu() {
    let Some(ctx) = kvsift::testing::gpu() else {
        return;
    };
    let mut checked = 0;
    for c in &cases("rkv_stream") {
        let base = config(c);
        let mut runs = vec![];
        for method in Method::compressing() {
            for schedule in [Schedule::Prefill, Schedule::Decode] {
                if method == Method::AdaKv && schedule == Schedule::Decode {
                    continue;
                }
                let mut cfg = CompressConfig::new(method, base.budget);
                cfg.window = base.window;
                cfg.buffer = base.buffer;
                cfg.lambda = base.lambda;
                cfg.schedule = schedule;
                cfg.h2o_version = H2oVersion::V1;
                runs.push(cfg);
            }
        }
        for cfg in runs {
            let (got, _, _) = replay_on_the_engine(ctx, c, &cfg, false, 5);
            let want = replay_cpu(c, &cfg);
            assert_eq!(
                got, want,
                "{} {:?} {:?} (engine vs cpu)",
                c.name, cfg.method, cfg.schedule
            );
            checked += 1;
        }
        // H2O v3 at prefill: the running sums over all prompt queries.
        let p_len = c.u("prompt_len");
        if p_len >= base.budget {
            let mut cfg = CompressConfig::new(Method::H2o, base.budget);
            cfg.window = base.window;
            let (ks, keys) = c.f32s("keys");
            let (qs, queries) = c.f32s("queries");
            let (hkv, n, d, hq) = (ks[0], ks[1], ks[2], qs[0]);
            let mut kbuf = vec![];
            for h in 0..hkv {
                kbuf.extend_from_slice(&keys[h * n * d..][..p_len * d]);
            }
            let mut qbuf = vec![];
            for h in 0..hq {
                qbuf.extend_from_slice(&queries[h * n * d..][..p_len * d]);
            }
            let x = Captured {
                keys: &kbuf,
                queries: &qbuf,
                hkv,
                hq,
                t: p_len,
                q_rows: p_len,
                d,
            };
            let want = select_cpu(&cfg, &x, 0, 1).unwrap().kept;
            // Only the prompt: stop the stream after its prefill.
            let mut short = c.clone_prefix(p_len);
            short.meta["prompt_len"] = p_len.into();
            let (got, _, _) = replay_on_the_engine(ctx, &short, &cfg, false, 5);
            assert_eq!(got, want, "{} H2O v3 prefill (engine vs cpu)", c.name);
            checked += 1;
        }
    }
    eprintln!("{checked} method runs replayed through the engine");
    assert!(checked >= 60);
}

/// The committed vectors and contract are copies of `../shared`: when that
/// folder sits beside the repository, they must not have drifted from it.
#[test]
fn committed_vectors_and_contract_match_the_shared_ones() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shared = root.join("../shared");
    if !shared.join("vectors").is_dir() {
        eprintln!("skipped: no ../shared/vectors beside the repository");
        return;
    }
    let names = |d: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let ours = names(&dir());
    assert_eq!(ours, names(&shared.join("vectors")), "vector files differ");
    for n in &ours {
        let a = std::fs::read(dir().join(n)).unwrap();
        let b = std::fs::read(shared.join("vectors").join(n)).unwrap();
        assert!(
            a == b,
            "tests/vectors/{n} differs from ../shared/vectors/{n}"
        );
    }
    let spec = shared.join("specs/kv-compression.md");
    if spec.is_file() {
        assert_eq!(
            std::fs::read_to_string(root.join("docs/kv-compression.md")).unwrap(),
            std::fs::read_to_string(spec).unwrap(),
            "docs/kv-compression.md differs from ../shared/specs/kv-compression.md"
        );
    }
}

/// AdaKV and H2O v3 on the decode schedule (ragged heads, running sums).
#[path = "replay/decode.rs"]
mod decode;
