//! The stream server's life in crispd: started in its own start-up phase from `[stream]`,
//! handing out URLs to the CRI calls, stopped (sessions dropped, their execs killed) when
//! crispd shuts down.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::daemon::Daemon;
use crate::instrument::{CriError, ErrorKind};

/// How long shutdown waits for sessions' clean-up (an exec's kill, wait and delete).
const SESSION_CLEANUP: Duration = Duration::from_secs(15);

/// The running stream server.
pub struct Streaming {
    server: crisp_stream::StreamServer,
}

impl std::fmt::Debug for Streaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streaming")
            .field("addr", &self.server.local_addr())
            .finish()
    }
}

/// A full token cache: kubelet should retry later.
fn token_error(e: crisp_stream::TokenError) -> CriError {
    CriError::new(ErrorKind::ResourceExhausted, e.to_string())
}

impl Streaming {
    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.local_addr()
    }

    pub fn exec_url(&self, req: crisp_stream::ExecRequest) -> Result<String, CriError> {
        self.server.exec_url(req).map_err(token_error)
    }

    pub fn attach_url(&self, req: crisp_stream::AttachRequest) -> Result<String, CriError> {
        self.server.attach_url(req).map_err(token_error)
    }

    pub fn port_forward_url(&self, pod_id: &str, ports: &[i32]) -> Result<String, CriError> {
        self.server
            .port_forward_url(crisp_stream::PortForwardRequest {
                pod_sandbox_id: pod_id.to_string(),
                ports: ports.to_vec(),
            })
            .map_err(token_error)
    }

    pub fn metrics(&self) -> crisp_stream::MetricsSnapshot {
        self.server.metrics()
    }
}

/// Start-up phase `stream`: listen on `[stream]`'s address and port.
pub async fn start(d: &Arc<Daemon>) -> anyhow::Result<std::net::SocketAddr> {
    let c = &d.cfg.stream;
    let addr = c.listen_addr()?;
    let config = crisp_stream::StreamConfig {
        address: addr.ip(),
        port: addr.port(),
        idle_timeout: c.idle()?,
        ..Default::default()
    };
    let backend: Arc<dyn crisp_stream::Backend> = Arc::new(super::CrispBackend::new(d));
    let server = crisp_stream::StreamServer::start(config, backend)
        .await
        .with_context(|| format!("config key `stream.address`/`stream.port` = {addr}"))?;
    let local = server.local_addr();
    d.stream
        .set(Streaming { server })
        .map_err(|_| anyhow::anyhow!("stream server started twice"))?;
    Ok(local)
}

/// Stop serving: sessions end (their execs are killed), then wait for their clean-up.
pub async fn shutdown(d: &Daemon) {
    if let Some(s) = d.stream.get() {
        s.server.shutdown().await;
    }
    if !d.stream_sessions.wait_idle(SESSION_CLEANUP).await {
        tracing::warn!(
            sessions = d.stream_sessions.live(),
            "streaming sessions still cleaning up at shutdown"
        );
    }
}

/// Streaming's lines on crispd's metrics page: the sessions crispd runs (exec and attach,
/// including their clean-up) and attach hubs, then the stream server's own counters.
pub fn render_metrics(d: &Daemon, out: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "# HELP crisp_stream_sessions_running Exec and attach sessions running or cleaning up.\n# TYPE crisp_stream_sessions_running gauge\ncrisp_stream_sessions_running {}",
        d.stream_sessions.live()
    );
    let _ = writeln!(
        out,
        "# HELP crisp_attach_hubs Running containers whose output attach sessions can follow.\n# TYPE crisp_attach_hubs gauge\ncrisp_attach_hubs {}",
        d.attach.len()
    );
    let Some(s) = d.stream.get() else { return };
    let m = s.metrics();
    let _ = writeln!(
        out,
        "# HELP crisp_stream_connections_open Streaming connections the server has open.\n# TYPE crisp_stream_connections_open gauge\ncrisp_stream_connections_open {}",
        m.sessions_open
    );
    out.push_str("# HELP crisp_stream_sessions_total Streaming sessions started, by kind.\n# TYPE crisp_stream_sessions_total counter\n");
    for (kind, n) in [
        ("exec", m.exec_sessions_total),
        ("attach", m.attach_sessions_total),
        ("portforward", m.port_forward_sessions_total),
    ] {
        let _ = writeln!(out, "crisp_stream_sessions_total{{kind=\"{kind}\"}} {n}");
    }
    out.push_str("# HELP crisp_stream_bytes_total Payload bytes moved by streaming sessions.\n# TYPE crisp_stream_bytes_total counter\n");
    let _ = writeln!(
        out,
        "crisp_stream_bytes_total{{direction=\"in\"}} {}",
        m.bytes_in
    );
    let _ = writeln!(
        out,
        "crisp_stream_bytes_total{{direction=\"out\"}} {}",
        m.bytes_out
    );
}
