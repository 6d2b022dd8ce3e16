//! HTTP/1.1 on hyper: routes, token look-up, and the upgrade to SPDY/3.1 or WebSocket.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};

use super::session::{Kind, OpenSession, SessionCtx};
use super::{PendingRequest, PortForwardRequest, State};
use crate::remotecommand::{self, Command, HEADER_ACCEPTED_VERSIONS, HEADER_PROTOCOL_VERSION};
use crate::spdy::{ConnConfig, Connection, Role};
use crate::{portforward, ws};

type Resp = Response<Full<Bytes>>;

/// SPDY's name in the `Upgrade` header.
pub const SPDY_UPGRADE: &str = "SPDY/3.1";
pub const PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

const EXEC_WS_PROTOCOLS: [&str; 6] = [
    ws::V5_BINARY,
    ws::V4_BINARY,
    ws::V4_BASE64,
    ws::V1_BINARY,
    ws::V1_BASE64,
    "",
];
const PORT_FORWARD_WS_PROTOCOLS: [&str; 4] = [ws::SPDY_TUNNEL, ws::V4_BINARY, ws::V4_BASE64, ""];

pub(crate) async fn accept_loop(state: Arc<State>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accepting a streaming connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let st = state.clone();
        state.tasks.spawn(async move {
            let shutdown = st.shutdown.clone();
            let svc = service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(route(st, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades();
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = conn => if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "streaming HTTP connection");
                },
            }
        });
    }
}

fn plain(status: StatusCode, msg: impl Into<String>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(msg.into() + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn route(state: Arc<State>, req: Request<Incoming>) -> Resp {
    if req.method() != Method::GET && req.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and POST");
    }
    let path = req.uri().path().trim_start_matches('/').to_string();
    let Some((kind, token)) = path.split_once('/') else {
        return plain(StatusCode::NOT_FOUND, "404 page not found");
    };
    if token.is_empty() || token.contains('/') {
        return plain(StatusCode::NOT_FOUND, "404 page not found");
    }
    if !matches!(kind, "exec" | "attach" | "portforward") {
        return plain(StatusCode::NOT_FOUND, "404 page not found");
    }
    let Some(pending) = state.tokens.consume(token) else {
        return plain(StatusCode::NOT_FOUND, "token not found, used or expired");
    };
    match (kind, pending) {
        ("exec", PendingRequest::Exec(r)) => remote_command(state, req, Command::Exec(r)),
        ("attach", PendingRequest::Attach(r)) => remote_command(state, req, Command::Attach(r)),
        ("portforward", PendingRequest::PortForward(r)) => port_forward(state, req, r),
        _ => plain(StatusCode::NOT_FOUND, "token not found, used or expired"),
    }
}

/// Whether a comma-separated header contains `token` (case-insensitive).
fn has_token(h: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

fn upgrade_to(h: &HeaderMap, proto: &str) -> bool {
    has_token(h, header::CONNECTION, "upgrade") && has_token(h, header::UPGRADE, proto)
}

/// All values of a header, each split on commas.
fn list(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// The client's first offered subprotocol the server supports (`""` when none was offered
/// and `""` is allowed), as Go's wsstream picks it.
/// Why a request cannot be upgraded: the status and message the client gets.
type Refusal = (StatusCode, String);

fn refuse((status, msg): Refusal) -> Resp {
    plain(status, msg)
}

fn pick_ws_protocol(h: &HeaderMap, allowed: &[&'static str]) -> Result<&'static str, Refusal> {
    let offered = list(h, "sec-websocket-protocol");
    let offered = if offered.is_empty() {
        vec![String::new()]
    } else {
        offered
    };
    offered
        .iter()
        .find_map(|o| allowed.iter().find(|a| **a == o.as_str()).copied())
        .ok_or_else(|| {
            (
                StatusCode::FORBIDDEN,
                format!(
                    "requested protocol(s) are not supported: {offered:?}; supports {allowed:?}"
                ),
            )
        })
}

/// The 101 answer to a WebSocket handshake, or why it is not one.
fn ws_switch(h: &HeaderMap, protocol: &str) -> Result<Resp, Refusal> {
    let bad = |m: &str| (StatusCode::BAD_REQUEST, m.to_string());
    let version = h.get("sec-websocket-version").and_then(|v| v.to_str().ok());
    if version != Some("13") {
        return Err(bad("Sec-WebSocket-Version must be 13"));
    }
    let Some(key) = h.get("sec-websocket-key") else {
        return Err(bad("Sec-WebSocket-Key is required"));
    };
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = r.headers_mut();
    hs.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    hs.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let accept = derive_accept_key(key.as_bytes());
    hs.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&accept).map_err(|_| bad("bad Sec-WebSocket-Key"))?,
    );
    if !protocol.is_empty() {
        hs.insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(protocol).map_err(|_| bad("bad Sec-WebSocket-Protocol"))?,
        );
    }
    Ok(r)
}

fn spdy_switch(version: &str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = r.headers_mut();
    hs.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    hs.insert(header::UPGRADE, HeaderValue::from_static(SPDY_UPGRADE));
    if let Ok(v) = HeaderValue::from_str(version) {
        hs.insert(HEADER_PROTOCOL_VERSION, v);
    }
    r
}

pub(crate) fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

/// Runs `session` on the upgraded connection once hyper has sent the 101, as a tracked task
/// that crispd's shutdown drops.
fn spawn_session<F, Fut>(state: &Arc<State>, kind: Kind, req: &mut Request<Incoming>, session: F)
where
    F: FnOnce(TokioIo<Upgraded>, SessionCtx) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let on_upgrade = hyper::upgrade::on(req);
    let ctx = SessionCtx::new(state);
    let metrics = state.metrics.clone();
    state.tasks.spawn(async move {
        let upgraded = tokio::select! {
            u = on_upgrade => u,
            _ = ctx.shutdown.cancelled() => return,
        };
        let io = match upgraded {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let _open = OpenSession::new(metrics, kind);
        let shutdown = ctx.shutdown.clone();
        tokio::select! {
            _ = session(io, ctx) => {}
            _ = shutdown.cancelled() => {}
        }
    });
}

async fn websocket(io: TokioIo<Upgraded>) -> WebSocketStream<TokioIo<Upgraded>> {
    WebSocketStream::from_raw_socket(io, WsRole::Server, Some(ws_config())).await
}

fn spdy_conn(io: TokioIo<Upgraded>, ctx: &SessionCtx) -> Connection {
    let mut cfg = ConnConfig::new(Role::Server);
    cfg.counters = ctx.counters.clone();
    Connection::new(io, cfg)
}

fn remote_command(state: Arc<State>, mut req: Request<Incoming>, cmd: Command) -> Resp {
    let kind = match cmd {
        Command::Exec(_) => Kind::Exec,
        Command::Attach(_) => Kind::Attach,
    };
    let h = req.headers();
    if upgrade_to(h, "websocket") {
        let protocol = match pick_ws_protocol(h, &EXEC_WS_PROTOCOLS) {
            Ok(p) => p,
            Err(r) => return refuse(r),
        };
        let resp = match ws_switch(h, protocol) {
            Ok(r) => r,
            Err(r) => return refuse(r),
        };
        spawn_session(&state, kind, &mut req, move |io, ctx| async move {
            let ws = websocket(io).await;
            remotecommand::ws::serve(ctx, ws, protocol, cmd).await
        });
        return resp;
    }
    if !upgrade_to(h, SPDY_UPGRADE) {
        return plain(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: missing upgrade headers in request",
        );
    }
    let offers = list(h, HEADER_PROTOCOL_VERSION);
    if offers.is_empty() {
        return plain(
            StatusCode::BAD_REQUEST,
            format!("unable to upgrade: {HEADER_PROTOCOL_VERSION} is required"),
        );
    }
    let Some((name, version)) = remotecommand::negotiate_spdy(&offers) else {
        let mut r = plain(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offers:?}, server accepts {:?}",
                remotecommand::SPDY_ACCEPTED
            ),
        );
        for v in remotecommand::SPDY_ACCEPTED {
            r.headers_mut()
                .append(HEADER_ACCEPTED_VERSIONS, HeaderValue::from_static(v));
        }
        return r;
    };
    spawn_session(&state, kind, &mut req, move |io, ctx| async move {
        let conn = spdy_conn(io, &ctx);
        remotecommand::spdy::serve(ctx, conn, version, cmd).await
    });
    spdy_switch(name)
}

