//! Attach (`kubectl attach`, `crictl attach`) to a container's own stdio.
//!
//! Output: the log copiers (`crate::logs`) read the container's stdout/stderr FIFOs; each
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

use crisp_stream::backend::BoxWrite;
use crisp_stream::{AttachRequest, Streams};
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast;

use crate::daemon::Daemon;
use crate::instrument::CriError;
use crate::logs::Stream;

/// Chunks a hub keeps for slow sessions (see the module docs).
pub const HUB_CHUNKS: usize = 64;

/// One chunk of the container's output.
pub type Chunk = (Stream, Arc<[u8]>);

/// What attach sessions share for one running container.
pub struct Hub {
    /// Taken (dropped) when the container's output has ended: sessions then see the end.
    out: Mutex<Option<broadcast::Sender<Chunk>>>,
    /// The write end of the container's stdin FIFO, while it is open.
    stdin: tokio::sync::Mutex<Option<tokio::net::unix::pipe::Sender>>,
    stdin_once: bool,
    tty: bool,
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

    fn subscribe(&self) -> Option<broadcast::Receiver<Chunk>> {
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

impl Tap {
    pub fn publish(&self, stream: Stream, data: &[u8]) {
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

    fn get(&self, id: &str) -> Option<Arc<Hub>> {
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

/// One attach session: until the container's output ends or the session is dropped.
pub async fn attach(d: &Arc<Daemon>, req: AttachRequest, streams: Streams) -> Result<(), CriError> {
    let rec = crate::cri::containers::find(&d.store, &req.container_id)?;
    let shim = crate::cri::exec_sync::running_shim(d, &rec, "Attach")?;
    let hub = d.attach.get(&rec.id).ok_or_else(|| {
        CriError::precondition(format!(
            "Attach: container {}: its output is no longer being read",
            rec.id
        ))
    })?;
    let Streams {
        stdin,
        stdout,
        stderr,
        resize,
    } = streams;
    let mut rx = hub.subscribe().ok_or_else(|| {
        CriError::precondition(format!(
            "Attach: container {}: its output has ended",
            rec.id
        ))
    })?;
    let _live = d.stream_sessions.enter();
    let input = async {
        let Some(mut r) = stdin else {
            return std::future::pending::<()>().await;
        };
        feed(&hub, &mut r, &rec.id).await;
        if hub.stdin_once {
            hub.stdin.lock().await.take();
        }
        std::future::pending::<()>().await
    };
    let resizes = async {
        if let Some(rx) = resize {
            crate::stream::exec::resize_loop(shim, rec.id.clone(), String::new(), rx, hub.tty)
                .await;
        }
        std::future::pending::<()>().await
    };
    // stdin_once: the session that attached stdin closes it however it ends.
    let _once = OnceGuard {
        hub: (hub.stdin_once && req.stdin).then(|| Arc::clone(&hub)),
    };
    let output = forward(&mut rx, stdout, stderr, &rec.id);
    tokio::select! {
        r = output => r,
        () = input => Ok(()),
        () = resizes => Ok(()),
    }
}

/// Closes the container's stdin when a `stdin_once` session ends.
struct OnceGuard {
    hub: Option<Arc<Hub>>,
}

impl Drop for OnceGuard {
    fn drop(&mut self) {
        let Some(hub) = self.hub.take() else { return };
        if let Ok(mut s) = hub.stdin.try_lock() {
            s.take();
        } else if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                hub.stdin.lock().await.take();
            });
        }
    }
}

/// The session's stdin into the container's FIFO, one chunk at a time under the hub's lock
/// (two sessions' input never interleaves inside a chunk).
async fn feed(hub: &Hub, r: &mut crisp_stream::backend::BoxRead, id: &str) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut g = hub.stdin.lock().await;
        let Some(tx) = g.as_mut() else { return };
        if let Err(e) = tx.write_all(&buf[..n]).await {
            tracing::debug!(container_id = %id, error = %e, "attach stdin");
            return;
        }
    }
}

/// The container's output to the session until it ends.
async fn forward(
    rx: &mut broadcast::Receiver<Chunk>,
    mut stdout: Option<BoxWrite>,
    mut stderr: Option<BoxWrite>,
    id: &str,
) -> Result<(), CriError> {
    loop {
        let (stream, data) = match rx.recv().await {
            Ok(c) => c,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(container_id = %id, skipped_chunks = n,
                    "attach session too slow; it skipped output (the log has all of it)");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => break,
        };
        let w = match stream {
            Stream::Stdout => stdout.as_mut(),
            Stream::Stderr => stderr.as_mut(),
        };
        if let Some(w) = w
            && w.write_all(&data).await.is_err()
        {
            // The client is gone; the server drops this session.
            break;
        }
    }
    for w in [stdout.as_mut(), stderr.as_mut()].into_iter().flatten() {
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn every_session_sees_the_output_and_the_end() {
        let hubs = Arc::new(Hubs::default());
        let tap = hubs.register("c1", false, None, false).expect("register");
        let hub = hubs.get("c1").expect("hub");
        let mut a = hub.subscribe().expect("a");
        let mut b = hub.subscribe().expect("b");
        tap.publish(Stream::Stdout, b"one");
        tap.publish(Stream::Stderr, b"two");
        drop(tap);
        assert!(hubs.get("c1").is_none(), "the hub leaves with the copiers");
        let (wa, mut ra) = tokio::io::duplex(64);
        let (wb, mut rb) = tokio::io::duplex(64);
        forward(&mut a, Some(Box::pin(wa)), None, "c1")
            .await
            .expect("a");
        forward(&mut b, None, Some(Box::pin(wb)), "c1")
            .await
            .expect("b");
        let (mut sa, mut sb) = (Vec::new(), Vec::new());
        ra.read_to_end(&mut sa).await.expect("read");
        rb.read_to_end(&mut sb).await.expect("read");
        assert_eq!(sa, b"one");
        assert_eq!(sb, b"two");
    }

    #[tokio::test]
    async fn a_slow_session_skips_and_never_blocks_the_copier() {
        let hubs = Arc::new(Hubs::default());
        let tap = hubs.register("c1", false, None, false).expect("register");
        let mut slow = hubs.get("c1").expect("hub").subscribe().expect("rx");
        // Far more than the hub keeps, published without anyone reading: never blocks.
        for i in 0..(HUB_CHUNKS * 4) {
            tap.publish(Stream::Stdout, format!("{i};").as_bytes());
        }
        drop(tap);
        let (w, mut r) = tokio::io::duplex(1 << 20);
        forward(&mut slow, Some(Box::pin(w)), None, "c1")
            .await
            .expect("forward");
        let mut got = String::new();
        r.read_to_string(&mut got).await.expect("read");
        // It kept the newest HUB_CHUNKS chunks and skipped the rest.
        let want: String = (HUB_CHUNKS * 3..HUB_CHUNKS * 4)
            .map(|i| format!("{i};"))
            .collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn publishing_without_sessions_keeps_nothing() {
        let hubs = Arc::new(Hubs::default());
        let tap = hubs.register("c1", false, None, false).expect("register");
        tap.publish(Stream::Stdout, b"before anyone attached");
        let mut rx = hubs.get("c1").expect("hub").subscribe().expect("rx");
        tap.publish(Stream::Stdout, b"after");
        drop(tap);
        let (w, mut r) = tokio::io::duplex(64);
        forward(&mut rx, Some(Box::pin(w)), None, "c1")
            .await
            .expect("forward");
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"after");
    }
}
