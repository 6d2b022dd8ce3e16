//! A cgroup's files, v1 or v2: where they are under a cgroup root, which cgroup a pod or a
//! container is (from the one placement function), reading and writing them with errors that
//! name the file. `limits` writes and reads back CPU and memory limits; the figures the stats
//! calls report are read by `stats/` through [`Hierarchy::dir`].
//!
//! The root is a parameter (normally `/sys/fs/cgroup`), so unit tests run both versions over
//! a fake tree of plain files.

pub mod limits;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use crisp_shim::placement::{self, CgroupDriver};

use crate::error::{ErrorKind, HasKind};

pub const HOST_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("{path}: {text:?} is not a number")]
    Parse { path: PathBuf, text: String },
    #[error("no cgroup v1 hierarchy with the {controller} controller under {root}")]
    NoController { controller: String, root: PathBuf },
    #[error("{limit} is below the {usage} bytes cgroup {rel} uses now")]
    BelowUsage { limit: i64, usage: u64, rel: String },
    #[error("cgroup placement: {0}")]
    Placement(#[from] placement::PlacementError),
}

impl HasKind for CgroupError {
    fn kind(&self) -> ErrorKind {
        match self {
            // The cgroup is gone: its task or pod ended meanwhile.
            CgroupError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            // The kernel refused the value for the cgroup's present state (EBUSY: a v1 memory
            // limit it could not reclaim down to; EINVAL: a quota the parent does not allow).
            CgroupError::Write { source, .. }
                if matches!(source.raw_os_error(), Some(libc::EBUSY | libc::EINVAL)) =>
            {
                ErrorKind::FailedPrecondition
            }
            CgroupError::BelowUsage { .. } => ErrorKind::FailedPrecondition,
            CgroupError::Placement(_) => ErrorKind::InvalidArgument,
            _ => ErrorKind::Internal,
        }
    }
}

/// The cgroup tree mounted at a root, v1 (one hierarchy per controller) or v2 (unified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    root: PathBuf,
    v2: bool,
}

impl Hierarchy {
    pub fn at(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            v2: root.join("cgroup.controllers").is_file(),
        }
    }

    pub fn host() -> Self {
        Self::at(Path::new(HOST_ROOT))
    }

    pub fn is_v2(&self) -> bool {
        self.v2
    }

    /// The directory of cgroup `rel` (relative to each hierarchy's root, as
    /// `/proc/<pid>/cgroup` shows it) holding `controller`'s files.
    pub fn dir(&self, controller: &str, rel: &str) -> Result<PathBuf, CgroupError> {
        let rel = rel.trim_start_matches('/');
        if self.v2 {
            return Ok(self.root.join(rel));
        }
        v1_dir(&self.root, controller)
            .map(|d| d.join(rel))
            .ok_or_else(|| CgroupError::NoController {
                controller: controller.to_string(),
                root: self.root.clone(),
            })
    }
}

/// The v1 hierarchy dir holding `controller` (`cpuacct` may be co-mounted as `cpu,cpuacct`).
pub fn v1_dir(root: &Path, controller: &str) -> Option<PathBuf> {
    let direct = root.join(controller);
    if direct.is_dir() {
        return Some(direct);
    }
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.split(',').any(|c| c == controller))
        })
}

pub fn read_string(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

pub fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let text = read_string(path)?;
    text.trim().parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        text: text.trim().to_string(),
    })
}

