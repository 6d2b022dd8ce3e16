//! Stats and OOM events read from the task's own cgroup (v1 and v2).
//!
//! The cgroup is found from `/proc/<pid>/cgroup` of the task's init process,
//! so what is read is exactly where the runtime put it — which is what the
//! placement function decided.

use std::{
    collections::HashMap,
    fs,
    io::Read,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use containerd_shim_protos::{
    cgroups::metrics as v1, cgroups_v2::metrics as v2, protobuf::well_known_types::any::Any,
};

use tokio::io::unix::AsyncFd;

use crate::events::Named;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("process {0} has no cgroup (it has exited)")]
    NoCgroup(i32),
    #[error("encode metrics: {0}")]
    Encode(String),
    #[error("oom watch on {0}: {1}")]
    Watch(String, String),
    #[error("cgroup placement: {0}: {1}")]
    Place(String, std::io::Error),
}

/// Where a process sits: controller (or "" for the cgroup2 hierarchy) → path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership(pub HashMap<String, String>);

impl Membership {
    pub fn of(pid: i32) -> Result<Membership, CgroupError> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map_err(|_| CgroupError::NoCgroup(pid))?;
        Ok(Self::parse(&text))
    }

    /// Parses `/proc/<pid>/cgroup` (`id:controllers:path` lines).
    pub fn parse(text: &str) -> Membership {
        let mut map = HashMap::new();
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if ctrls.is_empty() {
                map.insert(String::new(), path.to_string());
            }
            for c in ctrls.split(',').filter(|c| !c.is_empty()) {
                let c = c.strip_prefix("name=").unwrap_or(c);
                map.insert(c.to_string(), path.to_string());
            }
        }
        Membership(map)
    }

    /// The directory of a v1 controller's cgroup, if the host mounts it.
    pub fn v1_dir(&self, controller: &str) -> Option<PathBuf> {
        let path = self.0.get(controller)?;
        let dir = Path::new(CGROUP_ROOT)
            .join(controller)
            .join(path.trim_start_matches('/'));
        dir.is_dir().then_some(dir)
    }

    /// The cgroup2 directory when cgroup2 is the unified (only) hierarchy.
    pub fn v2_dir(&self) -> Option<PathBuf> {
        let path = self.0.get("")?;
        if !Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
            return None;
        }
        let dir = Path::new(CGROUP_ROOT).join(path.trim_start_matches('/'));
        dir.is_dir().then_some(dir)
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    let s = fs::read_to_string(path).ok()?;
    let s = s.trim();
    if s == "max" {
        Some(u64::MAX)
    } else {
        s.parse().ok()
    }
}

fn read_kv(path: &Path) -> HashMap<String, u64> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// Metrics of the cgroup `pid` is in, as the Any containerd's CRI plugin decodes.
pub fn stats(pid: i32) -> Result<Any, CgroupError> {
    let m = Membership::of(pid)?;
    if let Some(dir) = m.v2_dir() {
        return pack(&stats_v2(&dir));
    }
    pack(&stats_v1(&m))
}

fn pack<M: Named>(msg: &M) -> Result<Any, CgroupError> {
    // containerd registers these under their bare proto names.
    crate::events::pack("", msg).map_err(|e| CgroupError::Encode(e.to_string()))
}

pub fn stats_v1(m: &Membership) -> v1::Metrics {
    let mut out = v1::Metrics::new();
    if let Some(dir) = m.v1_dir("pids") {
        let mut p = v1::PidsStat::new();
        p.current = read_u64(&dir.join("pids.current")).unwrap_or(0);
        p.limit = read_u64(&dir.join("pids.max"))
            .filter(|v| *v != u64::MAX)
            .unwrap_or(0);
        out.pids = Some(p).into();
    }
    out.cpu = cpu_v1(m.v1_dir("cpuacct"), m.v1_dir("cpu")).into();
    out.memory = m.v1_dir("memory").map(|d| memory_v1(&d)).into();
    out
}

