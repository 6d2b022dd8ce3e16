//! Exec and attach over SPDY, as kubelet's `remotecommand` server runs them: wait for the
//! streams the request implies, run the backend, then stdout/stderr FIN, the status on the
//! error stream, GOAWAY.

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::status::Status;
use super::{Command, HEADER_STREAM_TYPE, SpdyVersion, pump_resizes};
use crate::backend::{BoxRead, BoxWrite, Streams};
use crate::server::session::{AbortOnDrop, Ended, SessionCtx, guarded};
use crate::spdy::{Connection, Stream, StreamWriter};

#[derive(Default)]
struct Collected {
    error: Option<Stream>,
    stdin: Option<Stream>,
    stdout: Option<Stream>,
    stderr: Option<Stream>,
    resize: Option<Stream>,
}

/// Accepts streams until `expected` known ones arrived; unknown types are ignored (and not
/// counted), a repeated type replaces the earlier stream, as the Go server does.
async fn collect(
    conn: &mut Connection,
    version: SpdyVersion,
    expected: usize,
) -> Option<Collected> {
    let mut c = Collected::default();
    let mut received = 0;
    while received < expected {
        let s = conn.accept().await?;
        let slot = match s.headers().get(HEADER_STREAM_TYPE) {
            Some("error") => &mut c.error,
            Some("stdin") => &mut c.stdin,
            Some("stdout") => &mut c.stdout,
            Some("stderr") => &mut c.stderr,
            Some("resize") if version >= SpdyVersion::V3 => &mut c.resize,
            other => {
                tracing::debug!(stream_type = ?other, "ignoring unexpected stream type");
                continue;
            }
        };
        *slot = Some(s);
        received += 1;
    }
    Some(c)
}

pub(crate) async fn serve(
    ctx: SessionCtx,
    mut conn: Connection,
    version: SpdyVersion,
    cmd: Command,
) {
    let (stdin, stdout, stderr, tty) = cmd.streams();
    let expected = 1
        + usize::from(stdin)
        + usize::from(stdout)
        + usize::from(stderr)
        + usize::from(tty && version >= SpdyVersion::V3);
    let collected = tokio::select! {
        c = tokio::time::timeout(ctx.stream_creation_timeout, collect(&mut conn, version, expected)) => c,
        _ = ctx.shutdown.cancelled() => return,
    };
    let c = match collected {
        Ok(Some(c)) => c,
        Ok(None) => return,
        Err(_) => {
            tracing::debug!(expected, "timed out waiting for client to create streams");
            conn.close().await;
            return;
        }
    };
    conn.stop_accepting();
    let error_writer = match (version, c.error) {
        // v1 resets its error stream once the streams are in (what kubelet 1.0 did).
        (SpdyVersion::V1, Some(e)) => {
            e.reset();
            None
        }
        (_, e) => e.map(|e| e.split().1),
    };
    let (resize_tx, resize_rx) = mpsc::channel(16);
    let pump = match (tty, c.resize) {
        (true, Some(r)) => Some(AbortOnDrop(tokio::spawn(pump_resizes(
            r.split().0,
            resize_tx,
        )))),
        _ => None,
    };
    // client-go ends its stdin copy as soon as our side of the stdin stream closes (its
    // old "hijack" wait), so our half stays open until the session is over.
    let (stdin, _stdin_hold) = match c.stdin.map(Stream::split) {
        Some((r, w)) => (Some(Box::pin(r) as BoxRead), Some(w)),
        None => (None, None),
    };
    let streams = Streams {
        stdin,
        stdout: c.stdout.map(|s| Box::pin(s.split().1) as BoxWrite),
        stderr: c.stderr.map(|s| Box::pin(s.split().1) as BoxWrite),
        resize: pump.is_some().then_some(resize_rx),
    };
    let work = async {
        match cmd {
            Command::Exec(req) => match ctx.backend.exec(req, streams).await {
                Ok(code) => Status::exit(code),
                Err(e) => Status::from_backend("error executing command in container", &e),
            },
            Command::Attach(req) => match ctx.backend.attach(req, streams).await {
                Ok(()) => Status::success(),
                Err(e) => Status::from_backend("error attaching to container", &e),
            },
        }
    };
    let res = guarded(
        work,
        conn.closed(),
        || conn.idle_for(),
        ctx.idle_timeout,
        &ctx.shutdown,
    )
    .await;
    match res {
        Ok(status) => {
            // The backend's stdout/stderr halves are gone, each having queued its FIN
            // after its data; wait for any queued from a background task, then the status.
            conn.settle().await;
            if let Some(w) = error_writer {
                write_status(w, version, &status).await;
            }
            conn.close().await;
        }
        Err(Ended::Idle) => {
            tracing::info!(idle_timeout = ?ctx.idle_timeout, "closing idle streaming session");
            conn.close().await;
        }
        Err(Ended::ClientGone | Ended::Shutdown) => {}
    }
}

async fn write_status(mut w: StreamWriter, version: SpdyVersion, status: &Status) {
    let body = match version {
        SpdyVersion::V4 => Some(status.to_json()),
        _ => status.to_v1_message(),
    };
    if let Some(body) = body {
        let _ = w.write_all(&body).await;
    }
    let _ = w.shutdown().await;
}