fn port_forward(state: Arc<State>, mut req: Request<Incoming>, pf: PortForwardRequest) -> Resp {
    let h = req.headers();
    if upgrade_to(h, "websocket") {
        let protocol = match pick_ws_protocol(h, &PORT_FORWARD_WS_PROTOCOLS) {
            Ok(p) => p,
            Err(r) => return refuse(r),
        };
        if protocol == ws::SPDY_TUNNEL {
            let resp = match ws_switch(h, protocol) {
                Ok(r) => r,
                Err(r) => return refuse(r),
            };
            spawn_session(
                &state,
                Kind::PortForward,
                &mut req,
                move |io, ctx| async move {
                    let ws = websocket(io).await;
                    let mut cfg = ConnConfig::new(Role::Server);
                    cfg.counters = ctx.counters.clone();
                    let conn = Connection::new(ws::tunnel::WsIo::new(ws), cfg);
                    portforward::spdy::serve(ctx, conn, pf).await
                },
            );
            return resp;
        }
        let ports = match portforward::ws::query_ports(req.uri().query().unwrap_or("")) {
            Ok(p) => p,
            Err(e) => return plain(StatusCode::BAD_REQUEST, e),
        };
        let resp = match ws_switch(h, protocol) {
            Ok(r) => r,
            Err(r) => return refuse(r),
        };
        let codec = if protocol == ws::V4_BASE64 {
            ws::Codec::Base64
        } else {
            ws::Codec::Binary
        };
        spawn_session(
            &state,
            Kind::PortForward,
            &mut req,
            move |io, ctx| async move {
                let ws = websocket(io).await;
                portforward::ws::serve(ctx, ws, codec, ports, pf).await
            },
        );
        return resp;
    }
    if !upgrade_to(h, SPDY_UPGRADE) {
        return plain(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: missing upgrade headers in request",
        );
    }
    let offers = list(h, HEADER_PROTOCOL_VERSION);
    if !offers.iter().any(|o| o == PORT_FORWARD_PROTOCOL) {
        let mut r = plain(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offers:?}, server accepts [\"{PORT_FORWARD_PROTOCOL}\"]"
            ),
        );
        r.headers_mut().append(
            HEADER_ACCEPTED_VERSIONS,
            HeaderValue::from_static(PORT_FORWARD_PROTOCOL),
        );
        return r;
    }
    spawn_session(
        &state,
        Kind::PortForward,
        &mut req,
        move |io, ctx| async move {
            let conn = spdy_conn(io, &ctx);
            portforward::spdy::serve(ctx, conn, pf).await
        },
    );
    spdy_switch(PORT_FORWARD_PROTOCOL)
}
