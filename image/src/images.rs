//! The image service: pull, list, status, remove, filesystem info and garbage collection,
//! over the content store, the image store and the snapshotter. crispd's CRI layer wraps this.
//!
//! Pull pipeline (chosen so unpacking respects the layer chain while downloads overlap):
//! every missing layer's download starts at once into the content store (bounded by
//! `max_concurrent_downloads`), and one unpacker walks the layers in order. The unpacker
//! *follows* each layer's ingest file while it is being written, so a layer is decompressed
//! and unpacked into its prepared snapshot while it streams; layer N+1 downloads meanwhile
//! and is unpacked from what has already arrived once layer N is committed. A snapshot is
//! committed (under its chain id) only after both the compressed digest (checked by the
//! content store) and the diff_id (computed by the unpacker) verify; on any failure the
//! active snapshot is removed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use crisp_snapshotter::{ErrorKind as SnapKind, Snapshotter};
use futures::future::{BoxFuture, FutureExt, Shared};
use tracing::Instrument;

use crate::artifact::{self, ArtifactFile, ArtifactInfo, ManifestKind};
use crate::client::{Auth, ClientCache, RegistryClient};
use crate::content::{Begin, ContentStore, Ingest, IngestState, IngestWriter};
use crate::download::download;
use crate::error::{Error, Kind, Result};
use crate::manifest::{self, Descriptor, ImageManifest, Parsed};
use crate::reference::{Digest, Reference, parse_image_id};
use crate::store::{ImageRecord, ImageStore};
use crate::unpack;

/// Settings of the image service; every field has a default that runs a node.
#[derive(Debug, Clone)]
pub struct Config {
    /// containerd-style `certs.d` directory with `<registry>/hosts.toml` files.
    pub hosts_dir: Option<PathBuf>,
    /// Credentials per registry host, used when the CRI request carries none.
    pub credentials: HashMap<String, Auth>,
    /// Layer downloads running at once per pull.
    pub max_concurrent_downloads: usize,
    /// A download is stalled when it receives less than this many bytes per second...
    pub stall_min_bytes_per_sec: u64,
    /// ...averaged over this window.
    pub stall_window: Duration,
    /// How many times a stalled or dropped download is resumed (HTTP Range) before failing.
    pub max_resumes: u32,
    /// How often pull progress is logged.
    pub progress_interval: Duration,
    /// Limit for whole small requests: manifests, configs, tokens.
    pub request_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hosts_dir: None,
            credentials: HashMap::new(),
            max_concurrent_downloads: 3,
            stall_min_bytes_per_sec: 1024,
            stall_window: Duration::from_secs(30),
            max_resumes: 5,
            progress_interval: Duration::from_secs(10),
            request_timeout: crate::client::DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// Disk use of one part of the image store, for ImageFsInfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsUsage {
    pub mountpoint: PathBuf,
    pub used_bytes: u64,
    pub inodes_used: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsInfo {
    /// Unpacked layers (the snapshotter).
    pub snapshots: FsUsage,
    /// Compressed blobs, manifests and configs.
    pub content: FsUsage,
}

/// What a GC run removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs_removed: usize,
    pub snapshots_removed: usize,
}

type SharedPull = Shared<BoxFuture<'static, Result<Digest>>>;

/// The image service. Cheap to clone.
#[derive(Clone)]
pub struct Images {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    config: Config,
    content: ContentStore,
    store: ImageStore,
    snapshotter: Arc<Snapshotter>,
    /// Identical pulls in flight share one future.
    pulls: Mutex<HashMap<String, SharedPull>>,
    /// One unpack per chain id at a time: pulls of images sharing a layer wait for the
    /// first to commit it instead of unpacking it again.
    unpacking: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// Pulls hold it shared; GC holds it exclusive, so GC never removes what a pull is
    /// about to reference.
    gc_lock: tokio::sync::RwLock<()>,
    clients: ClientCache,
}

fn snap_err(what: String, e: crisp_snapshotter::Error) -> Error {
    let kind = match e.kind() {
        SnapKind::NotFound => Kind::NotFound,
        SnapKind::InvalidArgument => Kind::InvalidArgument,
        SnapKind::FailedPrecondition | SnapKind::AlreadyExists => Kind::FailedPrecondition,
        SnapKind::Internal => Kind::Internal,
    };
    Error::with_source(kind, what, e)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("blocking task failed: {e}")))?
}

/// What a pull resolved the reference to, for the record.
struct Resolved {
    repo_digest: String,
    manifest_digest: Digest,
    manifest_size: u64,
    index_digest: Option<Digest>,
}

