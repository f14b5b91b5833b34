//! The C functions called as C would call them: errors as codes and
//! messages (no GPU needed), and on a GPU the same tokens and text as the
//! engine itself gives.

use std::ffi::{CStr, CString, c_char};
use std::path::PathBuf;

use kvsift::engine::{Engine, Event, Request};
use kvsift::gpu::WeightDtype;
use kvsift::kv::compression::{CompressConfig, Method};

use super::*;

fn last_error() -> String {
    unsafe { CStr::from_ptr(kvsift_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-llama")
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

#[test]
fn bad_arguments_are_codes_and_messages() {
    let mut engine: *mut KvsiftEngine = std::ptr::null_mut();
    let dir = c(model().to_str().unwrap());
    let status = unsafe { kvsift_engine_open(std::ptr::null(), std::ptr::null(), &mut engine) };
    assert_eq!(status, KvsiftStatus::KvsiftInvalidArgument);
    assert!(last_error().contains("model_dir: null"), "{}", last_error());
    for (settings, needle) in [
        ("{\"parallel\": ", "not JSON"),
        ("[1]", "must be a JSON object"),
        ("{\"paralel\": 2}", "settings.paralel: unknown setting"),
        ("{\"kv_dtype\": \"f8\"}", "settings.kv_dtype"),
        ("{\"kv\": {\"method\": \"zip\"}}", "kv.method"),
        ("{\"kv\": {\"method\": \"rkv\"}}", "kv.budget"),
    ] {
        let s = c(settings);
        let status = unsafe { kvsift_engine_open(dir.as_ptr(), s.as_ptr(), &mut engine) };
        assert_eq!(status, KvsiftStatus::KvsiftInvalidArgument, "{settings}");
        assert!(
            last_error().contains(needle),
            "{settings}: {}",
            last_error()
        );
        assert!(engine.is_null());
    }
    let missing = c("/no/such/model");
    let status = unsafe { kvsift_engine_open(missing.as_ptr(), std::ptr::null(), &mut engine) };
    assert_eq!(status, KvsiftStatus::KvsiftModel, "{}", last_error());
    assert!(last_error().contains("not a directory"));
    let not_utf8 = [0xffu8 as c_char, 0];
    let status = unsafe { kvsift_engine_open(not_utf8.as_ptr(), std::ptr::null(), &mut engine) };
    assert_eq!(status, KvsiftStatus::KvsiftInvalidArgument);
    assert!(last_error().contains("UTF-8"));
    let null = std::ptr::null_mut();
    let mut id = 0;
    let p = c("hi");
    unsafe {
        assert_eq!(
            kvsift_engine_step(null, std::ptr::null_mut()),
            KvsiftStatus::KvsiftInvalidArgument
        );
        assert_eq!(
            kvsift_request_add(null, p.as_ptr(), std::ptr::null(), &mut id),
            KvsiftStatus::KvsiftInvalidArgument
        );
        assert_eq!(
            kvsift_request_cancel(null, 0),
            KvsiftStatus::KvsiftInvalidArgument
        );
        kvsift_engine_free(null);
    }
    assert_eq!(
        unsafe { CStr::from_ptr(kvsift_version()) }
            .to_str()
            .unwrap(),
        env!("CARGO_PKG_VERSION")
    );
    // Every failing call leaves its message.
    let mut stats = KvsiftStats::default();
    let _ = unsafe { kvsift_engine_stats(null, &mut stats) };
    assert!(!last_error().is_empty());
}

/// Runs every request to its end through the C functions: each request's
/// tokens, text and last event.
fn run_c(engine: *mut KvsiftEngine, n: usize) -> Vec<(Vec<u32>, String, KvsiftEvent)> {
    let mut out: Vec<(Vec<u32>, String, Option<KvsiftEvent>)> =
        (0..n).map(|_| (vec![], String::new(), None)).collect();
    let mut has_work = true;
    while has_work {
        assert_eq!(
            unsafe { kvsift_engine_step(engine, &mut has_work) },
            KvsiftStatus::KvsiftOk,
            "{}",
            last_error()
        );
        loop {
            let mut ev = std::mem::MaybeUninit::<KvsiftEvent>::uninit();
            let mut got = false;
            assert_eq!(
                unsafe { kvsift_engine_poll(engine, ev.as_mut_ptr(), &mut got) },
                KvsiftStatus::KvsiftOk
            );
            if !got {
                break;
            }
            let ev = unsafe { ev.assume_init() };
            let o = &mut out[ev.request as usize];
            o.1 += unsafe { CStr::from_ptr(ev.text) }.to_str().unwrap();
            match ev.kind {
                KvsiftEventKind::KvsiftToken => o.0.push(ev.token),
                KvsiftEventKind::KvsiftPreempted => {}
                _ => o.2 = Some(ev),
            }
        }
    }
    out.into_iter()
        .map(|(t, s, e)| (t, s, e.expect("no last event")))
        .collect()
}

#[test]
fn requests_through_c_get_the_engines_tokens_and_text() {
    let Some(ctx) = kvsift::testing::gpu() else {
        return;
    };
    let dir = c(model().to_str().unwrap());
    let settings = c(
        r#"{"parallel": 4, "weights": "f32", "kv": {"method": "rkv", "budget": 24, "window": 4, "buffer": 8}}"#,
    );
    let mut engine: *mut KvsiftEngine = std::ptr::null_mut();
    let status = unsafe { kvsift_engine_open(dir.as_ptr(), settings.as_ptr(), &mut engine) };
    assert_eq!(status, KvsiftStatus::KvsiftOk, "{}", last_error());
    let prompts = ["the quiet grey cat", "down the river we go", "once upon"];
    let requests = [
        r#"{"max_tokens": 30, "temperature": 0}"#,
        r#"{"max_tokens": 20, "temperature": 0.8, "seed": 3, "kv": {"method": "snapkv", "budget": 12}}"#,
        r#"{"max_tokens": 18, "temperature": 0, "kv": {"method": "none"}}"#,
    ];
    for (i, (p, r)) in prompts.iter().zip(requests).enumerate() {
        let (p, r) = (c(p), c(r));
        let mut id = u64::MAX;
        let status = unsafe { kvsift_request_add(engine, p.as_ptr(), r.as_ptr(), &mut id) };
        assert_eq!(status, KvsiftStatus::KvsiftOk, "{}", last_error());
        assert_eq!(id, i as u64);
    }
    let got = run_c(engine, 3);
    let mut stats = KvsiftStats::default();
    assert_eq!(
        unsafe { kvsift_engine_stats(engine, &mut stats) },
        KvsiftStatus::KvsiftOk
    );
    assert_eq!(stats.kv_pages_in_use, 0);
    assert!(stats.compression_passes > 0);
    assert_eq!(
        unsafe { kvsift_request_cancel(engine, 0) },
        KvsiftStatus::KvsiftNotFound
    );
    unsafe { kvsift_engine_free(engine) };

    // The same requests straight to the engine.
    let tok = kvsift::model::TextTokenizer::load(&model()).unwrap();
    let weights =
        kvsift::model::llama::load_weights(ctx, &model(), WeightDtype::F32, false).unwrap();
    let mut rkv = CompressConfig::new(Method::Rkv, 24);
    rkv.window = 4;
    rkv.buffer = 8;
    let config = kvsift::engine::EngineConfig {
        max_batch: 4,
        compression: rkv.clone(),
        ..Default::default()
    };
    let mut e = Engine::new(ctx, weights, config).unwrap();
    let mut snap = CompressConfig::new(Method::SnapKv, 12);
    snap.window = 4;
    let own = [None, Some(snap), Some(CompressConfig::new(Method::None, 0))];
    let limits = [30, 20, 18];
    for (i, p) in prompts.iter().enumerate() {
        let mut r = Request::greedy(tok.encode(p, true).unwrap(), limits[i]);
        r.compression = own[i].clone();
        if i == 1 {
            r.sampling.temperature = 0.8;
            r.sampling.seed = 3;
        }
        e.add_request(r).unwrap();
    }
    let mut want: Vec<Vec<u32>> = vec![vec![]; 3];
    while e.has_work() {
        for ev in e.step().unwrap() {
            if let Event::Token { id, token } = ev {
                want[id as usize].push(token);
            }
        }
    }
    for (i, (tokens, text, last)) in got.iter().enumerate() {
        assert_eq!(tokens, &want[i], "request {i}");
        assert_eq!(text, &tok.decode(tokens, true).unwrap(), "request {i}");
        assert_eq!(last.kind, KvsiftEventKind::KvsiftFinished);
        assert_eq!(last.finish, KvsiftFinish::KvsiftLength);
        let report = e.report(i as u64).unwrap();
        assert_eq!(last.compression_passes, report.compression_passes);
        assert_eq!(last.slots_dropped, report.slots_dropped);
        assert_eq!(last.peak_kv_bytes, report.peak_kv_bytes);
        assert_eq!(
            last.slots_kept,
            report.slots_per_layer.iter().sum::<usize>() as u64
        );
    }
}
