//! Named network namespaces under `<state>/netns`, made the way `ip netns add` makes them: a
//! fresh thread unshares CLONE_NEWNET and its `/proc/thread-self/ns/net` is bind-mounted onto
//! a file, which keeps the namespace alive after the thread exits. Removal is umount + unlink
//! and is idempotent.
//!
//! The directory is made a shared mount (again like iproute2) so that a namespace's bind mount
//! is also removed from mount namespaces created after it (a container's), instead of being
//! pinned there and leaking.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

use crate::error::{ErrorKind, HasKind};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("netns {path}: {op}: {source}")]
    Sys {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("netns helper thread panicked")]
    Thread,
}

impl HasKind for NetnsError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Internal
    }
}

fn sys<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(Errno) -> NetnsError + 'a {
    move |e| NetnsError::Sys {
        path: path.to_path_buf(),
        op,
        source: e.into(),
    }
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> NetnsError + 'a {
    move |source| NetnsError::Sys {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Make `dir` exist and be a shared mount point (bind-mounting it onto itself if it is not a
/// mount point yet, as `ip netns` does).
pub fn prepare_dir(dir: &Path) -> Result<(), NetnsError> {
    // Serialised: two pods starting at once must not both see "not a mount point" and stack
    // two bind mounts.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    std::fs::create_dir_all(dir).map_err(io(dir, "mkdir"))?;
    let shared = |d: &Path| {
        mount(
            None::<&str>,
            d,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared(dir) {
        Ok(()) => Ok(()),
        // EINVAL: not a mount point yet. Bind it onto itself, then retry.
        Err(Errno::EINVAL) => {
            mount(
                Some(dir),
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(sys(dir, "bind netns dir onto itself"))?;
            shared(dir).map_err(sys(dir, "make netns dir shared"))
        }
        Err(e) => Err(sys(dir, "make netns dir shared")(e)),
    }
}

/// Unmount the netns directory if no namespace is left in it (graceful shutdown), so a daemon
/// that ran no pods leaves no mount behind.
pub fn release_dir_if_empty(dir: &Path) {
    if list(dir).is_empty() {
        match umount2(dir, MntFlags::MNT_DETACH) {
            Ok(()) => tracing::debug!(dir = %dir.display(), "netns dir unmounted"),
            Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot unmount netns dir"),
        }
    }
}

/// Create a new network namespace pinned at `path`, preparing its directory first (so the
/// shared mount exists only once a pod needs it).
pub fn create(path: &Path) -> Result<(), NetnsError> {
    if let Some(dir) = path.parent() {
        prepare_dir(dir)?;
    }
    create_in_prepared(path)
}

/// Create a new network namespace pinned at `path` (parent directory must exist).
fn create_in_prepared(path: &Path) -> Result<(), NetnsError> {
    // The mount target must be a file; create_new fails if it exists, so two creators of the
    // same name cannot both succeed.
    File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(path, "create file"))?;
    let target = path.to_path_buf();
    let r = std::thread::spawn(move || -> Result<(), NetnsError> {
        // Namespaces are per thread: only this short-lived thread moves, and it exits right
        // after, so no tokio worker ever runs in the new namespace.
        unshare(CloneFlags::CLONE_NEWNET).map_err(sys(&target, "unshare(CLONE_NEWNET)"))?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys(&target, "bind mount ns/net"))
    })
    .join()
    .map_err(|_| NetnsError::Thread)
    .and_then(|r| r);
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Pin the network namespace of process `pid` at `path` (preparing its directory first): how a
/// user-namespaced pod gets its netns. Such a pod's network namespace must be owned by its user
/// namespace (or runc, having joined the user namespace, may not setns into it), so the shim
/// creates it together with the pause's user namespace and crispd pins it afterwards, as
/// containerd does. The result is removed by [`remove`] like a [`create`]d one.
///
/// Refuses a process that is in crispd's own network namespace: CNI would otherwise configure
/// the host's network.
pub fn bind_from_pid(path: &Path, pid: u32) -> Result<(), NetnsError> {
    use std::os::unix::fs::MetadataExt;
    if let Some(dir) = path.parent() {
        prepare_dir(dir)?;
    }
    let source = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let theirs = std::fs::metadata(&source).map_err(io(&source, "stat"))?;
    let ours = std::fs::metadata("/proc/self/ns/net").map_err(io(path, "stat own ns/net"))?;
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return Err(NetnsError::Sys {
            path: source,
            op: "check it is a private network namespace",
            source: std::io::Error::other(format!(
                "process {pid} is in the host's network namespace"
            )),
        });
    }
    File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(path, "create file"))?;
    let r = mount(
        Some(&source),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys(path, "bind mount /proc/<pid>/ns/net"));
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Unmount and unlink; a missing or already unmounted path is success.
pub fn remove(path: &Path) -> Result<(), NetnsError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::ENOENT) | Err(Errno::EINVAL) => {}
        Err(e) => return Err(sys(path, "umount")(e)),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path, "unlink")(e)),
    }
}

