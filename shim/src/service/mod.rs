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
/// Every ttrpc method of the task and sandbox services runs through here: inside the span
/// that names the call and its id, a failure is logged once, then mapped to its status.
pub(crate) async fn traced<T>(
    span: tracing::Span,
    call: impl std::future::Future<Output = Result<T>>,
) -> ttrpc::Result<T> {
    async move {
        let r = call.await;
        if let Err(e) = &r {
            warn!(error = %e, "call failed");
        }
        r.map_err(ttrpc::Error::from)
    }
    .instrument(span)
    .await
}

macro_rules! call {
    ($self:ident, $name:literal, $req:ident, $body:expr) => {
        traced(
            info_span!($name, container_id = %$req.id, exec_id = tracing::field::Empty),
            async move { $body },
        )
        .await
    };
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

// The task operations, one file each (after `internal!`, which they use).
mod create;
mod delete;
mod exec;
mod kill;
mod query;
mod start;
mod update;

#[cfg(test)]
mod tests {
    use super::*;

    /// Delete of a never-started task moves it Created → Stopped with `?` now: a refusal is
    /// an error naming both states, not dropped.
    #[test]
    fn a_refused_transition_names_both_states() {
        let mut st = ProcState {
            status: ProcStatus::Stopped,
            pid: 1,
            exited: None,
        };
        let e = st
            .transition(ProcStatus::Running)
            .expect_err("stopped → running");
        assert!(
            matches!(&e, TaskError::FailedPrecondition(m) if m == "process cannot go from Stopped to Running"),
            "{e}"
        );
    }

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
