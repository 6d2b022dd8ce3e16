//! The task service against real runc and real containers, without containerd: events in
//! order, exit codes, a storm of short execs (the reaper must never lose or steal an exit,
//! and every exec's start event must precede its exit event), rootfs mounted through the
//! create request and unmounted on delete, the placement in /proc/<pid>/cgroup, and crispd's
//! start on create (the runtime's `run --detach`).
//!
//! Needs root, runc and the busybox test image (`make test-images`).

#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use containerd_shim_protos::{api, protobuf::well_known_types::any::Any};
use crisp_shim::{
    options::Options,
    reaper::Reaper,
    service::{Config, EventLog, Events, TaskService},
};

const NS: &str = "crisp-shim-test";

fn images_dir() -> PathBuf {
    std::env::var_os("CRISP_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-images"))
}

/// Runs a helper command through the shim's reaper: in this process a plain
/// `Command::status()` would race the reaper's `waitpid(-1)` and get ECHILD.
async fn run(mut cmd: Command) -> Result<()> {
    let what = format!("{cmd:?}");
    cmd.stdin(std::process::Stdio::null());
    let out = Reaper::global().run(cmd).await?;
    ensure!(
        out.status == 0,
        "{what}: exit {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Unpacks the busybox test image's layers (plain tar+gzip) into `dir`.
async fn unpack_busybox(dir: &Path) -> Result<()> {
    let layout = images_dir().join("busybox");
    let blob = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).with_context(|| {
            format!(
                "busybox test image missing under {} (run `make test-images`)",
                layout.display()
            )
        })?)?;
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index without manifest")?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(manifest_digest))?)?;
    std::fs::create_dir_all(dir)?;
    for layer in manifest["layers"]
        .as_array()
        .context("manifest without layers")?
    {
        let digest = layer["digest"].as_str().context("layer without digest")?;
        let mut tar = Command::new("tar");
        tar.arg("-xzf").arg(blob(digest)).arg("-C").arg(dir);
        run(tar).await?;
    }
    Ok(())
}

/// A bundle whose rootfs comes in the create request as a read-only bind of `image`.
struct Bundle {
    dir: tempfile::TempDir,
    cgroup_parent: String,
}

impl Bundle {
    async fn new(args: &[&str]) -> Result<Bundle> {
        let dir = tempfile::Builder::new()
            .prefix("crisp-shim-test-")
            .tempdir_in("/var/tmp")?;
        let mut spec = Command::new("runc");
        spec.arg("spec").current_dir(dir.path());
        run(spec).await?;
        let cgroup_parent = format!("/crisp-shim-test-{}", std::process::id());
        let path = dir.path().join("config.json");
        let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        spec["process"]["terminal"] = false.into();
        spec["process"]["args"] = args.iter().map(|a| serde_json::Value::from(*a)).collect();
        spec["root"]["readonly"] = true.into();
        // What a CRI plugin writes; the shim must replace the leaf with crisp-<id>.
        spec["linux"]["cgroupsPath"] = format!("{cgroup_parent}/whatever").into();
        // Below our own: must be raised to ours, not fail, without CAP_SYS_RESOURCE.
        spec["process"]["oomScoreAdj"] = (-999).into();
        std::fs::write(&path, serde_json::to_vec(&spec)?)?;
        Ok(Bundle { dir, cgroup_parent })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn set_memory_limit(&self, bytes: u64) -> Result<()> {
        let path = self.path().join("config.json");
        let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        spec["linux"]["resources"]["memory"] = serde_json::json!({"limit": bytes, "swap": bytes});
        std::fs::write(&path, serde_json::to_vec(&spec)?)?;
        Ok(())
    }

    fn rootfs_mounted(&self) -> bool {
        let target = self.path().join("rootfs");
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(target.to_str().unwrap_or("")))
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        // Clean up even after a failed assertion: our mount, then our cgroups.
        let _ = crisp_shim::mount::unmount_all(&self.path().join("rootfs"));
        for ctrl in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let parent = ctrl.path().join(self.cgroup_parent.trim_start_matches('/'));
            if let Ok(children) = std::fs::read_dir(&parent) {
                for c in children.flatten().filter(|c| c.path().is_dir()) {
                    let _ = std::fs::remove_dir(c.path());
                }
                let _ = std::fs::remove_dir(&parent);
            }
        }
    }
}

