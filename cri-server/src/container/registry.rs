//! One daemon's containers at run time: the per-container locks and, for each started
//! container, its log copiers, its exit watcher and whether the shim reported an OOM kill.
//! Keyed by container id and owned by the daemon, so two daemons in one process (unit tests)
//! share none of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::container::logs::{self, CriLog, Stream};
use crate::locks::ObjectLocks;

/// How long a log copier may take to drain after its task is gone.
const COPIER_DRAIN: Duration = Duration::from_secs(2);

/// What runs for a started container besides its task.
#[derive(Default)]
pub struct Live {
    pub log: Option<Arc<CriLog>>,
    pub copiers: Vec<JoinHandle<()>>,
    pub watcher: Option<JoinHandle<()>>,
}

/// One daemon's container locks and the runtime state of its started containers.
#[derive(Default)]
pub struct Registry {
    locks: ObjectLocks,
    live: Mutex<HashMap<String, Live>>,
    /// Containers the shim reported an OOM kill for, until their exit is recorded.
    oom: Mutex<std::collections::HashSet<String>>,
}

impl Registry {
    /// The per-container lock (see the module docs for the order).
    pub async fn lock(&self, id: &str) -> crate::locks::ObjectGuard<'_> {
        self.locks.lock(id).await
    }

    pub fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn oom(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.oom.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub fn spawn_copier(
    id: &str,
    r: std::fs::File,
    stream: Stream,
    log: Arc<CriLog>,
    tap: Option<Arc<crate::container::attach::Tap>>,
) -> JoinHandle<()> {
    let id = id.to_string();
    tokio::spawn(async move {
        let tap = tap.map(|t| t as Arc<dyn logs::OutputTap>);
        match logs::copy_from_fifo(r, stream, log, tap).await {
            Ok(n) => {
                tracing::debug!(container_id = %id, stream = stream.as_str(), records = n, "log copy done")
            }
            Err(e) => {
                tracing::warn!(container_id = %id, stream = stream.as_str(), error = %e, "log copy failed")
            }
        }
    })
}

/// Stop the watcher and copiers of a container and close its log. Copiers get a moment to
/// drain what the container wrote last (they end by themselves once its stdio is closed).
pub async fn stop_live(registry: &Registry, id: &str) {
    let Some(l) = registry.live().remove(id) else {
        return;
    };
    if let Some(w) = l.watcher {
        w.abort();
    }
    for c in l.copiers {
        let abort = c.abort_handle();
        if tokio::time::timeout(COPIER_DRAIN, c).await.is_err() {
            abort.abort();
        }
    }
    if let Some(log) = l.log {
        log.close();
    }
    registry.oom().remove(id);
}

/// The container has exited: let its copiers write what it printed last, then close its log
/// (no fd stays open for an exited container). The watcher stays: this may run inside it.
pub async fn drain_io(registry: &Registry, id: &str) {
    let (copiers, log) = match registry.live().get_mut(id) {
        Some(l) => (std::mem::take(&mut l.copiers), l.log.take()),
        None => return,
    };
    for c in copiers {
        let abort = c.abort_handle();
        if tokio::time::timeout(COPIER_DRAIN, c).await.is_err() {
            // A process that outlived init (shared pid namespace) still holds the FIFO.
            tracing::debug!(container_id = %id, "log copier still busy after exit; stopped");
            abort.abort();
        }
    }
    if let Some(log) = log {
        log.close();
    }
}