pub fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// `key value` lines (memory.stat, cpu.stat, memory.events, memory.oom_control).
pub fn parse_flat(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// The pod-level cgroup (relative path): the cgroup parent kubelet gives the pod, which all
/// its containers sit under. None when the pod has no parent (crictl without one): then each
/// container's cgroup hangs off the root and there is no pod-level cgroup.
pub fn pod_dir(driver: CgroupDriver, parent: &str) -> Result<Option<String>, CgroupError> {
    let parent = parent.trim();
    if parent.is_empty() || parent == "/" {
        return Ok(None);
    }
    Ok(Some(match driver {
        CgroupDriver::Cgroupfs => placement::resolved_path(driver, parent)?,
        CgroupDriver::Systemd => {
            let slice = parent
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or("");
            placement::expand_slice(slice)?
        }
    }))
}

/// A container's cgroup (relative path), where the placement function put it.
pub fn container_dir(driver: CgroupDriver, parent: &str, id: &str) -> Result<String, CgroupError> {
    let p = placement::cgroup_path(driver, parent, id)?;
    Ok(placement::resolved_path(driver, &p)?)
}

/// Memory in use by the cgroup now, as the kernel compares it with a new limit
/// (v1 `memory.usage_in_bytes`, v2 `memory.current`).
pub fn memory_usage(h: &Hierarchy, rel: &str) -> Result<u64, CgroupError> {
    let dir = h.dir("memory", rel)?;
    read_u64(&dir.join(if h.is_v2() {
        "memory.current"
    } else {
        "memory.usage_in_bytes"
    }))
}

/// Refuse a memory limit below what cgroup `rel` uses now: on v2 the kernel would OOM-kill
/// the container to get there, on v1 it would reclaim hard and then fail with EBUSY. A limit
/// of 0 (none) or above the usage passes.
pub fn check_memory_limit(h: &Hierarchy, rel: &str, limit: i64) -> Result<(), CgroupError> {
    if limit <= 0 {
        return Ok(());
    }
    let usage = memory_usage(h, rel)?;
    if (limit as u64) < usage {
        return Err(CgroupError::BelowUsage {
            limit,
            usage,
            rel: rel.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fake cgroup root: `files` are (path relative to root, content).
    pub fn fake_root(v2: bool, files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        if v2 {
            std::fs::write(d.path().join("cgroup.controllers"), "cpu memory pids\n")
                .expect("write");
        }
        for (p, s) in files {
            let p = d.path().join(p);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, s).expect("write");
        }
        d
    }

    #[test]
    fn dirs_of_each_version() {
        let v1 = fake_root(
            false,
            &[("cpu,cpuacct/p/cpu.shares", "2\n"), ("memory/p/x", "")],
        );
        let h = Hierarchy::at(v1.path());
        assert!(!h.is_v2());
        assert_eq!(
            h.dir("cpu", "/p").expect("cpu"),
            v1.path().join("cpu,cpuacct/p")
        );
        assert_eq!(
            h.dir("memory", "p").expect("mem"),
            v1.path().join("memory/p")
        );
        let e = h.dir("cpuset", "/p").expect_err("no cpuset");
        assert!(e.to_string().contains("cpuset"), "{e}");
        let v2 = fake_root(true, &[]);
        let h = Hierarchy::at(v2.path());
        assert!(h.is_v2());
        assert_eq!(h.dir("memory", "/a/b").expect("dir"), v2.path().join("a/b"));
    }

    #[test]
    fn pod_and_container_dirs_come_from_placement() {
        let fs = CgroupDriver::Cgroupfs;
        assert_eq!(pod_dir(fs, "").expect("ok"), None);
        assert_eq!(
            pod_dir(fs, "/kubepods/burstable/podx/").expect("ok"),
            Some("/kubepods/burstable/podx".to_string())
        );
        assert_eq!(
            pod_dir(CgroupDriver::Systemd, "kubepods-burstable-podx.slice").expect("ok"),
            Some("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podx.slice".into())
        );
        assert_eq!(
            container_dir(fs, "/kubepods/podx", "abc").expect("ok"),
            "/kubepods/podx/crisp-abc"
        );
    }

    #[test]
    fn read_errors_name_the_file() {
        let d = fake_root(false, &[("memory/p/memory.usage_in_bytes", "lots\n")]);
        let h = Hierarchy::at(d.path());
        let e = memory_usage(&h, "/p").expect_err("not a number");
        assert!(e.to_string().contains("memory.usage_in_bytes"), "{e}");
        let e = memory_usage(&h, "/gone").expect_err("missing");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let d = fake_root(true, &[("p/memory.current", "4096\n")]);
        assert_eq!(
            memory_usage(&Hierarchy::at(d.path()), "/p").expect("v2"),
            4096
        );
    }

    #[test]
    fn a_limit_below_usage_is_refused() {
        let d = fake_root(true, &[("p/memory.current", "8192\n")]);
        let h = Hierarchy::at(d.path());
        check_memory_limit(&h, "/p", 0).expect("no limit");
        check_memory_limit(&h, "/p", 8192).expect("equal");
        let e = check_memory_limit(&h, "/p", 4096).expect_err("below");
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        let m = e.to_string();
        assert!(
            m.contains("4096") && m.contains("8192") && m.contains("/p"),
            "{m}"
        );
    }
}
