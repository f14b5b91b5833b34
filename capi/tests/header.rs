//! The committed header is what cbindgen makes of the sources now.

use std::path::Path;

#[test]
fn header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).unwrap();
    let mut made = vec![];
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not read the sources")
        .write(&mut made);
    let path = dir.join("include/kvsift.h");
    if std::env::var_os("KVSIFT_BLESS").is_some() {
        std::fs::write(&path, &made).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == made,
        "{} is stale: regenerate it with KVSIFT_BLESS=1 cargo test -p kvsift-c header",
        path.display()
    );
}
