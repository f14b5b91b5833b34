//! GGUF models and quantized loads against what transformers computes for
//! the same weights (tools/make_gguf_models.py: files written by llama.cpp's
//! `gguf` package, read back and dequantized by it, run by transformers):
//! logits as one prefill and token by token, the CPU reference, the
//! tokenizer and config GGUF metadata implies, blocks kvsift quantizes
//! against the package's, and files kvsift cannot run.

use std::path::{Path, PathBuf};

use kvsift::engine::{Engine, EngineConfig};
use kvsift::gpu::{GpuContext, WeightDtype};
use kvsift::kv::paged::PoolConfig;
use kvsift::model::TextTokenizer;
use kvsift::model::config::ModelConfig;
use kvsift::model::llama::{WeightFormat, load_weights};
use kvsift::model::reference::Reference;
use kvsift::model::weights::WeightStore;
use kvsift::testing::gpu;
use safetensors::SafeTensors;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/gguf/models")
        .join(name)
}

fn model_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name)
}

struct Golden {
    prompt: String,
    prompt_ids: Vec<u32>,
    logits: Vec<f32>,
}

fn golden(name: &str) -> Golden {
    let bytes = std::fs::read(data(&format!("{name}.golden.safetensors"))).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let words = |n: &str| -> Vec<[u8; 4]> {
        st.tensor(n)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| [b[0], b[1], b[2], b[3]])
            .collect()
    };
    Golden {
        prompt: meta.metadata().as_ref().unwrap()["prompt"].clone(),
        prompt_ids: words("prompt_ids")
            .into_iter()
            .map(|b| i32::from_le_bytes(b) as u32)
            .collect(),
        logits: words("logits")
            .into_iter()
            .map(f32::from_le_bytes)
            .collect(),
    }
}

/// The GGUF files, with the tolerance on |logit| against transformers.
/// Both sides compute in f32 from the same dequantized weights; they differ
/// in summation order, and the quantized matvec scales each block's dot
/// product once where transformers scales every weight. Measured: 2e-6 to
/// 8e-6 for every file, GPU and CPU reference alike (each check prints its
/// figure); 1e-4 keeps a 12x margin, far below what a wrong block layout,
/// scale or row order does (> 0.05).
const FILES: &[(&str, f32)] = &[
    ("tiny-llama.f16", 1e-4),
    ("tiny-llama.q8_0", 1e-4),
    ("tiny-llama.q4_0", 1e-4),
    ("tiny-qwen2.q8_0", 1e-4),
    ("tiny-qwen3.q4_0", 1e-4),
    ("tiny-kquant.q4_k_m", 1e-4),
];

fn engine<'c>(ctx: &'c GpuContext, path: &Path, format: WeightFormat) -> Engine<'c> {
    let w = load_weights(ctx, path, format, false).unwrap();
    let config = EngineConfig {
        prefill_chunk: 48,
        max_batch: 1,
        pool: PoolConfig {
            kv_f16: false,
            ..PoolConfig::default()
        },
        ..EngineConfig::default()
    };
    Engine::new(ctx, w, config).unwrap()
}

fn check(what: &str, got: &[f32], want: &[f32], vocab: usize, tol: f32) {
    kvsift::testing::assert_logits_close(what, got, want, vocab, tol);
}

/// Prefill (3 chunks) and decode logits of `path` loaded as `format`.
fn check_model(
    ctx: &GpuContext,
    what: &str,
    path: &Path,
    format: WeightFormat,
    g: &Golden,
    tol: f32,
) {
    let mut m = engine(ctx, path, format);
    let t = g.prompt_ids.len();
    let v = m.cfg.vocab_size;
    let prefill = m.score(&g.prompt_ids, t, true).unwrap();
    let got = prefill.logits.as_ref().unwrap();
    check(&format!("{what} prefill"), got, &g.logits, v, tol);
    let decode = m.score(&g.prompt_ids, 1, true).unwrap();
    let got = decode.logits.as_ref().unwrap();
    check(&format!("{what} decode"), got, &g.logits, v, tol);
}

