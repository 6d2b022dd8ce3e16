//! PodSandboxStats and ListPodSandboxStats: CPU, memory and pids of the pod's cgroup (the
//! cgroup parent kubelet gives the pod, as containerd reads it; the pause's own cgroup when the
//! pod has no parent), and network counters of the pod's `eth0` read from the pause process's
//! `/proc/<pid>/net/dev` (which shows its network namespace). cgroup v1 and v2.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crisp_proto::cri::v1::{
    CpuUsage, LinuxPodSandboxStats, ListPodSandboxStatsRequest, ListPodSandboxStatsResponse,
    MemoryUsage, NetworkInterfaceUsage, NetworkUsage, PodSandboxAttributes, PodSandboxStats,
    PodSandboxStatsRequest, PodSandboxStatsResponse, ProcessUsage, UInt64Value,
};

use crate::error::CriError;
use crate::pod::service::PodService;
use crate::store::records::{PodRecord, PodState};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Raw counters of one cgroup.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CgroupCounters {
    pub cpu_usage_ns: Option<u64>,
    pub memory_usage: Option<u64>,
    pub working_set: Option<u64>,
    pub rss: Option<u64>,
    pub page_faults: Option<u64>,
    pub major_page_faults: Option<u64>,
    pub pids: Option<u64>,
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// `key value` lines (memory.stat, cpu.stat).
pub fn parse_flat(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// The v1 hierarchy dir holding `controller` (`cpuacct` may be co-mounted as `cpu,cpuacct`).
fn v1_dir(root: &Path, controller: &str) -> Option<PathBuf> {
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

/// Read the counters of the cgroup at `rel` (relative to each hierarchy's root).
pub fn read_cgroup(root: &Path, rel: &str) -> CgroupCounters {
    let rel = rel.trim_start_matches('/');
    let mut c = CgroupCounters::default();
    if root.join("cgroup.controllers").is_file() {
        // v2
        let dir = root.join(rel);
        let cpu = std::fs::read_to_string(dir.join("cpu.stat"))
            .map(|t| parse_flat(&t))
            .unwrap_or_default();
        c.cpu_usage_ns = cpu.get("usage_usec").map(|u| u * 1000);
        c.memory_usage = read_u64(&dir.join("memory.current"));
        let st = std::fs::read_to_string(dir.join("memory.stat"))
            .map(|t| parse_flat(&t))
            .unwrap_or_default();
        c.working_set = c
            .memory_usage
            .map(|u| u.saturating_sub(st.get("inactive_file").copied().unwrap_or(0)));
        c.rss = st.get("anon").copied();
        c.page_faults = st.get("pgfault").copied();
        c.major_page_faults = st.get("pgmajfault").copied();
        c.pids = read_u64(&dir.join("pids.current"));
        return c;
    }
    if let Some(d) = v1_dir(root, "cpuacct") {
        c.cpu_usage_ns = read_u64(&d.join(rel).join("cpuacct.usage"));
    }
    if let Some(d) = v1_dir(root, "memory") {
        let dir = d.join(rel);
        c.memory_usage = read_u64(&dir.join("memory.usage_in_bytes"));
        let st = std::fs::read_to_string(dir.join("memory.stat"))
            .map(|t| parse_flat(&t))
            .unwrap_or_default();
        c.working_set = c
            .memory_usage
            .map(|u| u.saturating_sub(st.get("total_inactive_file").copied().unwrap_or(0)));
        c.rss = st.get("total_rss").copied();
        c.page_faults = st.get("total_pgfault").copied();
        c.major_page_faults = st.get("total_pgmajfault").copied();
    }
    if let Some(d) = v1_dir(root, "pids") {
        c.pids = read_u64(&d.join(rel).join("pids.current"));
    }
    c
}

/// One interface's counters from a `/proc/net/dev` text.
pub fn parse_net_dev(text: &str, iface: &str) -> Option<NetworkInterfaceUsage> {
    for line in text.lines().skip(2) {
        let (name, rest) = line.split_once(':')?;
        if name.trim() != iface {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() < 16 {
            return None;
        }
        let u = |x: u64| Some(UInt64Value { value: x });
        return Some(NetworkInterfaceUsage {
            name: iface.to_string(),
            rx_bytes: u(v[0]),
            rx_errors: u(v[2]),
            tx_bytes: u(v[8]),
            tx_errors: u(v[10]),
        });
    }
    None
}

/// None for a pod's first sample (no rate yet); the arithmetic is the containers' one.
fn nano_cores(
    samples: &crate::stats::cpu::CpuSamples,
    pod_id: &str,
    now: i64,
    usage: u64,
) -> Option<u64> {
    let prev = samples.record(pod_id, (now, usage))?;
    Some(crate::stats::cpu::nano_cores(Some(prev), (now, usage)))
}

/// The cgroup (relative path) the pod's stats come from.
fn pod_cgroup(d: &PodService, rec: &PodRecord) -> Option<String> {
    use crisp_shim::placement::{self, CgroupDriver};
    let driver = CgroupDriver::from(d.cfg.cgroup_driver);
    if !rec.cgroup_parent.is_empty() && driver == CgroupDriver::Cgroupfs {
        return Some(rec.cgroup_parent.clone());
    }
    let p = placement::cgroup_path(driver, &rec.cgroup_parent, &rec.id).ok()?;
    placement::resolved_path(driver, &p).ok()
}

pub fn stats_of(d: &PodService, rec: &PodRecord) -> PodSandboxStats {
    let cfg = crate::pod::status::pod_config(rec);
    let now = crate::util::now_nanos();
    let u = |x: Option<u64>| x.map(|value| UInt64Value { value });
    let mut linux = LinuxPodSandboxStats::default();
    if let Some(rel) = pod_cgroup(d, rec) {
        let c = read_cgroup(Path::new(CGROUP_ROOT), &rel);
        linux.cpu = Some(CpuUsage {
            timestamp: now,
            usage_core_nano_seconds: u(c.cpu_usage_ns),
            usage_nano_cores: u(c
                .cpu_usage_ns
                .and_then(|v| nano_cores(&d.pod_cpu, &rec.id, now, v))),
            psi: None,
        });
        linux.memory = Some(MemoryUsage {
            timestamp: now,
            working_set_bytes: u(c.working_set),
            available_bytes: None,
            usage_bytes: u(c.memory_usage),
            rss_bytes: u(c.rss),
            page_faults: u(c.page_faults),
            major_page_faults: u(c.major_page_faults),
            psi: None,
        });
        linux.process = Some(ProcessUsage {
            timestamp: now,
            process_count: u(c.pids),
        });
    }
    if rec.state == PodState::Ready
        && rec.netns_path.is_some()
        && let Some(pid) = rec.pause_pid
        && let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
        && let Some(eth0) = parse_net_dev(&text, "eth0")
    {
        linux.network = Some(NetworkUsage {
            timestamp: now,
            default_interface: Some(eth0.clone()),
            interfaces: vec![eth0],
        });
    }
    PodSandboxStats {
        attributes: Some(PodSandboxAttributes {
            id: rec.id.clone(),
            metadata: cfg.metadata.clone(),
            labels: cfg.labels.clone(),
            annotations: cfg.annotations.clone(),
        }),
        linux: Some(linux),
        windows: None,
    }
}

pub fn pod_sandbox_stats(
    d: &PodService,
    req: PodSandboxStatsRequest,
) -> Result<PodSandboxStatsResponse, CriError> {
    let rec = crate::pod::status::find(&d.store, &req.pod_sandbox_id)?;
    Ok(PodSandboxStatsResponse {
        stats: Some(stats_of(d, &rec)),
    })
}

pub fn list_pod_sandbox_stats(
    d: &PodService,
    req: ListPodSandboxStatsRequest,
) -> Result<ListPodSandboxStatsResponse, CriError> {
    let f = req.filter.unwrap_or_default();
    let mut stats = Vec::new();
    let pods = d.store.list::<PodRecord>()?;
    // Forget the samples of pods that no longer exist, so the map does not grow forever.
    let live: std::collections::HashSet<&str> = pods.iter().map(|(id, _)| id.as_str()).collect();
    d.pod_cpu.retain(|id| live.contains(id));
    for (_, rec) in pods {
        if !f.id.is_empty() && !rec.id.starts_with(&f.id) {
            continue;
        }
        // Stats are for running pods, as containerd lists them.
        if rec.state != PodState::Ready {
            continue;
        }
        let cfg = crate::pod::status::pod_config(&rec);
        if !f
            .label_selector
            .iter()
            .all(|(k, v)| cfg.labels.get(k) == Some(v))
        {
            continue;
        }
        stats.push(stats_of(d, &rec));
    }
    Ok(ListPodSandboxStatsResponse { stats })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_eth0() {
        let text = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n  eth0:    1234      10    1    0    0     0          0         0     5678      20    2    0    0     0       0          0\n";
        let u = parse_net_dev(text, "eth0").expect("eth0");
        assert_eq!(u.rx_bytes.map(|v| v.value), Some(1234));
        assert_eq!(u.rx_errors.map(|v| v.value), Some(1));
        assert_eq!(u.tx_bytes.map(|v| v.value), Some(5678));
        assert_eq!(u.tx_errors.map(|v| v.value), Some(2));
        assert!(parse_net_dev(text, "eth1").is_none());
    }

    #[test]
    fn v1_cgroup_counters_from_files() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path();
        let w = |p: &str, s: &str| {
            let p = root.join(p);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, s).expect("write");
        };
        w("cpu,cpuacct/pod/cpuacct.usage", "5000\n");
        w("memory/pod/memory.usage_in_bytes", "1000\n");
        w(
            "memory/pod/memory.stat",
            "total_inactive_file 300\ntotal_rss 600\ntotal_pgfault 7\ntotal_pgmajfault 1\n",
        );
        w("pids/pod/pids.current", "3\n");
        let c = read_cgroup(root, "/pod");
        assert_eq!(
            c,
            CgroupCounters {
                cpu_usage_ns: Some(5000),
                memory_usage: Some(1000),
                working_set: Some(700),
                rss: Some(600),
                page_faults: Some(7),
                major_page_faults: Some(1),
                pids: Some(3),
            }
        );
    }

    #[test]
    fn nano_cores_needs_two_samples() {
        let s = crate::stats::cpu::CpuSamples::default();
        assert_eq!(nano_cores(&s, "x", 1_000_000_000, 0), None);
        // Half a core over one second.
        assert_eq!(
            nano_cores(&s, "x", 2_000_000_000, 500_000_000),
            Some(500_000_000)
        );
        // Another cache (another daemon) has seen nothing yet.
        let other = crate::stats::cpu::CpuSamples::default();
        assert_eq!(nano_cores(&other, "x", 3_000_000_000, 600_000_000), None);
        s.retain(|id| id != "x");
        assert!(s.is_empty());
    }
}
