//! Attach (`kubectl attach`, `crictl attach`) to a container's own stdio: one session reads
//! the container's [`Hub`] (`crate::container::attach`, fed by its log copiers) and writes its
//! stdin into the container's stdin FIFO. A TTY container's resizes are ResizePty on its init
//! process.

use std::sync::Arc;

use crisp_stream::backend::BoxWrite;
use crisp_stream::{AttachRequest, Streams};
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast;

use crate::container::attach::{Chunk, Hub};
use crate::container::logs::Stream;
use crate::error::CriError;

/// One attach session: until the container's output ends or the session is dropped.
pub async fn attach(
    d: &super::Runtime,
    req: AttachRequest,
    streams: Streams,
) -> Result<(), CriError> {
    let rec = crate::container::status::find(&d.containers.store, &req.container_id)?;
    let shim = crate::container::exec::running_shim(&d.containers, &rec, "Attach")?;
    let hub = d.containers.attach.get(&rec.id).ok_or_else(|| {
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
    let _live = d.sessions.enter();
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
    use crate::container::attach::{HUB_CHUNKS, Hubs};
    use crate::container::logs::OutputTap;
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
