//! crispd's RuntimeService, call by call, with its error cases, end to end through the CRI
//! client with real containers. Each test has its own crispd (root, socket, cgroup parent,
//! bridge) and ends with a full teardown and leak check.
//!
//! - unknown ids: NotFound for every call that reads or changes a pod or container; OK for
//!   the stops and removals (CRI makes them idempotent; kubelet retries them and treats
//!   "already gone" as done);
//! - wrong state: FailedPrecondition (StartContainer twice, CreateContainer in a stopped pod,
//!   ExecSync in an exited container);
//! - bad config: InvalidArgument whose message names the field;
//! - name reuse: AlreadyExists, for pods and for containers;
//! - ContainerStatus: reasons Completed / Error / OOMKilled, exit codes, ordered timestamps;
//! - ListPodSandbox / ListContainers filters (id, state, labels, pod), and CRI 1.36's Stream*
//!   calls (pods, containers, their stats, images) streaming what the List calls list;
//! - Status / Version / RuntimeConfig;
//! - StopContainer: the image's StopSignal is sent first (the config's `stop_signal` over it),
//!   a process that ignores it is killed after the timeout, and ContainerStatus.stop_signal
//!   reports the signal that is sent (KEP-4960);
//! - Exec / Attach / PortForward: validated before a URL is handed out (InvalidArgument
//!   naming the field, NotFound, FailedPrecondition); UpdateRuntimeConfig accepted;
//! - GetContainerEvents: created, started, stopped, deleted, in order, with the pod status;
//! - concurrent retries of one RunPodSandbox all get the first one's pod;
//! - PodSandboxStatus (state, times, metadata, labels, annotations, IP, namespaces, verbose);
//! - PID namespace CONTAINER (own PID 1) and POD (pause is PID 1).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use crisp_e2e::cri::{self, container_config, expect_code, expect_ok, req};
use crisp_e2e::harness::{TestEnv, with_crispd};
use crisp_e2e::registry::Registry;
use crisp_proto::cri::v1 as api;
use sha2::Digest;

const BUSYBOX: &str = "docker.io/library/busybox:latest";
/// busybox with `StopSignal: SIGUSR1` in its config, built by [`push_stopsignal_image`].
const STOPSIG_IMAGE: &str = "docker.io/library/stopsignal:latest";
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a test needs in its registry beyond busybox and pause.
fn prepare(name: &str, registry: &Registry) -> Result<()> {
    if name == "stop_signal" {
        push_stopsignal_image(registry)?;
    }
    Ok(())
}

/// A random id of the length runtimes use (64 hex), which no runtime has.
fn ghost_id() -> String {
    cri::random_hex(64)
}

fn sleeper(name: &str) -> api::ContainerConfig {
    container_config(name, BUSYBOX, &["sleep", "3600"])
}

// ---------------------------------------------------------------------------------------
// Unknown ids

