//! Start-up order (promise 4), end to end: crispd starts with an empty CNI config directory
//! and a runtime handler whose binary does not exist. Neither is fatal:
//! - Status: RuntimeReady=true, NetworkReady=false with reason NetworkPluginNotReady;
//! - RunPodSandbox fails with FailedPrecondition naming the CNI directory;
//! - RunPodSandbox with the ghost handler fails with FailedPrecondition naming its binary;
//! - once the conflist is written, within 5 s and without a restart, NetworkReady=true and a
//!   pod runs a container (same crispd pid throughout).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use crisp_e2e::cri::{self, container_config};
use crisp_e2e::harness::{RuntimeKind, TestEnv};
use crisp_e2e::registry::Registry;
use crisp_proto::cri::v1 as api;

const BUSYBOX: &str = "docker.io/library/busybox:latest";
const GHOST_BINARY: &str = "/nonexistent/crisp-e2e-ghost-runtime";

/// The failure of a RunPodSandbox that must not succeed: its gRPC code and message.
async fn refused(
    env: &TestEnv,
    pod: &api::PodSandboxConfig,
    handler: &str,
) -> Result<(tonic::Code, String)> {
    match env
        .cri()
        .runtime()
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: handler.into(),
        })
        .await
    {
        Ok(r) => bail!(
            "RunPodSandbox (handler {handler:?}) succeeded: {:?}",
            r.into_inner().pod_sandbox_id
        ),
        Err(s) => Ok((s.code(), s.message().to_string())),
    }
}

async fn scenario(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    let pid = env.daemon_pid().context("crispd not running")?;
    c.pull(BUSYBOX, None).await?;

    let st = c.status().await?;
    let runtime = cri::condition(&st, "RuntimeReady").context("Status has no RuntimeReady")?;
    ensure!(
        runtime.status,
        "RuntimeReady false without a CNI config: {runtime:?}"
    );
    let net = cri::condition(&st, "NetworkReady").context("Status has no NetworkReady")?;
    ensure!(
        !net.status,
        "NetworkReady true with an empty CNI directory: {net:?}"
    );
    ensure!(
        net.reason == "NetworkPluginNotReady",
        "NetworkReady reason {:?}, want NetworkPluginNotReady",
        net.reason
    );

    let pod = env.pod_config("order")?;
    let cni_dir = env.cni_conf_dir.display().to_string();
    let (code, msg) = refused(env, &pod, "").await?;
    ensure!(
        code == tonic::Code::FailedPrecondition && msg.contains(&cni_dir),
        "RunPodSandbox without CNI config: {code:?} {msg:?}, want FailedPrecondition naming {cni_dir}"
    );
    let (code, msg) = refused(env, &pod, "ghost").await?;
    ensure!(
        code == tonic::Code::FailedPrecondition && msg.contains(GHOST_BINARY),
        "RunPodSandbox with handler ghost: {code:?} {msg:?}, want FailedPrecondition naming {GHOST_BINARY}"
    );
    ensure!(
        c.list_pods().await?.is_empty(),
        "refused RunPodSandbox calls left pods"
    );

    // The network daemonset writes its conflist: picked up without a restart.
    let written = Instant::now();
    env.write_cni_config()?;
    loop {
        let st = c.status().await?;
        let net = cri::condition(&st, "NetworkReady").context("Status has no NetworkReady")?;
        if net.status {
            break;
        }
        if written.elapsed() > Duration::from_secs(5) {
            bail!("NetworkReady still false 5 s after the conflist was written: {net:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("NetworkReady after {:?}", written.elapsed());
    let pod_id = c.run_pod(&pod).await?;
    let cfg = container_config("hello", BUSYBOX, &["sh", "-c", "echo up-after-cni"]);
    let id = c.create_container(&pod_id, &cfg, &pod).await?;
    c.start_container(&id).await?;
    let st = c.wait_container_exit(&id, Duration::from_secs(60)).await?;
    ensure!(
        st.exit_code == 0,
        "container exit code {} ({:?})",
        st.exit_code,
        st.reason
    );
    cri::wait_log_line(
        &cri::log_file(&pod, &cfg),
        "up-after-cni",
        Duration::from_secs(10),
    )
    .await?;
    ensure!(
        c.pod_ip(&pod_id).await.is_ok(),
        "the pod has no IP from the late conflist"
    );

    // The ghost handler is still refused, by its binary, after the network came up.
    let other = env.pod_config("order-ghost")?;
    let (code, msg) = refused(env, &other, "ghost").await?;
    ensure!(
        code == tonic::Code::FailedPrecondition && msg.contains(GHOST_BINARY),
        "ghost handler after CNI: {code:?} {msg:?}"
    );
    ensure!(env.daemon_pid() == Some(pid), "crispd was restarted");
    ensure!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok(),
        "crispd (pid {pid}) is gone"
    );
    c.stop_pod(&pod_id).await?;
    c.remove_pod(&pod_id).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crispd_startup_order() -> Result<()> {
    let t0 = Instant::now();
    let registry = Registry::start()?;
    registry.push(&["busybox", "pause"])?;
    let env = TestEnv::builder(RuntimeKind::Crispd)
        .mirror(registry.host())
        .without_cni_config()
        .crispd_config(format!(
            "[runtime_handlers.ghost]\nbinary = \"{GHOST_BINARY}\"\n"
        ))
        .start()
        .await?;
    let outcome = scenario(&env).await;
    if outcome.is_err() {
        eprintln!("crispd log tail:\n{}", env.daemon_log_tail(60));
    }
    let leaks = env.teardown().await;
    eprintln!("crispd_startup_order: {:?}", t0.elapsed());
    outcome?;
    ensure!(leaks.is_empty(), "teardown left {leaks:#?}");
    Ok(())
}
