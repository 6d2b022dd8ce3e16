//! Benchmark, not a test (ignored by default): crispd against Debian's containerd, both with
//! runc, each in its own [`TestEnv`], driven by this one Rust client, in one run. `make bench`
//! runs it on release builds (`CRISP_BIN=target/release/crispd`; the harness takes the shim
//! beside it). It measures, per runtime:
//! - per-call latency (p50/p90/p99) of every pod and container lifecycle call, over
//!   `CRISP_BENCH_SEQ` sequential pods of one container;
//! - wall time to start 50 pods × 1 container at parallelism 1, 4 and 16, and to tear them
//!   down (StopPodSandbox + RemovePodSandbox) at the same parallelism;
//! - 200 pods at parallelism 16: failures (the target is zero) and wall time;
//! - memory per pod all-in with 100 pods × 2 containers running: the daemon's RSS/PSS over the
//!   pods, plus each pod's shim and pause (RSS and PSS);
//! - steady state under kubelet-like polling of those 100 pods for `CRISP_BENCH_STEADY_SECS`:
//!   ListPodSandbox + ListContainers (+ ContainerStatus of changed containers) every second,
//!   ListContainerStats + ListPodSandboxStats every 10 s; CPU seconds of the daemon and of all
//!   its shims;
//! - with those 100 pods still running, a `kill -9` of the daemon and the time from its restart
//!   until it lists every pod Ready and every container running (kubelet's first relist);
//! - pull + unpack of the `large` image through CRI PullImage, cold (image removed, page cache
//!   synced and dropped) and warm (already present), median of `CRISP_BENCH_PULLS`, in fresh
//!   environments after both runtimes' runs, the two runtimes taking turns ([`pull_race`]).
//!
//! Beside them, the floor under the start and teardown rows ([`floor`]): the same pods
//! started and stopped by runc and the bridge CNI plugin alone, no daemon in between, at the
//! same parallelism; one at a time, its CNI ADD and `runc run` under RunPodSandbox and
//! StartContainer.
//!
//! The runtimes and the floor run side by side and take turns phase by phase
//! ([`side_by_side`]), wall-time run by wall-time run, so that the machine's drift over the
//! run's 20 minutes falls on both sides of each ratio.
//!
//! It prints one table of figures, crispd/containerd ratios, the floor and its ratio to
//! containerd, and the targets, and writes the same as JSON to `$BENCH_JSON` if set. It asserts nothing about time; it fails
//! only if a runtime fails (a failed pod in the 200-pod run is counted and reported, not fatal).
//! `CRISP_BENCH_ONLY=containerd` (or `crispd`, `floor`, `pulls`) runs one part; both daemons log at
//! `info`, as a node runs them (`CRISP_BENCH_DEBUG_LOG=1`: `debug`, to see where a call's time goes).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use crisp_e2e::cri::{CriClient, container_config};
use crisp_e2e::harness::{RuntimeKind, TestEnv};
use crisp_e2e::leaks;
use crisp_e2e::procfs::{smaps_kib, vm_rss_kib};
use crisp_e2e::registry::Registry;
use crisp_proto::cri::v1 as api;
use serde_json::json;

// A crate root looks for modules beside it; the floor is this benchmark's alone.
#[path = "bench_pods/floor.rs"]
mod floor;

const BUSYBOX: &str = "docker.io/library/busybox:latest";
/// Exits on SIGTERM at once (a shell as PID 1 ignores it otherwise), so StopContainer measures
/// the runtime, not a grace period.
const SLEEPER: &[&str] = &["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"];

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Waits (at most 120 s, or `CRISP_BENCH_SETTLE_SECS`) until the 1-minute load average is
/// below 1.5, with the page cache synced and dropped: the runtime measured second otherwise
/// starts while the first one's 100-pod teardown is still settling, which slowed crispd's
/// 50-pod start by a quarter here.
async fn settle() {
    drop_caches();
    let t = Instant::now();
    let most = Duration::from_secs(env_count("CRISP_BENCH_SETTLE_SECS", 120) as u64);
    while t.elapsed() < most {
        let one: f64 = loadavg()
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if one < 1.5 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    eprintln!(
        "settled in {:.0} s, load average {}",
        t.elapsed().as_secs_f64(),
        loadavg()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Shims of this env: `containerd-shim-*` processes whose command line names its root
/// (containerd's socket for runc-v2 shims, crispd's events socket for crisp's).
fn shim_pids(env: &TestEnv) -> Vec<i32> {
    let root = format!("{}/", env.root.display());
    leaks::processes_mentioning(&root)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0).next().is_some_and(|a0| {
                    let a0 = String::from_utf8_lossy(a0);
                    a0.rsplit('/')
                        .next()
                        .is_some_and(|n| n.starts_with("containerd-shim"))
                })
            })
        })
        .collect()
}

