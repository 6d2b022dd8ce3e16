//! A streaming exec (`kubectl exec`, `crictl exec -it`, `kubectl cp`) through the pod's shim.
//!
//! The same task-API dance as ExecSync (`crate::container::exec`, whose process spec, FIFO
//! directory and clean-up this reuses): Exec with a terminal or FIFOs for the streams the
//! client asked for, Wait (issued before Start; the shim also keeps the exit status until
//! Delete, so no exit is missed), Start, then copies between the FIFOs and the client.
//!
//! * stdout/stderr: copied to the client until every writer of the FIFO is gone; the exit
//!   code is returned only after they are drained, so large outputs are never truncated. A
//!   client that stops reading stops the copy, the pipe fills and the process blocks: crispd
//!   buffers one 64 KiB chunk per stream, never more.
//! * stdin: crispd opens the FIFO's write end once the shim's feed has opened its read end,
//!   and closes it when the client's stdin ends; the shim's feed then closes the process's
//!   stdin after the last byte (what `kubectl cp` relies on). With a terminal, CloseIO is sent
//!   too, which stops the shim's terminal feed.
//! * resize: each size the client sends becomes ResizePty once the process exists (sizes that
//!   arrived earlier wait in the channel); 0×0 is ignored.
//!
//! No exec outlives its session: the work runs on its own task, and when the session's
//! future is dropped (client gone, idle timeout, crispd shutting down) that task SIGKILLs the
//! process, waits for it, deletes it from the shim, stops the copies and removes the FIFOs.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::api;
use containerd_shim_protos::ttrpc;
use crisp_stream::backend::{BoxRead, BoxWrite};
use crisp_stream::{ExecRequest, Streams, TermSize};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::container::exec::{
    self as exec_sync, DRAIN_AFTER_EXIT, Exec, Progress, SHIM_CALL, task_error,
};
use crate::error::{CriError, ErrorKind};
use crate::shim::client::{ShimClient, ctx};

/// Copy buffer per output stream: what crispd holds of a process's output at most.
const CHUNK: usize = 64 * 1024;
/// How long the shim's stdin feed may take to open its end of the FIFO after Start.
const STDIN_OPEN: Duration = Duration::from_secs(10);

/// The session's side tasks; aborted however the session ends.
#[derive(Default)]
struct Tasks(Vec<tokio::task::AbortHandle>);

impl Tasks {
    fn push<T>(&mut self, h: &JoinHandle<T>) {
        self.0.push(h.abort_handle());
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Run `req.cmd` in the container with the client's streams; the exit code once it exited
/// and its output reached the client.
pub async fn exec(d: &super::Runtime, req: ExecRequest, streams: Streams) -> Result<i32, CriError> {
    let rec = crate::container::status::find(&d.containers.store, &req.container_id)?;
    let shim = exec_sync::running_shim(&d.containers, &rec, "Exec")?;
    if req.cmd.is_empty() {
        return Err(CriError::invalid("cmd: empty; Exec needs a command"));
    }
    let bundle = crate::container::bundle::dir(&d.containers.cfg.state, &rec.id);
    let spec = crate::container::bundle::read_spec(&bundle).ok_or_else(|| {
        CriError::internal(format!(
            "Exec: no readable config.json in {}",
            bundle.display()
        ))
    })?;
    let mut process = exec_sync::exec_process(&spec, &req.cmd)?;
    process["terminal"] = serde_json::Value::Bool(req.tty);
    let process = serde_json::to_vec(&process)
        .map_err(|e| CriError::internal(format!("encoding exec process: {e}")))?;
    let exec_id = uuid::Uuid::new_v4().simple().to_string();
    let x = Exec {
        shim,
        cid: rec.id.clone(),
        exec_id: exec_id.clone(),
        dir: exec_sync::fifo_dir(&d.containers, &rec.id, &exec_id),
    };
    let owner = mapped_root(&spec);
    tracing::debug!(container_id = %rec.id, %exec_id, cmd = ?req.cmd, tty = req.tty, "streaming exec");
    // Dropping `_session` (this future dropped) tells the task to kill the process.
    let (_session, session_gone) = oneshot::channel::<()>();
    let sessions = Arc::clone(&d.sessions);
    let task = tokio::spawn(async move {
        let _live = sessions.enter();
        let mut progress = Progress::default();
        let mut tasks = Tasks::default();
        let r = run(
            &x,
            &req,
            process,
            streams,
            owner,
            session_gone,
            &mut progress,
            &mut tasks,
        )
        .await;
        drop(tasks);
        exec_sync::cleanup(&x, progress).await;
        r
    });
    task.await
        .map_err(|e| CriError::internal(format!("Exec task: {e}")))?
}

/// The host uid/gid the container's root maps to, when the pod has a user namespace: the
/// exec's FIFOs are given to it, so a process that reopens its stdio (`/proc/self/fd/1`)
/// may.
fn mapped_root(spec: &serde_json::Value) -> Option<(u32, u32)> {
    let host_of = |key: &str| {
        spec["linux"][key].as_array()?.iter().find_map(|m| {
            (m["containerID"].as_u64()? == 0)
                .then(|| m["hostID"].as_u64())
                .flatten()
                .and_then(|h| u32::try_from(h).ok())
        })
    };
    Some((host_of("uidMappings")?, host_of("gidMappings")?))
}

fn io_err(what: &str, p: &Path, e: io::Error) -> CriError {
    CriError::internal(format!("Exec: {what} {}: {e}", p.display()))
}

/// A FIFO for one of the exec's streams, owned by the pod's mapped root if any.
fn make_fifo(dir: &Path, name: &str, owner: Option<(u32, u32)>) -> Result<PathBuf, CriError> {
    let p = dir.join(name);
    crate::container::logs::mkfifo(&p).map_err(|e| io_err("mkfifo", &p, e))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).map_err(|e| io_err("chown", &p, e))?;
    }
    Ok(p)
}

