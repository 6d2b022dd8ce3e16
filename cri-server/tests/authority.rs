//! grpc-go < 1.53 clients (kubelet/crictl/critest <= 1.27) send the unix socket *path* as
//! HTTP/2 `:authority`; h2 alone resets such streams with PROTOCOL_ERROR. These tests start
//! the real crispd and send it requests over its socket: a control with the h2 client and
//! `:authority: localhost`, then raw HTTP/2 frames carrying the exact header blocks grpc-go
//! 1.51 writes for `:authority: /run/crisp/crisp.sock` (incremental indexing, Huffman,
//! dynamic-table references in the later requests), which must all get grpc-status 0.
//! `adapter_overhead` (ignored: a measurement) prints what the adapter costs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crisp_cri::authority::{AuthorityRewriter, FixAuthority};
use crisp_proto::cri::v1 as pb;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Kills crispd when the test ends, pass or fail (by its own PID only).
struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path) -> (Daemon, PathBuf) {
    let sock = dir.join("crisp.sock");
    let cni_dir = dir.join("net.d");
    std::fs::create_dir_all(&cni_dir).expect("mkdir net.d");
    let config = dir.join("config.toml");
    // Metrics off (parallel tests), no shim needed: these tests never start a pod.
    std::fs::write(
        &config,
        "shim_binary = \"/bin/true\"\n[metrics]\naddress = \"\"\n",
    )
    .expect("write config");
    let child = Command::new(env!("CARGO_BIN_EXE_crispd"))
        .args(["--root", &dir.join("root").display().to_string()])
        .args(["--state", &dir.join("state").display().to_string()])
        .args(["--listen", &sock.display().to_string()])
        .args(["--cni-conf-dir", &cni_dir.display().to_string()])
        .args(["--cni-bin-dir", "/usr/lib/cni"])
        .args([
            "--registry-config-dir",
            &dir.join("hosts").display().to_string(),
        ])
        .args(["--runtime", "runc", "--cgroup-driver", "cgroupfs"])
        .args(["--config", &config.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn crispd");
    (Daemon(child), sock)
}

async fn wait_for_socket(sock: &Path, d: &mut Daemon) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = d.0.try_wait() {
            panic!("crispd exited early: {status}");
        }
        if UnixStream::connect(sock).await.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "crispd did not start serving");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// gRPC message framing: uncompressed flag, big-endian length, message.
fn grpc_frame(msg: &impl Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut v = vec![0u8];
    v.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes());
    v.extend_from_slice(&body);
    Bytes::from(v)
}

fn version_response(data: &[u8]) -> pb::VersionResponse {
    assert!(data.len() >= 5, "gRPC message framing: {data:?}");
    pb::VersionResponse::decode(&data[5..]).expect("VersionResponse")
}

/// One gRPC call with the h2 client: (status, response body, trailers).
async fn h2_call(
    client: &mut h2::client::SendRequest<Bytes>,
    authority: &str,
    path: &str,
    body: Bytes,
) -> anyhow::Result<(http::StatusCode, Vec<u8>, http::HeaderMap)> {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let (resp, mut send) = client.clone().ready().await?.send_request(req, false)?;
    send.send_data(body, true)?;
    let resp = resp.await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await?.unwrap_or_default();
    Ok((status, data, trailers))
}

