//! ListMetricDescriptors and ListPodSandboxMetrics (and its stream): the container metric
//! families kubelet's `/metrics/cadvisor` shows, served by the runtime so kubelet needs no
//! cAdvisor (`PodAndContainerStatsFromCRI`). kubelet turns each descriptor into a Prometheus
//! family with the descriptor's label keys and each metric into a sample with its label
//! values, as given: names and labels are cAdvisor's.
//!
//! - Label keys are cAdvisor's (`container`, `id`, `image`, `name`, `namespace`, `pod`, plus
//!   `cpu` or `interface`), kept sorted, and every metric's values come from one map in the
//!   same order, so keys and values cannot drift apart. `id` is the cgroup path and `name`
//!   the container id, as cAdvisor names containers of a CRI runtime.
//! - Container metrics come from the container's cgroup (v1 or v2, through
//!   `stats::pod::read_cgroup`), its writable layer (the snapshotter) and its start time;
//!   pod metrics (network, per interface but `lo`) from the pause's `/proc/<pid>/net/dev`,
//!   labelled `container="POD"` as cAdvisor labels the pod's network.
//! - CRI values are integers: CPU seconds are whole seconds (as CRI-O reports them), so
//!   kubelet's rate() over them is coarse; the CPU rate with sub-second precision stays in
//!   ListContainerStats.
//!
//! Only running containers of ready pods are listed; a figure whose cgroup file is missing
//! (a controller the host does not mount) is left out of that container's metrics.

use std::collections::BTreeMap;
use std::path::Path;

use crisp_proto::cri::v1::{
    ContainerMetrics, ListMetricDescriptorsResponse, ListPodSandboxMetricsResponse, Metric,
    MetricDescriptor, MetricType, PodSandboxMetrics, UInt64Value,
};

use MetricType::{Counter, Gauge};

use crate::cgroup;
use crate::container::status as containers;
use crate::error::CriError;
use crate::pod::service::PodService;
use crate::stats::pod::{CgroupCounters, NetDev, parse_net_dev_all, pod_cgroup, read_cgroup};
use crate::store::records::{ContainerRecord, ContainerState, PodRecord, PodState};

/// Where a family's samples come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Cpu,
    MemoryUsage,
    WorkingSet,
    Rss,
    Cache,
    OomEvents,
    Processes,
    Threads,
    FsUsage,
    StartTime,
    RxBytes,
    TxBytes,
    RxPackets,
    TxPackets,
    RxErrors,
    TxErrors,
}

struct Family {
    name: &'static str,
    help: &'static str,
    /// A label key beyond the base ones.
    extra: Option<&'static str>,
    kind: MetricType,
    source: Source,
}

const BASE_KEYS: [&str; 6] = ["container", "id", "image", "name", "namespace", "pod"];

const fn family(
    name: &'static str,
    help: &'static str,
    extra: Option<&'static str>,
    kind: MetricType,
    source: Source,
) -> Family {
    Family {
        name,
        help,
        extra,
        kind,
        source,
    }
}

/// cAdvisor's names and help texts.
const FAMILIES: [Family; 16] = [
    family(
        "container_cpu_usage_seconds_total",
        "Cumulative cpu time consumed in seconds.",
        Some("cpu"),
        Counter,
        Source::Cpu,
    ),
    family(
        "container_memory_usage_bytes",
        "Current memory usage in bytes, including all memory regardless of when it was accessed",
        None,
        Gauge,
        Source::MemoryUsage,
    ),
    family(
        "container_memory_working_set_bytes",
        "Current working set in bytes.",
        None,
        Gauge,
        Source::WorkingSet,
    ),
    family(
        "container_memory_rss",
        "Size of RSS in bytes.",
        None,
        Gauge,
        Source::Rss,
    ),
    family(
        "container_memory_cache",
        "Number of bytes of page cache memory.",
        None,
        Gauge,
        Source::Cache,
    ),
    family(
        "container_oom_events_total",
        "Count of out of memory events observed for the container",
        None,
        Counter,
        Source::OomEvents,
    ),
    family(
        "container_processes",
        "Number of processes running inside the container.",
        None,
        Gauge,
        Source::Processes,
    ),
    family(
        "container_threads",
        "Number of threads running inside the container",
        None,
        Gauge,
        Source::Threads,
    ),
    family(
        "container_fs_usage_bytes",
        "Number of bytes that are consumed by the container on this filesystem.",
        None,
        Gauge,
        Source::FsUsage,
    ),
    family(
        "container_start_time_seconds",
        "Start time of the container since unix epoch in seconds.",
        None,
        Gauge,
        Source::StartTime,
    ),
    family(
        "container_network_receive_bytes_total",
        "Cumulative count of bytes received",
        Some("interface"),
        Counter,
        Source::RxBytes,
    ),
    family(
        "container_network_transmit_bytes_total",
        "Cumulative count of bytes transmitted",
        Some("interface"),
        Counter,
        Source::TxBytes,
    ),
    family(
        "container_network_receive_packets_total",
        "Cumulative count of packets received",
        Some("interface"),
        Counter,
        Source::RxPackets,
    ),
    family(
        "container_network_transmit_packets_total",
        "Cumulative count of packets transmitted",
        Some("interface"),
        Counter,
        Source::TxPackets,
    ),
    family(
        "container_network_receive_errors_total",
        "Cumulative count of errors encountered while receiving",
        Some("interface"),
        Counter,
        Source::RxErrors,
    ),
    family(
        "container_network_transmit_errors_total",
        "Cumulative count of errors encountered while transmitting",
        Some("interface"),
        Counter,
        Source::TxErrors,
    ),
];

