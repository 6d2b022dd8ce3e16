//! UpdatePodSandboxResources: in-place pod resize at the pod level.
//!
//! kubelet sends `resources` (the sum of its containers' resources) and `overhead` (the
//! RuntimeClass's) after it has resized the pod's cgroup itself. crispd applies the total to
//! the pod-level cgroup too (the cgroup parent every container of the pod sits under), so the
//! pod is limited as asked even where kubelet does not manage that cgroup (crictl, a test), and
//! keeps both in the pod's record so PodSandboxStatus' config reflects the resize. As with
//! UpdateContainerResources, a zero field leaves the old value; a memory limit below what the
//! pod uses now is refused (FailedPrecondition naming the value and the usage) instead of
//! letting the kernel OOM-kill a container to get there.

use crisp_proto::cri::v1::{
    LinuxContainerResources, UpdatePodSandboxResourcesRequest, UpdatePodSandboxResourcesResponse,
};
use crisp_shim::placement::CgroupDriver;
use redb::ReadableTable;

use crate::cgroup::{self, Hierarchy, limits};
use crate::container::resources::validate_as;
use crate::error::CriError;
use crate::pod::service::PodService;
use crate::pod::status::{encode_config, find, pod_config};
use crate::store::records::{PodRecord, PodState};
use crate::store::{Record, StoreError};

/// The pod cgroup's limits for `resources` plus `overhead`, field by field as kubelet sums a
/// pod's cgroup: memory and CPU quota are only limited when the containers' sum is (an
/// overhead alone does not limit an unlimited pod); shares add up; the period and cpusets
/// are the containers'.
pub fn pod_limits(
    resources: &LinuxContainerResources,
    overhead: &LinuxContainerResources,
) -> LinuxContainerResources {
    let pos = |v: i64| v.max(0);
    LinuxContainerResources {
        memory_limit_in_bytes: if resources.memory_limit_in_bytes > 0 {
            resources.memory_limit_in_bytes + pos(overhead.memory_limit_in_bytes)
        } else {
            0
        },
        cpu_quota: if resources.cpu_quota > 0 {
            resources.cpu_quota + pos(overhead.cpu_quota)
        } else {
            resources.cpu_quota
        },
        cpu_period: if resources.cpu_period > 0 {
            resources.cpu_period
        } else {
            pos(overhead.cpu_period)
        },
        cpu_shares: if resources.cpu_shares > 0 || overhead.cpu_shares > 0 {
            pos(resources.cpu_shares) + pos(overhead.cpu_shares)
        } else {
            0
        },
        cpuset_cpus: resources.cpuset_cpus.clone(),
        cpuset_mems: resources.cpuset_mems.clone(),
        ..Default::default()
    }
}

fn changes_nothing(r: &LinuxContainerResources) -> bool {
    *r == LinuxContainerResources::default()
}

pub async fn update_pod_sandbox_resources(
    d: &PodService,
    req: UpdatePodSandboxResourcesRequest,
) -> Result<UpdatePodSandboxResourcesResponse, CriError> {
    let found = find(&d.store, &req.pod_sandbox_id)?;
    let _guard = d.pod_locks.lock(&found.id).await;
    let rec = find(&d.store, &found.id)?;
    let resources = req.resources.unwrap_or_default();
    let overhead = req.overhead.unwrap_or_default();
    validate_as("resources", &resources)?;
    validate_as("overhead", &overhead)?;
    let total = pod_limits(&resources, &overhead);
    // A pod that is not ready has no containers running in its cgroup: the record is all.
    if rec.state == PodState::Ready && !changes_nothing(&total) {
        apply(&Hierarchy::host(), d.cfg.cgroup_driver.into(), &rec, &total)?;
    }
    persist(d, &rec.id, resources, overhead)?;
    tracing::info!(pod_id = %rec.id, memory = total.memory_limit_in_bytes,
        cpu_quota = total.cpu_quota, cpu_shares = total.cpu_shares, "pod resources updated");
    Ok(UpdatePodSandboxResourcesResponse {})
}