/// cgroup v1 `cpuacct` usage and `cpu` throttling; None without either controller.
fn cpu_v1(cpuacct: Option<PathBuf>, cpu: Option<PathBuf>) -> Option<v1::CPUStat> {
    if cpuacct.is_none() && cpu.is_none() {
        return None;
    }
    let mut c = v1::CPUStat::new();
    if let Some(dir) = &cpuacct {
        let mut u = v1::CPUUsage::new();
        u.total = read_u64(&dir.join("cpuacct.usage")).unwrap_or(0);
        u.user = read_u64(&dir.join("cpuacct.usage_user")).unwrap_or(0);
        u.kernel = read_u64(&dir.join("cpuacct.usage_sys")).unwrap_or(0);
        u.per_cpu = fs::read_to_string(dir.join("cpuacct.usage_percpu"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        c.usage = Some(u).into();
    }
    if let Some(dir) = &cpu {
        let kv = read_kv(&dir.join("cpu.stat"));
        let mut t = v1::Throttle::new();
        t.periods = kv.get("nr_periods").copied().unwrap_or(0);
        t.throttled_periods = kv.get("nr_throttled").copied().unwrap_or(0);
        t.throttled_time = kv.get("throttled_time").copied().unwrap_or(0);
        c.throttling = Some(t).into();
    }
    Some(c)
}

/// cgroup v1 `memory.stat` and the usage/limit/max/failcnt entries.
fn memory_v1(dir: &Path) -> v1::MemoryStat {
    let kv = read_kv(&dir.join("memory.stat"));
    let g = |k: &str| kv.get(k).copied().unwrap_or(0);
    let mut s = v1::MemoryStat::new();
    s.cache = g("cache");
    s.rss = g("rss");
    s.rss_huge = g("rss_huge");
    s.mapped_file = g("mapped_file");
    s.dirty = g("dirty");
    s.writeback = g("writeback");
    s.pg_pg_in = g("pgpgin");
    s.pg_pg_out = g("pgpgout");
    s.pg_fault = g("pgfault");
    s.pg_maj_fault = g("pgmajfault");
    s.inactive_anon = g("inactive_anon");
    s.active_anon = g("active_anon");
    s.inactive_file = g("inactive_file");
    s.active_file = g("active_file");
    s.unevictable = g("unevictable");
    s.hierarchical_memory_limit = g("hierarchical_memory_limit");
    s.hierarchical_swap_limit = g("hierarchical_memsw_limit");
    s.total_cache = g("total_cache");
    s.total_rss = g("total_rss");
    s.total_rss_huge = g("total_rss_huge");
    s.total_mapped_file = g("total_mapped_file");
    s.total_dirty = g("total_dirty");
    s.total_writeback = g("total_writeback");
    s.total_pg_pg_in = g("total_pgpgin");
    s.total_pg_pg_out = g("total_pgpgout");
    s.total_pg_fault = g("total_pgfault");
    s.total_pg_maj_fault = g("total_pgmajfault");
    s.total_inactive_anon = g("total_inactive_anon");
    s.total_active_anon = g("total_active_anon");
    s.total_inactive_file = g("total_inactive_file");
    s.total_active_file = g("total_active_file");
    s.total_unevictable = g("total_unevictable");
    let entry = |prefix: &str| {
        let mut e = v1::MemoryEntry::new();
        e.usage = read_u64(&dir.join(format!("{prefix}usage_in_bytes"))).unwrap_or(0);
        e.limit = read_u64(&dir.join(format!("{prefix}limit_in_bytes"))).unwrap_or(0);
        e.max = read_u64(&dir.join(format!("{prefix}max_usage_in_bytes"))).unwrap_or(0);
        e.failcnt = read_u64(&dir.join(format!("{prefix}failcnt"))).unwrap_or(0);
        e
    };
    s.usage = Some(entry("memory.")).into();
    s.swap = Some(entry("memory.memsw.")).into();
    s.kernel = Some(entry("memory.kmem.")).into();
    s.kernel_tcp = Some(entry("memory.kmem.tcp.")).into();
    s
}

pub fn stats_v2(dir: &Path) -> v2::Metrics {
    let mut out = v2::Metrics::new();
    let mut p = v2::PidsStat::new();
    p.current = read_u64(&dir.join("pids.current")).unwrap_or(0);
    p.limit = read_u64(&dir.join("pids.max"))
        .filter(|v| *v != u64::MAX)
        .unwrap_or(0);
    out.pids = Some(p).into();

    let kv = read_kv(&dir.join("cpu.stat"));
    let g = |k: &str| kv.get(k).copied().unwrap_or(0);
    let mut c = v2::CPUStat::new();
    c.usage_usec = g("usage_usec");
    c.user_usec = g("user_usec");
    c.system_usec = g("system_usec");
    c.nr_periods = g("nr_periods");
    c.nr_throttled = g("nr_throttled");
    c.throttled_usec = g("throttled_usec");
    out.cpu = Some(c).into();

    let kv = read_kv(&dir.join("memory.stat"));
    let g = |k: &str| kv.get(k).copied().unwrap_or(0);
    let mut s = v2::MemoryStat::new();
    s.anon = g("anon");
    s.file = g("file");
    s.kernel_stack = g("kernel_stack");
    s.slab = g("slab");
    s.sock = g("sock");
    s.shmem = g("shmem");
    s.file_mapped = g("file_mapped");
    s.file_dirty = g("file_dirty");
    s.file_writeback = g("file_writeback");
    s.inactive_anon = g("inactive_anon");
    s.active_anon = g("active_anon");
    s.inactive_file = g("inactive_file");
    s.active_file = g("active_file");
    s.unevictable = g("unevictable");
    s.usage = read_u64(&dir.join("memory.current")).unwrap_or(0);
    s.usage_limit = read_u64(&dir.join("memory.max")).unwrap_or(u64::MAX);
    s.swap_usage = read_u64(&dir.join("memory.swap.current")).unwrap_or(0);
    s.swap_limit = read_u64(&dir.join("memory.swap.max")).unwrap_or(u64::MAX);
    out.memory = Some(s).into();

    let ev = read_kv(&dir.join("memory.events"));
    let mut e = v2::MemoryEvents::new();
    e.low = ev.get("low").copied().unwrap_or(0);
    e.high = ev.get("high").copied().unwrap_or(0);
    e.max = ev.get("max").copied().unwrap_or(0);
    e.oom = ev.get("oom").copied().unwrap_or(0);
    e.oom_kill = ev.get("oom_kill").copied().unwrap_or(0);
    out.memory_events = Some(e).into();
    out
}

/// Calls `on_oom` each time the cgroup of `pid` hits an OOM, until the cgroup
/// goes away. v1: an eventfd registered on `memory.oom_control`; v2: the
/// `oom_kill` count in `memory.events`, polled. The watch is a task on the
/// caller's tokio runtime, not a thread: a thread per container cost a stack,
/// a kernel task and a malloc arena for a wait that almost never ends.
pub fn watch_oom(pid: i32, on_oom: impl Fn() + Send + 'static) -> Result<(), CgroupError> {
    let m = Membership::of(pid)?;
    if let Some(dir) = m.v2_dir() {
        watch_v2(dir, on_oom);
        return Ok(());
    }
    let Some(dir) = m.v1_dir("memory") else {
        return Ok(()); // No memory controller: nothing can OOM-kill by cgroup.
    };
    watch_v1(dir, on_oom)
}

fn watch_v1(dir: PathBuf, on_oom: impl Fn() + Send + 'static) -> Result<(), CgroupError> {
    let werr = |e: String| CgroupError::Watch(dir.display().to_string(), e);
    let control =
        fs::File::open(dir.join("memory.oom_control")).map_err(|e| werr(e.to_string()))?;
    // SAFETY: eventfd(2) with valid flags; the result is checked before use.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(werr(std::io::Error::last_os_error().to_string()));
    }
    // SAFETY: `raw` is a fresh eventfd that nothing else owns.
    let efd = unsafe { OwnedFd::from_raw_fd(raw) };
    fs::write(
        dir.join("cgroup.event_control"),
        format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()),
    )
    .map_err(|e| werr(e.to_string()))?;
    // SAFETY: the File owns the eventfd until the AsyncFd drops it, and its
    // as_raw_fd() is that same fd throughout.
    let efd = unsafe { AsyncFd::register(fs::File::from(efd)) }.map_err(|e| werr(e.to_string()))?;
    tokio::spawn(async move {
        let _control = control; // must stay open for the registration
        let mut buf = [0u8; 8];
        loop {
            let Ok(mut ready) = efd.readable().await else {
                return;
            };
            match ready.try_io(|f| (&mut f.get_ref()).read(&mut buf)) {
                Err(_would_block) => continue,
                Ok(Ok(8)) => {}
                Ok(_) => return,
            }
            // The eventfd also fires when the cgroup is removed.
            if !dir.join("memory.oom_control").exists() {
                return;
            }
            on_oom();
        }
    });
    Ok(())
}

