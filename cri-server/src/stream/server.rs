//! The stream server's life in crispd: started in its own start-up phase from `[stream]`,
//! handing out URLs to the CRI calls, stopped (sessions dropped, their execs killed) when
//! crispd shuts down.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;

use crate::config::StreamConfig;
use crate::container::attach::Hubs;
use crate::error::{CriError, ErrorKind};
use crate::stream::{Runtime, Sessions};

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

/// Start-up phase `stream`: listen on `[stream]`'s address and port; sessions reach `rt`.
pub async fn start(c: &StreamConfig, rt: Runtime) -> anyhow::Result<Streaming> {
    let addr = c.listen_addr()?;
    let config = crisp_stream::StreamConfig {
        address: addr.ip(),
        port: addr.port(),
        idle_timeout: c.idle()?,
        tls: c
            .tls()?
            .map(|(cert, key)| crisp_stream::TlsFiles { cert, key }),
        ..Default::default()
    };
    let backend: Arc<dyn crisp_stream::Backend> = Arc::new(super::CrispBackend::new(rt));
    let server = crisp_stream::StreamServer::start(config, backend)
        .await
        .with_context(|| format!("config key `stream.address`/`stream.port` = {addr}"))?;
    Ok(Streaming { server })
}

/// Stop serving: sessions end (their execs are killed), then wait for their clean-up.
pub async fn shutdown(server: Option<&Streaming>, sessions: &Sessions) {
    if let Some(s) = server {
        s.server.shutdown().await;
    }
    if !sessions.wait_idle(SESSION_CLEANUP).await {
        tracing::warn!(
            sessions = sessions.live(),
            "streaming sessions still cleaning up at shutdown"
        );
    }
}

/// What streaming shows on crispd's metrics page, read at each scrape: cheap clones of the
/// daemon's session count, the container service's attach hubs and the server once started.
pub struct StreamGauges {
    pub sessions: Arc<Sessions>,
    pub hubs: Arc<Hubs>,
    pub server: Arc<OnceLock<Streaming>>,
}

impl crate::metrics::Gauges for StreamGauges {
    fn render(&self, out: &mut String) {
        render_metrics(self, out);
    }
}

/// Streaming's lines on crispd's metrics page: the sessions crispd runs (exec and attach,
/// including their clean-up) and attach hubs, then the stream server's own counters.
fn render_metrics(d: &StreamGauges, out: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "# HELP crisp_stream_sessions_running Exec and attach sessions running or cleaning up.\n# TYPE crisp_stream_sessions_running gauge\ncrisp_stream_sessions_running {}",
        d.sessions.live()
    );
    let _ = writeln!(
        out,
        "# HELP crisp_attach_hubs Running containers whose output attach sessions can follow.\n# TYPE crisp_attach_hubs gauge\ncrisp_attach_hubs {}",
        d.hubs.len()
    );
    let Some(s) = d.server.get() else { return };
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
