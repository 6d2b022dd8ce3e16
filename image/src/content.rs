//! The content store: blobs by digest under `<root>/content/blobs/sha256/<hex>`.
//!
//! A blob is written to `<root>/content/ingest/<random>`, hashed while it streams, and renamed
//! into place only after its digest and size verify (after fsync), so an interrupted or
//! corrupt download never leaves a blob behind. Concurrent pulls that need the same blob share
//! one in-flight [`Ingest`]: the first starts the download, the others wait on it.
//!
//! An ingest can be *followed* while it is written ([`Ingest::reader`]): the unpacker reads
//! the growing file up to what has been written so far, so a layer is unpacked while it
//! streams, and the reader ends with an error if the download fails.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::reference::Digest;
use crate::sys;
use crate::unpack::WRITEBACK_EVERY;

/// State of an in-flight ingest, published to followers.
#[derive(Debug, Clone)]
pub enum IngestState {
    Running { written: u64 },
    Done { size: u64 },
    Failed(Error),
}

/// A blob being downloaded.
#[derive(Debug)]
pub struct Ingest {
    pub digest: Digest,
    path: PathBuf,
    /// Read handle kept open so followers can read even after the rename into blobs/.
    file: Arc<File>,
    state: watch::Sender<IngestState>,
    /// Pulls that joined this ingest after the one that started it; an ingest nobody joined
    /// may be abandoned by its starter ([`ContentStore::abandon`]).
    joined: AtomicUsize,
    /// Set when the starter abandons the download; the downloader stops at its next await.
    cancel: watch::Sender<bool>,
}

impl Ingest {
    /// Resolves once the ingest was abandoned. The downloader selects on this wherever it
    /// waits for the network, never while committing, so an abandoned download ends either
    /// with its file removed or with a verified blob in place, never half-way.
    pub async fn cancelled(&self) {
        let mut rx = self.cancel.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|c| *c).await;
    }

    pub fn state(&self) -> IngestState {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<IngestState> {
        self.state.subscribe()
    }

    /// Wait until the ingest is complete and verified, or failed.
    pub async fn wait(&self) -> Result<u64> {
        let mut rx = self.state.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                IngestState::Done { size } => return Ok(*size),
                IngestState::Failed(e) => return Err(e.clone()),
                IngestState::Running { .. } => {}
            }
            if rx.changed().await.is_err() {
                return Err(Error::internal(format!(
                    "download of {} was abandoned",
                    self.digest
                )));
            }
        }
    }

    /// A blocking reader over the blob as it is being written.
    pub fn reader(self: &Arc<Self>) -> IngestReader {
        IngestReader {
            file: self.file.clone(),
            rx: self.state.subscribe(),
            offset: 0,
            digest: self.digest.clone(),
        }
    }
}

/// Reads an ingest from the start, blocking for more data until it is done.
pub struct IngestReader {
    file: Arc<File>,
    rx: watch::Receiver<IngestState>,
    offset: u64,
    digest: Digest,
}

impl Read for IngestReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let limit = match &*self.rx.borrow_and_update() {
                IngestState::Running { written } => *written,
                IngestState::Done { size } => *size,
                IngestState::Failed(e) => return Err(io::Error::other(e.clone())),
            };
            if self.offset < limit {
                let want = ((limit - self.offset) as usize).min(buf.len());
                let n = self.file.read_at(&mut buf[..want], self.offset)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "ingest file shorter than reported",
                    ));
                }
                self.offset += n as u64;
                return Ok(n);
            }
            if let IngestState::Done { .. } = &*self.rx.borrow() {
                return Ok(0);
            }
            // Called from a blocking thread (the unpacker); watch works without a runtime.
            if futures::executor::block_on(self.rx.changed()).is_err() {
                return Err(io::Error::other(Error::internal(format!(
                    "download of {} was abandoned",
                    self.digest
                ))));
            }
        }
    }
}

