//! `examples/c/main.c` compiled with the system C compiler against the
//! committed header and the cdylib this test was built with, then run on
//! the tiny model (it checks its own results and exits 0 when all hold).

#[cfg(unix)]
#[test]
fn the_c_example_compiles_links_and_runs() {
    use std::path::Path;
    use std::process::Command;
    if kvsift::testing::gpu().is_none() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Cargo puts the library's cdylib next to the test executables.
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let lib = if cfg!(target_os = "macos") {
        "libkvsift_c.dylib"
    } else {
        "libkvsift_c.so"
    };
    assert!(deps.join(lib).exists(), "no {lib} in {}", deps.display());
    let out = deps.join("kvsift-c-example");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let compiled = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("capi/include"))
        .arg(root.join("examples/c/main.c"))
        .arg("-L")
        .arg(deps)
        .arg("-lkvsift_c")
        .arg(format!("-Wl,-rpath,{}", deps.display()))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("{cc}: {e} (a C compiler is needed; set CC)"));
    assert!(
        compiled.status.success(),
        "{cc} failed:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let run = Command::new(&out)
        .arg(root.join("models/tiny-llama"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the C example failed ({}):\n{stdout}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
    assert!(
        stdout.contains("cancelled") && stdout.contains("expected error"),
        "{stdout}"
    );
}
