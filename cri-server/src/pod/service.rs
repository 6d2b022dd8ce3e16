//! The pod service: what the pod calls and the pod domain use, and nothing else of the daemon.
//! It holds the container service, because a pod's stop, removal and recovery act on its
//! containers through it.

use std::sync::Arc;

use crisp_proto::cri::v1::RunPodSandboxResponse;

use crate::config::Config;
use crate::container::service::ContainerService;
use crate::inflight::InFlight;
use crate::locks::ObjectLocks;
use crate::network::cni::CniManager;
use crate::pod::idmap::Allocator;
use crate::shim::client::Shims;
use crate::stats::cpu::CpuSamples;
use crate::store::Store;

pub struct PodService {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub cni: Arc<CniManager>,
    /// Pod ID ranges from subuid/subgid.
    pub idmap: Arc<Allocator>,
    /// One lock per pod for its state transitions (never held across a store-wide lock).
    pub pod_locks: Arc<ObjectLocks>,
    /// Live connections to the pods' shims, by pod id.
    pub shims: Arc<Shims>,
    /// RunPodSandbox calls in flight by pod name, so a retry joins the first call.
    pub pod_inflight: InFlight<RunPodSandboxResponse>,
    /// The previous CPU sample of each pod, for the CPU rate PodSandboxStats reports.
    pub pod_cpu: CpuSamples,
    /// Set when crispd begins to shut down (the pod watchers end with it).
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// The pods' containers.
    pub ctrs: Arc<ContainerService>,
}

impl std::fmt::Debug for PodService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodService")
            .field("state", &self.cfg.state)
            .finish_non_exhaustive()
    }
}
