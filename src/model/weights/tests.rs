//! Weight loading: good and bad checkpoints.

use super::*;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvsift-weights-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn st_bytes() -> Vec<u8> {
    let a: Vec<u8> = [1.0f32, -2.0, 3.5, 0.25]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let b: Vec<u8> = [bf16::from_f32(1.5), bf16::from_f32(-0.125)]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let views = vec![
        (
            "a",
            safetensors::tensor::TensorView::new(Dtype::F32, vec![2, 2], &a).unwrap(),
        ),
        (
            "b",
            safetensors::tensor::TensorView::new(Dtype::BF16, vec![2], &b).unwrap(),
        ),
    ];
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn reads_and_converts_tensors() {
    let d = tmpdir("ok");
    write(&d, "model.safetensors", &st_bytes());
    let s = WeightStore::open(&d).unwrap();
    let a = s.get("a").unwrap();
    a.expect(&[2, 2]).unwrap();
    assert_eq!(a.to_f32().unwrap(), vec![1.0, -2.0, 3.5, 0.25]);
    let b = s.get("b").unwrap();
    b.expect(&[2]).unwrap();
    assert_eq!(b.to_f32().unwrap(), vec![1.5, -0.125]);
    let e = a.expect(&[4]).unwrap_err().to_string();
    assert!(e.contains("\"a\"") && e.contains("[2, 2]"), "{e}");
    let e = s.get("c").err().unwrap().to_string();
    assert!(e.contains("\"c\"") && e.contains("missing"), "{e}");
}

#[test]
fn truncated_and_corrupt_files_are_errors_naming_the_file() {
    let d = tmpdir("bad");
    let bytes = st_bytes();
    write(&d, "model.safetensors", &bytes[..bytes.len() - 3]);
    let e = WeightStore::open(&d).err().unwrap().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("safetensors"),
        "{e}"
    );
    write(
        &d,
        "model.safetensors",
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
    );
    assert!(WeightStore::open(&d).is_err());
    write(&d, "model.safetensors", b"");
    assert!(WeightStore::open(&d).is_err());
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let e = WeightStore::open(&d).err().unwrap().to_string();
    assert!(e.contains("no model.safetensors"), "{e}");
}

#[test]
fn sharded_checkpoints_follow_the_index() {
    let d = tmpdir("shards");
    write(&d, "part-1.safetensors", &st_bytes());
    write(
        &d,
        "model.safetensors.index.json",
        br#"{"weight_map": {"a": "part-1.safetensors", "b": "part-1.safetensors"}}"#,
    );
    let s = WeightStore::open(&d).unwrap();
    assert!(s.contains("a") && s.contains("b"));
    write(
        &d,
        "model.safetensors.index.json",
        br#"{"weight_map": {"a": "part-1.safetensors", "z": "part-1.safetensors"}}"#,
    );
    let e = WeightStore::open(&d).err().unwrap().to_string();
    assert!(e.contains("\"z\""), "{e}");
}

fn one_tensor(dtype: Dtype, shape: Vec<usize>, bytes: &[u8]) -> Vec<u8> {
    let view = safetensors::tensor::TensorView::new(dtype, shape, bytes).unwrap();
    safetensors::serialize(vec![("w", view)], None).unwrap()
}