fn watch_v2(dir: PathBuf, on_oom: impl Fn() + Send + 'static) {
    let events = dir.join("memory.events");
    let count = |p: &Path| {
        fs::read_to_string(p).ok().map(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .unwrap_or(0)
        })
    };
    tokio::spawn(async move {
        let mut last = count(&events).unwrap_or(0);
        // Polled: a missed wakeup is impossible, and once a second is cheap.
        // A cgroupfs read never waits on a disk, so it is done in place.
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(now) = count(&events) else {
                return;
            };
            if now > last {
                on_oom();
                last = now;
            }
        }
    });
}

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mountpoint: PathBuf,
    /// Its key in [`Membership`]: the first v1 controller (`cpu`), the name of
    /// a named hierarchy (`systemd`), or "" for cgroup2.
    pub key: String,
}

/// The v1 controllers the kernel knows, to tell them from other mount options.
const V1_CONTROLLERS: &[&str] = &[
    "cpuset",
    "cpu",
    "cpuacct",
    "io",
    "blkio",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "perf_event",
    "net_prio",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

/// Every cgroup hierarchy (v1 controllers, named v1 hierarchies such as
/// `name=systemd`, and cgroup2), one per superblock.
pub fn hierarchies() -> Result<Vec<Hierarchy>, CgroupError> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| CgroupError::Read("/proc/self/mountinfo".into(), e))?;
    Ok(parse_hierarchies(&text))
}

