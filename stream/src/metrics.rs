//! Counters crispd's metrics page reads: plain numbers, updated lock-free.

use std::sync::atomic::{AtomicU64, Ordering};

/// Payload bytes moved between clients and sessions (protocol overhead excluded).
#[derive(Debug, Default)]
pub struct ByteCounters {
    /// From clients (stdin, port-forward uploads).
    pub bytes_in: AtomicU64,
    /// To clients (stdout, stderr, status, port-forward downloads).
    pub bytes_out: AtomicU64,
}

/// The streaming server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub sessions_open: AtomicU64,
    pub exec_total: AtomicU64,
    pub attach_total: AtomicU64,
    pub port_forward_total: AtomicU64,
    pub bytes: std::sync::Arc<ByteCounters>,
}

/// A copy of [`Metrics`] at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub sessions_open: u64,
    pub exec_sessions_total: u64,
    pub attach_sessions_total: u64,
    pub port_forward_sessions_total: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Metrics {
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            sessions_open: get(&self.sessions_open),
            exec_sessions_total: get(&self.exec_total),
            attach_sessions_total: get(&self.attach_total),
            port_forward_sessions_total: get(&self.port_forward_total),
            bytes_in: get(&self.bytes.bytes_in),
            bytes_out: get(&self.bytes.bytes_out),
        }
    }
}
