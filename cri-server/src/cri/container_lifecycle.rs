//! CreateContainer, StartContainer, StopContainer, RemoveContainer: check the request, find
//! the container (or its pod), take the locks in order (pod → container, see
//! `container::lifecycle`), re-read the record under them and hand over to the lifecycle.

use std::time::Duration;

use crisp_proto::cri::v1::{
    CreateContainerRequest, CreateContainerResponse, RemoveContainerRequest,
    RemoveContainerResponse, StartContainerRequest, StartContainerResponse, StopContainerRequest,
    StopContainerResponse,
};

use crate::container::lifecycle::{self, can_start};
use crate::container::service::ContainerService;
use crate::error::{CriError, ErrorKind};
use crate::store::records::{ContainerRecord, PodRecord, PodState};

pub async fn create_container(
    d: &ContainerService,
    req: CreateContainerRequest,
) -> Result<CreateContainerResponse, CriError> {
    // The sandbox first, as containerd does: a call for an unknown pod is NotFound whatever
    // else is wrong with it.
    let pod = crate::pod::status::find(&d.store, &req.pod_sandbox_id)?;
    let cfg = req
        .config
        .ok_or_else(|| CriError::invalid("config is missing"))?;
    let meta = cfg
        .metadata
        .clone()
        .ok_or_else(|| CriError::invalid("config.metadata is missing"))?;
    if meta.name.is_empty() {
        return Err(CriError::invalid("config.metadata.name is empty"));
    }
    let image_name = cfg
        .image
        .as_ref()
        .map(|i| i.image.trim().to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| CriError::invalid("config.image.image is empty"))?;
    let _pod_guard = d.pod_locks.lock(&pod.id).await;
    // Re-read under the lock: the pod may have been stopped or removed meanwhile.
    let pod = d
        .store
        .get::<PodRecord>(&pod.id)?
        .ok_or_else(|| CriError::not_found(format!("pod sandbox {} not found", pod.id)))?;
    if pod.state != PodState::Ready {
        return Err(CriError::precondition(format!(
            "pod sandbox {} is not ready ({:?}); containers can only be created in a ready pod",
            pod.id, pod.state
        )));
    }
    let pod_cfg = req
        .sandbox_config
        .filter(|c| c.metadata.is_some())
        .unwrap_or_else(|| crate::pod::status::pod_config(&pod));
    let container_id = lifecycle::create(d, &pod, &pod_cfg, cfg, image_name).await?;
    Ok(CreateContainerResponse { container_id })
}

pub async fn start_container(
    d: &ContainerService,
    req: StartContainerRequest,
) -> Result<StartContainerResponse, CriError> {
    let rec = crate::container::status::find(&d.store, &req.container_id)?;
    let _pod_guard = d.pod_locks.lock(&rec.pod_id).await;
    let _g = d.containers.lock(&rec.id).await;
    let rec = d
        .store
        .get::<ContainerRecord>(&rec.id)?
        .ok_or_else(|| CriError::not_found(format!("container {} not found", rec.id)))?;
    can_start(rec.state)
        .map_err(|why| CriError::precondition(format!("container {} {why}", rec.id)))?;
    let pod = d.store.get::<PodRecord>(&rec.pod_id)?.ok_or_else(|| {
        CriError::not_found(format!(
            "pod sandbox {} of container {} not found",
            rec.pod_id, rec.id
        ))
    })?;
    if pod.state != PodState::Ready {
        return Err(CriError::precondition(format!(
            "pod sandbox {} is not ready ({:?})",
            pod.id, pod.state
        )));
    }
    let shim = d.shims.get(&pod.id).ok_or_else(|| {
        CriError::precondition(format!("pod sandbox {} has no connected shim", pod.id))
    })?;
    lifecycle::start(d, &shim, &rec).await?;
    Ok(StartContainerResponse {})
}

pub async fn stop_container(
    d: &ContainerService,
    req: StopContainerRequest,
) -> Result<StopContainerResponse, CriError> {
    let rec = match crate::container::status::find(&d.store, &req.container_id) {
        Ok(r) => r,
        // CRI: StopContainer is idempotent; a container already gone (removed, or never
        // here) is stopped. An empty or ambiguous id is still an error.
        Err(e) if e.kind == ErrorKind::NotFound => return Ok(StopContainerResponse {}),
        Err(e) => return Err(e),
    };
    let timeout = Duration::from_secs(u64::try_from(req.timeout).unwrap_or(0));
    let _g = d.containers.lock(&rec.id).await;
    lifecycle::stop_locked(d, &rec.id, timeout).await?;
    Ok(StopContainerResponse {})
}

pub async fn remove_container(
    d: &ContainerService,
    req: RemoveContainerRequest,
) -> Result<RemoveContainerResponse, CriError> {
    let rec = match crate::container::status::find(&d.store, &req.container_id) {
        Ok(r) => r,
        // CRI: removing a container that is already gone is not an error.
        Err(e) if e.kind == ErrorKind::NotFound => return Ok(RemoveContainerResponse {}),
        Err(e) => return Err(e),
    };
    let _g = d.containers.lock(&rec.id).await;
    lifecycle::remove_locked(d, &rec.id).await?;
    Ok(RemoveContainerResponse {})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::Daemon;

    #[tokio::test]
    async fn stop_of_an_unknown_container_is_ok_but_a_bad_id_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Daemon::for_test(dir.path());
        let stop = |id: &str| StopContainerRequest {
            container_id: id.into(),
            timeout: 1,
        };
        stop_container(&d.containers, stop(&"d".repeat(64)))
            .await
            .expect("StopContainer of a container that is not there is OK (CRI: idempotent)");
        let e = stop_container(&d.containers, stop(""))
            .await
            .expect_err("an empty id names nothing");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("container_id"), "{e}");
    }
}
