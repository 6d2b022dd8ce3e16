//! The leak check: after a test environment is torn down, nothing it created may remain.
//!
//! It looks only at what the test owns by construction (its root path, its cgroup parent,
//! its bridge and CNI network name, the processes it recorded), so concurrent tests never
//! see each other's leftovers. The helpers that read mounts, cgroups and processes live
//! here too; teardown uses the same ones, so the check and the cleanup agree on what exists.

use std::path::{Path, PathBuf};

/// Everything a test environment created that could outlive it.
#[derive(Debug, Clone, Default)]
pub struct Footprint {
    /// The private root; state dir, socket, CNI config, pod logs all live under it.
    pub root: PathBuf,
    /// The cgroup parent, e.g. `/crisp-e2e-0123abcd`, relative to each hierarchy's root.
    pub cgroup_parent: String,
    /// The bridge interface the test created.
    pub bridge: String,
    /// The CNI network name (libcni caches results in /var/lib/cni/results/<name>-*).
    pub cni_network: String,
    /// The daemon and every shim the test saw.
    pub processes: Vec<ProcRef>,
    /// Files outside the root that the daemon created for us (containerd 1.6 shim sockets
    /// under /run/containerd/s).
    pub outside_files: Vec<PathBuf>,
}

/// A process identified by pid and start time, so a recycled pid is not mistaken for ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcRef {
    pub pid: i32,
    pub start_time: u64,
    pub what: String,
}

impl ProcRef {
    /// Records a live process; `None` if it is already gone.
    pub fn of(pid: i32, what: impl Into<String>) -> Option<Self> {
        let (start_time, _) = proc_stat(pid)?;
        Some(Self {
            pid,
            start_time,
            what: what.into(),
        })
    }

    /// Still running (a zombie counts as gone: it holds nothing but a pid, and its parent
    /// may not be ours to reap it).
    pub fn alive(&self) -> bool {
        matches!(proc_stat(self.pid), Some((t, state)) if t == self.start_time && state != 'Z' && state != 'X')
    }
}

/// (start time in clock ticks, state letter) from /proc/<pid>/stat.
fn proc_stat(pid: i32) -> Option<(u64, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 of the full line is starttime; `rest` starts at field 3.
    let start = fields.get(22 - 3)?.parse().ok()?;
    Some((start, state))
}

/// One line of /proc/self/mountinfo that matters here.
#[derive(Debug, Clone)]
pub struct MountInfo {
    pub root: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub options: String,
}

/// Parses /proc/self/mountinfo (mount points are octal-escaped: `\040` for a space).
pub fn mounts() -> Vec<MountInfo> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some(MountInfo {
                root: unescape(f.get(3)?),
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                fs_type: f.get(sep + 1)?.to_string(),
                options: f.get(sep + 3).map(|s| s.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points at or below `dir`, deepest first (the order to unmount them in).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mounts()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Mount points of every cgroup hierarchy (v1 controllers, named ones like name=systemd,
/// and the cgroup2 one), with the cgroup path each mount shows as its root.
pub fn cgroup_hierarchies() -> Vec<(PathBuf, String)> {
    mounts()
        .into_iter()
        .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
        .map(|m| (m.mount_point, m.root))
        .collect()
}

/// Every existing cgroup directory at or below `parent` in every hierarchy, deepest first.
pub fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    let rel = parent.trim_start_matches('/');
    if rel.is_empty() {
        // Never walk a hierarchy's root: that is the whole host.
        return Vec::new();
    }
    let mut out = Vec::new();
    for (mnt, _) in cgroup_hierarchies() {
        let top = mnt.join(rel);
        if top.is_dir() {
            walk_dirs(&top, &mut out);
        }
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

fn walk_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk_dirs(&e.path(), out);
            }
        }
    }
}

/// Pids of every live process whose command line mentions `needle` (the test's unique root
/// path): the daemon and shims are started with paths under it.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .filter(|pid| matches!(proc_stat(*pid), Some((_, s)) if s != 'Z' && s != 'X'))
        .collect()
}

