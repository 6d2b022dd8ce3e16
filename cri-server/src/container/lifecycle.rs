//! Containers on the pod's shim: CreateContainer, StartContainer, StopContainer,
//! RemoveContainer, and the pod-wide operations the pod calls use (stop, remove and recover
//! every container of one pod).
//!
//! How a container lives, as containerd's CRI plugin does it:
//! * Create: the image's top layer gets an active snapshot (key = container id), the OCI spec
//!   is built (pure, `spec::build`) and written into the bundle `<state>/containers/<id>`; the
//!   record is `Created`. No task exists yet.
//! * Start: FIFOs for stdout/stderr in the bundle, their read ends opened by crispd first (so the
//!   container never writes to a FIFO without a reader), CreateTask + Start on the pod's shim,
//!   log copiers into the CRI log, an exit watcher (task Wait + the shim's OOM events).
//! * Exit (seen by the watcher or by Stop): the record becomes `Exited` with code, time and
//!   reason, and the task is deleted at once (the shim unmounts the rootfs), so an exited
//!   container holds no task and no mount, only its snapshot and bundle.
//! * Remove: kill if running, delete the task, unmount, remove snapshot, bundle and record.
//!
//! Locking (promise 3): every transition of one container runs under that container's lock,
//! and re-reads its record under it, so duplicate concurrent calls serialise and the second
//! one finds the work done. The lock order is pod lock → container lock: Create and Start take
//! the pod's lock (so a StopPodSandbox never interleaves with them), Stop and Remove only the
//! container's (they may wait out a grace period, which must not block the pod). The pod-wide
//! functions here are called with the pod's lock held and take only container locks.
//!
//! The container locks and per-container runtime state (log copiers, the exit watcher, OOM
//! reports) live in the daemon's [`Registry`], keyed by container id, so two daemons in one
//! process (unit tests) share none of it. The watcher, a task that outlives the call that
//! started it, holds the registry through its [`Ctx`], not the daemon.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::api;
use containerd_shim_protos::ttrpc;
use crisp_proto::cri::v1::{self as pb, ContainerEventResponse, ContainerEventType, NamespaceMode};
use nix::sys::signal::Signal;
use oci_spec::image::ImageConfiguration;
use tokio::sync::broadcast;

use crate::container::attach::Tap;
use crate::container::bundle;
use crate::container::logs::{self, CriLog, Stream};
use crate::container::registry::{Live, Registry, drain_io, spawn_copier, stop_live};
use crate::container::service::ContainerService;
use crate::error::{CriError, ErrorKind};
use crate::shim::client::{ShimCallError, ShimClient, ctx, is_not_found};
use crate::shim::events::ShimEvent;
use crate::store::Store;
use crate::store::records::{ContainerRecord, ContainerState, ImageVolume, PodRecord};

/// Deadline of one task call (create, start, delete, kill, state). Generous: under a storm of
/// 64 concurrent calls on two cores, `runc create` alone can take seconds.
const TASK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for the exit after SIGKILL before giving up on a container.
const KILL_WAIT: Duration = Duration::from_secs(30);

/// What the exit path needs of the daemon; cheap clones, so a watcher task can own them.
#[derive(Clone)]
struct Ctx {
    store: Store,
    images: crisp_image::Images,
    state: PathBuf,
    events: broadcast::Sender<ContainerEventResponse>,
    shim_binary: PathBuf,
    registry: Arc<Registry>,
}

impl Ctx {
    fn of(d: &ContainerService) -> Self {
        Self {
            store: d.store.clone(),
            images: d.images.clone(),
            state: d.cfg.state.clone(),
            events: d.events.clone(),
            shim_binary: d.cfg.shim_binary.clone(),
            registry: Arc::clone(&d.containers),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pure pieces (unit-tested).

/// CRI's reason for an exited container.
pub fn exit_reason(exit_code: i32, oom: bool) -> &'static str {
    if oom {
        "OOMKilled"
    } else if exit_code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

/// Whether a container in `from` may be started.
pub fn can_start(from: ContainerState) -> Result<(), String> {
    match from {
        ContainerState::Created => Ok(()),
        other => Err(format!("is {}, not created", state_name(other))),
    }
}

pub fn state_name(s: ContainerState) -> &'static str {
    match s {
        ContainerState::Created => "created",
        ContainerState::Running => "running",
        ContainerState::Exited => "exited",
        ContainerState::Unknown => "unknown",
    }
}

/// Whether a container in this state may have a live process that Stop must end.
pub fn may_run(s: ContainerState) -> bool {
    matches!(s, ContainerState::Running | ContainerState::Unknown)
}

/// A signal as images write StopSignal: `SIGTERM`, `TERM`, `15`.
pub fn parse_signal(s: &str) -> Option<Signal> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).ok();
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    name.parse::<Signal>().ok()
}

/// The stop signal: the container's own (CRI `stop_signal`, newer kubelets) over the image's
/// StopSignal over SIGTERM.
pub fn stop_signal(cri: i32, image: Option<&str>) -> Signal {
    let from_cri = pb::Signal::try_from(cri)
        .ok()
        .filter(|s| *s != pb::Signal::RuntimeDefault)
        .and_then(|s| parse_signal(s.as_str_name()));
    from_cri
        .or_else(|| image.and_then(parse_signal))
        .unwrap_or(Signal::SIGTERM)
}

/// `<log_directory>/<log_path>`; the path must stay inside the directory. Empty when either is
/// empty (no log file, as containerd does; output is still drained).
pub fn log_path(log_directory: &str, log_path: &str) -> Result<String, CriError> {
    if log_directory.is_empty() || log_path.is_empty() {
        return Ok(String::new());
    }
    let p = Path::new(log_path);
    if p.is_absolute() {
        return Err(CriError::invalid(format!(
            "log_path {log_path:?} must be relative to the pod's log_directory"
        )));
    }
    if p.components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(CriError::invalid(format!(
            "log_path {log_path:?} must stay inside the pod's log_directory (no \"..\" or \".\")"
        )));
    }
    Ok(Path::new(log_directory).join(p).display().to_string())
}

/// The nanosecond time of a protobuf timestamp (0 for none).
fn ts_ns(
    t: Option<&containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp>,
) -> i64 {
    t.map(|t| t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos))
        .unwrap_or(0)
}

/// The containerd Mount of a snapshot mount.
fn to_proto(m: &crisp_snapshotter::mount::Mount) -> api::Mount {
    api::Mount {
        type_: m.typ.clone(),
        source: m.source.clone(),
        target: m.target.clone(),
        options: m.options.clone(),
        ..Default::default()
    }
}

fn snap_err(what: &str, e: crisp_snapshotter::Error) -> CriError {
    CriError::context(what, e)
}

/// A task call's error: the shim's own code when it answered, Unavailable when it could not
/// be reached.
fn task_err(call: &str, id: &str, e: ttrpc::Error) -> CriError {
    ShimCallError::task(format!("container {id}: task {call}"), e).into()
}

/// A file of the image read from its layer directories, topmost first (no mount needed).
/// A whiteout (char device 0:0) or an opaque directory above hides it.
fn read_from_layers(dirs: &[PathBuf], rel: &str) -> Option<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    for d in dirs {
        let p = d.join(rel);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_char_device() && m.rdev() == 0 => return None,
            Ok(m) if m.is_file() => return std::fs::read_to_string(&p).ok(),
            // A symlinked /etc/passwd is rare; resolving it across layers is not worth it.
            Ok(_) => return None,
            Err(_) => {}
        }
    }
    None
}

/// The layer directories of a snapshot's mounts, topmost first.
fn layer_dirs(mounts: &[crisp_snapshotter::mount::Mount]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for m in mounts {
        if m.typ == "overlay" {
            if let Some(u) = m.options.iter().find_map(|o| o.strip_prefix("upperdir=")) {
                out.push(PathBuf::from(u));
            }
            if let Some(l) = m.options.iter().find_map(|o| o.strip_prefix("lowerdir=")) {
                out.extend(l.split(':').map(PathBuf::from));
            }
        } else if m.typ == "bind" || m.typ == "rbind" {
            out.push(PathBuf::from(&m.source));
        }
    }
    out
}

