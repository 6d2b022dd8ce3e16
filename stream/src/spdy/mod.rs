//! SPDY/3.1 as Kubernetes' `httpstream/spdy` (moby/spdystream) speaks it: framing, the
//! header compression contexts, and a connection multiplexing streams.

pub mod conn;
pub mod dictionary;
pub mod frame;
pub mod headers;

pub use conn::{ConnConfig, ConnError, Connection, Role, Stream, StreamReader, StreamWriter};
pub use frame::{Frame, FrameDecoder, FrameEncoder, FrameError};
pub use headers::Headers;

#[cfg(test)]
mod tests;