/// Where a layer's bytes come from for the unpacker.
enum Source {
    Blob,
    Follow(Arc<Ingest>),
}

impl Images {
    /// Open the service rooted at `root` (content store and `images.redb` live there).
    pub fn open(root: &Path, snapshotter: Arc<Snapshotter>, config: Config) -> Result<Images> {
        std::fs::create_dir_all(root)
            .map_err(|e| Error::io(format!("creating {}", root.display()), e))?;
        let content = ContentStore::open(root)?;
        let store = ImageStore::open(root)?;
        let inner = Arc::new(Inner {
            root: root.to_path_buf(),
            config,
            content,
            store,
            snapshotter,
            pulls: Mutex::new(HashMap::new()),
            unpacking: Mutex::new(HashMap::new()),
            gc_lock: tokio::sync::RwLock::new(()),
            clients: ClientCache::default(),
        });
        // Extractions a crash interrupted leave active snapshots; nothing is in flight now.
        inner.remove_stale_extractions();
        Ok(Images { inner })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub fn content(&self) -> &ContentStore {
        &self.inner.content
    }

    /// Pull `reference` and return the image id. Identical concurrent pulls share one.
    pub async fn pull(&self, reference: &str, auth: Option<Auth>) -> Result<Digest> {
        let r = Reference::parse(reference)?;
        let key = r.to_string();
        let fut = {
            let mut pulls = self.inner.pulls.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = pulls.get(&key) {
                tracing::info!(image = %key, "joining a pull already in flight");
                f.clone()
            } else {
                let inner = self.inner.clone();
                let k = key.clone();
                // Spawned so that a caller that goes away (kubelet timing out) does not
                // cancel the pull others may share; it then completes for the retry.
                let handle = tokio::spawn(async move {
                    let res = inner.clone().do_pull(r, auth).await;
                    inner
                        .pulls
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&k);
                    if res.is_err() {
                        // Verified blobs and committed layers of a failed pull belong to no
                        // image: collect them once no pull is running (detached, so the
                        // error reaches the caller now).
                        let inner = inner.clone();
                        tokio::spawn(async move {
                            let _g = inner.gc_lock.write().await;
                            let i = inner.clone();
                            if let Err(e) = blocking(move || i.gc_locked()).await {
                                tracing::warn!(error = %e, "gc after a failed pull");
                            }
                        });
                    }
                    res
                });
                let f: BoxFuture<'static, Result<Digest>> = async move {
                    handle
                        .await
                        .map_err(|e| Error::internal(format!("pull task failed: {e}")))?
                }
                .boxed();
                let shared = f.shared();
                pulls.insert(key.clone(), shared.clone());
                shared
            }
        };
        fut.await
    }

    /// Every image.
    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        self.inner.store.list()
    }

    /// The image named by id (`sha256:…` or bare hex), tag or digest reference.
    pub fn status(&self, name: &str) -> Result<Option<ImageRecord>> {
        self.inner.find(name)
    }

    /// Mark an image pinned (kubelet's GC leaves pinned images alone, e.g. the sandbox
    /// image). Returns false if there is no such image.
    pub async fn set_pinned(&self, name: &str, pinned: bool) -> Result<bool> {
        let Some(rec) = self.inner.find(name)? else {
            return Ok(false);
        };
        let _g = self.inner.gc_lock.read().await;
        self.inner.store.set_pinned(&rec.id, pinned)
    }

    /// Remove the image named by id, tag or digest with all its tags, then collect what no
    /// image references. Returns false if there was no such image.
    pub async fn remove(&self, name: &str) -> Result<bool> {
        let Some(rec) = self.inner.find(name)? else {
            return Ok(false);
        };
        {
            let _g = self.inner.gc_lock.write().await;
            self.inner.store.delete(&rec.id)?;
        }
        tracing::info!(image = %name, id = %rec.id, "image removed");
        self.gc().await?;
        Ok(true)
    }

    /// Remove blobs and layer snapshots that no image references.
    pub async fn gc(&self) -> Result<GcReport> {
        let _g = self.inner.gc_lock.write().await;
        let inner = self.inner.clone();
        blocking(move || inner.gc_locked()).await
    }

    /// The collection crispd runs once at start-up, before anything pulls: the snapshotter's
    /// orphan directories (half-built `new-*`, half-removed `rm-*`), then blobs and layer
    /// snapshots no image references, which is what a pull killed with crispd leaves (its
    /// manifest, config and already verified layers belong to no record yet). Partial
    /// downloads and unfinished extractions went at [`Images::open`]. Never fatal: a node
    /// with a store it cannot tidy still starts, and the failure is logged.
    pub async fn gc_on_start(&self) -> GcReport {
        let _g = self.inner.gc_lock.write().await;
        let inner = self.inner.clone();
        let res = blocking(move || {
            // Nothing else uses the snapshotter yet: sweeping directories without records is safe.
            if let Err(e) = inner.snapshotter.cleanup() {
                tracing::warn!(error = %e, "start-up gc: snapshotter cleanup left something");
            }
            inner.gc_locked()
        })
        .await;
        match res {
            Ok(r) => {
                tracing::info!(
                    blobs_removed = r.blobs_removed,
                    snapshots_removed = r.snapshots_removed,
                    "start-up image gc done"
                );
                r
            }
            Err(e) => {
                tracing::warn!(error = %e, "start-up image gc failed; orphans stay until the next gc");
                GcReport::default()
            }
        }
    }

    /// Bytes and inodes used by snapshots and content.
    pub async fn fs_info(&self) -> Result<FsInfo> {
        let inner = self.inner.clone();
        blocking(move || {
            let mut bytes = 0u64;
            let mut inodes = 0u64;
            let mut names = Vec::new();
            inner
                .snapshotter
                .walk(&[] as &[&str], |i| {
                    names.push(i.name.clone());
                    Ok(())
                })
                .map_err(|e| snap_err("listing snapshots".into(), e))?;
            for n in names {
                if let Ok(u) = inner.snapshotter.usage(&n) {
                    bytes += u.size.max(0) as u64;
                    inodes += u.inodes.max(0) as u64;
                }
            }
            let (cb, ci) = inner.content.usage();
            Ok(FsInfo {
                snapshots: FsUsage {
                    mountpoint: inner.snapshotter.root().join("snapshots"),
                    used_bytes: bytes,
                    inodes_used: inodes,
                },
                content: FsUsage {
                    mountpoint: inner.content.root().to_path_buf(),
                    used_bytes: cb,
                    inodes_used: ci,
                },
            })
        })
        .await
    }
}

