//! The container service: what the container calls and the container domain use, and nothing
//! else of the daemon. Each part owns its own locking; the parts shared with the pod service
//! (store, shim connections, pod locks, ID ranges) are cheap clones of the same objects.

use std::sync::Arc;

use crisp_proto::cri::v1::ContainerEventResponse;
use tokio::sync::broadcast;

use crate::config::Config;
use crate::container::registry::Registry;
use crate::locks::ObjectLocks;
use crate::pod::idmap::Allocator;
use crate::shim::client::Shims;
use crate::shim::events::ShimEvent;
use crate::stats::cpu::CpuSamples;
use crate::store::Store;

pub struct ContainerService {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub images: crisp_image::Images,
    pub snapshotter: Arc<crisp_snapshotter::Snapshotter>,
    /// Live connections to the pods' shims, by pod id (shared with the pod service).
    pub shims: Arc<Shims>,
    /// The pods' locks: Create and Start take the pod's before the container's.
    pub pod_locks: Arc<ObjectLocks>,
    /// The pods' ID ranges, for a user-namespaced pod's container rootfs.
    pub idmap: Arc<Allocator>,
    /// One lock per container (taken after its pod's), and the log copiers and exit watchers
    /// of started containers; shared with the watcher tasks.
    pub containers: Arc<Registry>,
    /// Container lifecycle events for GetContainerEvents subscribers (kubelet's evented PLEG).
    /// Publishing never blocks: a subscriber that falls behind loses events and is told so.
    pub events: broadcast::Sender<ContainerEventResponse>,
    /// Task exits / OOMs the shims publish to crispd's events socket.
    pub shim_events: broadcast::Sender<ShimEvent>,
    /// The previous CPU sample of each container, for the CPU rate ContainerStats reports.
    pub container_cpu: CpuSamples,
    /// The attach hubs of running containers: the log copiers offer output to them and
    /// Attach sessions read from (and write stdin through) them.
    pub attach: Arc<crate::container::attach::Hubs>,
    /// Held shared by a CreateContainer with image volumes from preparing them until its
    /// record is stored, and exclusively by RemoveImage from its in-use check to the removal:
    /// a removal never misses a container that is being created on the image.
    pub image_volume_users: tokio::sync::RwLock<()>,
}

impl std::fmt::Debug for ContainerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerService")
            .field("state", &self.cfg.state)
            .finish_non_exhaustive()
    }
}
