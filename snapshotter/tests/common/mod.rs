//! Shared test helpers: a scratch root that unmounts and removes everything under it on drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use crisp_snapshotter::fsutil;
use crisp_snapshotter::mount::{self, IdmapMode, Mounter};

/// A temporary directory; on drop every mount under it is unmounted (deepest first) and the
/// tree removed with the mount-aware remover, even when the test failed.
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
}

impl Scratch {
    pub fn new(prefix: &str) -> Self {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(std::env::temp_dir()).expect("tempdir");
        Scratch { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap_or(Path::new("/nonexistent"))
    }

    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.path().join(rel);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }

    /// Unmounts everything under the scratch dir.
    pub fn unmount_everything(&self) {
        let m = Mounter::new(IdmapMode::Fd, self.path().join("tmp"));
        for _ in 0..4 {
            let mut mps = mount::mountinfo_paths_under(self.path()).unwrap_or_default();
            if mps.is_empty() {
                break;
            }
            mps.sort();
            for p in mps.iter().rev() {
                let _ = m.unmount_all(p);
            }
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.unmount_everything();
        if let Some(d) = self.dir.take() {
            let p = d.keep();
            if let Err(e) = fsutil::remove_all_no_xdev(&p) {
                eprintln!("scratch cleanup: {e}");
            }
        }
    }
}

/// Unmounts `target` when dropped.
pub struct MountGuard<'a> {
    pub mounter: &'a Mounter,
    pub target: PathBuf,
}

impl Drop for MountGuard<'_> {
    fn drop(&mut self) {
        let _ = self.mounter.unmount_all(&self.target);
    }
}

/// Runs `sh -c script` in a new user namespace with the given maps (each `inside host count`
/// lines, as in /proc/<pid>/uid_map), written from here: no newuidmap needed. The child waits
/// for a line on stdin until the maps are in place.
pub fn run_in_userns(uid_map: &str, gid_map: &str, script: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("unshare")
        .args(["--user", "--", "sh", "-c", &format!("read _go; {script}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn unshare");
    let pid = child.id();
    let mine = std::fs::read_link("/proc/self/ns/user").expect("own userns");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match std::fs::read_link(format!("/proc/{pid}/ns/user")) {
            Ok(ns) if ns != mine => break,
            _ if std::time::Instant::now() > deadline => panic!("child never entered a user namespace"),
            _ => std::thread::sleep(std::time::Duration::from_millis(2)),
        }
    }
    std::fs::write(format!("/proc/{pid}/uid_map"), uid_map).expect("uid_map");
    std::fs::write(format!("/proc/{pid}/gid_map"), gid_map).expect("gid_map");
    child.stdin.take().expect("stdin").write_all(b"go\n").expect("go");
    child.wait_with_output().expect("wait")
}