fn parse_hierarchies(mountinfo: &str) -> Vec<Hierarchy> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let r: Vec<&str> = right.split_whitespace().collect();
        let fstype = r.first().copied().unwrap_or_default();
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        let f: Vec<&str> = left.split_whitespace().collect();
        let (Some(dev), Some(mountpoint)) = (f.get(2), f.get(4)) else {
            continue;
        };
        // The same hierarchy can be mounted twice (bind mounts); place once.
        if !seen.insert(dev.to_string()) {
            continue;
        }
        let key = if fstype == "cgroup2" {
            String::new()
        } else {
            let opts: Vec<&str> = r.get(2).copied().unwrap_or_default().split(',').collect();
            let ctrl = opts
                .iter()
                .find(|o| V1_CONTROLLERS.contains(o))
                .map(|c| c.to_string());
            let named = opts
                .iter()
                .find_map(|o| o.strip_prefix("name="))
                .map(str::to_string);
            match ctrl.or(named) {
                Some(k) => k,
                None => continue,
            }
        };
        out.push(Hierarchy {
            mountpoint: PathBuf::from(mountpoint.replace("\\040", " ")),
            key,
        });
    }
    out
}

/// The directories of cgroup `path` (as `/proc/<pid>/cgroup` shows it, e.g.
/// `/kubepods/podX/crisp-id`) in every hierarchy, in [`hierarchies`] order:
/// where the shim itself places a process it starts without an OCI runtime.
pub fn dirs_of(path: &str) -> Result<Vec<PathBuf>, CgroupError> {
    let rel = path.trim_start_matches('/');
    Ok(hierarchies()?
        .into_iter()
        .map(|h| h.mountpoint.join(rel))
        .collect())
}

