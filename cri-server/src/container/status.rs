//! Read-only container calls answered from the store: ListContainers (filters by id, pod,
//! state, labels) and ContainerStatus. Live state comes from the shim's events, which update
//! the records; these calls never wait on a shim.

use std::collections::HashMap;

use crisp_proto::cri::v1::{
    Container, ContainerConfig, ContainerFilter, ContainerResources, ContainerState as PbState,
    ContainerStatus, ContainerStatusRequest, ContainerStatusResponse, ContainerUser, ImageSpec,
    LinuxContainerResources, LinuxContainerUser, ListContainersRequest, ListContainersResponse,
};
use prost::Message;

use crisp_shim::placement::CgroupDriver;

use crate::cgroup::{self, Hierarchy, limits};
use crate::error::CriError;
use crate::store::Store;
use crate::store::records::{ContainerRecord, ContainerState, PodRecord};

pub fn container_config(rec: &ContainerRecord) -> ContainerConfig {
    crate::util::hex_decode(&rec.config_pb)
        .and_then(|b| ContainerConfig::decode(b.as_slice()).ok())
        .unwrap_or_default()
}

pub fn encode_config(cfg: &ContainerConfig) -> String {
    crate::util::hex_encode(&cfg.encode_to_vec())
}

pub fn state_of(rec: &ContainerRecord) -> PbState {
    match rec.state {
        ContainerState::Created => PbState::ContainerCreated,
        ContainerState::Running => PbState::ContainerRunning,
        ContainerState::Exited => PbState::ContainerExited,
        ContainerState::Unknown => PbState::ContainerUnknown,
    }
}

pub fn matches(rec: &ContainerRecord, cfg: &ContainerConfig, f: &ContainerFilter) -> bool {
    (f.id.is_empty() || rec.id.starts_with(&f.id))
        && (f.pod_sandbox_id.is_empty() || rec.pod_id.starts_with(&f.pod_sandbox_id))
        && f.state
            .as_ref()
            .is_none_or(|s| s.state == state_of(rec) as i32)
        && f.label_selector
            .iter()
            .all(|(k, v)| cfg.labels.get(k) == Some(v))
}

pub fn list_containers(
    store: &Store,
    req: ListContainersRequest,
) -> Result<ListContainersResponse, CriError> {
    let filter = req.filter.unwrap_or_default();
    let mut containers = Vec::new();
    for (_, rec) in store.list::<ContainerRecord>()? {
        let cfg = container_config(&rec);
        if !matches(&rec, &cfg, &filter) {
            continue;
        }
        containers.push(Container {
            id: rec.id.clone(),
            pod_sandbox_id: rec.pod_id.clone(),
            metadata: cfg.metadata.clone(),
            image: Some(ImageSpec {
                image: rec.image.clone(),
                ..Default::default()
            }),
            // The id here, the repo digest only in ContainerStatus: containerd does the same.
            image_ref: rec.image_ref.clone(),
            image_id: rec.image_ref.clone(),
            state: state_of(&rec) as i32,
            created_at: rec.created_at,
            labels: cfg.labels.clone(),
            annotations: cfg.annotations.clone(),
        });
    }
    containers.sort_by_key(|c| c.created_at);
    Ok(ListContainersResponse { containers })
}

pub fn find(store: &Store, id: &str) -> Result<ContainerRecord, CriError> {
    crate::store::find_by_id_or_prefix(
        store,
        id,
        "container_id",
        "container",
        |r: &ContainerRecord| &r.id,
    )
}

pub fn container_status(
    store: &Store,
    images: &crisp_image::Images,
    state: &std::path::Path,
    driver: CgroupDriver,
    req: ContainerStatusRequest,
) -> Result<ContainerStatusResponse, CriError> {
    let rec = find(store, &req.container_id)?;
    let mut resp = status_of(&rec, images, state, req.verbose);
    if rec.state == ContainerState::Running
        && let Some(st) = resp.status.as_mut()
    {
        let wanted = st
            .resources
            .as_ref()
            .and_then(|r| r.linux.clone())
            .unwrap_or_default();
        if let Some(applied) = applied_resources(store, &Hierarchy::host(), driver, &rec, &wanted) {
            st.resources = Some(ContainerResources {
                linux: Some(applied),
                windows: None,
            });
        }
    }
    Ok(resp)
}

