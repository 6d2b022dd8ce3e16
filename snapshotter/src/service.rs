//! `containerd.services.snapshots.v1.Snapshots` over a [`Snapshotter`], so containerd can use
//! crisp's snapshotter as a proxy plugin (`[proxy_plugins.crisp] type = "snapshot"`).
//!
//! Every call goes through [`Service::call`]: it runs the blocking snapshotter work on the
//! blocking pool, logs entry and exit with the snapshot key, and turns the error kind into a
//! gRPC code (the mapping itself lives in `error.rs`). The request's `snapshotter` field (the
//! proxy plugin's name) is ignored: this server serves one snapshotter.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crisp_proto::containerd::services::snapshots::v1 as pb;
use pb::snapshots_server::Snapshots;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::snapshotter::{Info, Kind, Snapshotter};

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct Service {
    sn: Arc<Snapshotter>,
}

impl Service {
    /// Serves `sn`.
    pub fn new(sn: Arc<Snapshotter>) -> Self {
        Service { sn }
    }

    /// A tonic server for this service.
    pub fn into_server(self) -> pb::snapshots_server::SnapshotsServer<Self> {
        pb::snapshots_server::SnapshotsServer::new(self)
    }

    async fn call<T: Send + 'static>(
        &self,
        method: &'static str,
        key: String,
        f: impl FnOnce(&Snapshotter) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status> {
        let sn = self.sn.clone();
        tracing::debug!(method, snapshot = %key, "call");
        let res = tokio::task::spawn_blocking(move || f(&sn))
            .await
            .map_err(|e| Status::internal(format!("{method}: worker failed: {e}")))?;
        match res {
            Ok(v) => {
                tracing::debug!(method, snapshot = %key, "ok");
                Ok(v)
            }
            Err(e) => {
                let status = Status::from(e);
                if status.code() == tonic::Code::Internal {
                    tracing::error!(method, snapshot = %key, error = %status.message(), "failed");
                } else {
                    tracing::info!(method, snapshot = %key, code = ?status.code(), error = %status.message(), "failed");
                }
                Err(status)
            }
        }
    }
}

fn ts(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn from_ts(t: Option<prost_types::Timestamp>) -> SystemTime {
    t.and_then(|t| {
        let secs = u64::try_from(t.seconds).ok()?;
        let nanos = u32::try_from(t.nanos).ok()?;
        Some(UNIX_EPOCH + std::time::Duration::new(secs, nanos))
    })
    .unwrap_or(UNIX_EPOCH)
}

impl From<Kind> for pb::Kind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        }
    }
}

impl From<Info> for pb::Info {
    fn from(i: Info) -> Self {
        pb::Info {
            name: i.name,
            parent: i.parent.unwrap_or_default(),
            kind: pb::Kind::from(i.kind) as i32,
            created_at: Some(ts(i.created)),
            updated_at: Some(ts(i.updated)),
            labels: i.labels,
        }
    }
}

fn mounts(v: Vec<crate::mount::Mount>) -> Vec<crisp_proto::containerd::types::Mount> {
    v.into_iter().map(Into::into).collect()
}

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let key = r.key.clone();
        let m = self
            .call("Prepare", key, move |s| {
                s.prepare(&r.key, Some(&r.parent), r.labels)
            })
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let key = r.key.clone();
        let m = self
            .call("View", key, move |s| {
                s.view(&r.key, Some(&r.parent), r.labels)
            })
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = req.into_inner();
        let key = r.key.clone();
        let m = self.call("Mounts", key, move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        let key = r.key.clone();
        self.call("Commit", key, move |s| s.commit(&r.name, &r.key, r.labels))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        let key = r.key.clone();
        self.call("Remove", key, move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let key = r.key.clone();
        let i = self.call("Stat", key, move |s| s.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(i.into()),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update: info is required"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let key = info.name.clone();
        let info = Info {
            name: info.name,
            parent: (!info.parent.is_empty()).then_some(info.parent),
            kind: Kind::Active,
            labels: info.labels,
            created: from_ts(info.created_at),
            updated: from_ts(info.updated_at),
        };
        let i = self
            .call("Update", key, move |s| s.update(info, &paths))
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(i.into()),
        }))
    }

    type ListStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>>>;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = req.into_inner();
        let infos = self
            .call("List", String::new(), move |s| {
                let mut v = Vec::new();
                s.walk(&r.filters, |i| {
                    v.push(pb::Info::from(i.clone()));
                    Ok(())
                })?;
                Ok(v)
            })
            .await?;
        // containerd sends batches of 100 infos per message.
        let batches: Vec<_> = infos
            .chunks(100)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = req.into_inner();
        let key = r.key.clone();
        let u = self.call("Usage", key, move |s| s.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.call("Cleanup", String::new(), |s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