/// The writing side, owned by the one task that downloads. Dropping it unfinished fails the
/// ingest and removes its file.
///
/// One buffer is written on a blocking thread while the next is received and hashed: a
/// download that awaited each write spent its time receiving, hashing and writing one after
/// the other, and was the slowest stage of a pull (the unpacker following it finished 3 ms
/// after it, on the `large` image).
pub struct IngestWriter {
    ingest: Arc<Ingest>,
    store: ContentStore,
    file: Arc<File>,
    hasher: Sha256,
    /// Bytes on disk (their writes returned).
    written: u64,
    /// The write in flight, and its length.
    pending: Option<(PendingWrite, u64)>,
    /// Where the bytes not yet handed to writeback start.
    writeback_from: u64,
    buf: Vec<u8>,
    /// The buffer of the last write that returned, filled next: two buffers take turns.
    spare: Vec<u8>,
    finished: bool,
}

type PendingWrite = tokio::task::JoinHandle<(io::Result<()>, Vec<u8>)>;

const FLUSH_AT: usize = 1 << 20;

impl IngestWriter {
    /// Bytes accepted so far: written, being written, or buffered.
    pub fn written(&self) -> u64 {
        self.written + self.pending.as_ref().map_or(0, |p| p.1) + self.buf.len() as u64
    }

    pub fn digest(&self) -> &Digest {
        &self.ingest.digest
    }

    /// Append downloaded bytes. Buffered; followers see them once their write returns.
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.hasher.update(data);
        self.buf.extend_from_slice(data);
        if self.buf.len() >= FLUSH_AT {
            self.submit().await?;
        }
        Ok(())
    }

    /// Write everything accepted so far and wait for it.
    pub async fn flush(&mut self) -> Result<()> {
        self.submit().await?;
        self.reap().await
    }

    /// Wait for the write in flight, keeping its buffer as the spare.
    async fn reap(&mut self) -> Result<()> {
        let Some((task, len)) = self.pending.take() else {
            return Ok(());
        };
        let (res, mut buf) = task
            .await
            .map_err(|e| Error::internal(format!("ingest writer task: {e}")))?;
        res.map_err(|e| Error::io(format!("writing {}", self.ingest.path.display()), e))?;
        self.written += len;
        buf.clear();
        self.spare = buf;
        Ok(())
    }

    /// Start writing the buffer once the previous write has returned.
    async fn submit(&mut self) -> Result<()> {
        self.reap().await?;
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::replace(&mut self.buf, std::mem::take(&mut self.spare));
        let (file, ingest) = (self.file.clone(), self.ingest.clone());
        let len = buf.len() as u64;
        // A head start for the commit's fsync, as in unpack: the bytes since the last start
        // go to writeback once there are enough of them.
        let end = self.written + len;
        let writeback = (end - self.writeback_from >= WRITEBACK_EVERY)
            .then_some((self.writeback_from, end - self.writeback_from));
        if writeback.is_some() {
            self.writeback_from = end;
        }
        // File writes block; keep them off the async worker threads.
        let task = tokio::task::spawn_blocking(move || {
            let r = (&*file).write_all(&buf);
            if r.is_ok() {
                if let Some((from, n)) = writeback {
                    // Refused, it only means the bytes are written at the fsync: not an error.
                    let _ = sys::start_writeback(file.as_fd(), from, n);
                }
                // Followers may read these bytes now, not only after the next buffer fills; a
                // writer that failed or was dropped meanwhile has said so, and that stands.
                ingest.state.send_if_modified(|s| match s {
                    IngestState::Running { .. } => {
                        *s = IngestState::Running { written: end };
                        true
                    }
                    _ => false,
                });
            }
            (r, buf)
        });
        self.pending = Some((task, len));
        Ok(())
    }

    /// Verify size and digest, fsync and move the blob into place.
    pub async fn commit(mut self, expected_size: Option<u64>) -> Result<u64> {
        self.flush().await?;
        let got = Digest::from_sha256(&std::mem::take(&mut self.hasher).finalize());
        if let Some(sz) = expected_size
            && sz != self.written
        {
            let e = Error::data_loss(format!(
                "blob {}: received {} bytes, the manifest says {sz}",
                self.ingest.digest, self.written
            ));
            return Err(self.fail(e));
        }
        if got != self.ingest.digest {
            let e = Error::data_loss(format!(
                "blob {}: content has digest {got}",
                self.ingest.digest
            ));
            return Err(self.fail(e));
        }
        let file = self.file.clone();
        let from = self.ingest.path.clone();
        let to = self.store.blob_path(&self.ingest.digest);
        let res = tokio::task::spawn_blocking(move || -> io::Result<()> {
            file.sync_all()?;
            std::fs::rename(&from, &to)?;
            if let Some(dir) = to.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::internal(format!("ingest commit task: {e}")))
        .and_then(|r| {
            r.map_err(|e| Error::io(format!("committing blob {}", self.ingest.digest), e))
        });
        if let Err(e) = res {
            return Err(self.fail(e));
        }
        self.finished = true;
        self.ingest
            .state
            .send_replace(IngestState::Done { size: self.written });
        self.store.forget(&self.ingest);
        Ok(self.written)
    }

    /// Mark the ingest failed, remove its file; returns the error for convenience.
    pub fn fail(&mut self, e: Error) -> Error {
        if !self.finished {
            self.finished = true;
            let _ = std::fs::remove_file(&self.ingest.path);
            self.ingest
                .state
                .send_replace(IngestState::Failed(e.clone()));
            self.store.forget(&self.ingest);
        }
        e
    }
}