/// utime + stime of a process in seconds (0 if it is gone).
fn cpu_secs(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(14) + ticks(15)) as f64 / hz
}

/// Latency samples per CRI call name, shared by concurrent tasks.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<BTreeMap<&'static str, Vec<f64>>>>);

impl Calls {
    async fn time<T>(&self, name: &'static str, f: impl Future<Output = Result<T>>) -> Result<T> {
        let t = Instant::now();
        let r = f.await?;
        let took = ms(t.elapsed());
        if let Ok(mut m) = self.0.lock() {
            m.entry(name).or_default().push(took);
        }
        Ok(r)
    }

    fn take(&self) -> BTreeMap<&'static str, Vec<f64>> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// The order of the per-call rows: a pod's life, then kubelet's polling.
const CALL_ORDER: &[&str] = &[
    "RunPodSandbox",
    "PodSandboxStatus",
    "CreateContainer",
    "StartContainer",
    "ContainerStatus",
    "StopContainer",
    "RemoveContainer",
    "StopPodSandbox",
    "RemovePodSandbox",
    "ListPodSandbox",
    "ListContainers",
    "ListContainerStats",
    "ListPodSandboxStats",
];

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

#[derive(Debug, Default, Clone)]
struct Figures {
    calls: BTreeMap<&'static str, Vec<f64>>,
    /// Wall times in seconds by phase name, in the order measured.
    wall: Vec<(String, f64)>,
    failures_200: usize,
    mem: Memory,
    steady: Steady,
    pull_cold_mbs: Vec<f64>,
    pull_warm_ms: Vec<f64>,
    load: Vec<String>,
}

#[derive(Debug, Default, Clone)]
struct Memory {
    pods: usize,
    daemon_rss: u64,
    daemon_pss: u64,
    shims_rss: u64,
    shims_pss: u64,
    shim_rss_median: f64,
    pause_rss: u64,
    pause_pss: u64,
}

#[derive(Debug, Default, Clone)]
struct Steady {
    secs: f64,
    daemon_cpu: f64,
    shims_cpu: f64,
    shims: usize,
}

async fn pod_with_container(
    cri: &CriClient,
    calls: Option<&Calls>,
    pod: api::PodSandboxConfig,
    containers: usize,
) -> Result<(String, Vec<String>)> {
    let none = Calls::default();
    let calls = calls.unwrap_or(&none);
    let pod_id = calls.time("RunPodSandbox", cri.run_pod(&pod)).await?;
    let mut ids = Vec::new();
    for i in 0..containers {
        let cfg = container_config(&format!("c{i}"), BUSYBOX, SLEEPER);
        let id = calls
            .time("CreateContainer", cri.create_container(&pod_id, &cfg, &pod))
            .await?;
        calls
            .time("StartContainer", cri.start_container(&id))
            .await?;
        ids.push(id);
    }
    Ok((pod_id, ids))
}

async fn stop_remove(cri: &CriClient, pod_id: &str) -> Result<()> {
    cri.stop_pod(pod_id).await?;
    cri.remove_pod(pod_id).await
}

/// Runs `f` over `items` with at most `par` at a time; returns the successes and the errors.
async fn parallel<T, F, Fut, R>(par: usize, items: Vec<T>, f: F) -> (Vec<R>, Vec<anyhow::Error>)
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R>> + Send + 'static,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(par));
    let f = Arc::new(f);
    let mut set = tokio::task::JoinSet::new();
    for item in items {
        let sem = sem.clone();
        let f = f.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            f(item).await
        });
    }
    let (mut ok, mut errs) = (Vec::new(), Vec::new());
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(v)) => ok.push(v),
            Ok(Err(e)) => errs.push(e),
            Err(e) => errs.push(e.into()),
        }
    }
    (ok, errs)
}

/// Starts `n` pods of `containers` containers at parallelism `par`; returns the pod ids, the
/// wall time and the errors.
async fn start_pods(
    env: &TestEnv,
    tag: &str,
    n: usize,
    containers: usize,
    par: usize,
) -> Result<(Vec<String>, f64, Vec<anyhow::Error>)> {
    let configs = (0..n)
        .map(|i| env.pod_config(&format!("{tag}-{i}")))
        .collect::<Result<Vec<_>>>()?;
    let c = env.cri().clone();
    let t = Instant::now();
    let (ok, errs) = parallel(par, configs, move |pod| {
        let c = c.clone();
        async move { pod_with_container(&c, None, pod, containers).await }
    })
    .await;
    Ok((
        ok.into_iter().map(|r| r.0).collect(),
        t.elapsed().as_secs_f64(),
        errs,
    ))
}

async fn teardown_pods(env: &TestEnv, ids: Vec<String>, par: usize) -> (f64, Vec<anyhow::Error>) {
    let c = env.cri().clone();
    let t = Instant::now();
    let (_, errs) = parallel(par, ids, move |id: String| {
        let c = c.clone();
        async move { stop_remove(&c, &id).await }
    })
    .await;
    (t.elapsed().as_secs_f64(), errs)
}

