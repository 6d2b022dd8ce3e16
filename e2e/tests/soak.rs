//! A kubelet-shaped soak with faults, against crispd.
//!
//! A driver that behaves like kubelet keeps `SOAK_PODS` pods of 3 containers churning for
//! `SOAK_SECS`: one pod worker per pod (as kubelet has) keeps its pod READY and its containers
//! running, recreating what died; one of the three crashes every few seconds and is restarted
//! with back-off; an ExecSync probe runs every 10 s per pod; a relist (ListPodSandbox +
//! ListContainers, ContainerStatus of what changed) runs every second and the stats calls
//! (ListContainerStats, ListPodSandboxStats) every 10 s; image GC pulls and removes an unused
//! image; pods are deleted at random and come back under a new attempt. Meanwhile faults are
//! injected: `kill -9` of crispd (restarted, as a service manager would), of a shim, of a
//! container's process; an OCI runtime stand-in fails 5% of `create`s and a CNI stand-in fails
//! 5% of ADDs and hangs another 2% (crispd's plugin timeout ends those).
//!
//! Throughout: no call fails with Unknown or Internal, every call answers within its deadline,
//! and after a fault the pods it hit are running again within 10 s (a recovery that met an
//! injected failure on the way is reported apart: those are the stand-ins' doing). At the end,
//! after every pod is removed: no shim, pause, container process, cgroup, mount, netns or
//! snapshot is left, and crispd's fd count is back at its idle figure. The report prints the
//! calls, faults, recoveries, p99 latencies and crispd's RSS and fd curve.
//!
//! `soak_5min` runs in `make test` (20 pods, 300 s); `soak_long` is ignored
//! (`SOAK_SECS=3600 SOAK_PODS=100 cargo nextest run -p crisp-e2e --run-ignored only -E
//! 'test(soak_long)' --no-capture`). The disk is slow throughout: crispd's failpoint
//! `CRISP_FAILPOINT_SLOW_COMMIT` makes every 25th store commit wait 300 ms before its fsync.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use crisp_e2e::cri::{CriClient, container_config, grpc_code};
use crisp_e2e::harness::{CNI_BIN_DIR, RuntimeKind, TestEnv};
use crisp_e2e::registry::Registry;
use crisp_proto::cri::v1 as api;
use rand::Rng;
use tonic::Code;

const BUSYBOX: &str = "docker.io/library/busybox:latest";
/// Pulled and removed by the image GC stand-in; no pod uses it (busybox-zstd would not do:
/// it is busybox's image id, and RemoveImage removes the image, every tag of it).
const GC_IMAGE: &str = "docker.io/library/layers:latest";
const RECOVERY_BOUND: Duration = Duration::from_secs(10);
/// The slow disk: every 25th store commit waits 300 ms before its fsync (crispd's failpoint).
const SLOW_COMMIT: &str = "300/25";
const SLOW_COMMIT_LOG: &str = "failpoint: slow store commit";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_5min() -> Result<()> {
    soak(env_num("SOAK_SECS", 300), env_num("SOAK_PODS", 20) as usize).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "an hour by default: SOAK_SECS and SOAK_PODS set it"]
async fn soak_long() -> Result<()> {
    soak(
        env_num("SOAK_SECS", 3600),
        env_num("SOAK_PODS", 100) as usize,
    )
    .await
}

// ---------------------------------------------------------------------------------------
// Stand-ins for a failing OCI runtime and CNI plugin

/// A directory of stand-in binaries, removed on drop.
struct StandIns {
    dir: tempfile::TempDir,
}

