//! crispd's ExecSync, ContainerStats / ListContainerStats, UpdateContainerResources and
//! ReopenContainerLog, end to end through the CRI client with real containers (busybox under
//! runc, in a pod of crispd's own). Each test has its own crispd and ends with a full teardown
//! and leak check.
//!
//! - ExecSync: both streams and the exit code; the container's env and working dir; a timeout
//!   answers DeadlineExceeded and kills the command; 20 MB of output comes back capped at
//!   16 MiB without an error; a command that cannot start fails; empty cmd is
//!   InvalidArgument; no exec FIFO is left behind.
//! - Stats: a container holding 24 MiB and spinning a CPU shows a working set of at least
//!   that, CPU time and a nonzero CPU rate between two samples, page faults, its writable
//!   layer; an exited container has attributes but no cgroup figures; list filters by pod,
//!   id and label.
//! - UpdateContainerResources: a lower memory limit and a CPU quota land in the container's
//!   cgroup (memory.limit_in_bytes, cpu.cfs_quota_us) and in ContainerStatus; a limit below
//!   4 MiB is refused naming the field; an update of a created container applies at start.
//! - ReopenContainerLog: after kubelet-style rotation (rename), new lines go to a new file at
//!   the same path; an exited container is FailedPrecondition.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use crisp_e2e::cri::{self, container_config, expect_code, expect_exec, req};
use crisp_e2e::harness::{TestEnv, with_crispd};
use crisp_proto::cri::v1 as api;

const BUSYBOX: &str = "docker.io/library/busybox:latest";
const MIB: u64 = 1024 * 1024;