fn first_error(what: &str, errs: Vec<anyhow::Error>) -> Result<()> {
    match errs.into_iter().next() {
        Some(e) => Err(e.context(what.to_string())),
        None => Ok(()),
    }
}

/// Every lifecycle call, one pod at a time (after one untimed pod: the first use of the pause
/// image and the CNI plugins is not what a node pays per pod).
async fn latencies(env: &TestEnv, n: usize) -> Result<BTreeMap<&'static str, Vec<f64>>> {
    let cri = env.cri();
    let (warm, _) = pod_with_container(cri, None, env.pod_config("bench-warm")?, 1).await?;
    stop_remove(cri, &warm).await?;
    let calls = Calls::default();
    for i in 0..n {
        let pod = env.pod_config(&format!("bench-seq-{i}"))?;
        let (pod_id, ids) = pod_with_container(cri, Some(&calls), pod, 1).await?;
        let id = &ids[0];
        calls
            .time("PodSandboxStatus", cri.pod_status(&pod_id))
            .await?;
        calls
            .time("ContainerStatus", cri.container_status(id))
            .await?;
        calls
            .time("StopContainer", cri.stop_container(id, 10))
            .await?;
        calls
            .time("RemoveContainer", cri.remove_container(id))
            .await?;
        calls.time("StopPodSandbox", cri.stop_pod(&pod_id)).await?;
        calls
            .time("RemovePodSandbox", cri.remove_pod(&pod_id))
            .await?;
    }
    Ok(calls.take())
}

/// 50 pods × 1 container at parallelism 1, 4, 16, then 200 pods at 16 (failures counted).
/// The wall-time runs, in order: 50 pods at parallelism 1, 4 and 16, then 200 at 16.
fn wall_runs() -> Vec<(usize, usize)> {
    let n = env_count("CRISP_BENCH_PODS", 50);
    let big = env_count("CRISP_BENCH_BIG", 200);
    vec![(n, 1), (n, 4), (n, 16), (big, 16)]
}

/// Start `n` pods `par` at a time, then tear them down. The 200-pod run (`big`) counts its
/// failures (the target is zero) instead of failing on the first.
async fn wall_time(env: &TestEnv, f: &mut Figures, n: usize, par: usize, big: bool) -> Result<()> {
    let (ids, secs, errs) = start_pods(env, &format!("bench-n{n}-p{par}"), n, 1, par).await?;
    f.wall.push((format!("start {n} pods ‖{par}"), secs));
    let (down, derrs) = teardown_pods(env, ids, par).await;
    f.wall.push((format!("stop+remove {n} pods ‖{par}"), down));
    if big {
        f.failures_200 = errs.len() + derrs.len();
        for e in errs.iter().chain(derrs.iter()).take(3) {
            eprintln!("{}: {n}-pod run: {e:#}", env.kind);
        }
        return Ok(());
    }
    first_error(&format!("starting {n} pods at {par}"), errs)?;
    first_error(&format!("tearing down {n} pods at {par}"), derrs)
}

/// Memory of the running pods: the daemon, each pod's shim and pause.
async fn memory(env: &TestEnv, pods: &[String]) -> Result<Memory> {
    let daemon = env.daemon_pid().context("daemon pid")? as i32;
    let shims = shim_pids(env);
    let mut pauses = Vec::new();
    for p in pods {
        pauses.push(env.cri().sandbox_pid(p).await?);
    }
    let rss = |ps: &[i32]| ps.iter().filter_map(|p| vm_rss_kib(*p)).sum::<u64>();
    let pss = |ps: &[i32]| ps.iter().filter_map(|p| smaps_kib(*p, "Pss")).sum::<u64>();
    let each: Vec<f64> = shims
        .iter()
        .filter_map(|p| vm_rss_kib(*p))
        .map(|k| k as f64)
        .collect();
    Ok(Memory {
        pods: pods.len(),
        daemon_rss: vm_rss_kib(daemon).context("daemon VmRSS")?,
        daemon_pss: smaps_kib(daemon, "Pss").context("daemon Pss")?,
        shims_rss: rss(&shims),
        shims_pss: pss(&shims),
        shim_rss_median: median(&each),
        pause_rss: rss(&pauses),
        pause_pss: pss(&pauses),
    })
}

