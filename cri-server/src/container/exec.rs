//! ExecSync: run a command in a running container and hand back its output and exit code.
//!
//! As containerd's CRI plugin does: the command runs as an exec process of the container's
//! task on the pod's shim (Exec, Start, Wait with an exec id of our own), with the container's
//! own process settings (env, cwd, user, capabilities, rlimits, no_new_privs) and the CRI
//! `cmd` as its arguments. Its stdout and stderr go to two FIFOs that crispd reads into
//! buffers capped at [`MAX_EXEC_OUTPUT`] each. On timeout the exec process is SIGKILLed and the
//! call fails with DeadlineExceeded. Whatever happens, the exec is deleted from the shim and
//! its FIFOs removed; that work runs on its own task, so a client that hangs up mid-call does
//! not leave an exec or FIFO behind.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::ttrpc;
use crisp_proto::cri::v1::{ExecSyncRequest, ExecSyncResponse};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;

use crate::container::service::ContainerService;
use crate::container::status as containers;
use crate::error::{CriError, ErrorKind};
use crate::shim::client::{ShimClient, ctx};
use crate::store::records::{ContainerRecord, ContainerState};

/// Output kept per stream. CRI asks runtimes to cap ExecSync output at 16 MiB and to drop the
/// rest without failing the call (CVE-2022-1708, CVE-2022-31030); containerd does the same.
/// Reading goes on past the cap, so a chatty command never blocks on a full pipe.
pub const MAX_EXEC_OUTPUT: usize = 16 * 1024 * 1024;

/// The most the two streams may carry together. kubelet (and crispd's own server) refuse gRPC
/// messages over 16 MiB, so a response holding 16 MiB of each stream could never be delivered:
/// the streams share this budget, less room for the message's own framing.
pub const MAX_EXEC_RESPONSE: usize = 16 * 1024 * 1024 - 4096;

/// Deadline of one ordinary shim call (Exec, Start, Kill, Delete, State).
pub(crate) const SHIM_CALL: Duration = Duration::from_secs(30);
/// After the exec process exits, how long to wait for its output to end. A background child
/// that inherited the pipe keeps it open forever; containerd bounds this the same way
/// (`drain_exec_sync_io_timeout`).
pub(crate) const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(10);
/// After SIGKILL, how long to wait for the exec process to be reaped before deleting it.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// The OCI type containerd gives an exec's process spec.
pub(crate) const PROCESS_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/Process";

/// A shim (ttrpc) failure as a CRI error: the shim's own code carries over, a broken
/// connection is Unavailable. `what` names the call and object.
pub fn task_error(what: &str, e: ttrpc::Error) -> CriError {
    crate::shim::client::ShimCallError::task(what, e).into()
}

use crate::shim::client::is_not_found;

/// The container must be Running, with a live shim connection for its pod.
pub fn running_shim(
    d: &ContainerService,
    rec: &ContainerRecord,
    call: &str,
) -> Result<ShimClient, CriError> {
    if rec.state != ContainerState::Running {
        return Err(CriError::precondition(format!(
            "{call}: container {} is {}, not running",
            rec.id,
            state_name(rec.state)
        )));
    }
    d.shims.get(&rec.pod_id).ok_or_else(|| {
        CriError::precondition(format!(
            "{call}: container {}: pod {} has no live shim",
            rec.id, rec.pod_id
        ))
    })
}

pub fn state_name(s: ContainerState) -> &'static str {
    match s {
        ContainerState::Created => "CONTAINER_CREATED",
        ContainerState::Running => "CONTAINER_RUNNING",
        ContainerState::Exited => "CONTAINER_EXITED",
        ContainerState::Unknown => "CONTAINER_UNKNOWN",
    }
}

/// What one stream produced: the first [`MAX_EXEC_OUTPUT`] bytes, and how many were dropped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Bounded {
    pub data: Vec<u8>,
    pub dropped: u64,
}

