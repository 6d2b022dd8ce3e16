//! Prometheus metrics on a loopback address: CRI calls by method and code with their total
//! latency (recorded by `instrument::call` into the daemon's [`Metrics`], so two daemons in one
//! process count apart), and gauges read from the store at scrape time.
//! A deliberately tiny HTTP/1.1 responder: one GET, one text body, connection closed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use redb::TableHandle as _;

use crate::network::cni::CniManager;
use crate::store::{CONTAINERS, ID_RANGES, PODS, QUARANTINE, Store, Table};

#[derive(Debug, Default)]
struct CallStats {
    count: u64,
    seconds: f64,
}

/// The CRI call counters of one daemon: (method, gRPC code name) → stats.
#[derive(Debug, Default)]
pub struct Metrics {
    calls: Mutex<BTreeMap<(&'static str, &'static str), CallStats>>,
}

impl Metrics {
    /// Record one finished CRI call.
    pub fn record_call(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        let code = code_name(code);
        let mut m = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let s = m.entry((method, code)).or_default();
        s.count += 1;
        s.seconds += elapsed.as_secs_f64();
    }

    /// How many calls of `method` ended with `code`.
    pub fn count(&self, method: &'static str, code: tonic::Code) -> u64 {
        let m = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(method, code_name(code))).map_or(0, |s| s.count)
    }
}

/// What a scrape reads: the call counters and the store and network state behind the gauges.
#[derive(Clone)]
pub struct Scrape {
    pub metrics: Arc<Metrics>,
    pub store: Store,
    pub cni: Arc<CniManager>,
    /// Other parts' lines (streaming), appended after the daemon's own.
    pub extra: Vec<Arc<dyn Gauges>>,
}

/// A part of crispd that adds its own lines to the metrics page at each scrape.
pub trait Gauges: Send + Sync {
    fn render(&self, out: &mut String);
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// The exposition text, or what could not be read (the scrape then fails with it: a store
/// that cannot be read is not a store with nothing in it).
pub fn render(d: &Scrape) -> Result<String, String> {
    let mut out = String::new();
    out.push_str("# HELP crisp_cri_calls_total CRI calls by method and gRPC code.\n");
    out.push_str("# TYPE crisp_cri_calls_total counter\n");
    let calls = d.metrics.calls.lock().unwrap_or_else(|p| p.into_inner());
    for ((m, c), s) in calls.iter() {
        let _ = writeln!(
            out,
            "crisp_cri_calls_total{{method=\"{m}\",code=\"{c}\"}} {}",
            s.count
        );
    }
    out.push_str("# HELP crisp_cri_call_seconds_total Time spent in CRI calls.\n");
    out.push_str("# TYPE crisp_cri_call_seconds_total counter\n");
    for ((m, c), s) in calls.iter() {
        let _ = writeln!(
            out,
            "crisp_cri_call_seconds_total{{method=\"{m}\",code=\"{c}\"}} {:.6}",
            s.seconds
        );
    }
    drop(calls);
    store_gauges(&mut out, |t| d.store.count(t))?;
    let ready = u8::from(d.cni.current().is_ok());
    let _ = writeln!(
        out,
        "# HELP crisp_network_ready Whether a usable CNI config is loaded.\n# TYPE crisp_network_ready gauge\ncrisp_network_ready {ready}"
    );
    for g in &d.extra {
        g.render(&mut out);
    }
    Ok(out)
}

/// The gauges read from the store, each a table's record count; an error names the gauge,
/// the table and what the store said.
fn store_gauges<E: std::fmt::Display>(
    out: &mut String,
    count: impl Fn(Table) -> Result<u64, E>,
) -> Result<(), String> {
    for (name, help, table) in [
        ("crisp_pods", "Pod sandboxes in the store.", PODS),
        ("crisp_containers", "Containers in the store.", CONTAINERS),
        (
            "crisp_id_ranges_in_use",
            "Pod ID ranges allocated from subuid/subgid.",
            ID_RANGES,
        ),
        (
            "crisp_quarantined_records",
            "Store records that failed to decode.",
            QUARANTINE,
        ),
    ] {
        let n = count(table)
            .map_err(|e| format!("{name}: counting store table {:?}: {e}", table.name()))?;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        let _ = writeln!(out, "{name} {n}");
    }
    Ok(())
}

/// Bind and serve in the background. A bind failure is returned (the caller records it as a
/// condition) and never stops crispd.
pub async fn spawn(d: Scrape, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let d = d.clone();
            tokio::spawn(async move {
                // Read the request head (bounded); only the path matters.
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                let read = tokio::time::timeout(Duration::from_secs(5), async {
                    while n < buf.len() {
                        let k = sock.read(&mut buf[n..]).await?;
                        if k == 0 {
                            break;
                        }
                        n += k;
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                    Ok::<_, std::io::Error>(())
                })
                .await;
                if !matches!(read, Ok(Ok(()))) {
                    return;
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = if path == "/metrics" || path == "/v1/metrics" {
                    match render(&d) {
                        Ok(text) => ("200 OK", text),
                        Err(e) => {
                            tracing::warn!(error = %e, "metrics scrape failed");
                            ("500 Internal Server Error", format!("{e}\n"))
                        }
                    }
                } else {
                    ("404 Not Found", "not found; try /metrics\n".to_string())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_prometheus_friendly_names() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            code_name(tonic::Code::FailedPrecondition),
            "FailedPrecondition"
        );
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = crate::daemon::Daemon::for_test(dir.path());
        let scrape = d.scrape();
        let addr = spawn(scrape, "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        d.metrics
            .record_call("Version", tonic::Code::Ok, Duration::from_millis(1));
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut body = String::new();
        s.read_to_string(&mut body).await.expect("read");
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(
            body.contains("crisp_cri_calls_total{method=\"Version\",code=\"OK\"}"),
            "{body}"
        );
        assert!(body.contains("crisp_pods 0"), "{body}");
        assert!(body.contains("crisp_network_ready 0"), "{body}");
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /nope HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut body = String::new();
        s.read_to_string(&mut body).await.expect("read");
        assert!(body.starts_with("HTTP/1.1 404"), "{body}");
    }

    /// A store that cannot be counted fails the scrape with the gauge and table named, never
    /// a count of 0.
    #[test]
    fn a_store_error_is_an_error_not_a_zero() {
        let mut out = String::new();
        let e = store_gauges(&mut out, |_| Err::<u64, _>("database is locked"))
            .expect_err("the store failed");
        assert_eq!(
            e,
            format!(
                "crisp_pods: counting store table {:?}: database is locked",
                PODS.name()
            )
        );
        assert!(!out.contains("crisp_pods 0"), "{out}");
        let mut out = String::new();
        store_gauges(&mut out, |_| Ok::<u64, String>(3)).expect("counts");
        assert!(out.contains("crisp_pods 3\n"), "{out}");
    }

    #[test]
    fn calls_are_counted_per_daemon() {
        let (a, b) = (Metrics::default(), Metrics::default());
        a.record_call(
            "TestMethodXyz",
            tonic::Code::NotFound,
            Duration::from_millis(5),
        );
        a.record_call(
            "TestMethodXyz",
            tonic::Code::NotFound,
            Duration::from_millis(5),
        );
        let m = a.calls.lock().unwrap_or_else(|p| p.into_inner());
        let s = m.get(&("TestMethodXyz", "NotFound")).expect("recorded");
        assert_eq!(s.count, 2);
        assert!(s.seconds >= 0.009);
        // Another daemon's counters saw nothing.
        assert_eq!(b.count("TestMethodXyz", tonic::Code::NotFound), 0);
    }
}
