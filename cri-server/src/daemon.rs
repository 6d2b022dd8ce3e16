//! What the CRI calls share: the configuration, the store and the small services that own
//! their own state. Deliberately not a god object: each field is a service with its own
//! locking, and CRI call modules take only what they use.

use std::sync::{Arc, RwLock};

use crate::network::cni::CniManager;
use crate::config::Config;
use crate::store::Store;

/// Something found missing during start-up that is not fatal (promise 4): reported by Status
/// and named by the calls that need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// The setting involved, e.g. `runtime_handlers.kata.binary`.
    pub key: String,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct Conditions {
    inner: RwLock<Vec<Condition>>,
}

impl Conditions {
    pub fn set(&self, list: Vec<Condition>) {
        match self.inner.write() {
            Ok(mut g) => *g = list,
            Err(p) => *p.into_inner() = list,
        }
    }

    pub fn list(&self) -> Vec<Condition> {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The problem recorded for `key`, if any.
    pub fn get(&self, key: &str) -> Option<Condition> {
        self.list().into_iter().find(|c| c.key == key)
    }
}

pub struct Daemon {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub cni: Arc<CniManager>,
    pub conditions: Conditions,
    pub images: crisp_image::Images,
    pub snapshotter: Arc<crisp_snapshotter::Snapshotter>,
    pub idmap: crate::pod::idmap::Allocator,
    /// One lock per pod for its state transitions (never held across a store-wide lock).
    pub pod_locks: crate::locks::ObjectLocks,
    /// One lock per container (taken after its pod's), and the log copiers and exit watchers
    /// of started containers; shared with the watcher tasks.
    pub containers: Arc<crate::container::registry::Registry>,
    /// Container lifecycle events for GetContainerEvents subscribers (kubelet's evented PLEG).
    /// Publishing never blocks: a subscriber that falls behind loses events and is told so.
    pub events: tokio::sync::broadcast::Sender<crisp_proto::cri::v1::ContainerEventResponse>,
    /// Set when crispd begins to shut down, so long-lived streams end and graceful shutdown
    /// does not wait forever for them.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Live connections to the pods' shims, by pod id.
    pub shims: crate::shim::client::Shims,
    /// Task exits / OOMs the shims publish to crispd's events socket.
    pub shim_events: tokio::sync::broadcast::Sender<crate::shim::events::ShimEvent>,
    /// The previous CPU sample of each container and of each pod, for the CPU rate the stats
    /// calls report (a rate needs two samples).
    pub container_cpu: crate::stats::cpu::CpuSamples,
    pub pod_cpu: crate::stats::cpu::CpuSamples,
    /// RunPodSandbox calls in flight by pod name, so a retry joins the first call.
    pub pod_inflight: crate::inflight::InFlight<crisp_proto::cri::v1::RunPodSandboxResponse>,
    /// The events ttrpc server, once started (stopped and its socket removed at shutdown).
    pub events_server: tokio::sync::Mutex<Option<crate::shim::events::EventsServer>>,
    /// This daemon's CRI call counters (recorded by `instrument::call`).
    pub metrics: Arc<crate::metrics::Metrics>,
}





impl Daemon {
    pub fn new(
        cfg: Arc<Config>,
        store: Store,
        cni: Arc<CniManager>,
        snapshotter: Arc<crisp_snapshotter::Snapshotter>,
        images: crisp_image::Images,
    ) -> Self {
        let idmap = crate::pod::idmap::Allocator::new(
            store.clone(),
            cfg.userns.user.clone(),
            cfg.userns.subuid_file.clone(),
            cfg.userns.subgid_file.clone(),
        );
        Self {
            cfg,
            store,
            cni,
            conditions: Conditions::default(),
            images,
            snapshotter,
            idmap,
            pod_locks: Default::default(),
            containers: Arc::default(),
            events: tokio::sync::broadcast::channel(1024).0,
            stopping: tokio::sync::watch::channel(false).0,
            shims: crate::shim::client::Shims::default(),
            shim_events: tokio::sync::broadcast::channel(1024).0,
            container_cpu: Default::default(),
            pod_cpu: Default::default(),
            pod_inflight: Default::default(),
            events_server: tokio::sync::Mutex::new(None),
            metrics: Arc::default(),
        }
    }

    /// What the metrics endpoint reads at each scrape.
    pub fn scrape(&self) -> crate::metrics::Scrape {
        crate::metrics::Scrape {
            metrics: Arc::clone(&self.metrics),
            store: self.store.clone(),
            cni: Arc::clone(&self.cni),
        }
    }
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("root", &self.cfg.root)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
impl Daemon {
    /// A daemon on temp dirs, for unit tests of CRI calls.
    pub fn for_test(dir: &std::path::Path) -> Self {
        let cfg = Config {
            root: dir.join("root"),
            state: dir.join("state"),
            ..Config::default()
        };
        let store = Store::open(&cfg.db_path()).expect("store");
        let cni = Arc::new(CniManager::new(
            dir.join("net.d"),
            dir.join("bin"),
            dir.join("cache"),
        ));
        let sn = Arc::new(
            crisp_snapshotter::Snapshotter::open(&cfg.snapshots_dir(), Default::default())
                .expect("snapshotter"),
        );
        let images =
            crisp_image::Images::open(&cfg.images_dir(), Arc::clone(&sn), Default::default())
                .expect("images");
        Daemon::new(Arc::new(cfg), store, cni, sn, images)
    }
}