/// The resources a running container's cgroup holds, as `limits::reported` shows them
/// against what was asked, so kubelet's resize loop sees what the kernel applied. None (the
/// record's figures stand) when the cgroup cannot be read: it exited meanwhile, or the
/// read failed, which is logged.
pub fn applied_resources(
    store: &Store,
    h: &Hierarchy,
    driver: CgroupDriver,
    rec: &ContainerRecord,
    wanted: &LinuxContainerResources,
) -> Option<LinuxContainerResources> {
    let read = || -> Result<LinuxContainerResources, CriError> {
        let pod = store
            .get::<PodRecord>(&rec.pod_id)?
            .ok_or_else(|| CriError::not_found(format!("pod {} is gone", rec.pod_id)))?;
        let rel = cgroup::container_dir(driver, &pod.cgroup_parent, &rec.id)?;
        Ok(limits::read(h, &rel)?)
    };
    match read() {
        Ok(applied) => Some(limits::reported(&applied, wanted, h.is_v2())),
        Err(e) => {
            if e.kind != crate::error::ErrorKind::NotFound {
                tracing::warn!(container_id = %rec.id, error = %e,
                    "ContainerStatus: reading the container's cgroup limits failed; reporting the recorded ones");
            }
            None
        }
    }
}

/// The image and image_ref ContainerStatus reports, from one lookup of the image, as
/// containerd does. kubelet's config names the image by id, so:
/// - `image` is the image's first repo tag (`docker.io/library/busybox:latest`) when the
///   image is still here and has one, which is what a user reads in the pod's status; else
///   the config's image spec as given;
/// - `image_ref`, which kubelet shows as the container's imageID, is the image's first repo
///   digest (`docker.io/library/busybox@sha256:…`) when it has one, else the image id the
///   record holds. The record keeps the id because a digest names content the node may no
///   longer have.
pub fn image_names(
    images: &crisp_image::Images,
    rec: &ContainerRecord,
    cfg: &ContainerConfig,
) -> (ImageSpec, String) {
    let configured = cfg.image.clone().unwrap_or_else(|| ImageSpec {
        image: rec.image.clone(),
        ..Default::default()
    });
    if rec.image_ref.is_empty() {
        return (configured, String::new());
    }
    match images.status(&rec.image_ref) {
        Ok(Some(image)) => {
            let spec = match image.repo_tags.first() {
                // Only the tag, as containerd answers (the config's annotations stay with it).
                Some(tag) => ImageSpec {
                    image: tag.clone(),
                    ..Default::default()
                },
                None => configured,
            };
            let image_ref = image
                .repo_digests
                .into_iter()
                .next()
                .unwrap_or_else(|| rec.image_ref.clone());
            (spec, image_ref)
        }
        Ok(None) => (configured, rec.image_ref.clone()),
        // A status is still worth answering with the config's names (containerd fails the
        // call instead; kubelet would then see no status at all for a broken image record).
        Err(e) => {
            tracing::warn!(container_id = %rec.id, image = %rec.image_ref, error = %e,
                "image lookup for ContainerStatus failed; reporting the config's image and the image id");
            (configured, rec.image_ref.clone())
        }
    }
}

