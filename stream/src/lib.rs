//! The CRI streaming server: the URLs that `Exec`, `Attach` and `PortForward` return, and the
//! SPDY/3.1 and WebSocket protocols kubelet, kubectl and crictl speak on them.
//!
//! This crate knows nothing of pods, shims or the store: what a session does is asked of a
//! [`Backend`] that crispd implements. Arrows run one way: crispd → crisp-stream.
//!
//! What crispd does with it:
//! - at start-up, [`StreamServer::start`] with a [`StreamConfig`] (`address`, `port` 0 =
//!   pick, `idle_timeout`, optional [`TlsFiles`]) and its `Arc<dyn Backend>`;
//! - in the CRI `Exec`/`Attach`/`PortForward` handlers, after validating the request,
//!   [`StreamServer::exec_url`], [`StreamServer::attach_url`] or
//!   [`StreamServer::port_forward_url`]; [`TokenError::TooManyInFlight`] is
//!   ResourceExhausted;
//! - [`StreamServer::metrics`] for the metrics page, [`StreamServer::shutdown`] on exit
//!   (every session future is dropped, so the backend kills its execs).
//!
//! Protocols: SPDY/3.1 ([`spdy`]) with remote command v1–v5 and `portforward.k8s.io`;
//! WebSocket `v5.channel.k8s.io`, `v4.channel.k8s.io`, `channel.k8s.io` and base64
//! variants ([`ws`]); port-forward over WebSocket channels and SPDY tunnelled in WebSocket
//! (`SPDY/3.1+portforward.k8s.io`). [`client`] speaks all of them, for tests.

pub mod activity;
pub mod backend;
pub mod client;
pub mod metrics;
pub mod portforward;
pub mod remotecommand;
pub mod server;
pub mod spdy;
pub mod ws;

pub use backend::{AttachRequest, Backend, BackendError, ExecRequest, Streams, TermSize};
pub use metrics::MetricsSnapshot;
pub use server::{
    PortForwardRequest, StartError, StreamConfig, StreamServer, TlsError, TlsFiles, TokenError,
};
