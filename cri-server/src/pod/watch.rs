//! Notices a pod whose shim died. A shim that is SIGKILLed publishes nothing (its pause dies
//! with it through the parent-death signal), so the `/tasks/exit` event the pause-exit watch
//! relies on never comes. As containerd's sandbox controller does, crispd keeps one
//! `WaitSandbox` call open per ready pod: it returns when the pause exits and fails when the
//! shim's connection drops; either way the pod is no longer ready.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use containerd_shim_protos::sandbox_api::WaitSandboxRequest;

use crate::pod::service::PodService;
use crate::shim::client::ctx;
use crate::store::records::{PodRecord, PodState};

/// How often ready pods are looked for that have no watcher yet (new pods, recovered pods).
const SCAN: Duration = Duration::from_millis(500);
/// WaitSandbox has no natural deadline; ttrpc wants one.
const FOREVER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

pub fn spawn(d: &Arc<PodService>) {
    let weak = Arc::downgrade(d);
    let watched: Arc<Mutex<HashSet<String>>> = Arc::default();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(SCAN).await;
            let Some(d) = weak.upgrade() else { return };
            if *d.stopping.borrow() {
                return;
            }
            let Ok(pods) = d.store.list::<PodRecord>() else {
                continue;
            };
            for (id, rec) in pods {
                if rec.state != PodState::Ready {
                    continue;
                }
                let Some(shim) = d.shims.get(&id) else {
                    continue;
                };
                let mut w = watched.lock().unwrap_or_else(|p| p.into_inner());
                if !w.insert(id.clone()) {
                    continue;
                }
                drop(w);
                tokio::spawn(watch(
                    Weak::clone(&weak),
                    Arc::clone(&watched),
                    id,
                    rec.pause_pid,
                    shim,
                ));
            }
        }
    });
}

async fn watch(
    weak: Weak<PodService>,
    watched: Arc<Mutex<HashSet<String>>>,
    pod_id: String,
    pause_pid: Option<u32>,
    shim: crate::shim::client::ShimClient,
) {
    let req = WaitSandboxRequest {
        sandbox_id: pod_id.clone(),
        ..Default::default()
    };
    let outcome = shim.sandbox().wait_sandbox(ctx(FOREVER), &req).await;
    let release = || {
        watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pod_id);
    };
    let Some(d) = weak.upgrade() else { return };
    if *d.stopping.borrow() {
        // crispd is going away: its connections close, the pods live on.
        return;
    }
    let _g = d.pod_locks.lock(&pod_id).await;
    match d.store.get::<PodRecord>(&pod_id) {
        // Only the pause this watcher was started for: a pod stopped and (in future) restarted
        // meanwhile is someone else's business.
        Ok(Some(mut rec)) if rec.state == PodState::Ready && rec.pause_pid == pause_pid => {
            rec.state = PodState::NotReady;
            if let Err(e) = d.store.put(&pod_id, &rec) {
                tracing::warn!(pod_id = %pod_id, error = %e, "cannot record pod NotReady");
            }
            match &outcome {
                Ok(r) => {
                    tracing::info!(pod_id = %pod_id, exit_status = r.exit_status, "pause exited: pod NotReady")
                }
                Err(e) => {
                    tracing::warn!(pod_id = %pod_id, error = %e, "lost the pod's shim: pod NotReady")
                }
            }
        }
        _ => {}
    }
    release();
}