/// The calling thread's own cgroup directory in every hierarchy, in
/// [`hierarchies`] order (None where it cannot be told), so a thread that
/// moved itself can move back.
pub fn current_thread_dirs() -> Result<Vec<Option<PathBuf>>, CgroupError> {
    let text = fs::read_to_string("/proc/thread-self/cgroup")
        .map_err(|e| CgroupError::Read("/proc/thread-self/cgroup".into(), e))?;
    let m = Membership::parse(&text);
    Ok(hierarchies()?
        .into_iter()
        .map(|h| {
            m.0.get(&h.key)
                .map(|p| h.mountpoint.join(p.trim_start_matches('/')))
        })
        .collect())
}

/// Creates each directory (with its missing parents) and moves `pid` into it,
/// as runc's cgroupfs manager does.
pub fn enter(dirs: &[PathBuf], pid: i32) -> Result<(), CgroupError> {
    create(dirs)?;
    add(dirs, pid)
}

/// Moves `pid` (the whole process) into each directory.
pub fn add(dirs: &[PathBuf], pid: i32) -> Result<(), CgroupError> {
    for dir in dirs {
        let procs = dir.join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .map_err(|e| CgroupError::Place(procs.display().to_string(), e))?;
    }
    Ok(())
}

/// Whether `dir` belongs to a cgroup2 hierarchy (only v2 has `cgroup.controllers`).
pub fn is_v2(dir: &Path) -> bool {
    dir.join("cgroup.controllers").exists()
}

/// Moves the calling *thread* (not its process) into the v1 cgroup `dir`.
/// Writing `0` to `tasks` is the one migration the kernel does without the
/// global threadgroup lock (whose RCU grace period costs ~16 ms here), so a
/// throwaway thread moved first and then cloned places a child for free.
pub fn move_current_thread(dir: &Path) -> Result<(), CgroupError> {
    let tasks = dir.join("tasks");
    fs::write(&tasks, "0").map_err(|e| CgroupError::Place(tasks.display().to_string(), e))
}

/// Creates each directory with its missing parents. New cpuset cgroups start
/// with no CPUs or memory nodes in v1, so every directory on the path gets its
/// parent's first (as runc does), including ones that already existed: another
/// shim may have created a shared parent and not yet filled it.
pub fn create(dirs: &[PathBuf]) -> Result<(), CgroupError> {
    let perr = |p: &Path, e| CgroupError::Place(p.display().to_string(), e);
    for dir in dirs {
        match fs::create_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(perr(dir, e)),
        }
        if dir.join("cpuset.cpus").exists() {
            fill_cpuset_path(dir)?;
        }
    }
    Ok(())
}

/// Top-down, copies cpuset.cpus and cpuset.mems into every empty one on the
/// path to `dir`. An unreadable or unwritable file is an error: a cpuset left
/// empty refuses every process later with ENOSPC, far from the cause.
fn fill_cpuset_path(dir: &Path) -> Result<(), CgroupError> {
    let perr = |p: &Path, e| CgroupError::Place(p.display().to_string(), e);
    let chain: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| d.join("cpuset.cpus").exists())
        .collect();
    for d in chain.into_iter().rev() {
        let Some(parent) = d.parent() else { continue };
        if !parent.join("cpuset.cpus").exists() {
            continue; // the hierarchy's root: always filled
        }
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let own = d.join(file);
            let current = fs::read_to_string(&own).map_err(|e| perr(&own, e))?;
            if !current.trim().is_empty() {
                continue;
            }
            let from = parent.join(file);
            let v = fs::read_to_string(&from).map_err(|e| perr(&from, e))?;
            fs::write(&own, v.trim()).map_err(|e| perr(&own, e))?;
        }
    }
    Ok(())
}

