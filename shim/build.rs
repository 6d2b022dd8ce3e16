//! Builds `pause` (shim/pause/pause.c) as a tiny static binary the shim embeds
//! and runs as each pod's sandbox process, so a pod needs no pause image.

use std::{env, path::PathBuf, process::Command};

fn main() {
    // The shim is linked as a plain (non-PIE) executable, as containerd's own
    // shims are: a PIE's relocated pointers (vtables, string tables: half a
    // MiB in a debug build) are written at every start, so each shim carried
    // a private copy; without PIE they stay clean pages of the file that all
    // shims share. Code and libraries are still compiled and loaded as usual.
    println!("cargo:rustc-link-arg-bin=containerd-shim-crisp-v2=-no-pie");
    let src =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join("pause/pause.c");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("pause");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=CC");
    let cc = env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let status = Command::new(&cc)
        // No libc (see pause.c): static, not PIE (nothing to relocate), no
        // stack protector or unwind tables to pull runtime support in.
        .args([
            "-static",
            "-nostdlib",
            "-ffreestanding",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-fno-pie",
            "-no-pie",
            "-Os",
            "-s",
            "-Wl,--build-id=none",
            "-Wall",
            "-Werror",
            "-o",
        ])
        .arg(&out)
        .arg(&src)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "{cc} failed to build {} ({s}); gcc is needed, see hack/install-deps.sh",
            src.display()
        ),
        Err(e) => panic!(
            "cannot run {cc} to build {}: {e}; install gcc (hack/install-deps.sh)",
            src.display()
        ),
    }
}
