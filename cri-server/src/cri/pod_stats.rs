//! PodSandboxStats, ListPodSandboxStats (and StreamPodSandboxStats' list): the pod's cgroup
//! and the pause's eth0, read by `stats::pod`.

use crisp_proto::cri::v1::{
    ListPodSandboxStatsRequest, ListPodSandboxStatsResponse, PodSandboxStatsRequest,
    PodSandboxStatsResponse,
};

use crate::error::CriError;
use crate::pod::service::PodService;
use crate::stats::pod as stats;

pub fn pod_sandbox_stats(
    d: &PodService,
    req: PodSandboxStatsRequest,
) -> Result<PodSandboxStatsResponse, CriError> {
    stats::pod_sandbox_stats(d, req)
}

pub fn list_pod_sandbox_stats(
    d: &PodService,
    req: ListPodSandboxStatsRequest,
) -> Result<ListPodSandboxStatsResponse, CriError> {
    stats::list_pod_sandbox_stats(d, req)
}
