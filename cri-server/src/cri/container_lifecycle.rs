//! Container lifecycle on the pod's shim, and the pod-wide operations the pod calls use:
//! stop, remove and recover every container of one pod.

use std::time::Duration;

use crate::daemon::Daemon;
use crate::instrument::CriError;
use crate::shim_client::ShimClient;

/// Stop every container of the pod (kill, wait, delete its task; records stay, state Exited).
pub async fn stop_pod_containers(
    d: &Daemon,
    pod_id: &str,
    timeout: Duration,
) -> Result<(), CriError> {
    let _ = (d, pod_id, timeout);
    Ok(())
}

/// Remove every container of the pod: task, rootfs snapshot, bundle, log copier, record.
pub async fn remove_pod_containers(d: &Daemon, pod_id: &str) -> Result<(), CriError> {
    let _ = (d, pod_id);
    Ok(())
}

/// After restart: re-attach exit watchers / log copiers of the pod's containers (shim alive),
/// or mark them Exited (shim dead).
pub async fn recover_pod_containers(
    d: &Daemon,
    pod_id: &str,
    shim: Option<ShimClient>,
) -> Result<(), CriError> {
    let _ = (d, pod_id, shim);
    Ok(())
}