/// Whether `path` is a live network namespace (a mounted nsfs file).
pub fn is_netns(path: &Path) -> bool {
    // NSFS_MAGIC: what statfs reports for a namespace file.
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == NSFS_MAGIC)
}

/// Run `f` on a thread that has joined the namespace at `path` (stats, checks, tests).
pub fn run_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let file = File::open(path).map_err(io(path, "open"))?;
    let p = path.to_path_buf();
    std::thread::spawn(move || -> Result<T, NetnsError> {
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(sys(&p, "setns"))?;
        Ok(f())
    })
    .join()
    .map_err(|_| NetnsError::Thread)?
}

/// Brings `lo` up in the namespace at `path`. containerd and CRI-O do this for every pod
/// whatever the CNI config says: a pod's own 127.0.0.1 must work (probes, sidecars, and
/// port-forward, which connects there). A new netns starts with `lo` down.
pub fn loopback_up(path: &Path) -> Result<(), NetnsError> {
    run_in(path, set_lo_up)?.map_err(io(path, "bring lo up"))
}

/// `lo`'s flags | IFF_UP, through the SIOCGIFFLAGS/SIOCSIFFLAGS ioctls on this thread's netns.
fn set_lo_up() -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value (an empty name, no flags).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS writes the named interface's flags into `req`, a valid ifreq we own
    // for the duration of the call; the fd is a live socket.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: after SIOCGIFFLAGS the union holds the flags member.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS only reads `req` (name and flags), valid for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Every file in the netns directory: what recovery compares with the store to find orphans.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These tests create network namespaces and mounts: without root they fail, saying so,
    /// rather than pass having checked nothing.
    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: it creates network namespaces and mounts"
        );
    }

    /// Removes the temp netns dir's mount even if the test fails.
    struct DirMount(PathBuf);
    impl Drop for DirMount {
        fn drop(&mut self) {
            for p in list(&self.0) {
                let _ = remove(&p);
            }
            let _ = umount2(&self.0, MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn create_enter_remove() {
        require_root();
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("netns");
        prepare_dir(&dir).expect("prepare");
        let _guard = DirMount(dir.clone());
        prepare_dir(&dir).expect("prepare is idempotent");
        let p = dir.join("pod1");
        create(&p).expect("create");
        assert!(is_netns(&p));
        assert!(create(&p).is_err(), "second create of the same name fails");
        // The pinned namespace is not ours, and a thread that joins it sees it as its own.
        let ours = std::fs::metadata("/proc/thread-self/ns/net").expect("stat");
        let theirs = std::fs::metadata(&p).expect("stat");
        use std::os::unix::fs::MetadataExt;
        assert_ne!(ours.ino(), theirs.ino());
        let inside = run_in(&p, || {
            std::fs::metadata("/proc/thread-self/ns/net")
                .map(|m| m.ino())
                .unwrap_or(0)
        })
        .expect("run_in");
        assert_eq!(inside, theirs.ino());
        remove(&p).expect("remove");
        assert!(!p.exists());
        remove(&p).expect("remove twice");
    }

    #[test]
    fn bind_from_pid_pins_a_process_netns() {
        require_root();
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("netns");
        prepare_dir(&dir).expect("prepare");
        let _guard = DirMount(dir.clone());
        // Our own process is in the host's network namespace: refused, nothing left.
        let p = dir.join("self");
        assert!(bind_from_pid(&p, std::process::id()).is_err());
        assert!(!p.exists());
        // A child in a new network namespace: pinned, and still there after the child is gone.
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let child = Kill(
            std::process::Command::new("unshare")
                .args(["--net", "sleep", "30"])
                .spawn()
                .expect("spawn unshare"),
        );
        let pid = child.0.id();
        // Wait until unshare has exec'd sleep in the new namespace.
        let own = std::fs::read_link("/proc/self/ns/net").expect("readlink");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .ok()
            .as_ref()
            == Some(&own)
        {
            assert!(std::time::Instant::now() < deadline, "child never unshared");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let q = dir.join("pod");
        bind_from_pid(&q, pid).expect("bind");
        assert!(is_netns(&q));
        assert!(
            bind_from_pid(&q, pid).is_err(),
            "second bind of the same name fails"
        );
        drop(child);
        assert!(is_netns(&q), "pinned past the process");
        remove(&q).expect("remove");
        assert!(!q.exists());
    }
}
