//! The overlay snapshotter: containerd's Snapshotter semantics over one redb file and a
//! directory per snapshot.
//!
//! Layout, like containerd's overlay snapshotter:
//!
//! ```text
//! <root>/metadata.redb          every record (the only durable state)
//! <root>/snapshots/<id>/fs      the snapshot's files (upper dir of an active snapshot)
//! <root>/snapshots/<id>/work    overlay work dir (active snapshots)
//! <root>/snapshots/new-<rand>   a snapshot being built (renamed to <id> inside the txn)
//! <root>/snapshots/rm-<id>      a removed snapshot being deleted
//! <root>/tmp-mounts/<rand>/<n>  temporary idmapped mounts of the fallback path
//! ```
//!
//! Each mutating call runs inside one redb write transaction (redb allows one at a time, so
//! they are serialised). A snapshot is built in `new-<rand>`, renamed to its id, the rename
//! is fsynced, and only then is the transaction that records it committed: a crash leaves
//! either nothing (an orphan directory that [`Snapshotter::cleanup`] removes) or a whole
//! snapshot. Removal commits the record's deletion first and deletes the directory after, with
//! the mount-aware remover.

use std::collections::HashMap;
use std::fmt;
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, db};
use crate::failpoint;
use crate::filter::Filters;
use crate::fsutil;
use crate::idmap::{IdMap, LABEL_GID_MAPPING, LABEL_UID_MAPPING};
use crate::mount::{IdmapMode, Mount, Mounter};

/// Snapshot records, keyed by snapshot key (or committed name). Value: JSON [`Record`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Counters: `next_id`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Kind of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only view of a committed parent.
    View,
    /// Writable; can be committed.
    Active,
    /// Immutable; can be a parent.
    Committed,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        })
    }
}

/// What `stat` returns, like containerd's `snapshots.Info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Key (active/view) or name (committed).
    pub name: String,
    /// Parent's name, if any.
    pub parent: Option<String>,
    /// Kind.
    pub kind: Kind,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Creation time.
    pub created: SystemTime,
    /// Last update.
    pub updated: SystemTime,
}

/// Disk usage of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes.
    pub size: i64,
    /// Inodes.
    pub inodes: i64,
}

/// Options of [`Snapshotter::open`].
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// How idmapped lower layers are mounted (probed once when `Auto`).
    pub idmap_mode: IdmapMode,
}

/// Stored form of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: u64,
    kind: Kind,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    parent: String,
    #[serde(default)]
    labels: HashMap<String, String>,
    created_ns: u64,
    updated_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn ns_time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

impl Record {
    fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_string(),
            parent: (!self.parent.is_empty()).then(|| self.parent.clone()),
            kind: self.kind,
            labels: self.labels.clone(),
            created: ns_time(self.created_ns),
            updated: ns_time(self.updated_ns),
        }
    }
}

fn decode(key: &str, v: &[u8]) -> Result<Record> {
    serde_json::from_slice(v).map_err(|source| Error::Decode {
        key: key.to_string(),
        source,
    })
}

fn encode(r: &Record) -> Vec<u8> {
    // A struct of strings, maps and integers always serialises.
    serde_json::to_vec(r).unwrap_or_default()
}

fn get<T: ReadableTable<&'static str, &'static [u8]>>(t: &T, key: &str) -> Result<Option<Record>> {
    match t.get(key).map_err(db)? {
        Some(v) => Ok(Some(decode(key, v.value())?)),
        None => Ok(None),
    }
}

/// The snapshotter. `Send + Sync`: share it with `Arc`. Calls block (filesystem work); async
/// callers use `spawn_blocking`.
pub struct Snapshotter {
    root: PathBuf,
    db: Database,
    mounter: Mounter,
    /// Serialises directory deletion (after `remove` commits) with `cleanup`.
    dirs: Mutex<()>,
}

impl fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshotter")
            .field("root", &self.root)
            .field("mounter", &self.mounter)
            .finish()
    }
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Snapshotter>();
};

/// Removes a directory with the safe remover when dropped, unless disarmed.
struct DirGuard(Option<PathBuf>);

