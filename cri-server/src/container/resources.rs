//! UpdateContainerResources and ReopenContainerLog.
//!
//! An update is merged into the container's current resources the way containerd's CRI plugin
//! merges it (a zero field keeps the old value), applied to a running task through the shim's
//! task Update (the OCI `LinuxResources` as JSON in an Any, which the shim hands to
//! `runc update --resources`), and then kept: in the container record's config, so
//! ContainerStatus reports it, and in the bundle's `config.json`, so a container started later
//! gets it. A created or exited container has no cgroup to change: only the record and spec
//! are updated, as containerd does.

use std::path::Path;

use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use crisp_proto::cri::v1::{
    LinuxContainerResources, UpdateContainerResourcesRequest, UpdateContainerResourcesResponse,
};
use redb::ReadableTable;

use crate::cgroup::{self, Hierarchy};
use crate::container::exec::{state_name, task_error};
use crate::container::service::ContainerService;
use crate::container::status as containers;
use crate::error::{CriError, ErrorKind, HasKind};
use crate::shim::client::ctx;
use crate::shim::client::is_not_found;
use crate::store::records::{ContainerRecord, ContainerState, PodRecord};
use crate::store::{Record, StoreError};

/// The smallest memory limit accepted. The kernel takes less, but a container cannot start
/// its runtime's init below a few MiB, and kubelet never asks for less (Docker's floor is 6).
pub const MIN_MEMORY_LIMIT: i64 = 4 * 1024 * 1024;

const UPDATE_CALL: std::time::Duration = std::time::Duration::from_secs(30);

/// What containerd calls the JSON of a runtime-spec `LinuxResources` in an Any.
const RESOURCES_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

fn invalid(field: &str, msg: String) -> CriError {
    CriError::invalid(format!("linux.{field}: {msg}"))
}

/// `0-3,5,7-8`: the cpuset list syntax.
fn valid_cpuset(s: &str) -> bool {
    s.split(',').all(|part| {
        let mut it = part.splitn(2, '-');
        let a = it.next().map(|x| x.trim().parse::<u32>());
        match (a, it.next().map(|x| x.trim().parse::<u32>())) {
            (Some(Ok(_)), None) => true,
            (Some(Ok(lo)), Some(Ok(hi))) => lo <= hi,
            _ => false,
        }
    })
}

/// Refuse values no kernel or runtime accepts, naming the field.
pub fn validate(r: &LinuxContainerResources) -> Result<(), CriError> {
    if r.cpu_shares < 0 {
        return Err(invalid(
            "cpu_shares",
            format!("{} is negative", r.cpu_shares),
        ));
    }
    if r.cpu_period < 0 {
        return Err(invalid(
            "cpu_period",
            format!("{} is negative", r.cpu_period),
        ));
    }
    if r.cpu_period > 0 && !(1_000..=1_000_000).contains(&r.cpu_period) {
        return Err(invalid(
            "cpu_period",
            format!("{} µs is outside 1000..=1000000", r.cpu_period),
        ));
    }
    // -1: no quota.
    if r.cpu_quota < -1 {
        return Err(invalid("cpu_quota", format!("{} is negative", r.cpu_quota)));
    }
    if r.cpu_quota > 0 && r.cpu_quota < 1_000 {
        return Err(invalid(
            "cpu_quota",
            format!("{} µs is below the kernel's 1000 µs minimum", r.cpu_quota),
        ));
    }
    if r.memory_limit_in_bytes < 0 {
        return Err(invalid(
            "memory_limit_in_bytes",
            format!("{} is negative", r.memory_limit_in_bytes),
        ));
    }
    if r.memory_limit_in_bytes > 0 && r.memory_limit_in_bytes < MIN_MEMORY_LIMIT {
        return Err(invalid(
            "memory_limit_in_bytes",
            format!(
                "{} is below the minimum of {MIN_MEMORY_LIMIT} (4 MiB)",
                r.memory_limit_in_bytes
            ),
        ));
    }
    // -1: unlimited swap.
    if r.memory_swap_limit_in_bytes < -1 {
        return Err(invalid(
            "memory_swap_limit_in_bytes",
            format!("{} is negative", r.memory_swap_limit_in_bytes),
        ));
    }
    if !(-1000..=1000).contains(&r.oom_score_adj) {
        return Err(invalid(
            "oom_score_adj",
            format!("{} is outside -1000..=1000", r.oom_score_adj),
        ));
    }
    for (name, v) in [
        ("cpuset_cpus", &r.cpuset_cpus),
        ("cpuset_mems", &r.cpuset_mems),
    ] {
        if !v.is_empty() && !valid_cpuset(v) {
            return Err(invalid(name, format!("{v:?} is not a list like 0-3,5")));
        }
    }
    for h in &r.hugepage_limits {
        if h.page_size.is_empty() {
            return Err(invalid("hugepage_limits", "a page_size is empty".into()));
        }
    }
    Ok(())
}

