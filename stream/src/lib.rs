//! The CRI streaming server: the URLs that `Exec`, `Attach` and `PortForward` return, and the
//! SPDY/3.1 and WebSocket protocols kubelet, kubectl and crictl speak on them.
//!
//! This crate knows nothing of pods, shims or the store: what a session does is asked of a
//! [`Backend`] that crispd implements. Arrows run one way: crispd → crisp-stream.

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
pub use server::{PortForwardRequest, StartError, StreamConfig, StreamServer, TokenError};
