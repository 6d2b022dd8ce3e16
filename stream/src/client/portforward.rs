//! Port-forward as client-go's `portforward` package does it (SPDY, and SPDY tunnelled in a
//! WebSocket), and the WebSocket channel protocol.

use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{ClientError, upgrade};
use crate::activity::Activity;
use crate::metrics::ByteCounters;
use crate::spdy::{ConnConfig, Connection, Headers, Role, Stream, StreamReader};
use crate::ws::mux::{ChannelWriter, PipeReader, WsOut, write_loop};
use crate::ws::{self, Codec};

pub const PROTOCOL: &str = "portforward.k8s.io";

/// One SPDY connection carrying any number of forwarded TCP connections.
pub struct SpdyPortForward {
    conn: Connection,
    next_request: AtomicU32,
}

/// One forwarded connection: `data` is the TCP byte stream; `error` ends with the server's
/// error message, empty when forwarding worked.
pub struct PortForwardStream {
    pub data: Stream,
    pub error: StreamReader,
}

impl PortForwardStream {
    /// Reads the error stream to its end.
    pub async fn error_message(error: &mut StreamReader) -> std::io::Result<String> {
        let mut s = String::new();
        error.read_to_string(&mut s).await?;
        Ok(s)
    }
}

impl SpdyPortForward {
    /// Upgrades the URL's HTTP connection to SPDY/3.1 with `portforward.k8s.io`.
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        let (tcp, version) = upgrade::spdy(url, &[PROTOCOL]).await?;
        if version.as_deref() != Some(PROTOCOL) {
            return Err(ClientError::Protocol(format!("server chose {version:?}")));
        }
        Ok(Self::over(Connection::new(
            tcp,
            ConnConfig::new(Role::Client),
        )))
    }

    /// SPDY inside binary WebSocket messages (`SPDY/3.1+portforward.k8s.io`), as kubectl and
    /// crictl ≥ 1.31 dial it.
    pub async fn connect_tunnel(url: &str) -> Result<Self, ClientError> {
        let (ws, chosen) = upgrade::websocket(url, &[ws::SPDY_TUNNEL]).await?;
        if chosen.as_deref() != Some(ws::SPDY_TUNNEL) {
            return Err(ClientError::Protocol(format!("server chose {chosen:?}")));
        }
        let io = ws::tunnel::WsIo::new(ws);
        Ok(Self::over(Connection::new(
            io,
            ConnConfig::new(Role::Client),
        )))
    }

    fn over(conn: Connection) -> Self {
        Self {
            conn,
            next_request: AtomicU32::new(0),
        }
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Forwards a new TCP connection to `port`.
    pub async fn open(&self, port: u16) -> Result<PortForwardStream, ClientError> {
        self.open_raw(&port.to_string()).await
    }

    /// As [`open`](Self::open) with the `port` header verbatim (to test bad values).
    pub async fn open_raw(&self, port: &str) -> Result<PortForwardStream, ClientError> {
        let id = self
            .next_request
            .fetch_add(1, Ordering::Relaxed)
            .to_string();
        let h = |t: &str| {
            Headers::new()
                .with("streamType", t)
                .with("port", port)
                .with("requestID", id.as_str())
        };
        // client-go: the error stream first, its write side closed at once, then data.
        let error = self.conn.open_stream(h("error")).await?;
        let (error, mut error_w) = error.split();
        error_w.shutdown().await?;
        let data = self.conn.open_stream(h("data")).await?;
        Ok(PortForwardStream { data, error })
    }

    pub async fn close(self) {
        self.conn.close().await
    }
}

/// One forwarded port of a WebSocket port-forward session.
pub struct WsPortStream {
    pub port: u16,
    pub reader: PipeReader,
    pub writer: ChannelWriter,
    /// The error channel's text, as the server sends it (EOF when the session ends).
    pub error: PipeReader,
}

/// A WebSocket port-forward session (`v4.channel.k8s.io`), one stream per `?port=`.
pub struct WsPortForward {
    pub streams: Vec<WsPortStream>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for WsPortForward {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl WsPortForward {
    /// Connects to `url` (which must carry the `port` query parameters, in `ports` order).
    pub async fn connect(url: &str, protocol: &str, ports: &[u16]) -> Result<Self, ClientError> {
        let (ws, chosen) = upgrade::websocket(url, &[protocol]).await?;
        if chosen.as_deref() != Some(protocol) {
            return Err(ClientError::Protocol(format!("server chose {chosen:?}")));
        }
        let codec = if protocol.contains("base64") {
            Codec::Base64
        } else {
            Codec::Binary
        };
        let (sink, mut rx) = ws.split();
        let (out_tx, out_rx) = mpsc::channel::<WsOut>(16);
        let writer = tokio::spawn(async move {
            let counters = std::sync::Arc::new(ByteCounters::default());
            write_loop(sink, out_rx, codec, Activity::default(), counters).await;
        });
        let mut streams = Vec::new();
        let mut inbound = Vec::new();
        for (i, port) in ports.iter().copied().enumerate() {
            let (tx, rx_pipe) = mpsc::channel::<Bytes>(8);
            let (etx, erx) = mpsc::channel::<Bytes>(8);
            inbound.push((port, Some(tx), Some(etx), [false; 2]));
            streams.push(WsPortStream {
                port,
                reader: PipeReader::new(rx_pipe),
                writer: ChannelWriter::new((2 * i) as u8, out_tx.clone()),
                error: PipeReader::new(erx),
            });
        }
        drop(out_tx);
        let reader = tokio::spawn(async move {
            while let Some(Ok(msg)) = rx.next().await {
                let Ok(ws::Decoded::Data(ch, data)) = ws::decode(codec, false, msg) else {
                    continue;
                };
                let Some(entry) = inbound.get_mut(usize::from(ch / 2)) else {
                    break;
                };
                let is_err = usize::from(ch % 2);
                // The first message of each channel is the port, little-endian.
                if !entry.3[is_err] {
                    entry.3[is_err] = true;
                    if data.len() != 2 || u16::from_le_bytes([data[0], data[1]]) != entry.0 {
                        tracing::warn!(ch, ?data, "bad port prefix");
                        break;
                    }
                    continue;
                }
                let tx = if is_err == 1 {
                    &mut entry.2
                } else {
                    &mut entry.1
                };
                if let Some(t) = tx
                    && t.send(data).await.is_err()
                {
                    *tx = None;
                }
            }
        });
        Ok(Self {
            streams,
            tasks: vec![writer, reader],
        })
    }
}