/// Read `r` to its end, keeping at most `cap` bytes. Excess output is dropped, not an error
/// (see [`MAX_EXEC_OUTPUT`]); reading continues so the writer never blocks. A read error ends
/// the stream with what was read so far.
pub async fn read_bounded<R: AsyncRead + Unpin>(mut r: R, cap: usize) -> Bounded {
    let mut out = Bounded::default();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "reading exec output");
                break;
            }
        };
        let take = cap.saturating_sub(out.data.len()).min(n);
        out.data.extend_from_slice(&chunk[..take]);
        out.dropped += (n - take) as u64;
    }
    out
}

/// Trim the two outputs to [`MAX_EXEC_RESPONSE`] together: each is sure of half; what one
/// does not use, the other may. Returns the bytes dropped.
pub fn fit_response(stdout: &mut Vec<u8>, stderr: &mut Vec<u8>, budget: usize) -> u64 {
    let (so, se) = (stdout.len(), stderr.len());
    if so + se <= budget {
        return 0;
    }
    let half = budget / 2;
    if so <= half {
        stderr.truncate(budget - so);
    } else if se <= half {
        stdout.truncate(budget - se);
    } else {
        stdout.truncate(half);
        stderr.truncate(budget - half);
    }
    (so + se - stdout.len() - stderr.len()) as u64
}

/// The exec's OCI process: the container's own process (env, cwd, user, capabilities,
/// rlimits, no_new_privs, AppArmor/SELinux labels, oom_score_adj) with `cmd` as its
/// arguments and no terminal, as containerd derives it.
pub fn exec_process(
    container_spec: &serde_json::Value,
    cmd: &[String],
) -> Result<serde_json::Value, CriError> {
    let mut p = container_spec
        .get("process")
        .filter(|p| p.is_object())
        .cloned()
        .ok_or_else(|| CriError::internal("the container's OCI spec has no process"))?;
    p["args"] = serde_json::json!(cmd);
    p["terminal"] = serde_json::Value::Bool(false);
    if let Some(o) = p.as_object_mut() {
        o.remove("consoleSize");
        o.remove("commandLine");
    }
    Ok(p)
}

/// How far one exec got, so cleanup undoes exactly that.
#[derive(Default)]
pub(crate) struct Progress {
    pub added: bool,
    pub started: bool,
    pub exited: bool,
    pub readers: Vec<JoinHandle<Bounded>>,
}

pub async fn exec_sync(
    d: &Arc<ContainerService>,
    req: ExecSyncRequest,
) -> Result<ExecSyncResponse, CriError> {
    let rec = containers::find(&d.store, &req.container_id)?;
    let shim = running_shim(d, &rec, "ExecSync")?;
    if req.cmd.is_empty() {
        return Err(CriError::invalid("cmd: empty; ExecSync needs a command"));
    }
    if req.timeout < 0 {
        return Err(CriError::invalid(format!(
            "timeout: {} is negative (seconds; 0 means none)",
            req.timeout
        )));
    }
    let timeout = (req.timeout > 0).then(|| Duration::from_secs(req.timeout as u64));

    // The container's OCI spec, as the runtime saw it, is in its bundle.
    let bundle = crate::container::bundle::dir(&d.cfg.state, &rec.id);
    let spec = crate::container::bundle::read_spec(&bundle).ok_or_else(|| {
        CriError::internal(format!(
            "ExecSync: no readable config.json in {}",
            bundle.display()
        ))
    })?;
    let process = serde_json::to_vec(&exec_process(&spec, &req.cmd)?)
        .map_err(|e| CriError::internal(format!("encoding exec process: {e}")))?;

    let exec_id = uuid::Uuid::new_v4().simple().to_string();
    let dir = fifo_dir(d, &rec.id, &exec_id);
    tracing::debug!(%exec_id, cmd = ?req.cmd, "exec");
    // Its own task: cleanup must run even if the caller goes away and this future is dropped.
    // Dropping `_caller` (this future gone: the client hung up, or its gRPC deadline, which
    // kubelet sets to the exec timeout, passed) stops the command at once, so a caller that
    // checks right after its own timeout finds it gone.
    let (_caller, caller_gone) = tokio::sync::oneshot::channel::<()>();
    let x = Exec {
        shim,
        cid: rec.id.clone(),
        exec_id,
        dir,
    };
    let task = tokio::spawn(async move {
        let mut progress = Progress::default();
        let r = run(&x, process, timeout, caller_gone, &mut progress).await;
        cleanup(&x, progress).await;
        r
    });
    task.await
        .map_err(|e| CriError::internal(format!("ExecSync task: {e}")))?
}