fn label_keys(f: &Family) -> Vec<String> {
    let mut keys: Vec<String> = BASE_KEYS.iter().map(|k| k.to_string()).collect();
    keys.extend(f.extra.map(String::from));
    keys.sort();
    keys
}

/// Every family this runtime reports: fixed for the daemon's life, as CRI asks.
pub fn list_metric_descriptors() -> ListMetricDescriptorsResponse {
    ListMetricDescriptorsResponse {
        descriptors: FAMILIES
            .iter()
            .map(|f| MetricDescriptor {
                name: f.name.to_string(),
                help: f.help.to_string(),
                label_keys: label_keys(f),
            })
            .collect(),
    }
}

/// The base labels of one container (or of the pod, `container="POD"`).
type Labels = BTreeMap<&'static str, String>;

fn sample(f: &Family, labels: &Labels, extra: Option<&str>, value: u64) -> Metric {
    let mut l = labels.clone();
    if let (Some(k), Some(v)) = (f.extra, extra) {
        l.insert(k, v.to_string());
    }
    Metric {
        name: f.name.to_string(),
        // Gathered now, not cached: CRI asks for 0.
        timestamp: 0,
        metric_type: f.kind as i32,
        label_values: l.into_values().collect(),
        value: Some(UInt64Value { value }),
    }
}

/// What one running container's metrics are made of.
#[derive(Debug, Default, Clone)]
pub struct ContainerFigures {
    pub cgroup: CgroupCounters,
    pub fs_used_bytes: Option<u64>,
    /// Nanoseconds since the epoch.
    pub started_at: i64,
}

/// The container families' samples for one container's figures.
pub fn container_samples(labels: &Labels, fig: &ContainerFigures) -> Vec<Metric> {
    let c = &fig.cgroup;
    let started = (fig.started_at > 0).then_some(fig.started_at as u64 / 1_000_000_000);
    FAMILIES
        .iter()
        .filter_map(|f| {
            let (extra, v) = match f.source {
                Source::Cpu => (Some("total"), c.cpu_usage_ns.map(|ns| ns / 1_000_000_000)),
                Source::MemoryUsage => (None, c.memory_usage),
                Source::WorkingSet => (None, c.working_set),
                Source::Rss => (None, c.rss),
                Source::Cache => (None, c.cache),
                Source::OomEvents => (None, c.oom_kills),
                Source::Processes => (None, c.processes),
                Source::Threads => (None, c.threads),
                Source::FsUsage => (None, fig.fs_used_bytes),
                Source::StartTime => (None, started),
                _ => return None,
            };
            v.map(|v| sample(f, labels, extra, v))
        })
        .collect()
}

/// The pod families' samples: each interface of the pod's network namespace but `lo`.
pub fn pod_samples(labels: &Labels, ifaces: &[NetDev]) -> Vec<Metric> {
    let mut out = Vec::new();
    for i in ifaces.iter().filter(|i| i.name != "lo") {
        for f in &FAMILIES {
            let v = match f.source {
                Source::RxBytes => i.rx_bytes,
                Source::TxBytes => i.tx_bytes,
                Source::RxPackets => i.rx_packets,
                Source::TxPackets => i.tx_packets,
                Source::RxErrors => i.rx_errors,
                Source::TxErrors => i.tx_errors,
                _ => continue,
            };
            out.push(sample(f, labels, Some(&i.name), v));
        }
    }
    out
}