// The header blocks grpc-go 1.51 (critest v1.26.1) writes for its first three calls on a
// connection to `/run/crisp/crisp.sock`; the rewriter's unit tests use the same file.
#[path = "common/grpc_go_blocks.rs"]
mod grpc_go_blocks;
use grpc_go_blocks::{GRPC_BLOCK_1, GRPC_BLOCK_2, GRPC_BLOCK_3};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(typ: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, typ, flags];
    v.extend_from_slice(&stream_id.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// What the server answered on one stream of the raw connection.
#[derive(Default, Debug)]
struct Answer {
    headers: Vec<(String, String)>,
    data: Vec<u8>,
    reset: Option<u32>,
    done: bool,
}

/// A hand-driven HTTP/2 client: writes our frames, reads and decodes the server's.
struct Raw {
    io: UnixStream,
    hpack: loona_hpack::Decoder<'static>,
}

impl Raw {
    async fn connect(sock: &Path) -> anyhow::Result<Raw> {
        let mut io = UnixStream::connect(sock).await?;
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(0x4, 0, 0, &[0, 2, 0, 0, 0, 0])); // SETTINGS: ENABLE_PUSH=0
        io.write_all(&hello).await?;
        Ok(Raw {
            io,
            hpack: loona_hpack::Decoder::new(),
        })
    }

    /// Send one gRPC request with the given (client-encoded) header block.
    async fn request(&mut self, stream_id: u32, block: &[u8], body: &[u8]) -> anyhow::Result<()> {
        let mut v = frame(0x1, 0x4, stream_id, block); // HEADERS, END_HEADERS
        v.extend(frame(0x0, 0x1, stream_id, body)); // DATA, END_STREAM
        self.io.write_all(&v).await?;
        Ok(())
    }

    /// Read frames until `stream_id` ends (trailers with END_STREAM, or RST_STREAM).
    async fn answer(&mut self, stream_id: u32) -> anyhow::Result<Answer> {
        let mut a = Answer::default();
        let mut block = Vec::new();
        while !a.done {
            let mut h = [0u8; 9];
            self.io.read_exact(&mut h).await?;
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            let (typ, flags) = (h[3], h[4]);
            let sid = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let mut p = vec![0u8; len];
            self.io.read_exact(&mut p).await?;
            match typ {
                0x4 if flags & 1 == 0 => self.io.write_all(&frame(0x4, 1, 0, &[])).await?,
                0x7 => anyhow::bail!("GOAWAY: {p:?}"),
                0x3 if sid == stream_id => {
                    a.reset = Some(u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
                    a.done = true;
                }
                0x0 if sid == stream_id => {
                    a.data.extend_from_slice(&p);
                    a.done = flags & 1 != 0;
                    if !p.is_empty() {
                        // Give the window back so long answers never stall.
                        let inc = u32::try_from(p.len())?.to_be_bytes();
                        let mut w = frame(0x8, 0, 0, &inc);
                        w.extend(frame(0x8, 0, stream_id, &inc));
                        self.io.write_all(&w).await?;
                    }
                }
                0x1 | 0x9 if sid == stream_id => {
                    let mut start = 0;
                    let mut end = p.len();
                    if typ == 0x1 && flags & 0x8 != 0 {
                        start = 1;
                        end -= usize::from(p[0]);
                    }
                    if typ == 0x1 && flags & 0x20 != 0 {
                        start += 5;
                    }
                    block.extend_from_slice(&p[start..end]);
                    if flags & 0x4 != 0 {
                        let hs = self
                            .hpack
                            .decode(&block)
                            .map_err(|e| anyhow::anyhow!("server hpack: {e}"))?;
                        block.clear();
                        a.headers.extend(hs.into_iter().map(|(n, v)| {
                            (
                                String::from_utf8_lossy(&n).into(),
                                String::from_utf8_lossy(&v).into(),
                            )
                        }));
                    }
                    a.done = flags & 1 != 0;
                }
                _ => {}
            }
        }
        Ok(a)
    }
}

fn header<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn path_authority_from_grpc_go_is_served() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut d, sock) = start(dir.path());
    wait_for_socket(&sock, &mut d).await;

    // Control: a well-formed authority through a real HTTP/2 client.
    let (mut client, conn) = h2::client::handshake(UnixStream::connect(&sock).await?).await?;
    tokio::spawn(conn);
    let (status, data, trailers) = h2_call(
        &mut client,
        "localhost",
        "/runtime.v1.RuntimeService/Version",
        grpc_frame(&pb::VersionRequest::default()),
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    assert_eq!(version_response(&data).runtime_name, "crisp");

    // grpc-go 1.51's own header blocks, `:authority: /run/crisp/crisp.sock`.
    let mut raw = Raw::connect(&sock).await?;
    let version = grpc_frame(&pb::VersionRequest::default());
    for (stream_id, block) in [(1, GRPC_BLOCK_1), (3, GRPC_BLOCK_2)] {
        raw.request(stream_id, block, &version).await?;
        let a = raw.answer(stream_id).await?;
        assert_eq!(a.reset, None, "stream {stream_id} reset: {a:?}");
        assert_eq!(header(&a, ":status"), Some("200"), "{a:?}");
        assert_eq!(header(&a, "grpc-status"), Some("0"), "{a:?}");
        assert_eq!(version_response(&a.data).runtime_name, "crisp");
    }
    // Third call: another service and path, dynamic-table references, a sensitive header.
    let list = grpc_frame(&pb::ListImagesRequest::default());
    raw.request(5, GRPC_BLOCK_3, &list).await?;
    let a = raw.answer(5).await?;
    assert_eq!(a.reset, None, "{a:?}");
    assert_eq!(header(&a, "grpc-status"), Some("0"), "{a:?}");
    let images = pb::ListImagesResponse::decode(&a.data[5..])?;
    assert!(images.images.is_empty(), "fresh root has no images");
    Ok(())
}

