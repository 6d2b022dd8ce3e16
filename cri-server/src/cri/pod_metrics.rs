//! ListMetricDescriptors, ListPodSandboxMetrics (and StreamPodSandboxMetrics' list): the
//! cAdvisor-named container and pod metrics of `stats::metrics`, read from the host's cgroups.

use crisp_proto::cri::v1::{
    ListMetricDescriptorsRequest, ListMetricDescriptorsResponse, ListPodSandboxMetricsRequest,
    ListPodSandboxMetricsResponse,
};

use crate::error::CriError;
use crate::pod::service::PodService;
use crate::stats::metrics;

pub fn list_metric_descriptors(
    _req: ListMetricDescriptorsRequest,
) -> Result<ListMetricDescriptorsResponse, CriError> {
    Ok(metrics::list_metric_descriptors())
}

pub async fn list_pod_sandbox_metrics(
    d: &PodService,
    _req: ListPodSandboxMetricsRequest,
) -> Result<ListPodSandboxMetricsResponse, CriError> {
    metrics::list_pod_sandbox_metrics(d, std::path::Path::new(crate::cgroup::HOST_ROOT)).await
}
