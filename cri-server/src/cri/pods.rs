//! ListPodSandbox, StreamPodSandboxes' list and PodSandboxStatus: answered from the store by
//! `pod::status` (a verbose status also asks the pod's shim).

use crisp_proto::cri::v1::{
    ListPodSandboxRequest, ListPodSandboxResponse, PodSandboxStatusRequest,
    PodSandboxStatusResponse,
};

use crate::error::CriError;
use crate::pod::service::PodService;
use crate::pod::status;
use crate::store::Store;

pub fn list_pod_sandbox(
    store: &Store,
    req: ListPodSandboxRequest,
) -> Result<ListPodSandboxResponse, CriError> {
    status::list_pod_sandbox(store, req)
}

pub async fn pod_sandbox_status(
    d: &PodService,
    req: PodSandboxStatusRequest,
) -> Result<PodSandboxStatusResponse, CriError> {
    status::pod_sandbox_status_served(d, req).await
}
