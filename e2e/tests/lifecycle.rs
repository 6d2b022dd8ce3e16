//! The first end-to-end test: one pod, two containers, through CRI only, against each
//! runtime. The same function runs for every runtime (`per_runtime!` at the end).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use crisp_e2e::cri::{self, container_config};
use crisp_e2e::harness::{RuntimeKind, TestEnv};
use crisp_e2e::registry::Registry;

/// An upstream name: it resolves to the test registry through the runtime's mirror config.
const BUSYBOX: &str = "docker.io/library/busybox:latest";
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

async fn lifecycle(kind: RuntimeKind) -> Result<()> {
    let t0 = Instant::now();
    let registry = Registry::start()?;
    registry.push(&["busybox", "pause"])?;
    let env = TestEnv::start(kind, &registry.host()).await?;
    eprintln!(
        "{kind} up in {:?} (root {})",
        t0.elapsed(),
        env.root.display()
    );

    let outcome = pod_with_two_containers(&env).await;
    if outcome.is_err() {
        eprintln!("{kind} log tail:\n{}", env.daemon_log_tail(40));
    }
    let leaks = env.teardown().await;
    eprintln!("{kind} lifecycle done in {:?}", t0.elapsed());
    outcome?;
    ensure!(leaks.is_empty(), "{kind}: teardown left {leaks:#?}");
    Ok(())
}

/// crispd hands its shims the idmapped-layer mode it resolved at start-up, so no shim probes
/// it again (a user namespace and an overlay mount on each pod's first container).
fn shim_has_the_idmap_mode(env: &TestEnv) -> Result<()> {
    let shims = env.shim_pids();
    ensure!(shims.len() == 1, "the pod's shims: {shims:?}");
    let environ = std::fs::read(format!("/proc/{}/environ", shims[0]))?;
    let mode = environ
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"CRISP_IDMAP_MODE=".as_slice()));
    ensure!(
        matches!(mode, Some(b"fd" | b"temp-mount")),
        "the shim's CRISP_IDMAP_MODE: {:?}",
        mode.map(String::from_utf8_lossy)
    );
    Ok(())
}

async fn pod_with_two_containers(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    let image_ref = c.pull(BUSYBOX, None).await?;
    ensure!(
        !image_ref.is_empty(),
        "PullImage returned an empty image ref"
    );
    let image = c
        .image_status(BUSYBOX)
        .await?
        .with_context(|| format!("ImageStatus: {BUSYBOX} missing after pull"))?;

    let pod = env.pod_config("lifecycle")?;
    let pod_id = c.run_pod(&pod).await?;
    if env.kind == RuntimeKind::Crispd {
        shim_has_the_idmap_mode(env)?;
    }

    // A container that prints a line and succeeds. Its config names the image by id, with
    // the pod spec's name beside it, as kubelet sends it.
    let mut ok = container_config("hello", BUSYBOX, &["sh", "-c", "echo hello-crisp; exit 0"]);
    ok.image = Some(crisp_proto::cri::v1::ImageSpec {
        image: image.id.clone(),
        user_specified_image: BUSYBOX.into(),
        ..Default::default()
    });
    let ok_id = c.create_container(&pod_id, &ok, &pod).await?;
    c.start_container(&ok_id).await?;
    let st = c.wait_container_exit(&ok_id, EXIT_TIMEOUT).await?;
    ensure!(
        st.exit_code == 0,
        "hello: exit code {} (reason {:?}, message {:?})",
        st.exit_code,
        st.reason,
        st.message
    );
    ensure!(
        st.reason == "Completed",
        "hello: reason {:?}, want Completed",
        st.reason
    );
    // kubelet shows image_ref as the container's imageID: the registry-pulled image's
    // repo digest (`…/busybox@sha256:…`), as containerd reports it, not the config id.
    ensure!(
        image.repo_digests.first() == Some(&st.image_ref),
        "hello: image_ref {:?}, want the image's first repo digest (repo_digests {:?}, id {})",
        st.image_ref,
        image.repo_digests,
        image.id
    );
    // And `image` is the image's first tag, not the id the config gave (kubelet shows it as
    // the container's image).
    ensure!(
        st.image.as_ref().map(|i| &i.image) == image.repo_tags.first()
            && image.repo_tags.first().map(String::as_str) == Some(BUSYBOX),
        "hello: image {:?}, want the image's first repo tag (repo_tags {:?}, config {})",
        st.image,
        image.repo_tags,
        image.id
    );
    let line = cri::wait_log_line(
        &cri::log_file(&pod, &ok),
        "hello-crisp",
        Duration::from_secs(10),
    )
    .await?;
    ensure!(
        line.stream == "stdout",
        "hello-crisp logged on {}, want stdout",
        line.stream
    );

    // A container that fails: its code and its stderr come back as they were.
    let bad = container_config("fail", BUSYBOX, &["sh", "-c", "echo bye-crisp >&2; exit 3"]);
    let bad_id = c.create_container(&pod_id, &bad, &pod).await?;
    c.start_container(&bad_id).await?;
    let st = c.wait_container_exit(&bad_id, EXIT_TIMEOUT).await?;
    ensure!(
        st.exit_code == 3,
        "fail: exit code {}, want 3 (reason {:?})",
        st.exit_code,
        st.reason
    );
    ensure!(
        st.reason == "Error",
        "fail: reason {:?}, want Error",
        st.reason
    );
    let line = cri::wait_log_line(
        &cri::log_file(&pod, &bad),
        "bye-crisp",
        Duration::from_secs(10),
    )
    .await?;
    ensure!(
        line.stream == "stderr",
        "bye-crisp logged on {}, want stderr",
        line.stream
    );

    c.remove_container(&ok_id).await?;
    c.stop_pod(&pod_id).await?;
    c.remove_pod(&pod_id).await?;
    let pods = c.list_pods().await?;
    ensure!(
        pods.is_empty(),
        "pods left after RemovePodSandbox: {pods:?}"
    );

    c.remove_image(BUSYBOX).await?;
    ensure!(
        c.image_status(BUSYBOX)
            .await
            .context("ImageStatus after RemoveImage")?
            .is_none(),
        "{BUSYBOX} still present"
    );
    Ok(())
}

/// One `#[tokio::test]` per runtime, named `<runtime>_<test>` so that
/// `cargo nextest run -p crisp-e2e containerd` selects the containerd ones.
macro_rules! per_runtime {
    ($($name:ident => $kind:expr),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> Result<()> {
            lifecycle($kind).await
        }
    )*};
}

per_runtime! {
    containerd_lifecycle => RuntimeKind::Containerd,
    crispd_lifecycle => RuntimeKind::Crispd,
}
