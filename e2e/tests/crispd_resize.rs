//! In-place pod resize end to end through the CRI with real runc containers on this host's
//! cgroup v1 (v2 is covered by crisp-cri's unit tests over a fake cgroup root):
//!
//! - UpdateContainerResources on a running container: new memory and CPU limits land in its
//!   cgroup (memory.limit_in_bytes, cpu.cfs_quota_us, cpu.shares) and ContainerStatus reports
//!   them as read back from there;
//! - UpdatePodSandboxResources: resources plus overhead land in the pod-level cgroup (the
//!   pod's cgroup parent, as kubelet makes one per pod);
//! - a memory limit below what the container or the pod uses now is refused with
//!   FailedPrecondition naming the value and the usage, the old limit stays and the
//!   container keeps running (no OOM kill);
//! - an unknown pod is NotFound.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use crisp_e2e::cri::{self, container_config, expect_code, expect_ok};
use crisp_e2e::harness::{TestEnv, with_crispd};
use crisp_proto::cri::v1 as api;

const BUSYBOX: &str = "docker.io/library/busybox:latest";
const MIB: i64 = 1024 * 1024;

/// The directory of cgroup `rel` in the v1 hierarchy holding `controller`.
fn v1_dir(controller: &str, rel: &str) -> Result<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    ensure!(
        !root.join("cgroup.controllers").exists(),
        "this test checks cgroup v1 files; /sys/fs/cgroup is cgroup v2 here"
    );
    let direct = root.join(controller);
    let base = if direct.is_dir() {
        direct
    } else {
        std::fs::read_dir(root)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.split(',').any(|c| c == controller))
            })
            .with_context(|| format!("no cgroup v1 {controller} hierarchy under {root:?}"))?
    };
    Ok(base.join(rel.trim_start_matches('/')))
}

fn read_num(dir: &Path, file: &str) -> Result<i64> {
    let p = dir.join(file);
    std::fs::read_to_string(&p)
        .with_context(|| format!("reading {}", p.display()))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {}", p.display()))
}

async fn status_resources(env: &TestEnv, id: &str) -> Result<api::LinuxContainerResources> {
    env.cri()
        .container_status(id)
        .await?
        .resources
        .and_then(|r| r.linux)
        .context("ContainerStatus has no linux resources")
}

async fn update_container(
    env: &TestEnv,
    id: &str,
    r: api::LinuxContainerResources,
) -> std::result::Result<tonic::Response<api::UpdateContainerResourcesResponse>, tonic::Status> {
    env.cri()
        .runtime()
        .update_container_resources(api::UpdateContainerResourcesRequest {
            container_id: id.into(),
            linux: Some(r),
            ..Default::default()
        })
        .await
}

async fn update_pod(
    env: &TestEnv,
    id: &str,
    resources: api::LinuxContainerResources,
    overhead: Option<api::LinuxContainerResources>,
) -> std::result::Result<tonic::Response<api::UpdatePodSandboxResourcesResponse>, tonic::Status> {
    env.cri()
        .runtime()
        .update_pod_sandbox_resources(api::UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: id.into(),
            resources: Some(resources),
            overhead,
        })
        .await
}

