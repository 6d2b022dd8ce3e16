//! The one release of what a pod owns, used alike by RunPodSandbox's undo, StopPodSandbox,
//! RemovePodSandbox and start-up recovery. The pod's record lists what it owns ([`Owned`]:
//! ID range, network, files, shim, pause), each added before it is acquired; [`release`]
//! undoes the list in reverse, one named step per item, and drops each item from the list as
//! it goes. Stop releases the pause and the network (after the containers); Remove the rest,
//! then the record. Every step is idempotent, so a retry or a crash at any point only repeats
//! work. Each pod's transitions run under its own lock (held by the callers); the store is only
//! touched in short transactions between the slow steps.

use std::path::Path;
use std::time::Duration;

use containerd_shim_protos::sandbox_api::{ShutdownSandboxRequest, StopSandboxRequest};

use crate::error::CriError;
use crate::network::cni::AttachRequest;
use crate::pod::service::PodService;
use crate::shim::client::{ShimClient, ctx};
use crate::store::records::{Owned, PodRecord, PodState, ShimRecord};

/// How long the pause gets after SIGTERM before SIGKILL.
const PAUSE_STOP_SECS: u32 = 2;
/// Deadline of one sandbox ttrpc call.
const SHIM_CALL: Duration = Duration::from_secs(10);

/// Run one named undo step; log its outcome by name.
fn step(pod_id: &str, name: &'static str, r: Result<(), String>) -> Result<(), CriError> {
    match r {
        Ok(()) => {
            tracing::debug!(pod_id, step = name, "done");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(pod_id, step = name, error = %e, "failed");
            Err(CriError::internal(format!("pod {pod_id}: {name}: {e}")))
        }
    }
}

/// CNI DEL (from the cached result, so it works after a restart) and removal of the netns.
/// A failed DEL keeps the netns (a retry can DEL again) unless `force` (undo of a failed
/// RunPodSandbox, whose ADD never completed: nothing to retry for).
pub async fn release_network(
    d: &PodService,
    pod_id: &str,
    netns: Option<&str>,
    force: bool,
) -> Result<(), CriError> {
    let Some(netns) = netns.map(str::to_string) else {
        return Ok(());
    };
    if d.cni.has_cache(pod_id) || Path::new(&netns).exists() {
        let cni = std::sync::Arc::clone(&d.cni);
        let req = AttachRequest {
            pod_id: pod_id.to_string(),
            netns: netns.clone(),
            ifname: "eth0".into(),
            args: Default::default(),
            port_mappings: vec![],
        };
        // Plugins are processes: run them off the async workers, with no lock on the store.
        let r = tokio::task::spawn_blocking(move || cni.del(&req))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let r = step(pod_id, "cni del", r);
        if !force {
            r?;
        }
    }
    let r = crate::network::netns::remove(Path::new(&netns)).map_err(|e| e.to_string());
    step(pod_id, "remove netns", r)
}

/// The pod's shim: the live connection, or a reconnection to the recorded address.
pub async fn shim_of(d: &PodService, pod_id: &str, address: Option<&str>) -> Option<ShimClient> {
    if let Some(s) = d.shims.get(pod_id) {
        return Some(s);
    }
    let (addr, pid) = shim_location(d, pod_id, address);
    let addr = addr?;
    match ShimClient::connect_with_pid(&addr, pid).await {
        Ok(s) => {
            d.shims.insert(pod_id, s.clone());
            Some(s)
        }
        Err(e) => {
            tracing::debug!(pod_id, error = %e, "shim not reachable");
            None
        }
    }
}

/// Where the pod's shim listens and its pid: from the caller, the shim record, or the files
/// the shim's `start` writes in the pod dir (a crash between the shim's start and the record
/// leaves only those).
pub fn shim_location(
    d: &PodService,
    pod_id: &str,
    address: Option<&str>,
) -> (Option<String>, Option<u32>) {
    let rec = d.store.get::<ShimRecord>(pod_id).ok().flatten();
    let dir = crate::pod::files::pod_dir(&d.cfg.state, pod_id);
    let addr = address
        .map(str::to_string)
        .or_else(|| rec.as_ref().map(|r| r.address.clone()))
        .or_else(|| {
            std::fs::read_to_string(dir.join("address"))
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        });
    let pid = rec
        .and_then(|r| r.pid)
        .or_else(|| crate::shim::client::read_pid(&dir.join("shim.pid")));
    (addr, pid)
}

