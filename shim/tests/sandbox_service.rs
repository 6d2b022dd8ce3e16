//! containerd's sandbox API on the real shim binary, started the way crispd starts it
//! (`start` in the pod's bundle dir, which holds no config.json), with a ttrpc events
//! server of the test's own: the pause joins a real network namespace, gets new pid/ipc/uts
//! namespaces, its hostname, sysctls, oom_score_adj, user and cgroup placement; stops on
//! SIGTERM; its exit reaches WaitSandbox and the events server; ShutdownSandbox ends the
//! shim and removes its socket; nothing is left behind.
//!
//! Needs root and iproute2 (`ip netns`), util-linux (`nsenter`).

#![allow(clippy::unwrap_used)]

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use async_trait::async_trait;
use containerd_shim_protos::{
    api::{Empty, ForwardRequest},
    events::task::TaskExit,
    protobuf::{Message, MessageField, well_known_types::any::Any},
    sandbox_api as sb,
    sandbox_async::SandboxClient,
    shim_async::{Events, create_events},
    ttrpc::{self, Code, r#async::TtrpcContext},
};
use serde_json::{Value, json};

const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// The shim binary these tests start: the one cargo built with them, or `CRISP_SHIM_BIN`
/// (the static release shim `make release` builds, to run this suite against it).
fn shim_binary() -> std::path::PathBuf {
    std::env::var_os("CRISP_SHIM_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_containerd-shim-crisp-v2").into())
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(20).as_nanos() as i64)
}

/// The events crispd would receive: (topic, container id of a TaskExit).
#[derive(Clone, Default)]
struct EventSink(Arc<Mutex<Vec<(String, String, u32)>>>);

#[async_trait]
impl Events for EventSink {
    async fn forward(&self, _: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        let env = req.envelope();
        let (id, status) = if env.topic() == "/tasks/exit" {
            let ev = TaskExit::parse_from_bytes(&env.event().value).unwrap_or_default();
            (ev.container_id, ev.exit_status)
        } else {
            (String::new(), 0)
        };
        self.0
            .lock()
            .unwrap()
            .push((env.topic().to_string(), id, status));
        Ok(Empty::default())
    }
}

/// Everything a test made, removed on drop even when the test fails.
struct Fixture {
    dir: tempfile::TempDir,
    netns: String,
    cgroup_parent: String,
    shim_pid: Option<i32>,
    pause_pid: Option<i32>,
    socket: Option<PathBuf>,
    _server: ttrpc::r#async::Server,
    events: EventSink,
}

fn cgroup_hierarchies() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fs = right.split_whitespace().next()?;
            let mountpoint = left.split_whitespace().nth(4)?;
            (fs == "cgroup" || fs == "cgroup2").then(|| PathBuf::from(mountpoint))
        })
        .collect();
    out.dedup();
    out
}

