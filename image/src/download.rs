//! Downloading one blob into the content store, with stall detection and resumption.
//!
//! A download is *stalled* when it receives less than `stall_min_bytes_per_sec` averaged over
//! `stall_window`; a stall, a dropped connection or a body that ends early is resumed from the
//! bytes already written with `Range: bytes=N-` (or by skipping N bytes when the server
//! ignores Range), at most `max_resumes` times. Nothing waits unbounded: the response
//! headers must arrive within the stall window too.

use std::time::Duration;

use futures::StreamExt;

use crate::client::RegistryClient;
use crate::content::{ContentStore, IngestWriter};
use crate::error::{Error, Result};
use crate::images::Config;
use crate::manifest::Descriptor;

/// Why one attempt at streaming a blob stopped early.
enum Interrupted {
    Stalled { rate: u64 },
    Dropped(String),
    Short,
}

/// Download one blob into `w`, resuming with HTTP Range after a stall, a dropped connection
/// or a short body, at most `max_resumes` times; trying the next endpoint when one fails.
pub(crate) async fn download(
    client: &RegistryClient,
    mut w: IngestWriter,
    layer: &Descriptor,
    cfg: &Config,
) -> Result<u64> {
    let hosts = client.pull_hosts();
    if hosts.is_empty() {
        return Err(w.fail(Error::precondition(
            "no configured host may serve blobs (check capabilities in hosts.toml)",
        )));
    }
    let ingest = ContentStore::ingest_of(&w);
    let cancelled = || {
        Error::unavailable(format!(
            "download of {} was abandoned by the pull that started it",
            layer.digest
        ))
    };
    let mut host_i = 0;
    let mut resumes = 0u32;
    loop {
        let idx = hosts[host_i];
        let host = client.host(idx).display();
        let offset = w.written();
        // A registry that accepts the connection but never answers is a stall too.
        let head_timeout = cfg.stall_window.max(Duration::from_millis(100));
        let opened = tokio::select! {
            biased;
            _ = ingest.cancelled() => return Err(w.fail(cancelled())),
            r = tokio::time::timeout(head_timeout, client.open_blob_on(idx, &layer.digest, offset)) => r,
        };
        let opened = match opened {
            Ok(r) => r,
            Err(_) => {
                resumes += 1;
                if resumes > cfg.max_resumes {
                    let e = Error::unavailable(format!(
                        "layer {} from {host}: no response within {head_timeout:?}; received {offset} of {} bytes; gave up after {} resumes",
                        layer.digest, layer.size, cfg.max_resumes
                    ));
                    return Err(w.fail(e));
                }
                tracing::warn!(host = %host, received = offset, total = layer.size, attempt = resumes, "no response to blob request; retrying");
                continue;
            }
        };
        let resp = match opened {
            Ok(r) => r,
            Err(e) => {
                if host_i + 1 < hosts.len() {
                    tracing::info!(host = %host, error = %e, "blob not available here; trying next host");
                    host_i += 1;
                    continue;
                }
                return Err(
                    w.fail(e.context(format!("layer {} after {offset} bytes", layer.digest)))
                );
            }
        };
        // A server that ignores Range sends everything again: skip what we already have.
        let mut skip = if offset > 0 && resp.status() == reqwest::StatusCode::OK {
            offset
        } else {
            0
        };
        let mut stream = resp.bytes_stream();
        let window = cfg.stall_window.max(Duration::from_millis(100));
        let min_bytes = cfg
            .stall_min_bytes_per_sec
            .saturating_mul(window.as_millis() as u64)
            / 1000;
        let mut window_start = tokio::time::Instant::now();
        let mut window_bytes = 0u64;
        let outcome: std::result::Result<(), Interrupted> = loop {
            let deadline = window_start + window;
            let next = tokio::select! {
                biased;
                _ = ingest.cancelled() => return Err(w.fail(cancelled())),
                r = tokio::time::timeout_at(deadline, stream.next()) => r,
            };
            match next {
                Ok(Some(Ok(mut chunk))) => {
                    if skip > 0 {
                        let n = skip.min(chunk.len() as u64) as usize;
                        skip -= n as u64;
                        chunk = chunk.slice(n..);
                    }
                    window_bytes += chunk.len() as u64;
                    if !chunk.is_empty()
                        && let Err(e) = w.write(&chunk).await
                    {
                        return Err(w.fail(e));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        if window_bytes < min_bytes {
                            break Err(Interrupted::Stalled {
                                rate: window_bytes * 1000 / window.as_millis().max(1) as u64,
                            });
                        }
                        window_start = tokio::time::Instant::now();
                        window_bytes = 0;
                    }
                }
                Ok(Some(Err(e))) => break Err(Interrupted::Dropped(e.to_string())),
                Ok(None) => {
                    if layer.size > 0 && w.written() < layer.size {
                        break Err(Interrupted::Short);
                    }
                    break Ok(());
                }
                Err(_) => {
                    if window_bytes < min_bytes {
                        break Err(Interrupted::Stalled {
                            rate: window_bytes * 1000 / window.as_millis().max(1) as u64,
                        });
                    }
                    window_start = tokio::time::Instant::now();
                    window_bytes = 0;
                }
            }
        };
        match outcome {
            Ok(()) => return w.commit(Some(layer.size).filter(|&s| s > 0)).await,
            Err(why) => {
                let _ = w.flush().await;
                let last_problem = match why {
                    Interrupted::Stalled { rate } => format!(
                        "stalled at {rate} B/s (< {} B/s over {:?})",
                        cfg.stall_min_bytes_per_sec, window
                    ),
                    Interrupted::Dropped(e) => format!("connection dropped: {e}"),
                    Interrupted::Short => "body ended early".to_string(),
                };
                resumes += 1;
                if resumes > cfg.max_resumes {
                    let e = Error::unavailable(format!(
                        "layer {} from {host}: {last_problem}; received {} of {} bytes; gave up after {} resumes",
                        layer.digest,
                        w.written(),
                        layer.size,
                        cfg.max_resumes
                    ));
                    return Err(w.fail(e));
                }
                tracing::warn!(host = %host, received = w.written(), total = layer.size, problem = %last_problem, attempt = resumes, "resuming layer download");
            }
        }
    }
}