#[test]
fn gguf_logits_match_transformers_prefill_and_decode() {
    let Some(ctx) = gpu() else { return };
    for &(name, tol) in FILES {
        let g = golden(name);
        let path = data(&format!("{name}.gguf"));
        // Blocks stay as the file holds them either way; f16 tensors are
        // exact in f16 and f32 storage alike.
        for dtype in [WeightDtype::F32, WeightDtype::F16] {
            check_model(
                ctx,
                &format!("{name} {dtype:?}"),
                &path,
                dtype.into(),
                &g,
                tol,
            );
        }
    }
}

#[test]
fn quantized_loads_match_transformers_on_the_same_blocks() {
    let Some(ctx) = gpu() else { return };
    for (model, dtype) in [
        ("tiny-llama", WeightDtype::Q8_0),
        ("tiny-llama", WeightDtype::Q4_0),
        ("tiny-qwen2", WeightDtype::Q4_0),
    ] {
        let g = golden(&format!("{model}.load-{}", dtype.name()));
        let format = WeightFormat {
            dtype,
            quantize_lm_head: true,
        };
        check_model(
            ctx,
            &format!("{model} --weights-dtype {}", dtype.name()),
            &model_dir(model),
            format,
            &g,
            1e-4,
        );
    }
}

#[test]
fn the_cpu_reference_reads_gguf_and_quantizes_as_the_gpu_stores() {
    for &(name, tol) in FILES {
        let g = golden(name);
        let mut r = Reference::load(&data(&format!("{name}.gguf")), WeightDtype::F32).unwrap();
        let got: Vec<f32> = g.prompt_ids.iter().flat_map(|&t| r.forward(t)).collect();
        check(
            &format!("{name} reference"),
            &got,
            &g.logits,
            r.cfg.vocab_size,
            tol,
        );
    }
    let g = golden("tiny-llama.load-q4_0");
    let format = WeightFormat {
        dtype: WeightDtype::Q4_0,
        quantize_lm_head: true,
    };
    let mut r = Reference::load(&model_dir("tiny-llama"), format).unwrap();
    let got: Vec<f32> = g.prompt_ids.iter().flat_map(|&t| r.forward(t)).collect();
    check(
        "tiny-llama q4_0 reference",
        &got,
        &g.logits,
        r.cfg.vocab_size,
        1e-4,
    );
}

/// Every row kvsift quantizes from the safetensors checkpoint equals the
/// block the `gguf` package wrote for it (rows read in Hugging Face order:
/// Llama's q/k rows come back un-permuted).
#[test]
fn blocks_kvsift_quantizes_equal_the_gguf_package_bit_for_bit() {
    let source = WeightStore::open(&model_dir("tiny-llama")).unwrap();
    for dtype in [WeightDtype::Q8_0, WeightDtype::Q4_0] {
        let file = WeightStore::open(&data(&format!("tiny-llama.{}.gguf", dtype.name()))).unwrap();
        let mut compared = 0;
        for name in source.names() {
            let t = source.get(name).unwrap();
            if t.shape.len() != 2 {
                continue;
            }
            let q = file.get(name).unwrap();
            let words = dtype.row_words(t.shape[1]);
            let (mut a, mut b) = (vec![0u32; words], vec![0u32; words]);
            let mut scratch = vec![];
            for r in 0..t.shape[0] {
                t.pack_row(r, dtype, &mut scratch, &mut a).unwrap();
                q.pack_row(r, dtype, &mut scratch, &mut b).unwrap();
                assert_eq!(a, b, "{name} row {r} as {}", dtype.name());
            }
            compared += 1;
        }
        assert!(compared >= 15, "{compared} matrices compared");
    }
}