impl Inner {
    fn find(&self, name: &str) -> Result<Option<ImageRecord>> {
        let name = name.trim();
        if name.is_empty() {
            return Err(Error::invalid("image name is empty"));
        }
        if let Some(id) = parse_image_id(name)
            && let Some(r) = self.store.get(&id)?
        {
            return Ok(Some(r));
        }
        let all = self.store.list()?;
        // A short id prefix, as `crictl rmi 1a2b3c` passes.
        if name.len() >= 12 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hits: Vec<_> = all
                .iter()
                .filter(|r| r.id.hex().starts_with(name))
                .collect();
            if hits.len() == 1 {
                return Ok(Some(hits[0].clone()));
            }
        }
        let Ok(r) = Reference::parse(name) else {
            return Ok(None);
        };
        if let Some(d) = &r.digest {
            let want = r.with_digest(d);
            return Ok(all.into_iter().find(|i| i.repo_digests.contains(&want)));
        }
        let Some(tag) = r.tagged() else {
            return Ok(None);
        };
        Ok(all.into_iter().find(|i| i.repo_tags.contains(&tag)))
    }

    fn snapshot_exists(&self, chain: &Digest) -> bool {
        self.snapshotter.stat(chain.as_str()).is_ok()
    }

    fn remove_stale_extractions(&self) {
        let mut stale = Vec::new();
        let _ = self.snapshotter.walk(&[] as &[&str], |i| {
            if i.kind == crisp_snapshotter::Kind::Active && i.name.starts_with("extract-") {
                stale.push(i.name.clone());
            }
            Ok(())
        });
        for k in stale {
            match self.snapshotter.remove(&k) {
                Ok(()) => tracing::info!(snapshot = %k, "removed unfinished layer extraction"),
                Err(e) => {
                    tracing::warn!(snapshot = %k, error = %e, "could not remove unfinished layer extraction")
                }
            }
        }
    }

    fn gc_locked(&self) -> Result<GcReport> {
        let records = self.store.list()?;
        let mut keep_blobs: HashSet<Digest> = HashSet::new();
        let mut keep_snaps: HashSet<String> = HashSet::new();
        for r in &records {
            keep_blobs.extend(r.blobs().cloned());
            keep_snaps.extend(r.chain_ids.iter().map(|c| c.to_string()));
        }
        let mut report = GcReport::default();
        for d in self.content.list()? {
            if !keep_blobs.contains(&d) && !self.content.is_in_flight(&d) {
                self.content.remove(&d)?;
                report.blobs_removed += 1;
            }
        }
        // Layer snapshots are ours when named by a chain id; extraction leftovers too.
        let mut candidates = Vec::new();
        self.snapshotter
            .walk(&[] as &[&str], |i| {
                let ours = match i.kind {
                    crisp_snapshotter::Kind::Committed => {
                        Digest::parse(&i.name).is_ok() && !keep_snaps.contains(&i.name)
                    }
                    crisp_snapshotter::Kind::Active => i.name.starts_with("extract-"),
                    crisp_snapshotter::Kind::View => false,
                };
                if ours {
                    candidates.push(i.name.clone());
                }
                Ok(())
            })
            .map_err(|e| snap_err("listing snapshots".into(), e))?;
        // Children must go before parents; repeat while passes make progress. A snapshot
        // that a container still builds on stays (the snapshotter refuses to remove it).
        loop {
            let mut progress = false;
            let mut left = Vec::new();
            for k in candidates {
                match self.snapshotter.remove(&k) {
                    Ok(()) => {
                        report.snapshots_removed += 1;
                        progress = true;
                    }
                    Err(e) if e.kind() == SnapKind::NotFound => {}
                    Err(e) if e.kind() == SnapKind::FailedPrecondition => left.push(k),
                    Err(e) => return Err(snap_err(format!("removing snapshot {k}"), e)),
                }
            }
            candidates = left;
            if !progress || candidates.is_empty() {
                break;
            }
        }
        tracing::info!(
            blobs = report.blobs_removed,
            snapshots = report.snapshots_removed,
            kept = candidates.len(),
            "image gc done"
        );
        Ok(report)
    }

    async fn do_pull(self: Arc<Self>, r: Reference, auth: Option<Auth>) -> Result<Digest> {
        let span = tracing::info_span!("pull", image = %r);
        let started = Instant::now();
        let res = self.pull_inner(&r, auth).instrument(span.clone()).await;
        match &res {
            Ok(id) => span.in_scope(|| tracing::info!(id = %id, elapsed_ms = started.elapsed().as_millis() as u64, "pulled")),
            Err(e) => span.in_scope(|| tracing::warn!(error = %e, "pull failed")),
        }
        res.map_err(|e| e.context(format!("pulling {r}")))
    }

    async fn pull_inner(self: &Arc<Self>, r: &Reference, auth: Option<Auth>) -> Result<Digest> {
        let _g = self.gc_lock.read().await;
        let auth = auth
            .filter(|a| !a.is_empty())
            .or_else(|| self.config.credentials.get(&r.registry).cloned())
            .unwrap_or_default();
        let hosts = crate::hosts::resolve(self.config.hosts_dir.as_deref(), &r.registry)?;
        let client = Arc::new(
            RegistryClient::new(r, hosts, auth, &self.clients)?
                .with_request_timeout(self.config.request_timeout),
        );
        let (body, ct, top) = client.manifest(&r.object()).await?;
        let repo_digest = r.with_digest(&top);

        // Already present: one manifest request and done.
        if let Some(rec) = self
            .store
            .list()?
            .into_iter()
            .find(|i| i.repo_digests.contains(&repo_digest))
            && rec.chain_ids.last().is_none_or(|c| self.snapshot_exists(c))
        {
            tracing::info!(id = %rec.id, "image already present");
            let mut update = rec.clone();
            update.repo_tags = r.tagged().into_iter().collect();
            update.repo_digests = vec![repo_digest];
            return Ok(self.store.upsert(update)?.id);
        }

        self.content.put(&top, &body).await?;
        let (manifest_digest, manifest_body, index_digest) =
            self.platform_manifest(&client, r, &top, body, &ct).await?;
        let m = match manifest::parse(&manifest_body, "", manifest_digest.as_str())? {
            Parsed::Manifest(m) => m,
            Parsed::Index(_) => {
                return Err(Error::precondition(format!(
                    "{manifest_digest}: an index points to another index"
                )));
            }
        };
        if artifact::classify(&m) == ManifestKind::Artifact {
            let found = Resolved {
                repo_digest,
                manifest_digest,
                manifest_size: manifest_body.len() as u64,
                index_digest,
            };
            return self.pull_artifact(r, &client, &m, found).await;
        }
        let config_bytes = self.fetch_small(&client, &m.config.digest).await?;
        let cfg = manifest::parse_config(&config_bytes, &m.config.digest)?;
        if cfg.rootfs.diff_ids.len() != m.layers.len() {
            return Err(Error::data_loss(format!(
                "manifest {manifest_digest} lists {} layers but config {} has {} diff_ids",
                m.layers.len(),
                m.config.digest,
                cfg.rootfs.diff_ids.len()
            )));
        }
        let chain = manifest::chain_ids(&cfg.rootfs.diff_ids);
        self.unpack_all(r, &client, &m.layers, &cfg.rootfs.diff_ids, &chain)
            .await?;

        let size = m.config.size.max(config_bytes.len() as u64)
            + manifest_body.len() as u64
            + m.layers.iter().map(|l| l.size).sum::<u64>();
        let rec = ImageRecord {
            id: m.config.digest.clone(),
            repo_tags: r.tagged().into_iter().collect(),
            repo_digests: vec![repo_digest],
            size,
            manifest_digest,
            index_digests: index_digest.into_iter().collect(),
            layers: m.layers.iter().map(|l| l.digest.clone()).collect(),
            diff_ids: cfg.rootfs.diff_ids.clone(),
            chain_ids: chain,
            config: String::from_utf8_lossy(&config_bytes).into_owned(),
            created: now_secs(),
            pinned: false,
            artifact: None,
        };
        Ok(self.store.upsert(rec)?.id)
    }

    /// The manifest for this node: `body` itself, or the one an index lists for this platform
    /// (stored in the content store). Returns its digest, its body and the index's digest.
    async fn platform_manifest(
        &self,
        client: &RegistryClient,
        r: &Reference,
        top: &Digest,
        body: Bytes,
        ct: &str,
    ) -> Result<(Digest, Bytes, Option<Digest>)> {
        let found = match manifest::parse(&body, ct, &r.object())? {
            Parsed::Manifest(_) => (top.clone(), body, None),
            Parsed::Index(idx) => {
                let want = manifest::node_platform();
                let d = manifest::choose(&idx, &want).ok_or_else(|| {
                    let have: Vec<String> = idx
                        .manifests
                        .iter()
                        .filter_map(|d| d.platform.as_ref())
                        .map(|p| {
                            format!(
                                "{}/{}{}",
                                p.os,
                                p.architecture,
                                p.variant
                                    .as_deref()
                                    .map(|v| format!("/{v}"))
                                    .unwrap_or_default()
                            )
                        })
                        .collect();
                    Error::not_found(format!(
                        "index {top} has no manifest for {}/{} (it has: {})",
                        want.os,
                        want.architecture,
                        have.join(", ")
                    ))
                })?;
                let (b, _, md) = client.manifest(d.digest.as_str()).await?;
                self.content.put(&md, &b).await?;
                (md, b, Some(top.clone()))
            }
        };
        Ok(found)
    }

    /// An OCI artifact: its blobs into the content store (each verified by digest), then its
    /// files, laid out once, into a committed snapshot that image volumes view like a layer.
    async fn pull_artifact(
        self: &Arc<Self>,
        r: &Reference,
        client: &Arc<RegistryClient>,
        m: &ImageManifest,
        found: Resolved,
    ) -> Result<Digest> {
        // Titles first: an artifact that cannot be laid out safely is refused before any
        // download.
        let info = ArtifactInfo::of(m)?;
        tracing::info!(artifact_type = %info.artifact_type, files = info.files.len(), "pulling an OCI artifact");
        let config_bytes = self.fetch_small(client, &m.config.digest).await?;
        self.fetch_blobs(r, client, &m.layers).await?;
        let tree = artifact::tree_name(&found.manifest_digest);
        let inner = self.clone();
        let (files, name) = (info.files.clone(), tree.clone());
        self.build_locked(&tree, move || inner.build_tree(&files, &name))
            .await
            .map_err(|e| e.context(format!("files of artifact {}", found.manifest_digest)))?;
        let size = m.config.size.max(config_bytes.len() as u64)
            + found.manifest_size
            + m.layers.iter().map(|l| l.size).sum::<u64>();
        let rec = ImageRecord {
            id: found.manifest_digest.clone(),
            repo_tags: r.tagged().into_iter().collect(),
            repo_digests: vec![found.repo_digest],
            size,
            manifest_digest: found.manifest_digest,
            index_digests: found.index_digest.into_iter().collect(),
            layers: m.layers.iter().map(|l| l.digest.clone()).collect(),
            diff_ids: Vec::new(),
            chain_ids: vec![tree],
            config: String::from_utf8_lossy(&config_bytes).into_owned(),
            created: now_secs(),
            pinned: false,
            artifact: Some(info),
        };
        Ok(self.store.upsert(rec)?.id)
    }

    /// Every blob of `layers` into the content store, verified by digest and size; returns
    /// once all are committed. On failure the downloads this pull started and nobody joined
    /// are abandoned and awaited, as for image layers.
    async fn fetch_blobs(
        self: &Arc<Self>,
        r: &Reference,
        client: &Arc<RegistryClient>,
        layers: &[Descriptor],
    ) -> Result<()> {
        let sem = Arc::new(tokio::sync::Semaphore::new(
            self.config.max_concurrent_downloads.max(1),
        ));
        let mut started = Started {
            content: self.content.clone(),
            tasks: Vec::new(),
        };
        let mut waits: Vec<(Digest, Arc<Ingest>)> = Vec::new();
        let mut begun = || -> Result<()> {
            for layer in layers {
                if waits.iter().any(|(d, _)| *d == layer.digest) {
                    continue;
                }
                match self.content.begin(&layer.digest)? {
                    Begin::Exists => {}
                    Begin::InFlight(i) => waits.push((layer.digest.clone(), i)),
                    Begin::Start(w) => {
                        let ing = ContentStore::ingest_of(&w);
                        let task = self.spawn_download(r, client, &sem, *w, layer);
                        started.tasks.push((ing.clone(), task));
                        waits.push((layer.digest.clone(), ing));
                    }
                }
            }
            Ok(())
        };
        let mut res = begun();
        if res.is_ok() {
            for (d, ing) in &waits {
                if let Err(e) = ing.wait().await {
                    res = Err(e.context(format!("artifact layer {d} from {}", r.registry)));
                    break;
                }
            }
        }
        match res {
            Ok(()) => started.tasks.clear(),
            Err(_) => started.abandon_and_wait().await,
        }
        res
    }

    /// One layer's download as a detached task (another pull may follow its ingest even if
    /// ours fails), holding a permit of `sem` while it runs.
    fn spawn_download(
        &self,
        r: &Reference,
        client: &Arc<RegistryClient>,
        sem: &Arc<tokio::sync::Semaphore>,
        w: IngestWriter,
        layer: &Descriptor,
    ) -> tokio::task::JoinHandle<()> {
        let watched = ContentStore::ingest_of(&w);
        let (client, sem, cfg) = (client.clone(), sem.clone(), self.config.clone());
        let layer = layer.clone();
        let span = tracing::info_span!("download", image = %r, layer = %layer.digest);
        tokio::spawn(
            async move {
                let _permit = tokio::select! {
                    biased;
                    // Dropping the writer fails the ingest and removes its file.
                    _ = watched.cancelled() => return,
                    p = sem.acquire_owned() => p,
                };
                let t0 = std::time::Instant::now();
                match download(&client, w, &layer, &cfg).await {
                    Ok(n) => tracing::debug!(
                        bytes = n,
                        ms = t0.elapsed().as_millis() as u64,
                        "blob downloaded and committed"
                    ),
                    Err(e) => tracing::warn!(error = %e, "layer download failed"),
                }
            }
            .instrument(span),
        )
    }

    /// Run `f` on a blocking thread holding the lock of snapshot `name`: pulls sharing a
    /// layer (or an artifact) wait for the first to commit it instead of building it again.
    async fn build_locked<T: Send + 'static>(
        self: &Arc<Self>,
        name: &Digest,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let lock = self
            .unpacking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.clone())
            .or_default()
            .clone();
        let guard = lock.lock().await;
        let res = blocking(f).await;
        drop(guard);
        let mut map = self.unpacking.lock().unwrap_or_else(|p| p.into_inner());
        // Ours and the map's: nobody else waits, forget the entry.
        if Arc::strong_count(&lock) == 2 {
            map.remove(name);
        }
        res
    }

    /// The snapshot `name` holding an artifact's files (nothing when it exists already).
    fn build_tree(&self, files: &[ArtifactFile], name: &Digest) -> Result<()> {
        self.in_new_snapshot(name, None, |dir| {
            artifact::write_tree(&self.content, files, dir)
        })
    }

    /// Prepare an extraction snapshot on `parent`, let `fill` write its directory, commit it
    /// as `name`; on failure it is removed. A crash leaves an `extract-` snapshot, which
    /// [`Images::open`] removes. Nothing to do when `name` exists (another pull made it).
    fn in_new_snapshot(
        &self,
        name: &Digest,
        parent: Option<&Digest>,
        fill: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        if self.snapshot_exists(name) {
            return Ok(());
        }
        let key = format!("extract-{:016x}-{}", rand::random::<u64>(), name);
        let labels = HashMap::from([("containerd.io/snapshot.ref".to_string(), name.to_string())]);
        let mounts = self
            .snapshotter
            .prepare(&key, parent.map(|p| p.as_str()), labels)
            .map_err(|e| snap_err(format!("preparing snapshot for {name}"), e))?;
        let res = (|| -> Result<()> {
            let upper = mounts.iter().find_map(|m| m.upper_dir()).ok_or_else(|| {
                Error::internal(format!(
                    "snapshot {key}: no writable directory among its mounts {mounts:?}"
                ))
            })?;
            fill(&upper)?;
            // The snapshot's record says "complete" once committed: its files must be on
            // disk first, or a power loss leaves a committed layer with empty files.
            let t_sync = std::time::Instant::now();
            sync_filesystem(&upper)
                .map_err(|e| Error::internal(format!("syncing layer {name} in {upper:?}: {e}")))?;
            tracing::debug!(
                sync_ms = t_sync.elapsed().as_millis() as u64,
                "layer files synced"
            );
            match self.snapshotter.commit(name.as_str(), &key, HashMap::new()) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == SnapKind::AlreadyExists => {
                    let _ = self.snapshotter.remove(&key);
                    Ok(())
                }
                Err(e) => Err(snap_err(format!("committing snapshot {name}"), e)),
            }
        })();
        if res.is_err()
            && let Err(e) = self.snapshotter.remove(&key)
        {
            tracing::warn!(snapshot = %key, error = %e, "removing the half-built snapshot failed");
        }
        res
    }

    /// A small blob (a config) through the content store, so concurrent pulls fetch it once.
    async fn fetch_small(&self, client: &RegistryClient, digest: &Digest) -> Result<Vec<u8>> {
        match self.content.begin(digest)? {
            Begin::Exists => {}
            Begin::InFlight(i) => {
                i.wait().await?;
            }
            Begin::Start(mut w) => {
                let b = match client.blob_bytes(digest).await {
                    Ok(b) => b,
                    Err(e) => return Err(w.fail(e)),
                };
                w.write(&b).await?;
                w.commit(Some(b.len() as u64)).await?;
            }
        }
        self.content.read(digest)
    }

    async fn unpack_all(
        self: &Arc<Self>,
        r: &Reference,
        client: &Arc<RegistryClient>,
        layers: &[Descriptor],
        diff_ids: &[Digest],
        chain: &[Digest],
    ) -> Result<()> {
        // Highest layer whose snapshot exists: everything below it exists too (parents).
        let start = (0..chain.len())
            .rev()
            .find(|&i| self.snapshot_exists(&chain[i]))
            .map(|i| i + 1)
            .unwrap_or(0);
        if start == chain.len() {
            return Ok(());
        }
        let sem = Arc::new(tokio::sync::Semaphore::new(
            self.config.max_concurrent_downloads.max(1),
        ));
        let mut sources = Vec::new();
        // Downloads this pull started, so that a failed pull can abandon the ones nobody else
        // joined and wait for them: it then leaves no ingest file behind.
        let mut started = Started {
            content: self.content.clone(),
            tasks: Vec::new(),
        };
        let begun = (|| -> Result<()> {
            for layer in &layers[start..] {
                // A layer listed twice follows this pull's own download: joining it through
                // `begin` would count as another pull and keep it from being abandoned.
                if let Some((ing, _)) = started.tasks.iter().find(|(i, _)| i.digest == layer.digest)
                {
                    sources.push(Source::Follow(ing.clone()));
                    continue;
                }
                let src = match self.content.begin(&layer.digest)? {
                    Begin::Exists => Source::Blob,
                    Begin::InFlight(i) => Source::Follow(i),
                    Begin::Start(w) => {
                        let ing = ContentStore::ingest_of(&w);
                        let task = self.spawn_download(r, client, &sem, *w, layer);
                        started.tasks.push((ing.clone(), task));
                        Source::Follow(ing)
                    }
                };
                sources.push(src);
            }
            Ok(())
        })();
        if let Err(e) = begun {
            started.abandon_and_wait().await;
            return Err(e);
        }
        let progress = self
            .clone()
            .progress_logger(r.clone(), layers[start..].to_vec(), &sources);
        let res = async {
            for (n, src) in sources.into_iter().enumerate() {
                let i = start + n;
                let inner = self.clone();
                let layer = layers[i].clone();
                let diff_id = diff_ids[i].clone();
                let name = chain[i].clone();
                let parent = if i == 0 { None } else { Some(chain[i - 1].clone()) };
                let registry = r.registry.clone();
                let total = layers.len();
                let t0 = Instant::now();
                let res = self
                    .build_locked(&chain[i], move || {
                        inner.unpack_one(src, &layer, &diff_id, &name, parent.as_ref())
                    })
                    .await;
                res.map_err(|e| e.context(format!("layer {} ({}/{total}) from {registry}", layers[i].digest, i + 1)))?;
                tracing::info!(layer = %layers[i].digest, chain_id = %chain[i], ms = t0.elapsed().as_millis() as u64, "layer unpacked");
            }
            Ok(())
        }
        .await;
        progress.abort();
        match res {
            Ok(()) => started.tasks.clear(),
            Err(_) => started.abandon_and_wait().await,
        }
        res
    }

    fn unpack_one(
        &self,
        src: Source,
        layer: &Descriptor,
        diff_id: &Digest,
        name: &Digest,
        parent: Option<&Digest>,
    ) -> Result<()> {
        self.in_new_snapshot(name, parent, |upper| {
            let out = match src {
                Source::Blob => {
                    unpack::unpack_layer(self.content.open_blob(&layer.digest)?, upper)?
                }
                Source::Follow(ing) => {
                    unpack::unpack_layer_checked(ing.reader(), upper, unpack::BlobCheck::Reader)?
                }
            };
            if let Some(got) = &out.compressed_digest
                && got != &layer.digest
            {
                return Err(Error::data_loss(format!(
                    "content has digest {got}, the manifest says {}",
                    layer.digest
                )));
            }
            if &out.diff_id != diff_id {
                return Err(Error::data_loss(format!(
                    "uncompressed content has digest {}, the image config says diff_id {diff_id}",
                    out.diff_id
                )));
            }
            Ok(())
        })
    }

    /// Logs per-layer bytes done / total at a steady interval until aborted.
    fn progress_logger(
        self: Arc<Self>,
        r: Reference,
        layers: Vec<Descriptor>,
        sources: &[Source],
    ) -> tokio::task::JoinHandle<()> {
        let watched: Vec<Option<Arc<Ingest>>> = sources
            .iter()
            .map(|s| match s {
                Source::Blob => None,
                Source::Follow(i) => Some(i.clone()),
            })
            .collect();
        let every = self.config.progress_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let mut parts = Vec::new();
                let (mut done, mut total) = (0u64, 0u64);
                for (l, w) in layers.iter().zip(&watched) {
                    let got = match w.as_ref().map(|i| i.state()) {
                        None | Some(IngestState::Done { .. }) => l.size,
                        Some(IngestState::Running { written }) => written,
                        Some(IngestState::Failed(_)) => 0,
                    };
                    done += got;
                    total += l.size;
                    parts.push(format!("{}:{}/{}", &l.digest.hex()[..12], got, l.size));
                }
                tracing::info!(image = %r, done, total, layers = %parts.join(" "), "pull progress");
            }
        })
    }
}

