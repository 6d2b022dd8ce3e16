//! ContainerStats and ListContainerStats.
//!
//! CPU and memory come from the pod's shim (task Stats: the container's cgroup as containerd's
//! cgroups v1 or v2 `Metrics`, in an Any), converted the way containerd's CRI plugin converts
//! them so kubelet sees the same numbers: working set = usage − inactive file pages, available
//! = limit − working set (0 when unlimited), CPU nano-cores from the difference between this
//! sample and the previous one of the same container. The writable layer's usage is the
//! container's active snapshot, measured by the snapshotter. A container without a running
//! task (created, exited) has no cgroup to read: its stats carry attributes and the writable
//! layer only.

use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim_protos::api;
use containerd_shim_protos::cgroups::metrics as v1;
use containerd_shim_protos::cgroups_v2::metrics as v2;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use crisp_proto::cri::v1::{
    ContainerAttributes, ContainerFilter, ContainerStats, ContainerStatsRequest,
    ContainerStatsResponse, CpuUsage, FilesystemIdentifier, FilesystemUsage,
    ListContainerStatsRequest, ListContainerStatsResponse, MemoryUsage, SwapUsage, UInt64Value,
};

use crate::container::exec::task_error;
use crate::container::service::ContainerService;
use crate::container::status as containers;
use crate::error::CriError;
use crate::shim::client::ctx;
use crate::shim::client::is_not_found;
use crate::stats::cpu::nano_cores;
use crate::store::records::{ContainerRecord, ContainerState};

const STATS_CALL: std::time::Duration = std::time::Duration::from_secs(10);

/// Above this a memory limit means "none" (the kernel rounds the unlimited value down, so it
/// is not exactly u64::MAX); containerd and cAdvisor use the same bound.
const UNLIMITED: u64 = 1 << 62;

/// One container's cgroup figures, decoded from either cgroup version.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Decoded {
    /// Cumulative CPU time, nanoseconds.
    pub cpu_ns: Option<u64>,
    pub memory: Option<MemoryUsage>,
    pub swap: Option<SwapUsage>,
}

fn u64v(value: u64) -> Option<UInt64Value> {
    Some(UInt64Value { value })
}

/// Decode the Any a shim's Stats returns (`io.containerd.cgroups.v1.Metrics` or `.v2.`).
pub fn decode(any: &Any, ts: i64) -> Result<Decoded, String> {
    let url = any.type_url.as_str();
    if url.ends_with("cgroups.v1.Metrics") {
        let m = v1::Metrics::parse_from_bytes(&any.value).map_err(|e| format!("{url}: {e}"))?;
        Ok(from_v1(&m, ts))
    } else if url.ends_with("cgroups.v2.Metrics") {
        let m = v2::Metrics::parse_from_bytes(&any.value).map_err(|e| format!("{url}: {e}"))?;
        Ok(from_v2(&m, ts))
    } else {
        Err(format!("unknown metrics type {url:?}"))
    }
}

fn available(limit: u64, working_set: u64) -> u64 {
    if limit > UNLIMITED {
        0
    } else {
        limit.saturating_sub(working_set)
    }
}

pub fn from_v1(m: &v1::Metrics, ts: i64) -> Decoded {
    let cpu_ns = m
        .cpu
        .as_ref()
        .and_then(|c| c.usage.as_ref())
        .map(|u| u.total);
    let (memory, swap) = match m.memory.as_ref() {
        Some(mem) if mem.usage.is_some() => {
            let usage = mem.usage.usage;
            // Hierarchical (total_*) figures: the container's cgroup and any below it.
            let ws = usage.saturating_sub(mem.total_inactive_file);
            let memory = MemoryUsage {
                timestamp: ts,
                working_set_bytes: u64v(ws),
                available_bytes: u64v(available(mem.usage.limit, ws)),
                usage_bytes: u64v(usage),
                rss_bytes: u64v(mem.total_rss),
                page_faults: u64v(mem.total_pg_fault),
                major_page_faults: u64v(mem.total_pg_maj_fault),
                psi: None,
            };
            // memsw counts memory + swap together.
            let swap = mem.swap.as_ref().filter(|s| s.usage > 0).map(|s| {
                let used = s.usage.saturating_sub(usage);
                SwapUsage {
                    timestamp: ts,
                    swap_usage_bytes: u64v(used),
                    swap_available_bytes: u64v(if s.limit > UNLIMITED {
                        0
                    } else {
                        s.limit.saturating_sub(s.usage)
                    }),
                }
            });
            (Some(memory), swap)
        }
        _ => (None, None),
    };
    Decoded {
        cpu_ns,
        memory,
        swap,
    }
}

