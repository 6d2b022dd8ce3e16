//! Pods with a user namespace (userns_options mode POD, no mappings: crispd allocates 65536
//! IDs from the configured user's subordinate ranges), end to end with busybox under runc.
//!
//! The pod's network namespace is created by the shim together with the pause's user
//! namespace and pinned/attached by crispd afterwards (as containerd does), so a container,
//! which joins the user namespace first, can still join the pod's netns.
//!
//! - Two pods get disjoint host ID ranges (promise 1); each container's root is the first ID
//!   of its pod's range on the host (/proc/<pid>/status), `id -u` inside is 0 and so is
//!   ContainerStatus.user (IDs inside the container, not the host's), the rootfs is
//!   owned by 0 inside (`ls -ln /`), eth0 carries the IP PodSandboxStatus reports, and the
//!   host reaches a server in the pod at that IP.
//! - With both ranges of the (test-private) subuid file in use, a third pod is refused with
//!   ResourceExhausted and leaves nothing; once a pod is removed, the third gets its range.
//! - Host network, PID or IPC with a user namespace is InvalidArgument naming the field and
//!   value (as kubelet), and leaves no pod.
//! - Teardown finds no leak (netns, mounts, cgroups, processes).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use crisp_e2e::cri::{self, container_config};
use crisp_e2e::harness::{RuntimeKind, TestEnv, read_once};
use crisp_e2e::registry::Registry;
use crisp_proto::cri::v1 as api;

const BUSYBOX: &str = "docker.io/library/busybox:latest";
const RANGE: u32 = 65536;
const UID_BASE: u32 = 3_000_000;
const GID_BASE: u32 = 5_000_000;

/// First field of a `Uid:`/`Gid:` line of /proc/<pid>/status (the real id, as the host sees it).
fn host_id(pid: i32, key: &str) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("/proc/{pid}/status has no {key} line"))?;
    line.split_whitespace()
        .nth(1)
        .with_context(|| format!("bad line {line:?}"))?
        .parse()
        .with_context(|| format!("bad line {line:?}"))
}

struct Running {
    pod: String,
    container: String,
    host_uid: u32,
}

/// Run a userns pod with a sleeping busybox and check it from inside and from the host.
async fn run_and_check(env: &TestEnv, name: &str) -> Result<Running> {
    let cfg = env.userns_pod_config(name)?;
    let pod = env.cri().run_pod(&cfg).await?;
    // One answer per connection, forever: the host may connect before nc listens.
    let serve = format!("while true; do echo hello-{name} | nc -l -p 8080; done");
    let cc = container_config("main", BUSYBOX, &["sh", "-c", &serve]);
    let container = env.cri().create_container(&pod, &cc, &cfg).await?;
    env.cri().start_container(&container).await?;

    // Inside: root, owning the rootfs.
    let uid = env.cri().exec_ok(&container, &["id", "-u"]).await?;
    ensure!(uid.trim() == "0", "{name}: id -u inside is {uid:?}, want 0");
    let ls = env.cri().exec_ok(&container, &["ls", "-ln", "/"]).await?;
    let mut entries = 0;
    for line in ls.lines().filter(|l| !l.starts_with("total")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        ensure!(f.len() >= 4, "{name}: odd ls line {line:?}");
        // The roots of procfs and sysfs belong to the initial namespace's root, which reads
        // as the overflow id (65534) in any user namespace: not the image's files.
        if matches!(f.last(), Some(&"proc") | Some(&"sys")) {
            continue;
        }
        ensure!(
            f[2] == "0" && f[3] == "0",
            "{name}: {line:?} is not owned by 0:0 inside (ls -ln /:\n{ls})"
        );
        entries += 1;
    }
    ensure!(
        entries > 5,
        "{name}: ls -ln / listed only {entries} entries:\n{ls}"
    );

    // Host side: the container's root is the first ID of the pod's range, gid likewise.
    let pid = env.cri().container_pid(&container).await?;
    let host_uid = host_id(pid, "Uid:")?;
    let host_gid = host_id(pid, "Gid:")?;
    ensure!(
        (UID_BASE..UID_BASE + 2 * RANGE).contains(&host_uid)
            && (host_uid - UID_BASE).is_multiple_of(RANGE),
        "{name}: container root is host uid {host_uid}, want the start of a range in the \
         test's subuid file ({UID_BASE}, {})",
        UID_BASE + RANGE
    );
    ensure!(
        host_gid == GID_BASE + (host_uid - UID_BASE),
        "{name}: container root is host gid {host_gid} (uid {host_uid})"
    );
    // ContainerStatus.user is the identity inside the container (what the pod asked for and
    // `id` prints there), not the host IDs it maps to.
    let user = env.cri().container_status(&container).await?.user;
    let linux = user.as_ref().and_then(|u| u.linux.as_ref());
    ensure!(
        linux.is_some_and(|l| l.uid == 0 && l.gid == 0 && l.supplemental_groups.contains(&0)),
        "{name}: ContainerStatus.user {user:?}, want uid 0, gid 0 inside (host {host_uid}:{host_gid})"
    );
    // The pause is in the same user namespace (its 65535 is the range's last ID).
    let pause = env.cri().sandbox_pid(&pod).await?;
    let ns = |p: i32, n: &str| std::fs::read_link(format!("/proc/{p}/ns/{n}"));
    for n in ["user", "net"] {
        ensure!(
            ns(pid, n)? == ns(pause, n)?,
            "{name}: container is not in the pause's {n} namespace"
        );
        ensure!(
            ns(pid, n)? != std::fs::read_link(format!("/proc/self/ns/{n}"))?,
            "{name}: container is in the host's {n} namespace"
        );
    }
    ensure!(
        host_id(pause, "Uid:")? == host_uid + 65535,
        "{name}: pause runs as host uid {}, want {}",
        host_id(pause, "Uid:")?,
        host_uid + 65535
    );

    // Network: eth0 carries the IP the runtime reports.
    let ip = env.cri().pod_ip(&pod).await?;
    let addr = env
        .cri()
        .exec_ok(&container, &["ip", "-o", "addr", "show", "dev", "eth0"])
        .await?;
    ensure!(
        addr.contains(&format!("inet {ip}/")),
        "{name}: eth0 inside does not have the pod IP {ip}: {addr:?}"
    );
    // Loopback works inside too (the netns is the pod's own, with lo up).
    let lo = env
        .cri()
        .exec_ok(&container, &["cat", "/proc/net/fib_trie"])
        .await?;
    ensure!(
        lo.contains(&ip.to_string()),
        "{name}: fib_trie lacks {ip}:\n{lo}"
    );
    // And the host reaches a server in the pod over the bridge.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match read_once(ip, 8080).await {
            Ok(got) if got.trim() == format!("hello-{name}") => break,
            other if Instant::now() >= deadline => {
                bail!("{name}: no answer from {ip}:8080: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    Ok(Running {
        pod,
        container,
        host_uid,
    })
}

