//! Port-forward over SPDY: the client opens an error and a data stream per TCP connection,
//! paired by `requestID` (or, from clients too old to send one, by stream id), and any number
//! of pairs share one SPDY connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

use super::{HEADER_PORT, HEADER_REQUEST_ID, check_port, splice};
use crate::activity::idle_expired;
use crate::remotecommand::HEADER_STREAM_TYPE;
use crate::server::PortForwardRequest;
use crate::server::session::SessionCtx;
use crate::spdy::{Connection, Stream};

#[derive(Default)]
struct Pair {
    data: Option<Stream>,
    error: Option<Stream>,
    since: Option<Instant>,
}

pub(crate) async fn serve(ctx: SessionCtx, mut conn: Connection, req: PortForwardRequest) {
    let req = Arc::new(req);
    let mut pending: HashMap<String, Pair> = HashMap::new();
    let mut forwards = JoinSet::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let idle_for = conn.idle_probe();
    loop {
        tokio::select! {
            s = conn.accept() => {
                let Some(s) = s else { break };
                if let Some((data, error)) = add(&mut pending, s) {
                    forwards.spawn(forward(ctx.clone(), req.clone(), data, error));
                }
            }
            _ = sweep.tick() => expire(&mut pending, ctx.stream_creation_timeout),
            Some(_) = forwards.join_next(), if !forwards.is_empty() => {}
            _ = idle_expired(&idle_for, ctx.idle_timeout) => {
                tracing::info!(idle_timeout = ?ctx.idle_timeout, "closing idle port-forward session");
                break;
            }
            _ = ctx.shutdown.cancelled() => return,
        }
    }
    // Dropping the forwards closes their TCP connections in the pod.
    drop(forwards);
    drop(pending);
    conn.close().await;
}

/// Files a stream under its request; returns the pair once both halves are in.
fn add(pending: &mut HashMap<String, Pair>, s: Stream) -> Option<(Stream, Stream)> {
    let kind = s.headers().get(HEADER_STREAM_TYPE).map(str::to_owned);
    let id = match s.headers().get(HEADER_REQUEST_ID) {
        Some(id) if !id.is_empty() => id.to_owned(),
        // Old clients: an error stream and the data stream after it, ids two apart.
        _ => match kind.as_deref() {
            Some("data") => s.id().saturating_sub(2).to_string(),
            _ => s.id().to_string(),
        },
    };
    let pair = pending.entry(id.clone()).or_default();
    pair.since.get_or_insert_with(Instant::now);
    let slot = match kind.as_deref() {
        Some("data") => &mut pair.data,
        Some("error") => &mut pair.error,
        other => {
            tracing::debug!(stream_type = ?other, "refusing port-forward stream");
            s.reset();
            return None;
        }
    };
    if slot.is_some() {
        tracing::debug!(request = %id, "duplicate port-forward stream");
        s.reset();
        return None;
    }
    *slot = Some(s);
    if pair.data.is_some() && pair.error.is_some() {
        let p = pending.remove(&id)?;
        return Some((p.data?, p.error?));
    }
    None
}

/// Gives up on pairs whose second stream never came, telling the client why.
fn expire(pending: &mut HashMap<String, Pair>, limit: Duration) {
    let now = Instant::now();
    let late: Vec<String> = pending
        .iter()
        .filter(|(_, p)| p.since.is_some_and(|t| now.duration_since(t) >= limit))
        .map(|(id, _)| id.clone())
        .collect();
    for id in late {
        if let Some(p) = pending.remove(&id)
            && let Some(e) = p.error
        {
            tokio::spawn(async move {
                let (_, mut w) = e.split();
                let msg = format!("timed out waiting for streams of request {id}");
                let _ = w.write_all(msg.as_bytes()).await;
                let _ = w.shutdown().await;
            });
        }
    }
}

async fn forward(ctx: SessionCtx, req: Arc<PortForwardRequest>, data: Stream, error: Stream) {
    let (_, mut err) = error.split();
    let port = check_port(data.headers().get(HEADER_PORT), &req.ports);
    let outcome = match port {
        Err(msg) => Err(msg),
        Ok(port) => match ctx.backend.port_forward(&req.pod_sandbox_id, port).await {
            Err(e) => Err(format!(
                "error forwarding port {port} to pod {}: {e}",
                req.pod_sandbox_id
            )),
            Ok(tcp) => {
                let (r, w) = data.split();
                splice(r, w, tcp).await;
                Ok(())
            }
        },
    };
    if let Err(msg) = outcome {
        tracing::debug!(pod = %req.pod_sandbox_id, error = %msg, "port-forward failed");
        let _ = err.write_all(msg.as_bytes()).await;
    }
    let _ = err.shutdown().await;
}