/// Write `total` to the pod-level cgroup of `rec` under `h`, memory checked against usage.
pub fn apply(
    h: &Hierarchy,
    driver: CgroupDriver,
    rec: &PodRecord,
    total: &LinuxContainerResources,
) -> Result<(), CriError> {
    let what = format!("UpdatePodSandboxResources: pod {}", rec.id);
    let Some(rel) =
        cgroup::pod_dir(driver, &rec.cgroup_parent).map_err(|e| CriError::context(&what, e))?
    else {
        return Err(CriError::precondition(format!(
            "{what}: the pod has no cgroup parent, so no pod-level cgroup to apply \
             resources to (linux.cgroup_parent is empty)"
        )));
    };
    let mut total = total.clone();
    // kubelet calls after it has resized the pod cgroup itself: a limit already in place is
    // not a shrink to check (usage may sit right at it), and is not written again.
    let current = limits::memory_limit_of(h, &rel).map_err(|e| CriError::context(&what, e))?;
    if limits::same_memory_limit(current, total.memory_limit_in_bytes) {
        total.memory_limit_in_bytes = 0;
    }
    cgroup::check_memory_limit(h, &rel, total.memory_limit_in_bytes).map_err(|e| {
        CriError::context(
            &format!("{what}: resources.memory_limit_in_bytes plus overhead"),
            e,
        )
    })?;
    limits::apply(h, &rel, &total).map_err(|e| CriError::context(&what, e))
}