/// The pod's user-namespace map, as its RunPodSandbox decided it.
fn pod_idmap(
    d: &ContainerService,
    pod_id: &str,
    cfg: &pb::PodSandboxConfig,
) -> Result<Option<crate::pod::idmap::PodIdMap>, CriError> {
    let opts = cfg
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .and_then(|n| n.userns_options.as_ref());
    let Some(opts) = opts else { return Ok(None) };
    if NamespaceMode::try_from(opts.mode) != Ok(NamespaceMode::Pod) {
        return Ok(None);
    }
    if !opts.uids.is_empty() || !opts.gids.is_empty() {
        return Ok(Some(crate::pod::idmap::PodIdMap {
            uids: opts.uids.clone(),
            gids: opts.gids.clone(),
            allocated: false,
        }));
    }
    let r = d
        .idmap
        .get(pod_id)
        .map_err(|e| CriError::internal(format!("pod {pod_id}: id range: {e}")))?
        .ok_or_else(|| {
            CriError::precondition(format!(
                "pod {pod_id} is user-namespaced but has no ID range recorded"
            ))
        })?;
    let m = |host| {
        vec![pb::IdMapping {
            host_id: host,
            container_id: 0,
            length: r.len,
        }]
    };
    Ok(Some(crate::pod::idmap::PodIdMap {
        uids: m(r.host_uid),
        gids: m(r.host_gid),
        allocated: true,
    }))
}

/// The snapshotter's idmap labels (`ctr:host:size,...`) for a user-namespaced pod.
fn idmap_labels(m: &crate::pod::idmap::PodIdMap) -> HashMap<String, String> {
    let fmt = |v: &[pb::IdMapping]| {
        v.iter()
            .map(|m| format!("{}:{}:{}", m.container_id, m.host_id, m.length))
            .collect::<Vec<_>>()
            .join(",")
    };
    HashMap::from([
        (
            crisp_snapshotter::idmap::LABEL_UID_MAPPING.to_string(),
            fmt(&m.uids),
        ),
        (
            crisp_snapshotter::idmap::LABEL_GID_MAPPING.to_string(),
            fmt(&m.gids),
        ),
    ])
}

/// The pod files every container mounts: hosts, resolv.conf, hostname, and /dev/shm (the
/// host's for a host-IPC pod, the pod's own if it has one; otherwise the spec gives each
/// container a private tmpfs).
fn sandbox_mounts(state: &Path, pod_id: &str, cfg: &pb::PodSandboxConfig) -> Vec<(String, String)> {
    let dir = crate::pod::files::pod_dir(state, pod_id);
    let mut out = Vec::new();
    for (dest, name) in [
        ("/etc/hosts", "hosts"),
        ("/etc/resolv.conf", "resolv.conf"),
        ("/etc/hostname", "hostname"),
    ] {
        let p = dir.join(name);
        if p.is_file() {
            out.push((dest.to_string(), p.display().to_string()));
        }
    }
    let host_ipc = cfg
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .is_some_and(|n| n.ipc == NamespaceMode::Node as i32);
    let pod_shm = dir.join("shm");
    if host_ipc {
        out.push(("/dev/shm".into(), "/dev/shm".into()));
    } else if crisp_snapshotter::fsutil::is_mount_point(&pod_shm).unwrap_or(false) {
        out.push(("/dev/shm".into(), pod_shm.display().to_string()));
    }
    out
}

fn publish(ctx: &Ctx, rec: &ContainerRecord, ty: ContainerEventType) {
    let status = crate::container::status::status_of(rec, &ctx.images, &ctx.state, false).status;
    let pod_status = crate::pod::status::pod_sandbox_status(
        &ctx.store,
        pb::PodSandboxStatusRequest {
            pod_sandbox_id: rec.pod_id.clone(),
            verbose: false,
        },
    )
    .ok()
    .and_then(|r| r.status);
    // No subscriber is fine: kubelet may not use evented PLEG.
    let _ = ctx.events.send(ContainerEventResponse {
        container_id: rec.id.clone(),
        container_event_type: ty as i32,
        created_at: crate::util::now_nanos(),
        pod_sandbox_status: pod_status,
        containers_statuses: status.into_iter().collect(),
    });
}

// ---------------------------------------------------------------------------------------------
// CreateContainer

/// CreateContainer's work in a ready pod (the caller holds the pod's lock and checked the
/// request): returns the new container's id.
pub async fn create(
    d: &ContainerService,
    pod: &PodRecord,
    pod_cfg: &pb::PodSandboxConfig,
    cfg: pb::ContainerConfig,
    image_name: String,
) -> Result<String, CriError> {
    let meta = cfg.metadata.clone().unwrap_or_default();
    name_is_free(d, pod, &meta)?;
    let log = log_path(&pod_cfg.log_directory, &cfg.log_path)?;
    let image = d
        .images
        .status(&image_name)?
        .ok_or_else(|| CriError::not_found(format!("image {image_name:?} not found")))?;
    if let Some(a) = &image.artifact {
        return Err(CriError::invalid(format!(
            "image.image: {image_name:?} is an OCI artifact ({}), not a container image; it \
             can be mounted as an image volume (mounts[].image)",
            a.artifact_type
        )));
    }
    let image_cfg: ImageConfiguration = serde_json::from_str(&image.config).map_err(|e| {
        CriError::internal(format!("image {image_name}: config does not parse: {e}"))
    })?;
    let pause_pid = pod.pause_pid.ok_or_else(|| {
        CriError::precondition(format!("pod sandbox {} has no pause process", pod.id))
    })?;
    let idmap = pod_idmap(d, &pod.id, pod_cfg)?;
    let id = crate::util::new_id();
    // Rootfs: an active snapshot on the image's top layer.
    let parent = image.chain_ids.last().map(|c| c.to_string());
    let mounts = prepare_rootfs(d, &id, parent, idmap.as_ref()).await?;
    // Until the record lists the volumes, RemoveImage waits (see image_volume_users).
    let _users = if cfg.mounts.iter().any(|m| m.image.is_some()) {
        Some(d.image_volume_users.read().await)
    } else {
        None
    };
    let volumes = match prepare_image_volumes(d, &id, &cfg, idmap.as_ref()).await {
        Ok(v) => v,
        Err(e) => {
            undo_create(d, &id, &[]).await;
            return Err(e);
        }
    };
    let new = NewContainer {
        id: &id,
        pod,
        pod_cfg,
        cfg: &cfg,
        image_name: &image_name,
        pause_pid,
        image_ref: image.id.to_string(),
        image_cfg: &image_cfg,
        idmap: idmap.as_ref(),
        log,
        volumes: &volumes,
    };
    match bundle_and_record(d, &new, &mounts) {
        Ok(rec) => {
            tracing::info!(container_id = %id, pod_id = %pod.id, name = %meta.name, "container created");
            publish(&Ctx::of(d), &rec, ContainerEventType::ContainerCreatedEvent);
            Ok(id)
        }
        Err(e) => {
            undo_create(d, &id, &volumes).await;
            Err(e)
        }
    }
}

/// A container's name and attempt are unique in its pod.
fn name_is_free(
    d: &ContainerService,
    pod: &PodRecord,
    meta: &pb::ContainerMetadata,
) -> Result<(), CriError> {
    if let Some((_, other)) = d
        .store
        .list::<ContainerRecord>()?
        .into_iter()
        .find(|(_, c)| c.pod_id == pod.id && c.name == meta.name && c.attempt == meta.attempt)
    {
        return Err(CriError::new(
            ErrorKind::AlreadyExists,
            format!(
                "container name {:?} attempt {} is already in use in pod {} by container {}",
                meta.name, meta.attempt, pod.id, other.id
            ),
        ));
    }
    Ok(())
}

