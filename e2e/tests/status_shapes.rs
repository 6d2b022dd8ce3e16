//! What crictl shows: the shape of the status calls' answers, end to end.
//!
//! - Verbose maps (crispd and containerd): `crictl inspectp/inspect/inspecti/info` print the
//!   response's own fields (`status`; for `info` also `runtimeHandlers` and `features`) and
//!   then merge every key of the verbose `info` map into the same top-level object, parsing a
//!   value that starts with `{` as JSON (and failing on one that does not parse). So no key
//!   may be one of the response's own fields, and every `{` value must be a JSON object.
//!   crispd answers with the single key `info`, as containerd does for pods, containers and
//!   images; its `info` carries the process ids the tests and operators read.
//! - ContainerStatus.user (crispd; containerd 1.6 predates the field): the uid, gid and
//!   supplementary groups of the container's first process, with the image's /etc/group
//!   groups merged (SupplementalGroupsPolicy Merge, the default) or not (Strict), equal to
//!   what the running process has in /proc/<pid>/status and what `id -G` prints inside.

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};
use crisp_e2e::cri::container_config;
use crisp_e2e::harness::{RuntimeKind, TestEnv, with_crispd};
use crisp_e2e::registry::Registry;
use crisp_proto::cri::v1 as api;

const BUSYBOX: &str = "docker.io/library/busybox:latest";

/// Checks one verbose map as crictl 1.36 will read it (cmd/crictl/util.go,
/// outputStatusData): `own` are the top-level keys crictl writes before merging the map.
fn check_map(what: &str, info: &HashMap<String, String>, own: &[&str]) -> Result<()> {
    ensure!(!info.is_empty(), "{what}: verbose answer has no info map");
    for (k, v) in info {
        ensure!(
            !own.contains(&k.as_str()),
            "{what}: verbose key {k:?} replaces the response's own field in crictl's output \
             (keys {:?})",
            info.keys()
        );
        if v.starts_with('{') {
            let doc: serde_json::Value = serde_json::from_str(v).with_context(|| {
                format!("{what}: value of {k:?} starts with '{{' but is not JSON")
            })?;
            ensure!(doc.is_object(), "{what}: {k:?} is not a JSON object");
        }
    }
    Ok(())
}

/// `info["info"]` as a JSON object (the key containerd and crispd use).
fn info_doc(what: &str, info: &HashMap<String, String>) -> Result<serde_json::Value> {
    let raw = info
        .get("info")
        .with_context(|| format!("{what}: no \"info\" key in {:?}", info.keys()))?;
    let doc: serde_json::Value =
        serde_json::from_str(raw).with_context(|| format!("{what}: \"info\" is not JSON"))?;
    ensure!(
        doc.is_object(),
        "{what}: \"info\" is not a JSON object: {doc}"
    );
    Ok(doc)
}

async fn verbose_maps(kind: RuntimeKind) -> Result<()> {
    let registry = Registry::start()?;
    registry.push(&["busybox", "pause"])?;
    let env = TestEnv::start(kind, &registry.host()).await?;
    let outcome = verbose_maps_in(&env, kind).await;
    env.finish(&format!("{kind}_verbose_maps"), outcome).await
}