/// Stop the pause process through the shim's sandbox service. A shim that is gone took its
/// pause with it (the pause is the shim's child and dies with it... or is killed below).
pub async fn stop_pause(d: &PodService, rec: &PodRecord) -> Result<(), CriError> {
    let Some(shim) = shim_of(d, &rec.id, rec.shim_address.as_deref()).await else {
        kill_pause_if_ours(rec.pause_pid, &rec.id);
        return Ok(());
    };
    let req = StopSandboxRequest {
        sandbox_id: rec.id.clone(),
        timeout_secs: PAUSE_STOP_SECS,
        ..Default::default()
    };
    let call = Duration::from_secs(u64::from(PAUSE_STOP_SECS)) + SHIM_CALL;
    match shim
        .sandbox()
        .stop_sandbox(ctx(call), &req)
        .await
        .map_err(|e| shim.typed(e))
    {
        Ok(_) => Ok(()),
        Err(e) if crate::shim::client::is_not_found(&e) => Ok(()),
        Err(e) if crate::shim::client::is_gone(&e) => {
            d.shims.remove(&rec.id);
            kill_pause_if_ours(rec.pause_pid, &rec.id);
            Ok(())
        }
        Err(e) => {
            Err(crate::shim::client::ShimCallError::sandbox("StopSandbox", &rec.id, e).into())
        }
    }
}

/// SIGKILL a pod's pause by its recorded pid, only if that pid still is *this pod's* pause:
/// every pod's pause is called `pause`, and a dead pause's pid may already belong to another
/// pod's, so its cgroup (named after the pod id by the placement function) must name the pod.
pub fn kill_pause_if_ours(pid: Option<u32>, pod_id: &str) -> bool {
    let Some(p) = pid.filter(|p| *p > 1) else {
        return false;
    };
    let in_pod =
        std::fs::read_to_string(format!("/proc/{p}/cgroup")).is_ok_and(|c| c.contains(pod_id));
    in_pod && kill_if_ours(pid, &[], "pause")
}

/// SIGKILL `pid` only if it still is what we think (its command line names `needles` /
/// its comm is `comm`): a recorded pid may have been reused since.
pub fn kill_if_ours(pid: Option<u32>, needles: &[&str], comm: &str) -> bool {
    let Some(pid) = pid.filter(|p| *p > 1) else {
        return false;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default();
    let pcomm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    // pause is exec'd from a memfd, so its comm is an fd number; its argv[0] is `pause`.
    let argv0 = cmdline.split(' ').next().unwrap_or_default();
    let ours = if needles.is_empty() {
        pcomm.trim() == comm || argv0 == comm
    } else {
        needles.iter().all(|n| cmdline.contains(n))
    };
    if !ours {
        return false;
    }
    let r = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    tracing::info!(pid, comm, ok = r.is_ok(), "killed by recorded pid");
    r.is_ok()
}

/// Whether `pid` is running (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    crate::util::process_alive(pid)
}

/// Give the shim `grace` to exit by itself, then SIGKILL it by pid (checked to be this pod's
/// shim), and wait for it to be gone: only then is a socket left at its address stale (a
/// process being killed may still accept a connect). Woken by the shim's exit itself (a
/// pidfd), not by polling.
pub async fn end_shim(pid: u32, pod_id: &str, grace: Duration) {
    if crate::util::wait_exit(pid, grace).await {
        return;
    }
    if kill_if_ours(Some(pid), &["-id", pod_id], "") {
        crate::util::wait_exit(pid, Duration::from_secs(2)).await;
    }
}

