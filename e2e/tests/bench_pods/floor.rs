//! The floor under the start figures: what the programs a runtime must run take to start the
//! same pods, with no daemon and no shim in between. Per pod: the bridge plugin's ADD (which
//! runs host-local) into a fresh network namespace, with the very network config the runtimes
//! were given, then `runc create` + `runc start` of the pod's container joining it, at the same
//! parallelism as the runtimes' runs. The container is created and started by one `runc run
//! --detach` (the least a runtime can run; containerd runs `create`, then `start`). The
//! sandbox is not in it: crispd's shim starts the pause itself (containerd runs it through runc
//! too, a cost of its own design). No runtime that calls runc and the plugin starts pods
//! faster than this on this machine. Sequentially, each pod's CNI ADD is the floor under
//! RunPodSandbox (which waits for it) and its `runc run` the floor under StartContainer.
//!
//! Then the teardown's floor, at the same parallelism: `runc kill` (SIGKILL), the exit, `runc
//! delete` and the plugin's DEL, per pod (what StopPodSandbox + RemovePodSandbox must run).
//!
//! Left out, so the floor is a lower bound: image snapshots and their mounts (one read-only
//! busybox root serves every bundle), the pod's files, logs and the loopback set-up.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use crisp_e2e::harness::{CNI_BIN_DIR, TestEnv};
use crisp_e2e::leaks::ProcRef;
use nix::sys::resource::{UsageWho, getrusage};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::parallel;

/// One run: `n` pods started `par` at a time.
pub struct Run {
    /// Named as the runtimes' wall-time rows ("start 50 pods ‖4").
    pub label: String,
    pub wall: f64,
    /// CPU of every runc and CNI process the starts ran (reaped children), per pod; the
    /// containers' own init is not in it.
    pub cpu_ms_per_pod: f64,
    /// Each pod's CNI ADD and `runc run`, in milliseconds.
    pub cni_ms: Vec<f64>,
    pub runc_ms: Vec<f64>,
    /// The teardown's wall time, named as the runtimes' rows ("stop+remove 50 pods ‖4").
    pub down_label: String,
    pub down_wall: f64,
}

/// What every pod of a run shares.
struct Setup {
    dir: PathBuf,
    runc_root: PathBuf,
    netconf: String,
    template: Value,
    rootfs: PathBuf,
    cgroup_parent: String,
}

/// The floor's set-up under one env's root, network and cgroup parent, measured one run at a
/// time so that its runs can take turns with the runtimes' ones; everything a run starts it
/// also removes.
pub struct Floor {
    setup: Setup,
    runs: usize,
}

impl Floor {
    pub async fn new(env: &TestEnv) -> Result<Floor> {
        Ok(Floor {
            setup: Setup::new(env).await?,
            runs: 0,
        })
    }

    /// `n` pods started `par` at a time, then torn down at the same parallelism.
    pub async fn run(&mut self, n: usize, par: usize) -> Result<Run> {
        let (setup, k) = (&self.setup, self.runs);
        self.runs += 1;
        let pods: Vec<Pod> = (0..n).map(|i| setup.pod(&format!("fl{k}-{i}"))).collect();
        let made = prepare(setup, &pods).await;
        let timed = match made {
            Ok(()) => start(setup, &pods, par).await,
            Err(e) => Err(e),
        };
        let stopped = match &timed {
            Ok(_) => stop(setup, &pods, par).await,
            Err(_) => Ok(0.0),
        };
        let down = teardown(setup, &pods).await;
        let (wall, cpu, each) = timed?;
        let down_wall = stopped?;
        down?;
        Ok(Run {
            label: format!("start {n} pods ‖{par}"),
            wall,
            cpu_ms_per_pod: cpu * 1e3 / n as f64,
            cni_ms: each.iter().map(|e| e.0).collect(),
            runc_ms: each.iter().map(|e| e.1).collect(),
            down_label: format!("stop+remove {n} pods ‖{par}"),
            down_wall,
        })
    }