/// Removes the (empty) leaf cgroups; parents belong to whoever made them.
/// A cgroup whose last process was just reaped can be busy for a moment.
pub fn remove(dirs: &[PathBuf]) -> Result<(), CgroupError> {
    let mut first_err = None;
    for dir in dirs {
        let mut tries = 0;
        loop {
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => {
                    first_err.get_or_insert(CgroupError::Place(dir.display().to_string(), e));
                    break;
                }
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hybrid_proc_cgroup() {
        let text = "12:memory:/kubepods/pod1/crisp-a\n11:cpu,cpuacct:/kubepods/pod1/crisp-a\n1:name=systemd:/x\n0::/\n";
        let m = Membership::parse(text);
        assert_eq!(
            m.0.get("memory").map(String::as_str),
            Some("/kubepods/pod1/crisp-a")
        );
        assert_eq!(
            m.0.get("cpuacct").map(String::as_str),
            Some("/kubepods/pod1/crisp-a")
        );
        assert_eq!(m.0.get("systemd").map(String::as_str), Some("/x"));
        assert_eq!(m.0.get("").map(String::as_str), Some("/"));
    }

    #[test]
    fn hierarchies_from_mountinfo() {
        let text = "30 24 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
                    31 24 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                    32 24 0:26 / /mnt/memory-again rw - cgroup cgroup rw,memory\n\
                    33 24 0:28 / /proc rw - proc proc rw\n";
        let text = format!(
            "{text}34 24 0:29 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n35 24 0:30 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        );
        let h = |m: &str, k: &str| Hierarchy {
            mountpoint: PathBuf::from(m),
            key: k.into(),
        };
        assert_eq!(
            parse_hierarchies(&text),
            vec![
                h("/sys/fs/cgroup/memory", "memory"),
                h("/sys/fs/cgroup/unified", ""),
                h("/sys/fs/cgroup/systemd", "systemd"),
                h("/sys/fs/cgroup/cpu,cpuacct", "cpu"),
            ]
        );
        // Every hierarchy of this host knows where this thread is.
        assert!(
            current_thread_dirs()
                .expect("own cgroups")
                .iter()
                .all(Option::is_some)
        );
    }

    /// A fake v1 cpuset tree: the root is filled, `a` was made by another
    /// shim that has not filled it yet, `a/b` is ours (the kernel gives it the files).
    fn fake_cpuset_tree() -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().expect("tempdir");
        let leaf = root.path().join("a/b");
        fs::create_dir_all(&leaf).expect("mkdir");
        fs::write(root.path().join("cpuset.cpus"), "0-1\n").expect("write");
        fs::write(root.path().join("cpuset.mems"), "0\n").expect("write");
        for d in [root.path().join("a"), leaf.clone()] {
            fs::write(d.join("cpuset.cpus"), "\n").expect("write");
            fs::write(d.join("cpuset.mems"), "").expect("write");
        }
        (root, leaf)
    }

    #[test]
    fn create_fills_every_empty_cpuset_on_the_path_even_ones_it_did_not_make() {
        let (root, leaf) = fake_cpuset_tree();
        create(std::slice::from_ref(&leaf)).expect("create");
        for d in [root.path().join("a"), leaf] {
            assert_eq!(
                fs::read_to_string(d.join("cpuset.cpus")).expect("read"),
                "0-1"
            );
            assert_eq!(
                fs::read_to_string(d.join("cpuset.mems")).expect("read"),
                "0"
            );
        }
    }

    #[test]
    fn an_unreadable_cpuset_file_is_an_error_not_a_skip() {
        let (root, leaf) = fake_cpuset_tree();
        let mems = root.path().join("a/cpuset.mems");
        fs::remove_file(&mems).expect("rm");
        fs::create_dir(&mems).expect("mkdir in its place");
        let err =
            create(std::slice::from_ref(&leaf)).expect_err("a directory is not a cpuset file");
        assert!(err.to_string().contains("a/cpuset.mems"), "{err}");
    }

    #[test]
    fn stats_of_self_decode() {
        use containerd_shim_protos::protobuf::Message;
        let any = stats(std::process::id() as i32).expect("stats");
        assert!(any.type_url.starts_with("io.containerd.cgroups.v"));
        if any.type_url.ends_with("v1.Metrics") {
            let m = v1::Metrics::parse_from_bytes(&any.value).expect("decode");
            assert!(m.memory.usage.usage > 0 || m.memory.is_none());
        }
    }
}
