//! The gRPC side: RuntimeService and ImageService on a unix socket. Each method only builds
//! the call's tracing span and hands the request to its handler under `cri/` through
//! [`instrument::call`], the single place errors become gRPC codes.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use crisp_proto::cri::v1 as pb;
use crisp_proto::cri::v1::image_service_server::{ImageService, ImageServiceServer};
use crisp_proto::cri::v1::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use futures::Stream;
use tonic::{Request, Response, Status};
use tracing::info_span;

use crate::cri;
use crate::daemon::Daemon;
use crate::error::CriError;
use crate::instrument;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;
type Res<T> = Result<Response<T>, Status>;

#[derive(Debug, Clone)]
pub struct Cri {
    d: Arc<Daemon>,
}

impl Cri {
    pub fn new(d: Arc<Daemon>) -> Self {
        Self { d }
    }
}

/// A call that is not wired yet: Unimplemented, with a message saying so and why.
macro_rules! not_yet {
    ($self:ident, $name:literal, $why:literal) => {
        instrument::call(&$self.d.metrics, $name, info_span!($name), async {
            Err(CriError::unimplemented(concat!($name, ": ", $why)))
        })
        .await
    };
}

#[tonic::async_trait]
impl RuntimeService for Cri {
    async fn version(&self, req: Request<pb::VersionRequest>) -> Res<pb::VersionResponse> {
        instrument::call(
            &self.d.metrics,
            "Version",
            info_span!("Version"),
            cri::version::version(req.into_inner()),
        )
        .await
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Res<pb::StatusResponse> {
        instrument::call(
            &self.d.metrics,
            "Status",
            info_span!("Status"),
            cri::status::status(&self.d, req.into_inner()),
        )
        .await
    }

    async fn runtime_config(
        &self,
        req: Request<pb::RuntimeConfigRequest>,
    ) -> Res<pb::RuntimeConfigResponse> {
        instrument::call(
            &self.d.metrics,
            "RuntimeConfig",
            info_span!("RuntimeConfig"),
            cri::runtime_config::runtime_config(&self.d.cfg, req.into_inner()),
        )
        .await
    }

    async fn update_runtime_config(
        &self,
        req: Request<pb::UpdateRuntimeConfigRequest>,
    ) -> Res<pb::UpdateRuntimeConfigResponse> {
        // kubelet sends the pod CIDR here; the bridge plugin's IPAM config owns the range, so
        // there is nothing to do (containerd only templates a CNI config from it).
        let cidr = req
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        instrument::call(
            &self.d.metrics,
            "UpdateRuntimeConfig",
            info_span!("UpdateRuntimeConfig", pod_cidr = %cidr),
            async { Ok(pb::UpdateRuntimeConfigResponse {}) },
        )
        .await
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<pb::RunPodSandboxRequest>,
    ) -> Res<pb::RunPodSandboxResponse> {
        let req = req.into_inner();
        let name = req
            .config
            .as_ref()
            .and_then(|c| c.metadata.as_ref())
            .map(|m| m.name.clone());
        let span = info_span!("RunPodSandbox", pod_name = name.as_deref().unwrap_or(""));
        instrument::call(
            &self.d.metrics,
            "RunPodSandbox",
            span,
            cri::run_pod::run_pod_sandbox(&self.d.pods, req),
        )
        .await
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<pb::StopPodSandboxRequest>,
    ) -> Res<pb::StopPodSandboxResponse> {
        let req = req.into_inner();
        let span = info_span!("StopPodSandbox", pod_id = %req.pod_sandbox_id);
        instrument::call(
            &self.d.metrics,
            "StopPodSandbox",
            span,
            cri::pod_teardown::stop(&self.d.pods, req),
        )
        .await
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<pb::RemovePodSandboxRequest>,
    ) -> Res<pb::RemovePodSandboxResponse> {
        let req = req.into_inner();
        let span = info_span!("RemovePodSandbox", pod_id = %req.pod_sandbox_id);
        instrument::call(
            &self.d.metrics,
            "RemovePodSandbox",
            span,
            cri::pod_teardown::remove(&self.d.pods, req),
        )
        .await
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<pb::PodSandboxStatusRequest>,
    ) -> Res<pb::PodSandboxStatusResponse> {
        let req = req.into_inner();
        let span = info_span!("PodSandboxStatus", pod_id = %req.pod_sandbox_id);
        instrument::call(
            &self.d.metrics,
            "PodSandboxStatus",
            span,
            cri::pods::pod_sandbox_status(&self.d.pods, req),
        )
        .await
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<pb::ListPodSandboxRequest>,
    ) -> Res<pb::ListPodSandboxResponse> {
        let req = req.into_inner();
        instrument::call(
            &self.d.metrics,
            "ListPodSandbox",
            info_span!("ListPodSandbox"),
            async { cri::pods::list_pod_sandbox(&self.d.store, req) },
        )
        .await
    }

    type StreamPodSandboxesStream = BoxStream<pb::StreamPodSandboxesResponse>;
    async fn stream_pod_sandboxes(
        &self,
        req: Request<pb::StreamPodSandboxesRequest>,
    ) -> Res<Self::StreamPodSandboxesStream> {
        let filter = req.into_inner().filter;
        instrument::call(
            &self.d.metrics,
            "StreamPodSandboxes",
            info_span!("StreamPodSandboxes"),
            async {
                let list = cri::pods::list_pod_sandbox(
                    &self.d.store,
                    pb::ListPodSandboxRequest { filter },
                )?;
                Ok(chunked(list.items, |pod_sandboxes| {
                    pb::StreamPodSandboxesResponse { pod_sandboxes }
                }))
            },
        )
        .await
    }

    async fn create_container(
        &self,
        req: Request<pb::CreateContainerRequest>,
    ) -> Res<pb::CreateContainerResponse> {
        let req = req.into_inner();
        let span = info_span!("CreateContainer", pod_id = %req.pod_sandbox_id);
        instrument::call(
            &self.d.metrics,
            "CreateContainer",
            span,
            cri::container_lifecycle::create_container(&self.d.containers, req),
        )
        .await
    }

    async fn start_container(
        &self,
        req: Request<pb::StartContainerRequest>,
    ) -> Res<pb::StartContainerResponse> {
        let req = req.into_inner();
        let span = info_span!("StartContainer", container_id = %req.container_id);
        instrument::call(
            &self.d.metrics,
            "StartContainer",
            span,
            cri::container_lifecycle::start_container(&self.d.containers, req),
        )
        .await
    }

    async fn stop_container(
        &self,
        req: Request<pb::StopContainerRequest>,
    ) -> Res<pb::StopContainerResponse> {
        let req = req.into_inner();
        let span = info_span!("StopContainer", container_id = %req.container_id);
        instrument::call(
            &self.d.metrics,
            "StopContainer",
            span,
            cri::container_lifecycle::stop_container(&self.d.containers, req),
        )
        .await
    }

    async fn remove_container(
        &self,
        req: Request<pb::RemoveContainerRequest>,
    ) -> Res<pb::RemoveContainerResponse> {
        let req = req.into_inner();
        let span = info_span!("RemoveContainer", container_id = %req.container_id);
        instrument::call(
            &self.d.metrics,
            "RemoveContainer",
            span,
            cri::container_lifecycle::remove_container(&self.d.containers, req),
        )
        .await
    }

    async fn list_containers(
        &self,
        req: Request<pb::ListContainersRequest>,
    ) -> Res<pb::ListContainersResponse> {
        let req = req.into_inner();
        instrument::call(
            &self.d.metrics,
            "ListContainers",
            info_span!("ListContainers"),
            async { cri::containers::list_containers(&self.d.store, req) },
        )
        .await
    }

    type StreamContainersStream = BoxStream<pb::StreamContainersResponse>;
    async fn stream_containers(
        &self,
        req: Request<pb::StreamContainersRequest>,
    ) -> Res<Self::StreamContainersStream> {
        let filter = req.into_inner().filter;
        instrument::call(
            &self.d.metrics,
            "StreamContainers",
            info_span!("StreamContainers"),
            async {
                let list = cri::containers::list_containers(
                    &self.d.store,
                    pb::ListContainersRequest { filter },
                )?;
                Ok(chunked(list.containers, |containers| {
                    pb::StreamContainersResponse { containers }
                }))
            },
        )
        .await
    }

    async fn container_status(
        &self,
        req: Request<pb::ContainerStatusRequest>,
    ) -> Res<pb::ContainerStatusResponse> {
        let req = req.into_inner();
        let span = info_span!("ContainerStatus", container_id = %req.container_id);
        instrument::call(&self.d.metrics, "ContainerStatus", span, async {
            cri::containers::container_status(&self.d.containers, req)
        })
        .await
    }

    async fn update_container_resources(
        &self,
        req: Request<pb::UpdateContainerResourcesRequest>,
    ) -> Res<pb::UpdateContainerResourcesResponse> {
        let req = req.into_inner();
        let span = info_span!("UpdateContainerResources", container_id = %req.container_id);
        instrument::call(
            &self.d.metrics,
            "UpdateContainerResources",
            span,
            cri::update::update_container_resources(&self.d.containers, req),
        )
        .await
    }

    async fn reopen_container_log(
        &self,
        req: Request<pb::ReopenContainerLogRequest>,
    ) -> Res<pb::ReopenContainerLogResponse> {
        let req = req.into_inner();
        let span = info_span!("ReopenContainerLog", container_id = %req.container_id);
        instrument::call(
            &self.d.metrics,
            "ReopenContainerLog",
            span,
            cri::update::reopen_container_log(&self.d.containers, req),
        )
        .await
    }

    async fn exec_sync(&self, req: Request<pb::ExecSyncRequest>) -> Res<pb::ExecSyncResponse> {
        let req = req.into_inner();
        let span = info_span!("ExecSync", container_id = %req.container_id);
        instrument::call(
            &self.d.metrics,
            "ExecSync",
            span,
            cri::exec_sync::exec_sync(&self.d.containers, req),
        )
        .await
    }

    async fn exec(&self, req: Request<pb::ExecRequest>) -> Res<pb::ExecResponse> {
        let req = req.into_inner();
        let span = info_span!("Exec", container_id = %req.container_id);
        instrument::call(
            &self.d.metrics,
            "Exec",
            span,
            cri::streaming::exec(&self.d, req),
        )
        .await
    }

    async fn attach(&self, req: Request<pb::AttachRequest>) -> Res<pb::AttachResponse> {
        let req = req.into_inner();
        let span = info_span!("Attach", container_id = %req.container_id);
        instrument::call(
            &self.d.metrics,
            "Attach",
            span,
            cri::streaming::attach(&self.d, req),
        )
        .await
    }

    async fn port_forward(
        &self,
        req: Request<pb::PortForwardRequest>,
    ) -> Res<pb::PortForwardResponse> {
        let req = req.into_inner();
        let span = info_span!("PortForward", pod_id = %req.pod_sandbox_id);
        instrument::call(
            &self.d.metrics,
            "PortForward",
            span,
            cri::streaming::port_forward(&self.d, req),
        )
        .await
    }

    async fn container_stats(
        &self,
        req: Request<pb::ContainerStatsRequest>,
    ) -> Res<pb::ContainerStatsResponse> {
        let req = req.into_inner();
        let span = info_span!("ContainerStats", container_id = %req.container_id);
        instrument::call(
            &self.d.metrics,
            "ContainerStats",
            span,
            cri::container_stats::container_stats(&self.d.containers, req),
        )
        .await
    }

    async fn list_container_stats(
        &self,
        req: Request<pb::ListContainerStatsRequest>,
    ) -> Res<pb::ListContainerStatsResponse> {
        instrument::call(
            &self.d.metrics,
            "ListContainerStats",
            info_span!("ListContainerStats"),
            cri::container_stats::list_container_stats(&self.d.containers, req.into_inner()),
        )
        .await
    }

    type StreamContainerStatsStream = BoxStream<pb::StreamContainerStatsResponse>;
    async fn stream_container_stats(
        &self,
        req: Request<pb::StreamContainerStatsRequest>,
    ) -> Res<Self::StreamContainerStatsStream> {
        let filter = req.into_inner().filter;
        instrument::call(
            &self.d.metrics,
            "StreamContainerStats",
            info_span!("StreamContainerStats"),
            async {
                let list = cri::container_stats::list_container_stats(
                    &self.d.containers,
                    pb::ListContainerStatsRequest { filter },
                )
                .await?;
                Ok(chunked(list.stats, |container_stats| {
                    pb::StreamContainerStatsResponse { container_stats }
                }))
            },
        )
        .await
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<pb::PodSandboxStatsRequest>,
    ) -> Res<pb::PodSandboxStatsResponse> {
        let req = req.into_inner();
        let span = info_span!("PodSandboxStats", pod_id = %req.pod_sandbox_id);
        instrument::call(&self.d.metrics, "PodSandboxStats", span, async {
            cri::pod_stats::pod_sandbox_stats(&self.d.pods, req)
        })
        .await
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<pb::ListPodSandboxStatsRequest>,
    ) -> Res<pb::ListPodSandboxStatsResponse> {
        let req = req.into_inner();
        instrument::call(
            &self.d.metrics,
            "ListPodSandboxStats",
            info_span!("ListPodSandboxStats"),
            async { cri::pod_stats::list_pod_sandbox_stats(&self.d.pods, req) },
        )
        .await
    }

    type StreamPodSandboxStatsStream = BoxStream<pb::StreamPodSandboxStatsResponse>;
    async fn stream_pod_sandbox_stats(
        &self,
        req: Request<pb::StreamPodSandboxStatsRequest>,
    ) -> Res<Self::StreamPodSandboxStatsStream> {
        let filter = req.into_inner().filter;
        instrument::call(
            &self.d.metrics,
            "StreamPodSandboxStats",
            info_span!("StreamPodSandboxStats"),
            async {
                let list = cri::pod_stats::list_pod_sandbox_stats(
                    &self.d.pods,
                    pb::ListPodSandboxStatsRequest { filter },
                )?;
                Ok(chunked(list.stats, |pod_sandbox_stats| {
                    pb::StreamPodSandboxStatsResponse { pod_sandbox_stats }
                }))
            },
        )
        .await
    }

    async fn checkpoint_container(
        &self,
        _req: Request<pb::CheckpointContainerRequest>,
    ) -> Res<pb::CheckpointContainerResponse> {
        // Checked on the development host (Debian 12, kernel 6.18): `criu check` of Debian's
        // criu 3.17.1 fails with "vdso: Unexpected rt vDSO area bounds" and "Could not
        // initialize kernel features detection", so runc checkpoint cannot work there.
        not_yet!(
            self,
            "CheckpointContainer",
            "checkpointing needs CRIU, and Debian's criu 3.17 fails `criu check` on kernel 6.18 \
             (\"vdso: Unexpected rt vDSO area bounds\", \"Could not initialize kernel features \
             detection\"); crispd does not checkpoint containers"
        )
    }

    type GetContainerEventsStream = BoxStream<pb::ContainerEventResponse>;
    async fn get_container_events(
        &self,
        _req: Request<pb::GetEventsRequest>,
    ) -> Res<Self::GetContainerEventsStream> {
        let rx = self.d.containers.events.subscribe();
        let stop = self.d.stopping.subscribe();
        let span = info_span!("GetContainerEvents");
        instrument::call(&self.d.metrics, "GetContainerEvents", span, async {
            let stream = futures::stream::unfold((rx, stop), |(mut rx, mut stop)| async move {
                use tokio::sync::broadcast::error::RecvError;
                loop {
                    // Ends at shutdown, so graceful shutdown never waits on kubelet's stream.
                    if *stop.borrow() {
                        return None;
                    }
                    let got = tokio::select! {
                        r = rx.recv() => r,
                        _ = stop.changed() => continue,
                    };
                    match got {
                        Ok(ev) => return Some((Ok(ev), (rx, stop))),
                        // kubelet relists on its own schedule; a gap only delays it.
                        Err(RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "container event subscriber fell behind")
                        }
                        Err(RecvError::Closed) => return None,
                    }
                }
            });
            Ok(Box::pin(stream) as Self::GetContainerEventsStream)
        })
        .await
    }