#[test]
fn the_gguf_tokenizer_and_config_are_the_checkpoints() {
    for (name, source) in [
        ("tiny-llama.q8_0", "tiny-llama"),
        ("tiny-qwen2.q8_0", "tiny-qwen2"),
        ("tiny-qwen3.q4_0", "tiny-qwen3"),
    ] {
        let path = data(&format!("{name}.gguf"));
        let g = golden(name);
        let tok = TextTokenizer::load(&path).unwrap();
        assert_eq!(tok.encode(&g.prompt, true).unwrap(), g.prompt_ids, "{name}");
        let dir_tok = TextTokenizer::load(&model_dir(source)).unwrap();
        for text in [
            "Hello, world! 12345\n\n  tabs\tand ünïcödé",
            "<|im_start|>user\nhi<|im_end|>",
        ] {
            let ids = dir_tok.encode(text, true).unwrap();
            assert_eq!(tok.encode(text, true).unwrap(), ids, "{name}: {text:?}");
            assert_eq!(
                tok.decode(&ids, false).unwrap(),
                dir_tok.decode(&ids, false).unwrap()
            );
        }
        let msgs = [kvsift::model::tokenizer::Message {
            role: "user".into(),
            content: "What is 2+2?".into(),
        }];
        assert_eq!(
            tok.apply_chat_template(&msgs, true).unwrap(),
            dir_tok.apply_chat_template(&msgs, true).unwrap(),
            "{name}"
        );
        let (a, b) = (
            ModelConfig::load(&path).unwrap(),
            ModelConfig::load(&model_dir(source)).unwrap(),
        );
        assert_eq!(
            (
                a.arch,
                a.hidden_size,
                a.intermediate_size,
                a.n_layers,
                a.n_heads,
                a.n_kv_heads,
                a.head_dim
            ),
            (
                b.arch,
                b.hidden_size,
                b.intermediate_size,
                b.n_layers,
                b.n_heads,
                b.n_kv_heads,
                b.head_dim
            ),
            "{name}"
        );
        assert_eq!(
            (
                a.rms_norm_eps,
                a.rope.theta,
                a.tie_word_embeddings,
                a.qkv_bias,
                a.qk_norm,
                a.vocab_size
            ),
            (
                b.rms_norm_eps,
                b.rope.theta,
                b.tie_word_embeddings,
                b.qkv_bias,
                b.qk_norm,
                b.vocab_size
            ),
            "{name}"
        );
        // Llama 3.1's scaling reaches the rope as rope_freqs.weight's divisors.
        for (i, (x, y)) in a.rope.inv_freq().iter().zip(b.rope.inv_freq()).enumerate() {
            assert!(
                (x - y).abs() <= 1e-6 * y.abs(),
                "{name} inv_freq[{i}]: {x} vs {y}"
            );
        }
        assert_eq!(
            (a.bos_token_id, &a.eos_token_ids),
            (b.bos_token_id, &b.eos_token_ids),
            "{name}"
        );
    }
}