async fn verbose_maps_in(env: &TestEnv, kind: RuntimeKind) -> Result<()> {
    let c = env.cri();
    c.pull(BUSYBOX, None).await?;
    let pod = env.pod_config("verbose")?;
    let pod_id = c.run_pod(&pod).await?;
    let ctr = container_config("sleeper", BUSYBOX, &["sleep", "3600"]);
    let cid = c.run_container(&pod_id, &ctr, &pod).await?;

    let p = c.pod_status_verbose(&pod_id).await?;
    check_map(
        &format!("{kind} PodSandboxStatus"),
        &p.info,
        &["status", "containersStatuses", "timestamp"],
    )?;
    let doc = info_doc(&format!("{kind} PodSandboxStatus"), &p.info)?;
    ensure!(
        doc["pid"].as_i64().is_some_and(|pid| pid > 0),
        "{kind} PodSandboxStatus info without the sandbox pid: {doc}"
    );

    let s = c.container_status_verbose(&cid).await?;
    check_map(&format!("{kind} ContainerStatus"), &s.info, &["status"])?;
    let doc = info_doc(&format!("{kind} ContainerStatus"), &s.info)?;
    ensure!(
        doc["pid"].as_i64().is_some_and(|pid| pid > 0) && doc["sandboxID"] == pod_id.as_str(),
        "{kind} ContainerStatus info without pid or sandboxID {pod_id}: {doc}"
    );
    ensure!(
        doc["runtimeSpec"]["process"].is_object(),
        "{kind} ContainerStatus info without the runtime spec: {doc}"
    );

    let img = c
        .image()
        .image_status(api::ImageStatusRequest {
            image: Some(api::ImageSpec {
                image: BUSYBOX.into(),
                ..Default::default()
            }),
            verbose: true,
        })
        .await
        .context("ImageStatus (verbose)")?
        .into_inner();
    check_map(&format!("{kind} ImageStatus"), &img.info, &["image"])?;
    let doc = info_doc(&format!("{kind} ImageStatus"), &img.info)?;
    ensure!(
        doc["imageSpec"].is_object() && doc["chainID"].as_str().is_some_and(|c| !c.is_empty()),
        "{kind} ImageStatus info without imageSpec and chainID: {doc}"
    );

    let st = c
        .runtime()
        .status(api::StatusRequest { verbose: true })
        .await
        .context("Status (verbose)")?
        .into_inner();
    check_map(
        &format!("{kind} Status"),
        &st.info,
        &["status", "runtimeHandlers", "features"],
    )?;
    match kind {
        // containerd 1.6 has several keys (config, golang, cniconfig, lastCNILoadStatus).
        RuntimeKind::Containerd => ensure!(
            st.info.get("config").is_some_and(|c| c.starts_with('{')),
            "containerd Status without its config: {:?}",
            st.info.keys()
        ),
        // crispd: one key, so no later crictl field can be shadowed either.
        RuntimeKind::Crispd => {
            ensure!(
                st.info.keys().collect::<Vec<_>>() == vec!["info"],
                "crispd Status verbose keys {:?}, want only \"info\"",
                st.info.keys()
            );
            let doc = info_doc("crispd Status", &st.info)?;
            ensure!(
                doc["config"]["listen"].is_string() && doc["lastCNILoadStatus"] == "OK",
                "crispd Status info without config or lastCNILoadStatus OK: {doc}"
            );
        }
    }
    if kind == RuntimeKind::Crispd {
        for (what, keys) in [
            ("PodSandboxStatus", p.info.keys().collect::<Vec<_>>()),
            ("ContainerStatus", s.info.keys().collect()),
            ("ImageStatus", img.info.keys().collect()),
        ] {
            ensure!(
                keys == vec!["info"],
                "crispd {what} verbose keys {keys:?}, want only \"info\""
            );
        }
    }
    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_verbose_maps() -> Result<()> {
    verbose_maps(RuntimeKind::Containerd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crispd_verbose_maps() -> Result<()> {
    verbose_maps(RuntimeKind::Crispd).await
}

// ---------------------------------------------------------------------------------------
// ContainerStatus.user

/// `Uid:`, `Gid:` (real ids) and `Groups:` of a process, as the host sees it.
fn proc_identity(pid: i32) -> Result<(i64, i64, Vec<i64>)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |key: &str| -> Result<Vec<i64>> {
        let line = status
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("/proc/{pid}/status has no {key} line"))?;
        line[key.len()..]
            .split_whitespace()
            .map(|n| n.parse().with_context(|| format!("bad line {line:?}")))
            .collect()
    };
    let uid = *field("Uid:")?.first().context("empty Uid:")?;
    let gid = *field("Gid:")?.first().context("empty Gid:")?;
    let mut groups = field("Groups:")?;
    groups.sort_unstable();
    Ok((uid, gid, groups))
}

/// One container per case; the busybox image's /etc/group has `wheel:x:10:root`, so root's
/// image groups are {10}.
async fn container_user(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    let pod = env.pod_config("users")?;
    let pod_id = c.run_pod(&pod).await?;
    let merge = api::SupplementalGroupsPolicy::Merge as i32;
    let strict = api::SupplementalGroupsPolicy::Strict as i32;
    // (name, run_as_user, run_as_group, supplemental_groups, policy, want uid, gid, groups)
    type Case = (
        &'static str,
        i64,
        Option<i64>,
        Vec<i64>,
        i32,
        (i64, i64, Vec<i64>),
    );
    let cases: [Case; 4] = [
        (
            "root-merge",
            0,
            None,
            vec![1234],
            merge,
            (0, 0, vec![0, 10, 1234]),
        ),
        (
            "root-strict",
            0,
            None,
            vec![1234],
            strict,
            (0, 0, vec![0, 1234]),
        ),
        // uid 1000 is in no image group: Merge adds nothing, the primary group is listed.
        (
            "uid-merge",
            1000,
            Some(3000),
            vec![4000],
            merge,
            (1000, 3000, vec![3000, 4000]),
        ),
        (
            "uid-strict",
            1000,
            Some(3000),
            vec![],
            strict,
            (1000, 3000, vec![3000]),
        ),
    ];
    for (name, uid, gid, groups, policy, want) in cases {
        let mut cfg = container_config(name, BUSYBOX, &["sleep", "3600"]);
        cfg.linux = Some(api::LinuxContainerConfig {
            security_context: Some(api::LinuxContainerSecurityContext {
                run_as_user: Some(api::Int64Value { value: uid }),
                run_as_group: gid.map(|value| api::Int64Value { value }),
                supplemental_groups: groups,
                supplemental_groups_policy: policy,
                ..Default::default()
            }),
            ..Default::default()
        });
        let cid = c.run_container(&pod_id, &cfg, &pod).await?;
        let user = c.container_status(&cid).await?.user;
        let linux = user
            .as_ref()
            .and_then(|u| u.linux.clone())
            .with_context(|| format!("{name}: ContainerStatus.user is {user:?}"))?;
        let mut reported = linux.supplemental_groups.clone();
        reported.sort_unstable();
        ensure!(
            (linux.uid, linux.gid, reported.clone()) == want,
            "{name}: ContainerStatus.user {linux:?}, want {want:?}"
        );
        // The process really has it: the kernel's view, and `id -G` inside.
        let pid = c.container_pid(&cid).await?;
        let real = proc_identity(pid)?;
        ensure!(
            real == want,
            "{name}: /proc/{pid}/status says uid, gid, groups {real:?}, status says {want:?}"
        );
        let id_g = c.exec_ok(&cid, &["id", "-G"]).await?;
        let mut inside: Vec<i64> = id_g
            .split_whitespace()
            .map(|g| {
                g.parse()
                    .with_context(|| format!("{name}: id -G printed {id_g:?}"))
            })
            .collect::<Result<_>>()?;
        inside.sort_unstable();
        ensure!(
            inside == want.2,
            "{name}: `id -G` inside prints {id_g:?}, want {:?}",
            want.2
        );
    }
    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crispd_container_user_per_supplemental_groups_policy() -> Result<()> {
    with_crispd(
        "crispd_container_user_per_supplemental_groups_policy",
        |_| Ok(()),
        |env| Box::pin(container_user(env)),
    )
    .await
}