#[allow(clippy::too_many_arguments)]
async fn run(
    x: &Exec,
    req: &ExecRequest,
    process: Vec<u8>,
    streams: Streams,
    owner: Option<(u32, u32)>,
    mut session_gone: oneshot::Receiver<()>,
    progress: &mut Progress,
    tasks: &mut Tasks,
) -> Result<i32, CriError> {
    let Streams {
        stdin,
        stdout,
        stderr,
        resize,
    } = streams;
    // With a terminal the shim writes everything to stdout.
    let stderr = if req.tty { None } else { stderr };
    let fifos = open_fifos(x, owner, stdin.is_some(), stdout, stderr)?;
    let stdin_path = fifos.stdin.clone();
    let (wait, outs) = add_and_start(x, req, process, fifos, progress, tasks).await?;
    let copies: Vec<JoinHandle<io::Result<u64>>> = outs
        .into_iter()
        .map(|(rx, w)| tokio::spawn(copy_out(rx, w)))
        .collect();
    for c in &copies {
        tasks.push(c);
    }
    if let (Some(r), Some(p)) = (stdin, stdin_path) {
        let h = tokio::spawn(feed_stdin(
            x.shim.clone(),
            x.cid.clone(),
            x.exec_id.clone(),
            p,
            r,
            req.tty,
        ));
        tasks.push(&h);
    }
    if let Some(rx) = resize {
        let h = tokio::spawn(resize_loop(
            x.shim.clone(),
            x.cid.clone(),
            x.exec_id.clone(),
            rx,
            req.tty,
        ));
        tasks.push(&h);
    }
    let waited = tokio::select! {
        r = wait => r.map_err(|e| CriError::internal(format!("Exec wait task: {e}")))?,
        _ = &mut session_gone => return Err(gone(x)),
    };
    let exit = waited.map_err(|e| task_error(&what(x, "waiting for"), e))?;
    progress.exited = true;
    drain(x, copies, &mut session_gone).await?;
    Ok(exit.exit_status as i32)
}

/// Names the call and the exec in an error.
fn what(x: &Exec, call: &str) -> String {
    format!("Exec: {call} exec {} in container {}", x.exec_id, x.cid)
}

/// The exec's FIFOs: a stdin FIFO if the client sends input, read ends for the outputs it
/// wants, and our own write ends, held until the process has its own.
struct Fifos {
    stdin: Option<PathBuf>,
    outs: Vec<(tokio::net::unix::pipe::Receiver, BoxWrite)>,
    paths: [String; 2],
    keep: Vec<tokio::net::unix::pipe::Sender>,
}