/// A copy of `file` with the first occurrence of `from` replaced by `to`
/// (same length: the file stays well formed).
fn patched(file: &str, from: &[u8], to: &[u8], tag: &str) -> PathBuf {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(data(file)).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{file} holds no {:?}", String::from_utf8_lossy(from)));
    bytes[at..at + to.len()].copy_from_slice(to);
    let path = std::env::temp_dir().join(format!("kvsift-gguf-{tag}-{}.gguf", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn what_kvsift_cannot_run_is_an_error_naming_the_field() {
    let cases: &[(&str, &[u8], &[u8], &str)] = &[
        (
            "tiny-llama.q8_0.gguf",
            b"llama",
            b"falcn",
            "general.architecture",
        ),
        (
            "tiny-llama.q8_0.gguf",
            b"gpt2",
            b"bert",
            "tokenizer.ggml.model",
        ),
        (
            "tiny-qwen2.q8_0.gguf",
            b"tokenizer.ggml.pre\x08\0\0\0\x05\0\0\0\0\0\0\0qwen2",
            b"tokenizer.ggml.pre\x08\0\0\0\x05\0\0\0\0\0\0\0qwen9",
            "tokenizer.ggml.pre",
        ),
        (
            "tiny-llama.q8_0.gguf",
            b"llama.embedding_length",
            b"llama.embedding_lengtx",
            "llama.embedding_length",
        ),
        (
            "tiny-llama.q8_0.gguf",
            b"llama.block_count",
            b"llama.block_counx",
            "llama.block_count",
        ),
    ];
    for (i, &(file, from, to, field)) in cases.iter().enumerate() {
        let path = patched(file, from, to, &format!("case{i}"));
        let tok = TextTokenizer::load(&path).err().map(|e| e.to_string());
        let cfg = ModelConfig::load(&path).err().map(|e| e.to_string());
        let e = tok.into_iter().chain(cfg).collect::<Vec<_>>().join(" / ");
        assert!(
            e.contains(field),
            "{file} with {:?}: {e}",
            String::from_utf8_lossy(to)
        );
        std::fs::remove_file(&path).ok();
    }
    // A tensor of a type kvsift does not read: ggml type 2 (q4_0) of one
    // norm changed to 6 (q5_0) fails the load naming the tensor.
    let Some(ctx) = gpu() else { return };
    let path = patched(
        "tiny-llama.q4_0.gguf",
        b"blk.0.attn_q.weight",
        b"blk.0.attn_q.weight",
        "same",
    );
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"blk.0.attn_q.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    // n_dims (u32), 2 dims (u64 each), then the type (u32).
    let ty = at + 4 + 16;
    assert_eq!(u32::from_le_bytes(bytes[ty..ty + 4].try_into().unwrap()), 2);
    bytes[ty..ty + 4].copy_from_slice(&6u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = load_weights(ctx, &path, WeightDtype::F16, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("attn_q") || e.contains("q_proj"), "{e}");
    std::fs::remove_file(&path).ok();
}

/// Corrupt and truncated GGUF files are errors, never panics: random bytes
/// of a real file overwritten (most land in the metadata: the vocabulary,
/// merges and tensor infos) or the file cut short, then every loader run on
/// it (config, tokenizer, generation defaults, the weights' check, and the
/// GPU load where there is one).
#[test]
fn corrupt_gguf_files_are_errors_not_panics() {
    use kvsift::model::config::GenerationDefaults;
    let original = std::fs::read(data("tiny-qwen2.q8_0.gguf")).unwrap();
    let meta_end = 40_000.min(original.len());
    let mut rng = kvsift::rng::Rng::new(99);
    let path = std::env::temp_dir().join(format!("kvsift-gguf-fuzz-{}.gguf", std::process::id()));
    let ctx = gpu();
    let mut errors = 0;
    for case in 0..160 {
        let mut bytes = original.clone();
        if case % 4 == 3 {
            bytes.truncate(rng.below(original.len()));
        } else {
            for _ in 0..1 + rng.below(3) {
                let at = if case % 2 == 0 {
                    rng.below(meta_end)
                } else {
                    rng.below(bytes.len())
                };
                bytes[at] = rng.below(256) as u8;
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut failed = 0;
            failed += ModelConfig::load(&path).is_err() as usize;
            failed += TextTokenizer::load(&path)
                .and_then(|t| t.encode("Hello, world! 123", true))
                .is_err() as usize;
            failed += GenerationDefaults::load(&path).is_err() as usize;
            if let (Ok(cfg), Ok(store)) = (ModelConfig::load(&path), WeightStore::open(&path)) {
                failed += kvsift::model::llama::check_checkpoint(&cfg, &store).is_err() as usize;
                if let Some(ctx) = ctx
                    && case % 8 == 0
                {
                    failed += load_weights(ctx, &path, WeightDtype::F16, false).is_err() as usize;
                }
            }
            failed
        }));
        match outcome {
            Ok(n) => errors += n,
            Err(_) => panic!("case {case}: a loader panicked on a corrupt file"),
        }
    }
    std::fs::remove_file(&path).ok();
    assert!(
        errors > 40,
        "only {errors} errors: the corruption should be caught often"
    );
}
