//! StopPodSandbox and RemovePodSandbox: find the pod, take its lock, re-read its record and
//! hand over to `pod::release`. Both are idempotent and safe to call many times at once
//! (promise 3): each pod's transitions run under its own lock.

use crisp_proto::cri::v1::{
    RemovePodSandboxRequest, RemovePodSandboxResponse, StopPodSandboxRequest,
    StopPodSandboxResponse,
};

use crate::error::{CriError, ErrorKind};
use crate::pod::release;
use crate::pod::service::PodService;
use crate::store::records::PodRecord;

pub async fn stop(
    d: &PodService,
    req: StopPodSandboxRequest,
) -> Result<StopPodSandboxResponse, CriError> {
    let rec = match crate::pod::status::find(&d.store, &req.pod_sandbox_id) {
        Ok(r) => r,
        // CRI: StopPodSandbox is idempotent; a pod already removed (or never here) has
        // nothing left to stop. An empty or ambiguous id is still an error.
        Err(e) if e.kind == ErrorKind::NotFound => return Ok(StopPodSandboxResponse {}),
        Err(e) => return Err(e),
    };
    let _g = d.pod_locks.lock(&rec.id).await;
    // Re-read under the lock: a concurrent Remove may have finished meanwhile.
    let Some(mut rec) = d.store.get::<PodRecord>(&rec.id)? else {
        return Ok(StopPodSandboxResponse {});
    };
    release::stop_locked(d, &mut rec).await?;
    tracing::info!(pod_id = %rec.id, "pod stopped");
    Ok(StopPodSandboxResponse {})
}

pub async fn remove(
    d: &PodService,
    req: RemovePodSandboxRequest,
) -> Result<RemovePodSandboxResponse, CriError> {
    let rec = match crate::pod::status::find(&d.store, &req.pod_sandbox_id) {
        Ok(r) => r,
        // CRI: removing a pod that is already gone is not an error.
        Err(e) if e.kind == ErrorKind::NotFound => return Ok(RemovePodSandboxResponse {}),
        Err(e) => return Err(e),
    };
    let _g = d.pod_locks.lock(&rec.id).await;
    let Some(mut rec) = d.store.get::<PodRecord>(&rec.id)? else {
        return Ok(RemovePodSandboxResponse {});
    };
    release::remove_locked(d, &mut rec).await?;
    tracing::info!(pod_id = %rec.id, "pod removed");
    Ok(RemovePodSandboxResponse {})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::Daemon;
    use crate::store::records::PodState;
    use crate::store::records::{ContainerRecord, ContainerState, IdRangeRecord};
    use std::sync::Arc;

    fn pod(id: &str, netns: Option<String>) -> PodRecord {
        PodRecord {
            name: id.into(),
            namespace: "ns".into(),
            uid: id.into(),
            netns_path: netns,
            ips: vec!["10.0.0.2".into()],
            ..PodRecord::for_test(id, PodState::Ready)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn stop_and_remove_are_idempotent_and_concurrent_safe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Daemon::for_test(dir.path()).pods;
        let netns_dir = d.cfg.netns_dir();
        let root = nix::unistd::geteuid().is_root();
        for i in 0..8 {
            let id = format!("pod{i}");
            // Real namespaces when we can make them; plain files otherwise.
            let ns = netns_dir.join(&id);
            if root {
                crate::network::netns::create(&ns).expect("netns");
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
                name: "c".into(),
                started_at: 1,
                ..ContainerRecord::for_test(&format!("c{i}"), &id, ContainerState::Running)
            };
            d.store.put(&c.id.clone(), &c).expect("ctr");
            std::fs::write(dir.path().join("resolv.conf"), "nameserver 127.0.0.1\n")
                .expect("resolv");
            crate::pod::files::write(
                &crate::pod::files::pod_dir(&d.cfg.state, &id),
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
        assert_eq!(d.store.count(crate::store::ID_RANGES).expect("count"), 0);
        assert!(
            crate::network::netns::list(&netns_dir).is_empty(),
            "no netns left"
        );
        assert!(
            std::fs::read_dir(d.cfg.state.join("pods"))
                .map(|r| r.count())
                .unwrap_or(0)
                == 0
        );
        assert!(d.pod_locks.is_empty(), "lock map drained");
        crate::network::netns::release_dir_if_empty(&netns_dir);
        // Gone pods: Remove and Stop are both OK (CRI: idempotent).
        remove(
            &d,
            RemovePodSandboxRequest {
                pod_sandbox_id: "pod0".into(),
            },
        )
        .await
        .expect("remove of a removed pod");
        stop(
            &d,
            StopPodSandboxRequest {
                pod_sandbox_id: "pod0".into(),
            },
        )
        .await
        .expect("stop of a removed pod");
    }
}