struct Env {
    svc: TaskService,
    events: EventLog,
    image: tempfile::TempDir,
    runc_root: tempfile::TempDir,
}

async fn env() -> Result<Env> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    nix::sys::prctl::set_child_subreaper(true)?;
    let image = tempfile::Builder::new()
        .prefix("crisp-shim-img-")
        .tempdir_in("/var/tmp")?;
    unpack_busybox(image.path()).await?;
    let runc_root = tempfile::tempdir()?;
    let (events, log) = Events::recorder(NS);
    let handler = Options {
        root: runc_root.path().display().to_string(),
        ..Default::default()
    };
    let svc = TaskService::new(
        Config {
            namespace: NS.into(),
            handler,
            default_runtime: "runc".into(),
        },
        events,
        Default::default(),
    );
    Ok(Env {
        svc,
        events: log,
        image,
        runc_root,
    })
}

impl Env {
    async fn create(&self, id: &str, bundle: &Bundle, stdout: &str) -> Result<u32> {
        self.create_with(id, bundle, stdout, None).await
    }

    async fn create_with(
        &self,
        id: &str,
        bundle: &Bundle,
        stdout: &str,
        options: Option<Any>,
    ) -> Result<u32> {
        let rootfs = api::Mount {
            type_: "bind".into(),
            source: self.image.path().display().to_string(),
            options: vec!["rbind".into(), "ro".into()],
            ..Default::default()
        };
        let resp = self
            .svc
            .create(api::CreateTaskRequest {
                id: id.into(),
                bundle: bundle.path().display().to_string(),
                rootfs: vec![rootfs],
                stdout: stdout.into(),
                options: options.into(),
                ..Default::default()
            })
            .await?;
        Ok(resp.pid)
    }

    fn topics(&self, id_filter: &str) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, text)| text.contains(id_filter))
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Best-effort cleanup of a task that a failed assertion left behind.
    async fn force_delete(&self, id: &str) {
        let _ = self
            .svc
            .kill(api::KillRequest {
                id: id.into(),
                signal: 9,
                all: true,
                ..Default::default()
            })
            .await;
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            self.svc.wait(api::WaitRequest {
                id: id.into(),
                ..Default::default()
            }),
        )
        .await;
        let _ = self
            .svc
            .delete(api::DeleteRequest {
                id: id.into(),
                ..Default::default()
            })
            .await;
        let mut rm = Command::new("runc");
        rm.arg("--root")
            .arg(self.runc_root.path())
            .args(["delete", "--force", id]);
        let _ = run(rm).await;
    }
}

/// The task's events were create, start, exit and delete, in that order, once each.
fn lived_once(env: &Env, id: &str) -> Result<()> {
    let topics = env.topics(id);
    ensure!(
        topics
            == [
                "/tasks/create",
                "/tasks/start",
                "/tasks/exit",
                "/tasks/delete"
            ],
        "events {topics:?}"
    );
    Ok(())
}

fn wait_req(id: &str, exec_id: &str) -> api::WaitRequest {
    api::WaitRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    }
}

const EXIT_ARGS: &[&str] = &[
    "sh",
    "-c",
    "echo hi; cat /proc/self/oom_score_adj; cat /proc/self/cgroup; exit 4",
];

