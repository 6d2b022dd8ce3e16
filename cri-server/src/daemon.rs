//! What the CRI calls share, assembled once at start-up: the pod service, the container
//! service and the image service, each owning its own state and locking. Deliberately not a
//! god object: the CRI handlers and the domain take the service they use, never the daemon;
//! only the server, start-up and Status see all of it.

use std::sync::{Arc, RwLock};

use crate::config::Config;
use crate::container::service::ContainerService;
use crate::network::cni::CniManager;
use crate::pod::service::PodService;
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

/// The daemon: the services the CRI calls take (pods, containers, images), and what only
/// the server and start-up use (conditions, shutdown, the events endpoint, metrics).
pub struct Daemon {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub cni: Arc<CniManager>,
    pub conditions: Conditions,
    /// The image service.
    pub images: crisp_image::Images,
    pub pods: Arc<PodService>,
    pub containers: Arc<ContainerService>,
    /// Set when crispd begins to shut down, so long-lived streams end and graceful shutdown
    /// does not wait forever for them.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// The events ttrpc server, once started (stopped and its socket removed at shutdown).
    pub events_server: tokio::sync::Mutex<Option<crate::shim::events::EventsServer>>,
    /// This daemon's CRI call counters (recorded by `instrument::call`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Streaming (exec, attach, port-forward): the sessions still running or cleaning up, and
    /// the stream server once started. (The attach hubs are the container service's.)
    pub stream_sessions: Arc<crate::stream::Sessions>,
    pub stream: Arc<std::sync::OnceLock<crate::stream::Streaming>>,
}

impl Daemon {
    pub fn new(
        cfg: Arc<Config>,
        store: Store,
        cni: Arc<CniManager>,
        snapshotter: Arc<crisp_snapshotter::Snapshotter>,
        images: crisp_image::Images,
    ) -> Self {
        let idmap = Arc::new(crate::pod::idmap::Allocator::new(
            store.clone(),
            cfg.userns.user.clone(),
            cfg.userns.subuid_file.clone(),
            cfg.userns.subgid_file.clone(),
        ));
        let shims: Arc<crate::shim::client::Shims> = Arc::default();
        let pod_locks: Arc<crate::locks::ObjectLocks> = Arc::default();
        let stopping = tokio::sync::watch::channel(false).0;
        let containers = Arc::new(ContainerService {
            cfg: Arc::clone(&cfg),
            store: store.clone(),
            images: images.clone(),
            snapshotter,
            shims: Arc::clone(&shims),
            pod_locks: Arc::clone(&pod_locks),
            idmap: Arc::clone(&idmap),
            containers: Arc::default(),
            events: tokio::sync::broadcast::channel(1024).0,
            shim_events: tokio::sync::broadcast::channel(1024).0,
            container_cpu: Default::default(),
            attach: Arc::default(),
            image_volume_users: Default::default(),
        });
        let pods = Arc::new(PodService {
            cfg: Arc::clone(&cfg),
            store: store.clone(),
            cni: Arc::clone(&cni),
            idmap,
            pod_locks,
            shims,
            pod_inflight: Default::default(),
            pod_cpu: Default::default(),
            stopping: stopping.clone(),
            ctrs: Arc::clone(&containers),
        });
        Self {
            cfg,
            store,
            cni,
            conditions: Conditions::default(),
            images,
            pods,
            containers,
            stopping,
            events_server: tokio::sync::Mutex::new(None),
            metrics: Arc::default(),
            stream_sessions: Arc::default(),
            stream: Arc::default(),
        }
    }

    /// What the metrics endpoint reads at each scrape.
    /// What streaming sessions reach.
    pub fn stream_runtime(&self) -> crate::stream::Runtime {
        crate::stream::Runtime {
            containers: Arc::clone(&self.containers),
            pods: Arc::clone(&self.pods),
            sessions: Arc::clone(&self.stream_sessions),
        }
    }

    pub fn scrape(&self) -> crate::metrics::Scrape {
        crate::metrics::Scrape {
            metrics: Arc::clone(&self.metrics),
            store: self.store.clone(),
            cni: Arc::clone(&self.cni),
            extra: vec![Arc::new(crate::stream::server::StreamGauges {
                sessions: Arc::clone(&self.stream_sessions),
                hubs: Arc::clone(&self.containers.attach),
                server: Arc::clone(&self.stream),
            })],
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
        Self::for_test_with(dir, |_| {})
    }

    /// [`Daemon::for_test`], with the config changed by `edit` first.
    pub fn for_test_with(dir: &std::path::Path, edit: impl FnOnce(&mut Config)) -> Self {
        let mut cfg = Config {
            root: dir.join("root"),
            state: dir.join("state"),
            ..Config::default()
        };
        edit(&mut cfg);
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
