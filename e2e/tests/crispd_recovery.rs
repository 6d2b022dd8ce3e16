//! Recovery, end to end: 20 pods run (one container each), crispd is killed with SIGKILL,
//! one pod's record is deleted from crisp.db while crispd is down (what a lost or torn write
//! leaves: the pod's shim, pause, container, netns and cgroups still exist, but the store no
//! longer knows them), and crispd is restarted on the same root and state. Then:
//! - the 19 recorded pods are listed READY with their containers RUNNING (same processes) and
//!   stay controllable (ExecSync in one, StopContainer of another);
//! - the unrecorded pod is cleaned up: its shim, pause and container processes are gone, and
//!   so are its cgroups, netns, rootfs mount and the shim's socket; its container is not
//!   listed; its name is free;
//! - new pods run, and reusing a live pod's name is AlreadyExists.
//!
//! The record is deleted with redb directly (table `pods`, key = pod id): the test depends on
//! the store's file format, not on crispd's code.
//!
//! `crispd_recovery_mid_flight` is the crash a real node sees: crispd is killed while pods
//! and containers are being created and removed. After the restart every pod it lists is
//! READY (with its containers in a true state) or NOTREADY, each can be stopped and removed,
//! and then nothing is left: no shim, container process, pod cgroup, mount, netns or
//! snapshot, while crispd keeps running.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use crisp_e2e::cri::container_config;
use crisp_e2e::harness::{self, RuntimeKind, TestEnv};
use crisp_e2e::leaks::{self, ProcRef};
use crisp_e2e::registry::Registry;
use crisp_proto::cri::v1 as api;

const BUSYBOX: &str = "docker.io/library/busybox:latest";
const PODS: usize = 20;
/// Which pod loses its record.
const VICTIM: usize = 7;

struct Pod {
    id: String,
    config: api::PodSandboxConfig,
    container: String,
    container_proc: ProcRef,
    pause_proc: ProcRef,
}

/// Deletes `key` from crisp.db's `pods` table (crispd must be down: redb locks the file).
fn delete_pod_record(db: &Path, key: &str) -> Result<()> {
    const TABLE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("pods");
    let db =
        redb::Database::open(db).with_context(|| format!("opening {} offline", db.display()))?;
    let txn = db.begin_write()?;
    let existed = {
        let mut t = txn
            .open_table(TABLE)
            .context("crisp.db has no `pods` table")?;
        let old = t.remove(key)?;
        old.is_some()
    };
    txn.commit()?;
    ensure!(
        existed,
        "crisp.db table `pods` has no record {key:?} (has the store layout changed?)"
    );
    Ok(())
}

/// A live process by pid and start time (a recycled pid does not count).
fn proc_ref(pid: i32, what: &str) -> Result<ProcRef> {
    ProcRef::of(pid, what).with_context(|| format!("{what} (pid {pid}) is not running"))
}

/// The crisp shim serving `pod_id` (its command line carries `-id <pod_id>`).
fn shim_of(env: &TestEnv, pod_id: &str) -> Option<i32> {
    env.shim_pids().into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == pod_id.as_bytes()))
    })
}

/// Everything of `pod_id`/`container_id` that is still on the host.
fn remains(
    env: &TestEnv,
    pod: &Pod,
    shim: &ProcRef,
    shim_sockets: &[std::path::PathBuf],
) -> Vec<String> {
    let mut v = Vec::new();
    for s in shim_sockets.iter().filter(|s| s.exists()) {
        v.push(format!("shim socket {}", s.display()));
    }
    for p in [shim, &pod.pause_proc, &pod.container_proc] {
        if p.alive() {
            v.push(format!("{} (pid {})", p.what, p.pid));
        }
    }
    for d in leaks::cgroup_dirs(&env.cgroup_parent) {
        let s = d.display().to_string();
        if s.contains(&pod.id) || s.contains(&pod.container) {
            v.push(format!("cgroup {s}"));
        }
    }
    for m in leaks::mounts_under(&env.root) {
        let s = m.display().to_string();
        if s.contains(&pod.id) || s.contains(&pod.container) {
            v.push(format!("mount {s}"));
        }
    }
    for f in env.netns_files() {
        if f.display().to_string().contains(&pod.id) {
            v.push(format!("netns {}", f.display()));
        }
    }
    v
}

