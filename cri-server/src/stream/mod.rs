//! crispd's side of streaming (exec, attach, port-forward): the [`crisp_stream::Backend`] the
//! stream server calls once a client has dialled a URL, and the sessions' bookkeeping.
//!
//! The protocols (SPDY/3.1, WebSocket), tokens and URLs belong to `crisp-stream`; what a
//! session does to a container or pod is here: [`exec`] through the pod's shim, [`attach`] to
//! the container's own stdio, [`port_forward`] inside the pod's network namespace. The CRI
//! calls that hand out the URLs are in `crate::cri::streaming`.

pub mod attach;
pub mod exec;
pub mod port_forward;
pub mod server;

pub use server::Streaming;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crisp_stream::{AttachRequest, Backend, BackendError, ExecRequest, Streams};

use crate::daemon::Daemon;
use crate::instrument::{CriError, ErrorKind};

/// The runtime as the stream server sees it. Holds the daemon weakly: the daemon owns the
/// server, which owns this.
pub struct CrispBackend {
    d: Weak<Daemon>,
}

impl CrispBackend {
    pub fn new(d: &Arc<Daemon>) -> Self {
        Self {
            d: Arc::downgrade(d),
        }
    }

    fn daemon(&self) -> Result<Arc<Daemon>, BackendError> {
        self.d
            .upgrade()
            .ok_or_else(|| BackendError::FailedPrecondition("crispd is shutting down".into()))
    }
}

/// A CRI error as the stream server reports it to the client.
pub fn backend_error(e: CriError) -> BackendError {
    match e.kind {
        ErrorKind::NotFound => BackendError::NotFound(e.message),
        ErrorKind::FailedPrecondition => BackendError::FailedPrecondition(e.message),
        ErrorKind::InvalidArgument => BackendError::InvalidArgument(e.message),
        _ => BackendError::Internal(e.message),
    }
}

#[async_trait::async_trait]
impl Backend for CrispBackend {
    async fn exec(&self, req: ExecRequest, streams: Streams) -> Result<i32, BackendError> {
        let d = self.daemon()?;
        let span = tracing::info_span!("exec session", container_id = %req.container_id);
        tracing::Instrument::instrument(exec::exec(&d, req, streams), span)
            .await
            .map_err(backend_error)
    }

    async fn attach(&self, req: AttachRequest, streams: Streams) -> Result<(), BackendError> {
        let d = self.daemon()?;
        let span = tracing::info_span!("attach session", container_id = %req.container_id);
        tracing::Instrument::instrument(attach::attach(&d, req, streams), span)
            .await
            .map_err(backend_error)
    }

    async fn port_forward(
        &self,
        pod_sandbox_id: &str,
        port: u16,
    ) -> Result<tokio::net::TcpStream, BackendError> {
        let d = self.daemon()?;
        let span = tracing::info_span!("port-forward", pod_id = %pod_sandbox_id, port);
        tracing::Instrument::instrument(port_forward::port_forward(&d, pod_sandbox_id, port), span)
            .await
            .map_err(backend_error)
    }
}

/// Exec and attach sessions still running or cleaning up, so shutdown can wait for their
/// clean-up (an exec's kill and delete) before crispd exits.
#[derive(Debug, Default)]
pub struct Sessions {
    live: AtomicUsize,
    idle: tokio::sync::Notify,
}

pub struct SessionGuard<'a>(&'a Sessions);

impl Sessions {
    pub fn enter(&self) -> SessionGuard<'_> {
        self.live.fetch_add(1, Ordering::SeqCst);
        SessionGuard(self)
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Wait until no session is left, at most `limit`; false if some still were.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let idle = async {
            loop {
                let n = self.idle.notified();
                if self.live() == 0 {
                    return;
                }
                n.await;
            }
        };
        tokio::time::timeout(limit, idle).await.is_ok()
    }
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
