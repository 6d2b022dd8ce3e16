//! Ordered start-up (promise 4): parse config → open store → snapshotter → recover → CNI →
//! stream → serve. Each phase is logged by name with its duration. Only a broken config or an
//! unopenable store is fatal; things that may appear later (a CNI config, a runtime binary)
//! are recorded as conditions that Status and the calls needing them report.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::Config;
use crate::daemon::{Condition, Daemon};
use crate::network::cni::CniManager;
use crate::store::Store;
use crate::store::records::{ContainerRecord, IdRangeRecord, PodRecord, ShimRecord};
use crate::util::find_binary;

/// Run one named phase, logging its start, end and duration.
async fn phase<T, F>(name: &'static str, f: F) -> anyhow::Result<T>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    let start = Instant::now();
    tracing::info!(phase = name, "start-up phase begins");
    let r = f.await.with_context(|| format!("start-up phase `{name}`"));
    let ms = start.elapsed().as_secs_f64() * 1e3;
    match &r {
        Ok(_) => tracing::info!(phase = name, elapsed_ms = ms, "start-up phase done"),
        Err(e) => {
            tracing::error!(phase = name, elapsed_ms = ms, error = %format!("{e:#}"), "start-up phase failed")
        }
    }
    r
}

/// Everything up to (not including) serving; returns the daemon the server will use.
pub async fn prepare(cfg: Config) -> anyhow::Result<Arc<Daemon>> {
    let cfg = Arc::new(cfg);
    let store = phase("open store", open_store(&cfg)).await?;
    let (snapshotter, images) = phase("snapshotter", open_images(&cfg)).await?;
    // What a pull killed with crispd left: orphan blobs, layers, half-built snapshot dirs.
    phase("image gc", async { anyhow::Ok(images.gc_on_start().await) }).await?;

    // Reading the CNI directory runs no plugin; the daemon exists from here so recovery can
    // talk to shims and release pods' networks.
    let cni = Arc::new(CniManager::new(
        cfg.cni.conf_dir.clone(),
        cfg.cni.bin_dir.clone(),
        cfg.cni_cache_dir(),
    ));
    let d = Arc::new(Daemon::new(
        Arc::clone(&cfg),
        store.clone(),
        Arc::clone(&cni),
        snapshotter,
        images,
    ));
    let (conditions, mut report) = phase("recover", recover(&d)).await?;
    phase("cni", async {
        // Not fatal: Status reports NetworkReady=false until a config appears.
        if let Err(e) = cni.current() {
            tracing::warn!(key = "cni.conf_dir", value = %cfg.cni.conf_dir.display(), error = %e,
                "no usable CNI config yet; watching for one");
        }
        // Attachments of pods that are gone: DEL from the cache, before anything new runs.
        crate::pod::recover::recover_cni(&store, &cni, &mut report)?;
        if !report.cni_deleted.is_empty() {
            tracing::info!(
                count = report.cni_deleted.len(),
                "orphaned CNI attachments deleted"
            );
        }
        cni.spawn_watch(Duration::from_secs(1));
        Ok(())
    })
    .await?;

    // Streaming: its own phase, after recovery (sessions need the pods' shims). A port that
    // cannot be bound is fatal, like the CRI socket: kubelet would get URLs nobody serves.
    phase("stream", async {
        let server = crate::stream::server::start(&d.cfg.stream, d.stream_runtime()).await?;
        let addr = server.addr();
        d.stream
            .set(server)
            .map_err(|_| anyhow::anyhow!("stream server started twice"))?;
        tracing::info!(address = %addr, "serving streams (exec, attach, port-forward)");
        Ok(())
    })
    .await?;

    for c in &conditions {
        tracing::warn!(key = %c.key, "{}", c.message);
    }
    d.conditions.set(conditions);
    crate::pod::watch::spawn(&d.pods);
    Ok(d)
}

/// Phase "open store": the root and state directories, then `<root>/crisp.db`.
async fn open_store(cfg: &Config) -> anyhow::Result<Store> {
    for (key, dir) in [("root", &cfg.root), ("state", &cfg.state)] {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating `{key}` directory {}", dir.display()))?;
    }
    let path = cfg.db_path();
    let store = Store::open(&path).with_context(|| format!("opening {}", path.display()))?;
    match crate::store::slow_disk::SlowDisk::from_env().map_err(anyhow::Error::msg)? {
        Some(slow) => {
            tracing::warn!("failpoint on (a test's slow disk): {}", slow.describe());
            Ok(store.with_slow_disk(slow))
        }
        None => Ok(store),
    }
}

