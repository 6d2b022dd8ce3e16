//! Talking to a pod's shim exactly as containerd does: the shim v2 `start` protocol (run the
//! binary with `start` in the pod's bundle dir, read the ttrpc address it prints), then one
//! ttrpc connection carrying both the task service (containers) and containerd's sandbox
//! service (the pause process). [`Shims`] maps pod ids to live connections.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::sandbox_async::SandboxClient;
use containerd_shim_protos::shim_async::TaskClient;
use containerd_shim_protos::ttrpc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{ErrorKind, HasKind};
pub use crate::shim::events::ShimEvent;

/// How long `<shim> start` may take to print its address before we give up on it.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long connecting to a shim's socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("shim binary {binary} (setting `shim_binary`): {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("shim `start` for pod {pod_id} failed ({status}): {stderr}")]
    Start {
        pod_id: String,
        status: String,
        stderr: String,
    },
    #[error("shim `start` for pod {pod_id} did not finish within {secs}s")]
    StartTimeout { pod_id: String, secs: u64 },
    #[error("connecting to shim at {address}: {message}")]
    Connect { address: String, message: String },
    #[error("shim `start` for pod {pod_id}: encoding its {what}: {message}")]
    Encode {
        pod_id: String,
        what: &'static str,
        message: String,
    },
}

impl HasKind for ShimError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Spawn { .. } => ErrorKind::FailedPrecondition,
            Self::StartTimeout { .. } => ErrorKind::DeadlineExceeded,
            Self::Start { .. } => ErrorKind::Internal,
            Self::Connect { .. } => ErrorKind::Unavailable,
            Self::Encode { .. } => ErrorKind::Internal,
        }
    }
}

/// A ttrpc deadline for one call (ttrpc carries it to the server too).
pub fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX))
}

/// A connection to one pod's shim. Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct ShimClient {
    inner: Arc<Inner>,
}

struct Inner {
    address: String,
    pid: Option<u32>,
    /// Set once the connection has ended (see [`ShimClient::typed`]).
    ended: super::transport::Ended,
    task: TaskClient,
    sandbox: SandboxClient,
}

impl std::fmt::Debug for ShimClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShimClient")
            .field("address", &self.inner.address)
            .field("pid", &self.inner.pid)
            .finish()
    }
}

/// What `start` needs to know.
#[derive(Debug, Clone)]
pub struct StartRequest<'a> {
    pub shim_binary: &'a Path,
    pub pod_id: &'a str,
    /// The pod's bundle dir: the shim's cwd, where it writes `address` and `shim.pid`.
    pub bundle: &'a Path,
    /// crispd's events ttrpc socket (TTRPC_ADDRESS and `-address`).
    pub events_socket: &'a Path,
    /// Runtime options (`containerd.runc.v1.Options` as an Any), written to the shim's stdin
    /// as containerd does.
    pub options: Option<Any>,
    /// The idmapped-layer mount mode crispd resolved (`CRISP_IDMAP_MODE` for the shim), so
    /// the shim does not probe it again on its pod's first container.
    pub idmap_mode: Option<String>,
}

/// What `start` reads on its stdin: the runtime options, encoded (an error names the pod,
/// never an empty input in their place).
fn start_input(req: &StartRequest<'_>) -> Result<Vec<u8>, ShimError> {
    match &req.options {
        Some(any) => any.write_to_bytes().map_err(|e| ShimError::Encode {
            pod_id: req.pod_id.to_string(),
            what: "runtime options",
            message: e.to_string(),
        }),
        None => Ok(Vec::new()),
    }
}