    async fn list_metric_descriptors(
        &self,
        req: Request<pb::ListMetricDescriptorsRequest>,
    ) -> Res<pb::ListMetricDescriptorsResponse> {
        let req = req.into_inner();
        instrument::call(
            &self.d.metrics,
            "ListMetricDescriptors",
            info_span!("ListMetricDescriptors"),
            async { cri::pod_metrics::list_metric_descriptors(req) },
        )
        .await
    }

    async fn list_pod_sandbox_metrics(
        &self,
        req: Request<pb::ListPodSandboxMetricsRequest>,
    ) -> Res<pb::ListPodSandboxMetricsResponse> {
        instrument::call(
            &self.d.metrics,
            "ListPodSandboxMetrics",
            info_span!("ListPodSandboxMetrics"),
            cri::pod_metrics::list_pod_sandbox_metrics(&self.d.pods, req.into_inner()),
        )
        .await
    }

    type StreamPodSandboxMetricsStream = BoxStream<pb::StreamPodSandboxMetricsResponse>;
    async fn stream_pod_sandbox_metrics(
        &self,
        _req: Request<pb::StreamPodSandboxMetricsRequest>,
    ) -> Res<Self::StreamPodSandboxMetricsStream> {
        instrument::call(
            &self.d.metrics,
            "StreamPodSandboxMetrics",
            info_span!("StreamPodSandboxMetrics"),
            async {
                let list = cri::pod_metrics::list_pod_sandbox_metrics(
                    &self.d.pods,
                    pb::ListPodSandboxMetricsRequest {},
                )
                .await?;
                Ok(chunked(list.pod_metrics, |pod_sandbox_metrics| {
                    pb::StreamPodSandboxMetricsResponse {
                        pod_sandbox_metrics,
                    }
                }))
            },
        )
        .await
    }

