//! A container's OCI bundle under `<state>/containers/<id>/`: `config.json` (written
//! atomically, so a crash never leaves a torn spec for the shim or for recovery), the stdio
//! FIFOs crispd's log copiers read, and `rootfs/`, where the shim mounts the snapshot.
//!
//! Removal never crosses a mount point: a rootfs still mounted (the shim died before
//! unmounting it) is unmounted first, and the remover refuses to descend into any mount.

use std::io;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("bundle {path}: encoding config.json: {source}")]
    Encode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("bundle {path}: unmounting rootfs: {message}")]
    Unmount { path: PathBuf, message: String },
    #[error("bundle {path}: removing: {message}")]
    Remove { path: PathBuf, message: String },
}

impl crate::error::HasKind for BundleError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Internal
    }
}

/// Where the bundles live.
pub fn containers_dir(state: &Path) -> PathBuf {
    state.join("containers")
}

/// One container's bundle directory.
pub fn dir(state: &Path, container_id: &str) -> PathBuf {
    containers_dir(state).join(container_id)
}

pub fn rootfs(bundle: &Path) -> PathBuf {
    bundle.join("rootfs")
}

pub fn config_path(bundle: &Path) -> PathBuf {
    bundle.join("config.json")
}

/// The FIFO the shim writes the container's stdout (or stderr) to.
pub fn fifo(bundle: &Path, stream: crate::container::logs::Stream) -> PathBuf {
    bundle.join(format!("{}.fifo", stream.as_str()))
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> BundleError + 'a {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Create the bundle directory (0711: the container's mapped root must traverse it to reach
/// its rootfs) and write `config.json`.
pub fn create(bundle: &Path, spec: &Spec) -> Result<(), BundleError> {
    std::fs::create_dir_all(bundle).map_err(io_err(bundle, "create directory"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bundle, std::fs::Permissions::from_mode(0o711))
        .map_err(io_err(bundle, "chmod"))?;
    write_spec(bundle, spec)
}

/// Write `config.json` atomically.
pub fn write_spec(bundle: &Path, spec: &Spec) -> Result<(), BundleError> {
    let bytes = serde_json::to_vec_pretty(spec).map_err(|source| BundleError::Encode {
        path: bundle.to_path_buf(),
        source,
    })?;
    let p = config_path(bundle);
    crate::util::write_volatile(&p, &bytes).map_err(io_err(bundle, "write config.json"))
}

/// The spec as the shim left it (it rewrites cgroupsPath and oomScoreAdj), for status and
/// recovery. None if absent or unreadable.
pub fn read_spec(bundle: &Path) -> Option<serde_json::Value> {
    let bytes = std::fs::read(config_path(bundle)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Unmount the rootfs if something is still mounted there (the shim normally does it at task
/// delete; a dead shim does not). Idempotent.
pub fn unmount_rootfs(bundle: &Path) -> Result<(), BundleError> {
    let r = rootfs(bundle);
    match crisp_snapshotter::fsutil::is_mount_point(&r) {
        Ok(true) => crisp_snapshotter::mount::unmount_all(&r).map_err(|e| BundleError::Unmount {
            path: bundle.to_path_buf(),
            message: e.to_string(),
        }),
        // Absent or not a mount: nothing to do.
        _ => Ok(()),
    }
}

/// Remove the bundle: unmount the rootfs if needed, then delete without crossing mounts.
/// Idempotent.
pub fn remove(bundle: &Path) -> Result<(), BundleError> {
    if std::fs::symlink_metadata(bundle).is_err() {
        return Ok(());
    }
    unmount_rootfs(bundle)?;
    crisp_snapshotter::fsutil::remove_all_no_xdev(bundle).map_err(|e| BundleError::Remove {
        path: bundle.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        let mut s = Spec::default();
        s.set_hostname(Some("h1".into()));
        s
    }

    #[test]
    fn create_writes_config_and_remove_cleans_up() {
        let d = tempfile::tempdir().expect("tempdir");
        let b = dir(d.path(), "c1");
        create(&b, &spec()).expect("create");
        let v = read_spec(&b).expect("spec readable");
        assert_eq!(v["hostname"], "h1");
        // No temp file left beside it.
        let names: Vec<_> = std::fs::read_dir(&b)
            .expect("read_dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["config.json"]);
        // Rewriting replaces the content.
        let mut s2 = spec();
        s2.set_hostname(Some("h2".into()));
        write_spec(&b, &s2).expect("rewrite");
        assert_eq!(read_spec(&b).expect("spec")["hostname"], "h2");

        crate::container::logs::mkfifo(&fifo(&b, crate::container::logs::Stream::Stdout))
            .expect("fifo");
        std::fs::create_dir_all(rootfs(&b).join("etc")).expect("rootfs");
        remove(&b).expect("remove");
        assert!(!b.exists());
        remove(&b).expect("remove is idempotent");
    }

    #[test]
    fn fifo_names_are_per_stream() {
        let b = Path::new("/run/crisp/containers/c1");
        assert_eq!(
            fifo(b, crate::container::logs::Stream::Stdout),
            Path::new("/run/crisp/containers/c1/stdout.fifo")
        );
        assert_eq!(
            fifo(b, crate::container::logs::Stream::Stderr),
            Path::new("/run/crisp/containers/c1/stderr.fifo")
        );
    }
}