/// A record as CRI's ContainerStatus; `verbose` adds containerd-style info (pid, bundle,
/// snapshot key, the OCI spec as the shim runs it).
pub fn status_of(
    rec: &ContainerRecord,
    images: &crisp_image::Images,
    state: &std::path::Path,
    verbose: bool,
) -> ContainerStatusResponse {
    let cfg = container_config(rec);
    let bundle = crate::container::bundle::dir(state, &rec.id);
    // The spec the shim handed to the OCI runtime: the bundle lives from CreateContainer to
    // RemoveContainer, as long as the record does.
    let spec = crate::container::bundle::read_spec(&bundle);
    if spec.is_none() {
        tracing::warn!(container_id = %rec.id, bundle = %bundle.display(),
            "ContainerStatus: the bundle's config.json is unreadable; no user, no runtimeSpec");
    }
    let user = spec.as_ref().and_then(user_of);
    let mut info = HashMap::new();
    if verbose {
        // containerd's key names (sandboxID, pid, snapshotKey, runtimeSpec) where it has one.
        let v = serde_json::json!({
            "sandboxID": rec.pod_id,
            "pid": rec.pid,
            "bundle": bundle.display().to_string(),
            "snapshotKey": rec.id,
            "logPath": rec.log_path,
            "runtimeSpec": spec,
        });
        info.insert("info".to_string(), v.to_string());
    }
    let (image, image_ref) = image_names(images, rec, &cfg);
    ContainerStatusResponse {
        status: Some(ContainerStatus {
            id: rec.id.clone(),
            metadata: cfg.metadata.clone(),
            state: state_of(rec) as i32,
            created_at: rec.created_at,
            started_at: rec.started_at,
            finished_at: rec.finished_at,
            exit_code: rec.exit_code,
            image: Some(image),
            image_ref,
            image_id: rec.image_ref.clone(),
            reason: rec.reason.clone(),
            message: rec.message.clone(),
            labels: cfg.labels.clone(),
            annotations: cfg.annotations.clone(),
            mounts: cfg.mounts.clone(),
            log_path: rec.log_path.clone(),
            // The config's resources, kept current by UpdateContainerResources (containerd
            // reports the same).
            resources: cfg
                .linux
                .as_ref()
                .and_then(|l| l.resources.clone())
                .map(|r| crisp_proto::cri::v1::ContainerResources {
                    linux: Some(r),
                    windows: None,
                }),
            user,
            stop_signal: effective_stop_signal(rec, &cfg),
        }),
        info,
    }
}

/// ContainerStatus.stop_signal (KEP-4960): the signal StopContainer sends, as CreateContainer
/// fixed it (the config's over the image's STOPSIGNAL over SIGTERM). A record of an older
/// crispd has none: then the config's, as that crispd reported.
fn effective_stop_signal(rec: &ContainerRecord, cfg: &ContainerConfig) -> i32 {
    rec.stop_signal
        .as_deref()
        .and_then(crisp_proto::cri::v1::Signal::from_str_name)
        .map(|s| s as i32)
        .unwrap_or(cfg.stop_signal)
}

