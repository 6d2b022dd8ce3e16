//! UpdateContainerResources (validated and merged by `container::resources`),
//! UpdatePodSandboxResources (the pod-level cgroup, `pod::resources`) and ReopenContainerLog.

use crisp_proto::cri::v1::{
    ReopenContainerLogRequest, ReopenContainerLogResponse, UpdateContainerResourcesRequest,
    UpdateContainerResourcesResponse, UpdatePodSandboxResourcesRequest,
    UpdatePodSandboxResourcesResponse,
};

use crate::container::service::ContainerService;
use crate::error::CriError;
use crate::pod::service::PodService;

pub async fn update_container_resources(
    d: &ContainerService,
    req: UpdateContainerResourcesRequest,
) -> Result<UpdateContainerResourcesResponse, CriError> {
    crate::container::resources::update_container_resources(d, req).await
}

pub async fn update_pod_sandbox_resources(
    d: &PodService,
    req: UpdatePodSandboxResourcesRequest,
) -> Result<UpdatePodSandboxResourcesResponse, CriError> {
    if req.pod_sandbox_id.is_empty() {
        return Err(CriError::invalid("pod_sandbox_id is empty"));
    }
    crate::pod::resources::update_pod_sandbox_resources(d, req).await
}

/// ReopenContainerLog: kubelet renamed the log file away; the container's log writer opens
/// the path again. The container must be running (it has no writer otherwise).
pub async fn reopen_container_log(
    d: &ContainerService,
    req: ReopenContainerLogRequest,
) -> Result<ReopenContainerLogResponse, CriError> {
    crate::container::lifecycle::reopen_log(d, &req.container_id)?;
    Ok(ReopenContainerLogResponse {})
}