/// Where one exec's FIFOs go: `<state>/exec/<container>-<exec id>`. Shared with the streaming
/// exec (`crate::stream::exec`).
pub(crate) fn fifo_dir(d: &ContainerService, container_id: &str, exec_id: &str) -> PathBuf {
    let root = d.cfg.state.join("exec");
    // FIFO dirs of execs a previous crispd was running when it died: nobody reads them now.
    // Swept once, before this process's first exec makes a dir of its own.
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| sweep(&root));
    root.join(format!("{container_id}-{exec_id}"))
}

/// One exec: where it runs and its FIFO directory.
pub(crate) struct Exec {
    pub shim: ShimClient,
    pub cid: String,
    pub exec_id: String,
    pub dir: PathBuf,
}

async fn run(
    x: &Exec,
    process: Vec<u8>,
    timeout: Option<Duration>,
    caller_gone: tokio::sync::oneshot::Receiver<()>,
    progress: &mut Progress,
) -> Result<ExecSyncResponse, CriError> {
    let (paths, keep) = open_fifos(&x.dir, progress)?;
    add_and_start(x, process, &paths, keep, progress).await?;
    let exit = wait(x, timeout, caller_gone).await?;
    progress.exited = true;
    let (stdout, stderr) = collect_output(&x.exec_id, progress).await?;
    Ok(ExecSyncResponse {
        stdout,
        stderr,
        exit_code: exit.exit_status as i32,
    })
}

fn io_err(what: &str, p: &Path, e: io::Error) -> CriError {
    CriError::internal(format!("ExecSync: {what} {}: {e}", p.display()))
}

/// The exec's stdout and stderr FIFOs in `dir`, each with its reader started. Read ends
/// first (a non-blocking open needs no writer), then a write end of our own on each (returned):
/// the shim opens its writer only at Start, and a reader with no writer at all would see EOF
/// at once. Ours are closed once the process has its own.
fn open_fifos(
    dir: &Path,
    progress: &mut Progress,
) -> Result<([PathBuf; 2], Vec<std::fs::File>), CriError> {
    std::fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
    let paths: [PathBuf; 2] = [dir.join("stdout"), dir.join("stderr")];
    let mut keep = Vec::with_capacity(2);
    for p in &paths {
        crate::container::logs::mkfifo(p).map_err(|e| io_err("mkfifo", p, e))?;
        let rx = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(p)
            .map_err(|e| io_err("opening", p, e))?;
        progress
            .readers
            .push(tokio::spawn(read_bounded(rx, MAX_EXEC_OUTPUT)));
        use std::os::unix::fs::OpenOptionsExt;
        let w = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(p)
            .map_err(|e| io_err("opening", p, e))?;
        keep.push(w);
    }
    Ok((paths, keep))
}

