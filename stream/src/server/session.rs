//! What every session shares: the backend, limits, and how a session ends early.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::State;
use crate::activity::idle_expired;
use crate::backend::Backend;
use crate::metrics::{ByteCounters, Metrics};

#[derive(Clone)]
pub(crate) struct SessionCtx {
    pub backend: Arc<dyn Backend>,
    pub idle_timeout: Duration,
    pub stream_creation_timeout: Duration,
    pub shutdown: CancellationToken,
    pub counters: Arc<ByteCounters>,
}

impl SessionCtx {
    pub fn new(state: &State) -> Self {
        Self {
            backend: state.backend.clone(),
            idle_timeout: state.config.idle_timeout,
            stream_creation_timeout: state.config.stream_creation_timeout,
            shutdown: state.shutdown.clone(),
            counters: state.metrics.bytes.clone(),
        }
    }
}

/// Why a session stopped before its work finished; its future (and with it the backend's
/// exec or attach) is dropped in every case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ended {
    ClientGone,
    Idle,
    Shutdown,
}

/// Runs `work` until it finishes, the client goes, the session idles out or crispd shuts down.
pub(crate) async fn guarded<T>(
    work: impl Future<Output = T>,
    client_gone: impl Future<Output = ()>,
    idle_for: impl Fn() -> Duration,
    idle_timeout: Duration,
    shutdown: &CancellationToken,
) -> Result<T, Ended> {
    tokio::select! {
        out = work => Ok(out),
        _ = client_gone => Err(Ended::ClientGone),
        _ = idle_expired(idle_for, idle_timeout) => Err(Ended::Idle),
        _ = shutdown.cancelled() => Err(Ended::Shutdown),
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Exec,
    Attach,
    PortForward,
}

/// Counts a session as open for as long as it lives.
pub(crate) struct OpenSession(Arc<Metrics>);

impl OpenSession {
    pub fn new(metrics: Arc<Metrics>, kind: Kind) -> Self {
        let total = match kind {
            Kind::Exec => &metrics.exec_total,
            Kind::Attach => &metrics.attach_total,
            Kind::PortForward => &metrics.port_forward_total,
        };
        total.fetch_add(1, Ordering::Relaxed);
        metrics.sessions_open.fetch_add(1, Ordering::Relaxed);
        Self(metrics)
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.0.sessions_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Aborts a helper task when the session that spawned it ends.
pub(crate) struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