    pub fn finish(self) -> Result<()> {
        let dir = &self.setup.dir;
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {dir:?}"))
    }
}

/// One pod's names and paths.
#[derive(Clone)]
struct Pod {
    id: String,
    netns: PathBuf,
    /// (runc id, bundle) of its one container.
    containers: [(String, PathBuf); 1],
}

impl Setup {
    async fn new(env: &TestEnv) -> Result<Self> {
        // Runtime state, as the runtimes' own: on the env's state dir (a tmpfs in the benchmark).
        let dir = env.state.join("floor");
        let rootfs = dir.join("rootfs");
        for d in [
            &rootfs,
            &dir.join("runc"),
            &dir.join("ns"),
            &dir.join("template"),
        ] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {d:?}"))?;
        }
        unpack_busybox(&rootfs).await?;
        run(Command::new("runc")
            .arg("spec")
            .arg("--bundle")
            .arg(dir.join("template")))
        .await?;
        let template = read_json(&dir.join("template/config.json"))?;
        Ok(Setup {
            runc_root: dir.join("runc"),
            netconf: bridge_netconf(env)?,
            template,
            rootfs,
            cgroup_parent: env.cgroup_parent.clone(),
            dir,
        })
    }

    fn pod(&self, id: &str) -> Pod {
        let c = |suffix: &str| {
            let cid = format!("{id}-{suffix}");
            let bundle = self.dir.join(&cid);
            (cid, bundle)
        };
        Pod {
            id: id.to_string(),
            netns: self.dir.join("ns").join(id),
            containers: [c("container")],
        }
    }

    /// runc's default spec with the shared busybox root, a sleeper, the pod's network
    /// namespace and a cgroup under the env's parent.
    fn spec(&self, cid: &str, netns: &Path) -> Result<Value> {
        let mut s = self.template.clone();
        s["root"] = json!({"path": self.rootfs, "readonly": true});
        s["process"]["terminal"] = json!(false);
        s["process"]["args"] = json!(["sleep", "3600"]);
        s["linux"]["cgroupsPath"] = json!(format!("{}/{cid}", self.cgroup_parent));
        let Some(ns) = s["linux"]["namespaces"].as_array_mut() else {
            bail!("runc spec has no linux.namespaces");
        };
        ns.retain(|n| n["type"] != "network");
        ns.push(json!({"type": "network", "path": netns}));
        Ok(s)
    }
}

/// The bridge plugin's own config out of the env's conflist (what the runtimes ran).
fn bridge_netconf(env: &TestEnv) -> Result<String> {
    let list: Value = serde_json::from_str(&env.network().conflist(&env.cni_ipam_dir()))?;
    let mut plugin = list["plugins"][0].clone();
    ensure!(
        plugin["type"] == "bridge",
        "conflist's first plugin is not bridge: {list}"
    );
    plugin["cniVersion"] = list["cniVersion"].clone();
    plugin["name"] = list["name"].clone();
    Ok(plugin.to_string())
}

/// The busybox test image's layers, unpacked in order by tar.
async fn unpack_busybox(rootfs: &Path) -> Result<()> {
    let layout = crisp_e2e::images::images_dir()?.join("busybox");
    let blob = |digest: &Value| -> Result<PathBuf> {
        let d = digest.as_str().context("digest is not a string")?;
        let (alg, hex) = d.split_once(':').context("digest without algorithm")?;
        Ok(layout.join("blobs").join(alg).join(hex))
    };
    let index = read_json(&layout.join("index.json"))?;
    let mut manifest = read_json(&blob(&index["manifests"][0]["digest"])?)?;
    if manifest.get("manifests").is_some() {
        manifest = read_json(&blob(&manifest["manifests"][0]["digest"])?)?;
    }
    let layers = manifest["layers"]
        .as_array()
        .context("manifest has no layers")?;
    for layer in layers {
        let b = blob(&layer["digest"])?;
        run(Command::new("tar").arg("-xf").arg(&b).arg("-C").arg(rootfs)).await?;
    }
    Ok(())
}

