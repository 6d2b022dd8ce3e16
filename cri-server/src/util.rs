//! Small helpers shared by several modules.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Replace a file under the volatile state dir (`--state`, lost on reboot on purpose): readers
/// see the old or the new content (temp file and rename), but nothing is fsynced, because a
/// power loss takes the whole directory, and a crispd crash cannot tear a written page.
pub fn write_volatile(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_file(path, bytes, false)
}

/// Waits until process `pid` exits, at most `limit`; true if it did (or was already gone).
/// Woken by a pidfd at the moment of exit, instead of polling /proc at some interval (a pod's
/// removal waits for its shim this way). Without pidfds (kernel < 5.3) it polls every 2 ms.
pub async fn wait_exit(pid: u32, limit: Duration) -> bool {
    let Ok(fd) = pidfd_open(pid) else {
        let deadline = Instant::now() + limit;
        while process_alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        return !process_alive(pid);
    };
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, which closes it only when dropped.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    };
    let Ok(afd) = registered else {
        return !process_alive(pid);
    };
    // A pidfd polls readable once its process has exited (zombie or reaped).
    matches!(tokio::time::timeout(limit, afd.readable()).await, Ok(Ok(_))) || !process_alive(pid)
}

/// pidfd_open(2): a file descriptor that refers to `pid` (not to a later process reusing it).
fn pidfd_open(pid: u32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, libc::PIDFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether `pid` is running (not gone, not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised comm.
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Write a file so a crash leaves either the old or the new content, never a torn one:
/// temp file in the same directory, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_file(path, bytes, true)
}

/// Temp file beside `path`, then rename over it; `durable` fsyncs the file before the rename
/// and the directory after it. The temp name is unique per write (pid and a counter), so two
/// threads replacing one file never write into each other's temp file.
fn replace_file(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{seq}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp); // a full disk must not also keep the half-written copy
    }
    written?;
    if durable {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Waits for a child, killing it after `timeout`, and returns what it wrote. One thread: a
/// poll(2) on its stdout, stderr and a pidfd wakes at each write and at the exit itself, so a
/// chatty child never blocks on a full pipe and its exit is seen at once. (This was a 5 ms
/// sleep loop beside two reader threads: every CNI call on a pod's start path waited 2.5 ms
/// on average after its plugin had exited.) Output is read to EOF, within the same deadline:
/// a grandchild left holding the pipes is a timeout, not a hang.
pub fn wait_output_timeout(mut child: Child, timeout: Duration) -> io::Result<Output> {
    let deadline = Instant::now() + timeout;
    // Without pidfds (kernel < 5.3) the exit is checked every 5 ms.
    let pidfd = pidfd_open(child.id()).ok();
    let mut pipes = [
        child
            .stdout
            .take()
            .map(|p| std::fs::File::from(std::os::fd::OwnedFd::from(p))),
        child
            .stderr
            .take()
            .map(|p| std::fs::File::from(std::os::fd::OwnedFd::from(p))),
    ];
    let mut bufs = [Vec::new(), Vec::new()];
    let mut status = None;
    loop {
        if status.is_none() {
            status = child.try_wait()?;
        }
        let open = pipes.iter().any(Option::is_some);
        if let (Some(status), false) = (status, open) {
            let [stdout, stderr] = bufs;
            return Ok(Output {
                status,
                stdout,
                stderr,
            });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("timed out after {timeout:?}"),
            ));
        }
        let exit_fd = pidfd.as_ref().filter(|_| status.is_none());
        let tick = if exit_fd.is_none() && status.is_none() {
            left.min(Duration::from_millis(5))
        } else {
            left
        };
        let ready = poll_readable(&pipes, exit_fd, tick)?;
        for ((pipe, buf), ready) in pipes.iter_mut().zip(bufs.iter_mut()).zip(ready) {
            if ready && read_some(pipe, buf)? {
                *pipe = None;
            }
        }
    }
}

/// Which of `pipes` poll(2) finds readable (or hung up) within `wait`; `exit_fd` only wakes it.
fn poll_readable(
    pipes: &[Option<std::fs::File>; 2],
    exit_fd: Option<&std::os::fd::OwnedFd>,
    wait: Duration,
) -> io::Result<[bool; 2]> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut fds = Vec::with_capacity(3);
    let mut at = [None, None];
    for (i, p) in pipes.iter().enumerate() {
        if let Some(f) = p {
            at[i] = Some(fds.len());
            fds.push(PollFd::new(f.as_fd(), PollFlags::POLLIN));
        }
    }
    if let Some(fd) = exit_fd {
        fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
    }
    // Rounded up: a timeout that truncates to 0 ms would spin until the deadline.
    let ms = PollTimeout::try_from(wait + Duration::from_micros(999)).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, ms) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(at.map(|i| i.is_some_and(|i| fds[i].revents().is_some_and(|r| !r.is_empty()))))
}