async fn remove(env: &TestEnv, r: &Running) -> Result<()> {
    env.cri().stop_container(&r.container, 0).await?;
    env.cri().remove_container(&r.container).await?;
    env.cri().stop_pod(&r.pod).await?;
    env.cri().remove_pod(&r.pod).await
}

async fn body(env: &TestEnv) -> Result<()> {
    env.cri().pull(BUSYBOX, None).await?;

    // Host network, PID or IPC + user namespace: refused before anything is made.
    for field in ["network", "pid", "ipc"] {
        let mut bad = env.userns_pod_config(&format!("host{field}"))?;
        if let Some(ns) = bad
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|s| s.namespace_options.as_mut())
        {
            let node = api::NamespaceMode::Node as i32;
            match field {
                "network" => ns.network = node,
                "pid" => ns.pid = node,
                _ => ns.ipc = node,
            }
        }
        match env.cri().run_pod(&bad).await {
            Ok(id) => bail!("host {field} + userns pod {id} was accepted"),
            Err(e) => {
                ensure!(
                    cri::grpc_code(&e) == Some(tonic::Code::InvalidArgument),
                    "host {field} + userns: {e:#}"
                );
                let msg = format!("{e:#}");
                ensure!(
                    msg.contains("namespace_options")
                        && msg.contains("userns_options")
                        && msg.contains(&format!("{field} NODE")),
                    "host {field} + userns: message does not name the field and value: {msg}"
                );
            }
        }
    }
    let left = env.cri().list_pods().await?;
    ensure!(left.is_empty(), "refused pods left records: {left:?}");

    let a = run_and_check(env, "userns-a").await?;
    let b = run_and_check(env, "userns-b").await?;
    ensure!(
        a.host_uid.abs_diff(b.host_uid) >= RANGE,
        "pods share ID ranges: uid {} and {}",
        a.host_uid,
        b.host_uid
    );
    // A container's processes are the pod's: two containers of different pods never share.
    ensure!(a.host_uid != 0 && b.host_uid != 0);

    // Both ranges of the subuid file are taken: a third pod is refused, leaving nothing.
    let before = env.cri().list_pods().await?.len();
    let third = env.userns_pod_config("userns-c")?;
    match env.cri().run_pod(&third).await {
        Ok(id) => bail!("third userns pod {id} got a range although both are in use"),
        Err(e) => ensure!(
            cri::grpc_code(&e) == Some(tonic::Code::ResourceExhausted),
            "third pod: {e:#}"
        ),
    }
    ensure!(
        env.cri().list_pods().await?.len() == before,
        "the refused pod left a record"
    );
    ensure!(
        env.netns_files().len() == 2,
        "netns files: {:?}",
        env.netns_files()
    );

    // Removing a pod releases its range: the third gets exactly it.
    remove(env, &a).await?;
    let c = run_and_check(env, "userns-c").await?;
    ensure!(
        c.host_uid == a.host_uid,
        "third pod got uid {}, want the released {}",
        c.host_uid,
        a.host_uid
    );
    remove(env, &b).await?;
    remove(env, &c).await?;
    ensure!(
        env.netns_files().is_empty(),
        "netns files left: {:?}",
        env.netns_files()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crispd_userns_pods() -> Result<()> {
    let t0 = Instant::now();
    let registry = Registry::start()?;
    registry.push(&["busybox", "pause"])?;
    // Test-private subordinate ID files: exactly two pod ranges, so exhaustion and release
    // are visible, and nothing depends on the host's /etc/subuid.
    let ids = tempfile::tempdir()?;
    let subuid = ids.path().join("subuid");
    let subgid = ids.path().join("subgid");
    std::fs::write(
        &subuid,
        format!("other:100000:65536\ncrisp:{UID_BASE}:{}\n", 2 * RANGE),
    )?;
    std::fs::write(&subgid, format!("crisp:{GID_BASE}:{}\n", 2 * RANGE))?;
    let env = TestEnv::builder(RuntimeKind::Crispd)
        .mirror(registry.host())
        .crispd_config(format!(
            "[userns]\nuser = \"crisp\"\nsubuid_file = \"{}\"\nsubgid_file = \"{}\"\n",
            subuid.display(),
            subgid.display()
        ))
        .start()
        .await?;
    let outcome = body(&env).await;
    if outcome.is_err() {
        eprintln!("crispd log tail:\n{}", env.daemon_log_tail(80));
    }
    let leaks = env.teardown().await;
    eprintln!("crispd_userns_pods: {:?}", t0.elapsed());
    outcome?;
    ensure!(leaks.is_empty(), "teardown left {leaks:#?}");
    Ok(())
}

/// A CNI ADD that fails after the pause's netns was pinned (a chained plugin refuses) undoes
/// everything: no pod, netns, shim, veth or IP allocation left, and the ID range is released —
/// with room for one range only, a second attempt fails the same way instead of
/// ResourceExhausted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crispd_userns_failed_cni_add_undoes() -> Result<()> {
    let t0 = Instant::now();
    let registry = Registry::start()?;
    registry.push(&["pause"])?;
    let ids = tempfile::tempdir()?;
    let subuid = ids.path().join("subuid");
    let subgid = ids.path().join("subgid");
    std::fs::write(&subuid, format!("crisp:{UID_BASE}:{RANGE}\n"))?;
    std::fs::write(&subgid, format!("crisp:{GID_BASE}:{RANGE}\n"))?;
    let env = TestEnv::builder(RuntimeKind::Crispd)
        .mirror(registry.host())
        .without_cni_config()
        .crispd_config(format!(
            "[userns]\nsubuid_file = \"{}\"\nsubgid_file = \"{}\"\n",
            subuid.display(),
            subgid.display()
        ))
        .start()
        .await?;
    let outcome = async {
        // bridge + host-local succeed, then tuning fails on a sysctl that does not exist.
        let tuning = serde_json::json!({
            "type": "tuning",
            "sysctl": { "net.ipv4.conf.eth0.crisp_no_such_sysctl": "1" },
        });
        let conflist = env.network().conflist_with(&env.cni_ipam_dir(), &[tuning]);
        let tmp = env.root.join(".conflist.tmp");
        std::fs::write(&tmp, conflist)?;
        std::fs::rename(&tmp, env.cni_conf_dir.join("10-crisp-e2e.conflist"))?;
        for attempt in 0..2 {
            let cfg = env.userns_pod_config(&format!("cni-fails-{attempt}"))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let err = loop {
                match env.cri().run_pod(&cfg).await {
                    Ok(id) => bail!("pod {id} started although CNI ADD must fail"),
                    // The daemon has not seen the conflist yet.
                    Err(e)
                        if cri::grpc_code(&e) == Some(tonic::Code::FailedPrecondition)
                            && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Err(e) => break e,
                }
            };
            let msg = format!("{err:#}");
            ensure!(
                cri::grpc_code(&err) != Some(tonic::Code::ResourceExhausted),
                "attempt {attempt}: the ID range of the failed pod was not released: {msg}"
            );
            ensure!(msg.contains("tuning"), "attempt {attempt}: {msg}");
            ensure!(
                env.cri().list_pods().await?.is_empty(),
                "attempt {attempt}: a pod record is left"
            );
            ensure!(
                env.netns_files().is_empty(),
                "attempt {attempt}: netns left: {:?}",
                env.netns_files()
            );
            ensure!(
                env.shim_pids().is_empty(),
                "attempt {attempt}: shims left: {:?}",
                env.shim_pids()
            );
        }
        Ok(())
    }
    .await;
    if outcome.is_err() {
        eprintln!("crispd log tail:\n{}", env.daemon_log_tail(80));
    }
    let leaks = env.teardown().await;
    eprintln!("crispd_userns_failed_cni_add_undoes: {:?}", t0.elapsed());
    outcome?;
    ensure!(leaks.is_empty(), "teardown left {leaks:#?}");
    Ok(())
}