impl ShimClient {
    /// Start (or find already running) the pod's shim and connect to it.
    pub async fn start(req: StartRequest<'_>) -> Result<ShimClient, ShimError> {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("crispd"));
        let events = req.events_socket.display().to_string();
        let mut cmd = tokio::process::Command::new(req.shim_binary);
        cmd.args([
            "-namespace",
            "k8s.io",
            "-address",
            &events,
            "-publish-binary",
        ])
        .arg(&exe)
        .args(["-id", req.pod_id, "start"])
        .current_dir(req.bundle)
        .env("TTRPC_ADDRESS", &events)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
        if let Some(mode) = &req.idmap_mode {
            cmd.env("CRISP_IDMAP_MODE", mode);
        }
        let input = start_input(&req)?;
        let mut child = cmd.spawn().map_err(|source| ShimError::Spawn {
            binary: req.shim_binary.to_path_buf(),
            source,
        })?;
        let mut stdin = child.stdin.take();
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let run = async {
            if let Some(mut s) = stdin.take() {
                // A shim that does not read its options is fine: ignore EPIPE.
                let _ = s.write_all(&input).await;
                drop(s);
            }
            let mut out = Vec::new();
            let mut err = Vec::new();
            let (a, b) = tokio::join!(
                async {
                    match stdout.as_mut() {
                        Some(o) => o.read_to_end(&mut out).await.map(|_| ()),
                        None => Ok(()),
                    }
                },
                async {
                    match stderr.as_mut() {
                        Some(e) => e.read_to_end(&mut err).await.map(|_| ()),
                        None => Ok(()),
                    }
                }
            );
            let _ = (a, b);
            let status = child.wait().await;
            (status, out, err)
        };
        let (status, out, err) = tokio::time::timeout(START_TIMEOUT, run)
            .await
            .map_err(|_| ShimError::StartTimeout {
                pod_id: req.pod_id.to_string(),
                secs: START_TIMEOUT.as_secs(),
            })?;
        let ok = status.as_ref().is_ok_and(|s| s.success());
        let address = String::from_utf8_lossy(&out).trim().to_string();
        if !ok || address.is_empty() {
            return Err(ShimError::Start {
                pod_id: req.pod_id.to_string(),
                status: match status {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                },
                stderr: String::from_utf8_lossy(&err).trim().to_string(),
            });
        }
        let pid = read_pid(&req.bundle.join("shim.pid"));
        Self::connect_with_pid(&address, pid).await
    }

    /// Connect to a shim already running at `address` (recovery after a crispd restart).
    pub async fn connect(address: &str) -> Result<ShimClient, ShimError> {
        Self::connect_with_pid(address, None).await
    }

    /// Connect, remembering the shim's pid when known (it is recorded for cleanup by pid).
    pub async fn connect_with_pid(
        address: &str,
        pid: Option<u32>,
    ) -> Result<ShimClient, ShimError> {
        let err = |message: String| ShimError::Connect {
            address: address.to_string(),
            message,
        };
        // A socket file nobody listens on would make ttrpc's connect fail fast; a missing
        // one too. Check first for a clearer message.
        let path = address.strip_prefix("unix://").unwrap_or(address);
        if !Path::new(path).exists() {
            return Err(err("socket does not exist".into()));
        }
        let (client, ended) = super::transport::connect(path, CONNECT_TIMEOUT)
            .await
            .map_err(err)?;
        Ok(ShimClient {
            inner: Arc::new(Inner {
                address: address.to_string(),
                pid,
                ended,
                task: TaskClient::new(client.clone()),
                sandbox: SandboxClient::new(client),
            }),
        })
    }

    pub fn address(&self) -> &str {
        &self.inner.address
    }

    pub fn task(&self) -> &TaskClient {
        &self.inner.task
    }

    pub fn sandbox(&self) -> &SandboxClient {
        &self.inner.sandbox
    }

    /// The shim server's pid, when known (from the bundle's `shim.pid` or the store).
    pub fn pid(&self) -> Option<u32> {
        self.inner.pid
    }

    /// A call's error, typed by the connection: a call that got no answer on a connection
    /// that has ended failed because the shim is gone (`RemoteClosed`), whatever text ttrpc
    /// put in its error. Every other error is returned as it is.
    pub fn typed(&self, e: ttrpc::Error) -> ttrpc::Error {
        match e {
            ttrpc::Error::RpcStatus(_) => e,
            _ if self.inner.ended.get() => ttrpc::Error::RemoteClosed,
            e => e,
        }
    }
}