async fn unknown_ids(env: &TestEnv) -> Result<()> {
    use tonic::Code::NotFound;
    let c = env.cri();
    let mut rt = c.runtime();
    let id = ghost_id();
    // A real pod, so CreateContainer's failure is about the unknown pod id and nothing else.
    let pod = env.pod_config("ghosts")?;

    expect_code(
        "PodSandboxStatus(unknown)",
        rt.pod_sandbox_status(req::pod_status(&id)).await,
        NotFound,
        &[&id],
    )?;
    expect_code(
        "ContainerStatus(unknown)",
        rt.container_status(req::container_status(&id)).await,
        NotFound,
        &[&id],
    )?;
    expect_code(
        "StartContainer(unknown)",
        rt.start_container(req::start_container(&id)).await,
        NotFound,
        &[&id],
    )?;
    expect_code(
        "ExecSync(unknown)",
        rt.exec_sync(req::exec_sync(&id, &["true"], 5)).await,
        NotFound,
        &[&id],
    )?;
    expect_code(
        "ContainerStats(unknown)",
        rt.container_stats(api::ContainerStatsRequest {
            container_id: id.clone(),
        })
        .await,
        NotFound,
        &[&id],
    )?;
    expect_code(
        "UpdateContainerResources(unknown)",
        rt.update_container_resources(api::UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(api::LinuxContainerResources {
                cpu_shares: 512,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await,
        NotFound,
        &[&id],
    )?;
    expect_code(
        "ReopenContainerLog(unknown)",
        rt.reopen_container_log(api::ReopenContainerLogRequest {
            container_id: id.clone(),
        })
        .await,
        NotFound,
        &[&id],
    )?;
    expect_code(
        "PodSandboxStats(unknown)",
        rt.pod_sandbox_stats(api::PodSandboxStatsRequest {
            pod_sandbox_id: id.clone(),
        })
        .await,
        NotFound,
        &[&id],
    )?;
    expect_code(
        "CreateContainer(in an unknown pod)",
        rt.create_container(req::create_container(&id, &sleeper("orphan"), &pod))
            .await,
        NotFound,
        &[&id],
    )?;
    // Removals and stops of what is not there are done already (CRI: the four calls are
    // idempotent; critest's Idempotence specs call Stop* with a fresh UUID).
    expect_ok(
        "StopContainer(unknown)",
        rt.stop_container(req::stop_container(&id, 1)).await,
    )?;
    expect_ok(
        "StopPodSandbox(unknown)",
        rt.stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await,
    )?;
    expect_ok(
        "RemoveContainer(unknown)",
        rt.remove_container(req::remove_container(&id)).await,
    )?;
    expect_ok(
        "RemovePodSandbox(unknown)",
        rt.remove_pod_sandbox(req::remove_pod(&id)).await,
    )?;

    // Removing twice: the second removal of a real pod and container is OK too.
    let pod_id = c.run_pod(&pod).await?;
    let cid = c.create_container(&pod_id, &sleeper("twice"), &pod).await?;
    for round in 1..=2 {
        expect_ok(
            &format!("RemoveContainer #{round}"),
            rt.remove_container(req::remove_container(&cid)).await,
        )?;
    }
    expect_code(
        "ContainerStatus(removed)",
        rt.container_status(req::container_status(&cid)).await,
        NotFound,
        &[],
    )?;
    expect_ok(
        "StopContainer(removed)",
        rt.stop_container(req::stop_container(&cid, 1)).await,
    )?;
    c.stop_pod(&pod_id).await?;
    for round in 1..=2 {
        expect_ok(
            &format!("RemovePodSandbox #{round}"),
            rt.remove_pod_sandbox(req::remove_pod(&pod_id)).await,
        )?;
    }
    expect_code(
        "PodSandboxStatus(removed)",
        rt.pod_sandbox_status(req::pod_status(&pod_id)).await,
        NotFound,
        &[],
    )?;
    expect_ok(
        "StopPodSandbox(removed)",
        rt.stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await,
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Wrong state

async fn wrong_state(env: &TestEnv) -> Result<()> {
    use tonic::Code::FailedPrecondition;
    let c = env.cri();
    let mut rt = c.runtime();
    let pod = env.pod_config("state")?;
    let pod_id = c.run_pod(&pod).await?;

    // StartContainer on a running container.
    let run_id = env
        .cri()
        .run_container(&pod_id, &sleeper("runner"), &pod)
        .await?;
    expect_code(
        "StartContainer(running)",
        rt.start_container(req::start_container(&run_id)).await,
        FailedPrecondition,
        &[&run_id],
    )?;

    // ExecSync and StartContainer on an exited container.
    let done = container_config("done", BUSYBOX, &["true"]);
    let done_id = env.cri().run_container(&pod_id, &done, &pod).await?;
    c.wait_container_exit(&done_id, EXIT_TIMEOUT).await?;
    expect_code(
        "ExecSync(exited)",
        rt.exec_sync(req::exec_sync(&done_id, &["true"], 5)).await,
        FailedPrecondition,
        &[&done_id],
    )?;
    expect_code(
        "StartContainer(exited)",
        rt.start_container(req::start_container(&done_id)).await,
        FailedPrecondition,
        &[&done_id],
    )?;

    // StopContainer of an exited container is a no-op, not an error (kubelet does it).
    expect_ok(
        "StopContainer(exited)",
        rt.stop_container(req::stop_container(&done_id, 1)).await,
    )?;

    // CreateContainer in a stopped pod.
    c.stop_pod(&pod_id).await?;
    let st = c.container_status(&run_id).await?;
    ensure!(
        st.state == api::ContainerState::ContainerExited as i32,
        "StopPodSandbox left container {run_id} in state {:?}",
        st.state
    );
    expect_code(
        "CreateContainer(stopped pod)",
        rt.create_container(req::create_container(&pod_id, &sleeper("late"), &pod))
            .await,
        FailedPrecondition,
        &[&pod_id],
    )?;
    // StopPodSandbox again: idempotent.
    c.stop_pod(&pod_id).await.context("second StopPodSandbox")?;
    c.remove_pod(&pod_id).await?;
    let left = c.list_containers(None).await?;
    ensure!(left.is_empty(), "RemovePodSandbox left containers {left:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Bad config

async fn bad_config(env: &TestEnv) -> Result<()> {
    use tonic::Code::InvalidArgument;
    let c = env.cri();
    let mut rt = c.runtime();
    let run = |cfg: api::PodSandboxConfig, handler: &str| api::RunPodSandboxRequest {
        config: Some(cfg),
        runtime_handler: handler.into(),
    };

    let mut no_meta = env.pod_config("bad")?;
    no_meta.metadata = None;
    expect_code(
        "RunPodSandbox(no metadata)",
        rt.run_pod_sandbox(run(no_meta, "")).await,
        InvalidArgument,
        &["metadata"],
    )?;

    let mut no_name = env.pod_config("bad")?;
    if let Some(m) = no_name.metadata.as_mut() {
        m.name.clear();
    }
    expect_code(
        "RunPodSandbox(empty name)",
        rt.run_pod_sandbox(run(no_name, "")).await,
        InvalidArgument,
        &["name"],
    )?;

    let ok_pod = env.pod_config("bad")?;
    expect_code(
        "RunPodSandbox(unknown handler)",
        rt.run_pod_sandbox(run(ok_pod.clone(), "no-such-handler"))
            .await,
        InvalidArgument,
        &["runtime_handler", "no-such-handler"],
    )?;
    ensure!(
        c.list_pods().await?.is_empty(),
        "a refused RunPodSandbox left a pod"
    );

    // Container configs, in a real pod.
    let pod_id = c.run_pod(&ok_pod).await?;
    let create = |cfg: api::ContainerConfig| req::create_container(&pod_id, &cfg, &ok_pod);
    let mut cfg = sleeper("x");
    cfg.metadata = None;
    expect_code(
        "CreateContainer(no metadata)",
        rt.create_container(create(cfg)).await,
        InvalidArgument,
        &["metadata"],
    )?;

    let cfg = sleeper("");
    expect_code(
        "CreateContainer(empty name)",
        rt.create_container(create(cfg)).await,
        InvalidArgument,
        &["name"],
    )?;

    let mut cfg = sleeper("noimage");
    cfg.image = None;
    expect_code(
        "CreateContainer(no image)",
        rt.create_container(create(cfg)).await,
        InvalidArgument,
        &["image"],
    )?;

    let mut cfg = sleeper("abslog");
    cfg.log_path = "/tmp/escape.log".into();
    expect_code(
        "CreateContainer(absolute log_path)",
        rt.create_container(create(cfg)).await,
        InvalidArgument,
        &["log_path"],
    )?;

    let mut cfg = sleeper("dotdot");
    cfg.log_path = "../escape.log".into();
    expect_code(
        "CreateContainer(log_path with ..)",
        rt.create_container(create(cfg)).await,
        InvalidArgument,
        &["log_path"],
    )?;

    let mut cfg = sleeper("negshares");
    cfg.linux = Some(api::LinuxContainerConfig {
        resources: Some(api::LinuxContainerResources {
            cpu_shares: -2,
            ..Default::default()
        }),
        ..Default::default()
    });
    expect_code(
        "CreateContainer(cpu_shares -2)",
        rt.create_container(create(cfg)).await,
        InvalidArgument,
        &["cpu_shares"],
    )?;

    let left = c.list_containers(None).await?;
    ensure!(
        left.is_empty(),
        "refused CreateContainer calls left containers: {left:?}"
    );

    // UpdateContainerResources with a bad value, on a real container.
    let id = env
        .cri()
        .run_container(&pod_id, &sleeper("upd"), &ok_pod)
        .await?;
    expect_code(
        "UpdateContainerResources(cpu_shares -2)",
        rt.update_container_resources(api::UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(api::LinuxContainerResources {
                cpu_shares: -2,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await,
        InvalidArgument,
        &["cpu_shares"],
    )?;
    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Name reuse

async fn name_reuse(env: &TestEnv) -> Result<()> {
    use tonic::Code::AlreadyExists;
    let c = env.cri();
    let mut rt = c.runtime();
    let pod = env.pod_config("reuse")?;
    let pod_id = c.run_pod(&pod).await?;
    let name = pod
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    expect_code(
        "RunPodSandbox(same metadata)",
        rt.run_pod_sandbox(req::run_pod(&pod, "")).await,
        AlreadyExists,
        &[&name],
    )?;
    // Another attempt of the same pod is a different name: allowed.
    let mut next = pod.clone();
    if let Some(m) = next.metadata.as_mut() {
        m.attempt = 1;
    }
    let next_id = c
        .run_pod(&next)
        .await
        .context("RunPodSandbox attempt 1 of the same pod")?;
    ensure!(next_id != pod_id, "attempt 1 got the same id");

    let cfg = sleeper("dup");
    let cid = c.create_container(&pod_id, &cfg, &pod).await?;
    expect_code(
        "CreateContainer(same name and attempt)",
        rt.create_container(req::create_container(&pod_id, &cfg, &pod))
            .await,
        AlreadyExists,
        &["dup"],
    )?;
    // Once removed, the name is free again.
    c.remove_container(&cid).await?;
    c.create_container(&pod_id, &cfg, &pod)
        .await
        .context("CreateContainer after the first was removed")?;
    for id in [&pod_id, &next_id] {
        c.stop_and_remove_pod(id).await?;
    }
    // And the pod's name is free once it is removed.
    let again = c
        .run_pod(&pod)
        .await
        .context("RunPodSandbox with the removed pod's name")?;
    c.stop_and_remove_pod(&again).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Exit reasons and timestamps

async fn exit_reasons(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    let pod = env.pod_config("reasons")?;
    let pod_id = c.run_pod(&pod).await?;

    let ok = container_config("ok", BUSYBOX, &["sh", "-c", "sleep 1; exit 0"]);
    let bad = container_config("bad", BUSYBOX, &["sh", "-c", "exit 3"]);
    let mut oom = container_config(
        "oom",
        BUSYBOX,
        &["sh", "-c", "x=0123456789abcdef; while :; do x=$x$x; done"],
    );
    oom.linux = Some(api::LinuxContainerConfig {
        resources: Some(api::LinuxContainerResources {
            memory_limit_in_bytes: 16 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });

    for (cfg, code, reason) in [
        (&ok, 0, "Completed"),
        (&bad, 3, "Error"),
        (&oom, 137, "OOMKilled"),
    ] {
        let name = cfg
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let before = now_ns();
        let id = c.create_container(&pod_id, cfg, &pod).await?;
        let created = c.container_status(&id).await?;
        ensure!(
            created.state == api::ContainerState::ContainerCreated as i32,
            "{name}: state {:?} after CreateContainer, want CREATED",
            created.state
        );
        ensure!(
            created.started_at == 0 && created.finished_at == 0,
            "{name}: created container has start/finish times: {created:?}"
        );
        c.start_container(&id).await?;
        let st = c.wait_container_exit(&id, EXIT_TIMEOUT).await?;
        let after = now_ns();
        ensure!(
            st.exit_code == code && st.reason == reason,
            "{name}: exit code {} reason {:?} (message {:?}), want {code} {reason:?}",
            st.exit_code,
            st.reason,
            st.message
        );
        ensure!(
            before <= st.created_at
                && st.created_at <= st.started_at
                && st.started_at <= st.finished_at
                && st.finished_at <= after,
            "{name}: timestamps out of order: test start {before} <= created {} <= started {} <= finished {} <= test end {after}",
            st.created_at,
            st.started_at,
            st.finished_at
        );
        if name == "ok" {
            ensure!(
                st.finished_at - st.started_at >= 900_000_000,
                "ok: ran `sleep 1` but started {} finished {}",
                st.started_at,
                st.finished_at
            );
        }
        ensure!(
            st.image.as_ref().is_some_and(|i| !i.image.is_empty()) && !st.image_ref.is_empty(),
            "{name}: status without image or image_ref: {st:?}"
        );
        ensure!(
            st.log_path.ends_with(&format!("{name}.log")),
            "{name}: log_path {:?}",
            st.log_path
        );
    }
    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// List filters

fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn list_filters(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    let mut p1 = env.pod_config("list-a")?;
    p1.labels = labels(&[("app", "a"), ("tier", "web")]);
    let mut p2 = env.pod_config("list-b")?;
    p2.labels = labels(&[("app", "b"), ("tier", "web")]);
    let mut p3 = env.pod_config("list-c")?;
    p3.labels = labels(&[("app", "c")]);
    let id1 = c.run_pod(&p1).await?;
    let id2 = c.run_pod(&p2).await?;
    let id3 = c.run_pod(&p3).await?;
    c.stop_pod(&id3).await?;

    let pods = |f: api::PodSandboxFilter| async move {
        let mut v: Vec<String> = c
            .list_pods_filtered(Some(f))
            .await?
            .into_iter()
            .map(|p| p.id)
            .collect();
        v.sort();
        anyhow::Ok(v)
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let ready = |s: api::PodSandboxState| Some(api::PodSandboxStateValue { state: s as i32 });
    for (what, f, want) in [
        (
            "no filter",
            api::PodSandboxFilter::default(),
            vec![id1.clone(), id2.clone(), id3.clone()],
        ),
        (
            "id",
            api::PodSandboxFilter {
                id: id2.clone(),
                ..Default::default()
            },
            vec![id2.clone()],
        ),
        (
            "unknown id",
            api::PodSandboxFilter {
                id: ghost_id(),
                ..Default::default()
            },
            vec![],
        ),
        (
            "state READY",
            api::PodSandboxFilter {
                state: ready(api::PodSandboxState::SandboxReady),
                ..Default::default()
            },
            vec![id1.clone(), id2.clone()],
        ),
        (
            "state NOTREADY",
            api::PodSandboxFilter {
                state: ready(api::PodSandboxState::SandboxNotready),
                ..Default::default()
            },
            vec![id3.clone()],
        ),
        (
            "label app=a",
            api::PodSandboxFilter {
                label_selector: labels(&[("app", "a")]),
                ..Default::default()
            },
            vec![id1.clone()],
        ),
        (
            "label tier=web",
            api::PodSandboxFilter {
                label_selector: labels(&[("tier", "web")]),
                ..Default::default()
            },
            vec![id1.clone(), id2.clone()],
        ),
        (
            "labels app=b,tier=web",
            api::PodSandboxFilter {
                label_selector: labels(&[("app", "b"), ("tier", "web")]),
                ..Default::default()
            },
            vec![id2.clone()],
        ),
        (
            "labels app=c,tier=web",
            api::PodSandboxFilter {
                label_selector: labels(&[("app", "c"), ("tier", "web")]),
                ..Default::default()
            },
            vec![],
        ),
        (
            // No such state: nothing matches, in the List call as in the stream.
            "state out of range",
            api::PodSandboxFilter {
                state: Some(api::PodSandboxStateValue { state: 99 }),
                ..Default::default()
            },
            vec![],
        ),
        (
            "id + state mismatch",
            api::PodSandboxFilter {
                id: id3.clone(),
                state: ready(api::PodSandboxState::SandboxReady),
                ..Default::default()
            },
            vec![],
        ),
    ] {
        let got = pods(f.clone()).await?;
        ensure!(
            got == sorted(want.clone()),
            "ListPodSandbox filter {what}: got {got:?}, want {want:?}"
        );
        let listed = c.list_pods_filtered(Some(f.clone())).await?;
        let streamed = drain(
            c.runtime()
                .stream_pod_sandboxes(api::StreamPodSandboxesRequest { filter: Some(f) })
                .await,
        )
        .await
        .with_context(|| format!("StreamPodSandboxes filter {what}"))?;
        let streamed = items_once(
            "StreamPodSandboxes",
            streamed.into_iter().map(|m| m.pod_sandboxes),
            |p| p.id.clone(),
        )?;
        ensure!(
            streamed == listed,
            "StreamPodSandboxes filter {what}: {streamed:?}, ListPodSandbox {listed:?}"
        );
    }
    let items = c.list_pods_filtered(None).await?;
    let item1 = items
        .iter()
        .find(|p| p.id == id1)
        .context("pod 1 not listed")?;
    ensure!(
        item1.labels == p1.labels,
        "ListPodSandbox labels {:?}, want {:?}",
        item1.labels,
        p1.labels
    );
    ensure!(
        item1.metadata == p1.metadata,
        "ListPodSandbox metadata {:?}, want {:?}",
        item1.metadata,
        p1.metadata
    );
    ensure!(
        item1.created_at > 0,
        "ListPodSandbox created_at {}",
        item1.created_at
    );

    // Containers in pod 1: running, exited, created; one running in pod 2.
    let mut web = sleeper("web");
    web.labels = labels(&[("role", "web")]);
    let mut job = container_config("job", BUSYBOX, &["true"]);
    job.labels = labels(&[("role", "job")]);
    let mut idle = sleeper("idle");
    idle.labels = labels(&[("role", "idle")]);
    let mut other = sleeper("other");
    other.labels = labels(&[("role", "web")]);
    let web_id = env.cri().run_container(&id1, &web, &p1).await?;
    let job_id = env.cri().run_container(&id1, &job, &p1).await?;
    c.wait_container_exit(&job_id, EXIT_TIMEOUT).await?;
    let idle_id = c.create_container(&id1, &idle, &p1).await?;
    let other_id = env.cri().run_container(&id2, &other, &p2).await?;

    let state = |s: api::ContainerState| Some(api::ContainerStateValue { state: s as i32 });
    for (what, f, want) in [
        (
            "no filter",
            api::ContainerFilter::default(),
            vec![
                web_id.clone(),
                job_id.clone(),
                idle_id.clone(),
                other_id.clone(),
            ],
        ),
        (
            "id",
            api::ContainerFilter {
                id: job_id.clone(),
                ..Default::default()
            },
            vec![job_id.clone()],
        ),
        (
            "unknown id",
            api::ContainerFilter {
                id: ghost_id(),
                ..Default::default()
            },
            vec![],
        ),
        (
            "pod 1",
            api::ContainerFilter {
                pod_sandbox_id: id1.clone(),
                ..Default::default()
            },
            vec![web_id.clone(), job_id.clone(), idle_id.clone()],
        ),
        (
            "pod 2",
            api::ContainerFilter {
                pod_sandbox_id: id2.clone(),
                ..Default::default()
            },
            vec![other_id.clone()],
        ),
        (
            "state RUNNING",
            api::ContainerFilter {
                state: state(api::ContainerState::ContainerRunning),
                ..Default::default()
            },
            vec![web_id.clone(), other_id.clone()],
        ),
        (
            "state EXITED",
            api::ContainerFilter {
                state: state(api::ContainerState::ContainerExited),
                ..Default::default()
            },
            vec![job_id.clone()],
        ),
        (
            "state CREATED",
            api::ContainerFilter {
                state: state(api::ContainerState::ContainerCreated),
                ..Default::default()
            },
            vec![idle_id.clone()],
        ),
        (
            "label role=web",
            api::ContainerFilter {
                label_selector: labels(&[("role", "web")]),
                ..Default::default()
            },
            vec![web_id.clone(), other_id.clone()],
        ),
        (
            "pod 1 + label role=web",
            api::ContainerFilter {
                pod_sandbox_id: id1.clone(),
                label_selector: labels(&[("role", "web")]),
                ..Default::default()
            },
            vec![web_id.clone()],
        ),
        (
            "pod 2 + state EXITED",
            api::ContainerFilter {
                pod_sandbox_id: id2.clone(),
                state: state(api::ContainerState::ContainerExited),
                ..Default::default()
            },
            vec![],
        ),
    ] {
        let listed = c.list_containers(Some(f.clone())).await?;
        let mut got: Vec<String> = listed.iter().map(|c| c.id.clone()).collect();
        got.sort();
        ensure!(
            got == sorted(want.clone()),
            "ListContainers filter {what}: got {got:?}, want {want:?}"
        );
        let streamed = drain(
            c.runtime()
                .stream_containers(api::StreamContainersRequest {
                    filter: Some(f.clone()),
                })
                .await,
        )
        .await
        .with_context(|| format!("StreamContainers filter {what}"))?;
        let streamed = items_once(
            "StreamContainers",
            streamed.into_iter().map(|m| m.containers),
            |c| c.id.clone(),
        )?;
        ensure!(
            streamed == listed,
            "StreamContainers filter {what}: {streamed:?}, ListContainers {listed:?}"
        );
        // Stats take the same filter minus the state; their figures move between two calls,
        // so the ids are compared.
        let sf = api::ContainerStatsFilter {
            id: f.id.clone(),
            pod_sandbox_id: f.pod_sandbox_id.clone(),
            label_selector: f.label_selector.clone(),
        };
        stats_streamed_as_listed(c, what, sf).await?;
    }
    for (what, f) in [
        ("no filter", api::PodSandboxStatsFilter::default()),
        (
            "id",
            api::PodSandboxStatsFilter {
                id: id2.clone(),
                ..Default::default()
            },
        ),
        (
            "label tier=web",
            api::PodSandboxStatsFilter {
                label_selector: labels(&[("tier", "web")]),
                ..Default::default()
            },
        ),
    ] {
        let listed = c
            .runtime()
            .list_pod_sandbox_stats(api::ListPodSandboxStatsRequest {
                filter: Some(f.clone()),
            })
            .await
            .context("ListPodSandboxStats")?
            .into_inner()
            .stats;
        let streamed = drain(
            c.runtime()
                .stream_pod_sandbox_stats(api::StreamPodSandboxStatsRequest { filter: Some(f) })
                .await,
        )
        .await
        .with_context(|| format!("StreamPodSandboxStats filter {what}"))?;
        let pod_id = |s: &api::PodSandboxStats| {
            s.attributes
                .as_ref()
                .map(|a| a.id.clone())
                .unwrap_or_default()
        };
        let streamed = items_once(
            "StreamPodSandboxStats",
            streamed.into_iter().map(|m| m.pod_sandbox_stats),
            pod_id,
        )?;
        let want: Vec<String> = listed.iter().map(pod_id).collect();
        let got: Vec<String> = streamed.iter().map(pod_id).collect();
        ensure!(
            got == want,
            "StreamPodSandboxStats filter {what}: {got:?}, ListPodSandboxStats {want:?}"
        );
    }
    images_streamed_as_listed(c).await?;
    let all = c.list_containers(None).await?;
    let w = all
        .iter()
        .find(|x| x.id == web_id)
        .context("web not listed")?;
    ensure!(
        w.pod_sandbox_id == id1,
        "web listed in pod {:?}",
        w.pod_sandbox_id
    );
    ensure!(w.labels == web.labels, "web labels {:?}", w.labels);
    ensure!(!w.image_ref.is_empty(), "web listed without image_ref");

    for id in [&id1, &id2, &id3] {
        c.stop_and_remove_pod(id).await?;
    }
    Ok(())
}

/// Every message of a server-streaming call, or the status it failed with.
async fn drain<M>(
    r: std::result::Result<tonic::Response<tonic::Streaming<M>>, tonic::Status>,
) -> std::result::Result<Vec<M>, tonic::Status> {
    let mut s = r?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.push(m);
    }
    Ok(out)
}

/// The items of a Stream* call's messages, in order, after checking what the proto asks:
/// each message carries at least one item and no item appears twice.
fn items_once<T>(
    call: &str,
    msgs: impl Iterator<Item = Vec<T>>,
    key: impl Fn(&T) -> String,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (n, items) in msgs.enumerate() {
        ensure!(!items.is_empty(), "{call}: message {n} carries no item");
        for i in items {
            ensure!(seen.insert(key(&i)), "{call}: {} sent twice", key(&i));
            out.push(i);
        }
    }
    Ok(out)
}

async fn stats_streamed_as_listed(
    c: &cri::CriClient,
    what: &str,
    f: api::ContainerStatsFilter,
) -> Result<()> {
    let id = |s: &api::ContainerStats| {
        s.attributes
            .as_ref()
            .map(|a| a.id.clone())
            .unwrap_or_default()
    };
    let want: Vec<String> = c
        .runtime()
        .list_container_stats(api::ListContainerStatsRequest {
            filter: Some(f.clone()),
        })
        .await
        .context("ListContainerStats")?
        .into_inner()
        .stats
        .iter()
        .map(id)
        .collect();
    let streamed = drain(
        c.runtime()
            .stream_container_stats(api::StreamContainerStatsRequest { filter: Some(f) })
            .await,
    )
    .await
    .with_context(|| format!("StreamContainerStats filter {what}"))?;
    let got: Vec<String> = items_once(
        "StreamContainerStats",
        streamed.into_iter().map(|m| m.container_stats),
        id,
    )?
    .iter()
    .map(id)
    .collect();
    ensure!(
        got == want,
        "StreamContainerStats filter {what}: {got:?}, ListContainerStats {want:?}"
    );
    Ok(())
}

/// StreamImages against ListImages: all, by name, by an unknown name, and by a name that is
/// no reference at all (the List call answers that with an empty list, not an error: the
/// stream must answer the same).
async fn images_streamed_as_listed(c: &cri::CriClient) -> Result<()> {
    for (what, name) in [
        ("no filter", None),
        ("busybox", Some(BUSYBOX)),
        ("unknown", Some("docker.io/library/nothing-here:1")),
        ("not a reference", Some("Not::A Reference")),
    ] {
        let filter = name.map(|n| api::ImageFilter {
            image: Some(cri::image_spec(n)),
        });
        let listed = c
            .image()
            .list_images(api::ListImagesRequest {
                filter: filter.clone(),
            })
            .await
            .map(|r| r.into_inner().images);
        let streamed = drain(
            c.image()
                .stream_images(api::StreamImagesRequest { filter })
                .await,
        )
        .await;
        match (listed, streamed) {
            (Ok(listed), Ok(streamed)) => {
                let streamed = items_once(
                    "StreamImages",
                    streamed.into_iter().map(|m| m.images),
                    |i| i.id.clone(),
                )?;
                ensure!(
                    streamed == listed,
                    "StreamImages filter {what}: {streamed:?}, ListImages {listed:?}"
                );
                if what == "busybox" {
                    ensure!(listed.len() == 1, "ListImages busybox: {listed:?}");
                }
            }
            (Err(l), Err(s)) => ensure!(
                l.code() == s.code(),
                "filter {what}: ListImages {:?}, StreamImages {:?}",
                l.code(),
                s.code()
            ),
            (l, s) => bail!(
                "filter {what}: ListImages {:?}, StreamImages {:?}",
                l.map(|v| v.len()),
                s.map(|v| v.len())
            ),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Status, Version, RuntimeConfig

async fn status_version_config(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    let v = c.version().await?;
    ensure!(
        v.runtime_api_version == "v1",
        "Version runtime_api_version {:?}",
        v.runtime_api_version
    );
    ensure!(
        !v.runtime_name.is_empty() && !v.runtime_version.is_empty(),
        "Version without name/version: {v:?}"
    );

    let st = c.status().await?;
    for cond in ["RuntimeReady", "NetworkReady"] {
        let got =
            cri::condition(&st, cond).with_context(|| format!("Status has no {cond}: {st:?}"))?;
        ensure!(
            got.status,
            "Status {cond} false: reason {:?} message {:?}",
            got.reason,
            got.message
        );
    }
    let full = c
        .runtime()
        .status(api::StatusRequest { verbose: true })
        .await
        .context("Status verbose")?
        .into_inner();
    let handlers: Vec<&str> = full
        .runtime_handlers
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    ensure!(
        handlers.contains(&""),
        "Status runtime_handlers lack the default handler \"\": {handlers:?}"
    );

    let rc = c
        .runtime()
        .runtime_config(api::RuntimeConfigRequest {})
        .await
        .context("RuntimeConfig")?
        .into_inner();
    let driver = rc.linux.map(|l| l.cgroup_driver);
    ensure!(
        driver == Some(api::CgroupDriver::Cgroupfs as i32),
        "RuntimeConfig cgroup driver {driver:?}, want cgroupfs (the harness runs --cgroup-driver cgroupfs)"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// StopContainer: StopSignal and timeout

/// Pushes busybox with `StopSignal: SIGUSR1` in its image config as `library/stopsignal`.
fn push_stopsignal_image(registry: &Registry) -> Result<()> {
    let src = crisp_e2e::images::BUSYBOX.layout()?;
    let tmp = tempfile::tempdir()?;
    let dst = tmp.path();
    let blobs = dst.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let read_json = |p: &Path| -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(
            &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )?)
    };
    let blob = |digest: &str| {
        src.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let index = read_json(&src.join("index.json"))?;
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .context("busybox index without manifest")?;
    let mut manifest = read_json(&blob(mdigest))?;
    let mut config = read_json(&blob(
        manifest["config"]["digest"].as_str().context("no config")?,
    ))?;
    for layer in manifest["layers"].as_array().context("no layers")? {
        let d = layer["digest"].as_str().context("layer without digest")?;
        std::fs::copy(blob(d), blobs.join(d.trim_start_matches("sha256:")))?;
    }
    config["config"]["StopSignal"] = "SIGUSR1".into();
    let put = |bytes: Vec<u8>| -> Result<(String, usize)> {
        let hex = hex::encode(sha2::Sha256::digest(&bytes));
        std::fs::write(blobs.join(&hex), &bytes)?;
        Ok((format!("sha256:{hex}"), bytes.len()))
    };
    let (cdigest, csize) = put(serde_json::to_vec(&config)?)?;
    manifest["config"]["digest"] = cdigest.into();
    manifest["config"]["size"] = csize.into();
    let (mdigest, msize) = put(serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": mdigest, "size": msize,
            "annotations": { "org.opencontainers.image.ref.name": "latest" },
        }],
    });
    std::fs::write(dst.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(dst.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    registry.push_layout(dst, "latest", "library/stopsignal:latest")
}

/// Runs `cfg`, which logs "ready" once its signal traps are set, then StopContainer with
/// `timeout`: how long that took, and the container's status after it.
async fn stop_when_ready(
    env: &TestEnv,
    pod_id: &str,
    pod: &api::PodSandboxConfig,
    cfg: &api::ContainerConfig,
    timeout: i64,
) -> Result<(Duration, api::ContainerStatus)> {
    let c = env.cri();
    let id = c.run_container(pod_id, cfg, pod).await?;
    cri::wait_log_line(&cri::log_file(pod, cfg), "ready", Duration::from_secs(10)).await?;
    let t = Instant::now();
    c.stop_container(&id, timeout).await?;
    let took = t.elapsed();
    Ok((took, c.container_status(&id).await?))
}

async fn stop_signal(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    c.pull(STOPSIG_IMAGE, None).await?;
    let pod = env.pod_config("stop")?;
    let pod_id = c.run_pod(&pod).await?;
    let timeout = 3i64;

    // 1. Traps SIGTERM and keeps going: killed (137) after the timeout, not before.
    let stubborn = container_config(
        "stubborn",
        BUSYBOX,
        &[
            "sh",
            "-c",
            "trap 'echo got-term' TERM; echo ready; while :; do sleep 0.2; done",
        ],
    );
    let (took, st) = stop_when_ready(env, &pod_id, &pod, &stubborn, timeout).await?;
    ensure!(
        st.state == api::ContainerState::ContainerExited as i32,
        "stubborn: state {:?} after StopContainer",
        st.state
    );
    ensure!(
        took >= Duration::from_secs(timeout as u64)
            && took < Duration::from_secs(timeout as u64 + 5),
        "stubborn: StopContainer({timeout} s) returned after {took:?}"
    );
    ensure!(
        st.exit_code == 137,
        "stubborn: exit code {} ({:?}), want 137 (SIGKILL)",
        st.exit_code,
        st.reason
    );
    // KEP-4960: ContainerStatus reports the signal Stop sends; busybox has no STOPSIGNAL.
    ensure!(
        st.stop_signal == api::Signal::Sigterm as i32,
        "stubborn: ContainerStatus.stop_signal {:?}, want SIGTERM (the default)",
        api::Signal::try_from(st.stop_signal)
    );
    cri::wait_log_line(
        &cri::log_file(&pod, &stubborn),
        "got-term",
        Duration::from_secs(5),
    )
    .await
    .context("SIGTERM never reached the container before the SIGKILL")?;

    // 2. Exits on SIGTERM: StopContainer returns at once, with its exit code.
    let polite = container_config(
        "polite",
        BUSYBOX,
        &[
            "sh",
            "-c",
            "trap 'exit 0' TERM; echo ready; while :; do sleep 0.2; done",
        ],
    );
    let (took, st) = stop_when_ready(env, &pod_id, &pod, &polite, 30).await?;
    ensure!(
        took < Duration::from_secs(5),
        "polite: StopContainer(30 s) took {took:?} for a container that exits on SIGTERM"
    );
    ensure!(
        st.exit_code == 0,
        "polite: exit code {} ({:?}), want 0",
        st.exit_code,
        st.reason
    );

    // 3. The image says StopSignal SIGUSR1: that is what arrives, not SIGTERM.
    let usr1 = container_config(
        "usr1",
        STOPSIG_IMAGE,
        &[
            "sh",
            "-c",
            "trap 'exit 42' USR1; trap 'exit 43' TERM; echo ready; while :; do sleep 0.2; done",
        ],
    );
    let (took, st) = stop_when_ready(env, &pod_id, &pod, &usr1, 30).await?;
    ensure!(
        st.exit_code == 42,
        "usr1: exit code {} after {took:?}, want 42 (the image's StopSignal SIGUSR1; 43 means SIGTERM was sent)",
        st.exit_code
    );
    ensure!(
        st.stop_signal == api::Signal::Sigusr1 as i32,
        "usr1: ContainerStatus.stop_signal {:?}, want SIGUSR1 (the image's STOPSIGNAL)",
        api::Signal::try_from(st.stop_signal)
    );

    // 4. The config's stop_signal overrides the image's: SIGINT arrives, and is reported,
    //    before the container runs too.
    let mut int = container_config(
        "int",
        STOPSIG_IMAGE,
        &[
            "sh",
            "-c",
            "trap 'exit 44' INT; trap 'exit 42' USR1; echo ready; while :; do sleep 0.2; done",
        ],
    );
    int.stop_signal = api::Signal::Sigint as i32;
    let created = c.create_container(&pod_id, &int, &pod).await?;
    let before = c.container_status(&created).await?;
    ensure!(
        before.stop_signal == api::Signal::Sigint as i32,
        "int: created container's stop_signal {:?}, want SIGINT (the config's)",
        api::Signal::try_from(before.stop_signal)
    );
    c.remove_container(&created).await?;
    let (took, st) = stop_when_ready(env, &pod_id, &pod, &int, 30).await?;
    ensure!(
        st.exit_code == 44 && st.stop_signal == api::Signal::Sigint as i32,
        "int: exit code {} after {took:?} (want 44: SIGINT; 42 means the image's SIGUSR1), \
         stop_signal {:?}",
        st.exit_code,
        api::Signal::try_from(st.stop_signal)
    );
    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A retried RunPodSandbox while the first is in flight gets the first one's result

async fn retried_run_pod(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    let pod = env.pod_config("retry")?;
    let calls = (0..3).map(|_| {
        let c = c.clone();
        let pod = pod.clone();
        tokio::spawn(async move { c.run_pod(&pod).await })
    });
    let mut ids = Vec::new();
    for t in calls.collect::<Vec<_>>() {
        ids.push(
            t.await?
                .context("a concurrent retry of RunPodSandbox failed")?,
        );
    }
    ensure!(
        ids.iter().all(|i| *i == ids[0]),
        "concurrent retries of one RunPodSandbox got different pods: {ids:?}"
    );
    let listed = c.list_pods().await?;
    ensure!(
        listed == vec![ids[0].clone()],
        "after 3 concurrent retries ListPodSandbox has {listed:?}"
    );
    c.stop_and_remove_pod(&ids[0]).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// PodSandboxStatus

async fn pod_status(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    let mut pod = env.pod_config("status")?;
    pod.labels = labels(&[("app", "status")]);
    pod.annotations = labels(&[("crisp.e2e/note", "kept")]);
    // What kubelet sends for an ordinary pod.
    let ns_opts = api::NamespaceOption {
        network: api::NamespaceMode::Pod as i32,
        pid: api::NamespaceMode::Container as i32,
        ipc: api::NamespaceMode::Pod as i32,
        ..Default::default()
    };
    pod.linux.get_or_insert_default().security_context = Some(api::LinuxSandboxSecurityContext {
        namespace_options: Some(ns_opts.clone()),
        ..Default::default()
    });
    let before = now_ns();
    let pod_id = c.run_pod(&pod).await?;
    let st = c.pod_status(&pod_id).await?;
    ensure!(st.id == pod_id, "status id {:?}", st.id);
    ensure!(
        st.state == api::PodSandboxState::SandboxReady as i32,
        "state {:?} after RunPodSandbox",
        st.state
    );
    ensure!(
        st.created_at >= before && st.created_at <= now_ns(),
        "created_at {} outside the call",
        st.created_at
    );
    ensure!(
        st.metadata == pod.metadata,
        "metadata {:?}, want {:?}",
        st.metadata,
        pod.metadata
    );
    ensure!(st.labels == pod.labels, "labels {:?}", st.labels);
    ensure!(
        st.annotations == pod.annotations,
        "annotations {:?}",
        st.annotations
    );
    let ip = st
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    let prefix = env.network().subnet.trim_end_matches("0/24").to_string();
    ensure!(
        ip.starts_with(&prefix),
        "pod IP {ip:?} outside {}",
        env.network().subnet
    );
    let ns = st
        .linux
        .as_ref()
        .and_then(|l| l.namespaces.as_ref())
        .and_then(|n| n.options.as_ref());
    ensure!(
        ns == Some(&ns_opts),
        "PodSandboxStatus linux.namespaces.options {ns:?}, want {ns_opts:?}"
    );
    let verbose = c.pod_status_verbose(&pod_id).await?;
    ensure!(
        !verbose.info.is_empty(),
        "verbose PodSandboxStatus has no info"
    );
    crisp_e2e::cri::CriClient::info_pid(&verbose.info).context("verbose info")?;
    // The shim's own SandboxStatus details join the `info` object (never the map, whose
    // keys crictl merges over its own `status`); the pause's state is `processStatus`.
    ensure!(
        verbose.info.keys().collect::<Vec<_>>() == vec!["info"],
        "verbose PodSandboxStatus keys {:?}, want only \"info\"",
        verbose.info.keys()
    );
    let doc: serde_json::Value = serde_json::from_str(&verbose.info["info"])?;
    ensure!(
        doc["processStatus"] == "running"
            && doc["bundle"].as_str().is_some_and(|b| !b.is_empty())
            && doc["cgroupsPath"].is_string(),
        "verbose PodSandboxStatus info without the shim's processStatus, bundle and \
         cgroupsPath: {doc}"
    );

    c.stop_pod(&pod_id).await?;
    let st = c.pod_status(&pod_id).await?;
    ensure!(
        st.state == api::PodSandboxState::SandboxNotready as i32,
        "state {:?} after StopPodSandbox",
        st.state
    );
    c.remove_pod(&pod_id).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// PID namespace modes: shared with the pod (pause is PID 1) or the container's own

async fn pid_namespace_modes(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    let pod = env.pod_config("pidns")?;
    let pod_id = c.run_pod(&pod).await?;
    let with_pid = |name: &str, mode: api::NamespaceMode| {
        let mut cfg = sleeper(name);
        cfg.linux = Some(api::LinuxContainerConfig {
            security_context: Some(api::LinuxContainerSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    pid: mode as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        cfg
    };
    let own = c
        .run_container(
            &pod_id,
            &with_pid("own", api::NamespaceMode::Container),
            &pod,
        )
        .await?;
    let shared = c
        .run_container(&pod_id, &with_pid("shared", api::NamespaceMode::Pod), &pod)
        .await?;
    let cmd1 = |id: String| async move {
        let out = c.exec_ok(&id, &["cat", "/proc/1/cmdline"]).await?;
        anyhow::Ok(out.replace('\0', " "))
    };
    let own1 = cmd1(own.clone()).await?;
    ensure!(
        own1.starts_with("sleep"),
        "pid CONTAINER: PID 1 is {own1:?}, want the container's own sleep"
    );
    let shared1 = cmd1(shared.clone()).await?;
    ensure!(
        shared1.contains("pause"),
        "pid POD: PID 1 is {shared1:?}, want the pod's pause"
    );
    // The shared container sees the other shared-namespace processes, not the private one.
    let ps = c.exec_ok(&shared, &["ps", "-o", "pid,args"]).await?;
    ensure!(
        ps.lines().filter(|l| l.contains("sleep 3600")).count() == 1,
        "pid POD: ps shows\n{ps}"
    );
    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Streaming calls (validated before a URL is handed out) and UpdateRuntimeConfig

async fn streaming_validation(env: &TestEnv) -> Result<()> {
    use tonic::Code::{FailedPrecondition, InvalidArgument, NotFound};
    let c = env.cri();
    let mut rt = c.runtime();
    let pod = env.pod_config("stream")?;
    let pod_id = c.run_pod(&pod).await?;
    let id = env
        .cri()
        .run_container(&pod_id, &sleeper("s"), &pod)
        .await?;
    let exec =
        |container_id: &str, tty: bool, stdin: bool, stdout: bool, stderr: bool| api::ExecRequest {
            container_id: container_id.into(),
            cmd: vec!["sh".into()],
            tty,
            stdin,
            stdout,
            stderr,
        };
    expect_code(
        "Exec tty+stderr",
        rt.exec(exec(&id, true, false, true, true)).await,
        InvalidArgument,
        &["stderr", "tty"],
    )?;
    expect_code(
        "Exec no stream",
        rt.exec(exec(&id, false, false, false, false)).await,
        InvalidArgument,
        &["stdin", "stdout", "stderr"],
    )?;
    expect_code(
        "Exec unknown",
        rt.exec(exec("0123456789abcdef", false, false, true, false))
            .await,
        NotFound,
        &["0123456789abcdef"],
    )?;
    let mut no_cmd = exec(&id, false, false, true, false);
    no_cmd.cmd.clear();
    expect_code(
        "Exec no cmd",
        rt.exec(no_cmd).await,
        InvalidArgument,
        &["cmd"],
    )?;
    let url = expect_ok("Exec", rt.exec(exec(&id, false, false, true, false)).await)?.url;
    ensure!(
        url.starts_with("http://127.0.0.1:") && url.contains("/exec/"),
        "Exec URL {url}"
    );
    // The sleeper was created without stdin: attaching stdin is refused, naming it.
    let attach = |stdin: bool| api::AttachRequest {
        container_id: id.clone(),
        stdin,
        stdout: true,
        ..Default::default()
    };
    expect_code(
        "Attach stdin",
        rt.attach(attach(true)).await,
        InvalidArgument,
        &["stdin", &id],
    )?;
    let url = expect_ok("Attach", rt.attach(attach(false)).await)?.url;
    ensure!(url.contains("/attach/"), "Attach URL {url}");
    let pf = |pod: &str, port: i32| api::PortForwardRequest {
        pod_sandbox_id: pod.into(),
        port: vec![port],
    };
    for bad in [0, 70000, -1] {
        expect_code(
            "PortForward port",
            rt.port_forward(pf(&pod_id, bad)).await,
            InvalidArgument,
            &["port", &bad.to_string()],
        )?;
    }
    expect_code(
        "PortForward unknown pod",
        rt.port_forward(pf("0123456789abcdef", 80)).await,
        NotFound,
        &["0123456789abcdef"],
    )?;
    let url = expect_ok("PortForward", rt.port_forward(pf(&pod_id, 80)).await)?.url;
    ensure!(url.contains("/portforward/"), "PortForward URL {url}");
    // A stopped container: FailedPrecondition naming its state.
    c.stop_container(&id, 0).await?;
    expect_code(
        "Exec exited",
        rt.exec(exec(&id, false, false, true, false)).await,
        FailedPrecondition,
        &["CONTAINER_EXITED"],
    )?;
    // kubelet sends the pod CIDR at start: accepted (the CNI config owns addressing).
    expect_ok(
        "UpdateRuntimeConfig",
        rt.update_runtime_config(api::UpdateRuntimeConfigRequest {
            runtime_config: Some(api::RuntimeConfig {
                network_config: Some(api::NetworkConfig {
                    pod_cidr: "10.244.0.0/24".into(),
                }),
            }),
        })
        .await,
    )?;
    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// GetContainerEvents

async fn container_events(env: &TestEnv) -> Result<()> {
    use api::ContainerEventType as E;
    let c = env.cri();
    let mut stream = c
        .runtime()
        .get_container_events(api::GetEventsRequest {})
        .await
        .context("GetContainerEvents")?
        .into_inner();
    let pod = env.pod_config("events")?;
    let pod_id = c.run_pod(&pod).await?;
    let id = c.create_container(&pod_id, &sleeper("ev"), &pod).await?;
    c.start_container(&id).await?;
    c.stop_container(&id, 1).await?;
    c.remove_container(&id).await?;

    // The container's events, in order (pod events may be interleaved; they are skipped).
    let want = [
        E::ContainerCreatedEvent,
        E::ContainerStartedEvent,
        E::ContainerStoppedEvent,
        E::ContainerDeletedEvent,
    ];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < want.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = match tokio::time::timeout(left, stream.message()).await {
            Err(_) => bail!(
                "GetContainerEvents: after 10 s only {got:?} for container {id}, want {want:?}"
            ),
            Ok(r) => r
                .context("GetContainerEvents stream")?
                .context("GetContainerEvents stream ended")?,
        };
        if ev.container_id != id {
            continue;
        }
        let ty = E::try_from(ev.container_event_type)
            .with_context(|| format!("unknown event type {}", ev.container_event_type))?;
        ensure!(ev.created_at > 0, "event {ty:?} without created_at");
        ensure!(
            ev.pod_sandbox_status
                .as_ref()
                .is_some_and(|p| p.id == pod_id),
            "event {ty:?} of {id} does not carry its pod's status (pod {pod_id})"
        );
        got.push(ty);
    }
    ensure!(
        got == want,
        "GetContainerEvents for {id}: {got:?}, want {want:?}"
    );
    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------

macro_rules! tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> Result<()> {
            with_crispd(
                stringify!($name),
                |r| prepare(stringify!($name), r),
                |e| Box::pin(super::$name(e)),
            )
            .await
        }
    )*};
}

mod crispd {
    use super::*;
    tests!(
        unknown_ids,
        wrong_state,
        bad_config,
        name_reuse,
        exit_reasons,
        list_filters,
        status_version_config,
        stop_signal,
        streaming_validation,
        container_events,
        retried_run_pod,
        pod_status,
        pid_namespace_modes
    );
}
