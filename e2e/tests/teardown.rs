//! The harness itself: whatever happens to a test, nothing it started outlives it. Three ways
//! a test can end badly are covered, each with a pod and a container still running, against
//! containerd and crispd alike: the test panics (teardown runs from `Drop` while unwinding),
//! the daemon dies first (teardown must find the shims, containers, mounts and cgroups on its
//! own), and the test process itself is killed (the next env's start sweeps what it left).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use crisp_e2e::cri::container_config;
use crisp_e2e::harness::{self, RuntimeKind, TestEnv};
use crisp_e2e::leaks::{self, Footprint};
use crisp_e2e::registry::Registry;
use crisp_proto::cri::v1::ContainerState;

const BUSYBOX: &str = "docker.io/library/busybox:latest";

/// Runs a pod with a long-running container and checks the footprint is real (a shim, the
/// container processes, cgroups and mounts exist), so the later "no leaks" means something.
async fn busy_pod(env: &TestEnv) -> Result<Footprint> {
    let c = env.cri();
    c.pull(BUSYBOX, None).await?;
    let pod = env.pod_config("busy")?;
    let pod_id = c.run_pod(&pod).await?;
    let cfg = container_config("sleeper", BUSYBOX, &["sleep", "600"]);
    let id = c.create_container(&pod_id, &cfg, &pod).await?;
    c.start_container(&id).await?;
    let st = c.container_status(&id).await?;
    ensure!(
        st.state == ContainerState::ContainerRunning as i32,
        "sleeper is not running: {st:?}"
    );

    let mut fp = env.footprint();
    if env.kind == RuntimeKind::Crispd {
        // crispd's shim starts the pause itself (no pid file): name it by the pid the pod's
        // verbose status reports, and check it lives in the env's cgroups, so teardown's
        // cgroup sweep and the leak check cover it.
        let pause = c.sandbox_pid(&pod_id).await?;
        ensure!(
            leaks::process_is_ours(
                pause,
                &format!("{}/", env.root.display()),
                &fp.cgroup_parent
            ),
            "pause {pause} is not under the env's cgroup parent {}",
            fp.cgroup_parent
        );
        if !fp.processes.iter().any(|p| p.pid == pause) {
            fp.processes
                .extend(leaks::ProcRef::of(pause, format!("pause of pod {pod_id}")));
        }
    }
    // containerd 1.6's runc shim writes no pid file; it is found by its command line,
    // which names our socket (`-address <root>/cri.sock`). crispd's shim writes `shim.pid`
    // in the pod's bundle.
    let shim_seen_as = match env.kind {
        RuntimeKind::Crispd => "shim.pid",
        _ => "command line",
    };
    ensure!(
        fp.processes.iter().any(|p| p.what.contains(shim_seen_as)),
        "no shim found in the footprint (by {shim_seen_as}): {:?}",
        fp.processes
    );
    ensure!(
        fp.processes.len() >= 4,
        "expected daemon, shim, pause and sleeper: {:?}",
        fp.processes
    );
    ensure!(
        !leaks::cgroup_dirs(&fp.cgroup_parent).is_empty(),
        "no cgroup under {}",
        fp.cgroup_parent
    );
    ensure!(
        !leaks::mounts_under(&fp.root).is_empty(),
        "no mount under {}",
        fp.root.display()
    );
    ensure!(
        leaks::link_exists(&fp.bridge),
        "bridge {} missing",
        fp.bridge
    );
    // containerd 1.6 cannot move its shim sockets out of /run/containerd/s: the harness
    // must have found them (through the bundles' `address` files) to remove them.
    if env.kind == RuntimeKind::Containerd {
        // One pod, one shim: the socket named in its `address` file and the one computed
        // from the sandbox id in the log must be the same file.
        let sockets: Vec<_> = fp
            .outside_files
            .iter()
            .filter(|f| f.starts_with("/run/containerd/s"))
            .collect();
        ensure!(
            sockets.len() == 1 && sockets[0].exists(),
            "want exactly one live shim socket recorded, got {sockets:?}"
        );
    }
    Ok(fp)
}

async fn cleanup_after_panic(kind: RuntimeKind) -> Result<()> {
    let registry = Registry::start()?;
    registry.push(&["busybox", "pause"])?;
    let mut env = TestEnv::start(kind, &registry.host()).await?;
    env.keep_log_on_panic(false);
    let seen: Arc<Mutex<Option<Result<Footprint>>>> = Arc::default();
    let seen2 = seen.clone();
    let task = tokio::spawn(async move {
        let fp = busy_pod(&env).await;
        *seen2.lock().expect("poisoned") = Some(fp);
        panic!("deliberate panic with a pod running: TestEnv must clean up from Drop");
    });
    ensure!(
        task.await.is_err_and(|e| e.is_panic()),
        "the task was meant to panic"
    );
    let fp = seen
        .lock()
        .expect("poisoned")
        .take()
        .context("busy_pod never finished")??;
    let leaks = leaks::check(&fp);
    ensure!(
        leaks.is_empty(),
        "{kind}: after a panic, Drop left {leaks:#?}"
    );
    Ok(())
}

