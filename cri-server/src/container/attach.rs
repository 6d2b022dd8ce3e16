//! The attach hubs of running containers: what the log copiers offer a container's output
//! to and what Attach sessions (`crate::stream::attach`) read from and write stdin through.
//!
//! Output: the log copiers (`crate::container::logs`) read the container's stdout/stderr FIFOs; each
//! chunk they read is also offered to the container's [`Hub`], a bounded broadcast every
//! attach session subscribes to. Policy: the log is the record and is never held up by an
//! attach client. The hub keeps the last [`HUB_CHUNKS`] chunks (at most 32 KiB each, so at
//! most 2 MiB per container, only while a session is attached); a session that falls further
//! behind skips what it missed, is told how much in crispd's log, and goes on with the newest
//! output. Other sessions and the log are unaffected.
//!
//! Input: only a container created with `stdin` has one. crispd makes its stdin FIFO before
//! the task, holds the FIFO open (so the container does not see EOF between sessions) and
//! writes each session's stdin into it. With `stdin_once` the first session that attached
//! stdin closes it when it ends, and the container sees EOF.
//!
//! A TTY container's resizes are ResizePty on its init process.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::container::logs::Stream;

/// Chunks a hub keeps for slow sessions (see the module docs).
pub const HUB_CHUNKS: usize = 64;

/// One chunk of the container's output.
pub type Chunk = (Stream, Arc<[u8]>);

/// What attach sessions share for one running container.
pub struct Hub {
    /// Taken (dropped) when the container's output has ended: sessions then see the end.
    out: Mutex<Option<broadcast::Sender<Chunk>>>,
    /// The write end of the container's stdin FIFO, while it is open.
    pub(crate) stdin: tokio::sync::Mutex<Option<tokio::net::unix::pipe::Sender>>,
    pub(crate) stdin_once: bool,
    pub(crate) tty: bool,
}

impl Hub {
    /// Offer one chunk to the attached sessions; never blocks, costs nothing when none is.
    pub fn publish(&self, stream: Stream, data: &[u8]) {
        let g = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = g.as_ref()
            && tx.receiver_count() > 0
        {
            let _ = tx.send((stream, Arc::from(data)));
        }
    }

    pub(crate) fn subscribe(&self) -> Option<broadcast::Receiver<Chunk>> {
        let g = self.out.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(broadcast::Sender::subscribe)
    }
}

/// Hubs of running containers, by container id.
#[derive(Default)]
pub struct Hubs {
    map: Mutex<HashMap<String, Arc<Hub>>>,
}

/// Held by a container's log copiers: when the last one ends (the container's output is
/// over), the hub closes its output and stdin and leaves the map.
pub struct Tap {
    hubs: Arc<Hubs>,
    id: String,
    hub: Arc<Hub>,
}

impl crate::container::logs::OutputTap for Tap {
    fn publish(&self, stream: Stream, data: &[u8]) {
        self.hub.publish(stream, data);
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.hub
            .out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Ok(mut s) = self.hub.stdin.try_lock() {
            s.take();
        } else {
            // A session is writing: close once it lets go.
            let hub = Arc::clone(&self.hub);
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    hub.stdin.lock().await.take();
                });
            }
        }
        let mut m = self.hubs.map.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&self.id).is_some_and(|h| Arc::ptr_eq(h, &self.hub)) {
            m.remove(&self.id);
        }
    }
}

impl Hubs {
    /// A hub for a container whose task is about to be created (or was re-found running after
    /// a restart). `stdin_fifo`: the container's stdin FIFO, if it was created with `stdin`;
    /// it is opened here read-write, so it never blocks and the shim's feed finds a writer.
    pub fn register(
        self: &Arc<Self>,
        id: &str,
        tty: bool,
        stdin_fifo: Option<&Path>,
        stdin_once: bool,
    ) -> std::io::Result<Arc<Tap>> {
        let stdin = match stdin_fifo {
            Some(p) => Some(
                tokio::net::unix::pipe::OpenOptions::new()
                    .read_write(true)
                    .open_sender(p)?,
            ),
            None => None,
        };
        let hub = Arc::new(Hub {
            out: Mutex::new(Some(broadcast::channel(HUB_CHUNKS).0)),
            stdin: tokio::sync::Mutex::new(stdin),
            stdin_once,
            tty,
        });
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), Arc::clone(&hub));
        Ok(Arc::new(Tap {
            hubs: Arc::clone(self),
            id: id.to_string(),
            hub,
        }))
    }

    pub(crate) fn get(&self, id: &str) -> Option<Arc<Hub>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the stdin FIFO of a container created with `stdin` lives.
pub fn stdin_fifo(bundle: &Path) -> std::path::PathBuf {
    bundle.join("stdin.fifo")
}
