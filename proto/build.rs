//! Generates Rust from the vendored protos with `protoc` (Debian's protobuf-compiler).
//! The CRI api.proto is Kubernetes 1.36's (cri-api v0.36.3); the containerd protos come
//! from containerd's api module, as containerd-client vendors them.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let vendor = Path::new("vendor");
    let cri_rel = "k8s.io/cri-api/pkg/apis/runtime/v1/api.proto";
    let snapshots_rel =
        "github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto";
    println!("cargo:rerun-if-changed=vendor");

    // Debian 12's protoc (3.21) predates the `debug_redact` field option (protobuf 22) that
    // Kubernetes marks credentials with. It only affects how generated Go code logs a value,
    // so the vendored file stays pristine and a copy without the option is compiled.
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("protos");
    let cri_out = out.join(cri_rel);
    std::fs::create_dir_all(cri_out.parent().ok_or("no parent")?)?;
    let cri = std::fs::read_to_string(vendor.join(cri_rel))?;
    std::fs::write(&cri_out, cri.replace(" [debug_redact = true]", ""))?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &[cri_out, vendor.join(snapshots_rel)],
            &[out, vendor.to_path_buf()],
        )?;
    Ok(())
}