/// The container's rootfs: an active snapshot keyed by its id on `parent` (id-mapped for a
/// user-namespaced pod).
async fn prepare_rootfs(
    d: &ContainerService,
    id: &str,
    parent: Option<String>,
    idmap: Option<&crate::pod::idmap::PodIdMap>,
) -> Result<Vec<crisp_snapshotter::mount::Mount>, CriError> {
    let labels = idmap.map(idmap_labels).unwrap_or_default();
    let sn = Arc::clone(&d.snapshotter);
    let key = id.to_string();
    tokio::task::spawn_blocking(move || sn.prepare(&key, parent.as_deref(), labels))
        .await
        .map_err(|e| CriError::internal(format!("snapshot prepare: {e}")))?
        .map_err(|e| snap_err(&format!("container {id}: rootfs snapshot"), e))
}

/// The container's image volumes (`mounts[i].image`), mounted read-only, id-mapped like its
/// rootfs in a user-namespaced pod.
async fn prepare_image_volumes(
    d: &ContainerService,
    id: &str,
    cfg: &pb::ContainerConfig,
    idmap: Option<&crate::pod::idmap::PodIdMap>,
) -> Result<Vec<ImageVolume>, CriError> {
    if cfg.mounts.iter().all(|m| m.image.is_none()) {
        return Ok(Vec::new());
    }
    let vols = crate::container::image_volume::Volumes {
        state: d.cfg.state.clone(),
        images: d.images.clone(),
        snapshotter: Arc::clone(&d.snapshotter),
        container_id: id.to_string(),
        labels: idmap.map(idmap_labels).unwrap_or_default(),
    };
    let mounts = cfg.mounts.clone();
    tokio::task::spawn_blocking(move || vols.prepare(&mounts))
        .await
        .map_err(|e| CriError::internal(format!("image volumes: {e}")))?
}

/// What CreateContainer has resolved before the bundle is written.
struct NewContainer<'a> {
    id: &'a str,
    pod: &'a PodRecord,
    pod_cfg: &'a pb::PodSandboxConfig,
    cfg: &'a pb::ContainerConfig,
    image_name: &'a str,
    pause_pid: u32,
    image_ref: String,
    image_cfg: &'a ImageConfiguration,
    idmap: Option<&'a crate::pod::idmap::PodIdMap>,
    log: String,
    volumes: &'a [ImageVolume],
}

/// The OCI spec (pure, `spec::build`) written into the bundle, then the Created record.
fn bundle_and_record(
    d: &ContainerService,
    n: &NewContainer<'_>,
    mounts: &[crisp_snapshotter::mount::Mount],
) -> Result<ContainerRecord, CriError> {
    let (id, pod, cfg) = (n.id, n.pod, n.cfg);
    let dirs = layer_dirs(mounts);
    let passwd = read_from_layers(&dirs, "etc/passwd");
    let group = read_from_layers(&dirs, "etc/group");
    let cgroup_v2 = crate::util::cgroup_mode(Path::new("/sys/fs/cgroup"))
        == Some(crate::util::CgroupMode::Unified);
    let sctx = crate::container::spec::SpecContext {
        container_id: id,
        pod_id: &pod.id,
        pause_pid: n.pause_pid,
        target_pid: target_pid(d, cfg)?,
        cgroup_driver: d.cfg.cgroup_driver,
        cgroup_v2,
        idmap: n.idmap,
        image_name: n.image_name,
        passwd: passwd.as_deref(),
        group: group.as_deref(),
        sandbox_mounts: sandbox_mounts(&d.cfg.state, &pod.id, n.pod_cfg),
        image_volumes: n
            .volumes
            .iter()
            .map(|v| (v.index, v.source.clone()))
            .collect(),
    };
    let mut spec = crate::container::spec::build(
        n.pod_cfg,
        cfg,
        n.image_cfg,
        &sctx,
        &crate::container::spec::RealHost,
    )?;
    crate::container::cdi::apply(
        &mut spec,
        &crate::container::cdi::requested(cfg),
        &d.cfg.cdi_spec_dirs,
        &crate::container::spec::RealHost,
    )?;
    bundle::create(&bundle::dir(&d.cfg.state, id), &spec)?;
    let meta = cfg.metadata.clone().unwrap_or_default();
    let rec = ContainerRecord {
        id: id.to_string(),
        pod_id: pod.id.clone(),
        name: meta.name,
        attempt: meta.attempt,
        state: ContainerState::Created,
        created_at: crate::util::now_nanos(),
        started_at: 0,
        finished_at: 0,
        exit_code: 0,
        reason: String::new(),
        message: String::new(),
        image: n.image_name.to_string(),
        image_ref: n.image_ref.clone(),
        log_path: n.log.clone(),
        config_pb: crate::container::status::encode_config(cfg),
        pid: None,
        image_volumes: n.volumes.to_vec(),
        stop_signal: Some(
            stop_signal(
                cfg.stop_signal,
                n.image_cfg
                    .config()
                    .as_ref()
                    .and_then(|c| c.stop_signal().as_deref()),
            )
            .as_str()
            .to_string(),
        ),
    };
    d.store.put(id, &rec)?;
    Ok(rec)
}

/// The pid whose PID namespace a `TARGET`-mode container joins, if it runs.
fn target_pid(d: &ContainerService, cfg: &pb::ContainerConfig) -> Result<Option<u32>, CriError> {
    let ns = cfg
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref());
    Ok(match ns {
        Some(n) if n.pid == NamespaceMode::Target as i32 => d
            .store
            .get::<ContainerRecord>(&n.target_id)?
            .filter(|t| t.state == ContainerState::Running)
            .and_then(|t| t.pid),
        _ => None,
    })
}

