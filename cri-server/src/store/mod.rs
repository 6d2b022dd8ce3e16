//! The durable store: one redb file, `<root>/crisp.db`.
//!
//! Every durable fact crispd keeps (pods, containers, ID ranges, shim addresses) is a record
//! here; in-memory maps are caches rebuilt from it on start-up. Records are JSON with a version
//! field, so a newer crispd can read an older one's records and an older crispd refuses a
//! newer record instead of misreading it. A record that does not decode is moved to the
//! `quarantine` table and logged: one torn or foreign record never blocks start-up.
//!
//! Reads are answered from [`cache`], the decoded records in memory, which every commit made
//! here updates once it is durable (the store is the truth; the cache never runs ahead of it).
//!
//! redb serialises write transactions, and each commit is durable (fsync) before it returns.
//! Callers must not hold a transaction across an `.await` on a shim, CNI plugin or the
//! network: every method here is synchronous and short.

mod cache;
pub mod records;
pub mod slow_disk;

use std::path::Path;
use std::sync::Arc;

use redb::{
    Database, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle, WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{CriError, ErrorKind, HasKind};

/// Table of raw JSON records, keyed by id.
pub type Table = TableDefinition<'static, &'static str, &'static [u8]>;

pub const PODS: Table = TableDefinition::new("pods");
pub const CONTAINERS: Table = TableDefinition::new("containers");
pub const ID_RANGES: Table = TableDefinition::new("id_ranges");
pub const SHIMS: Table = TableDefinition::new("shims");
/// `<table>/<key>` → the raw bytes that failed to decode, kept for a human to look at.
pub const QUARANTINE: Table = TableDefinition::new("quarantine");

const ALL_TABLES: [Table; 5] = [PODS, CONTAINERS, ID_RANGES, SHIMS, QUARANTINE];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open {
        path: String,
        source: Box<redb::Error>,
    },
    // Boxed: redb's error is large and every store call returns this type.
    #[error("store: {0}")]
    Db(Box<redb::Error>),
    #[error("encoding {table}/{key}: {source}")]
    Encode {
        table: String,
        key: String,
        source: serde_json::Error,
    },
    #[error("record {table}/{key} not found")]
    NotFound { table: String, key: String },
    #[error("record {table}/{key} already exists")]
    AlreadyExists { table: String, key: String },
}

impl HasKind for StoreError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Self::Open { .. } | Self::Db(_) | Self::Encode { .. } => ErrorKind::Internal,
        }
    }
}

// redb has one error type per operation; funnel them all through redb::Error.
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { Self::Db(Box::new(e.into())) }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::DatabaseError
);

/// A record type stored in one table, with a schema version.
pub trait Record: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    const TABLE: Table;
    /// Bumped on every incompatible change; decode refuses versions it does not know.
    const VERSION: u32;
}

/// What is on disk: `{"version": N, "record": {...}}`.
#[derive(Serialize)]
struct Envelope<'a, T> {
    version: u32,
    record: &'a T,
}

#[derive(serde::Deserialize)]
struct EnvelopeOwned {
    version: u32,
    record: serde_json::Value,
}

pub fn encode<T: Record>(key: &str, rec: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&Envelope {
        version: T::VERSION,
        record: rec,
    })
    .map_err(|source| StoreError::Encode {
        table: T::TABLE.name().to_string(),
        key: key.to_string(),
        source,
    })
}

pub fn decode<T: Record>(bytes: &[u8]) -> Result<T, String> {
    let env: EnvelopeOwned = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if env.version != T::VERSION {
        return Err(format!(
            "record version {} but this crispd reads version {}",
            env.version,
            T::VERSION
        ));
    }
    serde_json::from_value(env.record).map_err(|e| e.to_string())
}