/// ContainerStatus.user: the uid, gid and supplementary groups the container's first process
/// was started with, which CRI defines it as ("initially attached to the first process"),
/// read from the OCI spec's `process.user` as containerd does. These are IDs inside the
/// container: with a user namespace the spec holds them unmapped, as the pod asked for them.
/// The runtime applies them as written (setgroups(additionalGids), setgid, setuid), so they
/// are what /proc/<pid>/status shows for that process, mapped back into its namespace.
fn user_of(spec: &serde_json::Value) -> Option<ContainerUser> {
    let user = spec.get("process")?.get("user")?;
    let id = |v: &serde_json::Value| v.as_u64().map(|n| n as i64);
    let supplemental_groups = match user.get("additionalGids") {
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(id).collect(),
        _ => Vec::new(),
    };
    Some(ContainerUser {
        linux: Some(LinuxContainerUser {
            uid: id(user.get("uid")?)?,
            gid: id(user.get("gid")?)?,
            supplemental_groups,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crisp_proto::cri::v1::{ContainerMetadata, ContainerStateValue};

    fn rec(
        id: &str,
        pod: &str,
        state: ContainerState,
        tier: &str,
        created: i64,
    ) -> ContainerRecord {
        let cfg = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: format!("n-{id}"),
                attempt: 1,
            }),
            labels: [("tier".to_string(), tier.to_string())].into(),
            log_path: format!("{id}/0.log"),
            ..Default::default()
        };
        let exited = state == ContainerState::Exited;
        ContainerRecord {
            name: format!("n-{id}"),
            attempt: 1,
            created_at: created,
            started_at: if state == ContainerState::Created {
                0
            } else {
                created + 1
            },
            finished_at: if exited { created + 2 } else { 0 },
            exit_code: i32::from(exited),
            reason: if exited {
                "Error".into()
            } else {
                String::new()
            },
            image: "busybox".into(),
            image_ref: "sha256:abc".into(),
            log_path: format!("/var/log/pods/x/{id}/0.log"),
            config_pb: encode_config(&cfg),
            pid: Some(7),
            ..ContainerRecord::for_test(id, pod, state)
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&d.path().join("crisp.db")).expect("store");
        s.put("c1", &rec("c1", "p1", ContainerState::Running, "web", 3))
            .expect("put");
        s.put("c2", &rec("c2", "p1", ContainerState::Exited, "db", 1))
            .expect("put");
        s.put("d3", &rec("d3", "p2", ContainerState::Created, "web", 2))
            .expect("put");
        (d, s)
    }

    fn ids(r: ListContainersResponse) -> Vec<String> {
        r.containers.into_iter().map(|c| c.id).collect()
    }

    #[test]
    fn list_filters() {
        let (_d, s) = store();
        let f = |filter: ContainerFilter| {
            ids(list_containers(
                &s,
                ListContainersRequest {
                    filter: Some(filter),
                },
            )
            .expect("list"))
        };
        assert_eq!(f(ContainerFilter::default()), vec!["c2", "d3", "c1"]);
        assert_eq!(
            f(ContainerFilter {
                pod_sandbox_id: "p1".into(),
                ..Default::default()
            }),
            vec!["c2", "c1"]
        );
        assert_eq!(
            f(ContainerFilter {
                id: "d".into(),
                ..Default::default()
            }),
            vec!["d3"]
        );
        assert_eq!(
            f(ContainerFilter {
                state: Some(ContainerStateValue {
                    state: PbState::ContainerRunning as i32
                }),
                ..Default::default()
            }),
            vec!["c1"]
        );
        assert_eq!(
            f(ContainerFilter {
                label_selector: [("tier".into(), "web".into())].into(),
                ..Default::default()
            }),
            vec!["d3", "c1"]
        );
    }

    #[test]
    fn image_of_an_unknown_image_is_the_configs_spec() {
        let d = tempfile::tempdir().expect("tempdir");
        let images = crate::daemon::Daemon::for_test(d.path()).images;
        let r = rec("c1", "p1", ContainerState::Running, "web", 1);
        // As kubelet sends it: the id, and what the pod spec said.
        let spec = ImageSpec {
            image: "sha256:abc".into(),
            user_specified_image: "busybox".into(),
            ..Default::default()
        };
        let cfg = ContainerConfig {
            image: Some(spec.clone()),
            ..Default::default()
        };
        assert_eq!(
            image_names(&images, &r, &cfg),
            (spec, "sha256:abc".to_string())
        );
    }

    #[test]
    fn user_is_the_specs_process_user_and_absent_without_a_bundle() {
        let (d, s) = store();
        let images = crate::daemon::Daemon::for_test(d.path()).images;
        let state = d.path().join("state");
        let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "cwd": "/",
                "user": {"uid": 1000, "gid": 1000, "additionalGids": [1000, 1234, 50000]},
            },
        }))
        .expect("spec");
        crate::container::bundle::create(&crate::container::bundle::dir(&state, "c1"), &spec)
            .expect("bundle");
        let status = |id: &str| {
            container_status(
                &s,
                &images,
                &state,
                CgroupDriver::Cgroupfs,
                ContainerStatusRequest {
                    container_id: id.into(),
                    verbose: false,
                },
            )
            .expect("status")
            .status
            .expect("status")
        };
        assert_eq!(
            status("c1").user,
            Some(ContainerUser {
                linux: Some(LinuxContainerUser {
                    uid: 1000,
                    gid: 1000,
                    supplemental_groups: vec![1000, 1234, 50000],
                }),
            })
        );
        assert_eq!(
            status("c2").user,
            None,
            "no bundle: no user, not a made-up one"
        );
    }

    #[test]
    fn status_reports_exit_and_reason() {
        let (d, s) = store();
        let images = crate::daemon::Daemon::for_test(d.path()).images;
        let r = container_status(
            &s,
            &images,
            std::path::Path::new("/nonexistent"),
            CgroupDriver::Cgroupfs,
            ContainerStatusRequest {
                container_id: "c2".into(),
                verbose: true,
            },
        )
        .expect("status");
        let st = r.status.expect("status");
        assert_eq!(st.state, PbState::ContainerExited as i32);
        assert_eq!((st.exit_code, st.reason.as_str()), (1, "Error"));
        assert_eq!(st.finished_at, 3);
        assert_eq!(
            st.metadata.map(|m| (m.name, m.attempt)),
            Some(("n-c2".into(), 1))
        );
        assert_eq!(st.log_path, "/var/log/pods/x/c2/0.log");
        assert!(r.info["info"].contains("\"sandboxID\":\"p1\""));
        assert!(r.info["info"].contains("\"snapshotKey\":\"c2\""));
        // An image the store does not know (removed since): both fields keep the id, and the
        // image is the one the record names (the config here has none).
        assert_eq!(
            (st.image_ref.as_str(), st.image_id.as_str()),
            ("sha256:abc", "sha256:abc")
        );
        assert_eq!(st.image.map(|i| i.image), Some("busybox".to_string()));
        let e = container_status(
            &s,
            &images,
            std::path::Path::new("/nonexistent"),
            CgroupDriver::Cgroupfs,
            ContainerStatusRequest {
                container_id: "nope".into(),
                verbose: false,
            },
        )
        .expect_err("unknown");
        assert_eq!(e.kind, ErrorKind::NotFound);
        let e = container_status(
            &s,
            &images,
            std::path::Path::new("/nonexistent"),
            CgroupDriver::Cgroupfs,
            ContainerStatusRequest {
                container_id: "c".into(),
                verbose: false,
            },
        )
        .expect_err("ambiguous");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
    }

    /// A running container's status reports what its cgroup holds (v2, fake root): the asked
    /// values where only the kernel's rounding differs, the cgroup's where it really differs.
    #[test]
    fn running_status_reads_the_cgroup_back() {
        let (_d, s) = store();
        let pod = crate::pod::resources::tests::pod("/kp/podu");
        s.put("p1", &pod).expect("put");
        let root = crate::cgroup::tests::fake_root(
            true,
            &[
                ("kp/podu/crisp-c1/memory.max", "99999744\n"),
                ("kp/podu/crisp-c1/cpu.weight", "59\n"),
                ("kp/podu/crisp-c1/cpu.max", "20000 100000\n"),
            ],
        );
        let h = Hierarchy::at(root.path());
        let rec = find(&s, "c1").expect("c1");
        let wanted = LinuxContainerResources {
            memory_limit_in_bytes: 100_000_000,
            cpu_shares: 1536,
            cpu_quota: 50_000,
            cpu_period: 100_000,
            oom_score_adj: 7,
            ..Default::default()
        };
        let got = applied_resources(&s, &h, CgroupDriver::Cgroupfs, &rec, &wanted).expect("read");
        assert_eq!(got.memory_limit_in_bytes, 100_000_000);
        assert_eq!(got.cpu_shares, 1536);
        assert_eq!(got.cpu_quota, 20_000, "the cgroup's, not the asked 50000");
        assert_eq!(got.oom_score_adj, 7, "no cgroup file: as asked");
        // No cgroup (exited meanwhile): the record's figures stand.
        std::fs::remove_dir_all(root.path().join("kp")).expect("rm");
        assert_eq!(
            applied_resources(&s, &h, CgroupDriver::Cgroupfs, &rec, &wanted),
            None
        );
    }
}