    async fn update_pod_sandbox_resources(
        &self,
        req: Request<pb::UpdatePodSandboxResourcesRequest>,
    ) -> Res<pb::UpdatePodSandboxResourcesResponse> {
        let req = req.into_inner();
        let span = info_span!("UpdatePodSandboxResources", pod_id = %req.pod_sandbox_id);
        instrument::call(
            &self.d.metrics,
            "UpdatePodSandboxResources",
            span,
            cri::update::update_pod_sandbox_resources(&self.d.pods, req),
        )
        .await
    }
}

#[tonic::async_trait]
impl ImageService for Cri {
    async fn list_images(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> Res<pb::ListImagesResponse> {
        let req = req.into_inner();
        instrument::call(
            &self.d.metrics,
            "ListImages",
            info_span!("ListImages"),
            async { Ok(crisp_image::cri::list_images(&self.d.images, &req)?) },
        )
        .await
    }

    type StreamImagesStream = BoxStream<pb::StreamImagesResponse>;
    async fn stream_images(
        &self,
        req: Request<pb::StreamImagesRequest>,
    ) -> Res<Self::StreamImagesStream> {
        let filter = req.into_inner().filter;
        instrument::call(
            &self.d.metrics,
            "StreamImages",
            info_span!("StreamImages"),
            async {
                let list = crisp_image::cri::list_images(
                    &self.d.images,
                    &pb::ListImagesRequest { filter },
                )?;
                Ok(chunked(list.images, |images| pb::StreamImagesResponse {
                    images,
                }))
            },
        )
        .await
    }

    async fn image_status(
        &self,
        req: Request<pb::ImageStatusRequest>,
    ) -> Res<pb::ImageStatusResponse> {
        let req = req.into_inner();
        let image = req
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        instrument::call(
            &self.d.metrics,
            "ImageStatus",
            info_span!("ImageStatus", %image),
            async { Ok(crisp_image::cri::image_status(&self.d.images, &req)?) },
        )
        .await
    }

    async fn pull_image(&self, req: Request<pb::PullImageRequest>) -> Res<pb::PullImageResponse> {
        let req = req.into_inner();
        let image = req
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        // Logged at info: pulls are slow and an operator wants to see them start and end.
        instrument::call(
            &self.d.metrics,
            "PullImage",
            info_span!("PullImage", %image),
            async {
                tracing::info!("pulling");
                let r = crisp_image::cri::pull_image(&self.d.images, &req).await?;
                tracing::info!(image_ref = %r.image_ref, "pulled");
                Ok(r)
            },
        )
        .await
    }

    async fn remove_image(
        &self,
        req: Request<pb::RemoveImageRequest>,
    ) -> Res<pb::RemoveImageResponse> {
        let req = req.into_inner();
        let image = req
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        instrument::call(
            &self.d.metrics,
            "RemoveImage",
            info_span!("RemoveImage", %image),
            crate::cri::remove_image::remove_image(&self.d.containers, &req),
        )
        .await
    }

    async fn image_fs_info(
        &self,
        _req: Request<pb::ImageFsInfoRequest>,
    ) -> Res<pb::ImageFsInfoResponse> {
        instrument::call(
            &self.d.metrics,
            "ImageFsInfo",
            info_span!("ImageFsInfo"),
            async { Ok(crisp_image::cri::image_fs_info(&self.d.images).await?) },
        )
        .await
    }
}

/// Most encoded bytes of items in one message of a CRI 1.36 `Stream*` call. Those calls exist
/// because a node's full list can pass the 16 MiB message limit of kubelet and crictl (and
/// 4 MiB is grpc-go's default), so a message stays far below both; a few hundred containers
/// fit in one, so a usual node still answers in a single message.
const STREAM_CHUNK_BYTES: usize = 1024 * 1024;

/// A `Stream*` answer: the unary List's items, in order, split by [`chunks`] and each chunk
/// wrapped in the call's response message. The list is built before the stream starts, so a
/// failure is the call's status exactly as the List call would return it, and a stream that
/// started never fails midway.
fn chunked<T, R>(items: Vec<T>, wrap: impl Fn(Vec<T>) -> R) -> BoxStream<R>
where
    T: prost::Message,
    R: Send + 'static,
{
    let msgs: Vec<Result<R, Status>> = chunks(items, STREAM_CHUNK_BYTES)
        .into_iter()
        .map(|c| Ok(wrap(c)))
        .collect();
    Box::pin(futures::stream::iter(msgs))
}

/// Split `items` into consecutive chunks whose items encode to at most `max_bytes` (with
/// their field key and length prefix). The CRI proto asks for at least one item per message,
/// so an item larger than the bound goes alone and an empty list gives no chunk at all (the
/// stream just ends).
fn chunks<T: prost::Message>(items: Vec<T>, max_bytes: usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut size = 0;
    for item in items {
        let len = item.encoded_len();
        // 1 byte of key (field 1, length-delimited) and the varint length.
        let len = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
        if !cur.is_empty() && size + len > max_bytes {
            out.push(std::mem::take(&mut cur));
            size = 0;
        }
        size += len;
        cur.push(item);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listen socket {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    #[error("listen socket {path} is in use by a running daemon")]
    InUse { path: String },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Bind the unix socket: refuse if another daemon answers on it, otherwise replace a stale one.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    let p = path.display().to_string();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::Bind {
            path: p.clone(),
            source,
        })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::InUse { path: p });
        }
        std::fs::remove_file(path).map_err(|source| ServeError::Bind {
            path: p.clone(),
            source,
        })?;
    }
    let l = tokio::net::UnixListener::bind(path).map_err(|source| ServeError::Bind {
        path: p.clone(),
        source,
    })?;
    // Root-only: the CRI socket is as good as root on the node.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|source| ServeError::Bind { path: p, source })?;
    Ok(l)
}

