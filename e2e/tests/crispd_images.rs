//! crispd's image store across a crash, through CRI only: a `PullImage` of `large`
//! (busybox + 208 MiB) is cut by `kill -9` of crispd while the big layer streams; the
//! restarted crispd starts from a tidy store (start-up phase "image gc": no partial
//! download, no orphan blob, no half-built or orphan snapshot) and the next pull completes:
//! ImageStatus and ListImages show it, every layer is one committed snapshot and the big
//! file is whole. Nothing leaks.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use crisp_e2e::cri::image_spec;
use crisp_e2e::harness::{RuntimeKind, TestEnv};
use crisp_e2e::leaks;
use crisp_e2e::registry::Registry;
use crisp_proto::cri::v1 as api;

const LARGE: &str = "docker.io/library/large:latest";
const LARGE_BIN: u64 = 208 << 20;

/// Files directly under `dir` with their sizes (empty if it does not exist).
fn files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut v: Vec<(PathBuf, u64)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| (e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn blob_names(content: &Path) -> BTreeSet<String> {
    files(&content.join("blobs/sha256"))
        .into_iter()
        .filter_map(|(p, _)| {
            p.file_name()
                .map(|n| format!("sha256:{}", n.to_string_lossy()))
        })
        .collect()
}

/// The whole scenario; the caller tears the env down whatever happens.
async fn scenario(env: &mut TestEnv) -> Result<()> {
    let content = env.root.join("root/images/content");
    let ingest = content.join("ingest");

    // The pull runs in its own task so that the kill can land while it streams.
    let cri = env.cri().clone();
    let pull = tokio::spawn(async move { cri.pull(LARGE, None).await });
    let t0 = Instant::now();
    loop {
        if files(&ingest).iter().any(|(_, len)| *len > 20 << 20) {
            break;
        }
        if pull.is_finished() {
            bail!(
                "the pull ended before the big layer was seen streaming: {:?}",
                pull.await
            );
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(60),
            "the pull never got under way"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    env.kill_daemon()?;
    let cut = pull.await.context("pull task")?;
    ensure!(cut.is_err(), "the pull survived kill -9 of crispd: {cut:?}");

    // What the crash left: a partial download, the manifest and config, and snapshots
    // (busybox's committed layer, the big layer's half-built one).
    let partial = files(&ingest);
    ensure!(
        partial.iter().any(|(_, len)| *len > 0 && *len < LARGE_BIN),
        "no partial download in {}: {partial:?}",
        ingest.display()
    );
    let orphan_blobs = blob_names(&content);
    ensure!(
        orphan_blobs.len() >= 2,
        "manifest and config were stored: {orphan_blobs:?}"
    );
    let orphan_snaps = env.snapshot_dirs();
    ensure!(
        !orphan_snaps.is_empty(),
        "the unpacker had started: no snapshot directory"
    );

    env.restart_daemon().await?;
    let log = std::fs::read_to_string(&env.daemon_log)?;
    let after = log
        .split("===== crisp-e2e: restarting")
        .nth(1)
        .context("no restart marker in the daemon log")?;
    ensure!(
        after.contains("image gc") && after.contains("start-up image gc done"),
        "the restarted crispd did not log its start-up image gc:\n{}",
        env.daemon_log_tail(40)
    );
    ensure!(
        files(&ingest).is_empty(),
        "partial downloads left: {:?}",
        files(&ingest)
    );
    ensure!(
        blob_names(&content).is_empty(),
        "orphan blobs left: {:?}",
        blob_names(&content)
    );
    ensure!(
        env.snapshot_dirs().is_empty(),
        "orphan or half-built snapshots left: {:?} (before restart: {orphan_snaps:?})",
        env.snapshot_dirs()
    );
    let mounts = leaks::mounts_under(&env.root);
    ensure!(
        mounts.is_empty(),
        "mounts under the root after the crash: {mounts:?}"
    );

    // The next pull completes.
    let id = env.cri().pull(LARGE, None).await?;
    ensure!(id.starts_with("sha256:"), "PullImage returned {id:?}");
    let img = env
        .cri()
        .image_status(LARGE)
        .await?
        .context("ImageStatus: no image")?;
    ensure!(img.id == id, "ImageStatus id {} != pulled {id}", img.id);
    ensure!(
        img.repo_tags.iter().any(|t| t == LARGE),
        "tags {:?}",
        img.repo_tags
    );
    ensure!(img.size > LARGE_BIN, "size {}", img.size);
    let listed = env
        .cri()
        .image()
        .list_images(api::ListImagesRequest::default())
        .await?
        .into_inner()
        .images;
    ensure!(
        listed
            .iter()
            .any(|i| i.id == id && i.repo_tags.iter().any(|t| t == LARGE)),
        "ListImages: {listed:?}"
    );

    // Complete and nothing more: the blobs are exactly the image's, every layer is one
    // snapshot, the big file is whole, no download is left over.
    let verbose = env
        .cri()
        .image()
        .image_status(api::ImageStatusRequest {
            image: Some(image_spec(LARGE)),
            verbose: true,
        })
        .await?
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(
        verbose
            .info
            .get("info")
            .context("verbose ImageStatus without info")?,
    )?;
    let layers: Vec<String> = info["layers"]
        .as_array()
        .context("info.layers")?
        .iter()
        .filter_map(|l| l.as_str().map(str::to_string))
        .collect();
    let mut want: BTreeSet<String> = layers.iter().cloned().collect();
    want.insert(id.clone());
    want.insert(
        info["manifestDigest"]
            .as_str()
            .context("info.manifestDigest")?
            .to_string(),
    );
    let have = blob_names(&content);
    ensure!(have == want, "blobs {have:?}, the image needs {want:?}");
    ensure!(
        files(&ingest).is_empty(),
        "downloads left: {:?}",
        files(&ingest)
    );
    let snaps = env.snapshot_dirs();
    ensure!(
        snaps.len() == layers.len(),
        "{} snapshot directories for {} layers: {snaps:?}",
        snaps.len(),
        layers.len()
    );
    let big: Vec<u64> = snaps
        .iter()
        .filter_map(|s| {
            std::fs::metadata(s.join("fs/large.bin"))
                .ok()
                .map(|m| m.len())
        })
        .collect();
    ensure!(
        big == vec![LARGE_BIN],
        "large.bin sizes in the snapshots: {big:?}"
    );
    ensure!(
        snaps.iter().any(|s| s.join("fs/bin/sh").exists()),
        "no snapshot holds busybox's /bin/sh"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crispd_pull_killed_mid_layer_is_completed_after_restart() -> Result<()> {
    let registry = Registry::start()?;
    registry.push(&["large"])?;
    let mut env = TestEnv::start(RuntimeKind::Crispd, &registry.host()).await?;
    let outcome = scenario(&mut env).await;
    env.finish("crispd", outcome).await
}

/// RemoveImage of busybox keeps `layers` (built on busybox's layer) runnable: a container
/// from it runs and reads a file from the top layer and one from the shared base. Removing
/// the container and the last image then leaves an empty store (ImageFsInfo's content and
/// the snapshot directory).
async fn shared_layers(env: &TestEnv) -> Result<()> {
    let cri = env.cri();
    let busybox = cri.pull("docker.io/library/busybox:latest", None).await?;
    let layers = cri.pull("docker.io/library/layers:latest", None).await?;
    ensure!(busybox != layers, "two different images");
    cri.remove_image("docker.io/library/busybox:latest").await?;
    ensure!(
        cri.image_status(&busybox).await?.is_none(),
        "busybox still listed"
    );
    ensure!(
        cri.image_status("docker.io/library/layers:latest")
            .await?
            .is_some(),
        "layers went too"
    );

    let pod = env.pod_config("shared-layers")?;
    let pod_id = cri.run_pod(&pod).await?;
    let cfg = crisp_e2e::cri::container_config(
        "reader",
        "docker.io/library/layers:latest",
        &[
            "sh",
            "-c",
            "cat /data/keep.txt && test -x /bin/busybox && echo base-ok",
        ],
    );
    let id = cri.create_container(&pod_id, &cfg, &pod).await?;
    cri.start_container(&id).await?;
    let st = cri
        .wait_container_exit(&id, Duration::from_secs(30))
        .await?;
    let log = crisp_e2e::cri::read_log(&crisp_e2e::cri::log_file(&pod, &cfg))?;
    let text: Vec<String> = log.iter().map(|l| l.text.clone()).collect();
    ensure!(
        st.exit_code == 0,
        "exit code {} (log {text:?})",
        st.exit_code
    );
    ensure!(text == ["keep", "base-ok"], "log {text:?}");
    cri.remove_container(&id).await?;
    cri.stop_pod(&pod_id).await?;
    cri.remove_pod(&pod_id).await?;

    cri.remove_image(&layers).await?;
    let listed = cri
        .image()
        .list_images(api::ListImagesRequest::default())
        .await?
        .into_inner()
        .images;
    ensure!(listed.is_empty(), "images left: {listed:?}");
    let content = env.root.join("root/images/content");
    ensure!(
        blob_names(&content).is_empty(),
        "blobs left: {:?}",
        blob_names(&content)
    );
    ensure!(
        env.snapshot_dirs().is_empty(),
        "snapshots left: {:?}",
        env.snapshot_dirs()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crispd_remove_image_keeps_layer_sharing_image_runnable_then_gc_empties_store() -> Result<()>
{
    let registry = Registry::start()?;
    registry.push(&["busybox", "layers"])?;
    let env = TestEnv::start(RuntimeKind::Crispd, &registry.host()).await?;
    let outcome = shared_layers(&env).await;
    env.finish("crispd", outcome).await
}