/// ShutdownSandbox: the shim exits once its tasks are gone and removes its socket. A shim that
/// does not exit in time is killed by its recorded pid (checked to be that pod's shim).
pub async fn shutdown_shim(
    d: &PodService,
    pod_id: &str,
    address: Option<&str>,
) -> Result<(), CriError> {
    let (loc_addr, loc_pid) = shim_location(d, pod_id, address);
    let shim = shim_of(d, pod_id, address).await;
    let pid = shim.as_ref().and_then(ShimClient::pid).or(loc_pid);
    if let Some(shim) = &shim {
        let req = ShutdownSandboxRequest {
            sandbox_id: pod_id.to_string(),
            ..Default::default()
        };
        let res = shim.sandbox().shutdown_sandbox(ctx(SHIM_CALL), &req).await;
        match res.map_err(|e| shim.typed(e)) {
            Ok(_) => {}
            Err(e) if crate::shim::client::is_gone(&e) || crate::shim::client::is_not_found(&e) => {
            }
            Err(e) => {
                tracing::warn!(pod_id, error = %e, "ShutdownSandbox failed; killing the shim")
            }
        }
    }
    d.shims.remove(pod_id);
    // Our connection must not hold the shim's server open while it shuts down.
    drop(shim);
    if let Some(pid) = pid {
        end_shim(pid, pod_id, Duration::from_secs(3)).await;
    }
    // The socket, if the shim could not remove it itself.
    if let Some(a) = loc_addr {
        let p = a.strip_prefix("unix://").unwrap_or(&a).to_string();
        if !p.is_empty() && std::os::unix::net::UnixStream::connect(&p).is_err() {
            let _ = std::fs::remove_file(&p);
        }
    }
    // The shim record goes in the commit that removes the pod's record ([`release`]; recovery
    // deletes it itself): one commit per removal, not two.
    Ok(())
}

