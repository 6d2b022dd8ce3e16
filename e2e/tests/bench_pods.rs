//! Benchmark, not a test (ignored by default): crispd against Debian's containerd 1.6, both
//! with runc, each in its own [`TestEnv`], in one run:
//! - RunPodSandbox latency, and CreateContainer+StartContainer latency, over `N_SEQ`
//!   sequential pods of one container (mean and median);
//! - wall time to start 50 pods of one container each at parallelism 4, and to stop and
//!   remove them (StopPodSandbox + RemovePodSandbox) at parallelism 4;
//! - resident memory with the 50 pods running: VmRSS of the daemon plus the sum over its
//!   shims (`containerd-shim-*` whose command line names the env's root), and the shims'
//!   Pss and Anonymous sums (VmRSS counts their shared text and libc once per shim).
//!
//! It prints a table with crispd/containerd ratios, and the load average before and after
//! (a 2-core machine shared with builds: figures move with it).
//!
//! `cargo build --workspace --bins && \
//!  cargo nextest run -p crisp-e2e --test bench_pods --run-ignored only --no-capture`
//! `CRISP_BENCH_ONLY=containerd` (or `crispd`) runs one side; `CRISP_BENCH_PODS=50`,
//! `CRISP_BENCH_SEQ=10` change the counts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use crisp_e2e::cri::{CriClient, container_config};
use crisp_e2e::harness::{RuntimeKind, TestEnv};
use crisp_e2e::leaks;
use crisp_e2e::procfs::{smaps_kib, vm_rss_kib};
use crisp_e2e::registry::Registry;
use crisp_proto::cri::v1 as api;

const BUSYBOX: &str = "docker.io/library/busybox:latest";
const PARALLELISM: usize = 4;

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

