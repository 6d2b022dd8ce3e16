//! CDI devices end to end through CRI with runc: crispd reads the CDI spec files of the
//! directory its config names (`cdi_spec_dirs`, here the test's own) and applies a device's
//! container edits.
//!
//! - A YAML spec adds a device node `/dev/crisp-null` with /dev/null's numbers (1:3), a bind
//!   mount of a host directory and an environment variable; a container asking for
//!   `crisp.test/dev=null0` in `cdi_devices` sees the node (character device 1:3, writable:
//!   the device cgroup lets it through), the mounted file, and the variable in its
//!   command's environment (printed to its log). The same device named by a `cdi.k8s.io/` annotation works as well.
//! - A container asking for an unknown device is FailedPrecondition naming the device and the
//!   directory searched; a broken spec file is FailedPrecondition naming the device and the
//!   file. Neither leaves a container.

use anyhow::{Result, ensure};
use crisp_e2e::cri::{self, container_config, expect_code};
use crisp_e2e::harness::{RuntimeKind, TestEnv};
use crisp_e2e::registry::Registry;
use crisp_proto::cri::v1 as api;

const BUSYBOX: &str = "docker.io/library/busybox:latest";
const PRINT_ENV: &[&str] = &["sh", "-c", "echo cdi=$CRISP_CDI; exec sleep 3600"];

fn spec_yaml(share: &std::path::Path) -> String {
    format!(
        r#"cdiVersion: "0.6.0"
kind: crisp.test/dev
devices:
  - name: null0
    containerEdits:
      env:
        - CRISP_CDI=null0
      deviceNodes:
        - path: /dev/crisp-null
          hostPath: /dev/null
      mounts:
        - hostPath: {}
          containerPath: /cdi-share
          options: ["ro", "rbind"]
"#,
        share.display()
    )
}

async fn check_device(env: &TestEnv, id: &str, log: &std::path::Path) -> Result<()> {
    let c = env.cri();
    let st = c
        .exec_ok(id, &["stat", "-c", "%F %t:%T", "/dev/crisp-null"])
        .await?;
    ensure!(
        st.trim() == "character special file 1:3",
        "/dev/crisp-null in the container: {st:?}, want a char device 1:3"
    );
    c.exec_ok(id, &["sh", "-c", "echo x > /dev/crisp-null"])
        .await?;
    let f = c.exec_ok(id, &["cat", "/cdi-share/hello"]).await?;
    ensure!(f == "from the host\n", "/cdi-share/hello reads {f:?}");
    // The variable is in the container's own environment: its command printed it.
    cri::wait_log_line(log, "cdi=null0", std::time::Duration::from_secs(10)).await?;
    Ok(())
}

async fn refused(
    env: &TestEnv,
    pod: &str,
    cfg: &api::PodSandboxConfig,
    device: &str,
    names: &[&str],
) -> Result<()> {
    let mut cc = container_config(&format!("bad-{}", cri::random_hex(4)), BUSYBOX, &["true"]);
    cc.cdi_devices = vec![api::CdiDevice {
        name: device.into(),
    }];
    let r = env
        .cri()
        .runtime()
        .create_container(cri::req::create_container(pod, &cc, cfg))
        .await;
    expect_code(
        &format!("CDI device {device}"),
        r,
        tonic::Code::FailedPrecondition,
        names,
    )
}

async fn scenario(env: &TestEnv, dir: &std::path::Path) -> Result<()> {
    let c = env.cri();
    c.pull(BUSYBOX, None).await?;
    let cfg = env.pod_config("cdi")?;
    let pod = c.run_pod(&cfg).await?;

    let mut cc = container_config("gpu", BUSYBOX, PRINT_ENV);
    cc.cdi_devices = vec![api::CdiDevice {
        name: "crisp.test/dev=null0".into(),
    }];
    let id = c.run_container(&pod, &cc, &cfg).await?;
    check_device(env, &id, &cri::log_file(&cfg, &cc)).await?;

    let mut by_annotation = container_config("annotated", BUSYBOX, PRINT_ENV);
    by_annotation.annotations.insert(
        "cdi.k8s.io/test-plugin".into(),
        "crisp.test/dev=null0".into(),
    );
    let id2 = c.run_container(&pod, &by_annotation, &cfg).await?;
    check_device(env, &id2, &cri::log_file(&cfg, &by_annotation)).await?;

    let count = c.list_containers(None).await?.len();
    let dir_name = dir.display().to_string();
    refused(
        env,
        &pod,
        &cfg,
        "crisp.test/dev=nope",
        &["crisp.test/dev=nope", &dir_name],
    )
    .await?;
    let broken = dir.join("broken.json");
    std::fs::write(&broken, "{ not json")?;
    refused(
        env,
        &pod,
        &cfg,
        "crisp.test/dev=null0",
        &["crisp.test/dev=null0", &broken.display().to_string()],
    )
    .await?;
    std::fs::remove_file(&broken)?;
    ensure!(
        c.list_containers(None).await?.len() == count,
        "refused creates left containers"
    );
    c.stop_and_remove_pod(&pod).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crispd_cdi_device_node_mount_env_and_unknown_device() -> Result<()> {
    let registry = Registry::start()?;
    registry.push(&["busybox"])?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("cdi");
    let share = tmp.path().join("share");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(&share)?;
    std::fs::write(share.join("hello"), "from the host\n")?;
    std::fs::write(dir.join("crisp-test.yaml"), spec_yaml(&share))?;
    let env = TestEnv::builder(RuntimeKind::Crispd)
        .mirror(registry.host())
        .crispd_config(format!("cdi_spec_dirs = [\"{}\"]\n", dir.display()))
        .start()
        .await?;
    let outcome = scenario(&env, &dir).await;
    env.finish("crispd", outcome).await
}