async fn run_to_exit(env: &Env, id: &str, bundle: &Bundle) -> Result<()> {
    let out = bundle.path().join("stdout.log");
    let pid = env
        .create(id, bundle, &format!("file://{}", out.display()))
        .await?;
    ensure!(pid > 0, "create returned pid 0");
    ensure!(bundle.rootfs_mounted(), "rootfs not mounted after create");
    env.svc
        .start(api::StartRequest {
            id: id.into(),
            ..Default::default()
        })
        .await?;
    let w = tokio::time::timeout(Duration::from_secs(30), env.svc.wait(wait_req(id, ""))).await??;
    ensure!(w.exit_status == 4, "exit status {}", w.exit_status);
    let state = env
        .svc
        .state(api::StateRequest {
            id: id.into(),
            ..Default::default()
        })
        .await?;
    ensure!(
        state.exit_status == 4 && state.pid == pid,
        "state {state:?}"
    );
    let d = env
        .svc
        .delete(api::DeleteRequest {
            id: id.into(),
            ..Default::default()
        })
        .await?;
    ensure!(d.exit_status == 4, "delete exit status {}", d.exit_status);
    ensure!(
        !bundle.rootfs_mounted(),
        "rootfs still mounted after delete"
    );

    let text = std::fs::read_to_string(&out)?;
    let mut lines = text.lines();
    ensure!(lines.next() == Some("hi"), "stdout {text:?}");
    let own: i64 = std::fs::read_to_string("/proc/self/oom_score_adj")?
        .trim()
        .parse()?;
    let adj: i64 = lines.next().context("no oom_score_adj line")?.parse()?;
    let want_adj = if crisp_shim::spec::has_cap_sys_resource() {
        -999
    } else {
        own.max(-999)
    };
    ensure!(
        adj == want_adj,
        "oom_score_adj {adj}, want {want_adj} (shim's own {own})"
    );
    let want = format!("{}/crisp-{id}", bundle.cgroup_parent);
    for l in lines.filter(|l| !l.starts_with("0::")) {
        ensure!(
            l.ends_with(&format!(":{want}")),
            "cgroup line {l:?}, want path {want}"
        );
    }
    lived_once(env, id)
}

async fn exec_storm(env: &Env, id: &str, bundle: &Bundle) -> Result<()> {
    env.create(id, bundle, "").await?;
    env.svc
        .start(api::StartRequest {
            id: id.into(),
            ..Default::default()
        })
        .await?;
    let process = |code: usize| -> Result<Any> {
        let p = serde_json::json!({"args": ["sh", "-c", format!("exit {code}")], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}});
        Ok(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: serde_json::to_vec(&p)?,
            ..Default::default()
        })
    };
    let mut jobs = Vec::new();
    for i in 0..24 {
        let svc = env.svc.clone();
        let spec = process(i % 5)?;
        let id = id.to_string();
        jobs.push(tokio::spawn(async move {
            let exec_id = format!("e{i}");
            svc.exec(api::ExecProcessRequest {
                id: id.clone(),
                exec_id: exec_id.clone(),
                spec: Some(spec).into(),
                ..Default::default()
            })
            .await?;
            svc.start(api::StartRequest {
                id: id.clone(),
                exec_id: exec_id.clone(),
                ..Default::default()
            })
            .await?;
            let w =
                tokio::time::timeout(Duration::from_secs(30), svc.wait(wait_req(&id, &exec_id)))
                    .await
                    .with_context(|| format!("exec {exec_id} did not exit"))??;
            svc.delete(api::DeleteRequest {
                id: id.clone(),
                exec_id,
                ..Default::default()
            })
            .await?;
            anyhow::Ok((i, w.exit_status))
        }));
    }
    for j in jobs {
        let (i, status) = j.await??;
        ensure!(
            status == (i % 5) as u32,
            "exec e{i}: status {status}, want {}",
            i % 5
        );
    }
    // Per exec: added, started, exit, in that order.
    let log = env.events.lock().unwrap().clone();
    for i in 0..24 {
        let needle = format!("\"e{i}\"");
        let seq: Vec<&str> = log
            .iter()
            .filter(|(_, t)| t.contains(&needle))
            .map(|(t, _)| t.as_str())
            .collect();
        ensure!(
            seq == ["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"],
            "e{i}: events {seq:?}"
        );
    }
    let pids = env
        .svc
        .pids(api::PidsRequest {
            id: id.into(),
            ..Default::default()
        })
        .await?;
    ensure!(
        pids.processes.len() == 1,
        "pids after the execs: {:?}",
        pids.processes
    );

    env.svc
        .kill(api::KillRequest {
            id: id.into(),
            signal: 9,
            ..Default::default()
        })
        .await?;
    let w = tokio::time::timeout(Duration::from_secs(30), env.svc.wait(wait_req(id, ""))).await??;
    ensure!(
        w.exit_status == 137,
        "killed init: status {}",
        w.exit_status
    );
    match env
        .svc
        .kill(api::KillRequest {
            id: id.into(),
            signal: 9,
            ..Default::default()
        })
        .await
    {
        Err(e) if e.to_string().contains("already exited") => {}
        other => bail!("kill of an exited task: {other:?}"),
    }
    env.svc
        .delete(api::DeleteRequest {
            id: id.into(),
            ..Default::default()
        })
        .await?;
    ensure!(
        !bundle.rootfs_mounted(),
        "rootfs still mounted after delete"
    );
    Ok(())
}