/// Keep the new resources in the pod's config (merged: a zero field keeps the old value), in
/// one transaction so a concurrent state change is not lost.
fn persist(
    d: &PodService,
    id: &str,
    resources: LinuxContainerResources,
    overhead: LinuxContainerResources,
) -> Result<(), CriError> {
    use crate::container::resources::merge;
    d.store.write(|txn| {
        let bytes = {
            let t = txn.open_table(PodRecord::TABLE).map_err(StoreError::from)?;
            let v = t.get(id).map_err(StoreError::from)?;
            v.map(|v| v.value().to_vec())
        };
        let Some(bytes) = bytes else { return Ok(()) };
        let mut rec: PodRecord = crate::store::decode(&bytes)
            .map_err(|e| CriError::internal(format!("pod record {id}: {e}")))?;
        let mut cfg = pod_config(&rec);
        let linux = cfg.linux.get_or_insert_with(Default::default);
        let old = linux.resources.take().unwrap_or_default();
        linux.resources = Some(merge(&old, &resources));
        let old = linux.overhead.take().unwrap_or_default();
        linux.overhead = Some(merge(&old, &overhead));
        rec.config_pb = encode_config(&cfg);
        crate::store::put_in(txn, id, &rec)?;
        Ok::<_, CriError>(())
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cgroup::tests::fake_root;
    use crate::daemon::Daemon;
    use crate::error::ErrorKind;

    fn res() -> LinuxContainerResources {
        LinuxContainerResources::default()
    }

    #[test]
    fn limits_are_the_sum_as_kubelet_computes_it() {
        let r = LinuxContainerResources {
            memory_limit_in_bytes: 100 << 20,
            cpu_shares: 512,
            cpu_quota: 50_000,
            cpu_period: 100_000,
            ..res()
        };
        let o = LinuxContainerResources {
            memory_limit_in_bytes: 10 << 20,
            cpu_shares: 100,
            cpu_quota: 10_000,
            ..res()
        };
        let t = pod_limits(&r, &o);
        assert_eq!(t.memory_limit_in_bytes, 110 << 20);
        assert_eq!(
            (t.cpu_shares, t.cpu_quota, t.cpu_period),
            (612, 60_000, 100_000)
        );
        // Unlimited containers stay unlimited whatever the overhead.
        let t = pod_limits(&res(), &o);
        assert_eq!((t.memory_limit_in_bytes, t.cpu_quota), (0, 0));
        assert_eq!(t.cpu_shares, 100);
        assert!(changes_nothing(&pod_limits(&res(), &res())));
    }

    /// A ready pod record `p1` (namespace `ns`, name `n`) under cgroup parent `parent`.
    pub(crate) fn pod(parent: &str) -> PodRecord {
        PodRecord {
            name: "n".into(),
            namespace: "ns".into(),
            uid: "u".into(),
            cgroup_parent: parent.into(),
            ..PodRecord::for_test("p1", PodState::Ready)
        }
    }

    /// cgroup v2 over a fake root: the limits land in the pod's files; a shrink below usage
    /// is refused and writes nothing.
    #[test]
    fn v2_pod_cgroup_gets_the_total() {
        let d = fake_root(
            true,
            &[
                ("kubepods/podu/memory.max", "max\n"),
                ("kubepods/podu/memory.current", "50000000\n"),
                ("kubepods/podu/cpu.weight", "100\n"),
                ("kubepods/podu/cpu.max", "max 100000\n"),
            ],
        );
        let h = Hierarchy::at(d.path());
        let rec = pod("/kubepods/podu");
        let total = LinuxContainerResources {
            memory_limit_in_bytes: 200 << 20,
            cpu_shares: 1024,
            cpu_quota: 200_000,
            ..res()
        };
        apply(&h, CgroupDriver::Cgroupfs, &rec, &total).expect("apply");
        let got = limits::read(&h, "/kubepods/podu").expect("read");
        assert_eq!(got.memory_limit_in_bytes, 200 << 20);
        assert_eq!(got.cpu_quota, 200_000);
        assert_eq!(limits::shares_to_weight(got.cpu_shares), 39);
        let e = apply(
            &h,
            CgroupDriver::Cgroupfs,
            &rec,
            &LinuxContainerResources {
                memory_limit_in_bytes: 40_000_000,
                ..res()
            },
        )
        .expect_err("below usage");
        assert_eq!(e.kind, ErrorKind::FailedPrecondition);
        assert!(
            e.message.contains("memory_limit_in_bytes")
                && e.message.contains("40000000")
                && e.message.contains("50000000"),
            "{}",
            e.message
        );
        let max = std::fs::read_to_string(d.path().join("kubepods/podu/memory.max"));
        assert_eq!(max.expect("read"), (200u64 << 20).to_string(), "unchanged");
        // A limit kubelet already set (usage right at it) is neither checked nor rewritten.
        std::fs::write(d.path().join("kubepods/podu/memory.max"), "49999872\n").expect("w");
        std::fs::write(d.path().join("kubepods/podu/memory.current"), "50001000\n").expect("w");
        apply(
            &h,
            CgroupDriver::Cgroupfs,
            &rec,
            &LinuxContainerResources {
                memory_limit_in_bytes: 50_000_000,
                ..res()
            },
        )
        .expect("already in place");
        let e = apply(&h, CgroupDriver::Cgroupfs, &pod(""), &total).expect_err("no parent");
        assert_eq!(e.kind, ErrorKind::FailedPrecondition);
        assert!(e.message.contains("cgroup_parent"), "{}", e.message);
    }

    #[tokio::test]
    async fn a_stopped_pod_keeps_the_resources_in_its_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Daemon::for_test(dir.path()).pods;
        let mut rec = pod("/nowhere");
        rec.state = PodState::NotReady;
        d.store.put(&rec.id, &rec).expect("put");
        let bad = update_pod_sandbox_resources(
            &d,
            UpdatePodSandboxResourcesRequest {
                pod_sandbox_id: "p1".into(),
                overhead: Some(LinuxContainerResources {
                    cpu_shares: -1,
                    ..res()
                }),
                resources: None,
            },
        )
        .await
        .expect_err("negative");
        assert!(
            bad.message.starts_with("overhead.cpu_shares"),
            "{}",
            bad.message
        );
        update_pod_sandbox_resources(
            &d,
            UpdatePodSandboxResourcesRequest {
                pod_sandbox_id: "p1".into(),
                overhead: None,
                resources: Some(LinuxContainerResources {
                    memory_limit_in_bytes: 64 << 20,
                    ..res()
                }),
            },
        )
        .await
        .expect("update");
        let got = d.store.get::<PodRecord>("p1").expect("get").expect("rec");
        let linux = pod_config(&got).linux.expect("linux");
        assert_eq!(
            linux.resources.expect("resources").memory_limit_in_bytes,
            64 << 20
        );
    }
}