fn open_fifos(
    x: &Exec,
    owner: Option<(u32, u32)>,
    stdin: bool,
    stdout: Option<BoxWrite>,
    stderr: Option<BoxWrite>,
) -> Result<Fifos, CriError> {
    std::fs::create_dir_all(&x.dir).map_err(|e| io_err("creating", &x.dir, e))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&x.dir, Some(uid), Some(gid))
            .map_err(|e| io_err("chown", &x.dir, e))?;
    }
    let mut f = Fifos {
        stdin: if stdin {
            Some(make_fifo(&x.dir, "stdin", owner)?)
        } else {
            None
        },
        outs: Vec::new(),
        paths: [String::new(), String::new()],
        keep: Vec::new(),
    };
    for (i, (name, w)) in [("stdout", stdout), ("stderr", stderr)]
        .into_iter()
        .enumerate()
    {
        let Some(w) = w else { continue };
        let p = make_fifo(&x.dir, name, owner)?;
        // Read end first (needs no writer), then a writer of our own until the process has
        // its own, so the reader does not see EOF before the shim opened the FIFO.
        let rx = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(&p)
            .map_err(|e| io_err("opening", &p, e))?;
        f.keep.push(
            tokio::net::unix::pipe::OpenOptions::new()
                .open_sender(&p)
                .map_err(|e| io_err("opening", &p, e))?,
        );
        f.paths[i] = p.display().to_string();
        f.outs.push((rx, w));
    }
    Ok(f)
}

type WaitTask = JoinHandle<Result<api::WaitResponse, ttrpc::Error>>;
type Outs = Vec<(tokio::net::unix::pipe::Receiver, BoxWrite)>;

/// Add the exec to the task and start it; its wait, and the outputs to copy.
async fn add_and_start(
    x: &Exec,
    req: &ExecRequest,
    process: Vec<u8>,
    f: Fifos,
    progress: &mut Progress,
    tasks: &mut Tasks,
) -> Result<(WaitTask, Outs), CriError> {
    let Fifos {
        stdin,
        outs,
        paths: [out_path, err_path],
        keep,
    } = f;
    x.shim
        .task()
        .exec(
            ctx(SHIM_CALL),
            &exec_sync::exec_request(
                &x.cid,
                &x.exec_id,
                req.tty,
                [
                    stdin
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    out_path,
                    err_path,
                ],
                process,
            ),
        )
        .await
        .map_err(|e| task_error(&what(x, "creating"), e))?;
    progress.added = true;
    let wait = spawn_wait(&x.shim, &x.cid, &x.exec_id);
    tasks.push(&wait);
    let started = x
        .shim
        .task()
        .start(
            ctx(SHIM_CALL),
            &api::StartRequest {
                id: x.cid.clone(),
                exec_id: x.exec_id.clone(),
                ..Default::default()
            },
        )
        .await;
    drop(keep);
    started.map_err(|e| task_error(&what(x, "starting"), e))?;
    progress.started = true;
    Ok((wait, outs))
}

/// After the exit: let the output copies finish (bounded), unless the session goes first.
async fn drain(
    x: &Exec,
    copies: Vec<JoinHandle<io::Result<u64>>>,
    session_gone: &mut oneshot::Receiver<()>,
) -> Result<(), CriError> {
    for c in copies {
        let abort = c.abort_handle();
        tokio::select! {
            r = tokio::time::timeout(DRAIN_AFTER_EXIT, c) => match r {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => tracing::debug!(exec_id = %x.exec_id, error = %e, "exec output copy ended early"),
                Ok(Err(e)) => return Err(CriError::internal(format!("Exec output task: {e}"))),
                Err(_) => {
                    abort.abort();
                    tracing::warn!(exec_id = %x.exec_id, "exec output still open {DRAIN_AFTER_EXIT:?} after exit; stopped copying");
                }
            },
            _ = &mut *session_gone => return Err(gone(x)),
        }
    }
    Ok(())
}

fn gone(x: &Exec) -> CriError {
    CriError::new(
        ErrorKind::Unavailable,
        format!(
            "Exec {} in container {}: the session ended; the process was killed",
            x.exec_id, x.cid
        ),
    )
}

