//! The whole server over real TCP on 127.0.0.1, driven by this crate's client, against a
//! scripted fake backend (the real one, exec through the shim, lives in crispd and has its
//! own end-to-end tests). Every protocol: SPDY (v1–v5 offers), WebSocket (v5, v4, base64,
//! channel.k8s.io), the SPDY-over-WebSocket tunnel, and WebSocket port-forward.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use crisp_stream::backend::{BoxRead, BoxWrite};
use crisp_stream::client::{
    self, ClientError, Outcome, PortForwardStream, SpdyPortForward, WsPortForward,
};
use crisp_stream::spdy::{ConnConfig, Connection, Frame, FrameDecoder, Role};
use crisp_stream::{
    AttachRequest, Backend, BackendError, ExecRequest, PortForwardRequest, StreamConfig,
    StreamServer, Streams, TermSize, TokenError,
};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

// ---------------------------------------------------------------------------------------
// The fake backend: commands are a tiny script language.

#[derive(Default)]
struct Counters {
    started: AtomicUsize,
    /// Sessions whose future was dropped before it finished (the cancellation contract).
    cancelled: AtomicUsize,
    finished: AtomicUsize,
}

struct Guard {
    c: Arc<Counters>,
    done: bool,
}

impl Guard {
    fn new(c: &Arc<Counters>) -> Self {
        c.started.fetch_add(1, Ordering::SeqCst);
        Self {
            c: c.clone(),
            done: false,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let counter = if self.done {
            &self.c.finished
        } else {
            &self.c.cancelled
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

struct Fake {
    c: Arc<Counters>,
    /// Where "port 80" in the pod leads: a local echo server.
    echo: std::net::SocketAddr,
}

async fn out(streams: &mut Streams, data: &[u8]) {
    if let Some(w) = streams.stdout.as_mut() {
        w.write_all(data).await.expect("stdout");
    }
}

#[async_trait::async_trait]
impl Backend for Fake {
    async fn exec(&self, req: ExecRequest, mut s: Streams) -> Result<i32, BackendError> {
        let mut guard = Guard::new(&self.c);
        let args: Vec<&str> = req.cmd.iter().map(String::as_str).collect();
        let code = match args.as_slice() {
            ["echo", rest @ ..] => {
                out(&mut s, format!("{}\n", rest.join(" ")).as_bytes()).await;
                0
            }
            ["stderr", msg] => {
                let w = s.stderr.as_mut().expect("stderr requested");
                w.write_all(msg.as_bytes()).await.expect("stderr");
                0
            }
            ["cat"] => {
                let mut r = s.stdin.take().expect("stdin");
                let mut w = s.stdout.take().expect("stdout");
                tokio::io::copy(&mut r, &mut w).await.expect("copy");
                0
            }
            ["count-stdin"] => {
                let mut r = s.stdin.take().expect("stdin");
                let mut all = Vec::new();
                r.read_to_end(&mut all).await.expect("stdin");
                out(&mut s, format!("{} bytes\n", all.len()).as_bytes()).await;
                0
            }
            ["big", n] => {
                let n: usize = n.parse().expect("size");
                for start in (0..n).step_by(64 * 1024) {
                    let chunk: Vec<u8> = (start..n.min(start + 64 * 1024))
                        .map(|i| (i % 251) as u8)
                        .collect();
                    out(&mut s, &chunk).await;
                }
                0
            }
            ["sizes", n] => {
                let n: usize = n.parse().expect("count");
                let mut rx = s.resize.take().expect("resize");
                for _ in 0..n {
                    let TermSize { width, height } = rx.recv().await.expect("a size");
                    out(&mut s, format!("{width}x{height}\n").as_bytes()).await;
                }
                0
            }
            ["exit", code] => code.parse().expect("code"),
            ["sleep"] => std::future::pending().await,
            ["missing"] => return Err(BackendError::NotFound("container \"c1\" not found".into())),
            other => panic!("fake backend: unknown command {other:?}"),
        };
        guard.done = true;
        Ok(code)
    }

    async fn attach(&self, req: AttachRequest, mut s: Streams) -> Result<(), BackendError> {
        let mut guard = Guard::new(&self.c);
        assert_eq!(req.container_id, "c1");
        out(&mut s, b"attached\n").await;
        if let (Some(mut r), Some(mut w)) = (s.stdin.take(), s.stdout.take()) {
            tokio::io::copy(&mut r, &mut w).await.expect("copy");
        }
        guard.done = true;
        Ok(())
    }

    async fn port_forward(&self, pod: &str, port: u16) -> Result<TcpStream, BackendError> {
        assert_eq!(pod, "pod1");
        match port {
            80 => TcpStream::connect(self.echo)
                .await
                .map_err(|e| BackendError::Internal(e.to_string())),
            _ => Err(BackendError::FailedPrecondition(format!(
                "dial tcp 127.0.0.1:{port}: connection refused"
            ))),
        }
    }
}

async fn echo_server() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

struct Env {
    server: StreamServer,
    c: Arc<Counters>,
}

async fn env_with(cfg: StreamConfig) -> Env {
    let c = Arc::new(Counters::default());
    let backend = Arc::new(Fake {
        c: c.clone(),
        echo: echo_server().await,
    });
    let server = StreamServer::start(cfg, backend).await.expect("start");
    Env { server, c }
}

async fn env() -> Env {
    env_with(StreamConfig::default()).await
}

fn exec(cmd: &[&str], stdin: bool, stdout: bool, stderr: bool, tty: bool) -> ExecRequest {
    ExecRequest {
        container_id: "c1".into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
        stdout,
        stderr,
    }
}

/// An AsyncWrite collecting into a shared buffer.
#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Buf {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut self.0.lock().expect("lock"))
    }
}

impl AsyncWrite for Buf {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.0.lock().expect("lock").extend_from_slice(b);
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn io(stdin: Option<Vec<u8>>, stdout: Option<&Buf>, stderr: Option<&Buf>) -> Streams {
    Streams {
        stdin: stdin.map(|d| Box::pin(io::Cursor::new(d)) as BoxRead),
        stdout: stdout.map(|b| Box::pin(b.clone()) as BoxWrite),
        stderr: stderr.map(|b| Box::pin(b.clone()) as BoxWrite),
        resize: None,
    }
}

fn pattern(n: usize) -> Vec<u8> {
    let mut x = 0x1234_5678u32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within 5 s: {what}");
}

const WS_PROTOCOLS: [&str; 5] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];

// ---------------------------------------------------------------------------------------
// Exec over SPDY.

#[tokio::test]
async fn spdy_exec_echo_negotiates_v4() {
    let e = env().await;
    let url = e
        .server
        .exec_url(exec(&["echo", "hello"], false, true, false, false))
        .expect("url");
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let o = Buf::default();
    let (version, outcome) = client::exec_spdy_offering(
        &url,
        &client::exec::SPDY_OFFER,
        false,
        io(None, Some(&o), None),
    )
    .await
    .expect("exec");
    assert_eq!(version, "v4.channel.k8s.io");
    assert_eq!(outcome, Outcome::Exited(0));
    assert_eq!(o.take(), b"hello\n");
}

#[tokio::test]
async fn spdy_stdin_to_stdout_10_mib_is_byte_identical() {
    let e = env().await;
    let data = pattern(10 << 20);
    let url = e
        .server
        .exec_url(exec(&["cat"], true, true, false, false))
        .expect("url");
    let o = Buf::default();
    let outcome = client::exec_spdy(&url, false, io(Some(data.clone()), Some(&o), None))
        .await
        .expect("exec");
    assert_eq!(outcome, Outcome::Exited(0));
    let got = o.take();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "stdout differs from stdin");
    let m = e.server.metrics();
    assert!(m.bytes_in >= 10 << 20 && m.bytes_out >= 10 << 20, "{m:?}");
}

#[tokio::test]
async fn spdy_stdin_eof_reaches_the_process() {
    let e = env().await;
    let url = e
        .server
        .exec_url(exec(&["count-stdin"], true, true, false, false))
        .expect("url");
    let o = Buf::default();
    let outcome = client::exec_spdy(&url, false, io(Some(vec![7; 12345]), Some(&o), None))
        .await
        .expect("exec");
    assert_eq!(outcome, Outcome::Exited(0));
    assert_eq!(o.take(), b"12345 bytes\n");
}

#[tokio::test]
async fn spdy_exit_code_3_is_non_zero_exit_code_status() {
    let e = env().await;
    let url = e
        .server
        .exec_url(exec(&["exit", "3"], false, true, true, false))
        .expect("url");
    let (o, er) = (Buf::default(), Buf::default());
    let outcome = client::exec_spdy(&url, false, io(None, Some(&o), Some(&er)))
        .await
        .expect("exec");
    assert_eq!(outcome, Outcome::Exited(3));
}

#[tokio::test]
async fn spdy_stderr_is_its_own_stream() {
    let e = env().await;
    let url = e
        .server
        .exec_url(exec(&["stderr", "oops"], false, true, true, false))
        .expect("url");
    let (o, er) = (Buf::default(), Buf::default());
    let outcome = client::exec_spdy(&url, false, io(None, Some(&o), Some(&er)))
        .await
        .expect("exec");
    assert_eq!(outcome, Outcome::Exited(0));
    assert_eq!(er.take(), b"oops");
    assert!(o.take().is_empty());
}

#[tokio::test]
async fn spdy_v5_only_offer_is_served_as_v4_and_v3_reports_failure_as_text() {
    let e = env().await;
    let url = e
        .server
        .exec_url(exec(&["exit", "3"], false, true, false, false))
        .expect("url");
    let o = Buf::default();
    let (v, outcome) = client::exec_spdy_offering(
        &url,
        &["v5.channel.k8s.io"],
        false,
        io(None, Some(&o), None),
    )
    .await
    .expect("v5");
    assert_eq!(
        (v.as_str(), outcome),
        ("v5.channel.k8s.io", Outcome::Exited(3))
    );

    let url = e
        .server
        .exec_url(exec(&["exit", "3"], false, true, false, false))
        .expect("url");
    let (v, outcome) = client::exec_spdy_offering(
        &url,
        &["v3.channel.k8s.io"],
        false,
        io(None, Some(&o), None),
    )
    .await
    .expect("v3");
    assert_eq!(v, "v3.channel.k8s.io");
    match outcome {
        Outcome::Failed(m) => assert!(m.contains("non-zero exit code"), "{m}"),
        other => panic!("v3 has no exit codes: {other:?}"),
    }
}

#[tokio::test]
async fn spdy_unacceptable_versions_get_403_with_the_accepted_list() {
    let e = env().await;
    let url = e
        .server
        .exec_url(exec(&["echo"], false, true, false, false))
        .expect("url");
    let err = client::exec_spdy_offering(&url, &["v9.channel.k8s.io"], false, io(None, None, None))
        .await
        .expect_err("refused");
    let ClientError::Http {
        status, headers, ..
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(*status, 403);
    let accepted: Vec<&str> = headers
        .iter()
        .filter(|(k, _)| k == "x-accepted-stream-protocol-versions")
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(accepted.contains(&"v4.channel.k8s.io"), "{accepted:?}");
    assert_eq!(
        e.c.started.load(Ordering::SeqCst),
        0,
        "the backend never ran"
    );
}

#[tokio::test]
async fn spdy_resize_reaches_the_backend_in_order() {
    let e = env().await;
    let url = e
        .server
        .exec_url(exec(&["sizes", "2"], true, true, false, true))
        .expect("url");
    let o = Buf::default();
    let (tx, rx) = mpsc::channel(4);
    tx.send(TermSize {
        width: 80,
        height: 24,
    })
    .await
    .expect("send");
    tx.send(TermSize {
        width: 132,
        height: 43,
    })
    .await
    .expect("send");
    let mut s = io(None, Some(&o), None);
    // A terminal's stdin stays open while the sizes flow.
    let (_keep, stdin) = tokio::io::duplex(64);
    s.stdin = Some(Box::pin(stdin));
    s.resize = Some(rx);
    let outcome = client::exec_spdy(&url, true, s).await.expect("exec");
    assert_eq!(outcome, Outcome::Exited(0));
    assert_eq!(o.take(), b"80x24\n132x43\n");
}

#[tokio::test]
async fn spdy_100_concurrent_sessions_each_get_their_own_bytes() {
    let e = Arc::new(env().await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let e = e.clone();
        tasks.spawn(async move {
            let n = 64 * 1024 + i;
            let url = e
                .server
                .exec_url(exec(&["big", &n.to_string()], false, true, false, false))
                .expect("url");
            let o = Buf::default();
            let outcome = client::exec_spdy(&url, false, io(None, Some(&o), None))
                .await
                .expect("exec");
            assert_eq!(outcome, Outcome::Exited(0));
            let want: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            assert!(o.take() == want, "session {i} got other bytes");
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("session");
    }
    let m = e.server.metrics();
    assert_eq!(m.exec_sessions_total, 100);
    eventually("all sessions closed", || {
        e.server.metrics().sessions_open == 0
    })
    .await;
}

#[tokio::test]
async fn spdy_client_disconnect_drops_the_backend_future() {
    let e = env().await;
    let url = e
        .server
        .exec_url(exec(&["sleep"], true, true, false, false))
        .expect("url");
    let (_keep, stdin) = tokio::io::duplex(64);
    let s = Streams {
        stdin: Some(Box::pin(stdin)),
        stdout: Some(Box::pin(Buf::default())),
        stderr: None,
        resize: None,
    };
    let session = tokio::spawn(async move { client::exec_spdy(&url, false, s).await });
    eventually("exec started", || e.c.started.load(Ordering::SeqCst) == 1).await;
    assert_eq!(e.server.metrics().sessions_open, 1);
    session.abort();
    eventually("backend future dropped", || {
        e.c.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
    eventually("session closed", || e.server.metrics().sessions_open == 0).await;
}

#[tokio::test]
async fn spdy_idle_timeout_fires_although_the_client_pings() {
    let e = env_with(StreamConfig {
        idle_timeout: Duration::from_millis(800),
        ..StreamConfig::default()
    })
    .await;
    let url = e
        .server
        .exec_url(exec(&["sleep"], false, true, false, false))
        .expect("url");
    let (tcp, v) = client::upgrade::spdy(&url, &["v4.channel.k8s.io"])
        .await
        .expect("upgrade");
    assert_eq!(v.as_deref(), Some("v4.channel.k8s.io"));
    let conn = Connection::new(tcp, ConnConfig::new(Role::Client));
    let h = |t: &str| crisp_stream::spdy::Headers::new().with("streamType", t);
    let _err = conn.open_stream(h("error")).await.expect("error stream");
    let _out = conn.open_stream(h("stdout")).await.expect("stdout stream");
    eventually("exec started", || e.c.started.load(Ordering::SeqCst) == 1).await;
    let start = std::time::Instant::now();
    while !conn.is_closed() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "idle session never closed"
        );
        let _ = conn.ping().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(700),
        "closed too early: {:?}",
        start.elapsed()
    );
    eventually("backend future dropped", || {
        e.c.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
}

/// A client that stops reading stdout stalls the process: the server holds a bounded
/// amount (queues and socket buffers), never the whole output.
#[tokio::test]
async fn spdy_client_that_stops_reading_blocks_the_producer() {
    let e = env().await;
    let url = e
        .server
        .exec_url(exec(&["big", "268435456"], false, true, false, false))
        .expect("url");
    let (tcp, _) = client::upgrade::spdy(&url, &["v4.channel.k8s.io"])
        .await
        .expect("upgrade");
    let conn = Connection::new(tcp, ConnConfig::new(Role::Client));
    let h = |t: &str| crisp_stream::spdy::Headers::new().with("streamType", t);
    let _err = conn.open_stream(h("error")).await.expect("error stream");
    let _unread_stdout = conn.open_stream(h("stdout")).await.expect("stdout stream");
    eventually("exec started", || e.c.started.load(Ordering::SeqCst) == 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled = e.server.metrics().bytes_out;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = e.server.metrics().bytes_out;
    assert_eq!(
        stalled, later,
        "output kept flowing to a client that does not read"
    );
    assert!(
        stalled < 32 << 20,
        "{stalled} of 256 MiB buffered for a client that does not read"
    );
    assert_eq!(
        e.c.finished.load(Ordering::SeqCst),
        0,
        "the producer was never blocked"
    );
}

#[tokio::test]
async fn spdy_backend_error_is_a_failure_status() {
    let e = env().await;
    let url = e
        .server
        .exec_url(exec(&["missing"], false, true, false, false))
        .expect("url");
    let outcome = client::exec_spdy(&url, false, io(None, Some(&Buf::default()), None))
        .await
        .expect("exec");
    match outcome {
        Outcome::Failed(m) => assert!(m.contains("c1") && m.contains("not found"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn spdy_attach_connects_stdin_and_stdout() {
    let e = env().await;
    let req = AttachRequest {
        container_id: "c1".into(),
        tty: false,
        stdin: true,
        stdout: true,
        stderr: false,
    };
    let url = e.server.attach_url(req).expect("url");
    assert!(url.contains("/attach/"));
    let o = Buf::default();
    let outcome = client::exec_spdy(&url, false, io(Some(b"typed\n".to_vec()), Some(&o), None))
        .await
        .expect("attach");
    assert_eq!(outcome, Outcome::Exited(0));
    assert_eq!(o.take(), b"attached\ntyped\n");
    assert_eq!(e.server.metrics().attach_sessions_total, 1);
}

/// Garbage after the upgrade: GOAWAY(PROTOCOL_ERROR), the connection closes, nothing runs.
#[tokio::test]
async fn spdy_malformed_frames_get_goaway_and_close() {
    let e = env().await;
    let cases: [(&str, Vec<u8>); 3] = [
        (
            "SPDY/2 frame",
            vec![0x80, 2, 0, 1, 0, 0, 0, 10, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        ),
        ("block without the dictionary", {
            // {streamtype: stdin} deflated by C zlib without the SPDY/3 dictionary.
            let hex = "78da62606060646060e02a2e294a4dcc2da92c4805f2588b4b5232f300000000ffff";
            let block: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect();
            let mut f = vec![0x80, 3, 0, 1, 0, 0, 0, (10 + block.len()) as u8];
            f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
            f.extend_from_slice(&block);
            f
        }),
        (
            "control frame claiming 16 MiB",
            vec![0x80, 3, 0, 1, 0, 0xff, 0xff, 0xff],
        ),
    ];
    for (name, bytes) in cases {
        let url = e
            .server
            .exec_url(exec(&["echo"], false, true, false, false))
            .expect("url");
        let (tcp, _) = client::upgrade::spdy(&url, &["v4.channel.k8s.io"])
            .await
            .expect("upgrade");
        let (r, mut w) = tcp.into_split();
        w.write_all(&bytes).await.expect("write");
        let mut frames = FramedRead::new(r, FrameDecoder::new());
        let first = tokio::time::timeout(Duration::from_secs(5), frames.next())
            .await
            .unwrap_or_else(|_| panic!("{name}: no answer"));
        match first {
            Some(Ok(Frame::GoAway { status, .. })) => assert_eq!(status, 1, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
        let end = tokio::time::timeout(Duration::from_secs(10), frames.next())
            .await
            .unwrap_or_else(|_| panic!("{name}: not closed"));
        assert!(
            end.is_none() || matches!(end, Some(Err(_))),
            "{name}: {end:?}"
        );
    }
    eventually("sessions closed", || e.server.metrics().sessions_open == 0).await;
    assert_eq!(e.c.started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn shutdown_drops_every_session() {
    let e = env().await;
    let url = e
        .server
        .exec_url(exec(&["sleep"], false, true, false, false))
        .expect("url");
    let s = io(None, Some(&Buf::default()), None);
    let _session = tokio::spawn(async move { client::exec_spdy(&url, false, s).await });
    eventually("exec started", || e.c.started.load(Ordering::SeqCst) == 1).await;
    tokio::time::timeout(Duration::from_secs(10), e.server.shutdown())
        .await
        .expect("shutdown finishes");
    assert_eq!(e.c.cancelled.load(Ordering::SeqCst), 1);
    assert_eq!(e.server.metrics().sessions_open, 0);
}

// ---------------------------------------------------------------------------------------
// Tokens.

#[tokio::test]
async fn tokens_are_single_use_expire_and_are_limited() {
    let e = env_with(StreamConfig {
        token_ttl: Duration::from_millis(300),
        ..StreamConfig::default()
    })
    .await;
    let url = e
        .server
        .exec_url(exec(&["echo", "x"], false, true, false, false))
        .expect("url");
    let outcome = client::exec_spdy(&url, false, io(None, Some(&Buf::default()), None))
        .await
        .expect("first use");
    assert_eq!(outcome, Outcome::Exited(0));
    let again = client::exec_spdy(&url, false, io(None, Some(&Buf::default()), None))
        .await
        .expect_err("reuse");
    assert_eq!(again.http_status(), Some(404), "{again}");

    let stale = e
        .server
        .exec_url(exec(&["echo"], false, true, false, false))
        .expect("url");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let err = client::exec_spdy(&stale, false, io(None, Some(&Buf::default()), None))
        .await
        .expect_err("expired");
    assert_eq!(err.http_status(), Some(404));

    // The exec token does not open an attach or port-forward.
    let t = e
        .server
        .exec_url(exec(&["echo"], false, true, false, false))
        .expect("url");
    let as_pf = t.replace("/exec/", "/portforward/");
    let err = SpdyPortForward::connect(&as_pf)
        .await
        .err()
        .expect("wrong route");
    assert_eq!(err.http_status(), Some(404));

    let url = format!("{}/exec/not-a-token", e.server.base_url());
    let err = client::exec_spdy(&url, false, io(None, None, None))
        .await
        .expect_err("unknown");
    assert_eq!(err.http_status(), Some(404));
}

#[tokio::test]
async fn the_1001st_outstanding_token_is_refused() {
    let e = env().await;
    for i in 0..1000 {
        e.server
            .exec_url(exec(&["echo"], false, true, false, false))
            .unwrap_or_else(|err| panic!("token {i}: {err}"));
    }
    let err = e
        .server
        .exec_url(exec(&["echo"], false, true, false, false))
        .expect_err("limit");
    assert_eq!(err, TokenError::TooManyInFlight(1000));
    let err = e
        .server
        .port_forward_url(PortForwardRequest {
            pod_sandbox_id: "pod1".into(),
            ports: vec![],
        })
        .expect_err("limit applies to every kind");
    assert!(err.to_string().contains("1000"));
}

// ---------------------------------------------------------------------------------------
// Exec over WebSocket.

#[tokio::test]
async fn ws_every_protocol_runs_echo_and_reports_exit_codes_its_way() {
    let e = env().await;
    for p in WS_PROTOCOLS {
        let url = e
            .server
            .exec_url(exec(&["echo", "hi", p], false, true, false, false))
            .expect("url");
        let o = Buf::default();
        let outcome = client::exec_ws(&url, p, false, io(None, Some(&o), None))
            .await
            .expect(p);
        assert_eq!(outcome, Outcome::Exited(0), "{p}");
        assert_eq!(o.take(), format!("hi {p}\n").into_bytes(), "{p}");

        let url = e
            .server
            .exec_url(exec(&["exit", "3"], false, true, false, false))
            .expect("url");
        let outcome = client::exec_ws(&url, p, false, io(None, Some(&o), None))
            .await
            .expect(p);
        if p.starts_with("v4.") || p.starts_with("v5.") {
            assert_eq!(outcome, Outcome::Exited(3), "{p}");
        } else {
            assert!(
                matches!(&outcome, Outcome::Failed(m) if m.contains("non-zero")),
                "{p}: {outcome:?}"
            );
        }
    }
}

#[tokio::test]
async fn ws_v5_close_signal_is_stdin_eof_and_10_mib_round_trips() {
    let e = env().await;
    let url = e
        .server
        .exec_url(exec(&["count-stdin"], true, true, false, false))
        .expect("url");
    let o = Buf::default();
    let outcome = client::exec_ws(
        &url,
        "v5.channel.k8s.io",
        false,
        io(Some(vec![1; 4242]), Some(&o), None),
    )
    .await
    .expect("exec");
    assert_eq!(outcome, Outcome::Exited(0));
    assert_eq!(o.take(), b"4242 bytes\n");

    let data = pattern(10 << 20);
    let url = e
        .server
        .exec_url(exec(&["cat"], true, true, false, false))
        .expect("url");
    let outcome = client::exec_ws(
        &url,
        "v5.channel.k8s.io",
        false,
        io(Some(data.clone()), Some(&o), None),
    )
    .await
    .expect("exec");
    assert_eq!(outcome, Outcome::Exited(0));
    assert!(o.take() == data, "10 MiB differ");
}

#[tokio::test]
async fn ws_base64_carries_stdin_and_resize() {
    let e = env().await;
    let url = e
        .server
        .exec_url(exec(&["sizes", "1"], true, true, false, true))
        .expect("url");
    let o = Buf::default();
    let (tx, rx) = mpsc::channel(1);
    tx.send(TermSize {
        width: 100,
        height: 50,
    })
    .await
    .expect("send");
    let (_keep, stdin) = tokio::io::duplex(64);
    let s = Streams {
        stdin: Some(Box::pin(stdin)),
        stdout: Some(Box::pin(o.clone())),
        stderr: None,
        resize: Some(rx),
    };
    let outcome = client::exec_ws(&url, "v4.base64.channel.k8s.io", true, s)
        .await
        .expect("exec");
    assert_eq!(outcome, Outcome::Exited(0));
    assert_eq!(o.take(), b"100x50\n");
}

#[tokio::test]
async fn ws_unknown_subprotocol_gets_403() {
    let e = env().await;
    let url = e
        .server
        .exec_url(exec(&["echo"], false, true, false, false))
        .expect("url");
    let err = client::exec_ws(&url, "v9.channel.k8s.io", false, io(None, None, None))
        .await
        .expect_err("refused");
    assert_eq!(err.http_status(), Some(403), "{err}");
    assert_eq!(e.c.started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn ws_message_on_an_unknown_channel_closes_with_protocol_error() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let e = env().await;
    let url = e
        .server
        .exec_url(exec(&["sleep"], true, true, false, false))
        .expect("url");
    let (mut ws, p) = client::upgrade::websocket(&url, &["v5.channel.k8s.io"])
        .await
        .expect("ws");
    assert_eq!(p.as_deref(), Some("v5.channel.k8s.io"));
    eventually("exec started", || e.c.started.load(Ordering::SeqCst) == 1).await;
    ws.send(Message::binary(vec![9u8, 1, 2, 3]))
        .await
        .expect("send");
    let mut close = None;
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Close(f) = m {
            close = f;
            break;
        }
    }
    let f = close.expect("a close frame");
    assert_eq!(u16::from(f.code), 1002);
    assert!(f.reason.contains("channel 9"), "{}", f.reason);
    eventually("backend future dropped", || {
        e.c.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Port-forward.

async fn echo_through(s: &mut PortForwardStream, msg: &[u8]) -> Vec<u8> {
    s.data.write_all(msg).await.expect("write");
    let mut got = vec![0u8; msg.len()];
    s.data.read_exact(&mut got).await.expect("read");
    got
}

fn pf(ports: Vec<i32>) -> PortForwardRequest {
    PortForwardRequest {
        pod_sandbox_id: "pod1".into(),
        ports,
    }
}

async fn ten_parallel(session: Arc<SpdyPortForward>) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10 {
        let session = session.clone();
        tasks.spawn(async move {
            let mut s = session.open(80).await.expect("open");
            let msg = pattern(256 * 1024 + i);
            let (mut r, mut w) = tokio::io::split(s.data);
            let writer = tokio::spawn(async move {
                w.write_all(&msg).await.expect("write");
                w.shutdown().await.expect("fin");
                msg
            });
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.expect("read");
            let msg = writer.await.expect("writer");
            assert!(got == msg, "connection {i} got other bytes");
            assert_eq!(
                PortForwardStream::error_message(&mut s.error)
                    .await
                    .expect("error"),
                ""
            );
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("connection");
    }
}

#[tokio::test]
async fn spdy_port_forward_10_parallel_connections_through_one_session() {
    let e = env().await;
    let url = e.server.port_forward_url(pf(vec![])).expect("url");
    let session = Arc::new(SpdyPortForward::connect(&url).await.expect("connect"));
    ten_parallel(session).await;
    assert_eq!(e.server.metrics().port_forward_sessions_total, 1);
}

#[tokio::test]
async fn tunnel_port_forward_10_parallel_connections_through_one_session() {
    let e = env().await;
    let url = e.server.port_forward_url(pf(vec![80])).expect("url");
    let session = Arc::new(
        SpdyPortForward::connect_tunnel(&url)
            .await
            .expect("connect"),
    );
    let mut one = session.open(80).await.expect("open");
    assert_eq!(echo_through(&mut one, b"tunnel").await, b"tunnel");
    ten_parallel(session).await;
}

#[tokio::test]
async fn spdy_port_forward_bad_ports_get_an_error_on_the_error_stream() {
    let e = env().await;
    let url = e.server.port_forward_url(pf(vec![80, 81])).expect("url");
    let session = SpdyPortForward::connect(&url).await.expect("connect");
    for (port, want) in [
        ("0", "must be > 0"),
        ("70000", "70000"),
        ("http", "unable to parse"),
        ("8080", "not in the PortForward request"),
        ("81", "connection refused"),
    ] {
        let mut s = session.open_raw(port).await.expect("open");
        let msg = PortForwardStream::error_message(&mut s.error)
            .await
            .expect("error stream");
        assert!(msg.contains(want), "port {port}: {msg:?}");
        let mut rest = Vec::new();
        s.data.read_to_end(&mut rest).await.expect("data ends");
        assert!(rest.is_empty());
    }
    // The session survives bad requests.
    let mut ok = session.open(80).await.expect("open");
    assert_eq!(echo_through(&mut ok, b"still fine").await, b"still fine");
}

#[tokio::test]
async fn ws_port_forward_prefixes_ports_and_reports_errors_per_port() {
    let e = env().await;
    for protocol in ["v4.channel.k8s.io", "v4.base64.channel.k8s.io"] {
        let url = e.server.port_forward_url(pf(vec![])).expect("url");
        let url = format!("{url}?port=80&port=81");
        let mut session = WsPortForward::connect(&url, protocol, &[80, 81])
            .await
            .expect("connect");
        let mut refused = session.streams.pop().expect("81");
        let mut s = session.streams.pop().expect("80");
        s.writer.write_all(b"over websocket").await.expect("write");
        let mut got = vec![0u8; 14];
        s.reader.read_exact(&mut got).await.expect("read");
        assert_eq!(got, b"over websocket", "{protocol}");
        let mut msg = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), refused.error.read(&mut msg))
            .await
            .expect("error in time")
            .expect("error channel");
        let msg = String::from_utf8_lossy(&msg[..n]);
        assert!(msg.contains("connection refused"), "{protocol}: {msg:?}");
        drop((s, refused, session));
    }
}

#[tokio::test]
async fn ws_port_forward_without_ports_is_400() {
    let e = env().await;
    let url = e.server.port_forward_url(pf(vec![])).expect("url");
    let err = WsPortForward::connect(&url, "v4.channel.k8s.io", &[])
        .await
        .err()
        .expect("400");
    assert_eq!(err.http_status(), Some(400));
}
