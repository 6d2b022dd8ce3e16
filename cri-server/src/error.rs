//! The one error vocabulary of crispd: every module's error carries an [`ErrorKind`]
//! ([`HasKind`]), and a CRI call fails with a [`CriError`] (a kind and a message). Nothing here
//! knows gRPC or metrics: `instrument` alone turns kinds into codes, so this module sits at
//! the bottom of the crate and every layer may use it.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    /// The call is valid but the world is not ready for it (wrong state, missing CNI config).
    FailedPrecondition,
    ResourceExhausted,
    /// A registry refused our credentials.
    Unauthenticated,
    /// Content arrived corrupt or truncated.
    DataLoss,
    Unimplemented,
    Unavailable,
    DeadlineExceeded,
    Internal,
}

impl ErrorKind {
    /// Every kind, for exhaustive tests of mappings.
    pub const ALL: [ErrorKind; 11] = [
        Self::InvalidArgument,
        Self::NotFound,
        Self::AlreadyExists,
        Self::FailedPrecondition,
        Self::ResourceExhausted,
        Self::Unauthenticated,
        Self::DataLoss,
        Self::Unimplemented,
        Self::Unavailable,
        Self::DeadlineExceeded,
        Self::Internal,
    ];
}

/// Implemented by every module's error enum.
pub trait HasKind {
    fn kind(&self) -> ErrorKind;
}

// The image crate has its own kinds (it knows nothing of gRPC); they map one to one.
impl HasKind for crisp_image::Error {
    fn kind(&self) -> ErrorKind {
        use crisp_image::Kind;
        match crisp_image::Error::kind(self) {
            Kind::NotFound => ErrorKind::NotFound,
            Kind::InvalidArgument => ErrorKind::InvalidArgument,
            Kind::FailedPrecondition => ErrorKind::FailedPrecondition,
            Kind::Unavailable => ErrorKind::Unavailable,
            Kind::Unauthenticated => ErrorKind::Unauthenticated,
            Kind::DataLoss => ErrorKind::DataLoss,
            Kind::Internal => ErrorKind::Internal,
        }
    }
}

// So does the snapshotter's.
impl HasKind for crisp_snapshotter::Error {
    fn kind(&self) -> ErrorKind {
        use crisp_snapshotter::ErrorKind as K;
        match crisp_snapshotter::Error::kind(self) {
            K::NotFound => ErrorKind::NotFound,
            K::AlreadyExists => ErrorKind::AlreadyExists,
            K::FailedPrecondition => ErrorKind::FailedPrecondition,
            K::InvalidArgument => ErrorKind::InvalidArgument,
            K::Internal => ErrorKind::Internal,
        }
    }
}

/// What a CRI call handler returns on failure: a kind and a message for the caller.
/// Clone: a shared in-flight call hands the same error to every caller.
#[derive(Debug, Clone)]
pub struct CriError {
    pub kind: ErrorKind,
    pub message: String,
}

impl std::fmt::Display for CriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl CriError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }
    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unimplemented, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// Any module error with its kind kept and `what` (the object and step) in front.
    pub fn context<E: HasKind + std::fmt::Display>(what: &str, e: E) -> Self {
        Self::new(e.kind(), format!("{what}: {e}"))
    }
}

// Any module error converts with its kind; `?` in a handler is all it takes.
impl<E: HasKind + std::fmt::Display> From<E> for CriError {
    fn from(e: E) -> Self {
        Self {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("pod {0} is gone")]
    struct Gone(String);
    impl HasKind for Gone {
        fn kind(&self) -> ErrorKind {
            ErrorKind::NotFound
        }
    }

    #[test]
    fn module_errors_keep_their_kind_and_message() {
        let e = CriError::from(Gone("p1".into()));
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(e.message, "pod p1 is gone");
        let e = CriError::context("container c1: rootfs", Gone("p1".into()));
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(e.message, "container c1: rootfs: pod p1 is gone");
    }
}
