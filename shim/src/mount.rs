//! Rootfs mounts.
//!
//! `crisp_snapshotter::mount` is the only code allowed to mount layers; until
//! it lands in the workspace this is a thin stand-in with the same shape
//! (`Mount { typ, source, target, options }`, `mount_all`, `unmount_all`) so the
//! swap is a one-line `use` change. It handles what containerd's snapshotters
//! hand a shim: `overlay` and (r)bind mounts.

use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mount {
    pub typ: String,
    pub source: String,
    /// Sub-path under the target passed to [`mount_all`]; empty means the target itself.
    pub target: String,
    pub options: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount {typ} {src} on {target}: {err}")]
    Mount { typ: String, src: String, target: String, err: nix::Error },
    #[error("unmount {target}: {err}")]
    Unmount { target: String, err: nix::Error },
    #[error("mount target {0}: {1}")]
    Target(String, std::io::Error),
}

/// Splits fstab options into mount(2) flags and the filesystem's data string.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "remount" => flags |= MsFlags::MS_REMOUNT,
            "defaults" | "async" | "suid" | "dev" | "exec" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<(), MountError> {
    for m in mounts {
        let dest = if m.target.is_empty() { target.to_path_buf() } else { target.join(m.target.trim_start_matches('/')) };
        std::fs::create_dir_all(&dest).map_err(|e| MountError::Target(dest.display().to_string(), e))?;
        let (mut flags, data) = parse_options(&m.options);
        let bind = matches!(m.typ.as_str(), "bind" | "rbind") || flags.contains(MsFlags::MS_BIND);
        if m.typ == "rbind" {
            flags |= MsFlags::MS_BIND | MsFlags::MS_REC;
        } else if m.typ == "bind" {
            flags |= MsFlags::MS_BIND;
        }
        let err = |err| MountError::Mount { typ: m.typ.clone(), src: m.source.clone(), target: dest.display().to_string(), err };
        if bind {
            nix::mount::mount(Some(m.source.as_str()), &dest, None::<&str>, flags & !MsFlags::MS_RDONLY, None::<&str>).map_err(err)?;
            // A bind ignores MS_RDONLY the first time; read-only takes a remount.
            if flags.contains(MsFlags::MS_RDONLY) {
                let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
                nix::mount::mount(None::<&str>, &dest, None::<&str>, ro, None::<&str>).map_err(err)?;
            }
        } else {
            let data_opt = (!data.is_empty()).then_some(data.as_str());
            nix::mount::mount(Some(m.source.as_str()), &dest, Some(m.typ.as_str()), flags, data_opt).map_err(err)?;
        }
    }
    Ok(())
}

/// Unmounts everything stacked on `target` (lazily, so a busy mount cannot make
/// the caller fall back to deleting files), and never removes anything.
pub fn unmount_all(target: &Path) -> Result<(), MountError> {
    for _ in 0..64 {
        match nix::mount::umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => return Ok(()),
            Err(err) => return Err(MountError::Unmount { target: target.display().to_string(), err }),
        }
    }
    Ok(())
}

/// Converts containerd's task mounts.
pub fn from_proto(mounts: &[containerd_shim_protos::api::Mount]) -> Vec<Mount> {
    mounts
        .iter()
        .map(|m| Mount { typ: m.type_.clone(), source: m.source.clone(), target: m.target.clone(), options: m.options.clone() })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let opts: Vec<String> = ["ro", "index=off", "lowerdir=/a:/b", "nosuid"].iter().map(|s| s.to_string()).collect();
        let (flags, data) = parse_options(&opts);
        assert!(flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_NOSUID));
        assert_eq!(data, "index=off,lowerdir=/a:/b");
    }

    #[test]
    fn bind_mount_and_unmount() {
        let src = tempfile::tempdir().expect("src");
        std::fs::write(src.path().join("f"), b"x").expect("write");
        let dst = tempfile::tempdir().expect("dst");
        let m = Mount { typ: "bind".into(), source: src.path().display().to_string(), target: String::new(), options: vec!["rbind".into(), "ro".into()] };
        mount_all(&[m], dst.path()).expect("mount");
        assert!(dst.path().join("f").exists());
        assert!(std::fs::write(dst.path().join("g"), b"y").is_err(), "read-only bind is writable");
        unmount_all(dst.path()).expect("unmount");
        assert!(!dst.path().join("f").exists());
        assert!(src.path().join("f").exists());
    }
}
