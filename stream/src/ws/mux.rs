//! Moving channel data between a WebSocket and the reader/writer objects a session hands out.
//!
//! One writer task owns the sink; channel writers queue `(channel, bytes)` into a bounded
//! queue and wait when it is full, so a client that stops reading stops the producer.
//! Inbound data goes to each channel's bounded pipe; the one reader awaits a full pipe.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::{Sink, SinkExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::PollSender;

use super::{Codec, encode};
use crate::activity::Activity;
use crate::metrics::ByteCounters;

/// The largest message a channel writer sends.
pub const MAX_MESSAGE: usize = 32 * 1024;

pub enum WsOut {
    Data(u8, Bytes),
    Close(CloseCode, String),
}

/// Writes everything queued, in order, until a `Close` (sent as a close frame) or until every
/// sender is gone. Returns whether the transport accepted all of it.
pub async fn write_loop<S>(
    mut sink: S,
    mut rx: mpsc::Receiver<WsOut>,
    codec: Codec,
    activity: Activity,
    counters: Arc<ByteCounters>,
) -> bool
where
    S: Sink<Message> + Unpin,
{
    while let Some(item) = rx.recv().await {
        let msg = match item {
            WsOut::Data(ch, data) => {
                activity.touch();
                counters
                    .bytes_out
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                encode(codec, ch, &data)
            }
            WsOut::Close(code, reason) => {
                let frame = CloseFrame {
                    code,
                    reason: reason.into(),
                };
                let ok = sink.send(Message::Close(Some(frame))).await.is_ok();
                return ok;
            }
        };
        let res = if rx.is_empty() {
            sink.send(msg).await
        } else {
            sink.feed(msg).await
        };
        if res.is_err() {
            return false;
        }
    }
    sink.flush().await.is_ok()
}

/// The writing end of one channel.
pub struct ChannelWriter {
    channel: u8,
    tx: PollSender<WsOut>,
    closed: bool,
}

impl ChannelWriter {
    pub fn new(channel: u8, tx: mpsc::Sender<WsOut>) -> Self {
        Self {
            channel,
            tx: PollSender::new(tx),
            closed: false,
        }
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "WebSocket closed")
}

impl AsyncWrite for ChannelWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closed {
            return Poll::Ready(Err(broken()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if ready!(self.tx.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(broken()));
        }
        let n = buf.len().min(MAX_MESSAGE);
        let item = WsOut::Data(self.channel, Bytes::copy_from_slice(&buf[..n]));
        if self.tx.send_item(item).is_err() {
            return Poll::Ready(Err(broken()));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// A WebSocket channel has no half-close from the server; the data simply ends.
    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.closed = true;
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}

/// The reading end of one inbound channel; EOF once its sender is dropped.
pub struct PipeReader {
    rx: mpsc::Receiver<Bytes>,
    buf: Bytes,
}

impl PipeReader {
    pub fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        Self {
            rx,
            buf: Bytes::new(),
        }
    }
}

impl AsyncRead for PipeReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.buf.is_empty() {
            match ready!(self.rx.poll_recv(cx)) {
                Some(b) => self.buf = b,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf.split_to(n));
        Poll::Ready(Ok(()))
    }
}