/// Stats and Update read and write the task's own cgroup; an OOM kill is reported as a
/// TaskOOM event (cgroup v1: eventfd on memory.oom_control) before the exit.
async fn stats_update_oom(env: &Env, id: &str, bundle: &Bundle) -> Result<()> {
    use containerd_shim_protos::protobuf::Message;
    env.create(id, bundle, "").await?;
    env.svc
        .start(api::StartRequest {
            id: id.into(),
            ..Default::default()
        })
        .await?;

    let stats = env
        .svc
        .stats(api::StatsRequest {
            id: id.into(),
            ..Default::default()
        })
        .await?;
    let any = stats.stats.into_option().context("no stats")?;
    if any.type_url.ends_with("v1.Metrics") {
        let m = containerd_shim_protos::cgroups::metrics::Metrics::parse_from_bytes(&any.value)?;
        ensure!(m.memory.usage.usage > 0, "memory usage 0: {m:?}");
        ensure!(m.pids.current >= 1, "pids.current {}", m.pids.current);
        ensure!(
            m.memory.usage.limit == 32 << 20,
            "memory limit {}",
            m.memory.usage.limit
        );
    }

    let resources = serde_json::json!({"pids": {"limit": 77}});
    env.svc
        .update(api::UpdateTaskRequest {
            id: id.into(),
            resources: Some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
                value: serde_json::to_vec(&resources)?,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .await?;
    let pids_max = format!(
        "/sys/fs/cgroup/pids{}/crisp-{id}/pids.max",
        bundle.cgroup_parent
    );
    if Path::new("/sys/fs/cgroup/pids").is_dir() {
        ensure!(
            std::fs::read_to_string(&pids_max)?.trim() == "77",
            "{pids_max} not updated"
        );
    }

    // Now eat memory past the 32 MiB limit.
    let eat = serde_json::json!({"args": ["sh", "-c", "tail /dev/zero"], "cwd": "/", "env": ["PATH=/bin:/usr/bin"], "user": {"uid": 0, "gid": 0}});
    let spec = Any {
        type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
        value: serde_json::to_vec(&eat)?,
        ..Default::default()
    };
    env.svc
        .exec(api::ExecProcessRequest {
            id: id.into(),
            exec_id: "eat".into(),
            spec: Some(spec).into(),
            ..Default::default()
        })
        .await?;
    env.svc
        .start(api::StartRequest {
            id: id.into(),
            exec_id: "eat".into(),
            ..Default::default()
        })
        .await?;
    let w = tokio::time::timeout(Duration::from_secs(60), env.svc.wait(wait_req(id, "eat")))
        .await
        .context("eater never died")??;
    ensure!(w.exit_status == 137, "eater exit {}", w.exit_status);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !env.topics(id).iter().any(|t| t == "/tasks/oom") {
        ensure!(
            std::time::Instant::now() < deadline,
            "no /tasks/oom event: {:?}",
            env.topics(id)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.svc
        .delete(api::DeleteRequest {
            id: id.into(),
            exec_id: "eat".into(),
            ..Default::default()
        })
        .await?;
    env.svc
        .kill(api::KillRequest {
            id: id.into(),
            signal: 9,
            ..Default::default()
        })
        .await?;
    tokio::time::timeout(Duration::from_secs(30), env.svc.wait(wait_req(id, ""))).await??;
    env.svc
        .delete(api::DeleteRequest {
            id: id.into(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// crispd's create options: start on create. The task runs when Create returns (no Start:
/// a Start is refused as for any running task), its events are create, start, exit, delete
/// in that order, and its output and exit status are those of a created-then-started one.
async fn start_on_create(env: &Env, id: &str, bundle: &Bundle) -> Result<()> {
    use containerd_shim_protos::protobuf::{Message, well_known_types::wrappers::BoolValue};
    let out = bundle.path().join("stdout.log");
    let yes = BoolValue {
        value: true,
        ..Default::default()
    };
    let options = Any {
        type_url: crisp_shim::options::CRISP_CREATE_OPTIONS.into(),
        value: yes.write_to_bytes()?,
        ..Default::default()
    };
    let stdout = format!("file://{}", out.display());
    let pid = env.create_with(id, bundle, &stdout, Some(options)).await?;
    ensure!(pid > 0, "create returned pid 0");
    let w = tokio::time::timeout(Duration::from_secs(30), env.svc.wait(wait_req(id, ""))).await??;
    ensure!(
        w.exit_status == 4,
        "exit status {} without a Start",
        w.exit_status
    );
    let again = env
        .svc
        .start(api::StartRequest {
            id: id.into(),
            ..Default::default()
        })
        .await;
    ensure!(again.is_err(), "a Start after a start on create succeeded");
    env.svc
        .delete(api::DeleteRequest {
            id: id.into(),
            ..Default::default()
        })
        .await?;
    let text = std::fs::read_to_string(&out)?;
    ensure!(text.lines().next() == Some("hi"), "stdout {text:?}");
    lived_once(env, id)
}

#[test]
fn task_service_with_runc() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let env = env().await?;
        // Each bundle outlives its task: on failure the task is force-deleted first, then
        // the bundle's Drop unmounts and removes the (by then empty) cgroups.
        let one = format!("exit-{}", std::process::id());
        let b1 = Bundle::new(EXIT_ARGS).await?;
        let r1 = run_to_exit(&env, &one, &b1).await;
        if r1.is_err() {
            env.force_delete(&one).await;
        }
        drop(b1);
        let two = format!("storm-{}", std::process::id());
        let b2 = Bundle::new(&["sleep", "600"]).await?;
        let r2 = exec_storm(&env, &two, &b2).await;
        if r2.is_err() {
            env.force_delete(&two).await;
        }
        drop(b2);
        let three = format!("oom-{}", std::process::id());
        let b3 = Bundle::new(&["sleep", "600"]).await?;
        b3.set_memory_limit(32 << 20)?;
        let r3 = stats_update_oom(&env, &three, &b3).await;
        if r3.is_err() {
            env.force_delete(&three).await;
        }
        drop(b3);
        let four = format!("started-{}", std::process::id());
        let b4 = Bundle::new(EXIT_ARGS).await?;
        let r4 = start_on_create(&env, &four, &b4).await;
        if r4.is_err() {
            env.force_delete(&four).await;
        }
        drop(b4);
        r1.context("run to exit")?;
        r2.context("exec storm")?;
        r3.context("stats, update, oom")?;
        r4.context("start on create")
    })
}