fn alive(pid: i32) -> bool {
    // A zombie is not alive: read its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

impl Fixture {
    async fn new(tag: &str) -> Result<Fixture> {
        let dir = tempfile::Builder::new()
            .prefix("crisp-sandbox-test-")
            .tempdir_in("/var/tmp")?;
        let netns = format!("crisp-sbtest-{tag}-{}", std::process::id());
        let st = Command::new("ip")
            .args(["netns", "add", &netns])
            .status()
            .context("ip netns add")?;
        ensure!(st.success(), "ip netns add {netns}: {st}");
        let events = EventSink::default();
        let ev_path = dir.path().join("events.sock");
        let listener = std::os::unix::net::UnixListener::bind(&ev_path)?;
        let mut server = ttrpc::r#async::Server::new()
            .add_listener(ttrpc::r#async::transport::Listener::try_from(listener)?)
            .register_service(create_events(Arc::new(events.clone())));
        server.start().await?;
        Ok(Fixture {
            dir,
            netns,
            cgroup_parent: format!("/crisp-sbtest-{tag}-{}", std::process::id()),
            shim_pid: None,
            pause_pid: None,
            socket: None,
            _server: server,
            events,
        })
    }

    fn bundle(&self) -> PathBuf {
        self.dir.path().join("bundle")
    }

    fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }

    /// CreateSandbox of `id` in this fixture's bundle, `spec` as the options and `netns_path`
    /// ("" for none) as crispd sends it.
    fn create_request(&self, id: &str, spec: &Value, netns_path: &str) -> sb::CreateSandboxRequest {
        sb::CreateSandboxRequest {
            sandbox_id: id.to_string(),
            bundle_path: self.bundle().display().to_string(),
            netns_path: netns_path.to_string(),
            options: spec_any(spec),
            ..Default::default()
        }
    }

    /// `containerd-shim-crisp-v2 ... -id <pod> start` exactly as crispd runs it.
    async fn start_shim(&mut self, pod_id: &str) -> Result<SandboxClient> {
        std::fs::create_dir_all(self.bundle())?;
        let events = self.dir.path().join("events.sock").display().to_string();
        let out = Command::new(shim_binary())
            .args([
                "-namespace",
                "k8s.io",
                "-address",
                &events,
                "-publish-binary",
                "/bin/true",
                "-id",
                pod_id,
                "start",
            ])
            .current_dir(self.bundle())
            .env("TTRPC_ADDRESS", &events)
            .env("CRISP_SHIM_LOG", self.dir.path().join("shim.log"))
            .stdin(Stdio::null())
            .output()
            .context("run shim start")?;
        ensure!(
            out.status.success(),
            "shim start: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let address = String::from_utf8(out.stdout)?.trim().to_string();
        ensure!(address.starts_with("unix://"), "shim printed {address:?}");
        self.socket = Some(PathBuf::from(address.trim_start_matches("unix://")));
        self.shim_pid = Some(
            std::fs::read_to_string(self.bundle().join("shim.pid"))?
                .trim()
                .parse()?,
        );
        let client = ttrpc::r#async::Client::connect(&address)
            .await
            .context("connect to the shim")?;
        Ok(SandboxClient::new(client))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("shim.log")).unwrap_or_default()
    }

    fn leaf_dirs(&self, id: &str) -> Vec<PathBuf> {
        let rel = format!("{}/crisp-{id}", self.cgroup_parent.trim_start_matches('/'));
        cgroup_hierarchies()
            .into_iter()
            .map(|h| h.join(&rel))
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for pid in [self.pause_pid, self.shim_pid].into_iter().flatten() {
            if alive(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        if let Some(s) = &self.socket {
            let _ = std::fs::remove_file(s);
        }
        let rel = self.cgroup_parent.trim_start_matches('/').to_string();
        for h in cgroup_hierarchies() {
            let parent = h.join(&rel);
            if let Ok(rd) = std::fs::read_dir(&parent) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&parent);
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn start_request(id: &str) -> sb::StartSandboxRequest {
    sb::StartSandboxRequest {
        sandbox_id: id.to_string(),
        ..Default::default()
    }
}

fn spec_any(spec: &Value) -> MessageField<Any> {
    MessageField::some(Any {
        type_url: SPEC_TYPE_URL.into(),
        value: serde_json::to_vec(spec).unwrap(),
        ..Default::default()
    })
}

fn nsenter(pid: i32, ns: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("nsenter")
        .arg("-t")
        .arg(pid.to_string())
        .arg(ns)
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "nsenter {ns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

fn ns_inode(path: impl AsRef<Path>) -> Result<u64> {
    let p = path.as_ref();
    Ok(std::fs::metadata(p)
        .with_context(|| format!("stat {}", p.display()))?
        .ino())
}

fn status_field(pid: i32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

fn code(e: &ttrpc::Error) -> Option<(Code, String)> {
    match e {
        ttrpc::Error::RpcStatus(s) => Some((s.code(), s.message().to_string())),
        _ => None,
    }
}

async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > limit {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_lifecycle_through_the_real_shim() -> Result<()> {
    let mut fx = Fixture::new("life").await?;
    let id = format!("sbtest{}", std::process::id());
    let client = fx.start_shim(&id).await?;
    let shim_pid = fx.shim_pid.context("shim pid")?;

    let spec = json!({
        "ociVersion": "1.1.0",
        "hostname": "sbtest-host",
        "process": {"args": ["/pause"], "user": {"uid": 65535, "gid": 65535}, "oomScoreAdj": 321},
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network", "path": fx.netns_path()}],
            "sysctl": {"net.ipv4.ip_unprivileged_port_start": "123", "kernel.shmmni": "1234"},
            "cgroupsPath": format!("{}/whatever-crispd-wrote", fx.cgroup_parent),
        },
    });
    let create = fx.create_request(&id, &spec, &fx.netns_path());
    client
        .create_sandbox(ctx(), &create)
        .await
        .with_context(|| fx.log())?;
    // A second create of the same id is refused.
    let again = client
        .create_sandbox(ctx(), &create)
        .await
        .expect_err("second create");
    assert_eq!(
        code(&again).map(|c| c.0),
        Some(Code::ALREADY_EXISTS),
        "{again:?}"
    );

    let t0 = Instant::now();
    let started = client
        .start_sandbox(ctx(), &start_request(&id))
        .await
        .with_context(|| fx.log())?;
    let latency = t0.elapsed();
    let pid = started.pid as i32;
    fx.pause_pid = Some(pid);
    eprintln!(
        "StartSandbox latency (ttrpc round trip): {:.2} ms",
        latency.as_secs_f64() * 1000.0
    );
    if let Some(line) = fx.log().lines().find(|l| l.contains("pause started")) {
        eprintln!("shim log: {line}");
    }
    assert!(started.created_at.is_some());
    assert!(alive(pid), "pause {pid} not running");
    eprintln!("pause RSS: {}", status_field(pid, "VmRSS:"));

    // What runs is the embedded pause, from the memfd.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    assert!(
        exe.to_string_lossy().contains("crisp-pause"),
        "{}",
        exe.display()
    );

    // Namespaces: the given netns joined; new pid/ipc/uts.
    assert_eq!(
        ns_inode(format!("/proc/{pid}/ns/net"))?,
        ns_inode(fx.netns_path())?,
        "network namespace"
    );
    for ns in ["pid", "ipc", "uts"] {
        assert_ne!(
            ns_inode(format!("/proc/{pid}/ns/{ns}"))?,
            ns_inode(format!("/proc/{shim_pid}/ns/{ns}"))?,
            "{ns} namespace"
        );
    }
    // PID 1 of its own pid namespace.
    assert_eq!(
        status_field(pid, "NSpid:").split_whitespace().last(),
        Some("1")
    );

    // Hostname and sysctls, read inside pause's namespaces.
    assert_eq!(
        nsenter(pid, "-u", &["cat", "/proc/sys/kernel/hostname"])?,
        "sbtest-host"
    );
    assert_eq!(
        nsenter(
            pid,
            "-n",
            &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"]
        )?,
        "123"
    );
    assert_eq!(
        nsenter(pid, "-i", &["cat", "/proc/sys/kernel/shmmni"])?,
        "1234"
    );
    // oom_score_adj and user as the spec says.
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))?.trim(),
        "321"
    );
    assert!(
        status_field(pid, "Uid:").starts_with("65535"),
        "{}",
        status_field(pid, "Uid:")
    );
    assert!(
        status_field(pid, "Gid:").starts_with("65535"),
        "{}",
        status_field(pid, "Gid:")
    );
    // No privilege at all.
    for key in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(status_field(pid, key), "0000000000000000", "{key}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");

    // Placement: the same crisp-<id> leaf under the parent in every v1 controller.
    let want = format!("{}/crisp-{id}", fx.cgroup_parent);
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    for ctrl in [
        "memory", "cpu", "pids", "cpuset", "blkio", "devices", "freezer",
    ] {
        let line = cg.lines().find(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|c| c == ctrl))
        });
        if let Some(line) = line {
            assert!(line.ends_with(&format!(":{want}")), "{ctrl}: {line}\n{cg}");
        }
    }
    assert!(cg.lines().any(|l| l.contains(":memory:")), "{cg}");
    // The cgroup2 hierarchy too (hybrid hosts mount it at /sys/fs/cgroup/unified).
    if cgroup_hierarchies()
        .iter()
        .any(|h| h.join("cgroup.controllers").exists())
    {
        assert!(
            cg.lines().any(|l| l == format!("0::{want}")),
            "cgroup2 placement:\n{cg}"
        );
    }

    // No thread of the shim stayed in the pod's cgroup (the spawning thread moves back).
    for task in std::fs::read_dir(format!("/proc/{shim_pid}/task"))? {
        let tcg = std::fs::read_to_string(task?.path().join("cgroup")).unwrap_or_default();
        assert!(
            !tcg.contains(&fx.cgroup_parent),
            "a shim thread is in the pod's cgroup:\n{tcg}"
        );
    }

    // Status: ready, with the pid.
    let st = client
        .sandbox_status(
            ctx(),
            &sb::SandboxStatusRequest {
                sandbox_id: id.clone(),
                verbose: true,
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(
        (st.state.as_str(), st.pid, st.sandbox_id.as_str()),
        ("SANDBOX_READY", started.pid, id.as_str())
    );
    assert_eq!(
        st.info.get("cgroupsPath").map(String::as_str),
        Some(want.as_str())
    );
    client
        .ping_sandbox(
            ctx(),
            &sb::PingRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            },
        )
        .await?;
    let m = client
        .sandbox_metrics(
            ctx(),
            &sb::SandboxMetricsRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(m.metrics.id, id);
    assert!(
        m.metrics
            .data
            .type_url
            .starts_with("io.containerd.cgroups.v"),
        "{}",
        m.metrics.data.type_url
    );
    let unknown = client
        .sandbox_status(
            ctx(),
            &sb::SandboxStatusRequest {
                sandbox_id: "nope".into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("unknown id");
    assert_eq!(code(&unknown).map(|c| c.0), Some(Code::NOT_FOUND));

    // PID 1 reaps: an orphan started inside the pod's pid namespace is re-parented to
    // pause and must not stay a zombie once it exits.
    // (Its stdio away from nsenter's pipes, or output() would wait for it to exit.)
    nsenter(
        pid,
        "-p",
        &["sh", "-c", "(sleep 1 </dev/null >/dev/null 2>&1 &); true"],
    )?;
    let children = || -> Vec<String> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    wait_until(
        "an orphan re-parented to pause",
        Duration::from_secs(2),
        || !children().is_empty(),
    )
    .await?;
    wait_until("pause to reap the orphan", Duration::from_secs(5), || {
        children().is_empty()
    })
    .await?;

    // Wait in the background, stop, and see the exit everywhere.
    let waiter = {
        let c = client.clone();
        let id = id.clone();
        tokio::spawn(async move {
            c.wait_sandbox(
                ctx(),
                &sb::WaitSandboxRequest {
                    sandbox_id: id,
                    ..Default::default()
                },
            )
            .await
        })
    };
    client
        .stop_sandbox(
            ctx(),
            &sb::StopSandboxRequest {
                sandbox_id: id.clone(),
                timeout_secs: 5,
                ..Default::default()
            },
        )
        .await?;
    let waited = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await??
        .context("WaitSandbox")?;
    assert_eq!(waited.exit_status, 0, "pause exits 0 on SIGTERM");
    assert!(waited.exited_at.is_some());
    assert!(!alive(pid));
    let st = client
        .sandbox_status(
            ctx(),
            &sb::SandboxStatusRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(st.state, "SANDBOX_NOTREADY");
    assert!(st.exited_at.is_some());
    // Idempotent.
    client
        .stop_sandbox(
            ctx(),
            &sb::StopSandboxRequest {
                sandbox_id: id.clone(),
                timeout_secs: 5,
                ..Default::default()
            },
        )
        .await?;
    // The exit was published as containerd does, with the sandbox id.
    let events = fx.events.clone();
    let id2 = id.clone();
    wait_until("/tasks/exit event", Duration::from_secs(5), || {
        events
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|(t, cid, status)| t == "/tasks/exit" && *cid == id2 && *status == 0)
    })
    .await?;
    // The pause's own cgroup went with it, and the record `delete` would need.
    for d in fx.leaf_dirs(&id) {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    assert!(!fx.bundle().join("crisp-sandbox.json").exists());

    // Shutdown: the shim exits and removes its socket.
    client
        .shutdown_sandbox(
            ctx(),
            &sb::ShutdownSandboxRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            },
        )
        .await?;
    let socket = fx.socket.clone().context("socket")?;
    wait_until("the shim to exit", Duration::from_secs(5), || {
        !alive(shim_pid)
    })
    .await
    .with_context(|| fx.log())?;
    assert!(!socket.exists(), "socket {} left behind", socket.display());
    // No mount of ours anywhere (pause made none; the netns bind is the test's).
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(
        !mounts.contains(&id),
        "a mount names the sandbox:\n{mounts}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sandbox_specs_are_invalid_arguments_naming_the_field() -> Result<()> {
    let mut fx = Fixture::new("bad").await?;
    let id = format!("sbbad{}", std::process::id());
    let client = fx.start_shim(&id).await?;
    let create = |spec: Value, netns: &str| fx.create_request(&id, &spec, netns);
    let cases = [
        (create(json!({"hostname": "h"}), ""), "hostname"),
        (
            create(json!({"linux": {"namespaces": [{"type": "bogus"}]}}), ""),
            "linux.namespaces[0].type",
        ),
        (
            create(
                json!({"linux": {"sysctl": {"net.core.somaxconn": "1"}}}),
                "",
            ),
            "linux.sysctl[\"net.core.somaxconn\"]",
        ),
        (
            create(
                json!({"linux": {"namespaces": [{"type": "network"}], "sysctl": {"vm.swappiness": "1"}}}),
                "",
            ),
            "vm.swappiness",
        ),
        (
            create(json!({"linux": {"cgroupsPath": "/a/../../etc/x"}}), ""),
            "linux.cgroupsPath",
        ),
        (create(json!({}), "/run/netns/whatever"), "netns_path"),
        (
            sb::CreateSandboxRequest {
                options: MessageField::some(Any {
                    type_url: "x.y".into(),
                    value: vec![1],
                    ..Default::default()
                }),
                ..create(json!({}), "")
            },
            "options.type_url",
        ),
        (
            sb::CreateSandboxRequest {
                sandbox_id: String::new(),
                ..create(json!({}), "")
            },
            "sandbox_id",
        ),
    ];
    for (req, field) in cases {
        let e = client.create_sandbox(ctx(), &req).await.expect_err(field);
        let (c, msg) = code(&e).with_context(|| format!("{e:?}"))?;
        assert_eq!(c, Code::INVALID_ARGUMENT, "{field}: {msg}");
        assert!(msg.contains(field), "{field} not named in {msg:?}");
    }
    // A netns that does not exist fails StartSandbox, naming it; nothing is left running.
    let missing = format!("/run/netns/{}-missing", fx.netns);
    client
        .create_sandbox(ctx(), &create(json!({"linux": {"namespaces": [{"type": "network"}], "cgroupsPath": format!("{}/x", fx.cgroup_parent)}}), &missing))
        .await?;
    let e = client
        .start_sandbox(ctx(), &start_request(&id))
        .await
        .expect_err("missing netns");
    let (c, msg) = code(&e).context("status")?;
    assert_eq!(c, Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains(&missing), "{msg}");
    for d in fx.leaf_dirs(&id) {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    // Never started: stop reports it, shutdown ends the shim.
    client
        .stop_sandbox(
            ctx(),
            &sb::StopSandboxRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            },
        )
        .await?;
    client
        .shutdown_sandbox(
            ctx(),
            &sb::ShutdownSandboxRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            },
        )
        .await?;
    let shim_pid = fx.shim_pid.context("shim pid")?;
    wait_until("the shim to exit", Duration::from_secs(5), || {
        !alive(shim_pid)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_namespace_pause_maps_ids_and_keeps_the_joined_netns() -> Result<()> {
    let mut fx = Fixture::new("userns").await?;
    let id = format!("sbuserns{}", std::process::id());
    let client = fx.start_shim(&id).await?;
    let shim_pid = fx.shim_pid.context("shim pid")?;
    let map = json!([{"containerID": 0, "hostID": 200000, "size": 65536}]);
    let spec = json!({
        "hostname": "userns-host",
        "process": {"user": {"uid": 65535, "gid": 65535}},
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network", "path": fx.netns_path()}, {"type": "user"}],
            "uidMappings": map, "gidMappings": map,
            "sysctl": {"net.ipv4.ip_unprivileged_port_start": "77", "kernel.shmmni": "777"},
            "cgroupsPath": format!("{}/x", fx.cgroup_parent),
        },
    });
    let create = fx.create_request(&id, &spec, &fx.netns_path());
    client
        .create_sandbox(ctx(), &create)
        .await
        .with_context(|| fx.log())?;
    let started = client
        .start_sandbox(ctx(), &start_request(&id))
        .await
        .with_context(|| fx.log())?;
    let pid = started.pid as i32;
    fx.pause_pid = Some(pid);
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/uid_map"))?
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["0", "200000", "65536"]
    );
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/gid_map"))?
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["0", "200000", "65536"]
    );
    // In-namespace 65535 is host 265535.
    assert!(
        status_field(pid, "Uid:").starts_with("265535"),
        "{}",
        status_field(pid, "Uid:")
    );
    assert!(
        status_field(pid, "Gid:").starts_with("265535"),
        "{}",
        status_field(pid, "Gid:")
    );
    for ns in ["user", "pid", "ipc", "uts"] {
        assert_ne!(
            ns_inode(format!("/proc/{pid}/ns/{ns}"))?,
            ns_inode(format!("/proc/{shim_pid}/ns/{ns}"))?,
            "{ns} namespace"
        );
    }
    assert_eq!(
        ns_inode(format!("/proc/{pid}/ns/net"))?,
        ns_inode(fx.netns_path())?,
        "network namespace"
    );
    assert_eq!(
        nsenter(pid, "-u", &["cat", "/proc/sys/kernel/hostname"])?,
        "userns-host"
    );
    assert_eq!(
        nsenter(
            pid,
            "-n",
            &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"]
        )?,
        "77"
    );
    assert_eq!(
        nsenter(pid, "-i", &["cat", "/proc/sys/kernel/shmmni"])?,
        "777"
    );
    let want = format!("{}/crisp-{id}", fx.cgroup_parent);
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    assert!(
        cg.lines()
            .any(|l| l.contains(":memory:") && l.ends_with(&want)),
        "{cg}"
    );

    client
        .stop_sandbox(
            ctx(),
            &sb::StopSandboxRequest {
                sandbox_id: id.clone(),
                timeout_secs: 5,
                ..Default::default()
            },
        )
        .await?;
    let waited = client
        .wait_sandbox(
            ctx(),
            &sb::WaitSandboxRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(waited.exit_status, 0);
    client
        .shutdown_sandbox(
            ctx(),
            &sb::ShutdownSandboxRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            },
        )
        .await?;
    wait_until("the shim to exit", Duration::from_secs(5), || {
        !alive(shim_pid)
    })
    .await?;
    for d in fx.leaf_dirs(&id) {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_dies_with_its_shim() -> Result<()> {
    let mut fx = Fixture::new("kill").await?;
    let id = format!("sbkill{}", std::process::id());
    let client = fx.start_shim(&id).await?;
    let shim_pid = fx.shim_pid.context("shim pid")?;
    let spec = json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": fx.netns_path()}], "cgroupsPath": format!("{}/x", fx.cgroup_parent)}});
    let create = fx.create_request(&id, &spec, "");
    client.create_sandbox(ctx(), &create).await?;
    let started = client.start_sandbox(ctx(), &start_request(&id)).await?;
    let pid = started.pid as i32;
    fx.pause_pid = Some(pid);
    assert!(alive(pid));
    // containerd kills the pause task when its shim dies (`shim delete`); here the
    // kernel does it (PR_SET_PDEATHSIG), so nothing of the pod outlives its shim.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim_pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    wait_until("pause to die with its shim", Duration::from_secs(5), || {
        !alive(pid)
    })
    .await?;
    // What containerd (and crispd) then run: `delete` in the bundle removes the pause's cgroup.
    assert!(
        fx.bundle().join("crisp-sandbox.json").exists(),
        "no sandbox record for delete"
    );
    assert!(
        fx.leaf_dirs(&id).iter().any(|d| d.exists()),
        "pause cgroup already gone?"
    );
    let events = fx.dir.path().join("events.sock").display().to_string();
    let out = Command::new(shim_binary())
        .args([
            "-namespace",
            "k8s.io",
            "-address",
            &events,
            "-id",
            &id,
            "delete",
        ])
        .current_dir(fx.bundle())
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        out.status.success(),
        "shim delete: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for d in fx.leaf_dirs(&id) {
        assert!(!d.exists(), "{} left behind after delete", d.display());
    }
    assert!(!fx.bundle().join("crisp-sandbox.json").exists());
    Ok(())
}
