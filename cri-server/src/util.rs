//! Small helpers shared by several modules.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Write a file so a crash leaves either the old or the new content, never a torn one:
/// temp file in the same directory, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Wait for a child, killing it after `timeout`. Output is read on threads so a chatty child
/// never blocks on a full pipe.
pub fn wait_output_timeout(mut child: Child, timeout: Duration) -> io::Result<Output> {
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut v);
        }
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut v);
        }
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("timed out after {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
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