/// Without the adapter, h2 refuses the same bytes: the reason the adapter exists.
#[tokio::test]
async fn h2_alone_rejects_path_authority() -> anyhow::Result<()> {
    let (c, s) = UnixStream::pair()?;
    tokio::spawn(h2_echo_server(s, false));
    let mut raw = Raw {
        io: c,
        hpack: loona_hpack::Decoder::new(),
    };
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    raw.io.write_all(&hello).await?;
    raw.request(1, GRPC_BLOCK_1, &[0, 0, 0, 0, 0]).await?;
    let a = raw.answer(1).await?;
    assert_eq!(a.reset, Some(1), "PROTOCOL_ERROR expected: {a:?}");

    // The same server behind the adapter answers.
    let (c, s) = UnixStream::pair()?;
    tokio::spawn(h2_echo_server(s, true));
    let mut raw = Raw {
        io: c,
        hpack: loona_hpack::Decoder::new(),
    };
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    raw.io.write_all(&hello).await?;
    raw.request(1, GRPC_BLOCK_1, &[0, 0, 0, 0, 0]).await?;
    let a = raw.answer(1).await?;
    assert_eq!(header(&a, "grpc-status"), Some("0"), "{a:?}");
    assert_eq!(header(&a, "x-authority"), Some("localhost"), "{a:?}");
    Ok(())
}

/// A bare h2 server answering every request like a gRPC server would (200, a 5-byte
/// message, grpc-status 0 trailers), echoing the authority it saw.
async fn h2_echo_server(io: UnixStream, fix: bool) {
    async fn run<T>(io: T) -> Result<(), h2::Error>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut conn = h2::server::handshake(io).await?;
        while let Some(r) = conn.accept().await {
            let (req, mut respond) = r?;
            tokio::spawn(async move {
                let authority = req
                    .uri()
                    .authority()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                let mut body = req.into_body();
                while let Some(Ok(d)) = body.data().await {
                    let _ = body.flow_control().release_capacity(d.len());
                }
                let resp = http::Response::builder()
                    .status(200)
                    .header("content-type", "application/grpc")
                    .header("x-authority", authority)
                    .body(())
                    .expect("response");
                if let Ok(mut send) = respond.send_response(resp, false) {
                    let _ = send.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), false);
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let _ = send.send_trailers(t);
                }
            });
        }
        Ok(())
    }
    let _ = if fix {
        run(FixAuthority::new(io)).await
    } else {
        run(io).await
    };
}

