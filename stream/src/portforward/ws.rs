//! Port-forward over WebSocket channels (`v4.channel.k8s.io`): for the i-th `?port=` of the
//! URL, channel 2i carries data both ways and 2i+1 errors; the server's first message on each
//! of them is the port as two little-endian bytes. One TCP connection per port per session.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::{check_port, splice};
use crate::activity::{Activity, idle_expired};
use crate::remotecommand::ws::finish;
use crate::server::PortForwardRequest;
use crate::server::session::{AbortOnDrop, SessionCtx};
use crate::ws::mux::{ChannelWriter, PipeReader, WsOut, write_loop};
use crate::ws::{Codec, Decoded, decode};

/// The `port` query parameters, each possibly a comma-separated list, as kubelet parses them.
pub fn query_ports(query: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        if k != "port" {
            continue;
        }
        if v.is_empty() {
            return Err("query parameter \"port\" cannot be empty".into());
        }
        let v = v.replace("%2C", ",").replace("%2c", ",");
        for p in v.split(',') {
            let port: u16 = p
                .parse()
                .map_err(|_| format!("unable to parse {v:?} as a port"))?;
            if port == 0 {
                return Err(format!("port {v:?} must be > 0"));
            }
            ports.push(port);
        }
    }
    if ports.is_empty() {
        return Err("query parameter \"port\" is required".into());
    }
    Ok(ports)
}

pub(crate) async fn serve<S>(
    ctx: SessionCtx,
    ws: WebSocketStream<S>,
    codec: Codec,
    ports: Vec<u16>,
    req: PortForwardRequest,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let req = Arc::new(req);
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
    let mut inputs = Vec::with_capacity(ports.len());
    let mut forwards = JoinSet::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let (data_ch, err_ch) = ((2 * i) as u8, (2 * i + 1) as u8);
        let prefix = Bytes::copy_from_slice(&port.to_le_bytes());
        let _ = out_tx.send(WsOut::Data(data_ch, prefix.clone())).await;
        let _ = out_tx.send(WsOut::Data(err_ch, prefix)).await;
        let (in_tx, in_rx) = mpsc::channel(8);
        inputs.push(Some(in_tx));
        let data_w = ChannelWriter::new(data_ch, out_tx.clone());
        let err_w = ChannelWriter::new(err_ch, out_tx.clone());
        forwards.spawn(forward(
            ctx.clone(),
            req.clone(),
            port,
            PipeReader::new(in_rx),
            data_w,
            err_w,
        ));
    }
    let close = {
        let read = async {
            while let Some(Ok(msg)) = rx.next().await {
                match decode(codec, false, msg) {
                    Err(e) => return Some(e),
                    Ok(Decoded::End) => return None,
                    Ok(Decoded::Nothing | Decoded::Close(_)) => {}
                    Ok(Decoded::Data(ch, data)) => {
                        let i = usize::from(ch / 2);
                        if ch % 2 == 1 || i >= inputs.len() {
                            return Some(format!(
                                "message on channel {ch}, not a data channel of this session"
                            ));
                        }
                        activity.touch();
                        ctx.counters
                            .bytes_in
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                        if let Some(tx) = &inputs[i]
                            && tx.send(data).await.is_err()
                        {
                            inputs[i] = None;
                        }
                    }
                }
            }
            None
        };
        let all_done = async { while forwards.join_next().await.is_some() {} };
        tokio::select! {
            _ = all_done => (CloseCode::Normal, String::new()),
            err = read => match err {
                None => return,
                Some(e) => (CloseCode::Protocol, e),
            },
            _ = idle_expired(|| activity.idle_for(), ctx.idle_timeout) => (CloseCode::Normal, "idle timeout".to_string()),
            _ = ctx.shutdown.cancelled() => (CloseCode::Away, "server shutting down".to_string()),
        }
    };
    let _ = out_tx.send(WsOut::Close(close.0, close.1)).await;
    drop(out_tx);
    finish(writer, &mut rx).await;
}

async fn forward(
    ctx: SessionCtx,
    req: Arc<PortForwardRequest>,
    port: u16,
    from_client: PipeReader,
    to_client: ChannelWriter,
    mut err: ChannelWriter,
) {
    let outcome = match check_port(Some(&port.to_string()), &req.ports) {
        Err(msg) => Err(msg),
        Ok(port) => match ctx.backend.port_forward(&req.pod_sandbox_id, port).await {
            Ok(tcp) => {
                splice(from_client, to_client, tcp).await;
                Ok(())
            }
            Err(e) => Err(format!(
                "error forwarding port {port} to pod {}: {e}",
                req.pod_sandbox_id
            )),
        },
    };
    if let Err(msg) = outcome {
        let _ = err.write_all(msg.as_bytes()).await;
    }
}
