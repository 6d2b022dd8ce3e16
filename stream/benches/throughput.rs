//! Figures for the streaming protocols alone (no runtime): exec round trip and stdout /
//! port-forward throughput over loopback, against a backend that produces bytes from memory.
//! `cargo bench -p crisp-stream --bench throughput` (add `--profile dev` to skip a release
//! build). crispd's own benchmark compares the whole path against containerd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crisp_stream::client::{self, Outcome, SpdyPortForward};
use crisp_stream::{
    AttachRequest, Backend, BackendError, ExecRequest, PortForwardRequest, StreamConfig,
    StreamServer, Streams,
};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1 << 20;

struct Source {
    /// A TCP server in "the pod" that sends `n` bytes to whoever connects.
    tcp: std::net::SocketAddr,
}

#[async_trait::async_trait]
impl Backend for Source {
    async fn exec(&self, req: ExecRequest, mut s: Streams) -> Result<i32, BackendError> {
        let n: usize = req.cmd.first().and_then(|a| a.parse().ok()).unwrap_or(0);
        if let Some(w) = s.stdout.as_mut() {
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len());
                w.write_all(&chunk[..k])
                    .await
                    .map_err(|e| BackendError::Internal(e.to_string()))?;
                left -= k;
            }
        }
        Ok(0)
    }

    async fn attach(&self, _: AttachRequest, _: Streams) -> Result<(), BackendError> {
        Ok(())
    }

    async fn port_forward(&self, _: &str, _: u16) -> Result<TcpStream, BackendError> {
        TcpStream::connect(self.tcp)
            .await
            .map_err(|e| BackendError::Internal(e.to_string()))
    }
}

/// Counts what it is given.
struct Count(usize);

impl AsyncWrite for Count {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0 += b.len();
        std::task::Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

fn req(n: usize) -> ExecRequest {
    ExecRequest {
        container_id: "c".into(),
        cmd: vec![n.to_string()],
        tty: false,
        stdin: false,
        stdout: true,
        stderr: false,
    }
}

fn streams() -> Streams {
    Streams {
        stdin: None,
        stdout: Some(Box::pin(Count(0))),
        stderr: None,
        resize: None,
    }
}

fn rate(bytes: usize, d: Duration) -> String {
    format!("{:.0} MiB/s", bytes as f64 / MIB as f64 / d.as_secs_f64())
}

#[tokio::main]
async fn main() {
    let total = 256 * MIB;
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let tcp = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk = vec![b'y'; 64 * 1024];
                for _ in 0..total / chunk.len() {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let server = StreamServer::start(StreamConfig::default(), Arc::new(Source { tcp }))
        .await
        .expect("start");

    let rounds = 200;
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        let url = server.exec_url(req(3)).expect("url");
        let o = client::exec_spdy(&url, false, streams())
            .await
            .expect("exec");
        assert_eq!(o, Outcome::Exited(0));
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "exec round trip over SPDY (token, upgrade, 2 streams, status, close): p50 {:?}, p90 {:?}",
        times[rounds / 2],
        times[rounds * 9 / 10]
    );

    let t = Instant::now();
    let url = server.exec_url(req(total)).expect("url");
    client::exec_spdy(&url, false, streams())
        .await
        .expect("exec");
    println!(
        "256 MiB of stdout through one SPDY exec: {}",
        rate(total, t.elapsed())
    );

    let t = Instant::now();
    let url = server.exec_url(req(total)).expect("url");
    client::exec_ws(&url, "v5.channel.k8s.io", false, streams())
        .await
        .expect("exec");
    println!(
        "256 MiB of stdout through one WebSocket v5 exec: {}",
        rate(total, t.elapsed())
    );

    for tunnel in [false, true] {
        let url = server
            .port_forward_url(PortForwardRequest {
                pod_sandbox_id: "p".into(),
                ports: vec![],
            })
            .expect("url");
        let t = Instant::now();
        let pf = if tunnel {
            SpdyPortForward::connect_tunnel(&url).await
        } else {
            SpdyPortForward::connect(&url).await
        }
        .expect("connect");
        let mut s = pf.open(80).await.expect("open");
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        while got < total {
            let n = s.data.read(&mut buf).await.expect("read");
            assert!(n > 0, "EOF after {got} bytes");
            got += n;
        }
        let how = if tunnel {
            "SPDY-over-WebSocket tunnel"
        } else {
            "SPDY"
        };
        println!(
            "256 MiB through one {how} port-forward: {}",
            rate(total, t.elapsed())
        );
    }
    server.shutdown().await;
}
