//! A SPDY/3.1 connection multiplexing streams over any byte transport (TCP, TLS, or the
//! binary frames of a WebSocket tunnel).
//!
//! Two tasks own the transport: the reader decodes frames and hands each DATA piece to its
//! stream through a small bounded queue, awaiting when the queue is full, so a stream whose
//! consumer stops reading stops the socket (TCP backpressure, as spdystream does); the writer
//! owns the outbound zlib context and encodes frames in the one order they are queued, so a
//! stream's data always precedes its FIN and everything queued before a status precedes it.
//! Nothing is buffered without bound: every queue is bounded and every producer awaits it.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::{CancellationToken, PollSender};

use super::frame::{FLAG_FIN, Frame, FrameDecoder, FrameEncoder, goaway, rst};
use super::headers::Headers;
use crate::metrics::ByteCounters;

/// The largest DATA frame this side writes: what Go's io.Copy moves per call.
pub const MAX_WRITE_CHUNK: usize = 32 * 1024;
/// How long a closing connection waits for its peer before dropping the transport.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long a client waits for SYN_REPLY (Go's createStreamResponseTimeout).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

#[derive(Clone)]
pub struct ConnConfig {
    pub role: Role,
    /// DATA pieces queued per stream before the reader waits for its consumer.
    pub stream_queue: usize,
    /// Frames queued for the writer before producers wait.
    pub out_queue: usize,
    pub counters: Arc<ByteCounters>,
}