/// Requests per second over one connection to a bare h2 server, `concurrency` in flight.
async fn h2_rate(fix: bool, n: usize, concurrency: usize, body: Bytes) -> anyhow::Result<f64> {
    let (c, s) = UnixStream::pair()?;
    tokio::spawn(h2_echo_server(s, fix));
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(8 << 20)
        .initial_connection_window_size(64 << 20)
        .handshake(c)
        .await?;
    tokio::spawn(conn);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut client = client.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / concurrency {
                let (_, _, tr) = h2_call(&mut client, "localhost", "/x.Y/Z", body.clone()).await?;
                anyhow::ensure!(tr.get("grpc-status").is_some(), "no grpc-status");
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Measurement, not a check: `cargo nextest run -p crisp-cri --test authority --run-ignored
/// only --no-capture` (best in release: `cargo test --release -p crisp-cri --test authority
/// -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn adapter_overhead() -> anyhow::Result<()> {
    // 1. The state machine alone, on grpc-go's blocks (first call, then the usual repeat).
    let mut conn = PREFACE.to_vec();
    conn.extend(frame(0x1, 0x4, 1, GRPC_BLOCK_1));
    let reps = 200_000u32;
    let mut r = AuthorityRewriter::new();
    let mut out = Vec::with_capacity(1 << 16);
    r.feed(&conn, &mut out);
    let repeat = frame(0x1, 0x4, 3, GRPC_BLOCK_2);
    let t = Instant::now();
    for _ in 0..reps {
        out.clear();
        r.feed(&repeat, &mut out);
    }
    let per = t.elapsed() / reps;
    println!(
        "rewriter: {per:?} per grpc-go request header block (repeat call, 15 B in, {} B out)",
        out.len()
    );
    let t = Instant::now();
    for _ in 0..20_000u32 {
        let mut r = AuthorityRewriter::new();
        out.clear();
        r.feed(&conn, &mut out);
    }
    println!(
        "rewriter: {:?} per new connection + first block (Huffman decode, table set-up)",
        t.elapsed() / 20_000
    );

    // 2. A/B over a real h2 server, small gRPC-like calls and large uploads.
    for (what, n, conc, body) in [
        (
            "sequential 5 B calls",
            20_000,
            1,
            Bytes::from_static(&[0, 0, 0, 0, 0]),
        ),
        (
            "16 concurrent 5 B calls",
            40_000,
            16,
            Bytes::from_static(&[0, 0, 0, 0, 0]),
        ),
        ("4 MiB uploads", 100, 1, Bytes::from(vec![7u8; 4 << 20])),
    ] {
        // Alternate to spread machine noise; best of 3 each.
        let (mut with, mut without) = (0f64, 0f64);
        for _ in 0..3 {
            without = without.max(h2_rate(false, n, conc, body.clone()).await?);
            with = with.max(h2_rate(true, n, conc, body.clone()).await?);
        }
        println!(
            "h2 server, {what}: {without:.0}/s without, {with:.0}/s with the adapter ({:+.1}%)",
            (with / without - 1.0) * 100.0
        );
    }

    // 3. crispd itself (adapter always on): Version round trips per second.
    let dir = tempfile::tempdir()?;
    let (mut d, sock) = start(dir.path());
    wait_for_socket(&sock, &mut d).await;
    let (mut client, conn) = h2::client::handshake(UnixStream::connect(&sock).await?).await?;
    tokio::spawn(conn);
    let body = grpc_frame(&pb::VersionRequest::default());
    let n = 5_000;
    let t = Instant::now();
    for _ in 0..n {
        let (_, _, tr) = h2_call(
            &mut client,
            "localhost",
            "/runtime.v1.RuntimeService/Version",
            body.clone(),
        )
        .await?;
        anyhow::ensure!(tr.get("grpc-status").is_some());
    }
    println!(
        "crispd Version: {:.0} round trips/s sequential (adapter on)",
        n as f64 / t.elapsed().as_secs_f64()
    );
    Ok(())
}