/// [`validate`] for resources that sit elsewhere than a container's `linux` (a pod's
/// `resources` or `overhead`): the same checks, the message naming `prefix.<field>`.
pub fn validate_as(prefix: &str, r: &LinuxContainerResources) -> Result<(), CriError> {
    validate(r).map_err(|mut e| {
        if let Some(rest) = e.message.strip_prefix("linux.") {
            e.message = format!("{prefix}.{rest}");
        }
        e
    })
}

/// containerd's merge: each field the update sets replaces the old one; a zero (unset) field
/// keeps it; unified keys are added to the old ones. oom_score_adj belongs to the process, not
/// the cgroup, and cannot change after start: it is kept.
pub fn merge(
    old: &LinuxContainerResources,
    new: &LinuxContainerResources,
) -> LinuxContainerResources {
    let mut r = old.clone();
    if new.cpu_period != 0 {
        r.cpu_period = new.cpu_period;
    }
    if new.cpu_quota != 0 {
        r.cpu_quota = new.cpu_quota;
    }
    if new.cpu_shares != 0 {
        r.cpu_shares = new.cpu_shares;
    }
    if !new.cpuset_cpus.is_empty() {
        r.cpuset_cpus = new.cpuset_cpus.clone();
    }
    if !new.cpuset_mems.is_empty() {
        r.cpuset_mems = new.cpuset_mems.clone();
    }
    if new.memory_limit_in_bytes != 0 {
        r.memory_limit_in_bytes = new.memory_limit_in_bytes;
        // The old swap limit belonged to the old memory limit (kubelet's no-swap default
        // sets them equal); one below the new limit would make the update fail.
        if new.memory_swap_limit_in_bytes == 0
            && r.memory_swap_limit_in_bytes > 0
            && r.memory_swap_limit_in_bytes < r.memory_limit_in_bytes
        {
            r.memory_swap_limit_in_bytes = 0;
        }
    }
    if new.memory_swap_limit_in_bytes != 0 {
        r.memory_swap_limit_in_bytes = new.memory_swap_limit_in_bytes;
    }
    if !new.hugepage_limits.is_empty() {
        r.hugepage_limits = new.hugepage_limits.clone();
    }
    for (k, v) in &new.unified {
        r.unified.insert(k.clone(), v.clone());
    }
    r
}

/// The OCI resources for `r`, as the JSON the shim passes to `runc update --resources`.
pub fn oci_json(r: &LinuxContainerResources, cgroup_v2: bool) -> Result<Vec<u8>, CriError> {
    let oci = crate::container::spec::resources(Some(r), cgroup_v2)?;
    serde_json::to_vec(&oci).map_err(|e| CriError::internal(format!("encoding resources: {e}")))
}

fn cgroup_v2() -> bool {
    crate::util::cgroup_mode(Path::new("/sys/fs/cgroup")) == Some(crate::util::CgroupMode::Unified)
}

