//! Rootfs mounts: `crisp_snapshotter::mount` is the only code allowed to mount
//! layers (idmapped layers take its safe, fd-based path), so the shim only
//! converts containerd's task mounts into its `Mount`s.

pub use crisp_snapshotter::mount::{Mount, MountError, mount_all, unmount_all};

/// Converts the mounts of a create request.
pub fn from_proto(mounts: &[containerd_shim_protos::api::Mount]) -> Vec<Mount> {
    mounts
        .iter()
        .map(|m| Mount {
            typ: m.type_.clone(),
            source: m.source.clone(),
            target: m.target.clone(),
            options: m.options.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_bind_rootfs_mounts_and_unmounts() {
        let src = tempfile::tempdir().expect("src");
        std::fs::write(src.path().join("f"), b"x").expect("write");
        let dst = tempfile::tempdir().expect("dst");
        let proto = containerd_shim_protos::api::Mount {
            type_: "bind".into(),
            source: src.path().display().to_string(),
            options: vec!["rbind".into(), "ro".into()],
            ..Default::default()
        };
        mount_all(&from_proto(&[proto]), dst.path()).expect("mount");
        assert!(dst.path().join("f").exists());
        assert!(
            std::fs::write(dst.path().join("g"), b"y").is_err(),
            "read-only bind is writable"
        );
        unmount_all(dst.path()).expect("unmount");
        assert!(!dst.path().join("f").exists());
        assert!(src.path().join("f").exists());
    }
}
