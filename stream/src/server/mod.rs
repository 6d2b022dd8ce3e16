//! The streaming HTTP server crispd starts: it hands out single-use URLs for validated CRI
//! requests and serves them over SPDY/3.1 or WebSocket.

mod http;
pub(crate) mod session;
pub mod token;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{AttachRequest, Backend, ExecRequest};
use crate::metrics::{Metrics, MetricsSnapshot};
use token::TokenCache;
pub use token::TokenError;

/// A port-forward the CRI `PortForward` call validated. `ports` as the request listed them:
/// when non-empty, only those ports may be forwarded; kubelet sends none and any port
/// 1..=65535 is allowed.
#[derive(Debug, Clone)]
pub struct PortForwardRequest {
    pub pod_sandbox_id: String,
    pub ports: Vec<i32>,
}

/// What a token stands for.
#[derive(Debug, Clone)]
pub enum PendingRequest {
    Exec(ExecRequest),
    Attach(AttachRequest),
    PortForward(PortForwardRequest),
}

#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Address to listen on; default 127.0.0.1.
    pub address: IpAddr,
    /// Port; 0 picks a free one at start.
    pub port: u16,
    /// A session that moves no data for this long is closed (pings do not count).
    pub idle_timeout: Duration,
    /// How long a client has to open the streams of a session (Go's default: 30 s).
    pub stream_creation_timeout: Duration,
    pub token_ttl: Duration,
    pub max_in_flight: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            idle_timeout: Duration::from_secs(4 * 3600),
            stream_creation_timeout: Duration::from_secs(30),
            token_ttl: token::DEFAULT_TTL,
            max_in_flight: token::DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub(crate) struct State {
    pub backend: Arc<dyn Backend>,
    pub config: StreamConfig,
    pub tokens: TokenCache,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

/// The running server. Dropping it does not stop it; call [`StreamServer::shutdown`].
pub struct StreamServer {
    state: Arc<State>,
    local_addr: SocketAddr,
    base_url: String,
}

impl StreamServer {
    pub async fn start(
        config: StreamConfig,
        backend: Arc<dyn Backend>,
    ) -> Result<Self, StartError> {
        let addr = SocketAddr::new(config.address, config.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| StartError::Listen { addr, source })?;
        // A wildcard address cannot be dialled; the URL names loopback of the same family.
        let url_ip = match local_addr.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let base_url = format!("http://{}", SocketAddr::new(url_ip, local_addr.port()));
        let state = Arc::new(State {
            backend,
            tokens: TokenCache::new(config.token_ttl, config.max_in_flight),
            config,
            metrics: Arc::new(Metrics::default()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        state
            .tasks
            .spawn(http::accept_loop(state.clone(), listener));
        tracing::info!(%local_addr, "streaming server listening");
        Ok(Self {
            state,
            local_addr,
            base_url,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://host:port`, what every URL starts with.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The URL a client dials for this exec (valid once, for the token TTL).
    pub fn exec_url(&self, req: ExecRequest) -> Result<String, TokenError> {
        self.url("exec", PendingRequest::Exec(req))
    }

    pub fn attach_url(&self, req: AttachRequest) -> Result<String, TokenError> {
        self.url("attach", PendingRequest::Attach(req))
    }

    pub fn port_forward_url(&self, req: PortForwardRequest) -> Result<String, TokenError> {
        self.url("portforward", PendingRequest::PortForward(req))
    }

    fn url(&self, route: &str, req: PendingRequest) -> Result<String, TokenError> {
        let token = self.state.tokens.insert(req)?;
        Ok(format!("{}/{route}/{token}", self.base_url))
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        self.state.metrics.snapshot()
    }

    /// Stops listening and drops every session's future (the backend kills each exec),
    /// then waits for all of it to finish.
    pub async fn shutdown(&self) {
        self.state.shutdown.cancel();
        self.state.tasks.close();
        self.state.tasks.wait().await;
    }
}