/// Wait until the cgroup's memory use reaches `at_least` (the container filling its buffer).
async fn wait_usage(mem_dir: &Path, at_least: i64) -> Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let u = read_num(mem_dir, "memory.usage_in_bytes")?;
        if u >= at_least {
            return Ok(u);
        }
        if Instant::now() > deadline {
            bail!("{} uses {u} bytes, want >= {at_least}", mem_dir.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn resize(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    // One cgroup per pod under the test's parent, as kubelet gives each pod.
    let pod_cgroup = format!("{}/pod-{}", env.cgroup_parent, cri::random_hex(8));
    let mut pod = env.pod_config("resize")?;
    pod.linux.get_or_insert_with(Default::default).cgroup_parent = pod_cgroup.clone();
    let pod_id = c.run_pod(&pod).await?;
    let outcome = resize_in(env, &pod, &pod_id, &pod_cgroup).await;
    c.stop_and_remove_pod(&pod_id).await?;
    // kubelet removes the pod cgroups it made; here the test does.
    for ctrl in [
        "memory", "cpu", "cpuacct", "pids", "cpuset", "blkio", "devices", "freezer",
    ] {
        if let Ok(d) = v1_dir(ctrl, &pod_cgroup) {
            let _ = std::fs::remove_dir(d);
        }
    }
    outcome
}

async fn resize_in(
    env: &TestEnv,
    pod: &api::PodSandboxConfig,
    pod_id: &str,
    pod_cgroup: &str,
) -> Result<()> {
    let c = env.cri();
    // 24 MiB held by dd's buffer (stuck writing to a pipe nobody reads).
    let mut app = container_config(
        "app",
        BUSYBOX,
        &[
            "sh",
            "-c",
            "dd if=/dev/zero bs=24M count=1 2>/dev/null | sleep 3600 & while :; do sleep 1; done",
        ],
    );
    app.linux = Some(api::LinuxContainerConfig {
        resources: Some(api::LinuxContainerResources {
            memory_limit_in_bytes: 128 * MIB,
            cpu_shares: 512,
            cpu_quota: 50_000,
            cpu_period: 100_000,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = c.run_container(pod_id, &app, pod).await?;
    let ctr_cgroup = format!("{pod_cgroup}/crisp-{id}");
    let mem = v1_dir("memory", &ctr_cgroup)?;
    let cpu = v1_dir("cpu", &ctr_cgroup)?;
    let usage = wait_usage(&mem, 20 * MIB).await?;
    ensure!(
        read_num(&mem, "memory.limit_in_bytes")? == 128 * MIB,
        "initial limit"
    );

    // Grow CPU, lower memory while it runs: in the cgroup and in the status.
    expect_ok(
        "UpdateContainerResources(96 MiB, 1.5 CPU, 768 shares)",
        update_container(
            env,
            &id,
            api::LinuxContainerResources {
                memory_limit_in_bytes: 96 * MIB,
                cpu_quota: 150_000,
                cpu_shares: 768,
                ..Default::default()
            },
        )
        .await,
    )?;
    ensure!(
        read_num(&mem, "memory.limit_in_bytes")? == 96 * MIB,
        "memory.limit_in_bytes"
    );
    ensure!(
        read_num(&cpu, "cpu.cfs_quota_us")? == 150_000,
        "cpu.cfs_quota_us"
    );
    ensure!(read_num(&cpu, "cpu.shares")? == 768, "cpu.shares");
    let st = status_resources(env, &id).await?;
    ensure!(
        (
            st.memory_limit_in_bytes,
            st.cpu_quota,
            st.cpu_period,
            st.cpu_shares
        ) == (96 * MIB, 150_000, 100_000, 768),
        "ContainerStatus.resources after the update: {st:?}"
    );

    // The status is read back from the cgroup: a change made behind crispd's back shows.
    std::fs::write(cpu.join("cpu.cfs_quota_us"), "120000").context("writing cpu.cfs_quota_us")?;
    let st = status_resources(env, &id).await?;
    ensure!(
        st.cpu_quota == 120_000,
        "status does not read the cgroup back: {st:?}"
    );

    // Below what it uses: refused, naming the value and the usage; nothing changed, and the
    // container is alive.
    let r = update_container(
        env,
        &id,
        api::LinuxContainerResources {
            memory_limit_in_bytes: 8 * MIB,
            ..Default::default()
        },
    )
    .await;
    expect_code(
        "UpdateContainerResources(8 MiB < usage)",
        r,
        tonic::Code::FailedPrecondition,
        &["memory_limit_in_bytes", "8388608", "uses now"],
    )?;
    ensure!(
        read_num(&mem, "memory.limit_in_bytes")? == 96 * MIB,
        "limit changed"
    );
    let st = c.container_status(&id).await?;
    ensure!(
        st.state == api::ContainerState::ContainerRunning as i32,
        "the container is not running after a refused shrink: {st:?}"
    );
    ensure!(
        st.resources
            .and_then(|r| r.linux)
            .map(|l| l.memory_limit_in_bytes)
            == Some(96 * MIB),
        "status after a refused shrink"
    );

    resize_pod(env, pod_id, pod_cgroup, usage).await
}

async fn resize_pod(env: &TestEnv, pod_id: &str, pod_cgroup: &str, usage: i64) -> Result<()> {
    let pod_mem = v1_dir("memory", pod_cgroup)?;
    let pod_cpu = v1_dir("cpu", pod_cgroup)?;
    let resources = api::LinuxContainerResources {
        memory_limit_in_bytes: 200 * MIB,
        cpu_quota: 200_000,
        cpu_period: 100_000,
        cpu_shares: 1024,
        ..Default::default()
    };
    let overhead = api::LinuxContainerResources {
        memory_limit_in_bytes: 10 * MIB,
        cpu_quota: 10_000,
        cpu_shares: 24,
        ..Default::default()
    };
    expect_ok(
        "UpdatePodSandboxResources(200 MiB + 10 MiB overhead, 2 + 0.1 CPU)",
        update_pod(env, pod_id, resources.clone(), Some(overhead)).await,
    )?;
    ensure!(
        read_num(&pod_mem, "memory.limit_in_bytes")? == 210 * MIB,
        "pod memory.limit_in_bytes"
    );
    ensure!(
        read_num(&pod_cpu, "cpu.cfs_quota_us")? == 210_000,
        "pod cpu.cfs_quota_us"
    );
    ensure!(read_num(&pod_cpu, "cpu.shares")? == 1048, "pod cpu.shares");

    // Shrink the pod below what its container holds: refused, unchanged.
    let r = update_pod(
        env,
        pod_id,
        api::LinuxContainerResources {
            memory_limit_in_bytes: usage / 2,
            ..Default::default()
        },
        None,
    )
    .await;
    expect_code(
        "UpdatePodSandboxResources(below usage)",
        r,
        tonic::Code::FailedPrecondition,
        &[
            "memory_limit_in_bytes",
            &(usage / 2).to_string(),
            "uses now",
        ],
    )?;
    ensure!(
        read_num(&pod_mem, "memory.limit_in_bytes")? == 210 * MIB,
        "pod limit changed by a refused shrink"
    );

    let r = update_pod(env, &cri::random_hex(64), resources, None).await;
    expect_code(
        "UpdatePodSandboxResources(unknown)",
        r,
        tonic::Code::NotFound,
        &[],
    )?;
    Ok(())
}

mod crispd {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resize() -> Result<()> {
        with_crispd("resize", |_| Ok(()), |e| Box::pin(super::resize(e))).await
    }
}