/// What kubelet asks every second (PLEG's relist: pods, containers, the status of containers
/// whose state changed) and every 10 s (stats), for `secs`; returns the CPU the daemon and its
/// shims used meanwhile.
async fn steady(env: &TestEnv, secs: u64, calls: &Calls) -> Result<Steady> {
    let cri = env.cri();
    let daemon = env.daemon_pid().context("daemon pid")? as i32;
    let shims = shim_pids(env);
    let cpu = || {
        (
            cpu_secs(daemon),
            shims.iter().map(|p| cpu_secs(*p)).sum::<f64>(),
        )
    };
    let mut last: BTreeMap<String, i32> = BTreeMap::new();
    let (d0, s0) = cpu();
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..secs {
        tick.tick().await;
        calls
            .time("ListPodSandbox", cri.list_pods_filtered(None))
            .await?;
        let ctrs = calls
            .time("ListContainers", cri.list_containers(None))
            .await?;
        for c in ctrs {
            if last.insert(c.id.clone(), c.state) != Some(c.state) && n > 0 {
                calls
                    .time("ContainerStatus (changed)", cri.container_status(&c.id))
                    .await?;
            }
        }
        if n % 10 == 0 {
            let mut rt = cri.runtime();
            calls
                .time("ListContainerStats", async {
                    Ok(rt
                        .list_container_stats(api::ListContainerStatsRequest::default())
                        .await?)
                })
                .await?;
            calls
                .time("ListPodSandboxStats", async {
                    Ok(rt
                        .list_pod_sandbox_stats(api::ListPodSandboxStatsRequest::default())
                        .await?)
                })
                .await?;
        }
    }
    let (d1, s1) = cpu();
    Ok(Steady {
        secs: t0.elapsed().as_secs_f64(),
        daemon_cpu: d1 - d0,
        shims_cpu: s1 - s0,
        shims: shims.len(),
    })
}

/// 100 pods × 2 containers: memory per pod, the polled steady state, then a daemon restart.
async fn at_rest(env: &mut TestEnv, f: &mut Figures) -> Result<()> {
    let n = env_count("CRISP_BENCH_REST_PODS", 100);
    let secs = env_count("CRISP_BENCH_STEADY_SECS", 30) as u64;
    let (ids, _, errs) = start_pods(env, "bench-rest", n, 2, 16).await?;
    let outcome = async {
        first_error(&format!("starting {n} pods × 2 containers"), errs)?;
        // A moment for lazily started threads and first stats reads to settle.
        tokio::time::sleep(Duration::from_secs(5)).await;
        f.mem = memory(env, &ids).await?;
        let calls = Calls::default();
        f.steady = steady(env, secs, &calls).await?;
        f.calls.extend(calls.take());
        restart(env, n, f).await
    }
    .await;
    let (_, derrs) = teardown_pods(env, ids, 16).await;
    outcome?;
    first_error("tearing down the resting pods", derrs)
}