/// rmdir the pod's (pause's) cgroup in every hierarchy; a missing one is fine. Containers
/// have their own cgroups (the container code removes them).
pub fn remove_pod_cgroup(d: &PodService, cgroup_parent: &str, pod_id: &str) -> Result<(), String> {
    let driver = crisp_shim::placement::CgroupDriver::from(d.cfg.cgroup_driver);
    let dirs = super::cgroup::dirs(driver, cgroup_parent, pod_id)?;
    let mut errs = Vec::new();
    for p in dirs {
        match std::fs::remove_dir(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errs.push(format!("{}: {e}", p.display())),
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

/// How [`release`] treats a step that fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Undo of a pod that never became ready (a failed RunPodSandbox, or one a crash left
    /// Creating): every step is tried even if an earlier one failed, the network goes even if
    /// CNI DEL fails (its ADD never completed: there is nothing for a retry to DEL), and the
    /// record goes in the end. The first failure is returned after all were tried; whatever it
    /// left is an orphan the next start-up sweeps.
    Undo,
    /// StopPodSandbox and RemovePodSandbox: a failed step stops the release and is returned;
    /// the record keeps what the pod still owns, so a retry resumes there.
    Retry,
    /// Recovery of a pod whose shim died: every step is tried (failures are reported, never
    /// fatal), but a failed CNI DEL keeps the netns so the pod's removal can DEL again.
    BestEffort,
}

impl Mode {
    fn keep_going(self) -> bool {
        self != Mode::Retry
    }
}

/// Release one owned item (idempotent: releasing what is already gone, or was never
/// acquired, succeeds).
async fn release_item(
    d: &PodService,
    rec: &PodRecord,
    item: Owned,
    mode: Mode,
) -> Result<(), CriError> {
    let id = rec.id.as_str();
    match item {
        Owned::Pause => stop_pause(d, rec).await,
        Owned::Shim => shutdown_shim(d, id, rec.shim_address.as_deref()).await,
        Owned::Network => {
            // The netns may exist before an older record names it (a crash in between).
            let netns = rec.netns_path.clone().or_else(|| {
                let p = d.cfg.netns_dir().join(id);
                p.exists().then(|| p.display().to_string())
            });
            release_network(d, id, netns.as_deref(), mode == Mode::Undo).await
        }
        Owned::Files => {
            shim_delete_action(d, id).await;
            let dir = crate::pod::files::pod_dir(&d.cfg.state, id);
            step(id, "remove pod files", remove_pod_files(&dir))
        }
        Owned::IdRange => {
            let r = d.idmap.release(id).map(|_| ()).map_err(|e| e.to_string());
            step(id, "release id range", r)
        }
    }
}

/// Release the `items` the pod owns (in reverse acquisition order), dropping each from the
/// record as it goes; the caller stores the record. In [`Mode::Retry`] the first failure
/// stops and is returned; otherwise every item is tried and the first failure returned.
pub async fn release_items(
    d: &PodService,
    rec: &mut PodRecord,
    items: &[Owned],
    mode: Mode,
) -> Result<(), CriError> {
    let mut first_err = None;
    for item in rec.owned().into_iter().rev().filter(|i| items.contains(i)) {
        match release_item(d, rec, item, mode).await {
            Ok(()) => rec.disown(item),
            Err(e) if !mode.keep_going() => return Err(e),
            Err(e) => {
                tracing::warn!(pod_id = %rec.id, step = item.name(), error = %e, "release step failed");
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Release `items` at once (they need nothing from each other: the pause's stop through the
/// shim and the CNI DEL of the netns), then drop from the record each that was released.
/// Every item is tried; the first failure is returned, and the record keeps what failed.
pub async fn release_together(
    d: &PodService,
    rec: &mut PodRecord,
    items: &[Owned],
    mode: Mode,
) -> Result<(), CriError> {
    let todo: Vec<Owned> = rec
        .owned()
        .into_iter()
        .rev()
        .filter(|i| items.contains(i))
        .collect();
    let done = futures::future::join_all(todo.iter().map(|i| release_item(d, rec, *i, mode))).await;
    let mut first_err = None;
    for (item, r) in todo.into_iter().zip(done) {
        match r {
            Ok(()) => rec.disown(item),
            Err(e) => {
                tracing::warn!(pod_id = %rec.id, step = item.name(), error = %e, "release step failed");
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// The pod's record and its shim's, in one commit.
fn delete_records(d: &PodService, id: &str) -> Result<(), CriError> {
    d.store.delete_two::<PodRecord, ShimRecord>(id)?;
    Ok(())
}

/// Release everything the pod owns, its cgroup, and then its record. In [`Mode::Retry`] a
/// failure keeps the record (storing what is still owned) so a retry can finish the work.
pub async fn release(d: &PodService, rec: &mut PodRecord, mode: Mode) -> Result<(), CriError> {
    let r = release_items(d, rec, &Owned::ALL, mode).await;
    if let Err(e) = r {
        if mode == Mode::Retry {
            d.store.put(&rec.id, &*rec)?;
            return Err(e);
        }
        if mode == Mode::Undo {
            kill_cgroup_leftovers(d, rec).await;
        }
        remove_cgroup(d, rec);
        delete_records(d, &rec.id)?;
        return Err(e);
    }
    if mode == Mode::Undo {
        kill_cgroup_leftovers(d, rec).await;
    }
    remove_cgroup(d, rec);
    // Last: while the record exists, a retry can still find and finish the removal.
    delete_records(d, &rec.id)
}

/// After a start that failed (StartSandbox timed out, the shim was killed), the pod's cgroup
/// may still hold a pause or a child stuck before its exec: the cgroup is crispd's, so what
/// is in it is killed, and the cgroup can go.
async fn kill_cgroup_leftovers(d: &PodService, rec: &PodRecord) {
    let driver = crisp_shim::placement::CgroupDriver::from(d.cfg.cgroup_driver);
    let dirs = match super::cgroup::dirs(driver, &rec.cgroup_parent, &rec.id) {
        Ok(dirs) => dirs,
        Err(e) => {
            tracing::warn!(pod_id = %rec.id, error = %e, "pod cgroup not found");
            return;
        }
    };
    match super::cgroup::kill_leftovers(&dirs, Duration::from_secs(5)).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(pod_id = %rec.id, killed = n, "pod cgroup emptied"),
        Err(e) => tracing::warn!(pod_id = %rec.id, error = %e, "pod cgroup not emptied"),
    }
}

/// The pause's cgroup is named after the pod, not acquired by a step: always removed. Not
/// fatal: a cgroup busy for a moment is retried by the next Remove or start-up.
fn remove_cgroup(d: &PodService, rec: &PodRecord) {
    if let Err(e) = remove_pod_cgroup(d, &rec.cgroup_parent, &rec.id) {
        tracing::warn!(pod_id = %rec.id, error = %e, "pod cgroup not removed");
    }
}

/// The stop sequence, called with the pod's lock held: every container, then the pause and
/// the network, at once. The pod is NotReady after it (IPs kept for status, as containerd
/// does until removal).
pub async fn stop_locked(d: &PodService, rec: &mut PodRecord) -> Result<(), CriError> {
    crate::container::lifecycle::stop_pod_containers(&d.ctrs, &rec.id, Duration::ZERO).await?;
    let before = rec.owned.clone();
    let released = release_together(d, rec, &[Owned::Pause, Owned::Network], Mode::Retry).await;
    if released.is_err() && rec.owned != before {
        // Keep what was released off the record, so a retry does not repeat it.
        d.store.put(&rec.id, &*rec)?;
    }
    released?;
    if rec.state != PodState::NotReady || rec.owned != before {
        rec.state = PodState::NotReady;
        d.store.put(&rec.id, &*rec)?;
    }
    Ok(())
}

/// The removal sequence, called with the pod's lock held: stop, remove the containers, then
/// release the rest the pod owns and its record.
pub async fn remove_locked(d: &PodService, rec: &mut PodRecord) -> Result<(), CriError> {
    // kubelet stops first, but CRI lets Remove be called on a running pod: stop it here.
    stop_locked(d, rec).await?;
    crate::container::lifecycle::remove_pod_containers(&d.ctrs, &rec.id).await?;
    release(d, rec, Mode::Retry).await
}

/// The shim writes this in the pod dir while the pause runs and removes it when it cleans up
/// after the pause; still there once the shim is gone means the shim died without cleaning.
pub const SANDBOX_RECORD: &str = "crisp-sandbox.json";

/// For a pod whose shim died without cleaning up: run the shim binary's `delete` action in
/// the pod dir (as containerd does for a dead shim), which removes the pause's cgroups from
/// the shim's own record of them. Nothing to do when that record is gone.
pub async fn shim_delete_action(d: &PodService, pod_id: &str) {
    let dir = crate::pod::files::pod_dir(&d.cfg.state, pod_id);
    if !dir.join(SANDBOX_RECORD).exists() {
        return;
    }
    let bin =
        crate::util::find_binary(&d.cfg.shim_binary).unwrap_or_else(|| d.cfg.shim_binary.clone());
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.args(["-namespace", "k8s.io", "-id", pod_id, "-bundle"])
        .arg(&dir)
        .arg("delete")
        .current_dir(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(30), cmd.output()).await {
        Ok(Ok(out)) if out.status.success() => {
            tracing::info!(pod_id, "shim delete action cleaned up after a dead shim")
        }
        Ok(Ok(out)) => tracing::warn!(pod_id, status = %out.status,
            stderr = %String::from_utf8_lossy(&out.stderr).trim(), "shim delete action failed"),
        Ok(Err(e)) => tracing::warn!(pod_id, error = %e, "cannot run the shim's delete action"),
        Err(_) => tracing::warn!(pod_id, "shim delete action timed out"),
    }
}

/// What the pod dir may hold: crispd's files and the shim's (`address`, `shim.pid`, `log`).
pub const POD_FILES: &[&str] = &[
    "resolv.conf",
    "hosts",
    "hostname",
    "address",
    "shim.pid",
    "log",
    "config.json",
    SANDBOX_RECORD,
    ".crisp-sandbox.json.tmp",
    "crisp-runtime.json",
    ".crisp-runtime.json.tmp",
];

/// Remove the pod's own files one by one and then the (then empty) directory: never a
/// recursive delete, which could cross a mount point (promise 5's rule, applied here too).
pub fn remove_pod_files(dir: &Path) -> Result<(), String> {
    for name in POD_FILES {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", dir.join(name).display())),
        }
    }
    // A crash in the middle of an atomic write (util::write_atomic) leaves its
    // `.<name>.tmp-<pid>`; it is ours too and must not keep the directory alive.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.contains(".tmp-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}