pub async fn update_container_resources(
    d: &ContainerService,
    req: UpdateContainerResourcesRequest,
) -> Result<UpdateContainerResourcesResponse, CriError> {
    let found = containers::find(&d.store, &req.container_id)?;
    // Under the container's lock, re-read: concurrent updates must not merge into a stale
    // record, and a StartContainer in between must not miss the new limits.
    let _guard = d.containers.lock(&found.id).await;
    let rec = containers::find(&d.store, &found.id)?;
    // Windows resources only: nothing applies on Linux (containerd ignores them too).
    let Some(new) = req.linux else {
        return Ok(UpdateContainerResourcesResponse {});
    };
    validate(&new)?;
    let cfg = containers::container_config(&rec);
    let old = cfg
        .linux
        .as_ref()
        .and_then(|l| l.resources.clone())
        .unwrap_or_default();
    let merged = merge(&old, &new);
    let json = oci_json(&merged, cgroup_v2())?;

    if rec.state == ContainerState::Running {
        check_memory_shrink(d, &Hierarchy::host(), &rec, new.memory_limit_in_bytes)?;
        if let Some(shim) = d.shims.get(&rec.pod_id) {
            let r = shim
                .task()
                .update(
                    ctx(UPDATE_CALL),
                    &api::UpdateTaskRequest {
                        id: rec.id.clone(),
                        resources: Some(Any {
                            type_url: RESOURCES_TYPE_URL.to_string(),
                            value: json.clone(),
                            ..Default::default()
                        })
                        .into(),
                        annotations: req.annotations.clone(),
                        ..Default::default()
                    },
                )
                .await;
            match r {
                Ok(_) => {}
                // It exited meanwhile: the spec update below is all there is to do.
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(task_error(
                        &format!("UpdateContainerResources: container {}", rec.id),
                        e,
                    ));
                }
            }
        } else {
            return Err(CriError::precondition(format!(
                "UpdateContainerResources: container {}: pod {} has no live shim",
                rec.id, rec.pod_id
            )));
        }
    }
    persist(d, &rec.id, &merged)?;
    update_bundle_spec(d, &rec.id, &json);
    tracing::info!(state = state_name(rec.state), "resources updated");
    Ok(UpdateContainerResourcesResponse {})
}

/// Refuse a memory limit below what the running container uses now, naming both: cgroup v2
/// would OOM-kill the container to get there, v1 would reclaim and then fail with EBUSY.
fn check_memory_shrink(
    d: &ContainerService,
    h: &Hierarchy,
    rec: &ContainerRecord,
    limit: i64,
) -> Result<(), CriError> {
    if limit <= 0 {
        return Ok(());
    }
    let what = format!("UpdateContainerResources: container {}", rec.id);
    let pod = d
        .store
        .get::<PodRecord>(&rec.pod_id)?
        .ok_or_else(|| CriError::not_found(format!("{what}: pod {} is gone", rec.pod_id)))?;
    let rel = cgroup::container_dir(d.cfg.cgroup_driver.into(), &pod.cgroup_parent, &rec.id)
        .map_err(|e| CriError::context(&what, e))?;
    match cgroup::check_memory_limit(h, &rel, limit) {
        Ok(()) => Ok(()),
        // It exited meanwhile: no cgroup, nothing to shrink.
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CriError::context(
            &format!("{what}: linux.memory_limit_in_bytes"),
            e,
        )),
    }
}

/// Keep `r` in the record's config, in one transaction so a concurrent exit update is not lost.
fn persist(d: &ContainerService, id: &str, r: &LinuxContainerResources) -> Result<(), CriError> {
    d.store.write(|txn| {
        let bytes = {
            let t = txn
                .open_table(ContainerRecord::TABLE)
                .map_err(StoreError::from)?;
            let v = t.get(id).map_err(StoreError::from)?;
            v.map(|v| v.value().to_vec())
        };
        // Removed meanwhile: nothing left to update.
        let Some(bytes) = bytes else { return Ok(()) };
        let mut rec: ContainerRecord = crate::store::decode(&bytes)
            .map_err(|e| CriError::internal(format!("container record {id}: {e}")))?;
        let mut cfg = containers::container_config(&rec);
        cfg.linux.get_or_insert_with(Default::default).resources = Some(r.clone());
        rec.config_pb = containers::encode_config(&cfg);
        crate::store::put_in(txn, id, &rec)?;
        Ok::<_, CriError>(())
    })
}

/// The bundle's spec gets the new resources too (best effort: a missing bundle is fine, the
/// record is the source of truth for status).
fn update_bundle_spec(d: &ContainerService, id: &str, json: &[u8]) {
    let bundle = crate::container::bundle::dir(&d.cfg.state, id);
    let Some(mut spec) = crate::container::bundle::read_spec(&bundle) else {
        return;
    };
    let Ok(res) = serde_json::from_slice::<serde_json::Value>(json) else {
        return;
    };
    let Some(linux) = spec.get_mut("linux").and_then(|l| l.as_object_mut()) else {
        return;
    };
    linux.insert(
        "resources".into(),
        merge_devices(linux.get("resources"), res),
    );
    let written = serde_json::to_vec_pretty(&spec)
        .map_err(|e| e.to_string())
        .and_then(|b| {
            crate::util::write_atomic(&crate::container::bundle::config_path(&bundle), &b)
                .map_err(|e| e.to_string())
        });
    if let Err(e) = written {
        tracing::warn!(container_id = %id, error = %e, "updating the bundle's config.json");
    }
}