async fn scenario(
    env: &mut TestEnv,
    victim_sockets_out: &mut Vec<std::path::PathBuf>,
) -> Result<()> {
    let c = env.cri().clone();
    c.pull(BUSYBOX, None).await?;
    let t = Instant::now();
    let mut pods = Vec::new();
    for i in 0..PODS {
        let config = env.pod_config(&format!("rec{i}"))?;
        let id = c.run_pod(&config).await?;
        let cfg = container_config("app", BUSYBOX, &["sleep", "3600"]);
        let container = c.create_container(&id, &cfg, &config).await?;
        c.start_container(&container).await?;
        let container_proc = proc_ref(c.container_pid(&container).await?, "container process")?;
        let pause_proc = proc_ref(c.sandbox_pid(&id).await?, "pause process")?;
        pods.push(Pod {
            id,
            config,
            container,
            container_proc,
            pause_proc,
        });
    }
    eprintln!("{PODS} pods running in {:?}", t.elapsed());
    let netns_before = env.netns_files().len();
    ensure!(
        netns_before == PODS,
        "{netns_before} netns files for {PODS} pods: {:?}",
        env.netns_files()
    );
    let victim = &pods[VICTIM];
    let victim_shim = shim_of(env, &victim.id).with_context(|| {
        format!(
            "no shim found for pod {} (command line with its id)",
            victim.id
        )
    })?;
    let victim_shim = proc_ref(victim_shim, "shim process")?;
    let victim_sockets = harness::unix_sockets_of(victim_shim.pid);
    ensure!(
        !victim_sockets.is_empty(),
        "shim {} holds no named unix socket",
        victim_shim.pid
    );
    victim_sockets_out.extend(victim_sockets.iter().cloned());

    env.kill_daemon()?;
    delete_pod_record(&env.crispd_db(), &victim.id)?;
    let t = Instant::now();
    env.restart_daemon().await?;
    eprintln!("crispd restarted and serving in {:?}", t.elapsed());
    let c = env.cri().clone();
    let pid = env.daemon_pid().context("crispd not running")?;

    // The 19: listed, READY, containers RUNNING with the same processes.
    let listed = c.list_pods_filtered(None).await?;
    let mut ids: Vec<&str> = listed.iter().map(|p| p.id.as_str()).collect();
    ids.sort();
    let mut want: Vec<&str> = pods
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != VICTIM)
        .map(|(_, p)| p.id.as_str())
        .collect();
    want.sort();
    ensure!(
        ids == want,
        "after restart ListPodSandbox has {} pods, want the {} recorded ones\n got {ids:?}\nwant {want:?}",
        ids.len(),
        want.len()
    );
    for p in listed.iter() {
        ensure!(
            p.state == api::PodSandboxState::SandboxReady as i32,
            "pod {} is {:?} after restart, want READY",
            p.id,
            p.state
        );
    }
    for (i, p) in pods.iter().enumerate().filter(|(i, _)| *i != VICTIM) {
        let st = c
            .container_status(&p.container)
            .await
            .with_context(|| format!("pod {i}"))?;
        ensure!(
            st.state == api::ContainerState::ContainerRunning as i32,
            "pod {i}: container {} is {:?} after restart (reason {:?}), want RUNNING",
            p.container,
            st.state,
            st.reason
        );
        ensure!(
            p.container_proc.alive(),
            "pod {i}: container process {} died across the restart",
            p.container_proc.pid
        );
        let pst = c.pod_status(&p.id).await?;
        ensure!(
            pst.network.as_ref().is_some_and(|n| !n.ip.is_empty()),
            "pod {i}: no IP after restart: {pst:?}"
        );
    }
    let containers = c.list_containers(None).await?;
    ensure!(
        !containers
            .iter()
            .any(|x| x.id == victim.container || x.pod_sandbox_id == victim.id),
        "the unrecorded pod's container is still listed: {:?}",
        containers
            .iter()
            .filter(|x| x.pod_sandbox_id == victim.id)
            .collect::<Vec<_>>()
    );
    ensure!(
        containers.len() == PODS - 1,
        "{} containers listed, want {}",
        containers.len(),
        PODS - 1
    );

    // Controllable: exec in one, stop another.
    let out = c
        .exec_ok(&pods[0].container, &["echo", "still-here"])
        .await?;
    ensure!(
        out.trim() == "still-here",
        "ExecSync after restart: {out:?}"
    );
    let t = Instant::now();
    c.stop_container(&pods[1].container, 2).await?;
    let st = c.container_status(&pods[1].container).await?;
    ensure!(
        st.state == api::ContainerState::ContainerExited as i32,
        "StopContainer after restart: state {:?}",
        st.state
    );
    ensure!(
        !pods[1].container_proc.alive(),
        "StopContainer after restart: process {} still alive",
        pods[1].container_proc.pid
    );
    eprintln!("StopContainer after restart took {:?}", t.elapsed());

    // The unrecorded pod: everything of it goes (recovery may finish it in the background).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = remains(env, victim, &victim_shim, &victim_sockets);
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            // What crispd said about the victim and its orphan sweep: the clue when this flakes.
            let log = std::fs::read_to_string(&env.daemon_log).unwrap_or_default();
            for l in log.lines().filter(|l| {
                l.contains(victim.id.as_str()) || l.contains("orphan") || l.contains("recover")
            }) {
                eprintln!("crispd: {l}");
            }
            bail!(
                "30 s after restart the unrecorded pod {} still has {left:#?}",
                victim.id
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(
        env.netns_files().len() == PODS - 1,
        "{} netns files for {} pods: {:?}",
        env.netns_files().len(),
        PODS - 1,
        env.netns_files()
    );

    // New pods run; a live pod's name is taken; the cleaned-up pod's name is free.
    let fresh = env.pod_config("rec-new")?;
    let fresh_id = c.run_pod(&fresh).await?;
    let cfg = container_config("app", BUSYBOX, &["sh", "-c", "echo fresh"]);
    let cid = c.create_container(&fresh_id, &cfg, &fresh).await?;
    c.start_container(&cid).await?;
    let st = c.wait_container_exit(&cid, Duration::from_secs(60)).await?;
    ensure!(
        st.exit_code == 0,
        "new pod's container: exit {} ({:?})",
        st.exit_code,
        st.reason
    );
    match c
        .runtime()
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(pods[2].config.clone()),
            runtime_handler: String::new(),
        })
        .await
    {
        Ok(r) => bail!(
            "RunPodSandbox reusing live pod {}'s name succeeded: {}",
            pods[2].id,
            r.into_inner().pod_sandbox_id
        ),
        Err(s) => ensure!(
            s.code() == tonic::Code::AlreadyExists,
            "RunPodSandbox reusing a live pod's name: {:?} {:?}, want AlreadyExists",
            s.code(),
            s.message()
        ),
    }
    let reborn = c
        .run_pod(&victim.config)
        .await
        .context("RunPodSandbox with the cleaned-up pod's name")?;
    ensure!(
        reborn != victim.id,
        "the cleaned-up pod's id was handed out again"
    );

    ensure!(
        env.daemon_pid() == Some(pid)
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok(),
        "crispd died after the restart"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crispd_recovery() -> Result<()> {
    let t0 = Instant::now();
    let registry = Registry::start()?;
    registry.push(&["busybox", "pause"])?;
    let mut env = TestEnv::start(RuntimeKind::Crispd, &registry.host()).await?;
    let mut victim_sockets = Vec::new();
    let outcome = scenario(&mut env, &mut victim_sockets).await;
    // The unrecorded pod's shim socket is outside the root, where teardown cannot find it
    // once its shim is gone: removed here, whatever crispd did.
    for s in victim_sockets
        .iter()
        .filter(|s| harness::is_shim_socket_path(s))
    {
        let _ = std::fs::remove_file(s);
    }
    if outcome.is_err() {
        eprintln!("crispd log tail:\n{}", env.daemon_log_tail(80));
    }
    let leaks = env.teardown().await;
    eprintln!("crispd_recovery: {:?}", t0.elapsed());
    outcome?;
    ensure!(leaks.is_empty(), "teardown left {leaks:#?}");
    Ok(())
}

async fn mid_flight(env: &mut TestEnv) -> Result<()> {
    let c = env.cri().clone();
    c.pull(BUSYBOX, None).await?;
    let baseline = env.idle_baseline();
    // A few settled pods, one of which is being removed at the crash.
    let mut settled = Vec::new();
    for i in 0..4 {
        let config = env.pod_config(&format!("settled{i}"))?;
        let id = c.run_pod(&config).await?;
        let cfg = container_config("app", BUSYBOX, &["sleep", "3600"]);
        let cid = c.create_container(&id, &cfg, &config).await?;
        c.start_container(&cid).await?;
        settled.push(id);
    }
    // Busy: 12 pods being created (with two containers each) and the settled ones being
    // stopped and removed, all at once; crispd is killed in the middle of it.
    let mut busy = tokio::task::JoinSet::new();
    for i in 0..12 {
        let c = c.clone();
        let config = env.pod_config(&format!("inflight{i}"))?;
        busy.spawn(async move {
            let id = c.run_pod(&config).await?;
            for n in ["a", "b"] {
                let cfg = container_config(n, BUSYBOX, &["sleep", "3600"]);
                let cid = c.create_container(&id, &cfg, &config).await?;
                c.start_container(&cid).await?;
            }
            anyhow::Ok(())
        });
    }
    for id in &settled[..2] {
        // Owned copies: the spawned task outlives this loop.
        let (c, id) = (c.clone(), id.clone());
        busy.spawn(async move {
            c.stop_pod(&id).await?;
            c.remove_pod(&id).await
        });
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    env.kill_daemon()?;
    let mut failed = 0;
    while let Some(r) = busy.join_next().await {
        if !matches!(r, Ok(Ok(()))) {
            failed += 1;
        }
    }
    eprintln!("crispd killed with {failed} of 14 operations cut short");
    env.restart_daemon().await?;
    let c = env.cri().clone();
    let pid = env.daemon_pid().context("crispd not running")?;

    // Every listed pod is in a true state, and so is every listed container.
    let pods = c.list_pods_filtered(None).await?;
    let mut ready = 0;
    for p in &pods {
        let st = c.pod_status(&p.id).await?;
        ensure!(
            st.state == p.state,
            "pod {}: listed {:?} but status {:?}",
            p.id,
            p.state,
            st.state
        );
        if p.state == api::PodSandboxState::SandboxReady as i32 {
            ready += 1;
            ensure!(
                env.netns_files()
                    .iter()
                    .any(|f| f.display().to_string().contains(&p.id)),
                "READY pod {} has no netns",
                p.id
            );
        }
    }
    for x in c.list_containers(None).await? {
        ensure!(
            pods.iter().any(|p| p.id == x.pod_sandbox_id),
            "container {} listed in pod {} that is not listed",
            x.id,
            x.pod_sandbox_id
        );
        if x.state == api::ContainerState::ContainerRunning as i32 {
            let out = c
                .exec_ok(&x.id, &["echo", "alive"])
                .await
                .with_context(|| format!("container {} listed RUNNING", x.id))?;
            ensure!(out.trim() == "alive", "ExecSync in {}: {out:?}", x.id);
        }
    }
    eprintln!(
        "after the restart: {} pods listed, {ready} READY",
        pods.len()
    );
    ensure!(
        settled[2..]
            .iter()
            .all(|id| pods.iter().any(|p| &p.id == id)),
        "an untouched settled pod is missing after the restart"
    );

    // Everything can be removed, and then nothing is left.
    for p in &pods {
        c.stop_pod(&p.id).await?;
        // On failure, say what crispd left in the pod's state directory.
        c.remove_pod(&p.id).await.with_context(|| {
            let dir = env.state.join("pods").join(&p.id);
            let files: Vec<String> = std::fs::read_dir(&dir)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "pod {} (listed {:?}); {} holds {files:?}",
                p.id,
                p.state,
                dir.display()
            )
        })?;
    }
    ensure!(
        c.list_pods().await?.is_empty(),
        "pods left after removing all"
    );
    ensure!(
        c.list_containers(None).await?.is_empty(),
        "containers left after removing all"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = env.idle_leftovers(&baseline);
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            // Name the pod each leftover shim serves (`-id <pod>` on its command line).
            let shims: Vec<String> = env
                .shim_pids()
                .into_iter()
                .map(|pid| {
                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    format!(
                        "{pid}: {}",
                        String::from_utf8_lossy(&cmd).replace('\0', " ")
                    )
                })
                .collect();
            bail!(
                "with every pod removed after the crash, crispd still has {left:#?}\nshims: {shims:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(env.daemon_pid() == Some(pid), "crispd restarted again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crispd_recovery_mid_flight() -> Result<()> {
    let t0 = Instant::now();
    let registry = Registry::start()?;
    registry.push(&["busybox", "pause"])?;
    let mut env = TestEnv::start(RuntimeKind::Crispd, &registry.host()).await?;
    // Shims alive at the crash are in the footprint (their sockets included) for teardown.
    let outcome = mid_flight(&mut env).await;
    if outcome.is_err() {
        eprintln!("crispd log tail:\n{}", env.daemon_log_tail(80));
    }
    let leaks = env.teardown().await;
    eprintln!("crispd_recovery_mid_flight: {:?}", t0.elapsed());
    outcome?;
    ensure!(leaks.is_empty(), "teardown left {leaks:#?}");
    Ok(())
}
