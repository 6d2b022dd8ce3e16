//! Exec and attach over WebSocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`,
//! `channel.k8s.io` and the base64 variants): channels 0 stdin, 1 stdout, 2 stderr, 3 error,
//! 4 resize; v5 adds the CLOSE signal so stdin can end without ending the session.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::status::Status;
use super::{Command, ResizeDecoder};
use crate::activity::{Activity, idle_expired};
use crate::backend::{BoxRead, BoxWrite, Streams, TermSize};
use crate::metrics::ByteCounters;
use crate::server::session::{AbortOnDrop, SessionCtx};
use crate::ws::mux::{ChannelWriter, PipeReader, WsOut, write_loop};
use crate::ws::{self, Codec, Decoded, decode};

/// How long the server waits for the client's close frame after sending its own.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How a protocol name behaves.
fn flavour(protocol: &str) -> (Codec, bool, bool) {
    // (codec, status as JSON (v4+), CLOSE signal (v5))
    match protocol {
        ws::V5_BINARY => (Codec::Binary, true, true),
        ws::V4_BINARY => (Codec::Binary, true, false),
        ws::V4_BASE64 => (Codec::Base64, true, false),
        ws::V1_BASE64 => (Codec::Base64, false, false),
        _ => (Codec::Binary, false, false),
    }
}

enum ReadEnd {
    ClientGone,
    Protocol(String),
}

struct Inbound {
    codec: Codec,
    v5: bool,
    stdin: Option<mpsc::Sender<Bytes>>,
    resize: Option<mpsc::Sender<TermSize>>,
    resize_dec: ResizeDecoder,
    activity: Activity,
    counters: Arc<ByteCounters>,
}

impl Inbound {
    /// Reads client messages into the channels until the client leaves or misbehaves.
    async fn run<S>(&mut self, rx: &mut S) -> ReadEnd
    where
        S: futures::Stream<
                Item = Result<
                    tokio_tungstenite::tungstenite::Message,
                    tokio_tungstenite::tungstenite::Error,
                >,
            > + Unpin,
    {
        while let Some(msg) = rx.next().await {
            let Ok(msg) = msg else {
                return ReadEnd::ClientGone;
            };
            match decode(self.codec, self.v5, msg) {
                Err(e) => return ReadEnd::Protocol(e),
                Ok(Decoded::End) => return ReadEnd::ClientGone,
                Ok(Decoded::Nothing) => {}
                Ok(Decoded::Close(ws::STDIN)) => self.stdin = None,
                Ok(Decoded::Close(_)) => {}
                Ok(Decoded::Data(ch, data)) => {
                    self.activity.touch();
                    self.counters
                        .bytes_in
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    if let Err(e) = self.deliver(ch, data).await {
                        return ReadEnd::Protocol(e);
                    }
                }
            }
        }
        ReadEnd::ClientGone
    }

    async fn deliver(&mut self, ch: u8, data: Bytes) -> Result<(), String> {
        match ch {
            ws::STDIN => {
                if let Some(tx) = &self.stdin
                    && tx.send(data).await.is_err()
                {
                    // The backend stopped reading stdin; later input has nowhere to go.
                    self.stdin = None;
                }
            }
            ws::RESIZE => {
                let sizes = self.resize_dec.push(&data)?;
                if let Some(tx) = &self.resize {
                    for s in sizes {
                        let _ = tx.send(s).await;
                    }
                }
            }
            // Output channels are the server's; Go ignores what a client sends on them.
            ws::STDOUT | ws::STDERR | ws::ERROR => {}
            other => return Err(format!("message on unknown channel {other}")),
        }
        Ok(())
    }
}

pub(crate) async fn serve<S>(ctx: SessionCtx, ws: WebSocketStream<S>, protocol: &str, cmd: Command)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (codec, json_status, v5) = flavour(protocol);
    let (want_in, want_out, want_err, tty) = cmd.streams();
    let (sink, mut rx) = ws.split();
    let activity = Activity::default();
    let (out_tx, out_rx) = mpsc::channel(16);
    let writer = AbortOnDrop(tokio::spawn(write_loop(
        sink,
        out_rx,
        codec,
        activity.clone(),
        ctx.counters.clone(),
    )));
    // An empty message on the lowest writable channel tells the client the session is up.
    let first = if want_out {
        ws::STDOUT
    } else if want_err {
        ws::STDERR
    } else {
        ws::ERROR
    };
    let _ = out_tx.send(WsOut::Data(first, Bytes::new())).await;

    let (stdin_tx, stdin_rx) = mpsc::channel(8);
    let (resize_tx, resize_rx) = mpsc::channel(16);
    let streams = Streams {
        stdin: want_in.then(|| Box::pin(PipeReader::new(stdin_rx)) as BoxRead),
        stdout: want_out
            .then(|| Box::pin(ChannelWriter::new(ws::STDOUT, out_tx.clone())) as BoxWrite),
        stderr: want_err
            .then(|| Box::pin(ChannelWriter::new(ws::STDERR, out_tx.clone())) as BoxWrite),
        resize: tty.then_some(resize_rx),
    };
    let mut inbound = Inbound {
        codec,
        v5,
        stdin: want_in.then_some(stdin_tx),
        resize: tty.then_some(resize_tx),
        resize_dec: ResizeDecoder::default(),
        activity: activity.clone(),
        counters: ctx.counters.clone(),
    };
    let work = async {
        match cmd {
            Command::Exec(req) => match ctx.backend.exec(req, streams).await {
                Ok(code) => Status::exit(code),
                Err(e) => Status::from_backend("error executing command in container", &e),
            },
            Command::Attach(req) => match ctx.backend.attach(req, streams).await {
                Ok(()) => Status::success(),
                Err(e) => Status::from_backend("error attaching to container", &e),
            },
        }
    };
    let close = tokio::select! {
        status = work => {
            let body = if json_status { Some(status.to_json()) } else { status.to_v1_message() };
            if let Some(body) = body {
                let _ = out_tx.send(WsOut::Data(ws::ERROR, Bytes::from(body))).await;
            }
            (CloseCode::Normal, String::new())
        }
        end = inbound.run(&mut rx) => match end {
            ReadEnd::ClientGone => return,
            ReadEnd::Protocol(e) => {
                tracing::debug!(error = %e, "WebSocket protocol error");
                (CloseCode::Protocol, e)
            }
        },
        _ = idle_expired(|| activity.idle_for(), ctx.idle_timeout) => {
            tracing::info!(idle_timeout = ?ctx.idle_timeout, "closing idle streaming session");
            (CloseCode::Normal, "idle timeout".to_string())
        }
        _ = ctx.shutdown.cancelled() => (CloseCode::Away, "server shutting down".to_string()),
    };
    drop(inbound);
    let _ = out_tx.send(WsOut::Close(close.0, close.1)).await;
    drop(out_tx);
    finish(writer, &mut rx).await;
}

/// Waits for the close frame to go out, then for the client's close (or EOF), so the client
/// reads everything before the TCP connection goes.
pub(crate) async fn finish<R>(writer: AbortOnDrop<bool>, rx: &mut R)
where
    R: futures::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    let drain = async move {
        let mut writer = writer;
        let _ = (&mut writer.0).await;
        while let Some(Ok(_)) = rx.next().await {}
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
}
