//! Kubernetes' remote command protocol (exec and attach): version negotiation, the typed
//! streams, resize messages and the final `Status`, over SPDY ([`spdy`]) and WebSocket
//! ([`ws`]).

pub mod spdy;
pub mod status;
pub mod ws;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use crate::backend::{AttachRequest, ExecRequest, TermSize};

/// An exec or attach a token stood for.
#[derive(Debug, Clone)]
pub enum Command {
    Exec(ExecRequest),
    Attach(AttachRequest),
}

impl Command {
    /// (stdin, stdout, stderr, tty) as the CRI request asked; stderr is never separate
    /// from a terminal.
    pub fn streams(&self) -> (bool, bool, bool, bool) {
        let (i, o, e, t) = match self {
            Command::Exec(r) => (r.stdin, r.stdout, r.stderr, r.tty),
            Command::Attach(r) => (r.stdin, r.stdout, r.stderr, r.tty),
        };
        (i, o, e && !t, t)
    }
}

pub const HEADER_PROTOCOL_VERSION: &str = "X-Stream-Protocol-Version";
pub const HEADER_ACCEPTED_VERSIONS: &str = "X-Accepted-Stream-Protocol-Versions";
/// Header naming a stream's role.
pub const HEADER_STREAM_TYPE: &str = "streamType";

pub const V1: &str = "channel.k8s.io";
pub const V2: &str = "v2.channel.k8s.io";
pub const V3: &str = "v3.channel.k8s.io";
pub const V4: &str = "v4.channel.k8s.io";
pub const V5: &str = "v5.channel.k8s.io";

/// What a SPDY session does; v5 over SPDY is v4 (its only addition, the CLOSE signal, is a
/// WebSocket matter: SPDY half-closes a stream with FIN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SpdyVersion {
    /// Error stream carries a message on failure only; the error stream is reset at start.
    V1,
    /// As v1 without the reset.
    V2,
    /// Adds the resize stream.
    V3,
    /// The error stream ends with a `Status` JSON, exit codes included.
    V4,
}

/// The versions this server accepts over SPDY, in the order a 403 lists them.
pub const SPDY_ACCEPTED: [&str; 5] = [V5, V4, V3, V2, V1];

/// Picks the version from a client's `X-Stream-Protocol-Version` values (each may be a
/// comma-separated list): v4 when offered, otherwise the client's first acceptable one.
/// Returns the name to answer with and what the session does.
pub fn negotiate_spdy(offers: &[String]) -> Option<(&'static str, SpdyVersion)> {
    let offered: Vec<&str> = offers
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    if offered.contains(&V4) {
        return Some((V4, SpdyVersion::V4));
    }
    offered.into_iter().find_map(|o| match o {
        V5 => Some((V5, SpdyVersion::V4)),
        V3 => Some((V3, SpdyVersion::V3)),
        V2 => Some((V2, SpdyVersion::V2)),
        V1 => Some((V1, SpdyVersion::V1)),
        _ => None,
    })
}

#[derive(Deserialize)]
struct WireSize {
    #[serde(rename = "Width", alias = "width")]
    width: u16,
    #[serde(rename = "Height", alias = "height")]
    height: u16,
}

/// Longest resize message accepted (`{"Width":65535,"Height":65535}` is 32 bytes).
const MAX_RESIZE_MESSAGE: usize = 4096;

/// Decodes a stream of `{"Width","Height"}` JSON objects that may span reads, as Go's
/// `json.Decoder` on the resize stream does.
#[derive(Default)]
pub struct ResizeDecoder {
    buf: Vec<u8>,
}

impl ResizeDecoder {
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<TermSize>, String> {
        self.buf.extend_from_slice(data);
        let mut sizes = Vec::new();
        let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<WireSize>();
        loop {
            match it.next() {
                Some(Ok(s)) => sizes.push(TermSize {
                    width: s.width,
                    height: s.height,
                }),
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => return Err(format!("bad resize message: {e}")),
                None => break,
            }
        }
        let used = it.byte_offset();
        self.buf.drain(..used);
        if self.buf.len() > MAX_RESIZE_MESSAGE {
            return Err(format!("resize message over {MAX_RESIZE_MESSAGE} bytes"));
        }
        Ok(sizes)
    }
}

/// Reads resize messages until EOF or a bad message, handing each size to the backend.
pub(crate) async fn pump_resizes<R: AsyncRead + Unpin>(mut r: R, tx: mpsc::Sender<TermSize>) {
    let mut dec = ResizeDecoder::default();
    let mut buf = [0u8; 512];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        match dec.push(&buf[..n]) {
            Ok(sizes) => {
                for s in sizes {
                    if tx.send(s).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "stopping resize stream");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn negotiation_prefers_v4_and_maps_v5_to_v4() {
        let kubelet = offer(&[V5, V4, V3, V2, V1]);
        assert_eq!(negotiate_spdy(&kubelet), Some((V4, SpdyVersion::V4)));
        assert_eq!(negotiate_spdy(&offer(&[V5])), Some((V5, SpdyVersion::V4)));
        assert_eq!(
            negotiate_spdy(&offer(&["v5.channel.k8s.io, v3.channel.k8s.io"])),
            Some((V5, SpdyVersion::V4))
        );
        assert_eq!(
            negotiate_spdy(&offer(&[V3, V2])),
            Some((V3, SpdyVersion::V3))
        );
        assert_eq!(negotiate_spdy(&offer(&[V1])), Some((V1, SpdyVersion::V1)));
        assert_eq!(negotiate_spdy(&offer(&["v9.channel.k8s.io"])), None);
        assert_eq!(negotiate_spdy(&[]), None);
    }

    #[test]
    fn resize_messages_may_span_reads_and_share_one() {
        let mut d = ResizeDecoder::default();
        assert_eq!(d.push(br#"{"Width":80,"#).expect("partial"), vec![]);
        let got = d
            .push(b"\"Height\":24}\n{\"width\":100,\"height\":30}\n")
            .expect("two");
        assert_eq!(
            got,
            vec![
                TermSize {
                    width: 80,
                    height: 24
                },
                TermSize {
                    width: 100,
                    height: 30
                }
            ]
        );
        assert!(d.push(b"{\"Width\":\"x\"}").is_err());
    }
}