/// `kill -9` of the daemon while `pods` pods of two containers run, then the time from its
/// new start until it lists every pod ready and every container running: what kubelet's
/// first relist sees after a crash (crispd recovers its pods before it serves).
async fn restart(env: &mut TestEnv, pods: usize, f: &mut Figures) -> Result<()> {
    env.kill_daemon()?;
    let t = Instant::now();
    env.restart_daemon().await?;
    let deadline = t + Duration::from_secs(120);
    loop {
        let ready = env
            .cri()
            .list_pods_filtered(None)
            .await?
            .iter()
            .filter(|p| p.state == api::PodSandboxState::SandboxReady as i32)
            .count();
        let running = env
            .cri()
            .list_containers(None)
            .await?
            .iter()
            .filter(|c| c.state == api::ContainerState::ContainerRunning as i32)
            .count();
        if ready == pods && running == 2 * pods {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{}: 120 s after a restart {ready} of {pods} pods are ready and {running} of {} \
             containers run",
            env.kind,
            2 * pods
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let name = format!("restart with {pods} pods to all listed ready");
    f.wall.push((name, t.elapsed().as_secs_f64()));
    Ok(())
}

fn drop_caches() {
    // Cold means the registry's blobs are not in the page cache either. Dirty pages are not
    // dropped: sync first, or what the last step wrote (the removed image, the pods torn
    // down) is written back during the pull being timed.
    nix::unistd::sync();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// `large` through CRI PullImage in both runtimes, taking turns: removed and page cache
/// dropped (cold), then again (warm), `CRISP_BENCH_PULLS` rounds. A cold pull writes the
/// layer twice (blob and snapshot) and this machine's disk swings (a 400 MiB fsync'd write
/// took from 0.3 s to 1.2 s within an hour), so each runtime's runs alternate with the
/// other's rather than coming minutes apart. Its own environments: a pull is not what the
/// 100 pods before it left behind.
async fn pull_race(registry: &Registry, kinds: &[RuntimeKind]) -> Result<Vec<Figures>> {
    let mut envs = Vec::new();
    for &kind in kinds {
        match start_env(kind, registry).await {
            Ok(env) => envs.push(env),
            Err(e) => {
                teardown_all(envs).await?;
                return Err(e.context(format!("{kind}: starting for the pull race")));
            }
        }
    }
    let mut figs: Vec<Figures> = kinds.iter().map(|_| Figures::default()).collect();
    let outcome = async {
        let image = crisp_e2e::images::get("large")?.upstream();
        for round in 0..env_count("CRISP_BENCH_PULLS", 5) {
            for (env, f) in envs.iter().zip(figs.iter_mut()) {
                let (cold, warm) = pull_once(env, &image)
                    .await
                    .with_context(|| format!("{}: pulling {image}", env.kind))?;
                eprintln!(
                    "pull {round}: {:<10} cold {cold:6.1} MB/s, warm {warm:5.1} ms",
                    env.kind
                );
                f.pull_cold_mbs.push(cold);
                f.pull_warm_ms.push(warm);
            }
        }
        for env in &envs {
            env.cri().remove_image(&image).await?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let torn = teardown_all(envs).await;
    outcome?;
    torn?;
    Ok(figs)
}

/// One cold pull (MB/s) and one warm pull (ms) of `image`.
async fn pull_once(env: &TestEnv, image: &str) -> Result<(f64, f64)> {
    let cri = env.cri();
    cri.remove_image(image).await?;
    drop_caches();
    let t = Instant::now();
    cri.pull(image, None).await?;
    let cold = t.elapsed().as_secs_f64();
    let t = Instant::now();
    cri.pull(image, None).await?;
    let warm = ms(t.elapsed());
    let size = cri
        .image_status(image)
        .await?
        .context("large image not listed after its pull")?
        .size;
    Ok((size as f64 / 1e6 / cold, warm))
}

async fn teardown_all(envs: Vec<TestEnv>) -> Result<()> {
    let mut left = Vec::new();
    for env in envs {
        let kind = env.kind;
        left.extend(
            env.teardown()
                .await
                .into_iter()
                .map(|l| format!("{kind}: {l}")),
        );
    }
    ensure!(left.is_empty(), "teardown left {left:#?}");
    Ok(())
}

/// One runtime in the side-by-side run: its env, its figures so far, and whether it failed
/// (a failed runtime sits out the phases after).
struct Lane {
    env: TestEnv,
    figs: Figures,
    failed: Option<anyhow::Error>,
}

impl Lane {
    /// Its figures, unless it failed or its teardown left something behind.
    async fn finish(mut self) -> (RuntimeKind, Result<Figures>) {
        let kind = self.env.kind;
        self.figs.load.push(loadavg());
        let leaks = self.env.teardown().await;
        let r = match self.failed {
            Some(e) => Err(e),
            None if !leaks.is_empty() => Err(anyhow::anyhow!("teardown left {leaks:#?}")),
            None => Ok(self.figs),
        };
        (kind, r.map_err(|e| e.context(kind.to_string())))
    }

    fn fail(&mut self, e: anyhow::Error) {
        let kind = self.env.kind;
        eprintln!(
            "{kind}: benchmark failed: {e:#}\n{kind} log tail:\n{}",
            self.env.daemon_log_tail(40)
        );
        self.failed = Some(e);
    }
}

/// A runtime's env as a node runs it: `info` logs, the state dir on a tmpfs (/run on a node).
async fn start_env(kind: RuntimeKind, registry: &Registry) -> Result<TestEnv> {
    TestEnv::builder(kind)
        .mirror(registry.host())
        .state_on_tmpfs()
        .log_level(if std::env::var_os("CRISP_BENCH_DEBUG_LOG").is_some() {
            "debug"
        } else {
            "info"
        })
        .start()
        .await
}

/// The runtimes (and the floor, in an env of its own whose crispd stays idle) side by side,
/// taking turns phase by phase: the sequential latencies, then each wall-time run (the
/// runtimes' order alternating from run to run, the floor's run after theirs), then the 100
/// pods at rest, one runtime at a time while the other is idle. Measured one runtime after
/// the other, 15 minutes apart, the machine's drift landed in the ratios: in one such run the
/// floor, measured last, came out 37% slower than in the run before, containerd's figures
/// the same.
async fn side_by_side(
    registry: &Registry,
    kinds: &[RuntimeKind],
    with_floor: bool,
) -> (Vec<(RuntimeKind, Result<Figures>)>, Result<Vec<floor::Run>>) {
    let mut out = Vec::new();
    let mut lanes = Vec::new();
    for &kind in kinds {
        match start_env(kind, registry).await {
            Ok(env) => lanes.push(Lane {
                env,
                figs: Figures {
                    load: vec![loadavg()],
                    ..Default::default()
                },
                failed: None,
            }),
            Err(e) => out.push((kind, Err(e.context("starting")))),
        }
    }
    let mut floor = if with_floor {
        Some(FloorLane::start().await)
    } else {
        None
    };
    for lane in &mut lanes {
        let r = async {
            lane.env.cri().pull(BUSYBOX, None).await?;
            latencies(&lane.env, env_count("CRISP_BENCH_SEQ", 40)).await
        };
        match r.await {
            Ok(calls) => lane.figs.calls = calls,
            Err(e) => lane.fail(e),
        }
    }
    let runs = wall_runs();
    for (k, &(n, par)) in runs.iter().enumerate() {
        let big = k + 1 == runs.len();
        let m = lanes.len();
        for i in 0..m {
            let lane = &mut lanes[if k % 2 == 0 { i } else { m - 1 - i }];
            if lane.failed.is_none()
                && let Err(e) = wall_time(&lane.env, &mut lane.figs, n, par, big).await
            {
                lane.fail(e);
            }
        }
        if let Some(Ok(fl)) = &mut floor {
            fl.run(n, par).await;
        }
    }
    for lane in &mut lanes {
        if lane.failed.is_none() {
            settle().await;
            if let Err(e) = at_rest(&mut lane.env, &mut lane.figs).await {
                lane.fail(e);
            }
        }
    }
    for lane in lanes {
        out.push(lane.finish().await);
    }
    let floor = match floor {
        None => Ok(Vec::new()),
        Some(Ok(fl)) => fl.finish().await,
        Some(Err(e)) => Err(e),
    };
    (out, floor)
}

/// The floor beside the runtimes: an env of its own (its crispd stays idle) for its root,
/// network, cgroup parent and leak check; after a failed run it runs no more.
struct FloorLane {
    env: TestEnv,
    floor: floor::Floor,
    runs: Vec<floor::Run>,
    failed: Option<anyhow::Error>,
}

impl FloorLane {
    async fn start() -> Result<FloorLane> {
        let env = TestEnv::builder(RuntimeKind::Crispd)
            .state_on_tmpfs()
            .start()
            .await?;
        match floor::Floor::new(&env).await {
            Ok(floor) => Ok(FloorLane {
                env,
                floor,
                runs: Vec::new(),
                failed: None,
            }),
            Err(e) => {
                let _ = env.teardown().await;
                Err(e)
            }
        }
    }

    async fn run(&mut self, n: usize, par: usize) {
        if self.failed.is_none() {
            match self.floor.run(n, par).await {
                Ok(r) => self.runs.push(r),
                Err(e) => self.failed = Some(e.context(format!("floor run of {n} pods ‖{par}"))),
            }
        }
    }

    async fn finish(self) -> Result<Vec<floor::Run>> {
        let removed = self.floor.finish();
        let leaks = self.env.teardown().await;
        if let Some(e) = self.failed {
            return Err(e);
        }
        removed?;
        ensure!(leaks.is_empty(), "floor: teardown left {leaks:#?}");
        Ok(self.runs)
    }
}

/// A target on the crispd/containerd ratio: at most (`Max`) or at least (`Min`).
#[derive(Clone, Copy)]
enum Target {
    Max(f64),
    Min(f64),
}

struct Row {
    name: String,
    unit: &'static str,
    cd: Option<f64>,
    cr: Option<f64>,
    /// runc and CNI alone (start rows only).
    floor: Option<f64>,
    target: Option<Target>,
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        match (self.cd, self.cr) {
            (Some(a), Some(b)) if a > 0.0 => Some(b / a),
            _ => None,
        }
    }

    /// How far below containerd's figure any runtime calling runc and CNI can go here.
    fn floor_ratio(&self) -> Option<f64> {
        match (self.cd, self.floor) {
            (Some(a), Some(b)) if a > 0.0 => Some(b / a),
            _ => None,
        }
    }

    fn met(&self) -> Option<bool> {
        let r = self.ratio()?;
        Some(match self.target? {
            Target::Max(t) => r <= t,
            Target::Min(t) => r >= t,
        })
    }
}

/// The floor's figures by the row they are the floor of: each run's wall times under its start
/// and stop+remove rows, and from the one-at-a-time run the median CNI ADD under RunPodSandbox and the median
/// `runc run` under StartContainer.
fn floor_figures(runs: &[floor::Run]) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = runs.iter().map(|r| (r.label.clone(), r.wall)).collect();
    out.extend(runs.iter().map(|r| (r.down_label.clone(), r.down_wall)));
    if let Some(one) = runs.iter().find(|r| r.label.ends_with("‖1")) {
        out.push(("RunPodSandbox p50".into(), median(&one.cni_ms)));
        out.push(("StartContainer p50".into(), median(&one.runc_ms)));
    }
    out
}

fn rows(cd: Option<&Figures>, cr: Option<&Figures>, floor: &[(String, f64)]) -> Vec<Row> {
    let mut out = Vec::new();
    let mut row = |name: String, unit, target, get: &dyn Fn(&Figures) -> f64| {
        let floor = floor.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
        out.push(Row {
            name,
            unit,
            cd: cd.map(get),
            cr: cr.map(get),
            floor,
            target,
        })
    };
    let any = cd.or(cr).cloned().unwrap_or_default();
    // Lifecycle calls in the order a pod goes through them, then what kubelet polls.
    let mut calls: Vec<&'static str> = CALL_ORDER
        .iter()
        .copied()
        .filter(|c| any.calls.contains_key(c))
        .collect();
    calls.extend(any.calls.keys().filter(|c| !CALL_ORDER.contains(c)));
    for call in &calls {
        for p in [50.0, 90.0, 99.0] {
            let target = (*call == "RunPodSandbox" && p == 50.0).then_some(Target::Max(0.25));
            let call = *call;
            row(format!("{call} p{p}"), "ms", target, &|f| {
                percentile(f.calls.get(call).map(Vec::as_slice).unwrap_or(&[]), p)
            });
        }
    }
    let big = format!("{} pods ‖16", env_count("CRISP_BENCH_BIG", 200));
    for (phase, _) in &any.wall {
        // The targets: 50 pods at 4 (start, teardown), 200 at 16 (start).
        let target =
            (phase.ends_with("‖4") || phase == &format!("start {big}")).then_some(Target::Max(0.4));
        let key = phase.clone();
        row(phase.clone(), "s", target, &move |f| {
            f.wall
                .iter()
                .find(|(p, _)| *p == key)
                .map_or(f64::NAN, |(_, v)| *v)
        });
    }
    row("failures in the 200-pod run".into(), "", None, &|f| {
        f.failures_200 as f64
    });
    let per = |f: &Figures, v: u64| v as f64 / f.mem.pods.max(1) as f64 / 1024.0;
    row("memory per pod all-in, RSS".into(), "MiB", None, &|f| {
        per(f, f.mem.daemon_rss + f.mem.shims_rss + f.mem.pause_rss)
    });
    row(
        "memory per pod all-in, PSS".into(),
        "MiB",
        Some(Target::Max(0.2)),
        &|f| per(f, f.mem.daemon_pss + f.mem.shims_pss + f.mem.pause_pss),
    );
    row("  daemon RSS (whole)".into(), "MiB", None, &|f| {
        f.mem.daemon_rss as f64 / 1024.0
    });
    row("  daemon PSS per pod".into(), "MiB", None, &|f| {
        per(f, f.mem.daemon_pss)
    });
    row("  shim PSS per pod".into(), "MiB", None, &|f| {
        per(f, f.mem.shims_pss)
    });
    row("  pause PSS per pod".into(), "MiB", None, &|f| {
        per(f, f.mem.pause_pss)
    });
    row(
        "shim VmRSS (median)".into(),
        "MiB",
        Some(Target::Max(0.25)),
        &|f| f.mem.shim_rss_median / 1024.0,
    );
    row(
        "steady CPU, daemon".into(),
        "s",
        Some(Target::Max(0.3)),
        &|f| f.steady.daemon_cpu,
    );
    row("steady CPU, all shims".into(), "s", None, &|f| {
        f.steady.shims_cpu
    });
    row(
        "steady CPU, daemon + shims".into(),
        "s",
        Some(Target::Max(0.15)),
        &|f| f.steady.daemon_cpu + f.steady.shims_cpu,
    );
    row(
        "large pull cold (median)".into(),
        "MB/s",
        Some(Target::Min(3.0)),
        &|f| median(&f.pull_cold_mbs),
    );
    row("large pull warm (median)".into(), "ms", None, &|f| {
        median(&f.pull_warm_ms)
    });
    out
}

fn print_table(rows: &[Row]) {
    let fmt = |v: Option<f64>| match v {
        Some(v) if v.is_finite() => format!("{v:>11.2}"),
        _ => format!("{:>11}", "-"),
    };
    println!();
    println!(
        "{:<36} {:<4} {:>11} {:>11} {:>8} {:>9} {:>8}  target",
        "release vs release", "", "containerd", "crispd", "ratio", "runc+CNI", "/contd"
    );
    for r in rows {
        let target = match (r.target, r.met()) {
            (Some(Target::Max(t)), m) => format!("≤{t} {}", met_word(m)),
            (Some(Target::Min(t)), m) => format!("≥{t} {}", met_word(m)),
            (None, _) => String::new(),
        };
        let ratio = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.2}"));
        let floor = r.floor.map_or_else(|| "-".into(), |v| format!("{v:.2}"));
        println!(
            "{:<36} {:<4} {} {} {:>8} {floor:>9} {:>8}  {target}",
            r.name,
            r.unit,
            fmt(r.cd),
            fmt(r.cr),
            ratio(r.ratio()),
            ratio(r.floor_ratio()),
        );
    }
}

fn met_word(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "",
    }
}

fn write_json(path: &str, rows: &[Row], meta: serde_json::Value) -> Result<()> {
    let num = |v: Option<f64>| v.filter(|v| v.is_finite());
    let rows: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "name": r.name, "unit": r.unit,
                "containerd": num(r.cd), "crispd": num(r.cr), "ratio": num(r.ratio()),
                "floor": num(r.floor), "floor_ratio": num(r.floor_ratio()),
                "target": r.target.map(|t| match t {
                    Target::Max(v) => json!({"max": v}),
                    Target::Min(v) => json!({"min": v}),
                }),
                "met": r.met(),
            })
        })
        .collect();
    let doc = json!({"meta": meta, "rows": rows});
    std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {path}"))
}

