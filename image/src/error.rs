//! One error type for the crate. Every error carries a [`Kind`] so that crispd maps it to a
//! gRPC code in exactly one place, and a message that names the field, value or entry at fault.

use std::fmt;
use std::sync::Arc;

/// What sort of failure this is; the CRI layer turns it into a gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The image, tag, blob or snapshot does not exist.
    NotFound,
    /// The caller passed something malformed (a reference, a config value).
    InvalidArgument,
    /// The request is well formed but the state does not allow it (e.g. a layer that
    /// would escape its directory, a digest that does not match).
    FailedPrecondition,
    /// The registry or the network failed; retrying may help.
    Unavailable,
    /// The registry refused our credentials.
    Unauthenticated,
    /// Content arrived corrupt or truncated.
    DataLoss,
    /// Something on this node failed (disk, store, a bug).
    Internal,
}

/// The crate's error: a kind, a message, and optionally the underlying cause.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Error {
    kind: Kind,
    message: String,
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(
        kind: Kind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error {
            kind,
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, m)
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(Kind::InvalidArgument, m)
    }
    pub fn precondition(m: impl Into<String>) -> Self {
        Self::new(Kind::FailedPrecondition, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, m)
    }
    pub fn data_loss(m: impl Into<String>) -> Self {
        Self::new(Kind::DataLoss, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(Kind::Internal, m)
    }

    /// An I/O error on this node, with what we were doing.
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        Self::with_source(Kind::Internal, what, e)
    }

    /// Prefix the message with more context, keeping kind and source.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message);
        self
    }
}