/// Wait for the exec's exit on its own task, so the request is on its way before Start.
fn spawn_wait(
    shim: &ShimClient,
    cid: &str,
    exec_id: &str,
) -> JoinHandle<Result<api::WaitResponse, ttrpc::Error>> {
    let (shim, req) = (
        shim.clone(),
        api::WaitRequest {
            id: cid.to_string(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        },
    );
    // No deadline: the process may run for as long as the session lasts.
    tokio::spawn(async move {
        shim.task()
            .wait(ttrpc::context::Context::default(), &req)
            .await
    })
}

/// One output FIFO to the client, until every writer is gone; then the client's stream is
/// closed (its FIN tells the client this stream is complete).
async fn copy_out(rx: tokio::net::unix::pipe::Receiver, mut w: BoxWrite) -> io::Result<u64> {
    let mut r = BufReader::with_capacity(CHUNK, rx);
    let n = tokio::io::copy_buf(&mut r, &mut w).await?;
    w.flush().await?;
    w.shutdown().await?;
    Ok(n)
}

/// The client's stdin into the FIFO, then end the process's stdin.
async fn feed_stdin(
    shim: ShimClient,
    cid: String,
    exec_id: String,
    path: PathBuf,
    mut r: BoxRead,
    tty: bool,
) {
    // The shim's feed opens the read end after Start; opening the write end before would
    // either block or (read-write) let bytes sit in a FIFO nobody has opened yet.
    let deadline = tokio::time::Instant::now() + STDIN_OPEN;
    let mut tx = loop {
        match tokio::net::unix::pipe::OpenOptions::new().open_sender(&path) {
            Ok(tx) => break tx,
            Err(e)
                if e.raw_os_error() == Some(libc::ENXIO)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => {
                tracing::warn!(%exec_id, error = %e, "exec stdin: the shim never opened its end");
                return;
            }
        }
    };
    tracing::debug!(%exec_id, "exec stdin FIFO open");
    match tokio::io::copy(&mut r, &mut tx).await {
        Ok(n) => tracing::debug!(%exec_id, bytes = n, "exec stdin ended"),
        // The process closed its stdin or exited: nothing more to feed.
        Err(e) => tracing::debug!(%exec_id, error = %e, "exec stdin copy stopped"),
    }
    drop(tx);
    // Non-TTY: the FIFO's EOF makes the shim's feed close the process's stdin after the last
    // byte; CloseIO there would drop the pipe before the feed copied what is still in the
    // FIFO. A terminal's feed does not end on EOF, so it gets CloseIO.
    if tty {
        let req = api::CloseIORequest {
            id: cid,
            exec_id: exec_id.clone(),
            stdin: true,
            ..Default::default()
        };
        if let Err(e) = shim.task().close_io(ctx(SHIM_CALL), &req).await {
            tracing::debug!(%exec_id, error = %e, "exec CloseIO");
        }
    }
}

/// Terminal sizes from the client, as ResizePty on the process (exec id empty: the container's
/// init process, for attach).
pub(crate) async fn resize_loop(
    shim: ShimClient,
    cid: String,
    exec_id: String,
    mut rx: mpsc::Receiver<TermSize>,
    tty: bool,
) {
    while let Some(size) = rx.recv().await {
        if !tty || (size.width == 0 && size.height == 0) {
            continue;
        }
        let req = api::ResizePtyRequest {
            id: cid.clone(),
            exec_id: exec_id.clone(),
            width: u32::from(size.width),
            height: u32::from(size.height),
            ..Default::default()
        };
        if let Err(e) = shim.task().resize_pty(ctx(SHIM_CALL), &req).await {
            tracing::debug!(container_id = %cid, %exec_id, error = %e, "ResizePty");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_root_comes_from_the_spec() {
        let spec = serde_json::json!({"linux": {
            "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
            "gidMappings": [{"containerID": 0, "hostID": 200000, "size": 65536}]
        }});
        assert_eq!(mapped_root(&spec), Some((100000, 200000)));
        assert_eq!(mapped_root(&serde_json::json!({"linux": {}})), None);
    }
}
