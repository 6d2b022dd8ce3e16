//! containerd's sandbox API (`containerd.runtime.sandbox.v1.Sandbox`), served
//! next to the task service on the pod's shim socket: the pod's pause process
//! is started by the shim itself (no OCI runtime, no image), in the namespaces
//! and cgroup the pause's OCI spec names.
//!
//! One shim serves one pod, so the service holds at most one sandbox. Its
//! exit arrives through the shim's reaper like any task's, and is published as
//! a `/tasks/exit` event carrying the sandbox id.

pub mod plan;
pub mod spawn;

use std::{
    collections::HashMap,
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI32, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use async_trait::async_trait;
use containerd_shim_protos::{
    events::task::TaskExit,
    protobuf::MessageField,
    sandbox_api as api,
    sandbox_async::{self, Sandbox as SandboxApi},
    topics,
    ttrpc::{self, r#async::TtrpcContext},
    types::platform::Platform,
};
use tokio::sync::{Notify, watch};
use tracing::{info, info_span, warn};

use crate::{
    cgroup,
    placement::{self, CgroupDriver},
    reaper::{Exit, Reaper},
    service::{Events, TaskError, TaskService, ts},
    spec,
};
use plan::Plan;
use spawn::PauseBinary;

type Result<T> = std::result::Result<T, TaskError>;

/// SandboxStatus states, as containerd's sandbox API spells them.
pub const STATE_READY: &str = "SANDBOX_READY";
pub const STATE_NOTREADY: &str = "SANDBOX_NOTREADY";

/// Where pause is written when a memfd cannot be executed.
const PAUSE_FALLBACK_DIR: &str = "/run/crisp/shim";

/// Written into the pod's bundle while pause may hold a cgroup, so
/// `containerd-shim-crisp-v2 delete` can remove it after the shim died
/// (pause itself dies with the shim: parent-death signal).
pub const SANDBOX_RECORD: &str = "crisp-sandbox.json";

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SandboxRecord {
    pub sandbox_id: String,
    pub cgroup_dirs: Vec<PathBuf>,
}

/// Reads the record `delete` needs; None when there is none (or it is torn).
pub fn read_record(bundle: &std::path::Path) -> Option<SandboxRecord> {
    serde_json::from_slice(&std::fs::read(bundle.join(SANDBOX_RECORD)).ok()?).ok()
}

/// After the shim died: remove the pause's cgroups and the record.
pub fn cleanup_after_dead_shim(
    bundle: &std::path::Path,
) -> std::result::Result<(), cgroup::CgroupError> {
    let Some(rec) = read_record(bundle) else {
        return Ok(());
    };
    cgroup::remove(&rec.cgroup_dirs)?;
    let _ = std::fs::remove_file(bundle.join(SANDBOX_RECORD));
    Ok(())
}

/// Writes the record `delete` needs (blocking). Without it a shim that dies leaves its
/// pause cgroup for crispd's release to remove, so a failure is logged, not fatal.
fn record_for_delete(id: &str, bundle: &std::path::Path, dirs: &[PathBuf]) {
    if !bundle.is_dir() {
        return;
    }
    let rec = SandboxRecord {
        sandbox_id: id.to_string(),
        cgroup_dirs: dirs.to_vec(),
    };
    if let Err(e) = write_record(bundle, &rec) {
        warn!(sandbox_id = %id, error = %e, "cannot record the sandbox for `delete`");
    }
}

/// Why StartSandbox's blocking part failed.
enum SandboxStartError {
    Task(TaskError),
    Spawn(spawn::SpawnError),
}

impl From<TaskError> for SandboxStartError {
    fn from(e: TaskError) -> Self {
        SandboxStartError::Task(e)
    }
}

fn write_record(bundle: &std::path::Path, rec: &SandboxRecord) -> std::io::Result<()> {
    let tmp = bundle.join(format!(".{SANDBOX_RECORD}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(rec)?)?;
    std::fs::rename(tmp, bundle.join(SANDBOX_RECORD))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Created,
    Running,
    Stopped,
}

#[derive(Debug, Clone, Copy)]
struct Exited {
    status: u32,
    at: SystemTime,
}

struct State {
    status: Status,
    pid: i32,
    pidfd: Option<OwnedFd>,
    /// Dropped when pause has exited (it holds pause's parent-death thread).
    keeper: Option<spawn::Keeper>,
    started_at: Option<SystemTime>,
    exited: Option<Exited>,
}

struct Sandbox {
    id: String,
    bundle: PathBuf,
    netns_path: String,
    plan: Plan,
    /// `linux.cgroupsPath` after placement, and its directories in every hierarchy.
    cgroups_path: String,
    cgroup_dirs: Vec<PathBuf>,
    oom_score_adj: Option<i64>,
    /// The pause pid, readable without the state lock (exit dispatch).
    pid: AtomicI32,
    state: tokio::sync::Mutex<State>,
    exited_tx: watch::Sender<Option<Exited>>,
}

struct Inner {
    tasks: TaskService,
    events: Events,
    shutdown: Arc<Notify>,
    pause: Mutex<Option<Arc<PauseBinary>>>,
    slot: Mutex<Option<Arc<Sandbox>>>,
}

#[derive(Clone)]
pub struct SandboxService {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn invalid(e: impl std::fmt::Display) -> TaskError {
    TaskError::InvalidArgument(e.to_string())
}

/// The driver a cgroupsPath is written for: `slice:prefix:name` is systemd's form.
fn driver_of(cgroups_path: &str) -> CgroupDriver {
    if cgroups_path.split(':').count() == 3 {
        CgroupDriver::Systemd
    } else {
        CgroupDriver::Cgroupfs
    }
}

impl SandboxService {
    /// `tasks` is the shim's task service (the sandbox holds the shim open
    /// against its task Shutdown); `shutdown` ends the shim.
    pub fn new(tasks: TaskService, events: Events, shutdown: Arc<Notify>) -> SandboxService {
        let svc = SandboxService {
            inner: Arc::new(Inner {
                tasks,
                events,
                shutdown,
                pause: Mutex::default(),
                slot: Mutex::default(),
            }),
        };
        let mut exits = Reaper::global().subscribe();
        let s = svc.clone();
        tokio::spawn(async move {
            while let Some(exit) = exits.recv().await {
                s.on_reaped(exit).await;
            }
        });
        svc
    }

    fn sandbox(&self, id: &str) -> Result<Arc<Sandbox>> {
        lock(&self.inner.slot)
            .as_ref()
            .filter(|s| s.id == id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(format!("sandbox {id:?} not found in this shim")))
    }

    fn pause(&self) -> Result<Arc<PauseBinary>> {
        let mut p = lock(&self.inner.pause);
        if let Some(b) = p.as_ref() {
            return Ok(b.clone());
        }
        let b = Arc::new(
            PauseBinary::load(std::path::Path::new(PAUSE_FALLBACK_DIR))
                .map_err(|e| TaskError::Internal(e.to_string()))?,
        );
        *p = Some(b.clone());
        Ok(b)
    }

    async fn on_reaped(&self, exit: Exit) {
        let sb = lock(&self.inner.slot).clone();
        let Some(sb) = sb.filter(|s| s.pid.load(Ordering::SeqCst) == exit.pid) else {
            return;
        };
        let mut st = sb.state.lock().await;
        if Reaper::global().take_unclaimed(exit.pid).is_some() {
            self.exited(&sb, &mut st, exit).await;
        }
    }

    async fn exited(&self, sb: &Sandbox, st: &mut State, exit: Exit) {
        if st.status != Status::Running {
            return;
        }
        st.status = Status::Stopped;
        st.pidfd = None;
        st.keeper = None;
        let e = Exited {
            status: exit.status as u32,
            at: exit.at,
        };
        st.exited = Some(e);
        info!(sandbox_id = %sb.id, pid = exit.pid, status = exit.status, "pause exited");
        // Its cgroup is empty now; the pod's parent cgroup is not ours to remove.
        // File and cgroupfs work runs off the shim's one runtime thread.
        let (dirs, record) = (sb.cgroup_dirs.clone(), sb.bundle.join(SANDBOX_RECORD));
        let removed = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(record);
            cgroup::remove(&dirs)
        });
        match removed.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(sandbox_id = %sb.id, error = %e, "remove pause cgroup"),
            Err(e) => warn!(sandbox_id = %sb.id, error = %e, "remove pause cgroup"),
        }
        sb.exited_tx.send_replace(Some(e));
        let ev = TaskExit {
            container_id: sb.id.clone(),
            id: sb.id.clone(),
            pid: exit.pid as u32,
            exit_status: e.status,
            exited_at: MessageField::some(ts(e.at)),
            ..Default::default()
        };
        self.inner
            .events
            .publish(topics::TASK_EXIT_EVENT_TOPIC, ev)
            .await;
    }

    pub async fn create(
        &self,
        req: api::CreateSandboxRequest,
    ) -> Result<api::CreateSandboxResponse> {
        let id = req.sandbox_id.clone();
        if id.is_empty() {
            return Err(invalid("sandbox_id: \"\": must not be empty"));
        }
        let (type_url, value) = req
            .options
            .as_ref()
            .map(|a| (a.type_url.as_str(), a.value.as_slice()))
            .unwrap_or(("", &[]));
        let mut oci = plan::spec_from_any(type_url, value).map_err(invalid)?;
        let plan = plan::plan(&oci, &req.netns_path).map_err(invalid)?;
        // The one placement (promise 2): same function, same form as every container.
        let driver = driver_of(&plan.cgroups_path);
        let cgroups_path = spec::place(&mut oci, driver, &id)
            .map_err(|e| invalid(format!("linux.cgroupsPath: {:?}: {e}", plan.cgroups_path)))?;
        let resolved = placement::resolved_path(driver, &cgroups_path)
            .map_err(|e| invalid(format!("linux.cgroupsPath: {cgroups_path:?}: {e}")))?;
        let cgroup_dirs =
            cgroup::dirs_of(&resolved).map_err(|e| TaskError::Internal(e.to_string()))?;
        // Without CAP_SYS_RESOURCE a value below the shim's own would fail.
        let own = spec::own_oom_score_adj();
        let oom_score_adj = plan.oom_score_adj.map(|adj| {
            if adj < own && !spec::has_cap_sys_resource() {
                own
            } else {
                adj
            }
        });
        if oom_score_adj != plan.oom_score_adj {
            info!(sandbox_id = %id, requested = ?plan.oom_score_adj, used = ?oom_score_adj, "no CAP_SYS_RESOURCE: oom_score_adj raised to the shim's own");
        }
        let sb = Arc::new(Sandbox {
            id: id.clone(),
            bundle: PathBuf::from(&req.bundle_path),
            netns_path: req.netns_path.clone(),
            plan,
            cgroups_path,
            cgroup_dirs,
            oom_score_adj,
            pid: AtomicI32::new(0),
            state: tokio::sync::Mutex::new(State {
                status: Status::Created,
                pid: 0,
                pidfd: None,
                keeper: None,
                started_at: None,
                exited: None,
            }),
            exited_tx: watch::channel(None).0,
        });
        {
            let mut slot = lock(&self.inner.slot);
            match slot.as_ref() {
                Some(s) if s.id == id => {
                    return Err(TaskError::AlreadyExists(format!(
                        "sandbox {id:?} already exists"
                    )));
                }
                Some(s) => {
                    return Err(TaskError::FailedPrecondition(format!(
                        "sandbox_id: {id:?}: this shim already serves sandbox {:?} (one pod per shim)",
                        s.id
                    )));
                }
                None => *slot = Some(sb.clone()),
            }
        }
        self.inner.tasks.hold(true);
        info!(sandbox_id = %id, cgroups_path = %sb.cgroups_path, netns = %sb.netns_path, "sandbox created");
        Ok(api::CreateSandboxResponse::default())
    }

    pub async fn start(&self, req: api::StartSandboxRequest) -> Result<api::StartSandboxResponse> {
        let sb = self.sandbox(&req.sandbox_id)?;
        let mut st = sb.state.lock().await;
        if st.status != Status::Created {
            return Err(TaskError::FailedPrecondition(format!(
                "sandbox {} is {:?}, not created",
                sb.id, st.status
            )));
        }
        let t0 = Instant::now();
        // Loading pause, the record and the spawn are file, cgroupfs and process work: all
        // off the shim's one runtime thread, which must keep serving (the spawn is bounded
        // by its exec deadline).
        let this = self.clone();
        let (plan, dirs, oom) = (sb.plan.clone(), sb.cgroup_dirs.clone(), sb.oom_score_adj);
        let (id, bundle) = (sb.id.clone(), sb.bundle.clone());
        let spawned = tokio::task::spawn_blocking(move || {
            let pause = this.pause()?;
            record_for_delete(&id, &bundle, &dirs);
            spawn::spawn(pause, plan, dirs, oom).map_err(SandboxStartError::Spawn)
        })
        .await
        .map_err(|e| TaskError::Internal(e.to_string()))?;
        let spawned = match spawned {
            Ok(s) => s,
            Err(SandboxStartError::Task(e)) => return Err(e),
            Err(SandboxStartError::Spawn(e)) => {
                // The child (if any) was killed; its cgroup goes once it is reaped.
                let (dirs, record) = (sb.cgroup_dirs.clone(), sb.bundle.join(SANDBOX_RECORD));
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = std::fs::remove_file(record);
                    cgroup::remove(&dirs)
                })
                .await;
                return Err(match &e {
                    spawn::SpawnError::Join { err, .. }
                        if err.kind() == std::io::ErrorKind::NotFound =>
                    {
                        invalid(e)
                    }
                    _ => TaskError::Internal(e.to_string()),
                });
            }
        };
        let elapsed = t0.elapsed();
        let now = SystemTime::now();
        st.pid = spawned.pid;
        st.pidfd = Some(spawned.pidfd);
        st.keeper = Some(spawned.keeper);
        st.status = Status::Running;
        st.started_at = Some(now);
        sb.pid.store(spawned.pid, Ordering::SeqCst);
        let phases: Vec<String> = spawned
            .phases
            .iter()
            .map(|(n, us)| format!("{n}={us}us"))
            .collect();
        info!(sandbox_id = %sb.id, pid = spawned.pid, start_us = elapsed.as_micros() as u64, phases = %phases.join(" "), "pause started");
        // An exit reaped before the pid was known is waiting in the unclaimed table.
        if let Some(exit) = Reaper::global().take_unclaimed(spawned.pid) {
            self.exited(&sb, &mut st, exit).await;
        }
        Ok(api::StartSandboxResponse {
            pid: spawned.pid as u32,
            created_at: MessageField::some(ts(now)),
            ..Default::default()
        })
    }

    async fn wait_exit(sb: &Sandbox, limit: Duration) -> Option<Exited> {
        let mut rx = sb.exited_tx.subscribe();
        let wait = async {
            loop {
                if let Some(e) = *rx.borrow_and_update() {
                    return Some(e);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(limit, wait).await.ok().flatten()
    }

    /// SIGTERM (SIGKILL when `timeout` is zero), SIGKILL after `timeout`.
    pub async fn stop(&self, req: api::StopSandboxRequest) -> Result<()> {
        let sb = self.sandbox(&req.sandbox_id)?;
        {
            let mut st = sb.state.lock().await;
            match st.status {
                Status::Stopped => return Ok(()),
                Status::Created => {
                    // Never started: nothing runs, report it like a kill.
                    st.status = Status::Stopped;
                    let e = Exited {
                        status: 128 + libc::SIGKILL as u32,
                        at: SystemTime::now(),
                    };
                    st.exited = Some(e);
                    sb.exited_tx.send_replace(Some(e));
                    return Ok(());
                }
                Status::Running => {
                    let sig = if req.timeout_secs == 0 {
                        libc::SIGKILL
                    } else {
                        libc::SIGTERM
                    };
                    if let Some(fd) = &st.pidfd {
                        spawn::signal(fd, sig).map_err(|e| {
                            TaskError::Internal(format!("signal pause {}: {e}", st.pid))
                        })?;
                    }
                }
            }
        }
        if Self::wait_exit(&sb, Duration::from_secs(u64::from(req.timeout_secs)))
            .await
            .is_some()
        {
            return Ok(());
        }
        {
            let st = sb.state.lock().await;
            if let Some(fd) = &st.pidfd {
                info!(sandbox_id = %sb.id, timeout_secs = req.timeout_secs, "pause ignored SIGTERM; SIGKILL");
                spawn::signal(fd, libc::SIGKILL)
                    .map_err(|e| TaskError::Internal(format!("kill pause {}: {e}", st.pid)))?;
            }
        }
        match Self::wait_exit(&sb, Duration::from_secs(10)).await {
            Some(_) => Ok(()),
            None => Err(TaskError::Internal(format!(
                "sandbox {}: pause did not exit 10 s after SIGKILL",
                sb.id
            ))),
        }
    }

    pub async fn wait(&self, req: api::WaitSandboxRequest) -> Result<api::WaitSandboxResponse> {
        let sb = self.sandbox(&req.sandbox_id)?;
        let mut rx = sb.exited_tx.subscribe();
        let e = loop {
            if let Some(e) = *rx.borrow_and_update() {
                break e;
            }
            if rx.changed().await.is_err() {
                return Err(TaskError::Internal("sandbox vanished".into()));
            }
        };
        Ok(api::WaitSandboxResponse {
            exit_status: e.status,
            exited_at: MessageField::some(ts(e.at)),
            ..Default::default()
        })
    }

    pub async fn status(
        &self,
        req: api::SandboxStatusRequest,
    ) -> Result<api::SandboxStatusResponse> {
        let sb = self.sandbox(&req.sandbox_id)?;
        let st = sb.state.lock().await;
        let mut resp = api::SandboxStatusResponse {
            sandbox_id: sb.id.clone(),
            pid: st.pid as u32,
            state: if st.status == Status::Running {
                STATE_READY
            } else {
                STATE_NOTREADY
            }
            .to_string(),
            ..Default::default()
        };
        if let Some(t) = st.started_at {
            resp.created_at = MessageField::some(ts(t));
        }
        if let Some(e) = st.exited {
            resp.exited_at = MessageField::some(ts(e.at));
        }
        if req.verbose {
            let mut info = HashMap::new();
            info.insert("cgroupsPath".to_string(), sb.cgroups_path.clone());
            info.insert("netnsPath".to_string(), sb.netns_path.clone());
            info.insert("bundle".to_string(), sb.bundle.display().to_string());
            info.insert(
                "status".to_string(),
                format!("{:?}", st.status).to_lowercase(),
            );
            if let Some(e) = st.exited {
                info.insert("exitStatus".to_string(), e.status.to_string());
            }
            resp.info = info;
        }
        Ok(resp)
    }

    /// The pause's cgroup metrics (the same Any the task service's Stats returns).
    pub async fn metrics(
        &self,
        req: api::SandboxMetricsRequest,
    ) -> Result<api::SandboxMetricsResponse> {
        let sb = self.sandbox(&req.sandbox_id)?;
        let pid = {
            let st = sb.state.lock().await;
            if st.status != Status::Running {
                return Err(TaskError::FailedPrecondition(format!(
                    "sandbox {} is not running",
                    sb.id
                )));
            }
            st.pid
        };
        let any = tokio::task::spawn_blocking(move || cgroup::stats(pid))
            .await
            .map_err(|e| TaskError::Internal(e.to_string()))?
            .map_err(|e| TaskError::Internal(format!("pause cgroup stats: {e}")))?;
        let mut resp = api::SandboxMetricsResponse::default();
        let m = resp.metrics.mut_or_insert_default();
        m.id = sb.id.clone();
        m.timestamp = MessageField::some(ts(SystemTime::now()));
        m.data = MessageField::some(any);
        Ok(resp)
    }

    /// Stops pause if it still runs, then ends the shim once no task is left.
    pub async fn shutdown(&self, req: api::ShutdownSandboxRequest) -> Result<()> {
        let sb = self.sandbox(&req.sandbox_id)?;
        self.stop(api::StopSandboxRequest {
            sandbox_id: sb.id.clone(),
            timeout_secs: 0,
            ..Default::default()
        })
        .await?;
        self.inner.tasks.hold(false);
        let tasks = self.inner.tasks.clone();
        let shutdown = self.inner.shutdown.clone();
        let id = sb.id.clone();
        tokio::spawn(async move {
            let mut logged = false;
            while tasks.task_count() > 0 {
                if !logged {
                    info!(sandbox_id = %id, tasks = tasks.task_count(), "shim exits once its tasks are deleted");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Let the ShutdownSandbox reply leave before the server stops: the reply is
            // written by the connection's task, which runs as soon as this one sleeps (one
            // thread). crispd waits for this exit (RemovePodSandbox), so it is kept short; a
            // reply lost anyway reads as a gone shim, which crispd takes as shut down.
            tokio::time::sleep(Duration::from_millis(3)).await;
            info!(sandbox_id = %id, "sandbox shut down; shim exits");
            shutdown.notify_one();
        });
        Ok(())
    }
}

/// Wraps each call in a span carrying the sandbox id, and logs failures.
macro_rules! call {
    ($name:literal, $id:expr, $body:expr) => {
        crate::service::traced(info_span!($name, sandbox_id = %$id), async move { $body }).await
    };
}

#[async_trait]
impl SandboxApi for SandboxService {
    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        req: api::CreateSandboxRequest,
    ) -> ttrpc::Result<api::CreateSandboxResponse> {
        call!(
            "create_sandbox",
            req.sandbox_id.clone(),
            self.create(req).await
        )
    }
    async fn start_sandbox(
        &self,
        _: &TtrpcContext,
        req: api::StartSandboxRequest,
    ) -> ttrpc::Result<api::StartSandboxResponse> {
        call!(
            "start_sandbox",
            req.sandbox_id.clone(),
            self.start(req).await
        )
    }
    async fn platform(
        &self,
        _: &TtrpcContext,
        req: api::PlatformRequest,
    ) -> ttrpc::Result<api::PlatformResponse> {
        call!("platform", req.sandbox_id.clone(), {
            let architecture = match std::env::consts::ARCH {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                other => other,
            };
            let platform = Platform {
                os: "linux".into(),
                architecture: architecture.into(),
                ..Default::default()
            };
            Ok::<_, TaskError>(api::PlatformResponse {
                platform: MessageField::some(platform),
                ..Default::default()
            })
        })
    }
    async fn stop_sandbox(
        &self,
        _: &TtrpcContext,
        req: api::StopSandboxRequest,
    ) -> ttrpc::Result<api::StopSandboxResponse> {
        call!(
            "stop_sandbox",
            req.sandbox_id.clone(),
            self.stop(req)
                .await
                .map(|()| api::StopSandboxResponse::default())
        )
    }
    async fn wait_sandbox(
        &self,
        _: &TtrpcContext,
        req: api::WaitSandboxRequest,
    ) -> ttrpc::Result<api::WaitSandboxResponse> {
        call!("wait_sandbox", req.sandbox_id.clone(), self.wait(req).await)
    }
    async fn sandbox_status(
        &self,
        _: &TtrpcContext,
        req: api::SandboxStatusRequest,
    ) -> ttrpc::Result<api::SandboxStatusResponse> {
        call!(
            "sandbox_status",
            req.sandbox_id.clone(),
            self.status(req).await
        )
    }
    async fn ping_sandbox(
        &self,
        _: &TtrpcContext,
        req: api::PingRequest,
    ) -> ttrpc::Result<api::PingResponse> {
        call!(
            "ping_sandbox",
            req.sandbox_id.clone(),
            self.sandbox(&req.sandbox_id)
                .map(|_| api::PingResponse::default())
        )
    }
    async fn sandbox_metrics(
        &self,
        _: &TtrpcContext,
        req: api::SandboxMetricsRequest,
    ) -> ttrpc::Result<api::SandboxMetricsResponse> {
        call!(
            "sandbox_metrics",
            req.sandbox_id.clone(),
            self.metrics(req).await
        )
    }
    async fn shutdown_sandbox(
        &self,
        _: &TtrpcContext,
        req: api::ShutdownSandboxRequest,
    ) -> ttrpc::Result<api::ShutdownSandboxResponse> {
        call!(
            "shutdown_sandbox",
            req.sandbox_id.clone(),
            self.shutdown(req)
                .await
                .map(|()| api::ShutdownSandboxResponse::default())
        )
    }
}

/// The ttrpc service table (`containerd.runtime.sandbox.v1.Sandbox`).
pub fn services(svc: SandboxService) -> HashMap<String, ttrpc::r#async::Service> {
    sandbox_async::create_sandbox(Arc::new(svc))
}