/// The shim's ExecProcessRequest for `process` (JSON OCI Process) with stdio FIFO paths
/// `[stdin, stdout, stderr]` (empty = not connected). Shared with the streaming exec.
pub(crate) fn exec_request(
    cid: &str,
    exec_id: &str,
    terminal: bool,
    [stdin, stdout, stderr]: [String; 3],
    process: Vec<u8>,
) -> api::ExecProcessRequest {
    api::ExecProcessRequest {
        id: cid.to_string(),
        exec_id: exec_id.to_string(),
        terminal,
        stdin,
        stdout,
        stderr,
        spec: Some(Any {
            type_url: PROCESS_TYPE_URL.to_string(),
            value: process,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

/// Exec (add the process to the container) and Start it on the shim; our own FIFO write ends
/// are dropped once the process holds its own.
async fn add_and_start(
    x: &Exec,
    process: Vec<u8>,
    paths: &[PathBuf; 2],
    keep: Vec<std::fs::File>,
    progress: &mut Progress,
) -> Result<(), CriError> {
    let (shim, cid, exec_id) = (&x.shim, x.cid.as_str(), x.exec_id.as_str());
    let what = |call: &str| format!("ExecSync: {call} exec {exec_id} in container {cid}");
    let exec = exec_request(
        cid,
        exec_id,
        false,
        [
            String::new(),
            paths[0].display().to_string(),
            paths[1].display().to_string(),
        ],
        process,
    );
    shim.task()
        .exec(ctx(SHIM_CALL), &exec)
        .await
        .map_err(|e| task_error(&what("creating"), e))?;
    progress.added = true;
    let start = api::StartRequest {
        id: cid.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    };
    let started = shim.task().start(ctx(SHIM_CALL), &start).await;
    drop(keep);
    started.map_err(|e| task_error(&what("starting"), e))?;
    progress.started = true;
    Ok(())
}

/// Wait for the exec's exit, bounded by the CRI timeout and by the caller staying.
async fn wait(
    x: &Exec,
    timeout: Option<Duration>,
    caller_gone: tokio::sync::oneshot::Receiver<()>,
) -> Result<api::WaitResponse, CriError> {
    let (cid, exec_id) = (x.cid.as_str(), x.exec_id.as_str());
    // No deadline on the ttrpc call itself: the CRI timeout (if any) bounds it here.
    let wait_req = api::WaitRequest {
        id: cid.to_string(),
        exec_id: exec_id.to_string(),
        ..Default::default()
    };
    let wait = x
        .shim
        .task()
        .wait(ttrpc::context::Context::default(), &wait_req);
    // No timeout: a deadline no call reaches.
    let limit = timeout.unwrap_or(Duration::from_secs(100 * 365 * 86_400));
    let waited = tokio::select! {
        r = wait => r,
        _ = tokio::time::sleep(limit) => {
            return Err(CriError::new(
                ErrorKind::DeadlineExceeded,
                format!(
                    "ExecSync in container {cid}: timeout {}s exceeded; the command was killed",
                    limit.as_secs()
                ),
            ));
        }
        _ = caller_gone => {
            return Err(CriError::new(
                ErrorKind::DeadlineExceeded,
                format!("ExecSync in container {cid}: the caller went away; the command was killed"),
            ));
        }
    };
    let what = format!("ExecSync: waiting for exec {exec_id} in container {cid}");
    waited.map_err(|e| task_error(&what, e))
}

/// The readers' output once the exec exited (each bounded; a reader still busy after
/// [`DRAIN_AFTER_EXIT`] is stopped), trimmed to fit one response: (stdout, stderr).
async fn collect_output(
    exec_id: &str,
    progress: &mut Progress,
) -> Result<(Vec<u8>, Vec<u8>), CriError> {
    let mut outs = Vec::with_capacity(2);
    for h in std::mem::take(&mut progress.readers) {
        let abort = h.abort_handle();
        match tokio::time::timeout(DRAIN_AFTER_EXIT, h).await {
            Ok(Ok(b)) => outs.push(b),
            Ok(Err(e)) => return Err(CriError::internal(format!("ExecSync output: {e}"))),
            Err(_) => {
                // Something the command left behind still holds the pipe: stop reading.
                abort.abort();
                tracing::warn!(%exec_id, "exec output still open {DRAIN_AFTER_EXIT:?} after exit; dropped the rest");
                outs.push(Bounded::default());
            }
        }
    }
    let mut stderr = outs.pop().unwrap_or_default();
    let mut stdout = outs.pop().unwrap_or_default();
    let trimmed = fit_response(&mut stdout.data, &mut stderr.data, MAX_EXEC_RESPONSE);
    if stdout.dropped > 0 || stderr.dropped > 0 || trimmed > 0 {
        tracing::info!(
            %exec_id,
            stdout_dropped = stdout.dropped,
            stderr_dropped = stderr.dropped,
            trimmed,
            "exec output over the {MAX_EXEC_OUTPUT} byte cap; dropped the excess"
        );
    }
    Ok((stdout.data, stderr.data))
}

/// Remove every exec FIFO directory under `root` (crash leftovers).
fn sweep(root: &Path) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        match std::fs::remove_dir_all(&p) {
            Ok(()) => tracing::info!(dir = %p.display(), "removed a stale exec FIFO directory"),
            Err(err) => {
                tracing::warn!(dir = %p.display(), error = %err, "removing a stale exec FIFO directory")
            }
        }
    }
}

/// Undo what [`run`] did, whatever stopped it: kill a still-running exec and wait for it,
/// delete it from the shim, stop the readers, remove the FIFOs.
pub(crate) async fn cleanup(x: &Exec, p: Progress) {
    let (shim, cid, exec_id, dir) = (&x.shim, x.cid.as_str(), x.exec_id.as_str(), x.dir.as_path());
    if p.added {
        if p.started && !p.exited {
            let kill = shim
                .task()
                .kill(
                    ctx(SHIM_CALL),
                    &api::KillRequest {
                        id: cid.to_string(),
                        exec_id: exec_id.to_string(),
                        signal: libc::SIGKILL as u32,
                        all: false,
                        ..Default::default()
                    },
                )
                .await;
            // NotFound: it exited on its own in the meantime.
            if let Err(e) = kill
                && !is_not_found(&e)
            {
                tracing::warn!(%exec_id, error = %e, "killing exec");
            }
            let wait_req = api::WaitRequest {
                id: cid.to_string(),
                exec_id: exec_id.to_string(),
                ..Default::default()
            };
            if let Err(e) = shim.task().wait(ctx(KILL_WAIT), &wait_req).await {
                tracing::warn!(%exec_id, error = %e, "waiting for killed exec");
            }
        }
        let del = shim
            .task()
            .delete(
                ctx(SHIM_CALL),
                &api::DeleteRequest {
                    id: cid.to_string(),
                    exec_id: exec_id.to_string(),
                    ..Default::default()
                },
            )
            .await;
        if let Err(e) = del
            && !is_not_found(&e)
        {
            tracing::warn!(%exec_id, error = %e, "deleting exec");
        }
    }
    for h in p.readers {
        h.abort();
    }
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "removing exec FIFOs");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::daemon::Daemon;

    #[tokio::test]
    async fn output_is_capped_and_the_rest_dropped() {
        let input = [b'x'; 100];
        let b = read_bounded(&input[..], 64).await;
        assert_eq!(b.data.len(), 64);
        assert_eq!(b.dropped, 36);
        let b = read_bounded(&b"short"[..], 64).await;
        assert_eq!(
            b,
            Bounded {
                data: b"short".to_vec(),
                dropped: 0
            }
        );
    }

    #[test]
    fn sweep_removes_leftover_fifo_dirs() {
        let d = tempfile::tempdir().expect("tempdir");
        let old = d.path().join("exec/c1-abc");
        std::fs::create_dir_all(&old).expect("mkdir");
        crate::container::logs::mkfifo(&old.join("stdout")).expect("mkfifo");
        sweep(&d.path().join("exec"));
        assert!(!old.exists());
        sweep(&d.path().join("absent"));
    }

    #[test]
    fn both_streams_fit_one_response() {
        let (mut o, mut e) = (vec![1u8; 10], vec![2u8; 3]);
        assert_eq!(fit_response(&mut o, &mut e, 20), 0);
        assert_eq!((o.len(), e.len()), (10, 3));
        // A small stderr leaves the rest to stdout.
        assert_eq!(fit_response(&mut o, &mut e, 8), 5);
        assert_eq!((o.len(), e.len()), (5, 3));
        // Both big: half each.
        let (mut o, mut e) = (vec![1u8; 100], vec![2u8; 100]);
        fit_response(&mut o, &mut e, 11);
        assert_eq!((o.len(), e.len()), (5, 6));
        // A small stdout leaves the rest to stderr.
        let (mut o, mut e) = (vec![1u8; 2], vec![2u8; 100]);
        fit_response(&mut o, &mut e, 10);
        assert_eq!((o.len(), e.len()), (2, 8));
    }

    /// A writer in small pieces past the cap is drained to its end (it never blocks).
    #[tokio::test]
    async fn a_long_writer_is_drained() {
        let (mut w, r) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for _ in 0..300 {
                w.write_all(&[b'y'; 1000]).await.expect("write");
            }
        });
        let b = read_bounded(r, 10_000).await;
        writer
            .await
            .expect("writer finished, so it was never stuck");
        assert_eq!(b.data.len(), 10_000);
        assert_eq!(b.dropped, 290_000);
    }

    #[test]
    fn exec_process_keeps_the_container_settings() {
        let spec = serde_json::json!({
            "ociVersion": "1.1.0",
            "process": {
                "terminal": true,
                "consoleSize": {"height": 1, "width": 2},
                "user": {"uid": 1000, "gid": 1000, "additionalGids": [10]},
                "args": ["sleep", "inf"],
                "env": ["PATH=/bin", "A=b"],
                "cwd": "/work",
                "capabilities": {"bounding": ["CAP_KILL"]},
                "noNewPrivileges": true
            },
            "root": {"path": "rootfs"}
        });
        let p = exec_process(&spec, &["sh".into(), "-c".into(), "id".into()]).expect("process");
        assert_eq!(p["args"], serde_json::json!(["sh", "-c", "id"]));
        assert_eq!(p["terminal"], false);
        assert!(p.get("consoleSize").is_none());
        assert_eq!(p["user"]["uid"], 1000);
        assert_eq!(p["env"][1], "A=b");
        assert_eq!(p["cwd"], "/work");
        assert_eq!(p["capabilities"]["bounding"][0], "CAP_KILL");
        assert_eq!(p["noNewPrivileges"], true);
        let e = exec_process(&serde_json::json!({}), &["true".into()]).expect_err("no process");
        assert_eq!(e.kind, ErrorKind::Internal);
    }

    /// ExecSync of `true` in container `id`, which must fail (`why` names the case).
    async fn exec_true_err(d: &Arc<ContainerService>, id: &str, why: &str) -> CriError {
        exec_sync(
            d,
            ExecSyncRequest {
                container_id: id.into(),
                cmd: vec!["true".into()],
                timeout: 0,
            },
        )
        .await
        .expect_err(why)
    }

    #[tokio::test]
    async fn calls_check_the_container_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Daemon::for_test(dir.path()).containers;
        let e = exec_true_err(&d, "nope", "unknown").await;
        assert_eq!(e.kind, ErrorKind::NotFound);
        let mut rec = test_record("c1", ContainerState::Exited);
        d.store.put("c1", &rec).expect("put");
        let e = exec_true_err(&d, "c1", "exited").await;
        assert_eq!(e.kind, ErrorKind::FailedPrecondition);
        assert!(e.message.contains("CONTAINER_EXITED"), "{}", e.message);
        rec.state = ContainerState::Running;
        d.store.put("c1", &rec).expect("put");
        let e = exec_true_err(&d, "c1", "no shim").await;
        assert_eq!(e.kind, ErrorKind::FailedPrecondition);
        assert!(e.message.contains("shim"), "{}", e.message);
    }

    pub(crate) fn test_record(id: &str, state: ContainerState) -> ContainerRecord {
        ContainerRecord {
            name: format!("n-{id}"),
            started_at: 2,
            image: "busybox".into(),
            image_ref: "sha256:abc".into(),
            pid: Some(7),
            ..ContainerRecord::for_test(id, "p1", state)
        }
    }
}
