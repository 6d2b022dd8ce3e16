//! StopPodSandbox and RemovePodSandbox for what crispd itself owns: the pod's network (CNI DEL
//! and its netns), its ID range, its resolv.conf/hosts/hostname files and its records. Both are
//! idempotent and safe to call many times at once (promise 3): each pod's transitions run under
//! its own lock; the store is only touched in short transactions between the slow steps.
//!
//! Stopping the pod's processes is the shim's part (its sandbox service); until crispd talks
//! to the shim, a pod record can only come from a crispd that did (or from recovery), and these
//! calls still release everything crispd holds for it.

use std::path::Path;

use crisp_proto::cri::v1::{
    RemovePodSandboxRequest, RemovePodSandboxResponse, StopPodSandboxRequest,
    StopPodSandboxResponse,
};

use crate::cni::AttachRequest;
use crate::daemon::Daemon;
use crate::instrument::{CriError, ErrorKind};
use crate::store::records::{ContainerRecord, PodRecord, PodState};

/// Run one named undo step; log its outcome by name.
fn step(pod_id: &str, name: &'static str, r: Result<(), String>) -> Result<(), CriError> {
    match r {
        Ok(()) => {
            tracing::debug!(pod_id, step = name, "done");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(pod_id, step = name, error = %e, "failed");
            Err(CriError::internal(format!("pod {pod_id}: {name}: {e}")))
        }
    }
}

async fn release_network(d: &Daemon, rec: &PodRecord) -> Result<(), CriError> {
    let Some(netns) = rec.netns_path.clone() else {
        return Ok(());
    };
    let cni = std::sync::Arc::clone(&d.cni);
    let req = AttachRequest {
        pod_id: rec.id.clone(),
        netns: netns.clone(),
        ifname: "eth0".into(),
        args: Default::default(),
        port_mappings: vec![],
    };
    // Plugins are processes: run them off the async workers, with no lock on the store.
    let r = tokio::task::spawn_blocking(move || cni.del(&req))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    step(&rec.id, "cni del", r)?;
    let r = crate::netns::remove(Path::new(&netns)).map_err(|e| e.to_string());
    step(&rec.id, "remove netns", r)
}

pub async fn stop(
    d: &Daemon,
    req: StopPodSandboxRequest,
) -> Result<StopPodSandboxResponse, CriError> {
    let rec = crate::cri::pods::find(&d.store, &req.pod_sandbox_id)?;
    let _g = d.pod_locks.lock(&rec.id).await;
    // Re-read under the lock: a concurrent Remove may have finished meanwhile.
    let Some(mut rec) = d.store.get::<PodRecord>(&rec.id)? else {
        return Ok(StopPodSandboxResponse {});
    };
    for (id, c) in d.store.list::<ContainerRecord>()? {
        if c.pod_id == rec.id && c.state == crate::store::records::ContainerState::Running {
            // Without a shim connection the container's state cannot be confirmed; say so.
            let mut c = c;
            c.state = crate::store::records::ContainerState::Unknown;
            d.store.put(&id, &c)?;
        }
    }
    release_network(d, &rec).await?;
    if rec.state != PodState::NotReady || rec.netns_path.is_some() {
        rec.state = PodState::NotReady;
        // The netns is gone; keep IPs for status, as containerd does until removal.
        d.store.put(&rec.id, &rec)?;
    }
    Ok(StopPodSandboxResponse {})
}

pub async fn remove(
    d: &Daemon,
    req: RemovePodSandboxRequest,
) -> Result<RemovePodSandboxResponse, CriError> {
    let rec = match crate::cri::pods::find(&d.store, &req.pod_sandbox_id) {
        Ok(r) => r,
        // CRI: removing a pod that is already gone is not an error.
        Err(e) if e.kind == ErrorKind::NotFound => return Ok(RemovePodSandboxResponse {}),
        Err(e) => return Err(e),
    };
    let _g = d.pod_locks.lock(&rec.id).await;
    let Some(rec) = d.store.get::<PodRecord>(&rec.id)? else {
        return Ok(RemovePodSandboxResponse {});
    };
    release_network(d, &rec).await?;
    for (id, c) in d.store.list::<ContainerRecord>()? {
        if c.pod_id == rec.id {
            d.store.delete::<ContainerRecord>(&id)?;
        }
    }
    let dir = crate::sandbox_files::pod_dir(&d.cfg.state, &rec.id);
    step(&rec.id, "remove pod files", remove_pod_files(&dir))?;
    let r = d
        .idmap
        .release(&rec.id)
        .map(|_| ())
        .map_err(|e| e.to_string());
    step(&rec.id, "release id range", r)?;
    // Last: while the record exists, a retry can still find and finish the removal.
    d.store.delete::<PodRecord>(&rec.id)?;
    tracing::info!(pod_id = %rec.id, "pod removed");
    Ok(RemovePodSandboxResponse {})
}

