//! What a streaming session asks of the runtime. crispd implements [`Backend`]; the protocol
//! side (SPDY, WebSocket) only moves bytes between the client and these streams.

use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

/// A terminal size from the client's resize stream (Kubernetes' `{"Width","Height"}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermSize {
    pub width: u16,
    pub height: u16,
}

/// An exec the CRI `Exec` call validated and the client has now dialled.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub container_id: String,
    pub cmd: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// An attach to a container's own stdio, as the CRI `Attach` call validated it.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    pub container_id: String,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

pub type BoxRead = Pin<Box<dyn AsyncRead + Send>>;
pub type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

/// The client's side of a session. A stream is `Some` exactly when the client asked for it.
/// `stdin` reaching EOF means the client closed its stdin (v5 CLOSE, SPDY FIN): the backend
/// then closes the process's stdin (CloseIO), which is what `kubectl cp` relies on.
/// A writer that blocks (client not reading) must block the process, never buffer unbounded.
pub struct Streams {
    pub stdin: Option<BoxRead>,
    pub stdout: Option<BoxWrite>,
    pub stderr: Option<BoxWrite>,
    /// Terminal sizes in order; the first may arrive before the process exists.
    pub resize: Option<mpsc::Receiver<TermSize>>,
}

/// Why a session could not run; sent to the client on the error stream.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Internal(String),
}

/// The runtime as a streaming session sees it.
///
/// Cancellation is the contract that matters: the server drops a session's future when the
/// client goes away, the idle timeout fires or crispd shuts down. Dropping an `exec` future
/// must kill and delete the exec'd process and release every fd and FIFO of the session
/// (a drop guard that hands the clean-up to a task), so no exec outlives its session.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Runs `req.cmd` in the container and returns its exit code once it has exited and all
    /// of its output has been written to `streams` (large outputs must not be truncated).
    async fn exec(&self, req: ExecRequest, streams: Streams) -> Result<i32, BackendError>;

    /// Connects `streams` to the container's own stdio until the client leaves or the
    /// container exits.
    async fn attach(&self, req: AttachRequest, streams: Streams) -> Result<(), BackendError>;

    /// A TCP connection to `port` on localhost inside the pod's network namespace (IPv4, then
    /// IPv6), also for host-network pods; nothing is exposed on the host.
    async fn port_forward(
        &self,
        pod_sandbox_id: &str,
        port: u16,
    ) -> Result<tokio::net::TcpStream, BackendError>;
}