/// Undo a failed create in reverse: bundle, image volumes, then snapshot.
async fn undo_create(d: &ContainerService, id: &str, volumes: &[ImageVolume]) {
    if let Err(u) = bundle::remove(&bundle::dir(&d.cfg.state, id)) {
        tracing::warn!(container_id = %id, step = "remove bundle", error = %u, "undo");
    }
    if !volumes.is_empty() {
        let (state, sn, key, vols) = (
            d.cfg.state.clone(),
            Arc::clone(&d.snapshotter),
            id.to_string(),
            volumes.to_vec(),
        );
        let _ = tokio::task::spawn_blocking(move || {
            crate::container::image_volume::release(&state, &sn, &key, &vols)
        })
        .await;
    }
    // The store commit fsyncs: off the async workers, as prepare and remove are.
    let sn = Arc::clone(&d.snapshotter);
    let key = id.to_string();
    match tokio::task::spawn_blocking(move || sn.remove(&key)).await {
        Ok(Ok(_)) => {}
        Ok(Err(u)) => {
            tracing::warn!(container_id = %id, step = "remove snapshot", error = %u, "undo")
        }
        Err(u) => {
            tracing::warn!(container_id = %id, step = "remove snapshot", error = %u, "undo")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// StartContainer

/// StartContainer's work (the caller holds the pod's and the container's locks and checked
/// that the container may start in its ready pod). A failed start leaves the container
/// Exited with the reason.
pub async fn start(
    d: &ContainerService,
    shim: &ShimClient,
    rec: &ContainerRecord,
) -> Result<(), CriError> {
    let ctx = Ctx::of(d);
    match start_task(d, &ctx, shim, rec).await {
        Ok(()) => Ok(()),
        Err(e) => {
            // As containerd: a container that failed to start is Exited with the reason, not
            // left Created for a retry that would fail the same way.
            let exit = Exit {
                code: 128,
                at_ns: crate::util::now_nanos(),
                reason: Some("StartError".into()),
                message: e.message.clone(),
            };
            if let Err(f) = finish_locked(&ctx, Some(shim), &rec.id, exit).await {
                tracing::warn!(container_id = %rec.id, error = %f, "recording start failure");
            }
            stop_live(&d.containers, &rec.id).await;
            Err(e)
        }
    }
}

/// The task side of a start; on error the caller records the failure and cleans up.
async fn start_task(
    d: &ContainerService,
    ctx: &Ctx,
    shim: &ShimClient,
    rec: &ContainerRecord,
) -> Result<(), CriError> {
    let id = &rec.id;
    let b = bundle::dir(&d.cfg.state, id);
    let (out, err) = (
        bundle::fifo(&b, Stream::Stdout),
        bundle::fifo(&b, Stream::Stderr),
    );
    let (r_out, r_err, log) = open_output(d, rec, &out, &err)?;
    let (create, tap) = create_request(d, rec, &b, &out, &err)?;
    // Subscribe before the task exists, so no OOM event is missed.
    let events = d.shim_events.subscribe();
    let started = create_task(shim, create, id).await?;
    // The container holds the FIFOs' write ends now: the copies can start.
    let copiers = vec![
        spawn_copier(
            id,
            r_out,
            Stream::Stdout,
            Arc::clone(&log),
            Some(Arc::clone(&tap)),
        ),
        spawn_copier(id, r_err, Stream::Stderr, Arc::clone(&log), Some(tap)),
    ];
    ctx.registry.live().insert(
        id.clone(),
        Live {
            log: Some(log),
            copiers,
            watcher: None,
        },
    );
    let pid = match started {
        Some(pid) => pid,
        None => start_created_task(shim, id).await?,
    };
    let mut rec = rec.clone();
    rec.state = ContainerState::Running;
    rec.pid = Some(pid);
    rec.started_at = crate::util::now_nanos();
    ctx.store.put(id, &rec)?;
    tracing::info!(container_id = %id, pid, "container started");
    publish(ctx, &rec, ContainerEventType::ContainerStartedEvent);
    let watcher = tokio::spawn(watch(ctx.clone(), shim.clone(), id.clone(), events));
    if let Some(l) = ctx.registry.live().get_mut(id) {
        l.watcher = Some(watcher);
    }
    Ok(())
}

/// Creates the task and starts it in the same call (the shim runs the runtime's `run
/// --detach`: one runtime process, not a `create` and a `start`); the init's pid once it
/// runs. None from a shim older than that option, which refuses its type before doing
/// anything: the task is then created only, for [`start_created_task`].
async fn create_task(
    shim: &ShimClient,
    mut create: api::CreateTaskRequest,
    id: &str,
) -> Result<Option<u32>, CriError> {
    use containerd_shim_protos::protobuf::{Message, well_known_types::wrappers::BoolValue};
    let start = BoolValue {
        value: true,
        ..Default::default()
    };
    let bytes = start
        .write_to_bytes()
        .map_err(|e| CriError::internal(format!("container {id}: create options: {e}")))?;
    create.options = containerd_shim_protos::protobuf::MessageField::some(
        containerd_shim_protos::protobuf::well_known_types::any::Any {
            type_url: crisp_shim::options::CRISP_CREATE_OPTIONS.into(),
            value: bytes,
            ..Default::default()
        },
    );
    match shim.task().create(ctx_t(), &create).await {
        Ok(r) => Ok(Some(r.pid)),
        Err(e) if refuses_start_on_create(&e) => {
            tracing::info!(container_id = %id, "shim predates start on create: create, then start");
            create.options = Default::default();
            let created = shim.task().create(ctx_t(), &create).await;
            created.map(|_| None).map_err(|e| task_err("create", id, e))
        }
        Err(e) => Err(task_err("create", id, e)),
    }
}

/// An older shim's answer to crispd's create options: InvalidArgument naming their type.
fn refuses_start_on_create(e: &ttrpc::Error) -> bool {
    matches!(e, ttrpc::Error::RpcStatus(s)
        if s.code() == ttrpc::Code::INVALID_ARGUMENT
            && s.message().contains(crisp_shim::options::CRISP_CREATE_OPTIONS))
}

/// Starts a task created without starting it; the init's pid.
async fn start_created_task(shim: &ShimClient, id: &str) -> Result<u32, CriError> {
    let req = api::StartRequest {
        id: id.to_string(),
        ..Default::default()
    };
    let started = shim.task().start(ctx_t(), &req).await;
    started.map(|r| r.pid).map_err(|e| task_err("start", id, e))
}

/// The task's create request: its bundle, rootfs mounts and stdio FIFOs, with the attach
/// hub (and stdin FIFO) made for it.
fn create_request(
    d: &ContainerService,
    rec: &ContainerRecord,
    b: &Path,
    out: &Path,
    err: &Path,
) -> Result<(api::CreateTaskRequest, Arc<Tap>), CriError> {
    let id = &rec.id;
    let cfg = crate::container::status::container_config(rec);
    let mounts = d
        .snapshotter
        .mounts(id)
        .map_err(|e| snap_err(&format!("container {id}: rootfs mounts"), e))?;
    let (stdin, tap) = open_attach(d, rec, b)?;
    let create = api::CreateTaskRequest {
        id: id.clone(),
        bundle: b.display().to_string(),
        rootfs: mounts.iter().map(to_proto).collect(),
        terminal: cfg.tty,
        stdin: stdin
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        stdout: out.display().to_string(),
        stderr: if cfg.tty {
            String::new()
        } else {
            err.display().to_string()
        },
        ..Default::default()
    };
    Ok((create, tap))
}

/// Attach: a stdin FIFO when the container asked for one (crispd holds it open), and the
/// hub the log copiers offer output to.
fn open_attach(
    d: &ContainerService,
    rec: &ContainerRecord,
    b: &Path,
) -> Result<(Option<std::path::PathBuf>, Arc<Tap>), CriError> {
    let id = &rec.id;
    let cfg = crate::container::status::container_config(rec);
    let io_err =
        |what: &str, e: std::io::Error| CriError::internal(format!("container {id}: {what}: {e}"));
    let stdin = cfg.stdin.then(|| crate::container::attach::stdin_fifo(b));
    if let Some(p) = &stdin {
        logs::mkfifo(p).map_err(|e| io_err("stdin fifo", e))?;
    }
    let tap = d
        .attach
        .register(id, cfg.tty, stdin.as_deref(), cfg.stdin_once)
        .map_err(|e| io_err("open stdin fifo", e))?;
    Ok((stdin, tap))
}

/// The container's stdout/stderr FIFOs with their read ends opened by crispd first (so the
/// container never writes to a FIFO without a reader), and its CRI log.
fn open_output(
    d: &ContainerService,
    rec: &ContainerRecord,
    out: &Path,
    err: &Path,
) -> Result<(std::fs::File, std::fs::File, Arc<CriLog>), CriError> {
    let id = &rec.id;
    let io_err =
        |what: &str, e: std::io::Error| CriError::internal(format!("container {id}: {what}: {e}"));
    logs::mkfifo(out).map_err(|e| io_err("stdout fifo", e))?;
    logs::mkfifo(err).map_err(|e| io_err("stderr fifo", e))?;
    let r_out = logs::open_fifo_reader(out).map_err(|e| io_err("open stdout fifo", e))?;
    let r_err = logs::open_fifo_reader(err).map_err(|e| io_err("open stderr fifo", e))?;
    let log_file = log_file(rec);
    let log = Arc::new(
        CriLog::open(&log_file, d.cfg.max_container_log_line_size)
            .map_err(|e| io_err(&format!("open log {}", log_file.display()), e))?,
    );
    Ok((r_out, r_err, log))
}

fn ctx_t() -> ttrpc::context::Context {
    ctx(TASK_TIMEOUT)
}

/// ReopenContainerLog: the log file was renamed away by kubelet; write to a new one.
pub fn reopen_log(d: &ContainerService, container_id: &str) -> Result<(), CriError> {
    let rec = crate::container::status::find(&d.store, container_id)?;
    if rec.state != ContainerState::Running {
        return Err(CriError::precondition(format!(
            "container {} is {}, not running",
            rec.id,
            state_name(rec.state)
        )));
    }
    let log = d.containers.live().get(&rec.id).and_then(|l| l.log.clone());
    match log {
        Some(l) => l
            .reopen()
            .map_err(|e| CriError::internal(format!("container {}: reopen log: {e}", rec.id))),
        None => Err(CriError::precondition(format!(
            "container {} has no log writer",
            rec.id
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Exit

/// Where the container's output goes: its CRI log file, or nowhere when kubelet gave none.
fn log_file(rec: &ContainerRecord) -> PathBuf {
    if rec.log_path.is_empty() {
        PathBuf::from("/dev/null")
    } else {
        PathBuf::from(&rec.log_path)
    }
}

/// How a container ended.
#[derive(Debug, Clone)]
struct Exit {
    code: i32,
    at_ns: i64,
    /// None: derived from the code and OOM state.
    reason: Option<String>,
    message: String,
}

impl Exit {
    /// Ended without an exit status of its own (its task or its shim is gone): 255, Error, now.
    fn lost(message: impl Into<String>) -> Exit {
        Exit {
            code: 255,
            at_ns: crate::util::now_nanos(),
            reason: Some("Error".into()),
            message: message.into(),
        }
    }

    /// What the task's Wait answered; a task its shim no longer knows counts as lost, any other
    /// error is the caller's to judge (the shim itself may be gone).
    fn of_wait(res: Result<api::WaitResponse, ttrpc::Error>) -> Result<Exit, ttrpc::Error> {
        match res {
            Ok(r) => Ok(Exit {
                code: r.exit_status as i32,
                at_ns: ts_ns(r.exited_at.as_ref()),
                reason: None,
                message: String::new(),
            }),
            Err(e) if is_not_found(&e) => Ok(Exit::lost("task not found in its shim")),
            Err(e) => Err(e),
        }
    }
}

/// Watch one running container: its task's Wait, and the shim's OOM events for it.
async fn watch(ctx: Ctx, shim: ShimClient, id: String, mut events: broadcast::Receiver<ShimEvent>) {
    let req = api::WaitRequest {
        id: id.clone(),
        ..Default::default()
    };
    // No deadline: a container may run for months.
    let wait = shim.task().wait(ttrpc::context::Context::default(), &req);
    tokio::pin!(wait);
    let res = loop {
        tokio::select! {
            r = &mut wait => break r,
            ev = events.recv() => match ev {
                Ok(ShimEvent::TaskOom { container_id }) if container_id == id => {
                    tracing::info!(container_id = %id, "OOM kill reported");
                    ctx.registry.oom().insert(id.clone());
                }
                Err(broadcast::error::RecvError::Closed) => break (&mut wait).await,
                _ => {}
            }
        }
    };
    let exit = Exit::of_wait(res).unwrap_or_else(|e| {
        tracing::warn!(container_id = %id, error = %e, "lost the shim while waiting");
        Exit::lost(format!("shim died: {e}"))
    });
    let _g = ctx.registry.lock(&id).await;
    if let Err(e) = finish_locked(&ctx, Some(&shim), &id, exit).await {
        tracing::warn!(container_id = %id, error = %e, "recording exit");
    }
}

/// Whether the container's memory cgroup saw an OOM kill (v1 memory.oom_control or v2
/// memory.events), read before its task is deleted (runc removes the cgroup then).
fn cgroup_oom(bundle_dir: &Path) -> bool {
    let Some(spec) = bundle::read_spec(bundle_dir) else {
        return false;
    };
    let Some(cg) = spec["linux"]["cgroupsPath"].as_str() else {
        return false;
    };
    // Only cgroupfs paths name a directory; systemd's slice:prefix:name relies on the event.
    if !cg.starts_with('/') {
        return false;
    }
    let count = |file: PathBuf| {
        std::fs::read_to_string(file).ok().and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
    };
    let rel = cg.trim_start_matches('/');
    count(
        Path::new("/sys/fs/cgroup/memory")
            .join(rel)
            .join("memory.oom_control"),
    )
    .or_else(|| count(Path::new("/sys/fs/cgroup").join(rel).join("memory.events")))
    .is_some_and(|n| n > 0)
}

/// Record the exit of a container (caller holds its lock) and delete its task, which unmounts
/// the rootfs. No-op for a container already Exited or removed. Publishes the stopped event.
async fn finish_locked(
    ctx: &Ctx,
    shim: Option<&ShimClient>,
    id: &str,
    exit: Exit,
) -> Result<(), CriError> {
    let Some(mut rec) = ctx.store.get::<ContainerRecord>(id)? else {
        return Ok(());
    };
    let b = bundle::dir(&ctx.state, id);
    let oom = ctx.registry.oom().remove(id) || cgroup_oom(&b);
    let changed = rec.state != ContainerState::Exited;
    if changed {
        rec.state = ContainerState::Exited;
        rec.exit_code = exit.code;
        rec.finished_at = exit.at_ns.max(rec.started_at).max(rec.created_at);
        if exit.at_ns == 0 {
            rec.finished_at = crate::util::now_nanos();
        }
        rec.reason = exit
            .reason
            .clone()
            .unwrap_or_else(|| exit_reason(exit.code, oom).to_string());
        rec.message = exit.message.clone();
    }
    let deleted = delete_task(shim, ctx, id).await;
    if changed {
        // As containerd: the exit is reported once its output is in the log.
        drain_io(&ctx.registry, id).await;
        ctx.store.put(id, &rec)?;
        tracing::info!(container_id = %id, exit_code = rec.exit_code, reason = %rec.reason, "container exited");
        publish(ctx, &rec, ContainerEventType::ContainerStoppedEvent);
    }
    deleted
}

/// Delete the container's task on its shim; a task already gone is fine. Without a reachable
/// shim, clean up as containerd does for a dead shim ([`cleanup_dead_task`]).
async fn delete_task(shim: Option<&ShimClient>, ctx: &Ctx, id: &str) -> Result<(), CriError> {
    let Some(shim) = shim else {
        return cleanup_dead_task(ctx, id).await;
    };
    let req = api::DeleteRequest {
        id: id.to_string(),
        ..Default::default()
    };
    match shim.task().delete(ctx_t(), &req).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => {
            let e = task_err("delete", id, e);
            if e.kind == ErrorKind::Unavailable {
                tracing::warn!(container_id = %id, error = %e.message, "shim unreachable; cleaning up without it");
                return cleanup_dead_task(ctx, id).await;
            }
            Err(e)
        }
    }
}

/// How long the shim binary's `delete` action may take.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The container's shim is gone. Its processes may not be (they outlive a killed shim), so, as
/// containerd does, run the shim binary's `delete` action in the bundle: it force-deletes the
/// container through the OCI runtime (killing what is left) and unmounts the rootfs. Then make
/// sure the rootfs is unmounted. Only when there is something to clean: a mounted rootfs or a
/// live init process; an exited container's task was already deleted at its exit.
async fn cleanup_dead_task(ctx: &Ctx, id: &str) -> Result<(), CriError> {
    let b = bundle::dir(&ctx.state, id);
    let mounted = crisp_snapshotter::fsutil::is_mount_point(&bundle::rootfs(&b)).unwrap_or(false);
    let init_alive = crate::shim::client::read_pid(&b.join("init.pid"))
        .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
    if !mounted && !init_alive {
        return Ok(());
    }
    tracing::info!(container_id = %id, mounted, init_alive, "shim gone: running the shim's delete action");
    let mut cmd = tokio::process::Command::new(&ctx.shim_binary);
    cmd.args(["-namespace", "k8s.io", "-id", id, "-bundle"])
        .arg(&b)
        .arg("delete")
        .current_dir(&b)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    match tokio::time::timeout(CLEANUP_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) if out.status.success() => {}
        Ok(Ok(out)) => tracing::warn!(container_id = %id, status = %out.status,
            stderr = %String::from_utf8_lossy(&out.stderr).trim(), "shim delete action failed"),
        Ok(Err(e)) => {
            tracing::warn!(container_id = %id, error = %e, binary = %ctx.shim_binary.display(),
            "cannot run the shim's delete action")
        }
        Err(_) => tracing::warn!(container_id = %id, "shim delete action timed out"),
    }
    bundle::unmount_rootfs(&b)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// StopContainer

/// Stop one container (caller holds its lock): stop signal, SIGKILL after `timeout`, record
/// the exit and delete the task. OK for a container not running or already removed.
pub async fn stop_locked(
    d: &ContainerService,
    id: &str,
    timeout: Duration,
) -> Result<(), CriError> {
    let Some(rec) = d.store.get::<ContainerRecord>(id)? else {
        return Ok(());
    };
    if !may_run(rec.state) {
        return Ok(());
    }
    let ctx = Ctx::of(d);
    let Some(shim) = d.shims.get(&rec.pod_id) else {
        // Nothing to signal: the pod's shim is gone, and the container with it.
        let exit = Exit::lost("shim died");
        return finish_locked(&ctx, None, id, exit).await;
    };
    let cfg = crate::container::status::container_config(&rec);
    let image_signal = d
        .images
        .status(&rec.image_ref)
        .ok()
        .flatten()
        .and_then(|i| serde_json::from_str::<ImageConfiguration>(&i.config).ok())
        .and_then(|c| c.config().as_ref().and_then(|c| c.stop_signal().clone()));
    let sig = stop_signal(cfg.stop_signal, image_signal.as_deref());
    let wait_req = api::WaitRequest {
        id: id.to_string(),
        ..Default::default()
    };
    let wait = || {
        shim.task()
            .wait(ttrpc::context::Context::default(), &wait_req)
    };
    let ctxr = &ctx;
    let shim_died = |e: CriError| async move {
        // The shim is gone and its containers with it: record that instead of failing.
        tracing::warn!(container_id = %id, error = %e.message, "shim unreachable at stop");
        let exit = Exit::lost("shim died");
        finish_locked(ctxr, None, id, exit).await
    };
    let mut result = None;
    if !timeout.is_zero() {
        tracing::info!(container_id = %id, signal = %sig, timeout_s = timeout.as_secs(), "stopping");
        match kill(&shim, id, sig).await {
            Ok(()) => {}
            Err(e) if e.kind == ErrorKind::Unavailable => return shim_died(e).await,
            Err(e) => return Err(e),
        }
        if let Ok(r) = tokio::time::timeout(timeout, wait()).await {
            result = Some(r);
        }
    }
    let result = match result {
        Some(r) => r,
        None => {
            match kill(&shim, id, Signal::SIGKILL).await {
                Ok(()) => {}
                Err(e) if e.kind == ErrorKind::Unavailable => return shim_died(e).await,
                Err(e) => return Err(e),
            }
            tokio::time::timeout(KILL_WAIT, wait()).await.map_err(|_| {
                CriError::new(
                    ErrorKind::DeadlineExceeded,
                    format!(
                        "container {id}: still running {}s after SIGKILL",
                        KILL_WAIT.as_secs()
                    ),
                )
            })?
        }
    };
    let exit = Exit::of_wait(result).map_err(|e| task_err("wait", id, e))?;
    finish_locked(&ctx, Some(&shim), id, exit).await
}

/// Signal the container's init; a task already exited (or gone) is fine.
async fn kill(shim: &ShimClient, id: &str, sig: Signal) -> Result<(), CriError> {
    let req = api::KillRequest {
        id: id.to_string(),
        signal: sig as u32,
        ..Default::default()
    };
    match shim.task().kill(ctx_t(), &req).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(task_err("kill", id, e)),
    }
}

// ---------------------------------------------------------------------------------------------
// RemoveContainer

/// Remove one container (caller holds its lock): kill it if running, delete its task, stop
/// its copiers, remove snapshot, bundle and record. Idempotent; each step tolerates its work
/// being done already, and the record goes last so a failed removal can be retried.
pub async fn remove_locked(d: &ContainerService, id: &str) -> Result<(), CriError> {
    let Some(rec) = d.store.get::<ContainerRecord>(id)? else {
        return Ok(());
    };
    if may_run(rec.state) {
        stop_locked(d, id, Duration::ZERO).await?;
    }
    let shim = d.shims.get(&rec.pod_id);
    delete_task(shim.as_ref(), &Ctx::of(d), id).await?;
    stop_live(&d.containers, id).await;
    let b = bundle::dir(&d.cfg.state, id);
    // The shim unmounted the rootfs at delete; a dead shim did not.
    bundle::unmount_rootfs(&b)?;
    let sn = Arc::clone(&d.snapshotter);
    let key = id.to_string();
    let r = tokio::task::spawn_blocking(move || sn.remove(&key))
        .await
        .map_err(|e| CriError::internal(format!("snapshot remove: {e}")))?;
    match r {
        Ok(()) => {}
        Err(e) if e.kind() == crisp_snapshotter::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(snap_err(
                &format!("container {id}: remove rootfs snapshot"),
                e,
            ));
        }
    }
    release_image_volumes(d, &rec).await?;
    bundle::remove(&b)?;
    d.store.delete::<ContainerRecord>(id)?;
    tracing::info!(container_id = %id, pod_id = %rec.pod_id, "container removed");
    publish(&Ctx::of(d), &rec, ContainerEventType::ContainerDeletedEvent);
    Ok(())
}

/// Unmount the container's image volumes and remove their views (the task is gone, so nothing
/// holds them); a failure keeps the record, so RemoveContainer can be retried.
async fn release_image_volumes(
    d: &ContainerService,
    rec: &ContainerRecord,
) -> Result<(), CriError> {
    if rec.image_volumes.is_empty() {
        return Ok(());
    }
    let (state, sn, rec) = (d.cfg.state.clone(), Arc::clone(&d.snapshotter), rec.clone());
    tokio::task::spawn_blocking(move || {
        crate::container::image_volume::release_recorded(&state, &sn, &rec)
    })
    .await
    .map_err(|e| CriError::internal(format!("image volumes release: {e}")))?
}

// ---------------------------------------------------------------------------------------------
// Pod-wide (called by the pod calls with the pod's lock held).

fn pod_containers(d: &ContainerService, pod_id: &str) -> Result<Vec<ContainerRecord>, CriError> {
    Ok(d.store
        .list::<ContainerRecord>()?
        .into_iter()
        .map(|(_, c)| c)
        .filter(|c| c.pod_id == pod_id)
        .collect())
}

/// The first error of many, after all were tried.
fn first_err(results: Vec<Result<(), CriError>>) -> Result<(), CriError> {
    results.into_iter().find(|r| r.is_err()).unwrap_or(Ok(()))
}

/// Stop every container of the pod (kill, wait, delete its task; records stay, state Exited).
/// All at once, so the pod's grace period is not multiplied by its container count.
pub async fn stop_pod_containers(
    d: &ContainerService,
    pod_id: &str,
    timeout: Duration,
) -> Result<(), CriError> {
    let ctrs = pod_containers(d, pod_id)?;
    let results = futures::future::join_all(ctrs.iter().map(|c| async move {
        let _g = d.containers.lock(&c.id).await;
        stop_locked(d, &c.id, timeout).await?;
        // An exited container's task was deleted at its exit; this catches one whose delete
        // failed then (the shim was busy), so the pod's shim can shut down.
        let still = d.store.get::<ContainerRecord>(&c.id)?;
        if still.is_some_and(|r| r.state == ContainerState::Exited) {
            delete_task(d.shims.get(pod_id).as_ref(), &Ctx::of(d), &c.id).await?;
        }
        Ok(())
    }))
    .await;
    first_err(results)
}

/// Remove every container of the pod: task, rootfs snapshot, bundle, log copier, record.
pub async fn remove_pod_containers(d: &ContainerService, pod_id: &str) -> Result<(), CriError> {
    let ctrs = pod_containers(d, pod_id)?;
    let results = futures::future::join_all(ctrs.iter().map(|c| async move {
        let _g = d.containers.lock(&c.id).await;
        remove_locked(d, &c.id).await
    }))
    .await;
    first_err(results)
}

/// After restart: re-attach exit watchers / log copiers of the pod's containers (shim alive),
/// or mark them Exited (shim dead).
pub async fn recover_pod_containers(
    d: &ContainerService,
    pod_id: &str,
    shim: Option<ShimClient>,
) -> Result<(), CriError> {
    let ctrs = pod_containers(d, pod_id)?;
    let mut results = Vec::new();
    for c in ctrs {
        let _g = d.containers.lock(&c.id).await;
        results.push(recover_one(d, &c, shim.as_ref()).await);
    }
    first_err(results)
}

/// A container id as crispd makes them (64 lowercase hex digits), so snapshots of other
/// owners (image layers named by digest, `extract-*` unpacking) are never taken for ours.
fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Start-up, after the pods are recovered: bundles and rootfs snapshots no container record
/// owns (a crash inside CreateContainer, a record dropped with its pod) are removed, and a
/// task still running from such a bundle is force-deleted first. Returns the ids removed.
pub async fn remove_orphans(d: &ContainerService) -> Result<Vec<String>, CriError> {
    let known: std::collections::HashSet<String> = d
        .store
        .list::<ContainerRecord>()?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let mut orphans = std::collections::BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir(bundle::containers_dir(&d.cfg.state)) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                orphans.insert(name);
            }
        }
    }
    d.snapshotter
        .walk(&[] as &[&str], |i| {
            if i.kind == crisp_snapshotter::Kind::Active
                && is_container_id(&i.name)
                && !known.contains(&i.name)
            {
                orphans.insert(i.name.clone());
            }
            Ok(())
        })
        .map_err(|e| snap_err("listing snapshots", e))?;
    let ctx = Ctx::of(d);
    let mut removed = Vec::new();
    let (state, sn, k) = (
        d.cfg.state.clone(),
        Arc::clone(&d.snapshotter),
        known.clone(),
    );
    let volumes = tokio::task::spawn_blocking(move || {
        crate::container::image_volume::release_orphans(&state, &sn, &k)
    })
    .await
    .map_err(|e| CriError::internal(format!("image volume orphans: {e}")))?;
    removed.extend(volumes.into_iter().filter(|v| !orphans.contains(v)));
    for id in orphans {
        let _g = d.containers.lock(&id).await;
        let res = async {
            cleanup_dead_task(&ctx, &id).await?;
            bundle::remove(&bundle::dir(&d.cfg.state, &id))?;
            match d.snapshotter.remove(&id) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == crisp_snapshotter::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(snap_err(&format!("orphan container {id}: snapshot"), e)),
            }
        }
        .await;
        match res {
            Ok(()) => {
                tracing::info!(container_id = %id, "removed orphaned container bundle/snapshot");
                removed.push(id);
            }
            Err(e) => {
                tracing::warn!(container_id = %id, error = %e, "cannot remove orphaned container")
            }
        }
    }
    Ok(removed)
}

/// Attach works again after a restart: a new hub, with the stdin FIFO (if any) reopened.
/// Without it the container runs on, only unattachable; that is logged, not fatal.
fn reopen_attach(d: &ContainerService, rec: &ContainerRecord, b: &Path) -> Option<Arc<Tap>> {
    let id = &rec.id;
    let cfg = crate::container::status::container_config(rec);
    let stdin = crate::container::attach::stdin_fifo(b);
    let stdin = (cfg.stdin && stdin.exists()).then_some(stdin);
    match d
        .attach
        .register(id, cfg.tty, stdin.as_deref(), cfg.stdin_once)
    {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(container_id = %id, error = %e, "cannot reopen stdin fifo; attach unavailable");
            None
        }
    }
}

