//! A streaming client, for crispd's end-to-end tests and benchmarks: exec, attach and
//! port-forward over SPDY/3.1, WebSocket (v4, v5, base64) and the SPDY-over-WebSocket tunnel.
//!
//! It is written from the protocol as kubelet/client-go speak it, not from this crate's
//! server: it does its own HTTP upgrade (no hyper), opens streams in client-go's order, and
//! parses the final status itself. Only the frame codecs are shared.

pub mod exec;
pub mod portforward;
pub mod upgrade;

pub use exec::{Outcome, exec_spdy, exec_spdy_offering, exec_spdy_tls, exec_ws, run_spdy};
pub use portforward::{PortForwardStream, SpdyPortForward, WsPortForward, WsPortStream};

use crate::spdy::ConnError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL {0:?}")]
    Url(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    /// The server did not switch protocols.
    #[error("HTTP {status}: {body}")]
    Http {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("SPDY: {0}")]
    Spdy(#[from] ConnError),
    #[error("WebSocket: {0}")]
    WebSocket(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// The HTTP status when the server refused the upgrade.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            ClientError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// `http://host:port/path?q` → (`host:port`, `/path?q`).
pub(crate) fn split_url(url: &str) -> Result<(String, String), ClientError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .or_else(|| url.strip_prefix("ws://"))
        .ok_or_else(|| ClientError::Url(url.to_string()))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(ClientError::Url(url.to_string()));
    }
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    Ok((authority.to_string(), path))
}