fn read_json(p: &Path) -> Result<Value> {
    let text = std::fs::read(p).with_context(|| format!("reading {p:?}"))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {p:?}"))
}

/// Untimed: each pod's network namespace (a bind-mounted file, as crispd keeps them) and its
/// container's bundle.
async fn prepare(setup: &Setup, pods: &[Pod]) -> Result<()> {
    for pod in pods {
        std::fs::File::create(&pod.netns).with_context(|| format!("creating {:?}", pod.netns))?;
        let mut net = std::ffi::OsString::from("--net=");
        net.push(&pod.netns);
        run(Command::new("unshare").arg(net).arg("true")).await?;
        for (cid, bundle) in &pod.containers {
            std::fs::create_dir_all(bundle)?;
            let spec = serde_json::to_vec(&setup.spec(cid, &pod.netns)?)?;
            std::fs::write(bundle.join("config.json"), spec)?;
        }
    }
    Ok(())
}

/// Timed: every pod's CNI ADD and `runc run --detach` of its container, `par` pods at a
/// time. Returns the wall time, the CPU seconds of the reaped runc and CNI processes, and
/// each pod's CNI and runc milliseconds.
async fn start(setup: &Setup, pods: &[Pod], par: usize) -> Result<(f64, f64, Vec<(f64, f64)>)> {
    let (runc_root, netconf) = (setup.runc_root.clone(), setup.netconf.clone());
    let cpu0 = children_cpu()?;
    let t = Instant::now();
    let (each, errs) = parallel(par, pods.to_vec(), move |pod: Pod| {
        let (runc_root, netconf) = (runc_root.clone(), netconf.clone());
        async move {
            let t = Instant::now();
            cni("ADD", &netconf, &pod.id, &pod.netns).await?;
            let cni_ms = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            for (cid, bundle) in &pod.containers {
                let mut start = runc(&runc_root);
                start
                    .args(["run", "--detach", "--bundle"])
                    .arg(bundle)
                    .arg(cid);
                run(&mut start).await?;
            }
            Ok((cni_ms, t.elapsed().as_secs_f64() * 1e3))
        }
    })
    .await;
    let wall = t.elapsed().as_secs_f64();
    let cpu = children_cpu()? - cpu0;
    if let Some(e) = errs.into_iter().next() {
        return Err(e.context("floor: starting a pod with runc and the bridge plugin"));
    }
    Ok((wall, cpu, each))
}

/// Timed: every pod's container killed, its exit seen, `runc delete`, then the plugin's DEL,
/// `par` pods at a time (the init pids are read first, untimed). Returns the wall time.
async fn stop(setup: &Setup, pods: &[Pod], par: usize) -> Result<f64> {
    let mut jobs = Vec::new();
    for pod in pods {
        let (cid, _) = &pod.containers[0];
        let pid = runc_pid(&setup.runc_root, cid).await?;
        let init = ProcRef::of(pid, cid.as_str()).with_context(|| format!("{cid}: init gone"))?;
        jobs.push((pod.clone(), init));
    }
    let (runc_root, netconf) = (setup.runc_root.clone(), setup.netconf.clone());
    let t = Instant::now();
    let (_, errs) = parallel(par, jobs, move |(pod, init): (Pod, ProcRef)| {
        let (runc_root, netconf) = (runc_root.clone(), netconf.clone());
        async move {
            let (cid, _) = &pod.containers[0];
            run(runc(&runc_root).args(["kill", cid, "KILL"])).await?;
            wait_gone(&init).await?;
            run(runc(&runc_root).args(["delete", cid])).await?;
            cni("DEL", &netconf, &pod.id, &pod.netns).await
        }
    })
    .await;
    let wall = t.elapsed().as_secs_f64();
    match errs.into_iter().next() {
        Some(e) => Err(e.context("floor: stopping a pod with runc and the bridge plugin")),
        None => Ok(wall),
    }
}