/// The layer downloads one pull started. A pull runs as a task of its own (a caller that goes
/// away does not cancel it), so it ends by returning; should it unwind instead, whatever is
/// left here is abandoned on drop unless another pull joined it, and the cancelled downloader
/// removes its own ingest file.
struct Started {
    content: ContentStore,
    tasks: Vec<(Arc<Ingest>, tokio::task::JoinHandle<()>)>,
}

impl Started {
    /// Abandon every download nobody else joined, then wait until each has removed its
    /// ingest file or committed its (verified, now unreferenced) blob. All are cancelled
    /// first, so none keeps fetching (or gets joined) while an earlier one winds down.
    async fn abandon_and_wait(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        let waits: Vec<_> = tasks
            .into_iter()
            .filter(|(ing, _)| self.content.abandon(ing))
            .map(|(_, task)| task)
            .collect();
        futures::future::join_all(waits).await;
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        for (ing, _) in &self.tasks {
            self.content.abandon(ing);
        }
    }
}

/// syncfs(2) on the filesystem holding `dir`: one call makes a whole unpacked layer durable,
/// instead of an fsync per file (containerd offers the same as `image_pull_with_sync_fs`).
fn sync_filesystem(dir: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir)?;
    // SAFETY: syncfs only reads the fd, which `d` keeps open for the call.
    if unsafe { libc::syncfs(d.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