async fn cleanup_after_daemon_crash(kind: RuntimeKind) -> Result<()> {
    let registry = Registry::start()?;
    registry.push(&["busybox", "pause"])?;
    let env = TestEnv::start(kind, &registry.host()).await?;
    busy_pod(&env).await?;
    let pid = env.daemon_pid().context("daemon not running")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let leaks = env.teardown().await;
    ensure!(
        leaks.is_empty(),
        "{kind}: after the daemon was killed, teardown left {leaks:#?}"
    );
    Ok(())
}

/// The helper for `cleanup_after_kill`, run in a child process: a busy pod, then it writes
/// its root to `$CRISP_E2E_VICTIM_OUT` and waits to be SIGKILLed, so no `Drop` runs.
async fn victim(kind: RuntimeKind) -> Result<()> {
    let out = std::env::var_os("CRISP_E2E_VICTIM_OUT")
        .context("victim runs only as the child of cleanup_after_kill")?;
    let mirror = std::env::var("CRISP_E2E_VICTIM_MIRROR").context("CRISP_E2E_VICTIM_MIRROR")?;
    let env = TestEnv::start(kind, &mirror).await?;
    busy_pod(&env).await?;
    std::fs::write(&out, env.root.to_string_lossy().as_bytes())?;
    tokio::time::sleep(Duration::from_secs(600)).await;
    Ok(())
}

/// A test process killed outright (nextest's timeout, SIGKILL) runs no `Drop`: the next
/// env's start sweeps what it left, found through the record and the owner lock.
async fn cleanup_after_kill(kind: RuntimeKind, victim_name: &str) -> Result<()> {
    let registry = Registry::start()?;
    registry.push(&["busybox", "pause"])?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("root");
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args([victim_name, "--exact", "--ignored", "--nocapture"])
        .env("CRISP_E2E_VICTIM_OUT", &out)
        .env("CRISP_E2E_VICTIM_MIRROR", registry.host())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let root = loop {
        if let Ok(r) = std::fs::read_to_string(&out)
            && !r.is_empty()
        {
            break std::path::PathBuf::from(r);
        }
        if let Some(st) = child.try_wait()? {
            anyhow::bail!("victim exited early ({st}) without reporting its root");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("victim did not report its root within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Read the record while the victim still holds it: a test starting elsewhere may sweep
    // it the moment the victim dies.
    let fp = harness::stale_footprint(&root)?;
    child.kill()?; // SIGKILL
    child.wait()?;
    ensure!(
        fp.processes.iter().any(|p| p.alive()),
        "{kind}: nothing of the killed test is running, the sweep would prove nothing: {:?}",
        fp.processes
    );
    let swept = harness::sweep_stale(&harness::base_dir());
    if !swept.iter().any(|(r, _)| *r == root) {
        // Another test's start-up swept it first: give that sweep time to finish.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !leaks::check(&fp).is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let leaks = leaks::check(&fp);
    ensure!(
        leaks.is_empty(),
        "{kind}: after sweeping a killed test, left {leaks:#?}"
    );
    Ok(())
}

macro_rules! per_runtime {
    ($($prefix:ident => $kind:expr),* $(,)?) => {$(
        mod $prefix {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cleanup_after_panic() -> Result<()> {
                super::cleanup_after_panic($kind).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cleanup_after_daemon_crash() -> Result<()> {
                super::cleanup_after_daemon_crash($kind).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cleanup_after_kill() -> Result<()> {
                super::cleanup_after_kill($kind, concat!(stringify!($prefix), "::victim")).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "helper process of cleanup_after_kill, not a test on its own"]
            async fn victim() -> Result<()> {
                super::victim($kind).await
            }
        }
    )*};
}

per_runtime! {
    containerd => RuntimeKind::Containerd,
    crispd => RuntimeKind::Crispd,
}

/// The harness starts crispd with the flags and config it takes, crispd answers CRI as a
/// ready runtime with nothing in it, and teardown leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crispd_starts_and_tears_down() -> Result<()> {
    let env = TestEnv::builder(RuntimeKind::Crispd).start().await?;
    let c = env.cri();
    let v = c.version().await?;
    ensure!(
        v.runtime_name == "crisp" && v.runtime_api_version == "v1",
        "crispd Version: want runtime crisp, API v1: {v:?}"
    );
    let st = c.status().await?;
    let runtime_ready = st
        .conditions
        .iter()
        .find(|c| c.r#type == "RuntimeReady")
        .with_context(|| format!("Status has no RuntimeReady condition: {st:?}"))?;
    ensure!(
        runtime_ready.status,
        "crispd is not RuntimeReady: {runtime_ready:?}"
    );
    ensure!(
        st.conditions.iter().any(|c| c.r#type == "NetworkReady"),
        "Status has no NetworkReady condition: {st:?}"
    );
    let pods = c.list_pods().await?;
    ensure!(pods.is_empty(), "a fresh crispd lists pods: {pods:?}");
    let ctrs = c.list_containers(None).await?;
    ensure!(ctrs.is_empty(), "a fresh crispd lists containers: {ctrs:?}");
    ensure!(
        env.socket.exists(),
        "crispd's socket {} is missing while it serves",
        env.socket.display()
    );
    let leaks = env.teardown().await;
    ensure!(leaks.is_empty(), "crispd: teardown left {leaks:#?}");
    Ok(())
}
