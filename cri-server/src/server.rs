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
use crate::instrument::{self, CriError};

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
    ($name:literal, $why:literal) => {
        instrument::call($name, info_span!($name), async {
            Err(CriError::unimplemented(concat!($name, ": ", $why)))
        })
        .await
    };
}

#[tonic::async_trait]
impl RuntimeService for Cri {
    async fn version(&self, req: Request<pb::VersionRequest>) -> Res<pb::VersionResponse> {
        instrument::call(
            "Version",
            info_span!("Version"),
            cri::version::version(req.into_inner()),
        )
        .await
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Res<pb::StatusResponse> {
        instrument::call(
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
            "RunPodSandbox",
            span,
            cri::run_pod::run_pod_sandbox(&self.d, req),
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
            "StopPodSandbox",
            span,
            cri::pod_teardown::stop(&self.d, req),
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
            "RemovePodSandbox",
            span,
            cri::pod_teardown::remove(&self.d, req),
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
            "PodSandboxStatus",
            span,
            cri::pods::pod_sandbox_status_served(&self.d, req),
        )
        .await
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<pb::ListPodSandboxRequest>,
    ) -> Res<pb::ListPodSandboxResponse> {
        let req = req.into_inner();
        instrument::call("ListPodSandbox", info_span!("ListPodSandbox"), async {
            cri::pods::list_pod_sandbox(&self.d.store, req)
        })
        .await
    }

    type StreamPodSandboxesStream = BoxStream<pb::StreamPodSandboxesResponse>;
    async fn stream_pod_sandboxes(
        &self,
        _req: Request<pb::StreamPodSandboxesRequest>,
    ) -> Res<Self::StreamPodSandboxesStream> {
        not_yet!("StreamPodSandboxes", "not implemented")
    }

    async fn create_container(
        &self,
        req: Request<pb::CreateContainerRequest>,
    ) -> Res<pb::CreateContainerResponse> {
        let req = req.into_inner();
        let span = info_span!("CreateContainer", pod_id = %req.pod_sandbox_id);
        instrument::call(
            "CreateContainer",
            span,
            cri::container_lifecycle::create_container(&self.d, req),
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
            "StartContainer",
            span,
            cri::container_lifecycle::start_container(&self.d, req),
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
            "StopContainer",
            span,
            cri::container_lifecycle::stop_container(&self.d, req),
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
            "RemoveContainer",
            span,
            cri::container_lifecycle::remove_container(&self.d, req),
        )
        .await
    }

    async fn list_containers(
        &self,
        req: Request<pb::ListContainersRequest>,
    ) -> Res<pb::ListContainersResponse> {
        let req = req.into_inner();
        instrument::call("ListContainers", info_span!("ListContainers"), async {
            cri::containers::list_containers(&self.d.store, req)
        })
        .await
    }

    type StreamContainersStream = BoxStream<pb::StreamContainersResponse>;
    async fn stream_containers(
        &self,
        _req: Request<pb::StreamContainersRequest>,
    ) -> Res<Self::StreamContainersStream> {
        not_yet!("StreamContainers", "not implemented")
    }

    async fn container_status(
        &self,
        req: Request<pb::ContainerStatusRequest>,
    ) -> Res<pb::ContainerStatusResponse> {
        let req = req.into_inner();
        let span = info_span!("ContainerStatus", container_id = %req.container_id);
        instrument::call("ContainerStatus", span, async {
            cri::containers::container_status(&self.d.store, &self.d.images, &self.d.cfg.state, req)
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
            "UpdateContainerResources",
            span,
            cri::update::update_container_resources(&self.d, req),
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
            "ReopenContainerLog",
            span,
            cri::update::reopen_container_log(&self.d, req),
        )
        .await
    }

    async fn exec_sync(&self, req: Request<pb::ExecSyncRequest>) -> Res<pb::ExecSyncResponse> {
        let req = req.into_inner();
        let span = info_span!("ExecSync", container_id = %req.container_id);
        instrument::call("ExecSync", span, cri::exec_sync::exec_sync(&self.d, req)).await
    }

    async fn exec(&self, _req: Request<pb::ExecRequest>) -> Res<pb::ExecResponse> {
        not_yet!(
            "Exec",
            "streaming (exec/attach/port-forward) belongs to a later issue"
        )
    }

    async fn attach(&self, _req: Request<pb::AttachRequest>) -> Res<pb::AttachResponse> {
        not_yet!(
            "Attach",
            "streaming (exec/attach/port-forward) belongs to a later issue"
        )
    }

    async fn port_forward(
        &self,
        _req: Request<pb::PortForwardRequest>,
    ) -> Res<pb::PortForwardResponse> {
        not_yet!(
            "PortForward",
            "streaming (exec/attach/port-forward) belongs to a later issue"
        )
    }

    async fn container_stats(
        &self,
        req: Request<pb::ContainerStatsRequest>,
    ) -> Res<pb::ContainerStatsResponse> {
        let req = req.into_inner();
        let span = info_span!("ContainerStats", container_id = %req.container_id);
        instrument::call(
            "ContainerStats",
            span,
            cri::container_stats::container_stats(&self.d, req),
        )
        .await
    }

    async fn list_container_stats(
        &self,
        req: Request<pb::ListContainerStatsRequest>,
    ) -> Res<pb::ListContainerStatsResponse> {
        instrument::call(
            "ListContainerStats",
            info_span!("ListContainerStats"),
            cri::container_stats::list_container_stats(&self.d, req.into_inner()),
        )
        .await
    }

    type StreamContainerStatsStream = BoxStream<pb::StreamContainerStatsResponse>;
    async fn stream_container_stats(
        &self,
        _req: Request<pb::StreamContainerStatsRequest>,
    ) -> Res<Self::StreamContainerStatsStream> {
        not_yet!("StreamContainerStats", "not implemented")
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<pb::PodSandboxStatsRequest>,
    ) -> Res<pb::PodSandboxStatsResponse> {
        let req = req.into_inner();
        let span = info_span!("PodSandboxStats", pod_id = %req.pod_sandbox_id);
        instrument::call("PodSandboxStats", span, async {
            crate::pod_stats::pod_sandbox_stats(&self.d, req)
        })
        .await
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<pb::ListPodSandboxStatsRequest>,
    ) -> Res<pb::ListPodSandboxStatsResponse> {
        let req = req.into_inner();
        instrument::call(
            "ListPodSandboxStats",
            info_span!("ListPodSandboxStats"),
            async { crate::pod_stats::list_pod_sandbox_stats(&self.d, req) },
        )
        .await
    }

    type StreamPodSandboxStatsStream = BoxStream<pb::StreamPodSandboxStatsResponse>;
    async fn stream_pod_sandbox_stats(
        &self,
        _req: Request<pb::StreamPodSandboxStatsRequest>,
    ) -> Res<Self::StreamPodSandboxStatsStream> {
        not_yet!("StreamPodSandboxStats", "not implemented")
    }

    async fn checkpoint_container(
        &self,
        _req: Request<pb::CheckpointContainerRequest>,
    ) -> Res<pb::CheckpointContainerResponse> {
        not_yet!("CheckpointContainer", "checkpointing is not supported")
    }

    type GetContainerEventsStream = BoxStream<pb::ContainerEventResponse>;
    async fn get_container_events(
        &self,
        _req: Request<pb::GetEventsRequest>,
    ) -> Res<Self::GetContainerEventsStream> {
        let rx = self.d.events.subscribe();
        let stop = self.d.stopping.subscribe();
        let span = info_span!("GetContainerEvents");
        instrument::call("GetContainerEvents", span, async {
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
        _req: Request<pb::ListMetricDescriptorsRequest>,
    ) -> Res<pb::ListMetricDescriptorsResponse> {
        not_yet!("ListMetricDescriptors", "not implemented")
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _req: Request<pb::ListPodSandboxMetricsRequest>,
    ) -> Res<pb::ListPodSandboxMetricsResponse> {
        not_yet!("ListPodSandboxMetrics", "not implemented")
    }

    type StreamPodSandboxMetricsStream = BoxStream<pb::StreamPodSandboxMetricsResponse>;
    async fn stream_pod_sandbox_metrics(
        &self,
        _req: Request<pb::StreamPodSandboxMetricsRequest>,
    ) -> Res<Self::StreamPodSandboxMetricsStream> {
        not_yet!("StreamPodSandboxMetrics", "not implemented")
    }

    async fn update_pod_sandbox_resources(
        &self,
        _req: Request<pb::UpdatePodSandboxResourcesRequest>,
    ) -> Res<pb::UpdatePodSandboxResourcesResponse> {
        not_yet!("UpdatePodSandboxResources", "not implemented")
    }
}

#[tonic::async_trait]
impl ImageService for Cri {
    async fn list_images(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> Res<pb::ListImagesResponse> {
        let req = req.into_inner();
        instrument::call("ListImages", info_span!("ListImages"), async {
            Ok(crisp_image::cri::list_images(&self.d.images, &req)?)
        })
        .await
    }

    type StreamImagesStream = BoxStream<pb::StreamImagesResponse>;
    async fn stream_images(
        &self,
        _req: Request<pb::StreamImagesRequest>,
    ) -> Res<Self::StreamImagesStream> {
        not_yet!("StreamImages", "not implemented; use ListImages")
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
        instrument::call("ImageStatus", info_span!("ImageStatus", %image), async {
            Ok(crisp_image::cri::image_status(&self.d.images, &req)?)
        })
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
        instrument::call("PullImage", info_span!("PullImage", %image), async {
            tracing::info!("pulling");
            let r = crisp_image::cri::pull_image(&self.d.images, &req).await?;
            tracing::info!(image_ref = %r.image_ref, "pulled");
            Ok(r)
        })
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
        instrument::call("RemoveImage", info_span!("RemoveImage", %image), async {
            Ok(crisp_image::cri::remove_image(&self.d.images, &req).await?)
        })
        .await
    }

    async fn image_fs_info(
        &self,
        _req: Request<pb::ImageFsInfoRequest>,
    ) -> Res<pb::ImageFsInfoResponse> {
        instrument::call("ImageFsInfo", info_span!("ImageFsInfo"), async {
            Ok(crisp_image::cri::image_fs_info(&self.d.images).await?)
        })
        .await
    }
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
