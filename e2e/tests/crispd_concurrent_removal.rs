//! Concurrent removal (promise 3), end to end: 50 pods × 5 containers (busybox sleep), then
//! every pod and every container is stopped and removed, each call issued twice, shuffled,
//! 64 at a time, while 10 new pods (one container each) are being created; 5 rounds, each
//! round's storm also taking the previous round's new pods.
//!
//! Every storm call returns OK or NotFound and none hangs (60 s each); crispd never dies (its
//! pid is unchanged); the creations during the storm all succeed; after each round the lists
//! hold exactly the new pods and their containers, one shim and one netns per pod, and
//! nothing of a removed pod or container is left (process, cgroup, mount); at the end, with
//! every pod removed, no shim, container process, pod cgroup, mount, netns or snapshot is
//! left while crispd still runs, crisp.db (read offline once crispd is stopped) holds no pod,
//! container, shim or ID-range record, and the teardown's leak check is clean.
//!
//! `CRISP_E2E_STORM_SEED=<n>` replays one shuffle order (each run prints its seed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use crisp_e2e::cri::{CriClient, container_config};
use crisp_e2e::harness::{RuntimeKind, TestEnv};
use crisp_e2e::leaks;
use crisp_e2e::registry::Registry;
use crisp_proto::cri::v1 as api;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use tokio::sync::Semaphore;

const BUSYBOX: &str = "docker.io/library/busybox:latest";
const PODS: usize = 50;
const CONTAINERS: usize = 5;
const NEW_PODS: usize = 10;
const ROUNDS: usize = 5;
const PARALLEL: usize = 64;
/// Pods set up at once before a storm (each: RunPodSandbox, then its containers).
const SETUP_PARALLEL: usize = 8;
/// A storm call that takes longer than this is a deadlock.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct Pod {
    id: String,
    containers: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    StopPod,
    RemovePod,
    StopContainer,
    RemoveContainer,
}

/// RunPodSandbox, then `n` busybox sleepers created and started.
async fn make_pod(env: &TestEnv, c: &CriClient, name: &str, n: usize) -> Result<Pod> {
    let config = env.pod_config(name)?;
    let id = c.run_pod(&config).await?;
    let mut containers = Vec::new();
    for i in 0..n {
        let cfg = container_config(&format!("c{i}"), BUSYBOX, &["sleep", "3600"]);
        let cid = c.create_container(&id, &cfg, &config).await?;
        c.start_container(&cid).await?;
        containers.push(cid);
    }
    Ok(Pod { id, containers })
}

/// Makes `count` pods of `n` containers, `SETUP_PARALLEL` at a time.
async fn make_pods(
    env: &TestEnv,
    prefix: &str,
    count: usize,
    n: usize,
    parallel: usize,
) -> Result<Vec<Pod>> {
    use futures_like::buffered;
    let c = env.cri().clone();
    let names: Vec<String> = (0..count).map(|i| format!("{prefix}{i}")).collect();
    buffered(names, parallel, |name| {
        let c = c.clone();
        async move { make_pod(env, &c, &name, n).await }
    })
    .await
}

/// One storm call: OK and NotFound are fine, anything else (or a hang) is returned as Err.
async fn call(c: &CriClient, op: Op, id: &str) -> Result<(), String> {
    let mut rt = c.runtime();
    let fut = async {
        match op {
            Op::StopPod => rt
                .stop_pod_sandbox(api::StopPodSandboxRequest {
                    pod_sandbox_id: id.into(),
                })
                .await
                .map(|_| ()),
            Op::RemovePod => rt
                .remove_pod_sandbox(api::RemovePodSandboxRequest {
                    pod_sandbox_id: id.into(),
                })
                .await
                .map(|_| ()),
            Op::StopContainer => rt
                .stop_container(api::StopContainerRequest {
                    container_id: id.into(),
                    timeout: 2,
                })
                .await
                .map(|_| ()),
            Op::RemoveContainer => rt
                .remove_container(api::RemoveContainerRequest {
                    container_id: id.into(),
                })
                .await
                .map(|_| ()),
        }
    };
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Err(_) => Err(format!(
            "{op:?} {id}: no answer within {CALL_TIMEOUT:?} (deadlock?)"
        )),
        Ok(Ok(())) => Ok(()),
        Ok(Err(s)) if s.code() == tonic::Code::NotFound => Ok(()),
        Ok(Err(s)) => Err(format!("{op:?} {id}: {:?} {:?}", s.code(), s.message())),
    }
}