fn labels(container: &str, id: &str, image: &str, name: &str, pod: &PodRecord) -> Labels {
    [
        ("container", container.to_string()),
        ("id", id.to_string()),
        ("image", image.to_string()),
        ("name", name.to_string()),
        ("namespace", pod.namespace.clone()),
        ("pod", pod.name.clone()),
    ]
    .into()
}

async fn container_metrics(
    d: &PodService,
    root: &Path,
    pod: &PodRecord,
    rec: &ContainerRecord,
) -> Result<ContainerMetrics, CriError> {
    let rel = cgroup::container_dir(d.cfg.cgroup_driver.into(), &pod.cgroup_parent, &rec.id)
        .map_err(|e| CriError::context(&format!("container {}", rec.id), e))?;
    let cfg = containers::container_config(rec);
    let name = cfg.metadata.map(|m| m.name).unwrap_or_default();
    let fig = ContainerFigures {
        cgroup: read_cgroup(root, &rel),
        fs_used_bytes: crate::stats::container::writable_layer(&d.ctrs, &rec.id)
            .await
            .and_then(|u| u.used_bytes)
            .map(|u| u.value),
        started_at: rec.started_at,
    };
    let l = labels(&name, &rel, &rec.image, &rec.id, pod);
    Ok(ContainerMetrics {
        container_id: rec.id.clone(),
        metrics: container_samples(&l, &fig),
    })
}

async fn pod_metrics(
    d: &PodService,
    root: &Path,
    pod: &PodRecord,
    ctrs: &[ContainerRecord],
) -> PodSandboxMetrics {
    let mut out = PodSandboxMetrics {
        pod_sandbox_id: pod.id.clone(),
        ..Default::default()
    };
    // The pause's /proc/<pid>/net/dev shows its network namespace without entering it.
    if pod.netns_path.is_some()
        && let Some(pid) = pod.pause_pid
    {
        match std::fs::read_to_string(format!("/proc/{pid}/net/dev")) {
            Ok(text) => {
                let id = pod_cgroup(d, pod).unwrap_or_default();
                let l = labels("POD", &id, "", &pod.id, pod);
                out.metrics = pod_samples(&l, &parse_net_dev_all(&text));
            }
            Err(e) => tracing::warn!(pod_id = %pod.id, pid, error = %e,
                "pod metrics: the pause's net/dev is unreadable; no network metrics"),
        }
    }
    for rec in ctrs.iter().filter(|c| c.pod_id == pod.id) {
        match container_metrics(d, root, pod, rec).await {
            Ok(m) => out.container_metrics.push(m),
            Err(e) => tracing::warn!(container_id = %rec.id, error = %e.message,
                "pod metrics: container left out"),
        }
    }
    out
}

