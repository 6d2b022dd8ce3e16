//! The containerd task service: one instance serves every task of a pod.
//!
//! Locks: the container map and the pid index are plain mutexes never held
//! across an `.await`; each process has its own async lock for its state
//! transitions (create → start → exit → delete), held across the runtime call
//! that performs the transition. Exit handling takes the same lock, which is
//! what orders a process's start event before its exit event.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use async_trait::async_trait;
use containerd_shim_protos::{
    api::{self, Status},
    events::task::{
        TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM,
        TaskStart,
    },
    protobuf::{
        EnumOrUnknown, MessageField, MessageFull,
        well_known_types::{empty::Empty, timestamp::Timestamp},
    },
    shim::oci::ProcessDetails,
    shim_async::Task,
    topics,
    ttrpc::{self, Code, r#async::TtrpcContext},
};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    cgroup,
    events::{self, Named, Publisher},
    io::{self, Console, ProcessIo, StdioPaths},
    mount,
    options::{self, Options},
    reaper::{Exit, Reaper},
    runtime::{self, CreateOpts, Runtime, RuntimeError},
    spec,
};

/// Written into each bundle so `containerd-shim-crisp-v2 delete` can clean up a
/// task whose shim died, without any state of the dead shim.
pub const RUNTIME_RECORD: &str = "crisp-runtime.json";

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct RuntimeRecord {
    pub binary: PathBuf,
    pub root: PathBuf,
    pub systemd_cgroup: bool,
    pub rootfs_mounted: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Internal(String),
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> ttrpc::Error {
        // The single place where error kinds become ttrpc codes (containerd maps
        // them to errdefs: NotFound → ErrNotFound and so on).
        let code = match &e {
            TaskError::NotFound(_) => Code::NOT_FOUND,
            TaskError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            TaskError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            TaskError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            TaskError::Internal(_) => Code::INTERNAL,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}

macro_rules! internal {
    ($($t:tt)*) => { TaskError::Internal(format!($($t)*)) };
}

type Result<T> = std::result::Result<T, TaskError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcStatus {
    Created,
    Running,
    Stopped,
}

#[derive(Debug, Clone, Copy)]
struct Exited {
    status: u32,
    at: SystemTime,
}

struct ProcState {
    status: ProcStatus,
    pid: i32,
    exited: Option<Exited>,
}

impl ProcState {
    /// The state machine of one process; anything else is refused.
    fn transition(&mut self, to: ProcStatus) -> Result<()> {
        use ProcStatus::*;
        match (self.status, to) {
            (Created, Running) | (Created, Stopped) | (Running, Stopped) => {
                self.status = to;
                Ok(())
            }
            (from, to) => Err(TaskError::FailedPrecondition(format!(
                "process cannot go from {from:?} to {to:?}"
            ))),
        }
    }
}

struct Proc {
    exec_id: String,
    stdio: StdioPaths,
    /// The exec's OCI process JSON; None for the init process.
    exec_spec: Option<Vec<u8>>,
    state: tokio::sync::Mutex<ProcState>,
    exited_tx: watch::Sender<Option<Exited>>,
    io: Mutex<ProcessIo>,
}

impl Proc {
    fn new(exec_id: &str, stdio: StdioPaths, exec_spec: Option<Vec<u8>>) -> Arc<Proc> {
        Arc::new(Proc {
            exec_id: exec_id.to_string(),
            stdio,
            exec_spec,
            state: tokio::sync::Mutex::new(ProcState {
                status: ProcStatus::Created,
                pid: 0,
                exited: None,
            }),
            exited_tx: watch::channel(None).0,
            io: Mutex::new(ProcessIo::default()),
        })
    }
}

struct Container {
    id: String,
    bundle: PathBuf,
    runtime: Runtime,
    rootfs: Option<PathBuf>,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(format!("exec {exec_id} of {} not found", self.id)))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Publishes events in call order (containerd's publisher is one FIFO queue).
#[derive(Clone)]
pub struct Events {
    publisher: Option<Arc<Publisher>>,
    namespace: String,
    /// Tests: every event as (topic, event in protobuf text format), in order.
    record: Option<EventLog>,
}

pub type EventLog = Arc<Mutex<Vec<(String, String)>>>;

impl Events {
    pub fn new(publisher: Option<Publisher>, namespace: &str) -> Events {
        Events {
            publisher: publisher.map(Arc::new),
            namespace: namespace.to_string(),
            record: None,
        }
    }

    /// Events that are only recorded, for tests.
    pub fn recorder(namespace: &str) -> (Events, EventLog) {
        let log = EventLog::default();
        (
            Events {
                publisher: None,
                namespace: namespace.to_string(),
                record: Some(log.clone()),
            },
            log,
        )
    }

    pub(crate) async fn publish<E: Named + MessageFull>(&self, topic: &str, event: E) {
        tracing::debug!(topic, "event");
        if let Some(r) = &self.record {
            // Tests only: the text format needs the reflection the publisher avoids.
            let text = containerd_shim_protos::protobuf::text_format::print_to_string(&event);
            lock(r).push((topic.to_string(), text));
        }
        if let Some(p) = &self.publisher
            && let Err(e) = p.publish(topic, &self.namespace, &event).await
        {
            warn!(topic, error = %e, "publish event failed");
        }
    }
}

pub struct Config {
    pub namespace: String,
    /// The runtime handler's options (from `start`), under per-task overrides.
    pub handler: Options,
    /// The OCI runtime chosen by the start-up probe.
    pub default_runtime: String,
}

struct Inner {
    config: Config,
    events: Events,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// pid → (container id, exec id) of processes the shim waits for.
    pids: Mutex<HashMap<i32, (String, String)>>,
    oom_tx: mpsc::UnboundedSender<String>,
    shutdown: Arc<tokio::sync::Notify>,
    /// Set while the sandbox service holds the shim (a pod sandbox exists that
    /// has not been shut down): the task Shutdown then must not end the shim.
    held: std::sync::atomic::AtomicBool,
}

#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

pub(crate) fn ts(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

impl TaskService {
    /// Builds the service and starts its exit and OOM dispatchers. `shutdown`
    /// is notified when containerd asks the shim to exit and no task is left.
    pub fn new(config: Config, events: Events, shutdown: Arc<tokio::sync::Notify>) -> TaskService {
        let (oom_tx, mut oom_rx) = mpsc::unbounded_channel::<String>();
        let svc = TaskService {
            inner: Arc::new(Inner {
                config,
                events,
                containers: Mutex::default(),
                pids: Mutex::default(),
                oom_tx,
                shutdown,
                held: Default::default(),
            }),
        };
        let mut exits = Reaper::global().subscribe();
        let s = svc.clone();
        tokio::spawn(async move {
            while let Some(exit) = exits.recv().await {
                s.on_reaped(exit).await;
            }
        });
        let s = svc.clone();
        tokio::spawn(async move {
            while let Some(id) = oom_rx.recv().await {
                info!(container_id = %id, "oom");
                let ev = TaskOOM {
                    container_id: id,
                    ..Default::default()
                };
                s.inner
                    .events
                    .publish(topics::TASK_OOM_EVENT_TOPIC, ev)
                    .await;
            }
        });
        svc
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.inner.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(format!("task {id} not found")))
    }

    /// An exit the reaper could not hand to a waiting command.
    async fn on_reaped(&self, exit: Exit) {
        let Some((cid, eid)) = lock(&self.inner.pids).get(&exit.pid).cloned() else {
            return; // Not (yet) ours: it stays unclaimed for Start to pick up.
        };
        let Ok(c) = self.container(&cid) else { return };
        let Ok(p) = c.process(&eid) else { return };
        let mut st = p.state.lock().await;
        // Whoever takes it from the unclaimed table handles it, exactly once.
        if Reaper::global().take_unclaimed(exit.pid).is_some() {
            self.process_exited(&c, &p, &mut st, exit).await;
        }
    }

    async fn process_exited(&self, c: &Container, p: &Proc, st: &mut ProcState, exit: Exit) {
        if st.transition(ProcStatus::Stopped).is_err() {
            return;
        }
        let exited = Exited {
            status: exit.status as u32,
            at: exit.at,
        };
        st.exited = Some(exited);
        lock(&self.inner.pids).remove(&exit.pid);
        // send_replace: `send` drops the value when nobody is waiting yet.
        p.exited_tx.send_replace(Some(exited));
        info!(container_id = %c.id, exec_id = %p.exec_id, pid = exit.pid, status = exit.status, "exited");
        let ev = TaskExit {
            container_id: c.id.clone(),
            id: if p.exec_id.is_empty() {
                c.id.clone()
            } else {
                p.exec_id.clone()
            },
            pid: exit.pid as u32,
            exit_status: exited.status,
            exited_at: MessageField::some(ts(exited.at)),
            ..Default::default()
        };
        self.inner
            .events
            .publish(topics::TASK_EXIT_EVENT_TOPIC, ev)
            .await;
    }

    fn runtime_for(&self, opts: &Options) -> Result<Runtime> {
        let binary = if opts.binary_name.is_empty() {
            self.inner.config.default_runtime.clone()
        } else {
            opts.binary_name.clone()
        };
        let name = Path::new(&binary)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| binary.clone());
        let root = if opts.root.is_empty() {
            PathBuf::from("/run/crisp")
                .join(&name)
                .join(&self.inner.config.namespace)
        } else {
            PathBuf::from(&opts.root)
        };
        Runtime::new(&binary, root, opts.systemd_cgroup)
            .map_err(|e| TaskError::FailedPrecondition(e.to_string()))
    }

    pub async fn create(&self, req: api::CreateTaskRequest) -> Result<api::CreateTaskResponse> {
        let id = req.id.clone();
        if lock(&self.inner.containers).contains_key(&id) {
            return Err(TaskError::AlreadyExists(format!(
                "task {id} already exists"
            )));
        }
        let overrides = match req.options.as_ref() {
            Some(any) => {
                options::decode(any).map_err(|e| TaskError::InvalidArgument(e.to_string()))?
            }
            None => None,
        };
        let opts = options::merge(&self.inner.config.handler, overrides.as_ref());
        let driver = options::driver(&opts);
        let runtime = self.runtime_for(&opts)?;
        let bundle = PathBuf::from(&req.bundle);

        // The one placement, and the oom_score_adj floor.
        let mut oci = spec::read(&bundle).map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let cgroups_path = spec::place(&mut oci, driver, &id)
            .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        if let Some(process) = oci.get_mut("process")
            && let Some((from, to)) = spec::restrict_oom_score_adj(
                process,
                spec::own_oom_score_adj(),
                spec::has_cap_sys_resource(),
            )
        {
            info!(
                from,
                to, "no CAP_SYS_RESOURCE: oom_score_adj raised to the shim's own"
            );
        }
        spec::write(&bundle, &oci).map_err(|e| internal!("{e}"))?;
        info!(runtime = %runtime.binary.display(), %cgroups_path, %driver, "creating");

        let mounts = mount::from_proto(&req.rootfs);
        let rootfs = (!mounts.is_empty()).then(|| bundle.join("rootfs"));
        if let Some(target) = &rootfs {
            std::fs::create_dir_all(target).map_err(|e| internal!("create rootfs dir: {e}"))?;
            mount::mount_all(&mounts, target).map_err(|e| internal!("mount rootfs: {e}"))?;
        }
        let record = RuntimeRecord {
            binary: runtime.binary.clone(),
            root: runtime.root.clone(),
            systemd_cgroup: runtime.systemd_cgroup,
            rootfs_mounted: rootfs.is_some(),
        };
        let undo = |why: String| {
            let rootfs = rootfs.clone();
            let runtime = runtime.clone();
            let id = id.clone();
            async move {
                // Named undo steps, in reverse order of what was done.
                if let Err(e) = runtime.delete(&id, true).await {
                    tracing::debug!(step = "runtime delete", error = %e, "undo");
                }
                if let Some(t) = &rootfs
                    && let Err(e) = mount::unmount_all(t)
                {
                    warn!(step = "unmount rootfs", error = %e, "undo");
                }
                why
            }
        };
        if let Err(e) = write_record(&bundle, &record) {
            return Err(internal!("{}", undo(format!("record runtime: {e}")).await));
        }

        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let (stdio, mut pio) = match io::open(&paths) {
            Ok(x) => x,
            Err(e) => return Err(TaskError::InvalidArgument(undo(e.to_string()).await)),
        };
        let console = if req.terminal {
            match Console::new() {
                Ok(c) => Some(c),
                Err(e) => return Err(internal!("{}", undo(e.to_string()).await)),
            }
        } else {
            None
        };
        let pid_file = bundle.join("init.pid");
        let console_path = console.as_ref().map(Console::path);
        let copts = CreateOpts {
            pid_file: &pid_file,
            console_socket: console_path.as_deref(),
            no_pivot: opts.no_pivot_root,
            no_new_keyring: opts.no_new_keyring,
        };
        if let Err(e) = runtime.create(&id, &bundle, &copts, stdio).await {
            let mut msg = e.to_string();
            if let Some(why) =
                runtime::known_unusable(&runtime.binary.to_string_lossy(), runtime::cgroup_layout())
            {
                msg = format!("{msg} ({why})");
            }
            warn!(error = %msg, "create failed");
            return Err(TaskError::FailedPrecondition(undo(msg).await));
        }
        if let Some(console) = console {
            let attached = console
                .receive()
                .and_then(|m| io::attach_console(m, &paths, &mut pio));
            if let Err(e) = attached {
                return Err(internal!("{}", undo(e.to_string()).await));
            }
        }
        let pid = match read_pid(&pid_file) {
            Ok(p) => p,
            Err(e) => return Err(internal!("{}", undo(e).await)),
        };

        let init = Proc::new("", paths.clone(), None);
        *lock(&init.io) = pio;
        init.state.lock().await.pid = pid;
        let c = Arc::new(Container {
            id: id.clone(),
            bundle: bundle.clone(),
            runtime,
            rootfs,
            init,
            execs: Mutex::default(),
        });
        lock(&self.inner.containers).insert(id.clone(), c);
        lock(&self.inner.pids).insert(pid, (id.clone(), String::new()));

        let ev = TaskCreate {
            container_id: id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint,
            pid: pid as u32,
            ..Default::default()
        };
        self.inner
            .events
            .publish(topics::TASK_CREATE_EVENT_TOPIC, ev)
            .await;
        Ok(api::CreateTaskResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    pub async fn start(&self, req: api::StartRequest) -> Result<api::StartResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let mut st = p.state.lock().await;
        if st.status != ProcStatus::Created {
            return Err(TaskError::FailedPrecondition(format!(
                "process is {:?}, not created",
                st.status
            )));
        }
        if p.exec_id.is_empty() {
            c.runtime.start(&c.id).await.map_err(runtime_error)?;
            st.transition(ProcStatus::Running)?;
            let ev = TaskStart {
                container_id: c.id.clone(),
                pid: st.pid as u32,
                ..Default::default()
            };
            self.inner
                .events
                .publish(topics::TASK_START_EVENT_TOPIC, ev)
                .await;
            let oom_tx = self.inner.oom_tx.clone();
            let cid = c.id.clone();
            if let Err(e) = cgroup::watch_oom(st.pid, move || {
                let _ = oom_tx.send(cid.clone());
            }) {
                warn!(error = %e, "no OOM events for this task");
            }
        } else {
            let pid = self.start_exec(&c, &p).await?;
            st.pid = pid;
            st.transition(ProcStatus::Running)?;
            lock(&self.inner.pids).insert(pid, (c.id.clone(), p.exec_id.clone()));
            let ev = TaskExecStarted {
                container_id: c.id.clone(),
                exec_id: p.exec_id.clone(),
                pid: pid as u32,
                ..Default::default()
            };
            self.inner
                .events
                .publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, ev)
                .await;
        }
        // The process may have exited (and been reaped) before it was indexed;
        // its start event is out, so its exit can follow now.
        let pid = st.pid;
        if let Some(exit) = Reaper::global().take_unclaimed(pid) {
            self.process_exited(&c, &p, &mut st, exit).await;
        }
        Ok(api::StartResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn start_exec(&self, c: &Container, p: &Proc) -> Result<i32> {
        let spec_path = c.bundle.join(format!("exec-{}.json", p.exec_id));
        let pid_file = c.bundle.join(format!("exec-{}.pid", p.exec_id));
        let mut process: serde_json::Value =
            serde_json::from_slice(p.exec_spec.as_deref().unwrap_or(b"{}"))
                .map_err(|e| TaskError::InvalidArgument(format!("exec spec: {e}")))?;
        spec::restrict_oom_score_adj(
            &mut process,
            spec::own_oom_score_adj(),
            spec::has_cap_sys_resource(),
        );
        let bytes = serde_json::to_vec(&process).map_err(|e| internal!("{e}"))?;
        std::fs::write(&spec_path, bytes).map_err(|e| internal!("write exec spec: {e}"))?;
        let (stdio, mut pio) =
            io::open(&p.stdio).map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let console = if p.stdio.terminal {
            Some(Console::new().map_err(|e| internal!("{e}"))?)
        } else {
            None
        };
        let console_path = console.as_ref().map(Console::path);
        let copts = CreateOpts {
            pid_file: &pid_file,
            console_socket: console_path.as_deref(),
            no_pivot: false,
            no_new_keyring: false,
        };
        let res = c.runtime.exec(&c.id, &spec_path, &copts, stdio).await;
        let _ = std::fs::remove_file(&spec_path);
        res.map_err(runtime_error)?;
        if let Some(console) = console {
            console
                .receive()
                .and_then(|m| io::attach_console(m, &p.stdio, &mut pio))
                .map_err(|e| internal!("{e}"))?;
        }
        *lock(&p.io) = pio;
        let pid = read_pid(&pid_file).map_err(|e| internal!("{e}"))?;
        let _ = std::fs::remove_file(&pid_file);
        Ok(pid)
    }

    pub async fn delete(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse> {
        let c = self.container(&req.id)?;
        if !req.exec_id.is_empty() {
            let p = c.process(&req.exec_id)?;
            let st = p.state.lock().await;
            if st.status == ProcStatus::Running {
                return Err(TaskError::FailedPrecondition(format!(
                    "exec {} is still running",
                    req.exec_id
                )));
            }
            lock(&c.execs).remove(&req.exec_id);
            lock(&p.io).close_stdin();
            let e = st.exited.unwrap_or(Exited {
                status: 0,
                at: SystemTime::now(),
            });
            return Ok(api::DeleteResponse {
                pid: st.pid as u32,
                exit_status: e.status,
                exited_at: MessageField::some(ts(e.at)),
                ..Default::default()
            });
        }
        let mut st = c.init.state.lock().await;
        if st.status == ProcStatus::Running {
            return Err(TaskError::FailedPrecondition(format!(
                "task {} is still running",
                c.id
            )));
        }
        if let Err(e) = c.runtime.delete(&c.id, true).await {
            // A container the runtime no longer knows is already deleted.
            tracing::debug!(error = %e, "runtime delete");
        }
        if let Some(t) = &c.rootfs
            && let Err(e) = mount::unmount_all(t)
        {
            return Err(internal!("{e}"));
        }
        lock(&c.init.io).close_stdin();
        if st.status == ProcStatus::Created {
            // Never started: deleted before it ran. Report it like a kill.
            let _ = st.transition(ProcStatus::Stopped);
            st.exited = Some(Exited {
                status: 128 + 9,
                at: SystemTime::now(),
            });
            c.init.exited_tx.send_replace(st.exited);
        }
        lock(&self.inner.containers).remove(&c.id);
        lock(&self.inner.pids).retain(|_, (cid, _)| *cid != c.id);
        let e = st.exited.unwrap_or(Exited {
            status: 0,
            at: SystemTime::now(),
        });
        let ev = TaskDelete {
            container_id: c.id.clone(),
            pid: st.pid as u32,
            exit_status: e.status,
            exited_at: MessageField::some(ts(e.at)),
            id: c.id.clone(),
            ..Default::default()
        };
        self.inner
            .events
            .publish(topics::TASK_DELETE_EVENT_TOPIC, ev)
            .await;
        info!("deleted");
        Ok(api::DeleteResponse {
            pid: st.pid as u32,
            exit_status: e.status,
            exited_at: MessageField::some(ts(e.at)),
            ..Default::default()
        })
    }

    pub async fn kill(&self, req: api::KillRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let st = p.state.lock().await;
        if p.exec_id.is_empty() {
            if st.status == ProcStatus::Stopped && !req.all {
                return Err(TaskError::NotFound(format!(
                    "task {} has already exited",
                    c.id
                )));
            }
            return match c.runtime.kill(&c.id, req.signal, req.all).await {
                Ok(()) => Ok(()),
                Err(RuntimeError::Failed { message, .. })
                    if message.contains("not running") || message.contains("does not exist") =>
                {
                    Err(TaskError::NotFound(format!("task {}: {message}", c.id)))
                }
                Err(e) => Err(runtime_error(e)),
            };
        }
        if st.status != ProcStatus::Running {
            return Err(TaskError::NotFound(format!(
                "exec {} is not running",
                p.exec_id
            )));
        }
        let sig = nix::sys::signal::Signal::try_from(req.signal as i32)
            .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        // The pid cannot be reused: it is our child and not reaped while Running
        // (the reaper's exit goes through this same lock first).
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(st.pid), sig)
            .map_err(|e| internal!("kill {}: {e}", st.pid))
    }

    pub async fn exec(&self, req: api::ExecProcessRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        if c.init.state.lock().await.status != ProcStatus::Running {
            return Err(TaskError::FailedPrecondition(format!(
                "task {} is not running",
                c.id
            )));
        }
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| TaskError::InvalidArgument("exec without a process spec".into()))?;
        for s in [&req.stdin, &req.stdout, &req.stderr] {
            if !io::is_supported(s) {
                return Err(TaskError::InvalidArgument(format!("unsupported stdio {s}")));
            }
        }
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        {
            let mut execs = lock(&c.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(TaskError::AlreadyExists(format!(
                    "exec {} already exists",
                    req.exec_id
                )));
            }
            execs.insert(
                req.exec_id.clone(),
                Proc::new(&req.exec_id, paths, Some(spec)),
            );
        }
        let ev = TaskExecAdded {
            container_id: c.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.inner
            .events
            .publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, ev)
            .await;
        Ok(())
    }

    pub async fn state(&self, req: api::StateRequest) -> Result<api::StateResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let st = p.state.lock().await;
        let status = match st.status {
            ProcStatus::Created => Status::CREATED,
            ProcStatus::Running => Status::RUNNING,
            ProcStatus::Stopped => Status::STOPPED,
        };
        let mut resp = api::StateResponse {
            id: if p.exec_id.is_empty() {
                c.id.clone()
            } else {
                p.exec_id.clone()
            },
            bundle: c.bundle.display().to_string(),
            pid: st.pid as u32,
            status: EnumOrUnknown::new(status),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exec_id: p.exec_id.clone(),
            ..Default::default()
        };
        if let Some(e) = st.exited {
            resp.exit_status = e.status;
            resp.exited_at = MessageField::some(ts(e.at));
        }
        Ok(resp)
    }

    pub async fn wait(&self, req: api::WaitRequest) -> Result<api::WaitResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let mut rx = p.exited_tx.subscribe();
        let e = loop {
            if let Some(e) = *rx.borrow_and_update() {
                break e;
            }
            if rx.changed().await.is_err() {
                return Err(internal!("process vanished"));
            }
        };
        Ok(api::WaitResponse {
            exit_status: e.status,
            exited_at: MessageField::some(ts(e.at)),
            ..Default::default()
        })
    }

    pub async fn pids(&self, req: api::PidsRequest) -> Result<api::PidsResponse> {
        let c = self.container(&req.id)?;
        let pids = c.runtime.ps(&c.id).await.map_err(runtime_error)?;
        let mut execs = HashMap::new();
        let procs: Vec<Arc<Proc>> = lock(&c.execs).values().cloned().collect();
        for p in procs {
            let pid = p.state.lock().await.pid;
            execs.insert(pid as u32, p.exec_id.clone());
        }
        let processes = pids
            .into_iter()
            .map(|pid| {
                let mut info = api::ProcessInfo {
                    pid,
                    ..Default::default()
                };
                if let Some(exec_id) = execs.get(&pid) {
                    let d = ProcessDetails {
                        exec_id: exec_id.clone(),
                        ..Default::default()
                    };
                    if let Ok(any) = events::pack("type.googleapis.com/", &d) {
                        info.info = MessageField::some(any);
                    }
                }
                info
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    pub async fn update(&self, req: api::UpdateTaskRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let resources = req
            .resources
            .as_ref()
            .ok_or_else(|| TaskError::InvalidArgument("update without resources".into()))?;
        // containerd encodes runtime-spec types as JSON inside the Any.
        let path = c.bundle.join("update-resources.json");
        std::fs::write(&path, &resources.value).map_err(|e| internal!("{e}"))?;
        let res = c.runtime.update(&c.id, &path).await;
        let _ = std::fs::remove_file(&path);
        res.map_err(runtime_error)
    }

    pub async fn stats(&self, req: api::StatsRequest) -> Result<api::StatsResponse> {
        let c = self.container(&req.id)?;
        let pid = c.init.state.lock().await.pid;
        let any = tokio::task::spawn_blocking(move || cgroup::stats(pid))
            .await
            .map_err(|e| internal!("{e}"))?
            .map_err(|e| TaskError::NotFound(e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    pub fn close_io(&self, req: api::CloseIORequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if req.stdin {
            lock(&p.io).close_stdin();
        }
        Ok(())
    }

    pub fn resize_pty(&self, req: api::ResizePtyRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        lock(&p.io)
            .resize(req.width, req.height)
            .map_err(|e| TaskError::FailedPrecondition(e.to_string()))
    }

    pub async fn connect(&self, req: api::ConnectRequest) -> Result<api::ConnectResponse> {
        let task_pid = match self.container(&req.id) {
            Ok(c) => c.init.state.lock().await.pid as u32,
            Err(_) => 0,
        };
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    /// Tasks the shim still has (created and not deleted).
    pub fn task_count(&self) -> usize {
        lock(&self.inner.containers).len()
    }

    /// While held, a task Shutdown does not end the shim (its pod sandbox lives).
    pub fn hold(&self, held: bool) {
        self.inner
            .held
            .store(held, std::sync::atomic::Ordering::SeqCst);
    }

    fn shutdown(&self) {
        // One shim serves the whole pod: it goes only when its last task has,
        // and its sandbox (if it serves one) has been shut down.
        if self.inner.held.load(std::sync::atomic::Ordering::SeqCst) {
            info!("task shutdown ignored: the pod sandbox still holds the shim");
            return;
        }
        if lock(&self.inner.containers).is_empty() {
            info!("no tasks left; shutting down");
            self.inner.shutdown.notify_one();
        }
    }
}

fn runtime_error(e: RuntimeError) -> TaskError {
    match e {
        RuntimeError::NotFound { .. } => TaskError::FailedPrecondition(e.to_string()),
        other => TaskError::Internal(other.to_string()),
    }
}

fn read_pid(path: &Path) -> std::result::Result<i32, String> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| format!("read pid file {}: {e}", path.display()))?;
    s.trim()
        .parse()
        .map_err(|e| format!("pid file {}: {e}", path.display()))
}

fn write_record(bundle: &Path, record: &RuntimeRecord) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(record)?;
    let tmp = bundle.join(format!(".{RUNTIME_RECORD}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, bundle.join(RUNTIME_RECORD))
}

pub fn read_record(bundle: &Path) -> Option<RuntimeRecord> {
    serde_json::from_slice(&std::fs::read(bundle.join(RUNTIME_RECORD)).ok()?).ok()
}

/// Wraps each call in a span carrying the task and exec ids, and logs failures.
macro_rules! call {
    ($self:ident, $name:literal, $req:ident, $body:expr) => {{
        let span = info_span!($name, container_id = %$req.id, exec_id = tracing::field::Empty);
        async move {
            let r = $body;
            if let Err(e) = &r {
                warn!(error = %e, concat!($name, " failed"));
            }
            r.map_err(ttrpc::Error::from)
        }
        .instrument(span)
        .await
    }};
}

#[async_trait]
impl Task for TaskService {
    async fn state(
        &self,
        _: &TtrpcContext,
        req: api::StateRequest,
    ) -> ttrpc::Result<api::StateResponse> {
        call!(self, "state", req, self.state(req.clone()).await)
    }
    async fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        call!(self, "create", req, self.create(req.clone()).await)
    }
    async fn start(
        &self,
        _: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        call!(self, "start", req, self.start(req.clone()).await)
    }
    async fn delete(
        &self,
        _: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        call!(self, "delete", req, self.delete(req.clone()).await)
    }
    async fn pids(
        &self,
        _: &TtrpcContext,
        req: api::PidsRequest,
    ) -> ttrpc::Result<api::PidsResponse> {
        call!(self, "pids", req, self.pids(req.clone()).await)
    }
    async fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<Empty> {
        call!(
            self,
            "kill",
            req,
            self.kill(req.clone()).await.map(|()| Empty::new())
        )
    }
    async fn exec(&self, _: &TtrpcContext, req: api::ExecProcessRequest) -> ttrpc::Result<Empty> {
        call!(
            self,
            "exec",
            req,
            self.exec(req.clone()).await.map(|()| Empty::new())
        )
    }
    async fn resize_pty(
        &self,
        _: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> ttrpc::Result<Empty> {
        call!(
            self,
            "resize_pty",
            req,
            self.resize_pty(req.clone()).map(|()| Empty::new())
        )
    }
    async fn close_io(&self, _: &TtrpcContext, req: api::CloseIORequest) -> ttrpc::Result<Empty> {
        call!(
            self,
            "close_io",
            req,
            self.close_io(req.clone()).map(|()| Empty::new())
        )
    }
    async fn update(&self, _: &TtrpcContext, req: api::UpdateTaskRequest) -> ttrpc::Result<Empty> {
        call!(
            self,
            "update",
            req,
            self.update(req.clone()).await.map(|()| Empty::new())
        )
    }
    async fn wait(
        &self,
        _: &TtrpcContext,
        req: api::WaitRequest,
    ) -> ttrpc::Result<api::WaitResponse> {
        call!(self, "wait", req, self.wait(req.clone()).await)
    }
    async fn stats(
        &self,
        _: &TtrpcContext,
        req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        call!(self, "stats", req, self.stats(req.clone()).await)
    }
    async fn connect(
        &self,
        _: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        call!(self, "connect", req, self.connect(req.clone()).await)
    }
    async fn shutdown(&self, _: &TtrpcContext, req: api::ShutdownRequest) -> ttrpc::Result<Empty> {
        call!(self, "shutdown", req, {
            self.shutdown();
            Ok::<_, TaskError>(Empty::new())
        })
    }
}

/// The task service registered under both API generations' names: containerd
/// 1.6/1.7 call `containerd.task.v2.Task`, 2.x `containerd.task.v3.Task`; the
/// messages are identical on the wire. ttrpc's service entries cannot be
/// cloned, so the generated table is built twice over the same service.
pub fn services(svc: TaskService) -> HashMap<String, ttrpc::r#async::Service> {
    let task: Arc<dyn Task + Send + Sync> = Arc::new(svc);
    let mut map = containerd_shim_protos::shim_async::create_task(task.clone());
    let v3 = containerd_shim_protos::shim_async::create_task(task);
    for (name, service) in v3 {
        if let Some(base) = name.strip_suffix(".v3.Task") {
            map.insert(format!("{base}.v2.Task"), service);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_state_machine_refuses_the_impossible() {
        let mut st = ProcState {
            status: ProcStatus::Created,
            pid: 1,
            exited: None,
        };
        assert!(st.transition(ProcStatus::Created).is_err());
        st.transition(ProcStatus::Running)
            .expect("created → running");
        assert!(st.transition(ProcStatus::Running).is_err());
        assert!(st.transition(ProcStatus::Created).is_err());
        st.transition(ProcStatus::Stopped)
            .expect("running → stopped");
        assert!(
            st.transition(ProcStatus::Stopped).is_err(),
            "an exit is handled once"
        );
        assert!(st.transition(ProcStatus::Running).is_err());
    }

    #[test]
    fn both_task_api_generations_are_served() {
        let (events, _) = Events::recorder("t");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let names: Vec<String> = rt.block_on(async {
            let svc = TaskService::new(
                Config {
                    namespace: "t".into(),
                    handler: Options::default(),
                    default_runtime: "runc".into(),
                },
                events,
                Arc::default(),
            );
            services(svc).into_keys().collect()
        });
        assert!(
            names.iter().any(|n| n == "containerd.task.v2.Task"),
            "{names:?}"
        );
        assert!(
            names.iter().any(|n| n == "containerd.task.v3.Task"),
            "{names:?}"
        );
    }
}
