//! Builds `pause` (shim/pause/pause.c) as a tiny static binary the shim embeds
//! and runs as each pod's sandbox process, so a pod needs no pause image.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let src = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("pause/pause.c");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("pause");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=CC");
    let cc = env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let status = Command::new(&cc)
        .args(["-static", "-Os", "-s", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{cc} failed to build {} ({s}); gcc and libc6-dev (static libc) are needed, see hack/install-deps.sh", src.display()),
        Err(e) => panic!("cannot run {cc} to build {}: {e}; install gcc and libc6-dev (hack/install-deps.sh)", src.display()),
    }
}