/// Entries left under crispd's exec FIFO directory.
fn exec_leftovers(state: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state.join("exec"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// ExecSync

async fn exec_sync(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    // Responses up to 16 MiB: more than tonic's default 4 MiB limit.
    let mut rt = c.runtime().max_decoding_message_size(32 << 20);
    let pod = env.pod_config("exec")?;
    let pod_id = c.run_pod(&pod).await?;
    let mut cfg = container_config("sleeper", BUSYBOX, &["sleep", "3600"]);
    cfg.envs.push(api::KeyValue {
        key: "FOO".into(),
        value: "bar-from-cri".into(),
    });
    cfg.working_dir = "/tmp".into();
    let id = c.run_container(&pod_id, &cfg, &pod).await?;

    // Both streams and the exit code.
    let r = c
        .exec_sync(&id, &["sh", "-c", "echo out; echo err >&2; exit 7"], 10)
        .await?;
    expect_exec("ExecSync(both streams)", &r, 7, "out\n", "err\n")?;

    // The container's own process settings.
    let out = c.exec_ok(&id, &["sh", "-c", "echo $FOO; pwd"]).await?;
    ensure!(out == "bar-from-cri\n/tmp\n", "env/cwd: {out:?}");

    // Timeout: DeadlineExceeded, soon, and the command is gone.
    let t0 = Instant::now();
    let r = rt.exec_sync(req::exec_sync(&id, &["sleep", "31"], 2)).await;
    expect_code(
        "ExecSync(timeout 2s)",
        r,
        tonic::Code::DeadlineExceeded,
        &["timeout"],
    )?;
    ensure!(
        t0.elapsed() < Duration::from_secs(15),
        "timed-out ExecSync took {:?}",
        t0.elapsed()
    );
    let ps = c.exec_ok(&id, &["ps", "-o", "pid,args"]).await?;
    ensure!(
        !ps.contains("sleep 31"),
        "the timed-out command still runs:\n{ps}"
    );

    // A caller whose own deadline passes first (kubelet and critest set the gRPC deadline to
    // the exec timeout): the command is gone by the time its next call runs.
    let mut request = tonic::Request::new(req::exec_sync(&id, &["sleep", "32"], 0));
    request.set_timeout(Duration::from_secs(1));
    let r = rt.exec_sync(request).await;
    ensure!(r.is_err(), "ExecSync past the caller's deadline succeeded");
    let ps = c.exec_ok(&id, &["ps", "-o", "pid,args"]).await?;
    ensure!(
        ps.contains("sleep 3600"),
        "ps does not show the container's own process:\n{ps}"
    );
    ensure!(
        !ps.contains("sleep 32"),
        "after the caller's deadline, the command still runs:\n{ps}"
    );

    // Concurrent calls (kubelet's probes overlap) each get their own output.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..8 {
        let c = c.clone();
        let id = id.clone();
        calls.spawn(async move {
            let cmd = format!("sleep 0.2; echo call-{i}");
            let out = c.exec_ok(&id, &["sh", "-c", &cmd]).await?;
            ensure!(out == format!("call-{i}\n"), "concurrent exec {i}: {out:?}");
            anyhow::Ok(())
        });
    }
    while let Some(r) = calls.join_next().await {
        r??;
    }

    // 20 MB of output: capped, dropped, no error; stderr still arrives.
    let r = rt
        .exec_sync(req::exec_sync(
            &id,
            &["sh", "-c", "head -c 20000000 /dev/zero; echo tail >&2"],
            60,
        ))
        .await
        .context("ExecSync with 20 MB of output")?
        .into_inner();
    ensure!(r.exit_code == 0, "big output: exit code {}", r.exit_code);
    let n = r.stdout.len() as u64;
    ensure!(
        (16 * MIB - 64 * 1024..=16 * MIB).contains(&n),
        "big output: {n} bytes of stdout, want just under 16 MiB"
    );
    ensure!(
        r.stdout.iter().all(|&b| b == 0),
        "big output: not the zeros written"
    );
    ensure!(
        r.stderr == b"tail\n",
        "big output: stderr {:?}",
        String::from_utf8_lossy(&r.stderr)
    );

    // A command that cannot start is an error, not a hang.
    let r = rt
        .exec_sync(req::exec_sync(&id, &["/no/such/binary"], 10))
        .await;
    match r {
        Err(_) => {}
        Ok(resp) => ensure!(
            resp.get_ref().exit_code != 0,
            "exec of a missing binary succeeded: {:?}",
            resp.into_inner()
        ),
    }

    // Empty cmd.
    let r = rt.exec_sync(req::exec_sync(&id, &[], 0)).await;
    expect_code(
        "ExecSync(no cmd)",
        r,
        tonic::Code::InvalidArgument,
        &["cmd"],
    )?;

    // Many in a row, each cleaned up.
    for i in 0..10 {
        let out = c.exec_ok(&id, &["echo", &format!("n{i}")]).await?;
        ensure!(out == format!("n{i}\n"), "exec {i}: {out:?}");
    }
    let left = exec_leftovers(&env.state);
    ensure!(left.is_empty(), "exec FIFOs left: {left:?}");

    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Stats

fn v(x: &Option<api::UInt64Value>) -> u64 {
    x.as_ref().map(|v| v.value).unwrap_or(0)
}

async fn stats_of(env: &TestEnv, id: &str) -> Result<api::ContainerStats> {
    env.cri()
        .runtime()
        .container_stats(api::ContainerStatsRequest {
            container_id: id.into(),
        })
        .await
        .with_context(|| format!("ContainerStats {id}"))?
        .into_inner()
        .stats
        .context("ContainerStats: no stats")
}

async fn list_stats(env: &TestEnv, filter: api::ContainerStatsFilter) -> Result<Vec<String>> {
    let mut ids: Vec<String> = env
        .cri()
        .runtime()
        .list_container_stats(api::ListContainerStatsRequest {
            filter: Some(filter),
        })
        .await
        .context("ListContainerStats")?
        .into_inner()
        .stats
        .into_iter()
        .filter_map(|s| s.attributes.map(|a| a.id))
        .collect();
    ids.sort();
    Ok(ids)
}

async fn stats(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    let pod = env.pod_config("stats")?;
    let pod_id = c.run_pod(&pod).await?;
    // 24 MiB held by dd (its buffer, stuck writing to a pipe nobody reads), a file in the
    // writable layer, and one CPU kept busy.
    let mut busy = container_config(
        "busy",
        BUSYBOX,
        &[
            "sh",
            "-c",
            "dd if=/dev/zero bs=24M count=1 2>/dev/null | sleep 3600 & \
             echo data > /written-by-test; while :; do :; done",
        ],
    );
    busy.labels.insert("role".into(), "busy".into());
    let busy_id = c.run_container(&pod_id, &busy, &pod).await?;
    let done = container_config("done", BUSYBOX, &["true"]);
    let done_id = c.run_container(&pod_id, &done, &pod).await?;
    c.wait_container_exit(&done_id, Duration::from_secs(60))
        .await?;

    // The memory shows once dd has filled its buffer.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let s = stats_of(env, &busy_id).await?;
        let ws = s
            .memory
            .as_ref()
            .map(|m| v(&m.working_set_bytes))
            .unwrap_or(0);
        if ws >= 20 * MIB {
            break s;
        }
        if Instant::now() > deadline {
            bail!("working set stayed at {ws} bytes (< 20 MiB): {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let attrs = first.attributes.clone().context("attributes")?;
    ensure!(attrs.id == busy_id, "attributes id {}", attrs.id);
    ensure!(
        attrs.metadata.as_ref().map(|m| m.name.as_str()) == Some("busy"),
        "attributes metadata {:?}",
        attrs.metadata
    );
    ensure!(
        attrs.labels.get("role").map(String::as_str) == Some("busy"),
        "labels {:?}",
        attrs.labels
    );
    let mem = first.memory.context("memory")?;
    ensure!(
        v(&mem.usage_bytes) >= v(&mem.working_set_bytes),
        "usage < working set: {mem:?}"
    );
    ensure!(v(&mem.rss_bytes) >= 20 * MIB, "rss {}", v(&mem.rss_bytes));
    ensure!(v(&mem.page_faults) > 0, "no page faults: {mem:?}");
    ensure!(mem.timestamp > 0, "memory timestamp");
    let cpu = first.cpu.context("cpu")?;
    ensure!(v(&cpu.usage_core_nano_seconds) > 0, "no CPU time: {cpu:?}");
    let layer = first.writable_layer.clone().context("writable layer")?;
    ensure!(
        v(&layer.used_bytes) > 0,
        "writable layer used bytes: {layer:?}"
    );
    ensure!(
        v(&layer.inodes_used) >= 1,
        "writable layer inodes: {layer:?}"
    );

    // The rate between two samples a second apart: the spinning shell is most of a core.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = stats_of(env, &busy_id).await?;
    let cpu2 = second.cpu.context("cpu")?;
    ensure!(
        v(&cpu2.usage_core_nano_seconds) > v(&cpu.usage_core_nano_seconds),
        "CPU time did not grow: {cpu:?} then {cpu2:?}"
    );
    let rate = v(&cpu2.usage_nano_cores);
    ensure!(
        rate > 50_000_000,
        "usage_nano_cores {rate}, want a busy core's worth"
    );

    // Exited: attributes, no cgroup figures.
    let s = stats_of(env, &done_id).await?;
    ensure!(
        s.attributes.map(|a| a.id) == Some(done_id.clone()),
        "exited attributes"
    );
    ensure!(
        s.cpu.is_none() && s.memory.is_none(),
        "exited container has cgroup stats"
    );

    // Filters.
    let mut both = vec![busy_id.clone(), done_id.clone()];
    both.sort();
    let by_pod = list_stats(
        env,
        api::ContainerStatsFilter {
            pod_sandbox_id: pod_id.clone(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(by_pod == both, "by pod: {by_pod:?}, want {both:?}");
    let by_id = list_stats(
        env,
        api::ContainerStatsFilter {
            id: done_id.clone(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(by_id == vec![done_id.clone()], "by id: {by_id:?}");
    let by_label = list_stats(
        env,
        api::ContainerStatsFilter {
            label_selector: [("role".to_string(), "busy".to_string())].into(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(by_label == vec![busy_id.clone()], "by label: {by_label:?}");

    let r = c
        .runtime()
        .container_stats(api::ContainerStatsRequest {
            container_id: cri::random_hex(64),
        })
        .await;
    expect_code("ContainerStats(unknown)", r, tonic::Code::NotFound, &[])?;

    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// UpdateContainerResources

/// The host directory of the container's cgroup in a v1 `controller`, from where an exec in
/// the container sits (runc puts execs in the container's cgroup).
async fn cgroup_dir(env: &TestEnv, id: &str, controller: &str) -> Result<PathBuf> {
    let text = env.cri().exec_ok(id, &["cat", "/proc/self/cgroup"]).await?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next(), parts.next(), parts.next());
        let (Some(ctrls), Some(path)) = (ctrls, path) else {
            continue;
        };
        if ctrls.split(',').any(|c| c == controller) {
            let dir = Path::new("/sys/fs/cgroup")
                .join(ctrls)
                .join(path.trim_start_matches('/'));
            let dir = if dir.is_dir() {
                dir
            } else {
                // Co-mounted controllers are also reachable by one name (cpu,cpuacct → cpu).
                Path::new("/sys/fs/cgroup")
                    .join(controller)
                    .join(path.trim_start_matches('/'))
            };
            ensure!(dir.is_dir(), "cgroup dir {} missing", dir.display());
            return Ok(dir);
        }
    }
    bail!("no {controller} cgroup in {text:?}")
}

fn read_num(p: &Path) -> Result<i64> {
    std::fs::read_to_string(p)
        .with_context(|| format!("reading {}", p.display()))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {}", p.display()))
}

fn memory_limit(limit: i64) -> api::LinuxContainerResources {
    api::LinuxContainerResources {
        memory_limit_in_bytes: limit,
        ..Default::default()
    }
}

async fn update(
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

async fn update_resources(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    let pod = env.pod_config("update")?;
    let pod_id = c.run_pod(&pod).await?;
    let mut cfg = container_config("limited", BUSYBOX, &["sleep", "3600"]);
    cfg.linux = Some(api::LinuxContainerConfig {
        resources: Some(memory_limit(256 * MIB as i64)),
        ..Default::default()
    });
    let id = c.run_container(&pod_id, &cfg, &pod).await?;
    let mem = cgroup_dir(env, &id, "memory").await?;
    let cpu = cgroup_dir(env, &id, "cpu").await?;
    let limit = read_num(&mem.join("memory.limit_in_bytes"))?;
    ensure!(limit == 256 * MIB as i64, "initial memory limit {limit}");

    // Lower the memory limit, set a CPU quota.
    update(
        env,
        &id,
        api::LinuxContainerResources {
            memory_limit_in_bytes: 64 * MIB as i64,
            cpu_period: 100_000,
            cpu_quota: 50_000,
            ..Default::default()
        },
    )
    .await
    .map_err(|s| anyhow::anyhow!("UpdateContainerResources: {:?} {}", s.code(), s.message()))?;
    let limit = read_num(&mem.join("memory.limit_in_bytes"))?;
    ensure!(
        limit == 64 * MIB as i64,
        "memory.limit_in_bytes {limit} after update, want 64 MiB"
    );
    let quota = read_num(&cpu.join("cpu.cfs_quota_us"))?;
    ensure!(quota == 50_000, "cpu.cfs_quota_us {quota} after update");
    let st = c.container_status(&id).await?;
    let got = st
        .resources
        .and_then(|r| r.linux)
        .map(|l| (l.memory_limit_in_bytes, l.cpu_quota));
    ensure!(
        got == Some((64 * MIB as i64, 50_000)),
        "ContainerStatus resources {got:?}, want the updated ones"
    );

    // Refused, naming the field; nothing changes.
    expect_code(
        "UpdateContainerResources(1 MiB)",
        update(env, &id, memory_limit(MIB as i64)).await,
        tonic::Code::InvalidArgument,
        &["memory_limit_in_bytes"],
    )?;
    let limit = read_num(&mem.join("memory.limit_in_bytes"))?;
    ensure!(
        limit == 64 * MIB as i64,
        "a refused update changed the limit to {limit}"
    );

    // A created container: the update applies when it starts.
    let created = c
        .create_container(
            &pod_id,
            &container_config("later", BUSYBOX, &["sleep", "3600"]),
            &pod,
        )
        .await?;
    update(env, &created, memory_limit(32 * MIB as i64))
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "update of a created container: {:?} {}",
                s.code(),
                s.message()
            )
        })?;
    c.start_container(&created).await?;
    let mem2 = cgroup_dir(env, &created, "memory").await?;
    let limit = read_num(&mem2.join("memory.limit_in_bytes"))?;
    ensure!(
        limit == 32 * MIB as i64,
        "created-then-updated container started with limit {limit}"
    );

    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// ReopenContainerLog

/// Waits until `path` holds at least one complete `line-N` record; returns them all.
async fn wait_talk(path: &Path, timeout: Duration) -> Result<Vec<cri::LogLine>> {
    let deadline = Instant::now() + timeout;
    loop {
        if path.exists() {
            let lines: Vec<cri::LogLine> = cri::read_log(path)?
                .into_iter()
                .filter(|l| !l.partial && l.text.starts_with("line-"))
                .collect();
            if !lines.is_empty() {
                return Ok(lines);
            }
        }
        if Instant::now() >= deadline {
            bail!("{} has no line-N record after {timeout:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn reopen_log(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    let pod = env.pod_config("reopen")?;
    let pod_id = c.run_pod(&pod).await?;
    let cfg = container_config(
        "talker",
        BUSYBOX,
        &[
            "sh",
            "-c",
            "i=0; while :; do echo line-$i; i=$((i+1)); sleep 0.2; done",
        ],
    );
    let id = c.run_container(&pod_id, &cfg, &pod).await?;
    let log = cri::log_file(&pod, &cfg);
    wait_talk(&log, Duration::from_secs(20)).await?;

    // kubelet's rotation: rename, then ReopenContainerLog.
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated)?;
    c.runtime()
        .reopen_container_log(api::ReopenContainerLogRequest {
            container_id: id.clone(),
        })
        .await
        .context("ReopenContainerLog")?;
    let new = wait_talk(&log, Duration::from_secs(20)).await?;
    ensure!(
        new[0].stream == "stdout",
        "new log line on {}",
        new[0].stream
    );
    let old = cri::read_log(&rotated)?;
    ensure!(!old.is_empty(), "the rotated file lost its lines");
    // The new file continues where the old one stopped: no line is in both.
    let last_old = old.last().map(|l| l.text.clone()).unwrap_or_default();
    ensure!(
        !new.iter().any(|l| l.text == last_old),
        "{last_old:?} is in both files"
    );

    c.stop_container(&id, 0).await?;
    c.wait_container_exit(&id, Duration::from_secs(30)).await?;
    expect_code(
        "ReopenContainerLog(exited)",
        c.runtime()
            .reopen_container_log(api::ReopenContainerLogRequest {
                container_id: id.clone(),
            })
            .await,
        tonic::Code::FailedPrecondition,
        &["running"],
    )?;

    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------

mod crispd {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exec_sync() -> Result<()> {
        with_crispd("exec_sync", |_| Ok(()), |e| Box::pin(super::exec_sync(e))).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stats() -> Result<()> {
        with_crispd("stats", |_| Ok(()), |e| Box::pin(super::stats(e))).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn update_resources() -> Result<()> {
        with_crispd(
            "update_resources",
            |_| Ok(()),
            |e| Box::pin(super::update_resources(e)),
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_log() -> Result<()> {
        with_crispd("reopen_log", |_| Ok(()), |e| Box::pin(super::reopen_log(e))).await
    }
}