/// The container's init pid, from `runc state`.
async fn runc_pid(root: &Path, cid: &str) -> Result<i32> {
    let out = runc(root).args(["state", cid]).output().await?;
    ensure!(out.status.success(), "runc state {cid}: {}", out.status);
    let state: Value = serde_json::from_slice(&out.stdout)?;
    let pid = state["pid"].as_i64().context("runc state without a pid")?;
    Ok(i32::try_from(pid)?)
}

/// Until the init has exited (a zombie counts: whoever reaps it, runc sees it stopped), checked
/// every millisecond for at most 10 s.
async fn wait_gone(init: &ProcRef) -> Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while init.alive() {
        ensure!(
            Instant::now() < deadline,
            "{init:?} still running 10 s after SIGKILL"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Removes what `prepare` and `start` made, 16 at a time; the first error, after trying all.
async fn teardown(setup: &Setup, pods: &[Pod]) -> Result<()> {
    let (runc_root, netconf) = (setup.runc_root.clone(), setup.netconf.clone());
    let (_, errs) = parallel(16, pods.to_vec(), move |pod: Pod| {
        let (runc_root, netconf) = (runc_root.clone(), netconf.clone());
        async move { remove_pod(&runc_root, &netconf, &pod).await }
    })
    .await;
    match errs.into_iter().next() {
        Some(e) => Err(e.context("floor: tearing a pod down")),
        None => Ok(()),
    }
}

async fn remove_pod(runc_root: &Path, netconf: &str, pod: &Pod) -> Result<()> {
    let (id, netns) = (&pod.id, &pod.netns);
    let mut first: Result<()> = Ok(());
    for (cid, bundle) in pod.containers.iter().rev() {
        // A container that was never created is not an error here; one left running is.
        if runc_state(runc_root, cid).await {
            let r = run(runc(runc_root).arg("delete").arg("--force").arg(cid)).await;
            first = first.and(r);
        }
        let _ = std::fs::remove_dir_all(bundle);
    }
    if netns.exists() {
        first = first.and(cni("DEL", netconf, id, netns).await);
        let r = nix::mount::umount2(netns, nix::mount::MntFlags::MNT_DETACH);
        // EINVAL: prepare failed before the bind mount; the file is all there is.
        if let Err(e) = r.or_else(|e| match e {
            nix::errno::Errno::EINVAL => Ok(()),
            e => Err(e),
        }) {
            first = first.and(Err(anyhow::anyhow!("unmounting {netns:?}: {e}")));
        }
        let _ = std::fs::remove_file(netns);
    }
    first
}

fn runc(root: &Path) -> Command {
    let mut c = Command::new("runc");
    c.arg("--root").arg(root);
    c
}

async fn runc_state(root: &Path, cid: &str) -> bool {
    let mut c = runc(root);
    c.arg("state")
        .arg(cid)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c.status().await.is_ok_and(|s| s.success())
}

/// Runs a command to completion with its output discarded: `runc create`'s stdio is the
/// container's, so a pipe would stay open as long as the container runs.
async fn run(cmd: &mut Command) -> Result<()> {
    let what = format!("{:?}", cmd.as_std());
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .with_context(|| format!("running {what}"))?;
    ensure!(status.success(), "{what}: {status}");
    Ok(())
}

/// The bridge plugin, called as a CNI runtime calls it.
async fn cni(command: &str, netconf: &str, id: &str, netns: &Path) -> Result<()> {
    let mut child = Command::new(Path::new(CNI_BIN_DIR).join("bridge"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_BIN_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the bridge CNI plugin")?;
    let mut stdin = child.stdin.take().context("bridge plugin stdin")?;
    stdin.write_all(netconf.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    ensure!(
        out.status.success(),
        "bridge CNI {command} for {id}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

/// User + system CPU seconds of this process's reaped children (and theirs, when they reaped
/// them: host-local under the bridge plugin).
fn children_cpu() -> Result<f64> {
    let u = getrusage(UsageWho::RUSAGE_CHILDREN).context("getrusage")?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Ok(secs(u.user_time()) + secs(u.system_time()))
}
