//! PodSandboxStats and ListPodSandboxStats: CPU, memory and pids of the pod's cgroup (the
//! cgroup parent kubelet gives the pod, as containerd reads it; the pause's own cgroup when the
//! pod has no parent), and network counters of the pod's `eth0` read from the pause process's
//! `/proc/<pid>/net/dev` (which shows its network namespace). cgroup v1 and v2.

use std::collections::HashMap;
use std::path::Path;

use crisp_proto::cri::v1::{
    CpuUsage, LinuxPodSandboxStats, ListPodSandboxStatsRequest, ListPodSandboxStatsResponse,
    MemoryUsage, NetworkInterfaceUsage, NetworkUsage, PodSandboxAttributes, PodSandboxStats,
    PodSandboxStatsRequest, PodSandboxStatsResponse, ProcessUsage, UInt64Value,
};

use crate::cgroup::{parse_flat, v1_dir};
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
    /// Page cache (v1 `total_cache`, v2 `file`).
    pub cache: Option<u64>,
    pub page_faults: Option<u64>,
    pub major_page_faults: Option<u64>,
    /// OOM kills inside the cgroup (v1 `memory.oom_control`, v2 `memory.events` `oom_kill`).
    pub oom_kills: Option<u64>,
    /// Tasks counted by the pids controller (threads included).
    pub pids: Option<u64>,
    /// Processes and threads directly in the cgroup (`cgroup.procs`; v1 `tasks`, v2
    /// `cgroup.threads`), as cAdvisor counts them.
    pub processes: Option<u64>,
    pub threads: Option<u64>,
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn read_flat(p: &Path) -> HashMap<String, u64> {
    std::fs::read_to_string(p)
        .map(|t| parse_flat(&t))
        .unwrap_or_default()
}

fn count_lines(p: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(p).ok()?;
    Some(text.lines().filter(|l| !l.trim().is_empty()).count() as u64)
}

/// Read the counters of the cgroup at `rel` (relative to each hierarchy's root).
pub fn read_cgroup(root: &Path, rel: &str) -> CgroupCounters {
    let rel = rel.trim_start_matches('/');
    if root.join("cgroup.controllers").is_file() {
        return read_v2(&root.join(rel));
    }
    let mut c = CgroupCounters::default();
    if let Some(d) = v1_dir(root, "cpuacct") {
        c.cpu_usage_ns = read_u64(&d.join(rel).join("cpuacct.usage"));
    }
    if let Some(d) = v1_dir(root, "memory") {
        let dir = d.join(rel);
        c.memory_usage = read_u64(&dir.join("memory.usage_in_bytes"));
        let st = read_flat(&dir.join("memory.stat"));
        c.working_set = c
            .memory_usage
            .map(|u| u.saturating_sub(st.get("total_inactive_file").copied().unwrap_or(0)));
        c.rss = st.get("total_rss").copied();
        c.cache = st.get("total_cache").copied();
        c.page_faults = st.get("total_pgfault").copied();
        c.major_page_faults = st.get("total_pgmajfault").copied();
        c.oom_kills = read_flat(&dir.join("memory.oom_control"))
            .get("oom_kill")
            .copied();
        c.processes = count_lines(&dir.join("cgroup.procs"));
        c.threads = count_lines(&dir.join("tasks"));
    }
    if let Some(d) = v1_dir(root, "pids") {
        c.pids = read_u64(&d.join(rel).join("pids.current"));
    }
    c
}

fn read_v2(dir: &Path) -> CgroupCounters {
    let st = read_flat(&dir.join("memory.stat"));
    let memory_usage = read_u64(&dir.join("memory.current"));
    CgroupCounters {
        cpu_usage_ns: read_flat(&dir.join("cpu.stat"))
            .get("usage_usec")
            .map(|u| u * 1000),
        memory_usage,
        working_set: memory_usage
            .map(|u| u.saturating_sub(st.get("inactive_file").copied().unwrap_or(0))),
        rss: st.get("anon").copied(),
        cache: st.get("file").copied(),
        page_faults: st.get("pgfault").copied(),
        major_page_faults: st.get("pgmajfault").copied(),
        oom_kills: read_flat(&dir.join("memory.events"))
            .get("oom_kill")
            .copied(),
        pids: read_u64(&dir.join("pids.current")),
        processes: count_lines(&dir.join("cgroup.procs")),
        threads: count_lines(&dir.join("cgroup.threads")),
    }
}

/// One interface's counters from `/proc/<pid>/net/dev`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NetDev {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
}

/// Every interface of a `/proc/net/dev` text (two header lines, then `name: 16 numbers`).
pub fn parse_net_dev_all(text: &str) -> Vec<NetDev> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (v.len() >= 16).then(|| NetDev {
                name: name.trim().to_string(),
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_errors: v[2],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_errors: v[10],
            })
        })
        .collect()
}

/// One interface's counters from a `/proc/net/dev` text.
pub fn parse_net_dev(text: &str, iface: &str) -> Option<NetworkInterfaceUsage> {
    let d = parse_net_dev_all(text)
        .into_iter()
        .find(|d| d.name == iface)?;
    let u = |x: u64| Some(UInt64Value { value: x });
    Some(NetworkInterfaceUsage {
        name: d.name,
        rx_bytes: u(d.rx_bytes),
        rx_errors: u(d.rx_errors),
        tx_bytes: u(d.tx_bytes),
        tx_errors: u(d.tx_errors),
    })
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
pub fn pod_cgroup(d: &PodService, rec: &PodRecord) -> Option<String> {
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
                ..Default::default()
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
