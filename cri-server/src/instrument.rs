//! The one error boundary: every module's error carries an [`ErrorKind`]; this is the only
//! place kinds become gRPC codes, and the only place each CRI call's entry and exit is logged
//! (containerd's `instrumented_service.go`, in spirit).

use std::future::Future;
use std::time::Instant;

use tonic::{Code, Response, Status};
use tracing::Instrument;

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
    pub fn code(self) -> Code {
        match self {
            Self::InvalidArgument => Code::InvalidArgument,
            Self::NotFound => Code::NotFound,
            Self::AlreadyExists => Code::AlreadyExists,
            Self::FailedPrecondition => Code::FailedPrecondition,
            Self::ResourceExhausted => Code::ResourceExhausted,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::DataLoss => Code::DataLoss,
            Self::Unimplemented => Code::Unimplemented,
            Self::Unavailable => Code::Unavailable,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::Internal => Code::Internal,
        }
    }
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

/// Run one CRI call: log entry and exit with the elapsed time, map the error kind to a code.
/// `span` carries the call's name and its pod_id / container_id fields.
pub async fn call<R>(
    method: &'static str,
    span: tracing::Span,
    fut: impl Future<Output = Result<R, CriError>>,
) -> Result<Response<R>, Status> {
    let start = Instant::now();
    async move {
        tracing::debug!("call");
        let result = fut.await;
        let elapsed = start.elapsed();
        let elapsed_ms = elapsed.as_secs_f64() * 1e3;
        let code = result.as_ref().map_or_else(|e| e.kind.code(), |_| Code::Ok);
        crate::metrics::record_call(method, code, elapsed);
        match result {
            Ok(r) => {
                tracing::debug!(elapsed_ms, "ok");
                Ok(Response::new(r))
            }
            Err(e) => {
                let code = e.kind.code();
                match e.kind {
                    // Expected answers to idempotent retries and polling; not worth a warning.
                    ErrorKind::NotFound | ErrorKind::Unimplemented | ErrorKind::AlreadyExists => {
                        tracing::info!(elapsed_ms, ?code, error = %e.message, "failed")
                    }
                    ErrorKind::Internal => {
                        tracing::error!(elapsed_ms, ?code, error = %e.message, "failed")
                    }
                    _ => tracing::warn!(elapsed_ms, ?code, error = %e.message, "failed"),
                }
                Err(Status::new(code, e.message))
            }
        }
    }
    .instrument(span)
    .await
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

    #[tokio::test]
    async fn kinds_become_codes_and_messages_survive() {
        let r: Result<Response<()>, Status> = call("Test", tracing::Span::none(), async {
            Err::<(), _>(CriError::from(Gone("p1".into())))
        })
        .await;
        let s = r.expect_err("fails");
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "pod p1 is gone");

        let ok = call("Test", tracing::Span::none(), async {
            Ok::<_, CriError>(5)
        })
        .await;
        assert_eq!(ok.expect("ok").into_inner(), 5);
    }

    #[test]
    fn every_kind_has_a_distinct_code() {
        use ErrorKind::*;
        let kinds = [
            InvalidArgument,
            NotFound,
            AlreadyExists,
            FailedPrecondition,
            ResourceExhausted,
            Unauthenticated,
            DataLoss,
            Unimplemented,
            Unavailable,
            DeadlineExceeded,
            Internal,
        ];
        let mut codes: Vec<i32> = kinds.iter().map(|k| k.code() as i32).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), kinds.len());
    }
}