/// One read from a pipe poll(2) found ready, appended to `buf`; true at EOF.
fn read_some(pipe: &mut Option<std::fs::File>, buf: &mut Vec<u8>) -> io::Result<bool> {
    let Some(f) = pipe.as_mut() else {
        return Ok(true);
    };
    let mut chunk = [0u8; 16 * 1024];
    match f.read(&mut chunk) {
        Ok(0) => Ok(true),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(e) => Err(e),
    }
}

/// Nanoseconds since the Unix epoch, the unit CRI timestamps use.
pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A fresh 64-hex-digit id, like containerd's.
pub fn new_id() -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    format!("{a}{b}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// cgroup v2 only.
    Unified,
    /// cgroup v1 controllers (possibly with a v2 hierarchy beside them).
    Legacy,
}

/// Which cgroup layout is mounted at `root` (normally /sys/fs/cgroup), if any.
pub fn cgroup_mode(root: &Path) -> Option<CgroupMode> {
    if root.join("cgroup.controllers").is_file() {
        Some(CgroupMode::Unified)
    } else if root.join("memory").is_dir() || root.join("cpu").is_dir() {
        Some(CgroupMode::Legacy)
    } else {
        None
    }
}

/// Lower-case hex, for protobuf bytes kept in JSON records.
pub fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// An absolute path that exists, or a name found beside crispd or in PATH.
pub fn find_binary(name: &Path) -> Option<PathBuf> {
    if name.is_absolute() {
        return name.is_file().then(|| name.to_path_buf());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)));
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    beside
        .into_iter()
        .chain(path_dirs.into_iter().map(|d| d.join(name)))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_exit_wakes_at_the_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        assert!(
            !wait_exit(pid, Duration::from_millis(20)).await,
            "sleep 0.2 is still running after 20 ms"
        );
        let t = Instant::now();
        // Not reaped yet: a zombie has exited too.
        assert!(wait_exit(pid, Duration::from_secs(5)).await);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "woken late: {:?}",
            t.elapsed()
        );
        child.wait().expect("reap");
        assert!(
            wait_exit(pid, Duration::from_millis(10)).await,
            "a reaped pid is gone"
        );
    }

    #[test]
    fn atomic_write_replaces() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("f.json");
        write_atomic(&p, b"one").expect("write");
        write_atomic(&p, b"two").expect("write");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        assert_eq!(
            std::fs::read_dir(d.path()).expect("ls").count(),
            1,
            "no temp file left"
        );
    }

    /// Two threads replacing one file: each write lands whole, none fails on the other's temp
    /// file, and no temp file is left.
    #[test]
    fn concurrent_replacements_of_one_file_never_collide() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("hosts");
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let p = &p;
                s.spawn(move || {
                    let body = vec![b'a' + t; 64 * 1024];
                    for i in 0..50 {
                        let w = if i % 2 == 0 {
                            write_volatile
                        } else {
                            write_atomic
                        };
                        w(p, &body).expect("replace");
                    }
                });
            }
        });
        let got = std::fs::read(&p).expect("read");
        assert_eq!(got.len(), 64 * 1024);
        assert!(got.iter().all(|&b| b == got[0]), "a torn file");
        assert_eq!(
            std::fs::read_dir(d.path()).expect("ls").count(),
            1,
            "temp files left"
        );
    }

    #[test]
    fn output_is_whole_when_a_child_fills_both_pipes() {
        // 256 KiB on each stream: four times a pipe's buffer, so a waiter that read only
        // after the exit, or only one stream at a time, would deadlock with the child.
        let script = "head -c 262144 /dev/zero; head -c 262144 /dev/zero >&2; exit 3";
        let child = std::process::Command::new("sh")
            .args(["-c", script])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let out = wait_output_timeout(child, Duration::from_secs(30)).expect("output");
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout.len(), 262_144);
        assert_eq!(out.stderr.len(), 262_144);
    }

    #[test]
    fn timeout_kills() {
        let child = std::process::Command::new("sleep")
            .arg("10")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let start = Instant::now();
        let e = wait_output_timeout(child, Duration::from_millis(100)).expect_err("timeout");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn cgroup_mode_detection() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(cgroup_mode(d.path()), None);
        std::fs::create_dir(d.path().join("memory")).expect("mkdir");
        assert_eq!(cgroup_mode(d.path()), Some(CgroupMode::Legacy));
        std::fs::write(d.path().join("cgroup.controllers"), "cpu memory\n").expect("write");
        assert_eq!(cgroup_mode(d.path()), Some(CgroupMode::Unified));
        // This machine has some cgroup layout.
        assert!(cgroup_mode(Path::new("/sys/fs/cgroup")).is_some());
    }

    #[test]
    fn ids_are_64_hex() {
        let id = new_id();
        assert_eq!(id.len(), 64);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id, new_id());
    }
}