/// A container still alive in its shim after a restart: reopen its FIFOs (the container
/// holds their write ends), copy its output again and watch it.
async fn reattach(
    d: &ContainerService,
    ctx: Ctx,
    shim: &ShimClient,
    rec: &ContainerRecord,
    pid: u32,
) -> Result<(), CriError> {
    let id = &rec.id;
    let b = bundle::dir(&d.cfg.state, id);
    // Alive: reopen the FIFOs (the container holds their write ends) and watch it.
    let events = d.shim_events.subscribe();
    let log = Arc::new(
        CriLog::open(&log_file(rec), d.cfg.max_container_log_line_size)
            .map_err(|e| CriError::internal(format!("container {id}: open log: {e}")))?,
    );
    let mut copiers = Vec::new();
    let tap = reopen_attach(d, rec, &b);
    for stream in [Stream::Stdout, Stream::Stderr] {
        let f = bundle::fifo(&b, stream);
        match logs::open_fifo_reader(&f) {
            Ok(r) => copiers.push(spawn_copier(id, r, stream, Arc::clone(&log), tap.clone())),
            Err(e) => {
                tracing::warn!(container_id = %id, stream = stream.as_str(), error = %e, "cannot reopen fifo; output lost")
            }
        }
    }
    if rec.state != ContainerState::Running || rec.pid != Some(pid) {
        let mut r = rec.clone();
        r.state = ContainerState::Running;
        r.pid = Some(pid);
        d.store.put(id, &r)?;
    }
    let watcher = tokio::spawn(watch(ctx, shim.clone(), id.clone(), events));
    d.containers.live().insert(
        id.clone(),
        Live {
            log: Some(log),
            copiers,
            watcher: Some(watcher),
        },
    );
    tracing::info!(container_id = %id, pid = pid, "container re-attached");
    Ok(())
}