#[test]
#[ignore = "benchmark"]
fn bench_pods_crispd_vs_containerd() -> Result<()> {
    let only = std::env::var("CRISP_BENCH_ONLY").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let registry = Registry::start()?;
        registry.push(&["busybox", "pause", "large"])?;
        let both = [RuntimeKind::Containerd, RuntimeKind::Crispd];
        let kinds: Vec<RuntimeKind> = both
            .into_iter()
            .filter(|k| only.is_empty() || only == k.to_string())
            .collect();
        let (mut ran, floor) = if only == "pulls" {
            let ran = both.iter().map(|&k| (k, Ok(Figures::default()))).collect();
            (ran, Ok(Vec::new()))
        } else {
            settle().await;
            side_by_side(&registry, &kinds, only.is_empty() || only == "floor").await
        };
        // Containerd's figures, then crispd's; None for a runtime not run.
        let mut results: Vec<Option<Result<Figures>>> = both
            .iter()
            .map(|k| {
                let at = ran.iter().position(|(rk, _)| rk == k)?;
                Some(ran.remove(at).1)
            })
            .collect();
        let mut race = Ok(());
        let racers: Vec<(usize, RuntimeKind)> = both
            .into_iter()
            .enumerate()
            .filter(|(i, _)| matches!(results[*i], Some(Ok(_))))
            .collect();
        if !racers.is_empty() {
            settle().await;
            let kinds: Vec<RuntimeKind> = racers.iter().map(|(_, k)| *k).collect();
            match pull_race(&registry, &kinds).await {
                Ok(figs) => {
                    for ((i, _), pf) in racers.iter().zip(figs) {
                        if let Some(Ok(f)) = &mut results[*i] {
                            f.pull_cold_mbs = pf.pull_cold_mbs;
                            f.pull_warm_ms = pf.pull_warm_ms;
                        }
                    }
                }
                Err(e) => {
                    eprintln!("pull race: benchmark failed: {e:#}");
                    race = Err(e);
                }
            }
        }
        if let Err(e) = &floor {
            eprintln!("floor: benchmark failed: {e:#}");
        }
        let floor_runs = floor.as_deref().unwrap_or_default();
        let figs: Vec<Option<&Figures>> = results
            .iter()
            .map(|r| r.as_ref().and_then(|r| r.as_ref().ok()))
            .collect();
        let rows = rows(figs[0], figs[1], &floor_figures(floor_runs));
        print_table(&rows);
        for r in floor_runs {
            println!(
                "floor, runc + bridge CNI alone: {} in {:.2} s, their processes' CPU {:.1} ms per pod, \
                 CNI ADD p50 {:.1} ms, runc run p50 {:.1} ms; {} in {:.2} s",
                r.label,
                r.wall,
                r.cpu_ms_per_pod,
                median(&r.cni_ms),
                median(&r.runc_ms),
                r.down_label,
                r.down_wall
            );
        }
        let mut meta = serde_json::Map::new();
        for (name, f) in [("containerd", figs[0]), ("crispd", figs[1])] {
            if let Some(f) = f {
                println!(
                    "{name}: load average {}; steady state {:.0} s over {} pods, {} shims",
                    f.load.join(" → "),
                    f.steady.secs,
                    f.mem.pods,
                    f.steady.shims
                );
                meta.insert(
                    name.into(),
                    json!({"load": f.load, "steady_secs": f.steady.secs, "pods_at_rest": f.mem.pods}),
                );
            }
        }
        let floor_meta: Vec<_> = floor_runs
            .iter()
            .map(|r| {
                json!({"run": r.label, "wall_s": r.wall, "cpu_ms_per_pod": r.cpu_ms_per_pod,
                       "cni_add_p50_ms": median(&r.cni_ms), "runc_run_p50_ms": median(&r.runc_ms),
                       "down": r.down_label, "down_wall_s": r.down_wall})
            })
            .collect();
        meta.insert("floor".into(), json!(floor_meta));
        meta.insert(
            "crispd_binary".into(),
            json!(crisp_e2e::harness::crispd_binary()?.display().to_string()),
        );
        if let Some(path) = std::env::var("BENCH_JSON").ok().filter(|p| !p.is_empty()) {
            write_json(&path, &rows, serde_json::Value::Object(meta))?;
            println!("figures written to {path}");
        }
        for r in results.into_iter().flatten() {
            r?;
        }
        race?;
        floor.map(drop)
    })
}
