//! Exec and attach as client-go's remotecommand executors run them.

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::{ClientError, upgrade};
use crate::backend::{BoxRead, BoxWrite, Streams, TermSize};
use crate::spdy::{ConnConfig, Connection, Headers, Role};
use crate::ws::{self, Codec};

/// How a remote command ended, as client-go reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The process exited with this code (0 for a `Success` status).
    Exited(i32),
    /// The session failed; the status (or v1 error) message.
    Failed(String),
}

/// What kubelet offers, newest first.
pub const SPDY_OFFER: [&str; 5] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// Parses the error stream's content as client-go does for the negotiated version.
pub fn parse_error_stream(version: &str, body: &[u8]) -> Outcome {
    if body.is_empty() {
        return Outcome::Exited(0);
    }
    let text = String::from_utf8_lossy(body).into_owned();
    if !matches!(
        version,
        "v4.channel.k8s.io" | "v5.channel.k8s.io" | "v4.base64.channel.k8s.io"
    ) {
        return Outcome::Failed(text);
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Outcome::Failed(format!("error stream protocol error: {text:?}"));
    };
    match v["status"].as_str() {
        Some("Success") => Outcome::Exited(0),
        Some("Failure") if v["reason"] == "NonZeroExitCode" => {
            let causes = v["details"]["causes"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let code = causes
                .iter()
                .find(|c| c["reason"] == "ExitCode")
                .and_then(|c| c["message"].as_str())
                .and_then(|m| m.parse::<u8>().ok());
            match code {
                Some(c) => Outcome::Exited(i32::from(c)),
                None => Outcome::Failed(format!("no valid ExitCode cause in {text}")),
            }
        }
        _ => Outcome::Failed(v["message"].as_str().unwrap_or(&text).to_string()),
    }
}

fn typed(t: &str) -> Headers {
    Headers::new().with("streamType", t)
}

/// Exec or attach over SPDY, offering what kubelet offers.
pub async fn exec_spdy(url: &str, tty: bool, streams: Streams) -> Result<Outcome, ClientError> {
    exec_spdy_offering(url, &SPDY_OFFER, tty, streams)
        .await
        .map(|(_, o)| o)
}

/// Exec or attach over SPDY offering `protocols`; returns the negotiated version too.
pub async fn exec_spdy_offering(
    url: &str,
    protocols: &[&str],
    tty: bool,
    streams: Streams,
) -> Result<(String, Outcome), ClientError> {
    let (tcp, version) = upgrade::spdy(url, protocols).await?;
    let version = version.unwrap_or_default();
    let conn = Connection::new(tcp, ConnConfig::new(Role::Client));
    let outcome = run_spdy(&conn, &version, tty, streams).await?;
    Ok((version, outcome))
}

/// Exec or attach over SPDY to an `https://` URL, trusting only the PEM certificates in
/// `ca_pem` (a test CA or the server's self-signed certificate).
pub async fn exec_spdy_tls(
    url: &str,
    ca_pem: &std::path::Path,
    tty: bool,
    streams: Streams,
) -> Result<Outcome, ClientError> {
    let (addr, _) = super::split_url(url)?;
    let tls = upgrade::tls_connect(&addr, ca_pem).await?;
    let (tls, version) = upgrade::spdy_on(tls, url, &SPDY_OFFER).await?;
    let conn = Connection::new(tls, ConnConfig::new(Role::Client));
    run_spdy(&conn, &version.unwrap_or_default(), tty, streams).await
}

/// Runs an exec or attach on an upgraded SPDY connection whose negotiated version is
/// `version`.
pub async fn run_spdy(
    conn: &Connection,
    version: &str,
    tty: bool,
    streams: Streams,
) -> Result<Outcome, ClientError> {
    let resize_ok = version != "channel.k8s.io" && version != "v2.channel.k8s.io";
    // client-go's order: error, stdin, stdout, stderr, resize.
    let error = conn.open_stream(typed("error")).await?;
    let stdin = match streams.stdin {
        Some(r) => Some((r, conn.open_stream(typed("stdin")).await?)),
        None => None,
    };
    let stdout = match streams.stdout {
        Some(w) => Some((w, conn.open_stream(typed("stdout")).await?)),
        None => None,
    };
    let stderr = match streams.stderr {
        Some(w) if !tty => Some((w, conn.open_stream(typed("stderr")).await?)),
        _ => None,
    };
    let resize = match streams.resize {
        Some(rx) if tty && resize_ok => Some((rx, conn.open_stream(typed("resize")).await?)),
        _ => None,
    };
    let (mut error_r, error_w) = error.split();
    drop(error_w);
    let mut background = tokio::task::JoinSet::new();
    if let Some((mut from, s)) = stdin {
        background.spawn(async move {
            let (mut r, mut w) = s.split();
            // As client-go: stdin ends when the input does or when the server closes its
            // side of the stdin stream, whichever comes first.
            let server_closed = async {
                let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
            };
            tokio::select! {
                _ = tokio::io::copy(&mut from, &mut w) => {}
                _ = server_closed => {}
            }
            let _ = w.shutdown().await;
        });
    }
    if let Some((mut rx, s)) = resize {
        background.spawn(async move {
            let (_, mut w) = s.split();
            while let Some(size) = rx.recv().await {
                let msg = format!("{{\"Width\":{},\"Height\":{}}}\n", size.width, size.height);
                if w.write_all(msg.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
    let copy_out = |pair: Option<(BoxWrite, crate::spdy::Stream)>| async move {
        if let Some((mut to, s)) = pair {
            let (mut r, _) = s.split();
            reset_is_end(tokio::io::copy(&mut r, &mut to).await.map(drop))?;
            to.flush().await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let (a, b) = tokio::join!(copy_out(stdout), copy_out(stderr));
    a?;
    b?;
    let mut body = Vec::new();
    reset_is_end(error_r.read_to_end(&mut body).await.map(drop))?;
    background.abort_all();
    Ok(parse_error_stream(version, &body))
}

/// A stream the server reset has ended, as spdystream (client-go) reads it: what arrived before
/// the RST_STREAM counts. Kubernetes' Go server ends every session by resetting all its streams
/// (`httpstream/spdy` `connection.Close`), right after the status on the error stream.
fn reset_is_end(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        other => other,
    }
}

/// Exec or attach over WebSocket with one subprotocol (`v5.channel.k8s.io`,
/// `v4.channel.k8s.io`, `v4.base64.channel.k8s.io`, `channel.k8s.io`, ...).
pub async fn exec_ws(
    url: &str,
    protocol: &str,
    tty: bool,
    streams: Streams,
) -> Result<Outcome, ClientError> {
    let (ws, chosen) = upgrade::websocket(url, &[protocol]).await?;
    let chosen = chosen.unwrap_or_default();
    if chosen != protocol {
        return Err(ClientError::Protocol(format!(
            "asked for {protocol:?}, server chose {chosen:?}"
        )));
    }
    let codec = if protocol.contains("base64") {
        Codec::Base64
    } else {
        Codec::Binary
    };
    let v5 = protocol == ws::V5_BINARY;
    let (mut sink, mut rx) = ws.split();
    let (tx, mut out) = mpsc::channel::<Message>(16);
    let sender = tokio::spawn(async move {
        while let Some(m) = out.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
        // Nothing more to send is no reason to close: closing the WebSocket ends the
        // session. The server closes it once the command is done.
        std::future::pending::<()>().await;
        drop(sink);
    });
    let mut background = tokio::task::JoinSet::new();
    if let Some(from) = streams.stdin {
        background.spawn(send_stdin(from, tx.clone(), codec, v5));
    }
    if let (true, Some(mut sizes)) = (tty, streams.resize) {
        let tx = tx.clone();
        background.spawn(async move {
            while let Some(TermSize { width, height }) = sizes.recv().await {
                let json = format!("{{\"Width\":{width},\"Height\":{height}}}");
                if tx
                    .send(ws::encode(codec, ws::RESIZE, json.as_bytes()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
    }
    drop(tx);
    let (mut stdout, mut stderr) = (streams.stdout, streams.stderr);
    let mut error = Vec::new();
    while let Some(msg) = rx.next().await {
        let msg = msg.map_err(|e| ClientError::WebSocket(e.to_string()))?;
        match ws::decode(codec, false, msg).map_err(ClientError::Protocol)? {
            ws::Decoded::End => break,
            ws::Decoded::Data(ws::STDOUT, d) => write_opt(&mut stdout, &d).await?,
            ws::Decoded::Data(ws::STDERR, d) => write_opt(&mut stderr, &d).await?,
            ws::Decoded::Data(ws::ERROR, d) => error.extend_from_slice(&d),
            ws::Decoded::Data(ch, _) => {
                return Err(ClientError::Protocol(format!("message on channel {ch}")));
            }
            ws::Decoded::Nothing | ws::Decoded::Close(_) => {}
        }
    }
    background.abort_all();
    sender.abort();
    let version = if protocol.starts_with("v4.") || v5 {
        "v4.channel.k8s.io"
    } else {
        "channel.k8s.io"
    };
    Ok(parse_error_stream(version, &error))
}

async fn write_opt(w: &mut Option<BoxWrite>, data: &Bytes) -> Result<(), ClientError> {
    if let Some(w) = w
        && !data.is_empty()
    {
        w.write_all(data).await?;
        w.flush().await?;
    }
    Ok(())
}

async fn send_stdin(mut from: BoxRead, tx: mpsc::Sender<Message>, codec: Codec, v5: bool) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if tx
            .send(ws::encode(codec, ws::STDIN, &buf[..n]))
            .await
            .is_err()
        {
            return;
        }
    }
    if v5 {
        // v5's CLOSE signal: stdin is done, the session is not.
        let _ = tx
            .send(Message::binary(vec![ws::STREAM_CLOSE, ws::STDIN]))
            .await;
    }
}