/// Phase "snapshotter": opened before recovery (recovering containers needs their snapshots),
/// with the image service that unpacks into it.
async fn open_images(
    cfg: &Config,
) -> anyhow::Result<(Arc<crisp_snapshotter::Snapshotter>, crisp_image::Images)> {
    let dir = cfg.snapshots_dir();
    let sn = crisp_snapshotter::Snapshotter::open(&dir, Default::default())
        .with_context(|| format!("opening snapshotter at {}", dir.display()))?;
    let sn = Arc::new(sn);
    let img_cfg = crisp_image::Config {
        hosts_dir: cfg.registry_hosts_dir(),
        max_concurrent_downloads: cfg.pull.max_concurrent_downloads,
        stall_window: Duration::from_secs(cfg.pull.stall_window_secs),
        ..Default::default()
    };
    let dir = cfg.images_dir();
    let images = crisp_image::Images::open(&dir, Arc::clone(&sn), img_cfg)
        .with_context(|| format!("opening image store at {}", dir.display()))?;
    Ok((sn, images))
}

/// Phase "recover": records counted (undecodable ones quarantined), runtimes checked,
/// orphans cleaned, the events endpoint serving, then pods, shims and containers recovered.
async fn recover(d: &Arc<Daemon>) -> anyhow::Result<(Vec<Condition>, crate::pod::recover::Report)> {
    let (store, cfg) = (&d.store, &d.cfg);
    // Decoding every record here quarantines the undecodable ones before anything reads
    // them; counts go to the log so an operator can see what came back.
    let pods = store.list::<PodRecord>()?;
    let ctrs = store.list::<ContainerRecord>()?;
    let ranges = store.list::<IdRangeRecord>()?;
    let shims = store.list::<ShimRecord>()?;
    let quarantined = store.count(crate::store::QUARANTINE)?;
    tracing::info!(
        pods = pods.len(),
        containers = ctrs.len(),
        id_ranges = ranges.len(),
        shims = shims.len(),
        quarantined,
        "records recovered"
    );
    let conditions = check_runtimes(cfg);
    let mut report = crate::pod::recover::recover(store, &cfg.netns_dir())?;
    tracing::info!(
        released_id_ranges = report.released_id_ranges.len(),
        removed_netns = report.removed_netns.len(),
        removed_containers = report.removed_containers.len(),
        failures = report.failures.len(),
        "orphans cleaned"
    );
    // Shims publish here; it serves before they are reconnected so no exit is lost.
    let events = crate::shim::events::EventsServer::start(
        &crate::shim::events::socket_path(&cfg.state),
        d.containers.shim_events.clone(),
    )
    .await?;
    *d.events_server.lock().await = Some(events);
    crate::pod::recover::recover_pods(&d.pods, &mut report).await?;
    // Container bundles and rootfs snapshots whose record went with its pod (or a crash
    // inside CreateContainer); their tasks are force-deleted even if their shim is gone.
    match crate::container::lifecycle::remove_orphans(&d.containers).await {
        Ok(ids) if !ids.is_empty() => {
            tracing::info!(
                removed = ids.len(),
                "orphaned container bundles and snapshots removed"
            )
        }
        Ok(_) => {}
        Err(e) => report.failures.push(format!("orphaned containers: {e}")),
    }
    tracing::info!(
        alive = report.pods_alive.len(),
        dead = report.pods_dead.len(),
        undone = report.pods_undone.len(),
        orphan_shims = report.orphan_shims.len(),
        failures = report.failures.len(),
        "pods and shims recovered"
    );
    for f in &report.failures {
        tracing::warn!(failure = %f, "recovery left something behind");
    }
    Ok((conditions, report))
}