/// What is left on the host of removed pods and containers (their ids in cgroup paths or
/// mount points, their shims).
fn remains_of(env: &TestEnv, ids: &[String]) -> Vec<String> {
    let mut v = Vec::new();
    let hit = |s: &str| ids.iter().any(|id| s.contains(id.as_str()));
    for d in leaks::cgroup_dirs(&env.cgroup_parent) {
        if hit(&d.display().to_string()) {
            v.push(format!("cgroup {}", d.display()));
        }
    }
    for m in leaks::mounts_under(&env.root) {
        if hit(&m.display().to_string()) {
            v.push(format!("mount {}", m.display()));
        }
    }
    for f in env.netns_files() {
        if hit(&f.display().to_string()) {
            v.push(format!("netns {}", f.display()));
        }
    }
    for pid in env.shim_pids() {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if hit(&String::from_utf8_lossy(&cmd)) {
            v.push(format!("shim {pid}"));
        }
    }
    v
}

async fn storm(env: &mut TestEnv, seed: u64) -> Result<()> {
    let c = env.cri().clone();
    let pid = env.daemon_pid().context("crispd not running")?;
    c.pull(BUSYBOX, None).await?;
    let baseline = env.idle_baseline();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut carried: Vec<Pod> = Vec::new();
    let total = Instant::now();

    for round in 1..=ROUNDS {
        let t = Instant::now();
        let mut pods = make_pods(
            env,
            &format!("r{round}-p"),
            PODS,
            CONTAINERS,
            SETUP_PARALLEL,
        )
        .await
        .with_context(|| {
            format!("round {round}: setting up {PODS} pods × {CONTAINERS} containers")
        })?;
        let setup = t.elapsed();
        pods.append(&mut carried);

        let mut ops: Vec<(Op, String)> = Vec::new();
        for p in &pods {
            for _ in 0..2 {
                ops.push((Op::StopPod, p.id.clone()));
                ops.push((Op::RemovePod, p.id.clone()));
                for cid in &p.containers {
                    ops.push((Op::StopContainer, cid.clone()));
                    ops.push((Op::RemoveContainer, cid.clone()));
                }
            }
        }
        ops.shuffle(&mut rng);
        let n_ops = ops.len();

        let t = Instant::now();
        let sem = Arc::new(Semaphore::new(PARALLEL));
        let mut tasks = tokio::task::JoinSet::new();
        for (op, id) in ops {
            let c = c.clone();
            let sem = sem.clone();
            // Tokio's semaphore is fair: calls start in the shuffled order, 64 in flight.
            tasks.spawn(async move {
                let _permit = sem.acquire_owned().await.map_err(|e| e.to_string())?;
                call(&c, op, &id).await
            });
        }
        // The new pods are created while the storm runs.
        let new_prefix = format!("r{round}-new");
        let creating = make_pods(env, &new_prefix, NEW_PODS, 1, NEW_PODS);
        let (created, storm_results) = tokio::join!(creating, async {
            let mut errors = Vec::new();
            while let Some(r) = tasks.join_next().await {
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => errors.push(e),
                    Err(e) => errors.push(format!("storm task failed: {e}")),
                }
            }
            errors
        });
        let storm_time = t.elapsed();
        ensure!(
            storm_results.is_empty(),
            "round {round} (seed {seed}): {} of {n_ops} calls returned neither OK nor NotFound:\n{}",
            storm_results.len(),
            storm_results
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        let created = created
            .with_context(|| format!("round {round}: creating {NEW_PODS} pods during the storm"))?;
        ensure!(
            env.daemon_pid() == Some(pid)
                && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok(),
            "round {round}: crispd (pid {pid}) died during the storm"
        );

        // Lists: exactly the new pods and their containers.
        let t = Instant::now();
        let mut listed: Vec<String> = c.list_pods().await?;
        listed.sort();
        let mut want: Vec<String> = created.iter().map(|p| p.id.clone()).collect();
        want.sort();
        ensure!(
            listed == want,
            "round {round}: ListPodSandbox has {} pods, want the {} new ones\n got {listed:?}\nwant {want:?}",
            listed.len(),
            want.len()
        );
        let mut listed_c: Vec<String> = c
            .list_containers(None)
            .await?
            .into_iter()
            .map(|x| x.id)
            .collect();
        listed_c.sort();
        let mut want_c: Vec<String> = created.iter().flat_map(|p| p.containers.clone()).collect();
        want_c.sort();
        ensure!(
            listed_c == want_c,
            "round {round}: ListContainers\n got {listed_c:?}\nwant {want_c:?}"
        );
        for p in &created {
            let st = c.pod_status(&p.id).await?;
            ensure!(
                st.state == api::PodSandboxState::SandboxReady as i32,
                "round {round}: new pod {} is {:?}",
                p.id,
                st.state
            );
        }
        // Nothing of what was removed is left (cleanup may trail the last OK by a moment).
        let removed: Vec<String> = pods
            .iter()
            .flat_map(|p| std::iter::once(p.id.clone()).chain(p.containers.clone()))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = remains_of(env, &removed);
            let shims = env.shim_pids().len();
            let netns = env.netns_files().len();
            if left.is_empty() && shims == NEW_PODS && netns == NEW_PODS {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "round {round}: after the storm {shims} shims and {netns} netns for {NEW_PODS} pods; left of removed pods/containers: {left:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!(
            "round {round}: setup {PODS}×{CONTAINERS} in {setup:?}; storm of {n_ops} calls ({} pods, 64 in flight) with {NEW_PODS} creations in {storm_time:?}; checks in {:?}",
            pods.len(),
            t.elapsed()
        );
        carried = created;
    }

    // The last round's new pods go too, and then an idle crispd has nothing left.
    for p in &carried {
        c.stop_pod(&p.id).await?;
        c.remove_pod(&p.id).await?;
    }
    ensure!(c.list_pods().await?.is_empty(), "pods left at the end");
    ensure!(
        c.list_containers(None).await?.is_empty(),
        "containers left at the end"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = env.idle_leftovers(&baseline);
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("with every pod removed, crispd still has {left:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(env.daemon_pid() == Some(pid), "crispd was restarted");
    eprintln!("{ROUNDS} rounds in {:?}", total.elapsed());

    // The store agrees: with crispd stopped, no pod, container, shim or ID-range record and
    // nothing quarantined is left in crisp.db.
    env.kill_daemon()?;
    let left = store_records(&env.crispd_db())?;
    ensure!(
        left.is_empty(),
        "crisp.db still holds records after every pod was removed: {left:#?}"
    );
    Ok(())
}

/// `table/key` of every record in crisp.db's pod, container, shim, ID-range and quarantine
/// tables (read offline with redb; crispd must be down).
fn store_records(db: &std::path::Path) -> Result<Vec<String>> {
    use redb::ReadableTable;
    let db =
        redb::Database::open(db).with_context(|| format!("opening {} offline", db.display()))?;
    let txn = db.begin_read()?;
    let mut out = Vec::new();
    for name in ["pods", "containers", "shims", "id_ranges", "quarantine"] {
        let def: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new(name);
        let table = match txn.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => continue,
            Err(e) => return Err(e).with_context(|| format!("crisp.db table {name}")),
        };
        for entry in table.iter()? {
            let (k, _) = entry?;
            out.push(format!("{name}/{}", k.value()));
        }
    }
    Ok(out)
}

/// `buffered`: run an async fn over items with bounded concurrency, keeping order, failing
/// on the first error (a tiny stand-in for futures' `buffered`, which e2e does not depend on).
mod futures_like {
    use std::future::Future;

    pub async fn buffered<T, F, Fut, R>(
        items: Vec<T>,
        parallel: usize,
        f: F,
    ) -> anyhow::Result<Vec<R>>
    where
        F: Fn(T) -> Fut,
        Fut: Future<Output = anyhow::Result<R>>,
    {
        let sem = tokio::sync::Semaphore::new(parallel.max(1));
        let futs = items.into_iter().map(|item| {
            let fut = f(item);
            let sem = &sem;
            async move {
                let _permit = sem.acquire().await?;
                fut.await
            }
        });
        let mut out = Vec::new();
        for r in join_all(futs.collect()).await {
            out.push(r?);
        }
        Ok(out)
    }

    /// Polls every future concurrently on this task.
    async fn join_all<Fut: Future>(futs: Vec<Fut>) -> Vec<Fut::Output> {
        let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
        let mut out: Vec<Option<Fut::Output>> = futs.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for (i, f) in futs.iter_mut().enumerate() {
                if out[i].is_none() {
                    match f.as_mut().poll(cx) {
                        std::task::Poll::Ready(v) => out[i] = Some(v),
                        std::task::Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        out.into_iter().flatten().collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crispd_concurrent_removal() -> Result<()> {
    let t0 = Instant::now();
    let seed = match std::env::var("CRISP_E2E_STORM_SEED") {
        Ok(s) => s.parse().context("CRISP_E2E_STORM_SEED is not a number")?,
        Err(_) => u64::from_str_radix(&crisp_e2e::cri::random_hex(12), 16)?,
    };
    eprintln!("storm seed {seed} (CRISP_E2E_STORM_SEED={seed} replays the order)");
    let registry = Registry::start()?;
    registry.push(&["busybox", "pause"])?;
    let mut env = TestEnv::start(RuntimeKind::Crispd, &registry.host()).await?;
    let outcome = storm(&mut env, seed).await;
    if outcome.is_err() {
        eprintln!("crispd log tail:\n{}", env.daemon_log_tail(80));
    }
    let leaks = env.teardown().await;
    eprintln!("crispd_concurrent_removal: {:?}", t0.elapsed());
    outcome?;
    ensure!(leaks.is_empty(), "teardown left {leaks:#?}");
    Ok(())
}