impl DirGuard {
    fn set(&mut self, p: PathBuf) {
        self.0 = Some(p);
    }
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take()
            && let Err(e) = fsutil::remove_all_no_xdev(&p)
        {
            tracing::warn!(path = %p.display(), error = %e, "removing directory of failed snapshot");
        }
    }
}

fn mkdir(p: &Path, mode: u32) -> Result<()> {
    DirBuilder::new()
        .mode(mode)
        .create(p)
        .map_err(Error::io(format!("mkdir {}", p.display())))
}

fn fsync_dir(p: &Path) -> Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(Error::io(format!("fsync {}", p.display())))
}

fn mappings(labels: &HashMap<String, String>) -> Result<Option<(IdMap, IdMap)>> {
    match (labels.get(LABEL_UID_MAPPING), labels.get(LABEL_GID_MAPPING)) {
        (None, None) => Ok(None),
        (Some(u), Some(g)) => Ok(Some((IdMap::parse(u)?, IdMap::parse(g)?))),
        _ => Err(Error::InvalidArgument(format!(
            "labels {LABEL_UID_MAPPING} and {LABEL_GID_MAPPING} must be given together"
        ))),
    }
}

impl Snapshotter {
    /// Opens (creating if needed) a snapshotter rooted at `root`.
    pub fn open(root: &Path, config: Config) -> Result<Self> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join("snapshots"))
            .map_err(Error::io(format!(
                "mkdir {}",
                root.join("snapshots").display()
            )))?;
        let database = Database::create(root.join("metadata.redb")).map_err(db)?;
        let txn = database.begin_write().map_err(db)?;
        {
            txn.open_table(SNAPSHOTS).map_err(db)?;
            txn.open_table(META).map_err(db)?;
        }
        txn.commit().map_err(db)?;
        let mounter = Mounter::new(config.idmap_mode, root.join("tmp-mounts"));
        let mode = mounter.mode();
        tracing::info!(root = %root.display(), idmap_mode = %mode, "snapshotter opened");
        Ok(Snapshotter {
            root: root.to_path_buf(),
            db: database,
            mounter,
            dirs: Mutex::new(()),
        })
    }

    /// The mounter configured for this snapshotter (idmap mode, temporary mount dir).
    pub fn mounter(&self) -> &Mounter {
        &self.mounter
    }

    /// Root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    /// Creates an active snapshot on `parent` (None or "" for none); returns its mounts.
    pub fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let _s = tracing::info_span!("prepare", snapshot = key).entered();
        self.create(Kind::Active, key, parent, labels)
    }

    /// Creates a read-only view of `parent`; returns its mounts.
    pub fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let _s = tracing::info_span!("view", snapshot = key).entered();
        self.create(Kind::View, key, parent, labels)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        let parent = parent.filter(|p| !p.is_empty());
        let maps = mappings(&labels)?;
        let txn = self.db.begin_write().map_err(db)?;
        let (id, parent_ids) = {
            let mut t = txn.open_table(SNAPSHOTS).map_err(db)?;
            if t.get(key).map_err(db)?.is_some() {
                return Err(Error::AlreadyExists(key.to_string()));
            }
            let parent_ids = match parent {
                None => Vec::new(),
                Some(p) => {
                    let pr = get(&t, p)?.ok_or_else(|| Error::NotFound(p.to_string()))?;
                    if pr.kind != Kind::Committed {
                        return Err(Error::InvalidArgument(format!(
                            "parent {p:?} is not a committed snapshot"
                        )));
                    }
                    self.chain(&t, p)?
                }
            };
            let mut m = txn.open_table(META).map_err(db)?;
            let mut id = m
                .get("next_id")
                .map_err(db)?
                .map(|v| v.value())
                .unwrap_or(1);
            // A crash after the rename but before the commit leaves `<id>` behind with the
            // counter not advanced: never build on top of such an orphan, skip it (cleanup
            // removes it).
            while std::fs::symlink_metadata(self.dir(id)).is_ok() {
                tracing::warn!(
                    id,
                    "snapshot directory exists without a record (crash leftover); skipping id"
                );
                id += 1;
            }
            m.insert("next_id", id + 1).map_err(db)?;

            let mut guard = DirGuard(None);
            let tmp = self
                .snapshots_dir()
                .join(format!("new-{}", crate::mount::rand_name()));
            mkdir(&tmp, 0o700)?;
            guard.set(tmp.clone());
            let fs = tmp.join("fs");
            mkdir(&fs, 0o755)?;
            if kind == Kind::Active {
                mkdir(&tmp.join("work"), 0o711)?;
            }
            if let (Some((u, g)), Kind::Active) = (&maps, kind) {
                let (Some(uid), Some(gid)) = (u.root_host_id(), g.root_host_id()) else {
                    return Err(Error::InvalidArgument(
                        "id mapping does not map id 0 (the container's root)".into(),
                    ));
                };
                for d in [fs.clone(), tmp.join("work")] {
                    std::os::unix::fs::chown(&d, Some(uid), Some(gid))
                        .map_err(Error::io(format!("chown {}", d.display())))?;
                }
            }
            failpoint::hit("snapshotter.prepare.before_rename")?;
            let dst = self.dir(id);
            std::fs::rename(&tmp, &dst).map_err(Error::io(format!(
                "rename {} to {}",
                tmp.display(),
                dst.display()
            )))?;
            guard.set(dst);
            fsync_dir(&self.snapshots_dir())?;
            failpoint::hit("snapshotter.prepare.after_rename")?;
            let now = now_ns();
            let rec = Record {
                id,
                kind,
                parent: parent.unwrap_or_default().to_string(),
                labels: labels.clone(),
                created_ns: now,
                updated_ns: now,
                usage: None,
            };
            t.insert(key, encode(&rec).as_slice()).map_err(db)?;
            drop(t);
            drop(m);
            let committed = txn.commit().map_err(db);
            committed?;
            guard.disarm();
            (id, parent_ids)
        };
        tracing::info!(id, kind = %kind, parents = parent_ids.len(), "snapshot created");
        Ok(self.mounts_for(id, kind, &parent_ids, &labels))
    }

    /// Ids of `name` and its ancestors, nearest first.
    fn chain<T: ReadableTable<&'static str, &'static [u8]>>(
        &self,
        t: &T,
        name: &str,
    ) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        let mut cur = name.to_string();
        loop {
            let r = get(t, &cur)?.ok_or_else(|| Error::NotFound(cur.clone()))?;
            ids.push(r.id);
            if r.parent.is_empty() {
                return Ok(ids);
            }
            if ids.len() > 100_000 {
                return Err(Error::FailedPrecondition(format!(
                    "parent chain of {name:?} loops"
                )));
            }
            cur = r.parent;
        }
    }

    fn mounts_for(
        &self,
        id: u64,
        kind: Kind,
        parents: &[u64],
        labels: &HashMap<String, String>,
    ) -> Vec<Mount> {
        let fs = |id: u64| self.dir(id).join("fs").to_string_lossy().into_owned();
        let idmap_opts = || -> Vec<String> {
            match (labels.get(LABEL_UID_MAPPING), labels.get(LABEL_GID_MAPPING)) {
                (Some(u), Some(g)) => vec![format!("uidmap={u}"), format!("gidmap={g}")],
                _ => Vec::new(),
            }
        };
        if parents.is_empty() {
            // Its own (empty, already chowned) dir: no mapping needed.
            let ro = if kind == Kind::Active { "rw" } else { "ro" };
            return vec![Mount {
                typ: "bind".into(),
                source: fs(id),
                target: String::new(),
                options: vec![ro.into(), "rbind".into()],
            }];
        }
        if kind == Kind::Active {
            let mut options = vec![
                format!("workdir={}", self.dir(id).join("work").display()),
                format!("upperdir={}", fs(id)),
                format!(
                    "lowerdir={}",
                    parents.iter().map(|p| fs(*p)).collect::<Vec<_>>().join(":")
                ),
            ];
            options.extend(idmap_opts());
            return vec![Mount {
                typ: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options,
            }];
        }
        if parents.len() == 1 {
            let mut options = vec!["ro".to_string(), "rbind".to_string()];
            options.extend(idmap_opts());
            return vec![Mount {
                typ: "bind".into(),
                source: fs(parents[0]),
                target: String::new(),
                options,
            }];
        }
        let mut options = vec![format!(
            "lowerdir={}",
            parents.iter().map(|p| fs(*p)).collect::<Vec<_>>().join(":")
        )];
        options.extend(idmap_opts());
        vec![Mount {
            typ: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        }]
    }

    /// Mounts of an active snapshot or view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let _s = tracing::debug_span!("mounts", snapshot = key).entered();
        let txn = self.db.begin_read().map_err(db)?;
        let t = txn.open_table(SNAPSHOTS).map_err(db)?;
        let r = get(&t, key)?.ok_or_else(|| Error::NotFound(key.to_string()))?;
        if r.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed; only active snapshots and views have mounts"
            )));
        }
        let parents = if r.parent.is_empty() {
            Vec::new()
        } else {
            self.chain(&t, &r.parent)?
        };
        Ok(self.mounts_for(r.id, r.kind, &parents, &r.labels))
    }

    /// Commits active snapshot `key` as `name` (its labels become `labels`).
    pub fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<()> {
        let _s = tracing::info_span!("commit", snapshot = key, name).entered();
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "commit name must not be empty".into(),
            ));
        }
        let txn = self.db.begin_write().map_err(db)?;
        {
            let mut t = txn.open_table(SNAPSHOTS).map_err(db)?;
            let r = get(&t, key)?.ok_or_else(|| Error::NotFound(key.to_string()))?;
            if r.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is a {}, only active snapshots can be committed",
                    r.kind
                )));
            }
            if t.get(name).map_err(db)?.is_some() {
                return Err(Error::AlreadyExists(name.to_string()));
            }
            let (size, inodes) = fsutil::disk_usage(&self.dir(r.id).join("fs"))?;
            let now = now_ns();
            let rec = Record {
                kind: Kind::Committed,
                labels,
                created_ns: now,
                updated_ns: now,
                usage: Some(Usage { size, inodes }),
                ..r
            };
            t.remove(key).map_err(db)?;
            t.insert(name, encode(&rec).as_slice()).map_err(db)?;
        }
        failpoint::hit("snapshotter.commit.before_commit")?;
        txn.commit().map_err(db)?;
        Ok(())
    }

    /// Removes a snapshot; FailedPrecondition if it has children.
    pub fn remove(&self, key: &str) -> Result<()> {
        let _s = tracing::info_span!("remove", snapshot = key).entered();
        let txn = self.db.begin_write().map_err(db)?;
        let id = {
            let mut t = txn.open_table(SNAPSHOTS).map_err(db)?;
            let r = get(&t, key)?.ok_or_else(|| Error::NotFound(key.to_string()))?;
            for e in t.iter().map_err(db)? {
                let (k, v) = e.map_err(db)?;
                let c = decode(k.value(), v.value())?;
                if c.parent == key {
                    return Err(Error::FailedPrecondition(format!(
                        "cannot remove snapshot {key:?}: snapshot {:?} is its child",
                        k.value()
                    )));
                }
            }
            t.remove(key).map_err(db)?;
            r.id
        };
        txn.commit().map_err(db)?;
        // The record is gone; from here on the directory is an orphan that cleanup would also
        // remove. Delete it now, never across a mount point.
        let _d = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        failpoint::hit("snapshotter.remove.after_commit")?;
        let dir = self.dir(id);
        let rm = self.snapshots_dir().join(format!("rm-{id}"));
        match std::fs::rename(&dir, &rm) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "rename before removal failed; left for cleanup");
                return Ok(());
            }
        }
        if let Err(e) = fsutil::remove_all_no_xdev(&rm) {
            tracing::error!(path = %rm.display(), error = %e, "snapshot directory not fully removed; left for cleanup");
        }
        Ok(())
    }

    /// Info of a snapshot.
    pub fn stat(&self, key: &str) -> Result<Info> {
        let txn = self.db.begin_read().map_err(db)?;
        let t = txn.open_table(SNAPSHOTS).map_err(db)?;
        let r = get(&t, key)?.ok_or_else(|| Error::NotFound(key.to_string()))?;
        Ok(r.info(key))
    }

    /// Updates labels: `fieldpaths` empty or `labels` replaces all of them; `labels.<k>` sets
    /// (or, if absent from `info`, deletes) one. Other fields are immutable.
    pub fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info> {
        let _s = tracing::info_span!("update", snapshot = %info.name).entered();
        let txn = self.db.begin_write().map_err(db)?;
        let out = {
            let mut t = txn.open_table(SNAPSHOTS).map_err(db)?;
            let mut r = get(&t, &info.name)?.ok_or_else(|| Error::NotFound(info.name.clone()))?;
            if fieldpaths.is_empty() {
                r.labels = info.labels.clone();
            }
            for fp in fieldpaths {
                if fp == "labels" {
                    r.labels = info.labels.clone();
                } else if let Some(k) = fp.strip_prefix("labels.") {
                    match info.labels.get(k) {
                        Some(v) => r.labels.insert(k.to_string(), v.clone()),
                        None => r.labels.remove(k),
                    };
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update field {fp:?} of snapshot {:?}",
                        info.name
                    )));
                }
            }
            r.updated_ns = now_ns();
            t.insert(info.name.as_str(), encode(&r).as_slice())
                .map_err(db)?;
            r.info(&info.name)
        };
        txn.commit().map_err(db)?;
        Ok(out)
    }

    /// Disk usage: measured now for active snapshots and views, recorded at commit otherwise.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let r = {
            let txn = self.db.begin_read().map_err(db)?;
            let t = txn.open_table(SNAPSHOTS).map_err(db)?;
            get(&t, key)?.ok_or_else(|| Error::NotFound(key.to_string()))?
        };
        match (r.kind, r.usage) {
            (Kind::Committed, Some(u)) => Ok(u),
            _ => {
                let (size, inodes) = fsutil::disk_usage(&self.dir(r.id).join("fs"))?;
                Ok(Usage { size, inodes })
            }
        }
    }

    /// Calls `f` for each snapshot matching `filters` (containerd filter syntax, any of them).
    pub fn walk<S: AsRef<str>>(
        &self,
        filters: &[S],
        mut f: impl FnMut(&Info) -> Result<()>,
    ) -> Result<()> {
        let filters = Filters::parse(filters)?;
        let infos = {
            let txn = self.db.begin_read().map_err(db)?;
            let t = txn.open_table(SNAPSHOTS).map_err(db)?;
            let mut v = Vec::new();
            for e in t.iter().map_err(db)? {
                let (k, val) = e.map_err(db)?;
                v.push(decode(k.value(), val.value())?.info(k.value()));
            }
            v
        };
        for i in infos.iter().filter(|i| filters.matches(i)) {
            f(i)?;
        }
        Ok(())
    }

    /// Removes every directory under `snapshots/` that no record refers to (crash leftovers,
    /// `new-*`, `rm-*`) and everything under `tmp-mounts/`, with the mount-aware remover.
    /// Returns the first error after trying everything.
    pub fn cleanup(&self) -> Result<()> {
        let _s = tracing::info_span!("cleanup").entered();
        let _d = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        // Holding a write transaction keeps prepare/commit/remove out while we look.
        let txn = self.db.begin_write().map_err(db)?;
        let mut live = std::collections::HashSet::new();
        {
            let t = txn.open_table(SNAPSHOTS).map_err(db)?;
            for e in t.iter().map_err(db)? {
                let (k, v) = e.map_err(db)?;
                live.insert(decode(k.value(), v.value())?.id.to_string());
            }
        }
        let mut first_err = None;
        let mut removed = 0usize;
        let mut sweep = |dir: PathBuf, keep: &dyn Fn(&str) -> bool| {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) => {
                    first_err.get_or_insert(Error::Io {
                        context: format!("read {}", dir.display()),
                        source: e,
                    });
                    return;
                }
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if keep(&name) {
                    continue;
                }
                let p = e.path();
                match fsutil::remove_all_no_xdev(&p) {
                    Ok(()) => {
                        removed += 1;
                        tracing::info!(path = %p.display(), "cleanup: removed orphan");
                    }
                    Err(err) => {
                        tracing::error!(path = %p.display(), error = %err, "cleanup: not removed");
                        first_err.get_or_insert(Error::from(err));
                    }
                }
            }
        };
        sweep(self.snapshots_dir(), &|n| live.contains(n));
        sweep(self.root.join("tmp-mounts"), &|_| false);
        drop(txn);
        tracing::info!(removed, "cleanup done");
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