#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    cache: Arc<cache::Cache>,
    /// Held from a write's begin to its cache update, and while a table is loaded into the
    /// cache: the cache sees commits in the order the store made them.
    writing: Arc<std::sync::Mutex<()>>,
    /// A test's slow disk ([`slow_disk`]); None on a real node.
    slow_disk: Option<Arc<slow_disk::SlowDisk>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                source: Box::new(redb::Error::Io(e)),
            })?;
        }
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            source: Box::new(e.into()),
        })?;
        // Create every table up front so readers never meet "table does not exist".
        let txn = db.begin_write()?;
        for t in ALL_TABLES {
            txn.open_table(t)?;
        }
        txn.commit()?;
        Ok(Self {
            db: Arc::new(db),
            cache: Arc::default(),
            writing: Arc::default(),
            slow_disk: None,
        })
    }

    /// Every commit from now on goes through `slow` first (a test's failpoint).
    pub fn with_slow_disk(mut self, slow: slow_disk::SlowDisk) -> Self {
        self.slow_disk = Some(Arc::new(slow));
        self
    }

    fn write_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` in one write transaction; it commits only if `f` returns Ok, and `then` updates
    /// the cache after the commit, before any other write. The commit fsyncs, and the write
    /// lock may wait for another writer: off the async workers (see [`off_async_worker`]), so
    /// a slow disk never stalls the calls that need no store.
    fn commit<R, E>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<R, E>,
        then: impl FnOnce(&cache::Cache),
    ) -> Result<R, E>
    where
        E: From<StoreError>,
    {
        off_async_worker(|| {
            let _w = self.write_lock();
            let txn = self.db.begin_write().map_err(StoreError::from)?;
            let r = f(&txn)?; // dropping an uncommitted transaction aborts it
            if let Some(slow) = &self.slow_disk {
                slow.before_sync();
            }
            txn.commit().map_err(StoreError::from)?;
            then(&self.cache);
            Ok(r)
        })
    }

    /// Run `f` in one write transaction; it commits only if `f` returns Ok. The cache cannot
    /// follow an arbitrary transaction: it is emptied, and reloaded table by table on use.
    pub fn write<R, E>(&self, f: impl FnOnce(&WriteTransaction) -> Result<R, E>) -> Result<R, E>
    where
        E: From<StoreError>,
    {
        self.commit(f, cache::Cache::clear)
    }

    pub fn put<T: Record>(&self, key: &str, rec: &T) -> Result<(), StoreError> {
        self.commit(
            |txn| put_in::<T>(txn, key, rec),
            |c| c.put(T::TABLE.name(), key, rec),
        )
    }

    /// Two records of different tables in one commit (one fsync instead of two).
    pub fn put_two<A: Record, B: Record>(
        &self,
        key_a: &str,
        a: &A,
        key_b: &str,
        b: &B,
    ) -> Result<(), StoreError> {
        self.commit(
            |txn| {
                put_in::<A>(txn, key_a, a)?;
                put_in::<B>(txn, key_b, b)
            },
            |c| {
                c.put(A::TABLE.name(), key_a, a);
                c.put(B::TABLE.name(), key_b, b);
            },
        )
    }

    /// Insert only if the key is free: the reservation primitive for pod and container names.
    pub fn insert_new<T: Record>(&self, key: &str, rec: &T) -> Result<(), StoreError> {
        self.commit(
            |txn| {
                let bytes = encode(key, rec)?;
                let mut t = txn.open_table(T::TABLE)?;
                if t.get(key)?.is_some() {
                    return Err(StoreError::AlreadyExists {
                        table: T::TABLE.name().to_string(),
                        key: key.to_string(),
                    });
                }
                t.insert(key, bytes.as_slice())?;
                Ok(())
            },
            |c| c.put(T::TABLE.name(), key, rec),
        )
    }

    pub fn get<T: Record>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.cache.get::<T>(T::TABLE.name(), key) {
            cache::Lookup::Hit(r) => return Ok(Some(r)),
            cache::Lookup::Absent => return Ok(None),
            cache::Lookup::Unknown => {}
        }
        let bytes = {
            let txn = self.db.begin_read()?;
            let t = txn.open_table(T::TABLE)?;
            t.get(key)?.map(|v| v.value().to_vec())
        };
        match bytes {
            None => Ok(None),
            Some(b) => match decode::<T>(&b) {
                Ok(r) => Ok(Some(r)),
                Err(why) => {
                    self.quarantine(T::TABLE, key, &why)?;
                    Ok(None)
                }
            },
        }
    }

    /// Remove a record; returns whether it existed (removal is idempotent for callers).
    pub fn delete<T: Record>(&self, key: &str) -> Result<bool, StoreError> {
        self.commit(
            |txn| delete_in(txn, T::TABLE, key),
            |c| c.remove(T::TABLE.name(), key),
        )
    }

    /// The records of two tables under one key, in one commit.
    pub fn delete_two<A: Record, B: Record>(&self, key: &str) -> Result<(), StoreError> {
        self.commit(
            |txn| {
                delete_in(txn, A::TABLE, key)?;
                delete_in(txn, B::TABLE, key).map(|_| ())
            },
            |c| {
                c.remove(A::TABLE.name(), key);
                c.remove(B::TABLE.name(), key);
            },
        )
    }

    /// Every record of a table that decodes, in key order; the others are quarantined.
    pub fn list<T: Record>(&self) -> Result<Vec<(String, T)>, StoreError> {
        if let Some(rows) = self.cache.list::<T>(T::TABLE.name()) {
            return Ok(rows);
        }
        let mut bad = Vec::new();
        let good = {
            // No commit between this read and the cache's load.
            let _w = self.write_lock();
            let raw = self.list_raw(T::TABLE)?;
            let mut good = Vec::with_capacity(raw.len());
            for (key, bytes) in raw {
                match decode::<T>(&bytes) {
                    Ok(r) => good.push((key, r)),
                    Err(why) => bad.push((key, why)),
                }
            }
            self.cache.load(T::TABLE.name(), &good);
            good
        };
        for (key, why) in bad {
            self.quarantine(T::TABLE, &key, &why)?;
        }
        Ok(good)
    }

    pub fn list_raw(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    pub fn count(&self, table: Table) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(table)?.len()?)
    }

    /// Move a record that cannot be decoded out of the way, so it neither blocks start-up nor
    /// is silently lost.
    pub fn quarantine(&self, table: Table, key: &str, why: &str) -> Result<(), StoreError> {
        tracing::warn!(
            table = table.name(),
            key,
            reason = why,
            "quarantining undecodable record"
        );
        self.commit(
            |txn| {
                let mut src = txn.open_table(table)?;
                let bytes = src.remove(key)?.map(|v| v.value().to_vec());
                drop(src);
                if let Some(bytes) = bytes {
                    let mut q = txn.open_table(QUARANTINE)?;
                    q.insert(format!("{}/{key}", table.name()).as_str(), bytes.as_slice())?;
                }
                Ok(())
            },
            |c| c.remove(table.name(), key),
        )
    }

    /// Write raw bytes, for tests that need a corrupt record.
    #[cfg(test)]
    pub fn put_raw(&self, table: Table, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(table)?.insert(key, bytes)?;
            Ok(())
        })
    }
}

/// Put inside a caller's transaction (for multi-record updates).
pub fn put_in<T: Record>(txn: &WriteTransaction, key: &str, rec: &T) -> Result<(), StoreError> {
    let bytes = encode(key, rec)?;
    txn.open_table(T::TABLE)?.insert(key, bytes.as_slice())?;
    Ok(())
}

pub fn delete_in(txn: &WriteTransaction, table: Table, key: &str) -> Result<bool, StoreError> {
    Ok(txn.open_table(table)?.remove(key)?.is_some())
}

/// Read every raw record of a table inside a write transaction.
pub fn list_raw_in(
    txn: &WriteTransaction,
    table: Table,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let t = txn.open_table(table)?;
    let mut out = Vec::new();
    for item in t.iter()? {
        let (k, v) = item?;
        out.push((k.value().to_string(), v.value().to_vec()));
    }
    Ok(out)
}

/// A pod or container by full id or unique prefix (crictl accepts prefixes, as containerd
/// does). `field` names the request field for the empty case, `what` the object in messages.
pub fn find_by_id_or_prefix<T: Record>(
    store: &Store,
    id: &str,
    field: &str,
    what: &str,
    id_of: fn(&T) -> &str,
) -> Result<T, CriError> {
    if id.is_empty() {
        return Err(CriError::invalid(format!("{field} is empty")));
    }
    if let Some(r) = store.get::<T>(id)? {
        return Ok(r);
    }
    let mut hits: Vec<T> = store
        .list::<T>()?
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| id_of(r).starts_with(id))
        .collect();
    match hits.len() {
        1 => Ok(hits.remove(0)),
        0 => Err(CriError::not_found(format!("{what} {id} not found"))),
        n => Err(CriError::invalid(format!(
            "{what} id prefix {id} is ambiguous ({n} matches)"
        ))),
    }
}

/// Runs blocking store work without holding a tokio async worker. Every store write goes
/// through here, from async handlers and blocking code alike: on crispd's multi-thread
/// runtime the worker first hands its other tasks to another thread (`block_in_place`), so
/// they keep running during the commit; outside a runtime, or on a current-thread one (unit
/// tests), it simply runs.
pub fn off_async_worker<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slow commit (a disk that takes 400 ms) must not stall other calls: with one async
    /// worker, a ticking task still runs while a store write holds its thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_slow_store_write_does_not_hold_the_async_worker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("crisp.db")).expect("open");
        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                t.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        let before = ticks.load(std::sync::atomic::Ordering::SeqCst);
        store
            .write(|_txn| {
                std::thread::sleep(std::time::Duration::from_millis(400));
                Ok::<(), StoreError>(())
            })
            .expect("write");
        let during = ticks.load(std::sync::atomic::Ordering::SeqCst) - before;
        ticker.abort();
        assert!(
            during >= 5,
            "only {during} ticks while the store wrote for 400 ms"
        );
    }
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Thing {
        name: String,
        n: u32,
    }
    impl Record for Thing {
        const TABLE: Table = PODS;
        const VERSION: u32 = 1;
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("sub/crisp.db")).expect("open");
        (dir, s)
    }

    #[test]
    fn put_get_list_delete() {
        let (_d, s) = open();
        s.put(
            "a",
            &Thing {
                name: "a".into(),
                n: 1,
            },
        )
        .expect("put");
        s.put(
            "b",
            &Thing {
                name: "b".into(),
                n: 2,
            },
        )
        .expect("put");
        assert_eq!(
            s.get::<Thing>("a").expect("get"),
            Some(Thing {
                name: "a".into(),
                n: 1
            })
        );
        assert_eq!(s.list::<Thing>().expect("list").len(), 2);
        assert!(s.delete::<Thing>("a").expect("delete"));
        assert!(!s.delete::<Thing>("a").expect("delete twice is fine"));
        assert_eq!(s.get::<Thing>("a").expect("get"), None);
    }

    #[test]
    fn insert_new_refuses_existing_key() {
        let (_d, s) = open();
        s.insert_new(
            "a",
            &Thing {
                name: "a".into(),
                n: 1,
            },
        )
        .expect("first");
        let e = s
            .insert_new(
                "a",
                &Thing {
                    name: "a".into(),
                    n: 2,
                },
            )
            .expect_err("second");
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    }

    #[test]
    fn undecodable_records_are_quarantined_not_fatal() {
        let (_d, s) = open();
        s.put(
            "good",
            &Thing {
                name: "g".into(),
                n: 1,
            },
        )
        .expect("put");
        s.put_raw(PODS, "torn", b"{\"version\":1,\"rec")
            .expect("raw");
        s.put_raw(PODS, "future", b"{\"version\":99,\"record\":{}}")
            .expect("raw");
        let list = s.list::<Thing>().expect("list survives bad records");
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].0, "good");
        let q = s.list_raw(QUARANTINE).expect("quarantine");
        let keys: Vec<_> = q.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, vec!["pods/future", "pods/torn"]);
        assert_eq!(s.count(PODS).expect("count"), 1);
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("crisp.db");
        {
            let s = Store::open(&path).expect("open");
            s.put(
                "a",
                &Thing {
                    name: "a".into(),
                    n: 7,
                },
            )
            .expect("put");
        }
        let s = Store::open(&path).expect("reopen");
        assert_eq!(s.get::<Thing>("a").expect("get").map(|t| t.n), Some(7));
    }

    #[test]
    fn failed_closure_rolls_back() {
        let (_d, s) = open();
        let r: Result<(), StoreError> = s.write(|txn| {
            put_in(
                txn,
                "x",
                &Thing {
                    name: "x".into(),
                    n: 1,
                },
            )?;
            Err(StoreError::NotFound {
                table: "pods".into(),
                key: "y".into(),
            })
        });
        assert!(r.is_err());
        assert_eq!(s.get::<Thing>("x").expect("get"), None);
    }
}