impl StandIns {
    fn make() -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("crisp-soak-bin-")
            .tempdir_in("/var/tmp")?;
        let runc = crisp_e2e::harness::which("runc")?;
        let pct = "$(( $(od -An -N2 -tu2 /dev/urandom) % 100 ))";
        // `create` fails 5% of the time, as a runtime hitting a transient error would.
        let log = dir.path().join("injected.log");
        let log = log.display();
        let runtime = format!(
            "#!/bin/sh\nfor a in \"$@\"; do\n  if [ \"$a\" = create ] && [ {pct} -lt 5 ]; then\n    echo \"$(date +%s.%N) runtime $*\" >> {log}\n    echo 'soak: injected OCI runtime failure' >&2; exit 1\n  fi\ndone\nexec {} \"$@\"\n",
            runc.display()
        );
        // The bridge plugin's ADD fails 5% and hangs 2% of the time (`exec`, so crispd's
        // timeout kills the hanging process itself); DEL and CHECK always run.
        let bridge = format!(
            "#!/bin/sh\nif [ \"$CNI_COMMAND\" = ADD ]; then\n  r={pct}\n  if [ $r -lt 7 ]; then echo \"$(date +%s.%N) cni $CNI_ARGS\" >> {log}; fi\n  if [ $r -lt 5 ]; then\n    echo '{{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"soak: injected CNI failure\"}}'; exit 1\n  fi\n  if [ $r -lt 7 ]; then exec sleep 3600; fi\nfi\nexec {CNI_BIN_DIR}/bridge\n"
        );
        let cni = dir.path().join("cni");
        std::fs::create_dir(&cni)?;
        for e in std::fs::read_dir(CNI_BIN_DIR)? {
            let e = e?;
            if e.file_name() != "bridge" {
                std::os::unix::fs::symlink(e.path(), cni.join(e.file_name()))?;
            }
        }
        for (path, text) in [
            (dir.path().join("flaky-runc"), runtime),
            (cni.join("bridge"), bridge),
        ] {
            std::fs::write(&path, text)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(Self { dir })
    }

    fn runtime(&self) -> PathBuf {
        self.dir.path().join("flaky-runc")
    }

    fn cni_bin(&self) -> PathBuf {
        self.dir.path().join("cni")
    }

    /// Whether a stand-in injected a failure or hang since `since` (seconds since the epoch)
    /// into the slot's pod (CNI sees its name) or one of `ids` (the runtime sees the id).
    fn injected_since(&self, since: f64, slot: usize, ids: &[String]) -> bool {
        let text =
            std::fs::read_to_string(self.dir.path().join("injected.log")).unwrap_or_default();
        let pod = format!("K8S_POD_NAME=soak{slot}-");
        text.lines().any(|l| {
            let t: f64 = l
                .split(' ')
                .next()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0.0);
            t >= since && (l.contains(&pod) || ids.iter().any(|id| l.contains(id.as_str())))
        })
    }
}

// ---------------------------------------------------------------------------------------
// What the driver records

#[derive(Default)]
struct Record {
    latencies: BTreeMap<&'static str, Vec<Duration>>,
    errors: BTreeMap<(&'static str, String), u64>,
    /// Calls that broke the promise: Unknown or Internal, or no answer within the deadline.
    violations: Vec<String>,
    faults: BTreeMap<&'static str, u64>,
    recoveries: Vec<Duration>,
    slow_recoveries: Vec<String>,
    excused_recoveries: u64,
    curve: Vec<(u64, u64, usize)>,
}

type Shared = Arc<Mutex<Record>>;

fn rec(r: &Shared) -> std::sync::MutexGuard<'_, Record> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// One CRI call under its deadline. A refusal the caller expects in a churning node
/// (NotFound, Unavailable while crispd restarts, an injected failure) is counted and returned;
/// Unknown, Internal or a missed deadline is a violation.
async fn call<T>(
    r: &Shared,
    name: &'static str,
    deadline: Duration,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let t = Instant::now();
    let out = tokio::time::timeout(deadline, f).await;
    let elapsed = t.elapsed();
    let mut g = rec(r);
    match out {
        Err(_) => {
            g.violations
                .push(format!("{name}: no answer within {deadline:?}"));
            anyhow::bail!("{name}: deadline")
        }
        Ok(Ok(v)) => {
            g.latencies.entry(name).or_default().push(elapsed);
            Ok(v)
        }
        Ok(Err(e)) => {
            // tonic reports a connection that broke under the call (crispd killed) as
            // Unknown on the client's side: crispd never said it.
            let code = grpc_code(&e).filter(|_| !broken_connection(&e));
            if matches!(code, Some(Code::Unknown | Code::Internal)) {
                g.violations.push(format!("{name}: {e:#}"));
            }
            let key = code.map_or("connection broke".to_string(), |c| format!("{c:?}"));
            *g.errors.entry((name, key)).or_default() += 1;
            Err(e)
        }
    }
}

/// The call's connection failed (the client's transport made the status), rather than crispd
/// answering: a status decoded from the server's trailers has no source error, one tonic makes
/// from a broken connection (reset, refused, an h2 body error) carries it.
fn broken_connection(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<tonic::Status>()
            .is_some_and(|s| std::error::Error::source(s).is_some())
    })
}

