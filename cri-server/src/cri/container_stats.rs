//! ContainerStats, ListContainerStats (and StreamContainerStats' list): figures from each
//! container's shim and snapshot, gathered by `stats::container`.

use crisp_proto::cri::v1::{
    ContainerStatsRequest, ContainerStatsResponse, ListContainerStatsRequest,
    ListContainerStatsResponse,
};

use crate::container::service::ContainerService;
use crate::error::CriError;
use crate::stats::container as stats;

pub async fn container_stats(
    d: &ContainerService,
    req: ContainerStatsRequest,
) -> Result<ContainerStatsResponse, CriError> {
    stats::container_stats(d, req).await
}

pub async fn list_container_stats(
    d: &ContainerService,
    req: ListContainerStatsRequest,
) -> Result<ListContainerStatsResponse, CriError> {
    stats::list_container_stats(d, req).await
}
