//! The socket under a shim's ttrpc connection: connected without blocking a tokio worker,
//! and watched, so that "the shim is gone" is known from the connection itself rather than
//! from the text of ttrpc's error (ttrpc 0.10 reports a call on a connection whose reader
//! already ended as `Others("... channel closed")`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use containerd_shim_protos::ttrpc;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

/// Whether the connection has ended: a read saw EOF or an error, or a write failed.
#[derive(Debug, Clone, Default)]
pub struct Ended(Arc<AtomicBool>);

impl Ended {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Connects to the unix socket at `path` within `limit`. tokio's connect never blocks the
/// worker (ttrpc's own `Client::connect` is a blocking connect(2), which waits as long as a
/// busy shim's listen queue is full). Returns the ttrpc client and its end flag.
pub async fn connect(
    path: &str,
    limit: Duration,
) -> Result<(ttrpc::r#async::Client, Ended), String> {
    let stream = tokio::time::timeout(limit, UnixStream::connect(path))
        .await
        .map_err(|_| format!("no connection within {limit:?}"))?
        .map_err(|e| e.to_string())?;
    let ended = Ended::default();
    let socket = ttrpc::r#async::transport::Socket::new(Watched {
        inner: stream,
        ended: ended.clone(),
    });
    Ok((ttrpc::r#async::Client::new(socket), ended))
}

/// A stream that sets its [`Ended`] when the connection ends.
struct Watched {
    inner: UnixStream,
    ended: Ended,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                this.ended.set()
            }
            Poll::Ready(Err(_)) => this.ended.set(),
            _ => {}
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Err(_))) {
            this.ended.set();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Err(_))) {
            this.ended.set();
        }
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.ended.set();
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
