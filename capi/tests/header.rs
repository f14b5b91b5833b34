//! The committed header is what cbindgen makes of the sources now (the
//! build script writes it to OUT_DIR).

use std::path::Path;

#[test]
fn header_is_current() {
    let made = include_str!(concat!(env!("OUT_DIR"), "/kvsift.h"));
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/kvsift.h");
    if std::env::var_os("KVSIFT_BLESS").is_some() {
        std::fs::write(&path, made).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == made,
        "{} is stale: regenerate it with KVSIFT_BLESS=1 cargo test -p kvsift-c header",
        path.display()
    );
}
