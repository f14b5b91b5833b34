//! The reader against a file written by llama.cpp's own Python writer
//! (`tools/make_gguf_vectors.py`: every metadata type, every tensor type
//! kvsift reads), and against every truncation and byte flip of it.

use super::*;

fn sample() -> (Vec<u8>, serde_json::Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf");
    let bytes = std::fs::read(dir.join("sample.gguf")).unwrap();
    let want =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sample.json")).unwrap()).unwrap();
    (bytes, want)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn reads_what_the_gguf_package_wrote() {
    let (_, want) = sample();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf/sample.gguf");
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version, 3);
    for (key, value) in want["metadata"].as_object().unwrap() {
        let got = f.get(key).unwrap_or_else(|| panic!("no {key}"));
        match value {
            serde_json::Value::Bool(b) => assert_eq!(got, &GgufValue::Bool(*b), "{key}"),
            serde_json::Value::String(s) => assert_eq!(got.as_str(), Some(s.as_str()), "{key}"),
            serde_json::Value::Number(n) if n.is_u64() => {
                assert_eq!(got.as_u64(), n.as_u64(), "{key}")
            }
            serde_json::Value::Number(n) if n.is_i64() => {
                assert_eq!(got.as_f64(), n.as_i64().map(|v| v as f64), "{key}")
            }
            serde_json::Value::Number(n) => assert_eq!(got.as_f64(), n.as_f64(), "{key}"),
            serde_json::Value::Array(items) => {
                let got = got.as_array().unwrap();
                assert_eq!(got.len(), items.len(), "{key}");
                for (g, w) in got.iter().zip(items) {
                    match w {
                        serde_json::Value::String(s) => assert_eq!(g.as_str(), Some(s.as_str())),
                        w => assert_eq!(g.as_f64(), w.as_f64(), "{key}"),
                    }
                }
            }
            v => panic!("{key}: {v}"),
        }
    }
    // Integers keep their types.
    assert_eq!(f.get("test.i8"), Some(&GgufValue::I8(-100)));
    assert_eq!(f.get("test.u64"), Some(&GgufValue::U64((1 << 63) + 5)));
    let tensors = want["tensors"].as_object().unwrap();
    assert_eq!(f.tensors.len(), tensors.len());
    for (name, t) in tensors {
        let got = f.tensor(name).unwrap();
        assert_eq!(
            got.dtype.name().to_lowercase(),
            t["type"].as_str().unwrap(),
            "{name}"
        );
        let dims: Vec<u64> = t["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(got.dims, dims, "{name}");
        assert_eq!(got.bytes, t["bytes"].as_u64().unwrap(), "{name}");
        assert_eq!(
            hex(f.data(got).unwrap()),
            t["hex"].as_str().unwrap(),
            "{name}"
        );
    }
}

/// Every prefix of the file is an error (until the last tensor's bytes are
/// all there), and flipping any byte is an error or a file that still reads:
/// never a panic, never an allocation the file cannot back.
#[test]
fn truncated_or_corrupted_files_are_errors_not_panics() {
    let (bytes, _) = sample();
    let (_, _, tensors, data_start) = GgufFile::parse(&bytes).unwrap();
    let needed = tensors
        .iter()
        .map(|t| data_start + (t.offset + t.bytes) as usize)
        .max()
        .unwrap();
    for cut in 0..bytes.len() {
        let r = GgufFile::parse(&bytes[..cut]);
        if cut < needed {
            let e = r
                .err()
                .unwrap_or_else(|| panic!("a file cut at {cut} of {} reads", bytes.len()));
            assert!(!e.is_empty());
        }
    }
    for at in 0..bytes.len() {
        for flip in [0xffu8, 0x80, 0x01] {
            let mut b = bytes.clone();
            b[at] ^= flip;
            let _ = GgufFile::parse(&b);
        }
    }
    // Named errors for the usual suspects.
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(GgufFile::parse(&b).unwrap_err().contains("magic"));
    let mut b = bytes.clone();
    b[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(GgufFile::parse(&b).unwrap_err().contains("version 9"));
    let mut b = bytes.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(GgufFile::parse(&b).unwrap_err().contains("tensor count"));
    let e = GgufFile::parse(&bytes[..needed - 1]).unwrap_err();
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn a_missing_file_and_a_type_kvsift_does_not_read_are_clear_errors() {
    let e = GgufFile::open(Path::new("/no/such/model.gguf"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/no/such/model.gguf"), "{e}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf/sample.gguf");
    let f = GgufFile::open(&path).unwrap();
    let mut t = f.tensor("q8_0.weight").unwrap().clone();
    t.dtype = GgmlType::Other(6);
    let e = f.data(&t).unwrap_err().to_string();
    assert!(
        e.contains("ggml type 6") && e.contains("q8_0.weight"),
        "{e}"
    );
}
