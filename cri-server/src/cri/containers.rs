//! ListContainers, StreamContainers' list and ContainerStatus: answered from the store by
//! `container::status`; these calls never wait on a shim.

use crisp_proto::cri::v1::{
    ContainerStatusRequest, ContainerStatusResponse, ListContainersRequest, ListContainersResponse,
};

use crate::container::service::ContainerService;
use crate::container::status;
use crate::error::CriError;
use crate::store::Store;

pub fn list_containers(
    store: &Store,
    req: ListContainersRequest,
) -> Result<ListContainersResponse, CriError> {
    status::list_containers(store, req)
}

pub fn container_status(
    d: &ContainerService,
    req: ContainerStatusRequest,
) -> Result<ContainerStatusResponse, CriError> {
    status::container_status(
        &d.store,
        &d.images,
        &d.cfg.state,
        d.cfg.cgroup_driver.into(),
        req,
    )
}