/// Metrics of every ready pod and its running containers, read under cgroup root `root`.
pub async fn list_pod_sandbox_metrics(
    d: &PodService,
    root: &Path,
) -> Result<ListPodSandboxMetricsResponse, CriError> {
    let pods: Vec<PodRecord> = d
        .store
        .list::<PodRecord>()?
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| p.state == PodState::Ready)
        .collect();
    let ctrs: Vec<ContainerRecord> = d
        .store
        .list::<ContainerRecord>()?
        .into_iter()
        .map(|(_, c)| c)
        .filter(|c| c.state == ContainerState::Running)
        .collect();
    let mut pod_metrics_list = Vec::with_capacity(pods.len());
    for pod in &pods {
        pod_metrics_list.push(pod_metrics(d, root, pod, &ctrs).await);
    }
    Ok(ListPodSandboxMetricsResponse {
        pod_metrics: pod_metrics_list,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::tests::fake_root;
    use std::collections::HashSet;

    fn pod() -> PodRecord {
        let mut p = crate::pod::resources::tests::pod("/kp/podu");
        (p.name, p.namespace) = ("web-0".into(), "shop".into());
        p
    }

    fn by_name<'a>(ms: &'a [Metric], name: &str) -> Vec<&'a Metric> {
        ms.iter().filter(|m| m.name == name).collect()
    }

    #[test]
    fn descriptors_have_sorted_cadvisor_labels() {
        let d = list_metric_descriptors().descriptors;
        assert_eq!(d.len(), FAMILIES.len());
        let names: HashSet<&str> = d.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names.len(), d.len(), "unique names");
        for x in &d {
            let mut sorted = x.label_keys.clone();
            sorted.sort();
            assert_eq!(x.label_keys, sorted, "{}", x.name);
            assert!(x.label_keys.contains(&"pod".to_string()));
        }
        let cpu = d
            .iter()
            .find(|x| x.name == "container_cpu_usage_seconds_total");
        assert_eq!(
            cpu.expect("cpu").label_keys,
            [
                "container",
                "cpu",
                "id",
                "image",
                "name",
                "namespace",
                "pod"
            ]
        );
    }

    /// Every family gets a sample from a v2 and a v1 fake cgroup plus a net/dev text, and
    /// each sample's values line up with its descriptor's keys.
    #[test]
    fn every_family_has_samples_from_v1_and_v2() {
        let v2 = fake_root(
            true,
            &[
                ("kp/podu/crisp-c1/cpu.stat", "usage_usec 2500000\n"),
                ("kp/podu/crisp-c1/memory.current", "3000\n"),
                (
                    "kp/podu/crisp-c1/memory.stat",
                    "anon 1000\nfile 1500\ninactive_file 500\n",
                ),
                (
                    "kp/podu/crisp-c1/memory.events",
                    "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n",
                ),
                ("kp/podu/crisp-c1/cgroup.procs", "10\n11\n"),
                ("kp/podu/crisp-c1/cgroup.threads", "10\n11\n12\n"),
            ],
        );
        let v1 = fake_root(
            false,
            &[
                ("cpu,cpuacct/kp/podu/crisp-c1/cpuacct.usage", "2500000000\n"),
                ("memory/kp/podu/crisp-c1/memory.usage_in_bytes", "3000\n"),
                (
                    "memory/kp/podu/crisp-c1/memory.stat",
                    "total_rss 1000\ntotal_cache 1500\ntotal_inactive_file 500\n",
                ),
                (
                    "memory/kp/podu/crisp-c1/memory.oom_control",
                    "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
                ),
                ("memory/kp/podu/crisp-c1/cgroup.procs", "10\n11\n"),
                ("memory/kp/podu/crisp-c1/tasks", "10\n11\n12\n"),
            ],
        );
        let net = "Inter-|   Receive |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop fifo colls carrier compressed\n    lo: 9 9 0 0 0 0 0 0 9 9 0 0 0 0 0 0\n  eth0: 1234 10 1 0 0 0 0 0 5678 20 2 0 0 0 0 0\n";
        let p = pod();
        let keys: BTreeMap<String, Vec<String>> = list_metric_descriptors()
            .descriptors
            .into_iter()
            .map(|d| (d.name, d.label_keys))
            .collect();
        for root in [v2.path(), v1.path()] {
            let fig = ContainerFigures {
                cgroup: read_cgroup(root, "/kp/podu/crisp-c1"),
                fs_used_bytes: Some(4096),
                started_at: 1_700_000_000_500_000_000,
            };
            let l = labels("app", "/kp/podu/crisp-c1", "busybox", "c1", &p);
            let mut all = container_samples(&l, &fig);
            all.extend(pod_samples(
                &labels("POD", "/kp/podu", "", "p1", &p),
                &parse_net_dev_all(net),
            ));
            for f in &FAMILIES {
                assert_eq!(
                    by_name(&all, f.name).len(),
                    1,
                    "{} under {}",
                    f.name,
                    root.display()
                );
            }
            for m in &all {
                assert_eq!(m.label_values.len(), keys[&m.name].len(), "{}", m.name);
            }
            let v = |n: &str| by_name(&all, n)[0].value.as_ref().expect("value").value;
            assert_eq!(v("container_cpu_usage_seconds_total"), 2);
            assert_eq!(v("container_memory_working_set_bytes"), 2500);
            assert_eq!(v("container_memory_rss"), 1000);
            assert_eq!(v("container_memory_cache"), 1500);
            assert_eq!(v("container_oom_events_total"), 1);
            assert_eq!((v("container_processes"), v("container_threads")), (2, 3));
            assert_eq!(v("container_start_time_seconds"), 1_700_000_000);
            assert_eq!(v("container_network_receive_bytes_total"), 1234);
            assert_eq!(v("container_network_transmit_packets_total"), 20);
            assert_eq!(v("container_network_transmit_errors_total"), 2);
            let cpu = by_name(&all, "container_cpu_usage_seconds_total")[0];
            // container, cpu, id, image, name, namespace, pod
            assert_eq!(
                cpu.label_values,
                [
                    "app",
                    "total",
                    "/kp/podu/crisp-c1",
                    "busybox",
                    "c1",
                    "shop",
                    "web-0"
                ]
            );
            let rx = by_name(&all, "container_network_receive_bytes_total")[0];
            assert_eq!(
                rx.label_values,
                ["POD", "/kp/podu", "", "eth0", "p1", "shop", "web-0"]
            );
        }
    }
}