fn mean_median(v: &[f64]) -> (f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    (mean, v.get(v.len() / 2).copied().unwrap_or(f64::NAN))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[derive(Debug, Default, Clone)]
struct Figures {
    run_pod_ms: Vec<f64>,
    create_start_ms: Vec<f64>,
    start_all_s: f64,
    stop_remove_all_s: f64,
    daemon_rss_kib: u64,
    shims_rss_kib: u64,
    shims_pss_kib: u64,
    shims_anon_kib: u64,
    shims: usize,
    pods: usize,
    load_before: String,
    load_after: String,
}

/// One pod with one `sleep` container; returns (pod id, RunPodSandbox time, create+start time).
async fn pod_with_container(
    cri: &CriClient,
    pod: api::PodSandboxConfig,
) -> Result<(String, Duration, Duration)> {
    let t = Instant::now();
    let pod_id = cri.run_pod(&pod).await?;
    let run = t.elapsed();
    let cfg = container_config("c", BUSYBOX, &["sleep", "3600"]);
    let t = Instant::now();
    let id = cri.create_container(&pod_id, &cfg, &pod).await?;
    cri.start_container(&id).await?;
    Ok((pod_id, run, t.elapsed()))
}

async fn stop_remove(cri: &CriClient, pod_id: &str) -> Result<()> {
    cri.stop_pod(pod_id).await?;
    cri.remove_pod(pod_id).await
}

/// Runs `f` over `items` with at most [`PARALLELISM`] at a time; the first error wins.
async fn parallel<T, F, Fut, R>(items: Vec<T>, f: F) -> Result<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<R>> + Send + 'static,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(PARALLELISM));
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
    let mut out = Vec::new();
    let mut first_err = None;
    while let Some(r) = set.join_next().await {
        match r.context("task")? {
            Ok(v) => out.push(v),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

async fn measure(env: &TestEnv, n_seq: usize, n_pods: usize) -> Result<Figures> {
    let cri = env.cri().clone();
    cri.pull(BUSYBOX, None).await?;
    let mut f = Figures {
        load_before: loadavg(),
        pods: n_pods,
        ..Default::default()
    };

    // Sequential latencies; one untimed pod first so that first-use costs (pause image,
    // CNI plugin binaries in the page cache) are not in the figures.
    let warm = pod_with_container(&cri, env.pod_config("bench-warm")?).await?;
    stop_remove(&cri, &warm.0).await?;
    let mut seq = Vec::new();
    for i in 0..n_seq {
        let (id, run, cs) =
            pod_with_container(&cri, env.pod_config(&format!("bench-seq-{i}"))?).await?;
        f.run_pod_ms.push(ms(run));
        f.create_start_ms.push(ms(cs));
        seq.push(id);
    }
    for id in &seq {
        stop_remove(&cri, id).await?;
    }

    // n_pods at parallelism 4.
    let configs = (0..n_pods)
        .map(|i| env.pod_config(&format!("bench-par-{i}")))
        .collect::<Result<Vec<_>>>()?;
    let t = Instant::now();
    let c = cri.clone();
    let started = parallel(configs, move |pod| {
        let c = c.clone();
        async move { pod_with_container(&c, pod).await.map(|r| r.0) }
    })
    .await?;
    f.start_all_s = t.elapsed().as_secs_f64();
    ensure!(
        started.len() == n_pods,
        "{} of {n_pods} pods started",
        started.len()
    );

    // Memory with every pod running; a moment for lazily started goroutines/tasks to settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let daemon = env.daemon_pid().context("daemon pid")? as i32;
    f.daemon_rss_kib = vm_rss_kib(daemon).context("daemon VmRSS")?;
    let shims = shim_pids(env);
    f.shims = shims.len();
    f.shims_rss_kib = shims.iter().filter_map(|p| vm_rss_kib(*p)).sum();
    f.shims_pss_kib = shims.iter().filter_map(|p| smaps_kib(*p, "Pss")).sum();
    f.shims_anon_kib = shims
        .iter()
        .filter_map(|p| smaps_kib(*p, "Anonymous"))
        .sum();

    let t = Instant::now();
    let c = cri.clone();
    parallel(started, move |id: String| {
        let c = c.clone();
        async move { stop_remove(&c, &id).await }
    })
    .await?;
    f.stop_remove_all_s = t.elapsed().as_secs_f64();
    f.load_after = loadavg();
    Ok(f)
}

async fn run_one(
    kind: RuntimeKind,
    registry: &Registry,
    n_seq: usize,
    n_pods: usize,
) -> Result<Figures> {
    let env = TestEnv::start(kind, &registry.host()).await?;
    let outcome = measure(&env, n_seq, n_pods).await;
    if let Err(e) = &outcome {
        eprintln!(
            "{kind}: {e:#}\n{kind} log tail:\n{}",
            env.daemon_log_tail(40)
        );
    }
    let leaks = env.teardown().await;
    let f = outcome?;
    ensure!(leaks.is_empty(), "{kind}: teardown left {leaks:#?}");
    Ok(f)
}

fn print_table(cd: Option<&Figures>, cr: Option<&Figures>) {
    let row = |name: &str, unit: &str, get: &dyn Fn(&Figures) -> f64| {
        let a = cd.map(get);
        let b = cr.map(get);
        let fmt = |v: Option<f64>| {
            v.map(|v| format!("{v:>12.1}"))
                .unwrap_or_else(|| format!("{:>12}", "-"))
        };
        let ratio = match (a, b) {
            (Some(a), Some(b)) if a > 0.0 => format!("{:>8.2}", b / a),
            _ => format!("{:>8}", "-"),
        };
        println!("{name:<38} {unit:<4} {} {} {ratio}", fmt(a), fmt(b));
    };
    println!();
    println!(
        "{:<38} {:<4} {:>12} {:>12} {:>8}",
        "pods with runc", "", "containerd", "crispd", "crispd/cd"
    );
    row("RunPodSandbox mean", "ms", &|f| {
        mean_median(&f.run_pod_ms).0
    });
    row("RunPodSandbox median", "ms", &|f| {
        mean_median(&f.run_pod_ms).1
    });
    row("CreateContainer+StartContainer mean", "ms", &|f| {
        mean_median(&f.create_start_ms).0
    });
    row("CreateContainer+StartContainer median", "ms", &|f| {
        mean_median(&f.create_start_ms).1
    });
    row("start N pods x1 container, par 4", "s", &|f| f.start_all_s);
    row("stop+remove N pods, par 4", "s", &|f| f.stop_remove_all_s);
    row("daemon VmRSS, N pods running", "MiB", &|f| {
        f.daemon_rss_kib as f64 / 1024.0
    });
    row("shims VmRSS sum", "MiB", &|f| {
        f.shims_rss_kib as f64 / 1024.0
    });
    row("daemon + shims VmRSS", "MiB", &|f| {
        (f.daemon_rss_kib + f.shims_rss_kib) as f64 / 1024.0
    });
    row("shims Pss sum", "MiB", &|f| f.shims_pss_kib as f64 / 1024.0);
    row("shims Anonymous sum", "MiB", &|f| {
        f.shims_anon_kib as f64 / 1024.0
    });
    row("shim processes", "", &|f| f.shims as f64);
    for (name, f) in [("containerd", cd), ("crispd", cr)] {
        if let Some(f) = f {
            println!(
                "{name}: N={} pods, {} sequential samples; load average before {} / after {}",
                f.pods,
                f.run_pod_ms.len(),
                f.load_before,
                f.load_after
            );
        }
    }
}

#[test]
#[ignore = "benchmark"]
fn bench_pods_crispd_vs_containerd() -> Result<()> {
    let n_seq = env_count("CRISP_BENCH_SEQ", 10);
    let n_pods = env_count("CRISP_BENCH_PODS", 50);
    let only = std::env::var("CRISP_BENCH_ONLY").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let registry = Registry::start()?;
        registry.push(&["busybox", "pause"])?;
        let mut results = Vec::new();
        for kind in [RuntimeKind::Containerd, RuntimeKind::Crispd] {
            if !only.is_empty() && only != kind.to_string() {
                results.push(None);
                continue;
            }
            let r = run_one(kind, &registry, n_seq, n_pods).await;
            if let Err(e) = &r {
                eprintln!("{kind}: benchmark failed: {e:#}");
            }
            results.push(Some(r));
        }
        let figs: Vec<Option<&Figures>> = results
            .iter()
            .map(|r| r.as_ref().and_then(|r| r.as_ref().ok()))
            .collect();
        print_table(figs[0], figs[1]);
        for r in results.into_iter().flatten() {
            r?;
        }
        Ok(())
    })
}
