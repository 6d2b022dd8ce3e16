//! The one error boundary: every module's error carries an [`ErrorKind`] (`error.rs`); this
//! is the only place kinds become gRPC codes, the only place each CRI call's entry and exit is
//! logged, and the only place calls are counted in the daemon's [`Metrics`] (containerd's
//! `instrumented_service.go`, in spirit).

use std::future::Future;
use std::time::Instant;

use tonic::{Code, Response, Status};
use tracing::Instrument;

use crate::error::{CriError, ErrorKind};
use crate::metrics::Metrics;

/// The one mapping of error kinds to gRPC codes.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::DataLoss => Code::DataLoss,
        ErrorKind::Unimplemented => Code::Unimplemented,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::Internal => Code::Internal,
    }
}

/// Run one CRI call: log entry and exit with the elapsed time, map the error kind to a code.
/// `span` carries the call's name and its pod_id / container_id fields; the call is counted
/// in `metrics` by method and code.
pub async fn call<R>(
    metrics: &Metrics,
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
        let code = result.as_ref().map_or_else(|e| code(e.kind), |_| Code::Ok);
        metrics.record_call(method, code, elapsed);
        match result {
            Ok(r) => {
                tracing::debug!(elapsed_ms, "ok");
                Ok(Response::new(r))
            }
            Err(e) => {
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
    use crate::error::HasKind;

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
        let m = Metrics::default();
        let r: Result<Response<()>, Status> = call(&m, "Test", tracing::Span::none(), async {
            Err::<(), _>(CriError::from(Gone("p1".into())))
        })
        .await;
        let s = r.expect_err("fails");
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "pod p1 is gone");

        let ok = call(&m, "Test", tracing::Span::none(), async {
            Ok::<_, CriError>(5)
        })
        .await;
        assert_eq!(ok.expect("ok").into_inner(), 5);
        // Both calls counted in the daemon's metrics, by code.
        assert_eq!(m.count("Test", Code::NotFound), 1);
        assert_eq!(m.count("Test", Code::Ok), 1);
    }

    #[test]
    fn every_kind_has_a_distinct_code() {
        let kinds = ErrorKind::ALL;
        let mut codes: Vec<i32> = kinds.iter().map(|k| code(*k) as i32).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), kinds.len());
    }
}