impl ConnConfig {
    pub fn new(role: Role) -> Self {
        Self {
            role,
            stream_queue: 8,
            out_queue: 64,
            counters: Arc::new(ByteCounters::default()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection closed")]
    Closed,
    #[error("peer sent GOAWAY")]
    GoneAway,
    #[error("stream {id} reset by peer (status {status})")]
    Reset { id: u32, status: u32 },
    #[error("no SYN_REPLY for stream {0} within {REPLY_TIMEOUT:?}")]
    ReplyTimeout(u32),
}

enum Out {
    Frame(Frame),
    /// Flush everything queued before, shut the write half down, stop writing.
    Close,
}

type Piece = Result<Bytes, io::ErrorKind>;

struct Slot {
    data: Option<mpsc::Sender<Piece>>,
    reply: Option<oneshot::Sender<Result<Headers, u32>>>,
    reset: Arc<AtomicBool>,
    local_done: bool,
}

struct Shared {
    role: Role,
    out: mpsc::Sender<Out>,
    streams: Mutex<HashMap<u32, Slot>>,
    next_stream_id: AtomicU32,
    next_ping_id: AtomicU32,
    last_received_id: AtomicU32,
    pings: Mutex<HashMap<u32, oneshot::Sender<()>>>,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last DATA or SYN_STREAM frame, either direction.
    last_activity: AtomicU64,
    goaway_received: AtomicBool,
    /// The peer is gone: the reader hit EOF or an error, or the writer could not write.
    closed: CancellationToken,
    /// The reader saw the peer's EOF (or gave up): closing may now drop the transport without
    /// resetting data the peer has not read yet.
    reader_done: CancellationToken,
    /// The writer flushed what it will ever write and shut the write half down.
    writer_done: CancellationToken,
    /// Stop both tasks now, dropping the transport.
    hard: CancellationToken,
    counters: Arc<ByteCounters>,
    stream_queue: usize,
    /// Frames handed to a background task because the queue was full (see `send_now`).
    deferred: AtomicU32,
    deferred_done: tokio::sync::Notify,
    me: std::sync::OnceLock<std::sync::Weak<Shared>>,
}

impl Shared {
    fn weak_self(&self) -> std::sync::Weak<Shared> {
        self.me.get().cloned().unwrap_or_default()
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_activity.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_activity.load(Ordering::Relaxed);
        Duration::from_millis(now.saturating_sub(last))
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Slot>> {
        // A poisoned map only means a panic elsewhere; the data is still consistent.
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame without waiting; used from Drop and the reader's control replies.
    fn send_now(&self, frame: Frame) {
        if let Err(mpsc::error::TrySendError::Full(item)) = self.out.try_send(Out::Frame(frame)) {
            let out = self.out.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                self.deferred.fetch_add(1, Ordering::SeqCst);
                let me = self.weak_self();
                rt.spawn(async move {
                    let _ = out.send(item).await;
                    if let Some(me) = me.upgrade() {
                        me.deferred.fetch_sub(1, Ordering::SeqCst);
                        me.deferred_done.notify_waiters();
                    }
                });
            }
        }
    }

    fn local_done(&self, id: u32) {
        let mut slots = self.slots();
        if let Some(slot) = slots.get_mut(&id) {
            slot.local_done = true;
            if slot.data.is_none() && slot.reply.is_none() {
                slots.remove(&id);
            }
        }
    }
}

/// One SPDY connection. Dropping it closes the connection gracefully in the background
/// (GOAWAY, flush, then the transport is dropped after at most [`CLOSE_GRACE`]).
pub struct Connection {
    shared: Arc<Shared>,
    incoming: Option<mpsc::Receiver<Stream>>,
}

impl Connection {
    pub fn new<T>(io: T, cfg: ConnConfig) -> Self
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (out_tx, out_rx) = mpsc::channel(cfg.out_queue.max(1));
        let (in_tx, in_rx) = mpsc::channel(16);
        let (r, w) = tokio::io::split(io);
        let shared = Arc::new(Shared {
            role: cfg.role,
            out: out_tx,
            streams: Mutex::new(HashMap::new()),
            next_stream_id: AtomicU32::new(if cfg.role == Role::Client { 1 } else { 2 }),
            next_ping_id: AtomicU32::new(if cfg.role == Role::Client { 1 } else { 2 }),
            last_received_id: AtomicU32::new(0),
            pings: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            last_activity: AtomicU64::new(0),
            goaway_received: AtomicBool::new(false),
            closed: CancellationToken::new(),
            reader_done: CancellationToken::new(),
            writer_done: CancellationToken::new(),
            hard: CancellationToken::new(),
            counters: cfg.counters,
            stream_queue: cfg.stream_queue.max(1),
            deferred: AtomicU32::new(0),
            deferred_done: tokio::sync::Notify::new(),
            me: std::sync::OnceLock::new(),
        });
        let _ = shared.me.set(Arc::downgrade(&shared));
        tokio::spawn(read_loop(
            shared.clone(),
            FramedRead::new(r, FrameDecoder::new()),
            in_tx,
        ));
        tokio::spawn(write_loop(shared.clone(), out_rx, w));
        Self {
            shared,
            incoming: Some(in_rx),
        }
    }

    /// The next stream the peer opened (already answered with SYN_REPLY), or `None` once the
    /// connection is closed.
    pub async fn accept(&mut self) -> Option<Stream> {
        let rx = self.incoming.as_mut()?;
        tokio::select! {
            // Streams that arrived before the peer left are still handed out.
            biased;
            s = rx.recv() => s,
            _ = self.shared.closed.cancelled() => None,
        }
    }

    /// Streams the peer opens from now on are refused with RST_STREAM (REFUSED_STREAM).
    pub fn stop_accepting(&mut self) {
        self.incoming = None;
    }

    /// Opens a stream and waits for the peer's SYN_REPLY.
    pub async fn open_stream(&self, headers: Headers) -> Result<Stream, ConnError> {
        let s = &self.shared;
        if s.closed.is_cancelled() {
            return Err(ConnError::Closed);
        }
        if s.goaway_received.load(Ordering::Relaxed) {
            return Err(ConnError::GoneAway);
        }
        let id = s.next_stream_id.fetch_add(2, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        let (data_tx, data_rx) = mpsc::channel(s.stream_queue);
        let reset = Arc::new(AtomicBool::new(false));
        s.slots().insert(
            id,
            Slot {
                data: Some(data_tx),
                reply: Some(reply_tx),
                reset: reset.clone(),
                local_done: false,
            },
        );
        let syn = Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: headers.clone(),
        };
        s.out
            .send(Out::Frame(syn))
            .await
            .map_err(|_| ConnError::Closed)?;
        s.touch();
        let reply = tokio::select! {
            // A reply that arrived just before the peer closed still counts.
            biased;
            r = tokio::time::timeout(REPLY_TIMEOUT, reply_rx) => r,
            _ = s.closed.cancelled() => return Err(ConnError::Closed),
        };
        match reply {
            Err(_) => Err(ConnError::ReplyTimeout(id)),
            Ok(Err(_)) => Err(ConnError::Closed),
            Ok(Ok(Err(status))) => Err(ConnError::Reset { id, status }),
            Ok(Ok(Ok(_))) => Ok(Stream::new(id, headers, data_rx, s.clone(), reset)),
        }
    }

    /// Sends a PING and waits for its echo. Pings are never activity for the idle timeout.
    pub async fn ping(&self) -> Result<Duration, ConnError> {
        let s = &self.shared;
        let id = s.next_ping_id.fetch_add(2, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        s.pings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let start = Instant::now();
        s.out
            .send(Out::Frame(Frame::Ping { id }))
            .await
            .map_err(|_| ConnError::Closed)?;
        tokio::select! {
            r = rx => r.map_err(|_| ConnError::Closed)?,
            _ = s.closed.cancelled() => return Err(ConnError::Closed),
        }
        Ok(start.elapsed())
    }

    /// Waits until frames that dropped stream halves queued in the background (FINs, resets)
    /// are in the writer's queue, so that whatever is sent next follows them.
    pub async fn settle(&self) {
        let s = &self.shared;
        loop {
            let notified = s.deferred_done.notified();
            if s.deferred.load(Ordering::SeqCst) == 0 || s.closed.is_cancelled() {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    }

    /// How long no DATA or SYN_STREAM frame went either way.
    pub fn idle_for(&self) -> Duration {
        self.shared.idle_for()
    }

    /// [`idle_for`](Self::idle_for) as a function that does not borrow the connection.
    pub fn idle_probe(&self) -> impl Fn() -> Duration + Send + Sync + 'static {
        let s = self.shared.clone();
        move || s.idle_for()
    }

    /// Resolves once the peer is gone (EOF, transport error, or a protocol error).
    pub async fn closed(&self) {
        self.shared.closed.cancelled().await
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    pub fn counters(&self) -> &Arc<ByteCounters> {
        &self.shared.counters
    }

    /// Sends GOAWAY after everything already queued, shuts the write half down, and waits
    /// (at most [`CLOSE_GRACE`]) for the peer to close its side, so the peer reads every byte.
    pub async fn close(mut self) {
        self.incoming = None;
        let s = self.shared.clone();
        let last = s.last_received_id.load(Ordering::Relaxed);
        let goaway = Frame::GoAway {
            last_good_stream_id: last,
            status: goaway::OK,
        };
        let graceful = async {
            let _ = s.out.send(Out::Frame(goaway)).await;
            let _ = s.out.send(Out::Close).await;
            s.writer_done.cancelled().await;
            s.reader_done.cancelled().await;
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, graceful).await;
        s.hard.cancel();
        drop(self);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let s = &self.shared;
        if s.hard.is_cancelled() {
            return;
        }
        let _ = s.out.try_send(Out::Close);
        let hard = s.hard.clone();
        let reader_done = s.reader_done.clone();
        let writer_done = s.writer_done.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let both = async {
                    writer_done.cancelled().await;
                    reader_done.cancelled().await;
                };
                let _ = tokio::time::timeout(CLOSE_GRACE, both).await;
                hard.cancel();
            });
        } else {
            hard.cancel();
        }
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    s: Arc<Shared>,
    mut frames: FramedRead<R, FrameDecoder>,
    incoming: mpsc::Sender<Stream>,
) {
    loop {
        let next = tokio::select! {
            f = frames.next() => f,
            _ = s.hard.cancelled() => break,
        };
        match next {
            None => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "SPDY protocol error, sending GOAWAY");
                let last = s.last_received_id.load(Ordering::Relaxed);
                let _ = s.out.try_send(Out::Frame(Frame::GoAway {
                    last_good_stream_id: last,
                    status: goaway::PROTOCOL_ERROR,
                }));
                let _ = s.out.try_send(Out::Close);
                break;
            }
            Some(Ok(frame)) => {
                if !handle_frame(&s, frame, &incoming).await {
                    break;
                }
            }
        }
    }
    // The peer is gone: every stream's reader sees EOF, every waiter wakes.
    let slots: Vec<Slot> = s.slots().drain().map(|(_, v)| v).collect();
    for mut slot in slots {
        if let Some(tx) = slot.reply.take() {
            let _ = tx.send(Err(rst::CANCEL));
        }
        slot.reset.store(true, Ordering::Relaxed);
    }
    s.pings.lock().unwrap_or_else(|e| e.into_inner()).clear();
    s.closed.cancel();
    s.reader_done.cancel();
}

/// Handles one frame; false ends the connection.
async fn handle_frame(s: &Arc<Shared>, frame: Frame, incoming: &mpsc::Sender<Stream>) -> bool {
    match frame {
        Frame::Data {
            stream_id,
            fin,
            data,
        } => {
            s.touch();
            s.counters
                .bytes_in
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            let tx = s.slots().get(&stream_id).and_then(|slot| slot.data.clone());
            if let Some(tx) = tx {
                if !data.is_empty() {
                    tokio::select! {
                        _ = tx.send(Ok(data)) => {}
                        _ = s.hard.cancelled() => return false,
                    }
                }
                if fin {
                    remote_done(s, stream_id);
                }
            }
        }
        Frame::SynStream {
            stream_id,
            flags,
            headers,
            ..
        } => return syn_stream(s, stream_id, flags, headers, incoming).await,
        Frame::SynReply {
            stream_id, flags, ..
        } => {
            let mut slots = s.slots();
            if let Some(slot) = slots.get_mut(&stream_id)
                && let Some(tx) = slot.reply.take()
            {
                let _ = tx.send(Ok(Headers::new()));
            }
            drop(slots);
            if flags & FLAG_FIN != 0 {
                remote_done(s, stream_id);
            }
        }
        Frame::RstStream { stream_id, status } => {
            if let Some(mut slot) = s.slots().remove(&stream_id) {
                slot.reset.store(true, Ordering::Relaxed);
                if let Some(tx) = slot.reply.take() {
                    let _ = tx.send(Err(status));
                }
                if let Some(tx) = slot.data.take() {
                    let _ = tx.try_send(Err(io::ErrorKind::ConnectionReset));
                }
            }
        }
        Frame::Ping { id } => {
            let from_peer = (id % 2 == 1) == (s.role == Role::Server);
            if from_peer {
                // Answer, and deliberately leave last_activity alone: a client's keep-alive
                // pings must not keep an idle session open.
                tokio::select! {
                    _ = s.out.send(Out::Frame(Frame::Ping { id })) => {}
                    _ = s.hard.cancelled() => return false,
                }
            } else if let Some(tx) = s
                .pings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id)
            {
                let _ = tx.send(());
            }
        }
        Frame::GoAway { .. } => s.goaway_received.store(true, Ordering::Relaxed),
        Frame::Headers { .. } | Frame::Settings | Frame::WindowUpdate { .. } => {}
    }
    true
}

fn remote_done(s: &Shared, id: u32) {
    let mut slots = s.slots();
    if let Some(slot) = slots.get_mut(&id) {
        slot.data = None;
        if slot.local_done && slot.reply.is_none() {
            slots.remove(&id);
        }
    }
}

async fn syn_stream(
    s: &Arc<Shared>,
    id: u32,
    flags: u8,
    headers: Headers,
    incoming: &mpsc::Sender<Stream>,
) -> bool {
    s.touch();
    let peer_parity = if s.role == Role::Server { 1 } else { 0 };
    let refuse = |status| {
        s.send_now(Frame::RstStream {
            stream_id: id,
            status,
        })
    };
    if id % 2 != peer_parity {
        refuse(rst::PROTOCOL_ERROR);
        return true;
    }
    if s.slots().contains_key(&id) {
        refuse(rst::STREAM_IN_USE);
        return true;
    }
    s.last_received_id.fetch_max(id, Ordering::Relaxed);
    if incoming.is_closed() {
        // Nobody accepts streams on this connection any more (the session has what it needs).
        refuse(rst::REFUSED_STREAM);
        return true;
    }
    let (data_tx, data_rx) = mpsc::channel(s.stream_queue);
    let reset = Arc::new(AtomicBool::new(false));
    let remote_fin = flags & FLAG_FIN != 0;
    s.slots().insert(
        id,
        Slot {
            data: (!remote_fin).then_some(data_tx),
            reply: None,
            reset: reset.clone(),
            local_done: false,
        },
    );
    let reply = Frame::SynReply {
        stream_id: id,
        flags: 0,
        headers: Headers::new(),
    };
    tokio::select! {
        _ = s.out.send(Out::Frame(reply)) => {}
        _ = s.hard.cancelled() => return false,
    }
    let stream = Stream::new(id, headers, data_rx, s.clone(), reset);
    let sent = tokio::select! {
        r = incoming.send(stream) => r.is_ok(),
        _ = s.hard.cancelled() => return false,
    };
    if !sent {
        // The acceptor went away meanwhile; the Stream was dropped with the failed send.
        s.slots().remove(&id);
        refuse(rst::REFUSED_STREAM);
    }
    true
}

async fn write_loop<W: AsyncWrite + Unpin>(s: Arc<Shared>, mut rx: mpsc::Receiver<Out>, w: W) {
    let mut sink = FramedWrite::new(w, FrameEncoder::new());
    loop {
        let item = tokio::select! {
            it = rx.recv() => it,
            _ = s.hard.cancelled() => break,
        };
        let frame = match item {
            Some(Out::Frame(f)) => f,
            None | Some(Out::Close) => {
                let done = async {
                    let _ = sink.flush().await;
                    let _ = sink.get_mut().shutdown().await;
                };
                tokio::select! {
                    _ = done => {}
                    _ = s.hard.cancelled() => {}
                }
                break;
            }
        };
        if let Frame::Data { data, .. } = &frame {
            s.touch();
            s.counters
                .bytes_out
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        let res = tokio::select! {
            r = sink.feed(frame) => r,
            _ = s.hard.cancelled() => break,
        };
        let res = match res {
            Ok(()) if rx.is_empty() => tokio::select! {
                r = sink.flush() => r,
                _ = s.hard.cancelled() => break,
            },
            other => other,
        };
        if let Err(e) = res {
            tracing::debug!(error = %e, "SPDY write failed, closing");
            break;
        }
    }
    // Whoever still writes gets BrokenPipe once `rx` is gone; the peer is unreachable.
    s.writer_done.cancel();
    s.closed.cancel();
}

/// A stream of a connection: read what the peer sends, write what it should receive.
/// [`AsyncWrite::poll_shutdown`] sends FIN; dropping the write half without it does too.
pub struct Stream {
    id: u32,
    headers: Headers,
    reader: StreamReader,
    writer: StreamWriter,
}

impl Stream {
    fn new(
        id: u32,
        headers: Headers,
        rx: mpsc::Receiver<Piece>,
        shared: Arc<Shared>,
        reset: Arc<AtomicBool>,
    ) -> Self {
        Self {
            id,
            headers,
            reader: StreamReader {
                rx,
                buf: Bytes::new(),
            },
            writer: StreamWriter {
                id,
                tx: PollSender::new(shared.out.clone()),
                shared,
                reset,
                fin_sent: false,
            },
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    pub fn split(self) -> (StreamReader, StreamWriter) {
        (self.reader, self.writer)
    }

    /// Abandons the stream with RST_STREAM (CANCEL).
    pub fn reset(self) {
        self.writer.reset(rst::CANCEL);
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}

/// What the peer sends on a stream; EOF at its FIN.
pub struct StreamReader {
    rx: mpsc::Receiver<Piece>,
    buf: Bytes,
}

impl AsyncRead for StreamReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.buf.is_empty() {
            match ready!(self.rx.poll_recv(cx)) {
                Some(Ok(b)) => self.buf = b,
                Some(Err(kind)) => return Poll::Ready(Err(io::Error::from(kind))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf.split_to(n));
        Poll::Ready(Ok(()))
    }
}

/// The sending half of a stream. Writes are cut into DATA frames of at most
/// [`MAX_WRITE_CHUNK`] bytes and wait while the connection's writer queue is full.
pub struct StreamWriter {
    id: u32,
    tx: PollSender<Out>,
    shared: Arc<Shared>,
    reset: Arc<AtomicBool>,
    fin_sent: bool,
}

impl StreamWriter {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Abandons the stream with RST_STREAM.
    pub fn reset(mut self, status: u32) {
        self.fin_sent = true;
        self.shared.send_now(Frame::RstStream {
            stream_id: self.id,
            status,
        });
        self.shared.local_done(self.id);
    }

    fn broken(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!("SPDY stream {} closed", self.id),
        )
    }
}

impl AsyncWrite for StreamWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.fin_sent || self.reset.load(Ordering::Relaxed) {
            return Poll::Ready(Err(self.broken()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if ready!(self.tx.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(self.broken()));
        }
        let n = buf.len().min(MAX_WRITE_CHUNK);
        let frame = Frame::data(self.id, Bytes::copy_from_slice(&buf[..n]), false);
        if self.tx.send_item(Out::Frame(frame)).is_err() {
            return Poll::Ready(Err(self.broken()));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued frames are written in order by the connection's writer, which flushes the
        // transport whenever its queue runs empty.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.fin_sent {
            return Poll::Ready(Ok(()));
        }
        if self.reset.load(Ordering::Relaxed) {
            self.fin_sent = true;
            return Poll::Ready(Ok(()));
        }
        if ready!(self.tx.poll_reserve(cx)).is_err() {
            self.fin_sent = true;
            return Poll::Ready(Err(self.broken()));
        }
        let frame = Frame::data(self.id, Bytes::new(), true);
        let _ = self.tx.send_item(Out::Frame(frame));
        self.fin_sent = true;
        self.shared.local_done(self.id);
        Poll::Ready(Ok(()))
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if !self.fin_sent && !self.reset.load(Ordering::Relaxed) {
            self.shared
                .send_now(Frame::data(self.id, Bytes::new(), true));
        }
        if !self.fin_sent {
            self.shared.local_done(self.id);
        }
    }
}