#[test]
fn non_finite_weights_are_refused_naming_tensor_and_element() {
    let d = tmpdir("nonfinite");
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let f16s = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let nan16 = 0x7e00u16;
    let inf16 = 0x7c00u16;
    let one16 = f16::from_f32(1.0).to_bits();
    let cases: Vec<(Dtype, Vec<u8>, &str)> = vec![
        (Dtype::F32, f32s(&[1.0, 2.0, f32::NAN, 4.0]), "[1, 0]"),
        (
            Dtype::F32,
            f32s(&[1.0, f32::NEG_INFINITY, 3.0, 4.0]),
            "[0, 1]",
        ),
        (Dtype::F16, f16s(&[one16, one16, one16, nan16]), "[1, 1]"),
        (Dtype::F16, f16s(&[inf16, one16, one16, one16]), "[0, 0]"),
        (
            Dtype::BF16,
            f16s(&[0x3f80, 0x3f80, 0x7f80, 0x3f80]), // bf16 +inf
            "[1, 0]",
        ),
    ];
    for (i, (dtype, bytes, at)) in cases.into_iter().enumerate() {
        write(
            &d,
            "model.safetensors",
            &one_tensor(dtype, vec![2, 2], &bytes),
        );
        let s = WeightStore::open(&d).unwrap();
        let t = s.get("w").unwrap();
        t.expect(&[2, 2]).unwrap();
        let e = t.to_f32().unwrap_err().to_string();
        assert!(
            e.contains("\"w\"") && e.contains("finite") && e.contains(at),
            "case {i}: {e}"
        );
        // Packing for the GPU refuses them too, in either dtype, and
        // never as "beyond the f16 range".
        let mut scratch = vec![];
        for wd in [WeightDtype::F16, WeightDtype::F32] {
            let mut out = vec![0u32; wd.row_words(2)];
            let e = (0..2)
                .map(|r| t.pack_row(r, wd, &mut scratch, &mut out))
                .find_map(|r| r.err())
                .unwrap_or_else(|| panic!("case {i} {wd:?}: packed"))
                .to_string();
            assert!(
                e.contains("finite") && !e.contains("range"),
                "case {i} {wd:?}: {e}"
            );
        }
    }
    // A finite f32 beyond f16's range: f16 asks for f32, f32 loads it.
    write(
        &d,
        "model.safetensors",
        &one_tensor(Dtype::F32, vec![1, 2], &f32s(&[1.0, 1e6])),
    );
    let s = WeightStore::open(&d).unwrap();
    let t = s.get("w").unwrap();
    let mut out = vec![0u32; 1];
    let e = t
        .pack_row(0, WeightDtype::F16, &mut vec![], &mut out)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("f16 range") && e.contains("--weights-dtype f32"),
        "{e}"
    );
    let mut out = vec![0u32; 2];
    t.pack_row(0, WeightDtype::F32, &mut vec![], &mut out)
        .unwrap();
    assert_eq!(f32::from_bits(out[1]), 1e6);
    // Rows past the tensor, or of another length, are errors.
    let mut row = vec![0.0; 2];
    assert!(t.row_f32(1, &mut row).is_err());
    assert!(t.row_f32(0, &mut [0.0; 3]).is_err());
    // A dtype kvsift does not convert.
    write(
        &d,
        "model.safetensors",
        &one_tensor(Dtype::I8, vec![2], &[1, 2]),
    );
    let s = WeightStore::open(&d).unwrap();
    let t = s.get("w").unwrap();
    assert!(t.expect(&[2]).is_err());
    assert!(t.to_f32().unwrap_err().to_string().contains("I8"));
}

#[test]
fn bad_indexes_and_non_files_are_clear_errors() {
    let d = tmpdir("index");
    write(&d, "part-1.safetensors", &st_bytes());
    for (index, needle) in [
        (r#"{"weight_map": {}}"#, "empty"),
        (r#"{"weight_map": {"a": 5}}"#, "weight_map[\"a\"] is 5"),
        (
            r#"{"weight_map": {"a": "../part-1.safetensors"}}"#,
            "not the name of a shard",
        ),
        (
            r#"{"weight_map": {"a": "/etc/passwd"}}"#,
            "not the name of a shard",
        ),
        (r#"{"weight_map": {"a": ""}}"#, "not the name of a shard"),
        (r#"{"weight_map": []}"#, "no weight_map"),
        (r#"[1, 2"#, "not valid JSON"),
    ] {
        write(&d, "model.safetensors.index.json", index.as_bytes());
        let e = WeightStore::open(&d).err().unwrap().to_string();
        assert!(
            e.contains(needle) && e.contains("index.json"),
            "{index}: {e}"
        );
    }
    // A directory where a checkpoint file should be.
    let d = tmpdir("dir");
    std::fs::create_dir_all(d.join("model.safetensors")).unwrap();
    let e = WeightStore::open(&d).err().unwrap().to_string();
    assert!(e.contains("is a directory"), "{e}");
    assert!(!e.contains("os error"), "{e}");
}