/// Start up, then serve until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let listen = cfg.listen.clone();
    let d = prepare(cfg).await?;
    phase("serve", async {
        let listener = crate::server::bind(&listen)?;
        tracing::info!(socket = %listen.display(), "serving CRI");
        if !d.cfg.metrics.address.is_empty() {
            // Validated as a loopback host:port by the config phase.
            match d.cfg.metrics.address.parse() {
                Ok(addr) => match crate::metrics::spawn(d.scrape(), addr).await {
                    Ok(a) => tracing::info!(address = %a, "serving metrics"),
                    Err(e) => tracing::warn!(key = "metrics.address",
                        value = %d.cfg.metrics.address, error = %e, "metrics not served"),
                },
                Err(e) => tracing::warn!(key = "metrics.address", error = %e, "metrics not served"),
            }
        }
        let netns_dir = d.cfg.netns_dir();
        let stopping = d.stopping.clone();
        let shutdown = async move {
            shutdown_signal().await;
            stopping.send_replace(true);
        };
        let dd = Arc::clone(&d);
        crate::server::serve(d, listener, shutdown).await?;
        // Sessions end with the stream server; their execs are killed and deleted.
        crate::stream::server::shutdown(dd.stream.get(), &dd.stream_sessions).await;
        // Shims keep running (pods survive a crispd restart); only our endpoint goes.
        if let Some(ev) = dd.events_server.lock().await.take() {
            ev.shutdown().await;
        }
        // Leave no mount behind when no pod needs it (the dir is mounted when a pod's netns is
        // first made; pods that still run keep it).
        crate::network::netns::release_dir_if_empty(&netns_dir);
        // A stale socket would make the next client hang on connect-refused retries.
        let _ = std::fs::remove_file(&listen);
        tracing::info!("shut down");
        Ok(())
    })
    .await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can only run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

/// Missing binaries are conditions, not errors: the binary may be installed later, and only
/// the pods that need it should fail.
pub fn check_runtimes(cfg: &Config) -> Vec<Condition> {
    let mut out = Vec::new();
    if crate::util::cgroup_mode(Path::new("/sys/fs/cgroup")).is_none() {
        out.push(Condition {
            key: "cgroup_driver".into(),
            message: "no cgroup hierarchy mounted at /sys/fs/cgroup (neither v2 nor v1 \
                      memory controller); pods cannot be placed in cgroups"
                .into(),
        });
    }
    if find_binary(&cfg.shim_binary).is_none() {
        out.push(Condition {
            key: "shim_binary".into(),
            message: format!(
                "shim binary {} not found in PATH or beside crispd",
                cfg.shim_binary.display()
            ),
        });
    }
    if let Some(Some(bin)) = cfg.handler_binary("")
        && find_binary(&bin).is_none()
    {
        out.push(Condition {
            key: "runtime".into(),
            message: format!(
                "OCI runtime {} (setting `runtime`) not found",
                bin.display()
            ),
        });
    }
    // User namespaces are per pod and only on request: a node without a subordinate range
    // runs every other pod; the pods that ask get FailedPrecondition naming the setting.
    for (key, file) in [
        ("userns.subuid_file", &cfg.userns.subuid_file),
        ("userns.subgid_file", &cfg.userns.subgid_file),
    ] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let uid = nix::unistd::User::from_name(&cfg.userns.user)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw());
        if crate::pod::idmap::parse_subid(&text, &cfg.userns.user, uid).is_empty() {
            out.push(Condition {
                key: key.into(),
                message: format!(
                    "no subordinate ID range for user `{}` (setting `userns.user`) in {}: \
                     pods asking for a user namespace without explicit mappings will fail \
                     with FailedPrecondition; add a line like `{}:1000000000:65536000` \
                     (hack/install-deps.sh does)",
                    cfg.userns.user,
                    file.display(),
                    cfg.userns.user
                ),
            });
        }
    }
    for (name, h) in &cfg.runtime_handlers {
        if find_binary(&h.binary).is_none() {
            out.push(Condition {
                key: format!("runtime_handlers.{name}.binary"),
                message: format!(
                    "runtime handler `{name}`: binary {} not found",
                    h.binary.display()
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuntimeHandler;

    #[test]
    fn missing_handler_binary_is_a_condition_naming_the_key() {
        let mut cfg = Config::default();
        cfg.runtime_handlers.insert(
            "ghost".into(),
            RuntimeHandler {
                binary: "/nonexistent/ghost-runtime".into(),
                ..Default::default()
            },
        );
        let conds = check_runtimes(&cfg);
        let c = conds
            .iter()
            .find(|c| c.key == "runtime_handlers.ghost.binary")
            .expect("condition for ghost");
        assert!(c.message.contains("/nonexistent/ghost-runtime"));
    }

    #[test]
    fn find_binary_in_path() {
        assert!(find_binary(Path::new("sh")).is_some());
        assert!(find_binary(Path::new("/bin/sh")).is_some());
        assert!(find_binary(Path::new("surely-not-a-binary-xyz")).is_none());
    }

    #[tokio::test]
    async fn prepare_with_empty_dirs_is_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config {
            root: dir.path().join("root"),
            state: dir.path().join("state"),
            ..Config::default()
        };
        cfg.cni.conf_dir = dir.path().join("no-such-net.d");
        let d = prepare(cfg).await.expect("starts without CNI config");
        assert!(d.cni.current().is_err());
        assert!(dir.path().join("root/crisp.db").exists());
    }
}