/// Remove the pod's own files one by one and then the (then empty) directory: never a
/// recursive delete, which could cross a mount point (promise 5's rule, applied here too).
fn remove_pod_files(dir: &Path) -> Result<(), String> {
    for name in ["resolv.conf", "hosts", "hostname"] {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", dir.join(name).display())),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::{ContainerState, IdRangeRecord};
    use std::sync::Arc;

    fn pod(id: &str, netns: Option<String>) -> PodRecord {
        PodRecord {
            id: id.into(),
            name: id.into(),
            namespace: "ns".into(),
            uid: id.into(),
            attempt: 0,
            state: PodState::Ready,
            created_at: 1,
            runtime_handler: String::new(),
            config_pb: String::new(),
            netns_path: netns,
            ips: vec!["10.0.0.2".into()],
            shim_address: None,
            pause_pid: None,
            cgroup_parent: String::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn stop_and_remove_are_idempotent_and_concurrent_safe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Arc::new(Daemon::for_test(dir.path()));
        let netns_dir = d.cfg.netns_dir();
        let root = nix::unistd::geteuid().is_root();
        for i in 0..8 {
            let id = format!("pod{i}");
            // Real namespaces when we can make them; plain files otherwise.
            let ns = netns_dir.join(&id);
            if root {
                crate::netns::create(&ns).expect("netns");
            } else {
                std::fs::create_dir_all(&netns_dir).expect("mkdir");
                std::fs::write(&ns, "").expect("file");
            }
            d.store
                .put(&id, &pod(&id, Some(ns.display().to_string())))
                .expect("pod");
            d.store
                .put(
                    &id,
                    &IdRangeRecord {
                        host_uid: 1,
                        host_gid: 1,
                        len: 65536,
                    },
                )
                .expect("range");
            let c = ContainerRecord {
                id: format!("c{i}"),
                pod_id: id.clone(),
                name: "c".into(),
                attempt: 0,
                state: ContainerState::Running,
                created_at: 1,
                started_at: 1,
                finished_at: 0,
                exit_code: 0,
                reason: String::new(),
                message: String::new(),
                image: String::new(),
                image_ref: String::new(),
                log_path: String::new(),
                config_pb: String::new(),
                pid: None,
            };
            d.store.put(&c.id.clone(), &c).expect("ctr");
            crate::sandbox_files::write(
                &crate::sandbox_files::pod_dir(&d.cfg.state, &id),
                "h",
                None,
                dir.path(),
            )
            .expect("files");
        }
        // Every pod stopped and removed twice, all at once, shuffled by interleaving.
        let mut tasks = Vec::new();
        for round in 0..2 {
            for i in 0..8 {
                let dd = Arc::clone(&d);
                let id = format!("pod{i}");
                tasks.push(tokio::spawn(async move {
                    if (i + round) % 2 == 0 {
                        stop(
                            &dd,
                            StopPodSandboxRequest {
                                pod_sandbox_id: id.clone(),
                            },
                        )
                        .await
                        .map(|_| ())
                    } else {
                        remove(
                            &dd,
                            RemovePodSandboxRequest {
                                pod_sandbox_id: id.clone(),
                            },
                        )
                        .await
                        .map(|_| ())
                    }
                }));
                let dd = Arc::clone(&d);
                let id = format!("pod{i}");
                tasks.push(tokio::spawn(async move {
                    remove(&dd, RemovePodSandboxRequest { pod_sandbox_id: id })
                        .await
                        .map(|_| ())
                }));
            }
        }
        for t in tasks {
            match t.await.expect("task") {
                Ok(()) => {}
                Err(e) => assert_eq!(e.kind, ErrorKind::NotFound, "only OK or NotFound: {e}"),
            }
        }
        assert_eq!(d.store.count(crate::store::PODS).expect("count"), 0);
        assert_eq!(d.store.count(crate::store::CONTAINERS).expect("count"), 0);
        assert_eq!(d.store.count(crate::store::ID_RANGES).expect("count"), 0);
        assert!(crate::netns::list(&netns_dir).is_empty(), "no netns left");
        assert!(
            std::fs::read_dir(d.cfg.state.join("pods"))
                .map(|r| r.count())
                .unwrap_or(0)
                == 0
        );
        assert!(d.pod_locks.is_empty(), "lock map drained");
        crate::netns::release_dir_if_empty(&netns_dir);
        // Gone pods: Remove is OK, Stop is NotFound.
        remove(
            &d,
            RemovePodSandboxRequest {
                pod_sandbox_id: "pod0".into(),
            },
        )
        .await
        .expect("ok");
        let e = stop(
            &d,
            StopPodSandboxRequest {
                pod_sandbox_id: "pod0".into(),
            },
        )
        .await
        .expect_err("gone");
        assert_eq!(e.kind, ErrorKind::NotFound);
    }
}