/// Serve both services until `shutdown` resolves.
pub async fn serve(
    d: Arc<Daemon>,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let cri = Cri::new(d);
    // Every connection goes through the :authority fix-up, so grpc-go < 1.53 clients
    // (kubelet/crictl <= 1.27, which send the socket path as :authority) are understood.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::UnixListenerStream::new(listener),
        |conn| conn.map(crate::authority::FixAuthority::new),
    );
    // kubelet's default max message size is 16 MiB; match it so big ListContainers fit.
    const MAX: usize = 16 * 1024 * 1024;
    // Graceful shutdown waits for every connection to close; a client that never answers the
    // GOAWAY (a hung kubelet) must not keep crispd from stopping, so it gets GRACE.
    const GRACE: std::time::Duration = std::time::Duration::from_secs(5);
    let begun = Arc::new(tokio::sync::Notify::new());
    let shutdown = {
        let begun = Arc::clone(&begun);
        async move {
            shutdown.await;
            begun.notify_one();
        }
    };
    let server = tonic::transport::Server::builder()
        .add_service(
            RuntimeServiceServer::new(cri.clone())
                .max_decoding_message_size(MAX)
                .max_encoding_message_size(MAX),
        )
        .add_service(
            ImageServiceServer::new(cri)
                .max_decoding_message_size(MAX)
                .max_encoding_message_size(MAX),
        )
        .serve_with_incoming_shutdown(incoming, shutdown);
    tokio::select! {
        r = server => r?,
        () = async {
            begun.notified().await;
            tokio::time::sleep(GRACE).await;
        } => tracing::warn!(grace = ?GRACE, "CRI connections still open after shutdown began; closing them"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn pod(id: &str, note: usize) -> pb::PodSandbox {
        pb::PodSandbox {
            id: id.into(),
            annotations: [("note".to_string(), "x".repeat(note))].into(),
            ..Default::default()
        }
    }

    #[test]
    fn chunks_are_bounded_ordered_and_never_empty() {
        let items: Vec<pb::PodSandbox> = (0..50).map(|i| pod(&format!("p{i:02}"), 100)).collect();
        let max = 1000;
        let got = chunks(items.clone(), max);
        assert!(got.len() > 1, "50 items of ~120 bytes need several chunks");
        for c in &got {
            assert!(!c.is_empty());
            // The bound is on the whole message as it goes on the wire.
            let msg = pb::StreamPodSandboxesResponse {
                pod_sandboxes: c.clone(),
            };
            assert!(msg.encoded_len() <= max, "{} > {max}", msg.encoded_len());
        }
        // Every item exactly once, in the List's order.
        assert_eq!(got.concat(), items);
    }

    #[test]
    fn an_oversized_item_goes_alone_and_nothing_gives_no_message() {
        let items = vec![pod("small", 10), pod("big", 5000), pod("small2", 10)];
        let got = chunks(items.clone(), 1000);
        let ids: Vec<Vec<&str>> = got
            .iter()
            .map(|c| c.iter().map(|p| p.id.as_str()).collect())
            .collect();
        assert_eq!(ids, vec![vec!["small"], vec!["big"], vec!["small2"]]);
        assert!(chunks(Vec::<pb::PodSandbox>::new(), 1000).is_empty());
        // Under the bound: one message.
        assert_eq!(chunks(items, usize::MAX).len(), 1);
    }
}