/// Whether `pid` belongs to a test env: it sits in a cgroup at or below `cgroup_parent`
/// (a container), or its command line names a path under `root_slash` (a daemon or shim).
pub fn process_is_ours(pid: i32, root_slash: &str, cgroup_parent: &str) -> bool {
    let in_cgroup = !cgroup_parent.trim_matches('/').is_empty()
        && std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| {
            c.lines().any(|l| {
                let path = l.splitn(3, ':').nth(2).unwrap_or("");
                path == cgroup_parent || path.starts_with(&format!("{cgroup_parent}/"))
            })
        });
    in_cgroup
        || std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(root_slash))
}

pub fn link_exists(name: &str) -> bool {
    !name.is_empty() && Path::new("/sys/class/net").join(name).exists()
}

/// libcni's result cache files that are ours: named after our network, or (for the
/// `cni-loopback` network containerd adds to every pod) recording a netns under `root`.
/// libcni keeps them in /var/lib/cni/results whatever the runtime's root is, and only a
/// CNI DEL removes them, so a daemon that dies before DEL leaves them behind.
pub fn cni_cache_files(network: &str, root: &Path) -> Vec<PathBuf> {
    let prefix = format!("{network}-");
    let root = format!("{}/", root.display());
    let Ok(rd) = std::fs::read_dir("/var/lib/cni/results") else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| {
            (!network.is_empty() && e.file_name().to_string_lossy().starts_with(&prefix))
                || (root.len() > 1
                    && std::fs::read_to_string(e.path()).is_ok_and(|c| c.contains(&root)))
        })
        .map(|e| e.path())
        .collect()
}

/// Lists what is left of `fp`. Empty means clean.
pub fn check(fp: &Footprint) -> Vec<String> {
    let mut leaks = Vec::new();
    let root = fp.root.to_string_lossy().into_owned();
    for m in mounts()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(&fp.root))
    {
        leaks.push(format!("mount {} ({})", m.mount_point.display(), m.fs_type));
    }
    for d in cgroup_dirs(&fp.cgroup_parent) {
        leaks.push(format!("cgroup {}", d.display()));
    }
    for p in fp.processes.iter().filter(|p| p.alive()) {
        leaks.push(format!("process {} ({})", p.pid, p.what));
    }
    if !root.is_empty() {
        let root = format!("{root}/");
        for pid in processes_mentioning(&root) {
            if !fp.processes.iter().any(|p| p.pid == pid) {
                leaks.push(format!("process {pid} whose command line mentions {root}"));
            }
        }
    }
    if link_exists(&fp.bridge) {
        leaks.push(format!("bridge {}", fp.bridge));
    }
    for f in cni_cache_files(&fp.cni_network, &fp.root) {
        leaks.push(format!("CNI cache file {}", f.display()));
    }
    for f in fp.outside_files.iter().filter(|f| f.exists()) {
        leaks.push(format!("file {}", f.display()));
    }
    if fp.root.exists() {
        leaks.push(format!("test root {}", fp.root.display()));
    }
    leaks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }

    #[test]
    fn knows_our_own_process() {
        let me = ProcRef::of(std::process::id() as i32, "me").unwrap();
        assert!(me.alive());
        let stale = ProcRef {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!stale.alive());
    }

    #[test]
    fn a_stranger_is_not_ours() {
        let me = std::process::id() as i32;
        assert!(!process_is_ours(
            me,
            "/nonexistent-crisp-root/",
            "/crisp-e2e-nothere"
        ));
        assert!(!process_is_ours(me, "/nonexistent-crisp-root/", "/"));
    }

    #[test]
    fn empty_cgroup_parent_is_never_walked() {
        assert!(cgroup_dirs("/").is_empty());
        assert!(cgroup_dirs("").is_empty());
    }
}