async fn recover_one(
    d: &ContainerService,
    rec: &ContainerRecord,
    shim: Option<&ShimClient>,
) -> Result<(), CriError> {
    let id = &rec.id;
    let ctx = Ctx::of(d);
    let Some(shim) = shim else {
        if may_run(rec.state) {
            let exit = Exit::lost("shim died");
            finish_locked(&ctx, None, id, exit).await?;
        }
        // Whatever state it was recorded in, its processes and mount may have outlived the shim.
        return cleanup_dead_task(&ctx, id).await;
    };
    let state = shim
        .task()
        .state(
            ctx_t(),
            &api::StateRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .await;
    let st = match state {
        Ok(s) => s,
        Err(e) if is_not_found(&e) => {
            // No task: a Created container never had one; a running one was lost.
            if may_run(rec.state) {
                let exit = Exit::lost("task not found in its shim after restart");
                finish_locked(&ctx, Some(shim), id, exit).await?;
            }
            return cleanup_dead_task(&ctx, id).await;
        }
        Err(e) => return Err(task_err("state", id, e)),
    };
    use containerd_shim_protos::api::Status;
    match st.status.enum_value_or_default() {
        Status::RUNNING | Status::PAUSED | Status::PAUSING => {
            reattach(d, ctx, shim, rec, st.pid).await
        }
        Status::STOPPED => {
            let exit = Exit {
                code: st.exit_status as i32,
                at_ns: ts_ns(st.exited_at.as_ref()),
                reason: None,
                message: String::new(),
            };
            finish_locked(&ctx, Some(shim), id, exit).await
        }
        _ => {
            // Created but never started (crispd died between create and start).
            let exit = Exit {
                code: 128,
                at_ns: crate::util::now_nanos(),
                reason: Some("StartError".into()),
                message: "crispd restarted before the container started".into(),
            };
            finish_locked(&ctx, Some(shim), id, exit).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_shims_refusal_of_the_create_options_reads_as_create_then_start() {
        // What a shim from before start on create answers: its options decoder's error for
        // a type it does not know, as InvalidArgument (shim/src/service/create.rs).
        let old = crisp_shim::options::OptionsError::WrongType(format!(
            "type.googleapis.com/{}",
            crisp_shim::options::CRISP_CREATE_OPTIONS
        ));
        let refusal = |code| ttrpc::Error::RpcStatus(ttrpc::get_status(code, old.to_string()));
        assert!(refuses_start_on_create(&refusal(
            ttrpc::Code::INVALID_ARGUMENT
        )));
        // Any other failure of the create is the create's own error, not a fallback.
        assert!(!refuses_start_on_create(&refusal(ttrpc::Code::INTERNAL)));
        let other = ttrpc::get_status(ttrpc::Code::INVALID_ARGUMENT, "bad bundle");
        assert!(!refuses_start_on_create(&ttrpc::Error::RpcStatus(other)));
        assert!(!refuses_start_on_create(&ttrpc::Error::LocalClosed));
    }
    use crate::daemon::Daemon;

    #[test]
    fn reasons() {
        assert_eq!(exit_reason(0, false), "Completed");
        assert_eq!(exit_reason(3, false), "Error");
        assert_eq!(exit_reason(137, true), "OOMKilled");
        assert_eq!(exit_reason(0, true), "OOMKilled");
    }

    #[test]
    fn only_created_containers_start() {
        assert!(can_start(ContainerState::Created).is_ok());
        for s in [
            ContainerState::Running,
            ContainerState::Exited,
            ContainerState::Unknown,
        ] {
            let e = can_start(s).expect_err("refused");
            assert!(e.contains(state_name(s)), "{e}");
        }
        assert!(may_run(ContainerState::Running) && may_run(ContainerState::Unknown));
        assert!(!may_run(ContainerState::Created) && !may_run(ContainerState::Exited));
    }

    #[test]
    fn signals_as_images_write_them() {
        assert_eq!(parse_signal("SIGTERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("quit"), Some(Signal::SIGQUIT));
        assert_eq!(parse_signal("9"), Some(Signal::SIGKILL));
        assert_eq!(parse_signal("SIGNOPE"), None);
        assert_eq!(stop_signal(0, None), Signal::SIGTERM);
        assert_eq!(stop_signal(0, Some("SIGINT")), Signal::SIGINT);
        assert_eq!(
            stop_signal(pb::Signal::Sigusr1 as i32, Some("SIGINT")),
            Signal::SIGUSR1
        );
    }

    #[test]
    fn log_paths_stay_in_the_pod_directory() {
        assert_eq!(
            log_path("/var/log/pods/ns_p_uid", "c/0.log").expect("ok"),
            "/var/log/pods/ns_p_uid/c/0.log"
        );
        assert_eq!(log_path("", "c/0.log").expect("ok"), "");
        assert_eq!(log_path("/var/log/pods/x", "").expect("ok"), "");
        for bad in ["/etc/passwd", "../x.log", "c/../../x.log", "./c.log"] {
            let e = log_path("/var/log/pods/x", bad).expect_err(bad);
            assert_eq!(e.kind, ErrorKind::InvalidArgument);
            assert!(e.message.contains("log_path"), "{}", e.message);
        }
    }

    #[test]
    fn layers_are_read_top_down_and_whiteouts_hide() {
        let d = tempfile::tempdir().expect("tempdir");
        let (up, mid, low) = (
            d.path().join("up"),
            d.path().join("mid"),
            d.path().join("low"),
        );
        for l in [&up, &mid, &low] {
            std::fs::create_dir_all(l.join("etc")).expect("mkdir");
        }
        std::fs::write(low.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").expect("w");
        std::fs::write(mid.join("etc/passwd"), "app:x:1000:1000::/app:/bin/sh\n").expect("w");
        std::fs::write(low.join("etc/group"), "root:x:0:\n").expect("w");
        let mounts = vec![crisp_snapshotter::mount::Mount {
            typ: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![
                format!("upperdir={}", up.display()),
                format!("lowerdir={}:{}", mid.display(), low.display()),
            ],
        }];
        let dirs = layer_dirs(&mounts);
        assert_eq!(dirs, vec![up.clone(), mid.clone(), low.clone()]);
        assert!(
            read_from_layers(&dirs, "etc/passwd")
                .expect("found")
                .starts_with("app:")
        );
        assert!(read_from_layers(&dirs, "etc/group").is_some());
        // A whiteout in the middle layer hides the lower file.
        nix::sys::stat::mknod(
            &mid.join("etc/group"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        )
        .expect("mknod whiteout");
        assert_eq!(read_from_layers(&dirs, "etc/group"), None);
        assert_eq!(read_from_layers(&dirs, "etc/shadow"), None);
    }

    #[test]
    fn idmap_labels_use_containerds_syntax() {
        let m = crate::pod::idmap::PodIdMap {
            uids: vec![pb::IdMapping {
                host_id: 100000,
                container_id: 0,
                length: 65536,
            }],
            gids: vec![
                pb::IdMapping {
                    host_id: 200000,
                    container_id: 0,
                    length: 10,
                },
                pb::IdMapping {
                    host_id: 300000,
                    container_id: 10,
                    length: 5,
                },
            ],
            allocated: true,
        };
        let l = idmap_labels(&m);
        assert_eq!(
            l[crisp_snapshotter::idmap::LABEL_UID_MAPPING],
            "0:100000:65536"
        );
        assert_eq!(
            l[crisp_snapshotter::idmap::LABEL_GID_MAPPING],
            "0:200000:10,10:300000:5"
        );
        for v in l.values() {
            crisp_snapshotter::idmap::IdMap::parse(v).expect("the snapshotter parses it");
        }
    }

    #[tokio::test]
    async fn orphaned_bundles_and_snapshots_are_removed_known_ones_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Daemon::for_test(dir.path()).containers;
        let (known, orphan_b, orphan_s) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        let rec = ContainerRecord {
            name: "n".into(),
            image: "busybox".into(),
            image_ref: "sha256:x".into(),
            ..ContainerRecord::for_test(&known, "p1", ContainerState::Created)
        };
        d.store.put(&known, &rec).expect("put");
        for id in [&known, &orphan_b] {
            bundle::create(
                &bundle::dir(&d.cfg.state, id),
                &oci_spec::runtime::Spec::default(),
            )
            .expect("bundle");
        }
        for id in [&known, &orphan_s] {
            d.snapshotter
                .prepare(id, None, HashMap::new())
                .expect("prepare");
        }
        // Not ours: an image unpacking leftover.
        d.snapshotter
            .prepare("extract-1", None, HashMap::new())
            .expect("prepare");
        let mut removed = remove_orphans(&d).await.expect("sweep");
        removed.sort();
        assert_eq!(removed, vec![orphan_b.clone(), orphan_s.clone()]);
        assert!(bundle::dir(&d.cfg.state, &known).exists());
        assert!(!bundle::dir(&d.cfg.state, &orphan_b).exists());
        assert!(d.snapshotter.stat(&known).is_ok());
        assert!(d.snapshotter.stat(&orphan_s).is_err());
        assert!(d.snapshotter.stat("extract-1").is_ok());
        assert!(remove_orphans(&d).await.expect("again").is_empty());
    }

    #[tokio::test]
    async fn each_daemon_has_its_own_container_locks() {
        let (a, b) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let (da, db) = (
            Daemon::for_test(a.path()).containers,
            Daemon::for_test(b.path()).containers,
        );
        let id = "d".repeat(64);
        let _held = da.containers.lock(&id).await;
        tokio::time::timeout(Duration::from_secs(5), db.containers.lock(&id))
            .await
            .expect("another daemon's lock on the same id does not wait");
    }

    #[test]
    fn sandbox_files_are_mounted_when_present() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = crate::pod::files::pod_dir(d.path(), "p1");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("hosts"), "x").expect("w");
        std::fs::write(dir.join("resolv.conf"), "x").expect("w");
        let m = sandbox_mounts(d.path(), "p1", &pb::PodSandboxConfig::default());
        let dests: Vec<_> = m.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(dests, vec!["/etc/hosts", "/etc/resolv.conf"]);
        let host_ipc = pb::PodSandboxConfig {
            linux: Some(pb::LinuxPodSandboxConfig {
                security_context: Some(pb::LinuxSandboxSecurityContext {
                    namespace_options: Some(pb::NamespaceOption {
                        ipc: NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let m = sandbox_mounts(d.path(), "p1", &host_ipc);
        assert!(m.contains(&("/dev/shm".into(), "/dev/shm".into())));
    }
}