pub fn from_v2(m: &v2::Metrics, ts: i64) -> Decoded {
    let cpu_ns = m.cpu.as_ref().map(|c| c.usage_usec.saturating_mul(1000));
    let (memory, swap) = match m.memory.as_ref() {
        Some(mem) => {
            let ws = mem.usage.saturating_sub(mem.inactive_file);
            let memory = MemoryUsage {
                timestamp: ts,
                working_set_bytes: u64v(ws),
                available_bytes: u64v(available(mem.usage_limit, ws)),
                usage_bytes: u64v(mem.usage),
                // anon, as cAdvisor reports RSS on cgroup v2.
                rss_bytes: u64v(mem.anon),
                page_faults: u64v(mem.pgfault),
                major_page_faults: u64v(mem.pgmajfault),
                psi: None,
            };
            let swap = SwapUsage {
                timestamp: ts,
                swap_usage_bytes: u64v(mem.swap_usage),
                swap_available_bytes: u64v(if mem.swap_limit > UNLIMITED {
                    0
                } else {
                    mem.swap_limit.saturating_sub(mem.swap_usage)
                }),
            };
            (Some(memory), Some(swap))
        }
        None => (None, None),
    };
    Decoded {
        cpu_ns,
        memory,
        swap,
    }
}

fn cpu_rate(d: &ContainerService, id: &str, ts: i64, cpu_ns: u64) -> u64 {
    let prev = d.container_cpu.record(id, (ts, cpu_ns));
    nano_cores(prev, (ts, cpu_ns))
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Stats of one container, and why its cgroup figures are missing if reading them failed:
/// ContainerStats answers with that error, ListContainerStats logs it and keeps the rest (one
/// bad container must not hide the others).
async fn stats_of(
    d: &ContainerService,
    rec: &ContainerRecord,
) -> (ContainerStats, Option<CriError>) {
    let cfg = containers::container_config(rec);
    let mut out = ContainerStats {
        attributes: Some(ContainerAttributes {
            id: rec.id.clone(),
            metadata: cfg.metadata.clone(),
            labels: cfg.labels.clone(),
            annotations: cfg.annotations.clone(),
        }),
        ..Default::default()
    };
    out.writable_layer = writable_layer(d, &rec.id).await;
    if rec.state != ContainerState::Running {
        return (out, None);
    }
    let Some(shim) = d.shims.get(&rec.pod_id) else {
        return (out, None);
    };
    let resp = shim
        .task()
        .stats(
            ctx(STATS_CALL),
            &api::StatsRequest {
                id: rec.id.clone(),
                ..Default::default()
            },
        )
        .await;
    let ts = now_ns();
    let any = match resp {
        Ok(r) => match r.stats.into_option() {
            Some(a) => a,
            None => return (out, None),
        },
        // The task exited between the record and the call: no cgroup any more.
        Err(e) if is_not_found(&e) => return (out, None),
        Err(e) => {
            let e = task_error(&format!("Stats of container {}", rec.id), e);
            return (out, Some(e));
        }
    };
    let dec = match decode(&any, ts) {
        Ok(x) => x,
        Err(why) => {
            let e = CriError::internal(format!("Stats of container {}: {why}", rec.id));
            return (out, Some(e));
        }
    };
    if let Some(cpu_ns) = dec.cpu_ns {
        out.cpu = Some(CpuUsage {
            timestamp: ts,
            usage_core_nano_seconds: u64v(cpu_ns),
            usage_nano_cores: u64v(cpu_rate(d, &rec.id, ts, cpu_ns)),
            psi: None,
        });
    }
    out.memory = dec.memory;
    out.swap = dec.swap;
    (out, None)
}

/// Usage of the container's writable layer: its active snapshot (keyed by container id, as
/// containerd's CRI plugin keys it). None when there is no such snapshot.
pub async fn writable_layer(d: &ContainerService, id: &str) -> Option<FilesystemUsage> {
    let sn = std::sync::Arc::clone(&d.snapshotter);
    let key = id.to_string();
    // Measuring walks the upper directory: off the async threads.
    let usage =
        tokio::task::spawn_blocking(move || sn.usage(&key).map(|u| (u, sn.root().to_path_buf())))
            .await
            .ok()?;
    match usage {
        Ok((u, root)) => Some(FilesystemUsage {
            timestamp: now_ns(),
            fs_id: Some(FilesystemIdentifier {
                mountpoint: root.display().to_string(),
            }),
            used_bytes: u64v(u.size.max(0) as u64),
            inodes_used: u64v(u.inodes.max(0) as u64),
        }),
        Err(e) => {
            tracing::debug!(container_id = %id, error = %e, "no writable layer usage");
            None
        }
    }
}

pub async fn container_stats(
    d: &ContainerService,
    req: ContainerStatsRequest,
) -> Result<ContainerStatsResponse, CriError> {
    let rec = containers::find(&d.store, &req.container_id)?;
    match stats_of(d, &rec).await {
        (stats, None) => Ok(ContainerStatsResponse { stats: Some(stats) }),
        (_, Some(e)) => Err(e),
    }
}

pub async fn list_container_stats(
    d: &ContainerService,
    req: ListContainerStatsRequest,
) -> Result<ListContainerStatsResponse, CriError> {
    let f = req.filter.unwrap_or_default();
    let filter = ContainerFilter {
        id: f.id,
        pod_sandbox_id: f.pod_sandbox_id,
        state: None,
        label_selector: f.label_selector,
    };
    let all: Vec<ContainerRecord> = d
        .store
        .list::<ContainerRecord>()?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let live: std::collections::HashSet<&str> = all.iter().map(|r| r.id.as_str()).collect();
    d.container_cpu.retain(|id| live.contains(id));
    let mut recs: Vec<&ContainerRecord> = all
        .iter()
        .filter(|r| containers::matches(r, &containers::container_config(r), &filter))
        .collect();
    recs.sort_by_key(|r| r.created_at);
    // The store was read above; from here on nothing fails the call, a container whose cgroup
    // cannot be read is listed without CPU and memory figures.
    let stats = futures::future::join_all(recs.iter().map(|r| async move {
        let (stats, err) = stats_of(d, r).await;
        if let Some(e) = err {
            tracing::warn!(container_id = %r.id, error = %e.message, "no cgroup stats");
        }
        stats
    }))
    .await;
    Ok(ListContainerStatsResponse { stats })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::Daemon;
    use crate::error::ErrorKind;
    use containerd_shim_protos::protobuf::MessageFull;

    fn pack<M: MessageFull>(m: &M) -> Any {
        Any {
            type_url: M::descriptor().full_name().to_string(),
            value: m.write_to_bytes().expect("encode"),
            ..Default::default()
        }
    }

    fn v(x: &Option<UInt64Value>) -> u64 {
        x.as_ref().expect("value").value
    }

    #[test]
    fn v1_metrics_become_cri_figures() {
        let mut m = v1::Metrics::new();
        let mut cpu = v1::CPUStat::new();
        let mut u = v1::CPUUsage::new();
        u.total = 5_000_000_000;
        cpu.usage = Some(u).into();
        m.cpu = Some(cpu).into();
        let mut mem = v1::MemoryStat::new();
        let mut usage = v1::MemoryEntry::new();
        usage.usage = 30 << 20;
        usage.limit = 64 << 20;
        mem.usage = Some(usage).into();
        let mut swap = v1::MemoryEntry::new();
        swap.usage = 31 << 20;
        swap.limit = 64 << 20;
        mem.swap = Some(swap).into();
        mem.total_inactive_file = 8 << 20;
        mem.inactive_file = 1; // the non-hierarchical figure is not the one used
        mem.total_rss = 20 << 20;
        mem.total_pg_fault = 1234;
        mem.total_pg_maj_fault = 5;
        m.memory = Some(mem).into();

        let any = pack(&m);
        assert_eq!(any.type_url, "io.containerd.cgroups.v1.Metrics");
        let d = decode(&any, 42).expect("decode");
        assert_eq!(d.cpu_ns, Some(5_000_000_000));
        let mu = d.memory.expect("memory");
        assert_eq!(mu.timestamp, 42);
        assert_eq!(v(&mu.working_set_bytes), 22 << 20);
        assert_eq!(v(&mu.available_bytes), 42 << 20);
        assert_eq!(v(&mu.usage_bytes), 30 << 20);
        assert_eq!(v(&mu.rss_bytes), 20 << 20);
        assert_eq!(v(&mu.page_faults), 1234);
        assert_eq!(v(&mu.major_page_faults), 5);
        let sw = d.swap.expect("swap");
        assert_eq!(v(&sw.swap_usage_bytes), 1 << 20);
        assert_eq!(v(&sw.swap_available_bytes), 33 << 20);
    }

    #[test]
    fn unlimited_memory_has_no_available_figure() {
        let mut m = v1::Metrics::new();
        let mut mem = v1::MemoryStat::new();
        let mut usage = v1::MemoryEntry::new();
        usage.usage = 10;
        usage.limit = 9_223_372_036_854_771_712; // what v1 shows for "no limit"
        mem.usage = Some(usage).into();
        mem.total_inactive_file = 20; // more than usage: working set clamps at 0
        m.memory = Some(mem).into();
        let d = from_v1(&m, 1);
        let mu = d.memory.expect("memory");
        assert_eq!(v(&mu.available_bytes), 0);
        assert_eq!(v(&mu.working_set_bytes), 0);
        assert_eq!(d.cpu_ns, None, "no cpu controller, no cpu figure");
        // No memory usage entry: no memory figures at all.
        assert_eq!(from_v1(&v1::Metrics::new(), 1).memory, None);
    }

    #[test]
    fn v2_metrics_become_cri_figures() {
        let mut m = v2::Metrics::new();
        let mut cpu = v2::CPUStat::new();
        cpu.usage_usec = 1_500_000;
        m.cpu = Some(cpu).into();
        let mut mem = v2::MemoryStat::new();
        mem.usage = 50 << 20;
        mem.usage_limit = 100 << 20;
        mem.inactive_file = 10 << 20;
        mem.anon = 35 << 20;
        mem.pgfault = 77;
        mem.pgmajfault = 3;
        mem.swap_usage = 0;
        mem.swap_limit = u64::MAX;
        m.memory = Some(mem).into();
        let d = decode(&pack(&m), 7).expect("decode");
        assert_eq!(d.cpu_ns, Some(1_500_000_000));
        let mu = d.memory.expect("memory");
        assert_eq!(v(&mu.working_set_bytes), 40 << 20);
        assert_eq!(v(&mu.available_bytes), 60 << 20);
        assert_eq!(v(&mu.rss_bytes), 35 << 20);
        assert_eq!(v(&mu.page_faults), 77);
        assert_eq!(v(&mu.major_page_faults), 3);
        assert_eq!(v(&d.swap.expect("swap").swap_available_bytes), 0);
    }

    #[test]
    fn unknown_metrics_are_refused() {
        let any = Any {
            type_url: "example.com/Other".into(),
            ..Default::default()
        };
        assert!(decode(&any, 0).is_err());
    }

    #[tokio::test]
    async fn stats_calls_on_unknown_and_exited_containers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Daemon::for_test(dir.path()).containers;
        let e = container_stats(
            &d,
            ContainerStatsRequest {
                container_id: "nope".into(),
            },
        )
        .await
        .expect_err("unknown");
        assert_eq!(e.kind, ErrorKind::NotFound);
        let rec = crate::container::exec::tests::test_record("c1", ContainerState::Exited);
        d.store.put("c1", &rec).expect("put");
        let mut other = crate::container::exec::tests::test_record("c2", ContainerState::Running);
        other.pod_id = "p2".into();
        d.store.put("c2", &other).expect("put");
        let s = container_stats(
            &d,
            ContainerStatsRequest {
                container_id: "c1".into(),
            },
        )
        .await
        .expect("stats")
        .stats
        .expect("stats");
        assert_eq!(s.attributes.expect("attributes").id, "c1");
        assert!(s.cpu.is_none() && s.memory.is_none());
        let ids = |r: ListContainerStatsResponse| {
            r.stats
                .into_iter()
                .map(|s| s.attributes.expect("attributes").id)
                .collect::<Vec<_>>()
        };
        let all = list_container_stats(&d, ListContainerStatsRequest { filter: None })
            .await
            .expect("list");
        assert_eq!(ids(all), vec!["c1", "c2"]);
        let by_pod = list_container_stats(
            &d,
            ListContainerStatsRequest {
                filter: Some(crisp_proto::cri::v1::ContainerStatsFilter {
                    pod_sandbox_id: "p2".into(),
                    ..Default::default()
                }),
            },
        )
        .await
        .expect("list");
        assert_eq!(ids(by_pod), vec!["c2"]);
    }
}
