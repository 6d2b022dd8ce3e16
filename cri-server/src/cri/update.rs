//! UpdateContainerResources (validated and merged by `container::resources`) and
//! ReopenContainerLog.

use crisp_proto::cri::v1::{
    ReopenContainerLogRequest, ReopenContainerLogResponse, UpdateContainerResourcesRequest,
    UpdateContainerResourcesResponse,
};

use crate::container::service::ContainerService;
use crate::error::CriError;

pub async fn update_container_resources(
    d: &ContainerService,
    req: UpdateContainerResourcesRequest,
) -> Result<UpdateContainerResourcesResponse, CriError> {
    crate::container::resources::update_container_resources(d, req).await
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
