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
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(std::env::temp_dir())
            .expect("tempdir");
        Scratch { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("/nonexistent"))
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

/// Spawns `cmd` as root of a new user namespace (and, with `new_mount_ns`, a new mount
/// namespace) whose maps (`/proc/<pid>/uid_map` lines) are written from here, so no
/// newuidmap is needed. The forked child unshares, reports its pid, waits for the maps, then
/// becomes uid/gid 0 inside and execs `cmd`.
pub fn spawn_in_userns(
    new_mount_ns: bool,
    uid_map: &str,
    gid_map: &str,
    cmd: &mut std::process::Command,
) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let pipe = || {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two fds into the array we own.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0, "pipe2");
        (fds[0], fds[1])
    };
    let (ready_r, ready_w) = pipe();
    let (go_r, go_w) = pipe();
    let flags = libc::CLONE_NEWUSER | if new_mount_ns { libc::CLONE_NEWNS } else { 0 };
    // SAFETY: the hook runs in the forked child before exec and only makes raw,
    // async-signal-safe syscalls (unshare, getpid, write, read, setres[ug]id, setgroups).
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(flags) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let pid = libc::getpid();
            libc::write(ready_w, (&pid as *const i32).cast(), 4);
            let mut b = 0u8;
            if libc::read(go_r, (&mut b as *mut u8).cast(), 1) != 1 {
                return Err(std::io::Error::other("parent went away"));
            }
            if libc::setresgid(0, 0, 0) != 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresuid(0, 0, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (um, gm) = (uid_map.to_string(), gid_map.to_string());
    let helper = std::thread::spawn(move || {
        let mut pid = 0i32;
        // SAFETY: reading 4 bytes into an i32 we own, from our pipe.
        let n = unsafe { libc::read(ready_r, (&mut pid as *mut i32).cast(), 4) };
        if n == 4 {
            let ok = std::fs::write(format!("/proc/{pid}/uid_map"), &um).is_ok()
                && std::fs::write(format!("/proc/{pid}/gid_map"), &gm).is_ok();
            if ok {
                // SAFETY: one byte to our pipe.
                unsafe { libc::write(go_w, b"g".as_ptr().cast(), 1) };
            }
        }
        // SAFETY: closing the fds this thread owns.
        unsafe {
            libc::close(go_w);
            libc::close(ready_r);
        }
    });
    let child = cmd.spawn();
    // SAFETY: the child has its copies; close ours of the child's ends.
    unsafe {
        libc::close(ready_w);
        libc::close(go_r);
    }
    let _ = helper.join();
    child.expect("spawn in user namespace")
}

/// Runs `sh -c script` as root of a new user namespace with these maps.
pub fn run_in_userns(uid_map: &str, gid_map: &str, script: &str) -> std::process::Output {
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    spawn_in_userns(false, uid_map, gid_map, &mut cmd)
        .wait_with_output()
        .expect("wait")
}