/// Which of the shim's services a call went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// The sandbox service (the pause): an error that is neither an answer nor a closed
    /// connection is crispd's own failure (Internal).
    Sandbox,
    /// The task service (containers, execs): any failure to get an answer means the shim is
    /// unreachable (Unavailable), which callers treat as "the shim died".
    Task,
}

/// The one error of a call to a shim, naming the call and its object. The shim's gRPC-style
/// code is kept (its NotFound / InvalidArgument / FailedPrecondition mean the same to
/// kubelet); a broken connection is Unavailable.
#[derive(Debug)]
pub struct ShimCallError {
    /// The object and the call, e.g. `pod <id>: shim StartSandbox`.
    pub target: String,
    pub service: Service,
    pub source: ttrpc::Error,
}

impl ShimCallError {
    /// A sandbox-service call `call` for pod `pod_id`.
    pub fn sandbox(call: &str, pod_id: &str, source: ttrpc::Error) -> Self {
        Self {
            target: format!("pod {pod_id}: shim {call}"),
            service: Service::Sandbox,
            source,
        }
    }

    /// A task-service call; `target` names the call and object.
    pub fn task(target: impl Into<String>, source: ttrpc::Error) -> Self {
        Self {
            target: target.into(),
            service: Service::Task,
            source,
        }
    }

    /// The shim answered that it does not know the object.
    pub fn is_not_found(&self) -> bool {
        is_not_found(&self.source)
    }
}

impl std::fmt::Display for ShimCallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.source, self.service) {
            (ttrpc::Error::RpcStatus(s), _) => write!(f, "{}: {}", self.target, s.message()),
            (e, Service::Sandbox) => write!(f, "{}: {e}", self.target),
            (e, Service::Task) => write!(f, "{}: shim unreachable: {e}", self.target),
        }
    }
}

impl std::error::Error for ShimCallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl HasKind for ShimCallError {
    fn kind(&self) -> ErrorKind {
        match (&self.source, self.service) {
            (ttrpc::Error::RpcStatus(s), _) => status_kind(s.code()),
            (e, Service::Sandbox) if !is_gone(e) => ErrorKind::Internal,
            _ => ErrorKind::Unavailable,
        }
    }
}

/// The shim's gRPC-style status code as crispd's error kind: the one mapping every shim call
/// uses (its NotFound / InvalidArgument / FailedPrecondition mean the same to kubelet).
pub fn status_kind(code: ttrpc::Code) -> ErrorKind {
    match code {
        ttrpc::Code::NOT_FOUND => ErrorKind::NotFound,
        ttrpc::Code::INVALID_ARGUMENT => ErrorKind::InvalidArgument,
        ttrpc::Code::FAILED_PRECONDITION => ErrorKind::FailedPrecondition,
        ttrpc::Code::ALREADY_EXISTS => ErrorKind::AlreadyExists,
        ttrpc::Code::UNIMPLEMENTED => ErrorKind::Unimplemented,
        ttrpc::Code::DEADLINE_EXCEEDED => ErrorKind::DeadlineExceeded,
        ttrpc::Code::UNAVAILABLE => ErrorKind::Unavailable,
        ttrpc::Code::RESOURCE_EXHAUSTED => ErrorKind::ResourceExhausted,
        _ => ErrorKind::Internal,
    }
}

/// The connection is dead: the shim exited or was killed.
pub fn is_gone(e: &ttrpc::Error) -> bool {
    matches!(
        e,
        ttrpc::Error::RemoteClosed
            | ttrpc::Error::LocalClosed
            | ttrpc::Error::Eof
            | ttrpc::Error::Socket(_)
    )
    // ttrpc 0.10 reports a call on a connection whose reader already ended as `Others`:
    // [`ShimClient::typed`] turns that into `RemoteClosed` from the connection's state.
}

/// The shim does not know the sandbox/task (already gone: fine for idempotent teardown).
pub fn is_not_found(e: &ttrpc::Error) -> bool {
    matches!(e, ttrpc::Error::RpcStatus(s) if s.code() == ttrpc::Code::NOT_FOUND)
}

/// The pid in a `shim.pid` file, if readable.
pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Live shim connections by pod id.
#[derive(Default)]
pub struct Shims {
    map: RwLock<HashMap<String, ShimClient>>,
}