// ---------------------------------------------------------------------------------------
// Pod workers

/// What one pod worker keeps, and what the fault injector and the checks read.
#[derive(Default)]
struct Slot {
    pod: Option<String>,
    /// Container ids: app, side, crash (the crash-looper).
    containers: [Option<String>; 3],
    /// The pod is READY and app and side are running.
    healthy: bool,
    /// Asked to delete its pod (churn): it comes back under a new attempt.
    churn: bool,
    attempt: u32,
}

struct Worker {
    idx: usize,
    cri: CriClient,
    env_log_dir: PathBuf,
    cgroup_parent: String,
    slot: Arc<Mutex<Slot>>,
    r: Shared,
    stop: Arc<AtomicBool>,
}

fn lock(s: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

const NAMES: [&str; 3] = ["app", "side", "crash"];

fn container(i: usize, attempt: u32) -> api::ContainerConfig {
    let mut c = match i {
        2 => container_config("crash", BUSYBOX, &["sh", "-c", "sleep 3; exit 1"]),
        _ => container_config(NAMES[i], BUSYBOX, &["sleep", "36000"]),
    };
    if let Some(m) = c.metadata.as_mut() {
        m.attempt = attempt;
    }
    c
}

/// kubelet's crash-loop back-off, scaled down: 1 s doubling to 8 s.
struct CrashLoop {
    backoff: Duration,
    next: Instant,
}

impl CrashLoop {
    fn new() -> Self {
        CrashLoop {
            backoff: secs(1),
            next: Instant::now(),
        }
    }

    /// Whether the back-off has run out; if so the next one starts, twice as long.
    fn may_restart(&mut self) -> bool {
        if Instant::now() < self.next {
            return false;
        }
        self.next = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(secs(8));
        true
    }
}

impl Worker {
    async fn run(self) {
        let mut pod_cfg = None;
        let mut crash_loop = CrashLoop::new();
        let mut probe_next = Instant::now();
        let mut restarts = [0u32; 3];
        while !self.stop.load(Ordering::Relaxed) {
            if let Err(e) = self
                .step(
                    &mut pod_cfg,
                    &mut restarts,
                    &mut crash_loop,
                    &mut probe_next,
                )
                .await
            {
                let mut s = lock(&self.slot);
                s.healthy = false;
                tracing_note(&format!("pod worker {}", self.idx), &e);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn step(
        &self,
        pod_cfg: &mut Option<api::PodSandboxConfig>,
        restarts: &mut [u32; 3],
        crash_loop: &mut CrashLoop,
        probe_next: &mut Instant,
    ) -> Result<()> {
        let (pod, churn) = {
            let s = lock(&self.slot);
            (s.pod.clone(), s.churn)
        };
        let Some(pod) = pod else {
            return self.start_pod(pod_cfg).await;
        };
        let st = call(
            &self.r,
            "PodSandboxStatus",
            secs(30),
            self.cri.pod_status(&pod),
        )
        .await?;
        if churn || st.state != api::PodSandboxState::SandboxReady as i32 {
            return self.remove_pod(&pod).await;
        }
        let cfg = pod_cfg.as_ref().context("pod without its config")?;
        // Health is what should run: app and side. It is recorded before the crash-looper's
        // restart, whose back-off and create + start are kubelet's pace, not a recovery.
        let mut healthy = true;
        for i in 0..2 {
            healthy &= self.ensure_container(&pod, cfg, i, restarts, None).await?;
        }
        lock(&self.slot).healthy = healthy;
        // A refused restart of the crash-looper is counted by `call` (a violation if it is
        // Unknown or Internal) and retried on the next step; the pod stays healthy.
        if let Err(e) = self
            .ensure_container(&pod, cfg, 2, restarts, Some(&mut *crash_loop))
            .await
        {
            tracing_note(&format!("pod worker {} crash-looper", self.idx), &e);
        }
        if Instant::now() >= *probe_next {
            *probe_next = Instant::now() + secs(10);
            let app = lock(&self.slot).containers[0].clone();
            if let Some(app) = app {
                let r = call(
                    &self.r,
                    "ExecSync",
                    secs(30),
                    self.cri.exec_sync(&app, &["true"], 5),
                )
                .await?;
                ensure!(r.exit_code == 0, "probe in {app}: exit {}", r.exit_code);
            }
        }
        Ok(())
    }

    async fn start_pod(&self, pod_cfg: &mut Option<api::PodSandboxConfig>) -> Result<()> {
        let attempt = {
            let mut s = lock(&self.slot);
            s.attempt += 1;
            s.churn = false;
            s.attempt
        };
        let mut cfg = crisp_e2e::cri::pod_config(
            &format!("soak{}", self.idx),
            &self.env_log_dir,
            &self.cgroup_parent,
        )?;
        if let Some(m) = cfg.metadata.as_mut() {
            m.attempt = attempt;
        }
        let id = call(
            &self.r,
            "RunPodSandbox",
            secs(120),
            self.cri.run_pod_with_handler(&cfg, "flaky"),
        )
        .await?;
        let mut s = lock(&self.slot);
        s.pod = Some(id);
        s.containers = Default::default();
        *pod_cfg = Some(cfg);
        Ok(())
    }

    async fn remove_pod(&self, pod: &str) -> Result<()> {
        lock(&self.slot).healthy = false;
        call(&self.r, "StopPodSandbox", secs(60), self.cri.stop_pod(pod)).await?;
        call(
            &self.r,
            "RemovePodSandbox",
            secs(60),
            self.cri.remove_pod(pod),
        )
        .await?;
        let mut s = lock(&self.slot);
        s.pod = None;
        s.containers = Default::default();
        Ok(())
    }

    /// Container `i` is running, or is (re)created now; returns whether it runs. A container
    /// with a `crash_loop` is restarted only when its back-off allows.
    async fn ensure_container(
        &self,
        pod: &str,
        cfg: &api::PodSandboxConfig,
        i: usize,
        restarts: &mut [u32; 3],
        crash_loop: Option<&mut CrashLoop>,
    ) -> Result<bool> {
        let id = lock(&self.slot).containers[i].clone();
        if let Some(id) = &id {
            let st = call(
                &self.r,
                "ContainerStatus",
                secs(30),
                self.cri.container_status(id),
            )
            .await?;
            if st.state == api::ContainerState::ContainerRunning as i32 {
                return Ok(true);
            }
            if let Some(cl) = crash_loop
                && !cl.may_restart()
            {
                return Ok(false);
            }
            call(
                &self.r,
                "RemoveContainer",
                secs(60),
                self.cri.remove_container(id),
            )
            .await?;
            lock(&self.slot).containers[i] = None;
        }
        restarts[i] += 1;
        let c = container(i, restarts[i]);
        let id = call(
            &self.r,
            "CreateContainer",
            secs(60),
            self.cri.create_container(pod, &c, cfg),
        )
        .await?;
        lock(&self.slot).containers[i] = Some(id.clone());
        call(
            &self.r,
            "StartContainer",
            secs(60),
            self.cri.start_container(&id),
        )
        .await?;
        Ok(true)
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn epoch_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// With `SOAK_VERBOSE` set, what went wrong where and when (to read beside crispd's log).
fn tracing_note(who: &str, e: &anyhow::Error) {
    if std::env::var_os("SOAK_VERBOSE").is_some() {
        eprintln!("{:.3} {who}: {e:#}", epoch_secs());
    }
}

// ---------------------------------------------------------------------------------------
// Node-level loops: relist, stats, image GC

async fn relist(cri: CriClient, r: Shared, stop: Arc<AtomicBool>) {
    let mut seen: BTreeMap<String, i32> = BTreeMap::new();
    let mut tick = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let _ = call(&r, "ListPodSandbox", secs(10), cri.list_pods_filtered(None)).await;
        if let Ok(cs) = call(&r, "ListContainers", secs(10), cri.list_containers(None)).await {
            for c in cs {
                if seen.insert(c.id.clone(), c.state) != Some(c.state) {
                    let _ =
                        call(&r, "ContainerStatus", secs(10), cri.container_status(&c.id)).await;
                }
            }
        }
        if tick.is_multiple_of(10) {
            let rt = cri.runtime();
            let _ = call(&r, "ListContainerStats", secs(10), async {
                let mut rt = rt.clone();
                Ok(rt
                    .list_container_stats(api::ListContainerStatsRequest::default())
                    .await?)
            })
            .await;
            let _ = call(&r, "ListPodSandboxStats", secs(10), async {
                let mut rt = rt.clone();
                Ok(rt
                    .list_pod_sandbox_stats(api::ListPodSandboxStatsRequest::default())
                    .await?)
            })
            .await;
        }
        if tick % 30 == 15 {
            let _ = call(&r, "PullImage", secs(120), cri.pull(GC_IMAGE, None)).await;
            let _ = call(&r, "RemoveImage", secs(60), cri.remove_image(GC_IMAGE)).await;
        }
        tick += 1;
        tokio::time::sleep(secs(1)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Faults

#[derive(Clone, Copy, Debug)]
enum Fault {
    Crispd,
    Shim,
    Container,
    Churn,
}

fn kill9(pid: i32) -> Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)
        .with_context(|| format!("kill -9 {pid}"))
}

/// Injects one fault; returns the slots whose pods it hit.
async fn inject(
    env: &mut TestEnv,
    cri: &CriClient,
    slots: &[Arc<Mutex<Slot>>],
    f: Fault,
) -> Result<Vec<usize>> {
    let mut rng = rand::rng();
    let healthy: Vec<usize> = (0..slots.len())
        .filter(|&i| lock(&slots[i]).healthy)
        .collect();
    match f {
        Fault::Crispd => {
            env.kill_daemon()?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            env.restart_daemon().await?;
            Ok(healthy)
        }
        Fault::Shim | Fault::Container | Fault::Churn => {
            if healthy.is_empty() {
                return Ok(vec![]);
            }
            let i = healthy[rng.random_range(0..healthy.len())];
            let (pod, app) = {
                let s = lock(&slots[i]);
                (s.pod.clone(), s.containers[0].clone())
            };
            match f {
                Fault::Shim => {
                    let pod = pod.context("healthy slot without pod")?;
                    let pid =
                        std::fs::read_to_string(env.state.join("pods").join(&pod).join("shim.pid"))
                            .with_context(|| format!("shim.pid of pod {pod}"))?;
                    kill9(pid.trim().parse().context("shim.pid")?)?;
                }
                Fault::Container => {
                    let app = app.context("healthy slot without app")?;
                    kill9(cri.container_pid(&app).await?)?;
                }
                _ => lock(&slots[i]).churn = true,
            }
            Ok(vec![i])
        }
    }
}

/// Waits until every slot in `hit` is healthy again; records the time or why it was late.
async fn await_recovery(
    slots: &[Arc<Mutex<Slot>>],
    hit: &[usize],
    f: Fault,
    (at, since): (Instant, f64),
    stand_ins: &StandIns,
    r: &Shared,
) {
    // Let the workers see the fault first (a killed process is noticed on their next step).
    tokio::time::sleep(Duration::from_millis(700)).await;
    loop {
        let pending: Vec<usize> = hit
            .iter()
            .copied()
            .filter(|&i| !lock(&slots[i]).healthy)
            .collect();
        if pending.is_empty() {
            rec(r).recoveries.push(at.elapsed());
            return;
        }
        if at.elapsed() > RECOVERY_BOUND {
            // A pod whose way back met an injected failure or hang is the stand-ins' doing.
            let excused = pending.iter().all(|&i| {
                let ids: Vec<String> = lock(&slots[i])
                    .containers
                    .iter()
                    .flatten()
                    .cloned()
                    .collect();
                stand_ins.injected_since(since, i, &ids)
            });
            let mut g = rec(r);
            if excused {
                g.excused_recoveries += 1;
            } else {
                let states: Vec<String> = pending
                    .iter()
                    .map(|&i| {
                        let s = lock(&slots[i]);
                        format!("slot {i}: pod {:?} containers {:?}", s.pod, s.containers)
                    })
                    .collect();
                g.slow_recoveries.push(format!(
                    "{f:?}: not running {RECOVERY_BOUND:?} after it: {}",
                    states.join("; ")
                ));
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn crispd_rss_fds(env: &TestEnv) -> Option<(u64, usize)> {
    let pid = env.daemon_pid()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

// ---------------------------------------------------------------------------------------
// The soak

async fn soak(duration_secs: u64, pods: usize) -> Result<()> {
    let stand_ins = StandIns::make()?;
    let registry = Registry::start()?;
    registry.push(&["busybox", "layers", "pause"])?;
    let env = TestEnv::builder(RuntimeKind::Crispd)
        .mirror(registry.host())
        .cni_bin_dir(stand_ins.cni_bin())
        .crispd_config(format!(
            "[runtime_handlers.flaky]\nbinary = {:?}\n",
            stand_ins.runtime().display().to_string()
        ))
        .crispd_env("CRISP_FAILPOINT_SLOW_COMMIT", SLOW_COMMIT)
        .start()
        .await?;
    let mut env = env;
    let outcome = run(&mut env, &stand_ins, duration_secs, pods).await;
    env.finish("crispd soak", outcome).await
}

async fn run(
    env: &mut TestEnv,
    stand_ins: &StandIns,
    duration_secs: u64,
    pods: usize,
) -> Result<()> {
    let cri = CriClient::connect(&env.socket).await?;
    cri.pull(BUSYBOX, None).await?;
    let baseline = env.idle_baseline();
    let (_, idle_fds) = crispd_rss_fds(env).context("crispd's /proc entry")?;
    let r: Shared = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let slots: Vec<Arc<Mutex<Slot>>> = (0..pods).map(|_| Arc::default()).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (idx, slot) in slots.iter().enumerate() {
        tasks.spawn(
            Worker {
                idx,
                cri: cri.clone(),
                env_log_dir: env.pod_log_dir.clone(),
                cgroup_parent: env.cgroup_parent.clone(),
                slot: slot.clone(),
                r: r.clone(),
                stop: stop.clone(),
            }
            .run(),
        );
    }
    tasks.spawn(relist(cri.clone(), r.clone(), stop.clone()));

    let t0 = Instant::now();
    let end = t0 + secs(duration_secs);
    // Warm-up: every pod up before the first fault (bounded: the stand-ins may delay some).
    while t0.elapsed() < secs(180) && slots.iter().any(|s| !lock(s).healthy) {
        tokio::time::sleep(secs(1)).await;
    }
    eprintln!("soak: {pods} pods up after {:?}", t0.elapsed());
    let faults = [
        Fault::Crispd,
        Fault::Shim,
        Fault::Container,
        Fault::Churn,
        Fault::Shim,
        Fault::Container,
    ];
    let mut n = 0usize;
    let mut next_sample = Instant::now();
    while Instant::now() < end {
        if Instant::now() >= next_sample {
            next_sample += secs(10);
            if let Some((rss, fds)) = crispd_rss_fds(env) {
                rec(&r).curve.push((t0.elapsed().as_secs(), rss, fds));
            }
        }
        let f = faults[n % faults.len()];
        n += 1;
        let at = (Instant::now(), epoch_secs());
        let hit = inject(env, &cri, &slots, f).await?;
        tracing_note("faults", &anyhow::anyhow!("{f:?} hit slots {hit:?}"));
        *rec(&r).faults.entry(fault_name(f)).or_default() += 1;
        if !matches!(f, Fault::Churn) && !hit.is_empty() {
            await_recovery(&slots, &hit, f, at, stand_ins, &r).await;
        }
        tokio::time::sleep(secs(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}

    // Remove everything, as kubelet does when the node is drained.
    for s in &slots {
        let pod = lock(s).pod.clone(); // the guard must not live across the await
        if let Some(pod) = pod {
            cri.stop_and_remove_pod(&pod).await?;
        }
    }
    for p in cri.list_pods().await? {
        cri.stop_and_remove_pod(&p).await?;
    }
    let report = report(&r, t0.elapsed());
    let slowed = slowed_commits(env)?;
    eprintln!("{report}slow disk ({SLOW_COMMIT}: ms / every n-th commit): {slowed} commits slowed");
    // Every check runs and reports, so one broken promise never hides whether another held.
    let mut broken = Vec::new();
    if slowed == 0 {
        broken.push(format!(
            "the slow-disk failpoint never fired: crispd's log has no {SLOW_COMMIT_LOG:?}"
        ));
    }
    {
        let g = rec(&r);
        if !g.violations.is_empty() {
            broken.push(format!("broken promises:\n{}", g.violations.join("\n")));
        }
        if !g.slow_recoveries.is_empty() {
            broken.push(format!(
                "slow recoveries:\n{}",
                g.slow_recoveries.join("\n")
            ));
        }
    }
    let left = env.idle_leftovers(&baseline);
    eprintln!("left after removing every pod: {left:?}");
    if !left.is_empty() {
        broken.push(format!("after removing every pod: {left:#?}"));
    }
    let (_, fds) = crispd_rss_fds(env).context("crispd's /proc entry")?;
    eprintln!("crispd fds with no pod left: {fds} (idle at the start: {idle_fds})");
    if fds > idle_fds + 8 {
        broken.push(format!(
            "crispd holds {fds} fds with no pod left, {idle_fds} when it was idle at the start"
        ));
    }
    ensure!(broken.is_empty(), "{}", broken.join("\n\n"));
    Ok(())
}

/// Counted from crispd's log (it spans every restart): the failpoint logs each slowed commit.
fn slowed_commits(env: &TestEnv) -> Result<usize> {
    use std::io::BufRead;
    let f = std::fs::File::open(&env.daemon_log)
        .with_context(|| format!("opening {}", env.daemon_log.display()))?;
    let mut n = 0;
    for line in std::io::BufReader::new(f).split(b'\n') {
        let line = line.context("reading crispd's log")?;
        n += usize::from(
            line.windows(SLOW_COMMIT_LOG.len())
                .any(|w| w == SLOW_COMMIT_LOG.as_bytes()),
        );
    }
    Ok(n)
}

fn fault_name(f: Fault) -> &'static str {
    match f {
        Fault::Crispd => "kill -9 crispd",
        Fault::Shim => "kill -9 shim",
        Fault::Container => "kill -9 container process",
        Fault::Churn => "pod deleted",
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

fn report(r: &Shared, took: Duration) -> String {
    use std::fmt::Write;
    let mut g = rec(r);
    let mut out = format!("soak report ({took:?})\ncalls (count, p50, p99):\n");
    for (name, v) in g.latencies.iter_mut() {
        let n = v.len();
        let (p50, p99) = (pct(v, 0.5), pct(v, 0.99));
        let _ = writeln!(out, "  {name:22} {n:6} {p50:>10.1?} {p99:>10.1?}");
    }
    let _ = writeln!(out, "refusals (method, code: count):");
    for ((m, c), n) in &g.errors {
        let _ = writeln!(out, "  {m:22} {c:18} {n}");
    }
    let _ = writeln!(out, "faults: {:?}", g.faults);
    let mut rv = g.recoveries.clone();
    let _ = writeln!(
        out,
        "recoveries: {} (median {:?}, max {:?}); delayed by an injected failure: {}; slow: {}",
        rv.len(),
        pct(&mut rv, 0.5),
        rv.iter().max().copied().unwrap_or_default(),
        g.excused_recoveries,
        g.slow_recoveries.len()
    );
    let _ = writeln!(out, "crispd RSS (KiB) and fds over time (s):");
    for (t, rss, fds) in &g.curve {
        let _ = writeln!(out, "  {t:5} {rss:8} {fds:5}");
    }
    let _ = writeln!(out, "violations: {}", g.violations.len());
    out
}