impl Drop for IngestWriter {
    fn drop(&mut self) {
        if !self.finished {
            let d = self.ingest.digest.clone();
            self.fail(Error::unavailable(format!("download of {d} was cancelled")));
        }
    }
}

/// What [`ContentStore::begin`] found.
pub enum Begin {
    /// The blob is already in the store.
    Exists,
    /// Nobody is downloading it: the caller must, with this writer.
    Start(Box<IngestWriter>),
    /// Another pull is downloading it: follow or wait on this.
    InFlight(Arc<Ingest>),
}

#[derive(Clone, Debug)]
pub struct ContentStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    inflight: Mutex<HashMap<Digest, Arc<Ingest>>>,
}

impl ContentStore {
    /// Open the store under `<root>/content`, removing ingests a crash left behind.
    pub fn open(root: &Path) -> Result<ContentStore> {
        let root = root.join("content");
        let ingest = root.join("ingest");
        if ingest.exists() {
            // No pull is in flight at open; partial files are garbage.
            std::fs::remove_dir_all(&ingest)
                .map_err(|e| Error::io(format!("clearing {}", ingest.display()), e))?;
        }
        for d in [root.join("blobs/sha256"), ingest] {
            std::fs::create_dir_all(&d)
                .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
        }
        Ok(ContentStore {
            inner: Arc::new(Inner {
                root,
                inflight: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.inner.root.join("blobs/sha256").join(d.hex())
    }

    pub fn exists(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    fn inflight(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Ingest>>> {
        // A panic while holding this lock leaves a plain map; keep using it.
        self.inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Drop `ingest` from the in-flight map, unless it was abandoned and a newer ingest of the
    /// same digest took its place.
    fn forget(&self, ingest: &Arc<Ingest>) {
        let mut map = self.inflight();
        if map
            .get(&ingest.digest)
            .is_some_and(|cur| Arc::ptr_eq(cur, ingest))
        {
            map.remove(&ingest.digest);
        }
    }

    /// The pull that started `ingest` no longer needs it. If no other pull joined it, it is
    /// taken out of the in-flight map (a later pull starts afresh) and its downloader told to
    /// stop; returns true when the caller should wait for that downloader to end, so that a
    /// failed pull leaves nothing in `ingest/` behind it. Deciding under the map's lock makes
    /// this atomic with [`ContentStore::begin`]: nobody can join an ingest being abandoned.
    pub fn abandon(&self, ingest: &Arc<Ingest>) -> bool {
        let mut map = self.inflight();
        if ingest.joined.load(Ordering::SeqCst) > 0 {
            return false;
        }
        match map.get(&ingest.digest) {
            Some(cur) if Arc::ptr_eq(cur, ingest) => {
                map.remove(&ingest.digest);
            }
            // Already committed or failed: its file is settled.
            _ => return false,
        }
        ingest.cancel.send_replace(true);
        true
    }

    pub fn is_in_flight(&self, d: &Digest) -> bool {
        self.inflight().contains_key(d)
    }

    /// Start or join the ingest of `digest`.
    pub fn begin(&self, digest: &Digest) -> Result<Begin> {
        let mut map = self.inflight();
        if let Some(i) = map.get(digest) {
            i.joined.fetch_add(1, Ordering::SeqCst);
            return Ok(Begin::InFlight(i.clone()));
        }
        if self.exists(digest) {
            return Ok(Begin::Exists);
        }
        let name = format!("{}-{:016x}", digest.hex(), rand::random::<u64>());
        let path = self.inner.root.join("ingest").join(name);
        let wfile = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        let rfile =
            File::open(&path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let (tx, _) = watch::channel(IngestState::Running { written: 0 });
        let ingest = Arc::new(Ingest {
            digest: digest.clone(),
            path,
            file: Arc::new(rfile),
            state: tx,
            joined: AtomicUsize::new(0),
            cancel: watch::channel(false).0,
        });
        map.insert(digest.clone(), ingest.clone());
        Ok(Begin::Start(Box::new(IngestWriter {
            ingest,
            store: self.clone(),
            file: Arc::new(wfile),
            hasher: Sha256::new(),
            written: 0,
            pending: None,
            writeback_from: 0,
            buf: Vec::new(),
            spare: Vec::new(),
            finished: false,
        })))
    }

    /// The ingest for `digest` if one is in flight.
    pub fn ingest_of(writer: &IngestWriter) -> Arc<Ingest> {
        writer.ingest.clone()
    }

    /// Store a small blob held in memory (manifests, configs), verifying its digest.
    pub async fn put(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        let got = Digest::of(data);
        if &got != digest {
            return Err(Error::data_loss(format!(
                "blob {digest}: content has digest {got}"
            )));
        }
        match self.begin(digest)? {
            Begin::Exists => Ok(()),
            Begin::InFlight(i) => i.wait().await.map(|_| ()),
            Begin::Start(mut w) => {
                w.write(data).await?;
                w.commit(Some(data.len() as u64)).await.map(|_| ())
            }
        }
    }

    /// Read a whole (small) blob.
    pub fn read(&self, d: &Digest) -> Result<Vec<u8>> {
        let p = self.blob_path(d);
        std::fs::read(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Error::not_found(format!("blob {d} is not in the content store"))
            } else {
                Error::io(format!("reading {}", p.display()), e)
            }
        })
    }

    /// Open a committed blob for reading.
    pub fn open_blob(&self, d: &Digest) -> Result<File> {
        let p = self.blob_path(d);
        File::open(&p).map_err(|e| Error::io(format!("opening {}", p.display()), e))
    }

    /// All committed blobs.
    pub fn list(&self) -> Result<Vec<Digest>> {
        let dir = self.inner.root.join("blobs/sha256");
        let rd = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let mut out = Vec::new();
        for e in rd.flatten() {
            if let Some(name) = e.file_name().to_str()
                && let Ok(d) = Digest::parse(&format!("sha256:{name}"))
            {
                out.push(d);
            }
        }
        Ok(out)
    }

    pub fn remove(&self, d: &Digest) -> Result<()> {
        let p = self.blob_path(d);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {}", p.display()), e)),
        }
    }

    /// Bytes and inodes used by the store.
    pub fn usage(&self) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let mut bytes = 0;
        let mut inodes = 0;
        for sub in ["blobs/sha256", "ingest"] {
            if let Ok(rd) = std::fs::read_dir(self.inner.root.join(sub)) {
                for e in rd.flatten() {
                    if let Ok(m) = e.metadata() {
                        bytes += m.blocks() * 512;
                        inodes += 1;
                    }
                }
            }
        }
        (bytes, inodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verified_write_and_shared_ingest() {
        let tmp = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(tmp.path()).unwrap();
        let data = vec![42u8; 3 << 20];
        let d = Digest::of(&data);
        let Begin::Start(mut w) = cs.begin(&d).unwrap() else {
            panic!("expected start")
        };
        // A second user joins the in-flight ingest instead of downloading again.
        let Begin::InFlight(ing) = cs.begin(&d).unwrap() else {
            panic!("expected in flight")
        };
        let mut reader = ing.reader();
        let follower = tokio::task::spawn_blocking(move || {
            let mut v = Vec::new();
            reader.read_to_end(&mut v).map(|_| v)
        });
        for chunk in data.chunks(100_000) {
            w.write(chunk).await.unwrap();
        }
        w.commit(Some(data.len() as u64)).await.unwrap();
        assert_eq!(follower.await.unwrap().unwrap(), data);
        assert!(cs.exists(&d));
        assert!(matches!(cs.begin(&d).unwrap(), Begin::Exists));
        assert_eq!(
            std::fs::read_dir(tmp.path().join("content/ingest"))
                .unwrap()
                .count(),
            0
        );
    }

    #[tokio::test]
    async fn wrong_digest_leaves_no_blob() {
        let tmp = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(tmp.path()).unwrap();
        let d = Digest::of(b"expected");
        let Begin::Start(mut w) = cs.begin(&d).unwrap() else {
            panic!()
        };
        let Begin::InFlight(ing) = cs.begin(&d).unwrap() else {
            panic!()
        };
        let mut reader = ing.reader();
        w.write(b"something else").await.unwrap();
        let e = w.commit(None).await.unwrap_err();
        assert_eq!(e.kind(), crate::Kind::DataLoss);
        assert!(e.to_string().contains(d.as_str()), "{e}");
        assert!(!cs.exists(&d));
        assert!(ing.wait().await.is_err());
        let mut v = Vec::new();
        assert!(reader.read_to_end(&mut v).is_err());
        assert_eq!(
            std::fs::read_dir(tmp.path().join("content/ingest"))
                .unwrap()
                .count(),
            0
        );
        // Dropping a writer unfinished also cleans up.
        let Begin::Start(mut w) = cs.begin(&d).unwrap() else {
            panic!()
        };
        w.write(b"partial").await.unwrap();
        w.flush().await.unwrap();
        drop(w);
        assert_eq!(
            std::fs::read_dir(tmp.path().join("content/ingest"))
                .unwrap()
                .count(),
            0
        );
        assert!(cs.put(&d, b"wrong").await.is_err());
        cs.put(&d, b"expected").await.unwrap();
        assert_eq!(cs.read(&d).unwrap(), b"expected");
    }

    #[tokio::test]
    async fn abandon_only_what_nobody_joined() {
        let tmp = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(tmp.path()).unwrap();
        let d = Digest::of(b"layer");
        let Begin::Start(w) = cs.begin(&d).unwrap() else {
            panic!()
        };
        let ing = ContentStore::ingest_of(&w);
        assert!(cs.abandon(&ing));
        // The downloader sees the cancellation; a new pull starts its own ingest at once.
        tokio::time::timeout(std::time::Duration::from_secs(5), ing.cancelled())
            .await
            .expect("the abandoned ingest is cancelled");
        let Begin::Start(w2) = cs.begin(&d).unwrap() else {
            panic!("an abandoned ingest must not be joined")
        };
        // The old writer ending does not unregister the new ingest.
        drop(w);
        assert!(cs.is_in_flight(&d));
        // An ingest another pull joined keeps going.
        let ing2 = ContentStore::ingest_of(&w2);
        let Begin::InFlight(_) = cs.begin(&d).unwrap() else {
            panic!()
        };
        assert!(!cs.abandon(&ing2));
        assert!(cs.is_in_flight(&d));
        drop(w2);
        assert_eq!(
            std::fs::read_dir(tmp.path().join("content/ingest"))
                .unwrap()
                .count(),
            0
        );
    }
}
