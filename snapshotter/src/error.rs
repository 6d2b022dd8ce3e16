//! The snapshotter's one error type, its kinds, and (in one place) their gRPC codes.

use std::io;

use thiserror::Error;

use crate::fsutil::RemoveError;
use crate::idmap::IdmapError;
use crate::mount::MountError;

/// containerd's error kinds (`errdefs`) that the snapshots API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The snapshot (or its parent) does not exist.
    NotFound,
    /// The key or name is taken.
    AlreadyExists,
    /// The operation does not fit the snapshot's state (remove with children, commit a view).
    FailedPrecondition,
    /// The request is malformed.
    InvalidArgument,
    /// Anything else.
    Internal,
}

/// Errors of the snapshotter.
#[derive(Debug, Error)]
pub enum Error {
    /// No snapshot with this key.
    #[error("snapshot {0:?}: not found")]
    NotFound(String),
    /// A snapshot with this key exists.
    #[error("snapshot {0:?}: already exists")]
    AlreadyExists(String),
    /// State does not allow the call.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// Malformed request.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The metadata store failed.
    #[error("metadata store: {0}")]
    Store(Box<redb::Error>),
    /// A record did not decode.
    #[error("metadata record {key:?}: {source}")]
    Decode {
        /// Its key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The safe remover refused or failed.
    #[error(transparent)]
    Remove(Box<RemoveError>),
    /// Mounting failed.
    #[error(transparent)]
    Mount(Box<MountError>),
    /// A failpoint fired (tests).
    #[error("failpoint {0} fired")]
    Failpoint(String),
}

impl Error {
    /// The containerd error kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::Mount(m)
                if matches!(
                    **m,
                    MountError::Invalid { .. } | MountError::Idmap(IdmapError::Invalid { .. })
                ) =>
            {
                ErrorKind::InvalidArgument
            }
            _ => ErrorKind::Internal,
        }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

impl From<IdmapError> for Error {
    fn from(e: IdmapError) -> Self {
        match e {
            IdmapError::Invalid { .. } => Error::InvalidArgument(e.to_string()),
            e => Error::Mount(Box::new(MountError::Idmap(e))),
        }
    }
}

impl From<MountError> for Error {
    fn from(e: MountError) -> Self {
        Error::Mount(Box::new(e))
    }
}

impl From<RemoveError> for Error {
    fn from(e: RemoveError) -> Self {
        Error::Remove(Box::new(e))
    }
}

/// Converts any redb error into [`Error::Store`].
pub(crate) fn db<E: Into<redb::Error>>(e: E) -> Error {
    Error::Store(Box::new(e.into()))
}

/// Error kind → gRPC code: the one place where this mapping lives.
impl From<ErrorKind> for tonic::Code {
    fn from(k: ErrorKind) -> Self {
        match k {
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
            ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorKind::Internal => tonic::Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.kind().into(), e.to_string())
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
