//! The library is layered bottom up (ARCHITECTURE.md): gpu, then ops, then
//! kv and model (side by side), then engine. A layer may use only the ones
//! below it (and error, rng); tests inside a module may reach further. Needs
//! no GPU.

use std::path::{Path, PathBuf};

/// Each layer and the crate modules its non-test code may name.
const LAYERS: [(&str, &[&str]); 5] = [
    ("gpu", &["gpu"]),
    ("ops", &["gpu", "ops"]),
    ("kv", &["gpu", "ops", "kv"]),
    ("model", &["gpu", "ops", "model"]),
    ("engine", &["gpu", "ops", "kv", "model", "engine"]),
];
/// Modules every layer may use.
const SHARED: [&str; 4] = ["error", "rng", "Error", "Result"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_layer_uses_one_above_it() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut bad = vec![];
    for (layer, allowed) in LAYERS {
        let mut files = vec![];
        rust_files(&src.join(layer), &mut files);
        assert!(!files.is_empty(), "no sources in src/{layer}");
        for f in files {
            // A module's unit tests in their own file may use anything too.
            if f.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap();
            // Unit tests (the module's tail) may use anything.
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            for (i, line) in code.lines().enumerate() {
                let line = line.trim_start();
                if line.starts_with("//") {
                    continue;
                }
                for (at, _) in line.match_indices("crate::") {
                    let name: String = line[at + 7..]
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !allowed.contains(&name.as_str()) && !SHARED.contains(&name.as_str()) {
                        bad.push(format!(
                            "{}:{}: src/{layer} uses crate::{name}",
                            f.strip_prefix(&src).unwrap().display(),
                            i + 1
                        ));
                    }
                }
            }
        }
    }
    assert!(bad.is_empty(), "layering broken:\n{}", bad.join("\n"));
}