/// The new resources, keeping the old device cgroup rules (an update never carries them).
fn merge_devices(old: Option<&serde_json::Value>, mut new: serde_json::Value) -> serde_json::Value {
    if let (Some(devs), Some(o)) = (old.and_then(|o| o.get("devices")), new.as_object_mut()) {
        o.insert("devices".into(), devs.clone());
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::Daemon;
    use crisp_proto::cri::v1::{ContainerConfig, LinuxContainerConfig};

    fn res() -> LinuxContainerResources {
        LinuxContainerResources::default()
    }

    fn field_of(r: LinuxContainerResources) -> String {
        let e = validate(&r).expect_err("invalid");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        e.message
    }

    #[test]
    fn validation_names_the_field() {
        validate(&res()).expect("all unset is fine");
        validate(&LinuxContainerResources {
            cpu_shares: 512,
            cpu_quota: -1,
            cpu_period: 100_000,
            memory_limit_in_bytes: 64 << 20,
            memory_swap_limit_in_bytes: -1,
            cpuset_cpus: "0-1,3".into(),
            cpuset_mems: "0".into(),
            ..res()
        })
        .expect("valid");
        let m = field_of(LinuxContainerResources {
            cpu_shares: -2,
            ..res()
        });
        assert!(m.starts_with("linux.cpu_shares:"), "{m}");
        let m = field_of(LinuxContainerResources {
            memory_limit_in_bytes: 1 << 20,
            ..res()
        });
        assert!(
            m.starts_with("linux.memory_limit_in_bytes:") && m.contains("4 MiB"),
            "{m}"
        );
        assert!(
            field_of(LinuxContainerResources {
                memory_limit_in_bytes: -1,
                ..res()
            })
            .contains("memory_limit_in_bytes")
        );
        assert!(
            field_of(LinuxContainerResources {
                cpu_quota: 500,
                ..res()
            })
            .contains("cpu_quota")
        );
        assert!(
            field_of(LinuxContainerResources {
                cpu_quota: -5,
                ..res()
            })
            .contains("cpu_quota")
        );
        assert!(
            field_of(LinuxContainerResources {
                cpu_period: 10,
                ..res()
            })
            .contains("cpu_period")
        );
        assert!(
            field_of(LinuxContainerResources {
                oom_score_adj: 1001,
                ..res()
            })
            .contains("oom_score_adj")
        );
        assert!(
            field_of(LinuxContainerResources {
                cpuset_cpus: "1-0".into(),
                ..res()
            })
            .contains("cpuset_cpus")
        );
        assert!(
            field_of(LinuxContainerResources {
                cpuset_mems: "a".into(),
                ..res()
            })
            .contains("cpuset_mems")
        );
    }

    #[test]
    fn merge_keeps_unset_fields() {
        let old = LinuxContainerResources {
            cpu_shares: 1024,
            cpu_quota: 50_000,
            cpu_period: 100_000,
            memory_limit_in_bytes: 256 << 20,
            memory_swap_limit_in_bytes: 256 << 20,
            oom_score_adj: 500,
            unified: [("memory.high".to_string(), "1".to_string())].into(),
            ..res()
        };
        let m = merge(
            &old,
            &LinuxContainerResources {
                memory_limit_in_bytes: 512 << 20,
                oom_score_adj: -3,
                unified: [("pids.max".to_string(), "9".to_string())].into(),
                ..res()
            },
        );
        assert_eq!(m.cpu_shares, 1024);
        assert_eq!((m.cpu_quota, m.cpu_period), (50_000, 100_000));
        assert_eq!(m.memory_limit_in_bytes, 512 << 20);
        assert_eq!(
            m.memory_swap_limit_in_bytes, 0,
            "a swap limit below the new limit goes"
        );
        assert_eq!(m.oom_score_adj, 500, "not updatable");
        assert_eq!(m.unified.len(), 2);
        // Lowering keeps an old swap limit that is still above the new memory limit.
        let m = merge(
            &old,
            &LinuxContainerResources {
                memory_limit_in_bytes: 32 << 20,
                ..res()
            },
        );
        assert_eq!(m.memory_swap_limit_in_bytes, 256 << 20);
    }

    #[test]
    fn oci_json_is_what_runc_update_reads() {
        let r = LinuxContainerResources {
            cpu_shares: 256,
            memory_limit_in_bytes: 32 << 20,
            ..res()
        };
        let v: serde_json::Value =
            serde_json::from_slice(&oci_json(&r, false).expect("json")).expect("parse");
        assert_eq!(v["memory"]["limit"], 32 << 20);
        assert_eq!(v["memory"]["swap"], 32 << 20);
        assert_eq!(v["cpu"]["shares"], 256);
    }

    #[test]
    fn devices_survive_a_bundle_update() {
        let old = serde_json::json!({"devices": [{"allow": false, "access": "rwm"}], "memory": {"limit": 1}});
        let new = serde_json::json!({"memory": {"limit": 2}});
        let m = merge_devices(Some(&old), new);
        assert_eq!(m["memory"]["limit"], 2);
        assert_eq!(m["devices"][0]["access"], "rwm");
    }

    #[tokio::test]
    async fn update_of_a_created_container_is_kept_in_its_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Daemon::for_test(dir.path()).containers;
        let e = update_container_resources(
            &d,
            UpdateContainerResourcesRequest {
                container_id: "nope".into(),
                linux: Some(res()),
                ..Default::default()
            },
        )
        .await
        .expect_err("unknown");
        assert_eq!(e.kind, ErrorKind::NotFound);
        let mut rec = crate::container::exec::tests::test_record("c1", ContainerState::Created);
        rec.config_pb = containers::encode_config(&ContainerConfig {
            linux: Some(LinuxContainerConfig {
                resources: Some(LinuxContainerResources {
                    cpu_shares: 2,
                    ..res()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        d.store.put("c1", &rec).expect("put");
        let e = update_container_resources(
            &d,
            UpdateContainerResourcesRequest {
                container_id: "c1".into(),
                linux: Some(LinuxContainerResources {
                    cpu_shares: -1,
                    ..res()
                }),
                ..Default::default()
            },
        )
        .await
        .expect_err("negative shares");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        update_container_resources(
            &d,
            UpdateContainerResourcesRequest {
                container_id: "c1".into(),
                linux: Some(LinuxContainerResources {
                    memory_limit_in_bytes: 64 << 20,
                    ..res()
                }),
                ..Default::default()
            },
        )
        .await
        .expect("update");
        let got = d
            .store
            .get::<ContainerRecord>("c1")
            .expect("get")
            .expect("record");
        let r = containers::container_config(&got)
            .linux
            .and_then(|l| l.resources)
            .expect("resources");
        assert_eq!((r.cpu_shares, r.memory_limit_in_bytes), (2, 64 << 20));
        assert_eq!(got.state, ContainerState::Created);
    }

    /// cgroup v2 over a fake root: a limit below the container's memory.current is refused
    /// naming the field, the value and the usage; above it, or with the cgroup gone (the
    /// container exited meanwhile), it passes.
    #[test]
    fn a_shrink_below_usage_is_refused_on_v2() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Daemon::for_test(dir.path()).containers;
        d.store
            .put("p1", &crate::pod::resources::tests::pod("/kp/podu"))
            .expect("put");
        // In pod p1.
        let rec = crate::container::exec::tests::test_record("c1", ContainerState::Running);
        let root = crate::cgroup::tests::fake_root(
            true,
            &[("kp/podu/crisp-c1/memory.current", "31457280\n")],
        );
        let h = Hierarchy::at(root.path());
        let e = check_memory_shrink(&d, &h, &rec, 16 << 20).expect_err("below usage");
        assert_eq!(e.kind, ErrorKind::FailedPrecondition);
        for part in ["linux.memory_limit_in_bytes", "16777216", "31457280", "c1"] {
            assert!(e.message.contains(part), "{part}: {}", e.message);
        }
        check_memory_shrink(&d, &h, &rec, 64 << 20).expect("above usage");
        check_memory_shrink(&d, &h, &rec, 0).expect("no limit");
        std::fs::remove_dir_all(root.path().join("kp")).expect("rm");
        check_memory_shrink(&d, &h, &rec, 16 << 20).expect("exited meanwhile");
    }
}