impl std::fmt::Debug for Shims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shims").field("len", &self.len()).finish()
    }
}

impl Shims {
    pub fn get(&self, pod_id: &str) -> Option<ShimClient> {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        m.get(pod_id).cloned()
    }

    pub fn insert(&self, pod_id: &str, shim: ShimClient) {
        let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
        m.insert(pod_id.to_string(), shim);
    }

    pub fn remove(&self, pod_id: &str) -> Option<ShimClient> {
        let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
        m.remove(pod_id)
    }

    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_codes_carry_over() {
        use crate::error::CriError;
        let e = CriError::from(ShimCallError::task(
            "Stats",
            ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::NOT_FOUND,
                "task c1 not found",
            )),
        ));
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(e.message, "Stats: task c1 not found");
        let e = CriError::from(ShimCallError::task(
            "Stats",
            ttrpc::Error::Socket("broken pipe".into()),
        ));
        assert_eq!(e.kind, ErrorKind::Unavailable);
        // A sandbox call's broken connection is Unavailable too; any other failure to get an
        // answer is crispd's own.
        let gone = ShimCallError::sandbox("StopSandbox", "p1", ttrpc::Error::RemoteClosed);
        assert_eq!(gone.kind(), ErrorKind::Unavailable);
        assert!(
            gone.to_string().starts_with("pod p1: shim StopSandbox: "),
            "{gone}"
        );
        let odd = ShimCallError::sandbox("StopSandbox", "p1", ttrpc::Error::Others("x".into()));
        assert_eq!(odd.kind(), ErrorKind::Internal);
    }

    /// "The shim is gone" comes from the connection, not from ttrpc's error text: on a live
    /// connection an odd error stays what it is (Internal for a sandbox call); once the shim
    /// closed its end, a call's failure is `RemoteClosed` (Unavailable).
    #[tokio::test]
    async fn a_call_on_an_ended_connection_is_typed_gone() {
        use containerd_shim_protos::sandbox_api::StopSandboxRequest;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shim.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.expect("accept");
            let _ = close_rx.await;
            drop(sock);
        });
        let shim = ShimClient::connect(&path.display().to_string())
            .await
            .expect("connect");
        let odd = shim.typed(ttrpc::Error::Others("x".into()));
        assert!(
            matches!(&odd, ttrpc::Error::Others(m) if m == "x"),
            "{odd:?}"
        );
        close_tx.send(()).expect("close");
        server.await.expect("server");
        let req = StopSandboxRequest {
            sandbox_id: "p1".into(),
            ..Default::default()
        };
        let e = shim
            .sandbox()
            .stop_sandbox(ctx(Duration::from_secs(2)), &req)
            .await
            .expect_err("the shim closed its end");
        let typed = shim.typed(e);
        assert!(is_gone(&typed), "{typed:?}");
        let e = ShimCallError::sandbox("StopSandbox", "p1", typed);
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    }

    #[test]
    fn an_unencodable_start_input_names_the_pod_and_what() {
        let e = ShimError::Encode {
            pod_id: "p1".into(),
            what: "runtime options",
            message: "message too large".into(),
        };
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert_eq!(
            e.to_string(),
            "shim `start` for pod p1: encoding its runtime options: message too large"
        );
    }

    #[test]
    fn ctx_carries_the_deadline() {
        assert_eq!(ctx(Duration::from_secs(2)).timeout_nano, 2_000_000_000);
    }

    #[tokio::test]
    async fn start_reports_a_failing_shim_with_its_stderr() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("fake-shim");
        std::fs::write(&bin, "#!/bin/sh\necho 'no sandbox for you' >&2\nexit 3\n").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let e = ShimClient::start(StartRequest {
            shim_binary: &bin,
            pod_id: "p1",
            bundle: dir.path(),
            events_socket: &dir.path().join("events.sock"),
            options: None,
            idmap_mode: None,
        })
        .await
        .expect_err("fails");
        assert!(e.to_string().contains("no sandbox for you"), "{e}");
        let e = ShimClient::connect(&dir.path().join("none.sock").display().to_string())
            .await
            .expect_err("no socket");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
    }
}
