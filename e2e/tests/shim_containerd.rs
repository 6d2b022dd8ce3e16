//! crisp's shim (`containerd-shim-crisp-v2`) under Debian's real containerd 1.6, through
//! CRI only: containerd runs it as `runtime_type = "io.containerd.crisp.v2"`, the default
//! runtime, and must not be able to tell it from its own runc shim.
//!
//! One pod, two containers (plus a third for the shim-kill check):
//! - the sandbox and every container are served by one shim process (their parent);
//! - stdout and stderr lines land in the CRI log, on the right stream;
//! - exit code 3 comes back as 3;
//! - StopContainer of `sleep` (PID 1 ignores SIGTERM) ends within its timeout;
//! - ExecSync returns output and exit code;
//! - /proc/<pid>/cgroup of the sandbox and the containers is `<pod parent>/crisp-<id>`;
//! - killing the shim: containerd reports the containers exited and no rootfs stays mounted.
//!
//! The same scenario runs with runc and with crun (a second runtime handler whose options
//! name crun). Debian's crun 1.8 refuses hybrid cgroup hosts such as this one: there the
//! crun test asserts a prompt, clear error naming the hybrid-cgroup reason, and no leak.
//!
//! The same scenario runs against crispd (`crispd_crisp_shim_*`), which starts the same shim
//! the way containerd does: the assertions are unchanged, only the daemon differs. There the
//! default handler is runc and `crun` is crispd's built-in crun handler.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use crisp_e2e::cri::{self, container_config};
use crisp_e2e::elf::{Linkage, linkage};
use crisp_e2e::harness::{RuntimeKind, TestEnv, which};
use crisp_e2e::leaks;
use crisp_e2e::procfs::{smaps_kib, vm_rss_kib};
use crisp_e2e::registry::Registry;
use crisp_proto::cri::v1 as api;

const BUSYBOX: &str = "docker.io/library/busybox:latest";
const SHIM: &str = "containerd-shim-crisp-v2";
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Where `cargo build` put the shim: $CRISP_SHIM_DIR, else the profile dir of this test
/// binary (target/<profile>/deps/..).
fn shim_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("CRISP_SHIM_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .context("locating the target dir")?
        .to_path_buf();
    ensure!(
        dir.join(SHIM).is_file(),
        "{SHIM} not found in {} (build it with `cargo build -p crisp-shim`, or set CRISP_SHIM_DIR)",
        dir.display()
    );
    Ok(dir)
}

/// Whether this host mixes cgroup v1 controllers with a cgroup2 hierarchy (crun 1.8 refuses it).
fn hybrid_cgroups() -> bool {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let magic = |p: &str| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type().0)
            .ok()
    };
    magic("/sys/fs/cgroup") != Some(CGROUP2_SUPER_MAGIC)
        && magic("/sys/fs/cgroup/unified") == Some(CGROUP2_SUPER_MAGIC)
}

/// Runtime handlers `crisp` (runc, the default) and `crisp-crun`. containerd 1.6 hands a
/// runtime type it does not know `cri.runtimeoptions.v1.Options`, whose `ConfigPath` names
/// the file with runc-style options; the shim reads `BinaryName` and `Root` from it.
fn containerd_fragment(dir: &Path) -> Result<String> {
    let mut frag = String::from(
        "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\ndefault_runtime_name = \"crisp\"\n",
    );
    for (handler, binary) in [("crisp", "runc"), ("crisp-crun", "crun")] {
        let file = dir.join(format!("{handler}.toml"));
        let root = dir.join(format!("{binary}-state"));
        std::fs::write(
            &file,
            format!("BinaryName = \"{binary}\"\nRoot = \"{}\"\n", root.display()),
        )?;
        frag.push_str(&format!(
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{handler}]\n\
             runtime_type = \"io.containerd.crisp.v2\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{handler}.options]\n\
             ConfigPath = \"{}\"\n",
            file.display()
        ));
    }
    Ok(frag)
}

async fn run_pod(env: &TestEnv, pod: &api::PodSandboxConfig, handler: &str) -> Result<String> {
    env.cri().run_pod_with_handler(pod, handler).await
}

/// Every v1 controller line of a `/proc/<pid>/cgroup` text must name `want`.
fn check_cgroup(what: &str, text: &str, want: &str) -> Result<()> {
    let mut v1 = 0;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if ctrls.is_empty() {
            continue; // the cgroup2 (hugetlb-only here) hierarchy
        }
        v1 += 1;
        ensure!(
            path == want,
            "{what}: controller {ctrls} at {path}, want {want}\n{text}"
        );
    }
    ensure!(v1 > 0, "{what}: no cgroup v1 line in\n{text}");
    Ok(())
}

fn proc_cgroup(pid: i32) -> Result<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).with_context(|| format!("pid {pid}"))
}

fn ppid(pid: i32) -> Result<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no PPid")
}

/// Pids of crisp shims started by this env's daemon (containerd names its socket on their
/// command line, crispd its events socket under the root).
fn shims_of(env: &TestEnv) -> Vec<i32> {
    match env.kind {
        RuntimeKind::Containerd => shims_named(env, SHIM),
        RuntimeKind::Crispd => env.shim_pids(),
    }
}

/// Pids of processes whose binary ends in `name` and whose command line names this env's
/// containerd socket.
fn shims_named(env: &TestEnv, name: &str) -> Vec<i32> {
    let needle = env.socket.to_string_lossy().into_owned();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with(name)) && args.contains(&needle) {
            out.push(pid);
        }
    }
    out
}

fn rootfs_mounts(env: &TestEnv) -> Vec<PathBuf> {
    leaks::mounts_under(&env.root)
        .into_iter()
        .filter(|m| m.ends_with("rootfs"))
        .collect()
}

async fn scenario(env: &TestEnv, handler: &str) -> Result<()> {
    let c = env.cri();
    c.pull(BUSYBOX, None).await?;
    let pod = env.pod_config("shim")?;
    let pod_id = run_pod(env, &pod, handler).await?;
    let parent = env.cgroup_parent.trim_end_matches('/');

    // Container A: both streams, its own cgroup, exit 3.
    let a = container_config(
        "streams",
        BUSYBOX,
        &[
            "sh",
            "-c",
            "echo out-line; echo err-line >&2; cat /proc/self/cgroup; exit 3",
        ],
    );
    let a_id = c.create_container(&pod_id, &a, &pod).await?;
    // Container B: sleeps, for ExecSync, StopContainer and the cgroup of a live process.
    let b = container_config("sleeper", BUSYBOX, &["sleep", "3600"]);
    let b_id = c.create_container(&pod_id, &b, &pod).await?;
    c.start_container(&a_id).await?;
    c.start_container(&b_id).await?;

    let st = c.wait_container_exit(&a_id, EXIT_TIMEOUT).await?;
    ensure!(
        st.exit_code == 3,
        "exit code {}, want 3 ({:?})",
        st.exit_code,
        st.reason
    );
    let log = cri::log_file(&pod, &a);
    let out = cri::wait_log_line(&log, "out-line", Duration::from_secs(10)).await?;
    ensure!(out.stream == "stdout", "out-line on {}", out.stream);
    let err = cri::wait_log_line(&log, "err-line", Duration::from_secs(10)).await?;
    ensure!(err.stream == "stderr", "err-line on {}", err.stream);
    let a_cgroup: String = cri::read_log(&log)?
        .into_iter()
        .filter(|l| l.stream == "stdout" && l.text.contains(":/"))
        .map(|l| l.text + "\n")
        .collect();
    check_cgroup("container A", &a_cgroup, &format!("{parent}/crisp-{a_id}"))?;

    // One shim, parent of the sandbox and of B.
    let shims = shims_of(env);
    ensure!(
        shims.len() == 1,
        "want one crisp shim for the pod, found {shims:?}"
    );
    let shim = shims[0];
    let sb_pid = c.sandbox_pid(&pod_id).await?;
    let b_pid = c.container_pid(&b_id).await?;
    ensure!(
        ppid(sb_pid)? == shim,
        "sandbox pid {sb_pid} is not a child of shim {shim}"
    );
    ensure!(
        ppid(b_pid)? == shim,
        "container B pid {b_pid} is not a child of shim {shim}"
    );
    check_cgroup(
        "sandbox",
        &proc_cgroup(sb_pid)?,
        &format!("{parent}/crisp-{pod_id}"),
    )?;
    check_cgroup(
        "container B",
        &proc_cgroup(b_pid)?,
        &format!("{parent}/crisp-{b_id}"),
    )?;

    // ExecSync: output of both streams and the exit code.
    let exec = c
        .exec_sync(
            &b_id,
            &["sh", "-c", "echo exec-out; echo exec-err >&2; exit 7"],
            30,
        )
        .await?;
    cri::expect_exec("ExecSync", &exec, 7, "exec-out\n", "exec-err\n")?;

    // StopContainer: `sleep` as PID 1 ignores SIGTERM, so this takes the SIGKILL after 2 s.
    let stop_timeout = 2;
    let t = Instant::now();
    c.stop_container(&b_id, stop_timeout).await?;
    let took = t.elapsed();
    ensure!(
        took < Duration::from_secs(stop_timeout as u64 + 5),
        "StopContainer took {took:?} with a {stop_timeout} s timeout"
    );
    let st = c.container_status(&b_id).await?;
    ensure!(
        st.state == api::ContainerState::ContainerExited as i32,
        "sleeper not exited after StopContainer: {:?}",
        st.state
    );
    eprintln!("{handler}: StopContainer({stop_timeout} s) took {took:?}");

    // Kill the shim: containerd must see the tasks exit, and nothing may stay mounted.
    let d = container_config("victim", BUSYBOX, &["sleep", "3600"]);
    let d_id = c.run_container(&pod_id, &d, &pod).await?;
    ensure!(
        shims_of(env) == vec![shim],
        "a new container started another shim"
    );
    ensure!(
        !rootfs_mounts(env).is_empty(),
        "no rootfs mount seen while running"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let st = c.wait_container_exit(&d_id, EXIT_TIMEOUT).await?;
    eprintln!(
        "{handler}: after the shim was killed, victim exited with {}",
        st.exit_code
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mounts = rootfs_mounts(env);
        if mounts.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("rootfs still mounted after the shim was killed: {mounts:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The daemon learns of the shim's death asynchronously (the sandbox's exit, a lost
    // connection): give it the same 10 s the containers get.
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.pod_status(&pod_id).await?.state == api::PodSandboxState::SandboxReady as i32 {
        ensure!(
            Instant::now() < deadline,
            "sandbox still READY 10 s after its shim was killed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

/// crun on a hybrid host: RunPodSandbox must fail promptly with the reason, and leak nothing.
async fn crun_refused(env: &TestEnv, handler: &str) -> Result<()> {
    env.cri().pull(BUSYBOX, None).await?;
    let pod = env.pod_config("crun")?;
    let t = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(60), run_pod(env, &pod, handler))
        .await
        .context("RunPodSandbox with crun hung")?;
    let err = match res {
        // crispd starts the pause process without any OCI runtime, so a crun pod can run;
        // crun is first asked for the pod's first container, and that must be refused.
        Ok(id) if env.kind == RuntimeKind::Crispd => {
            let c = env.cri();
            let cfg = container_config("crun-first", BUSYBOX, &["true"]);
            let started = async {
                let cid = c.create_container(&id, &cfg, &pod).await?;
                c.start_container(&cid).await
            };
            match tokio::time::timeout(Duration::from_secs(60), started)
                .await
                .context("CreateContainer/StartContainer with crun hung")?
            {
                Ok(()) => bail!("crun started a container in pod {id} on a hybrid cgroup host"),
                Err(e) => format!("{e:#}"),
            }
        }
        Ok(id) => bail!("crun started sandbox {id} on a hybrid cgroup host"),
        Err(e) => format!("{e:#}"),
    };
    eprintln!("crun refused after {:?}: {err}", t.elapsed());
    ensure!(
        err.contains("hybrid"),
        "error does not name the hybrid-cgroup reason: {err}"
    );
    ensure!(
        rootfs_mounts(env).is_empty(),
        "rootfs left mounted: {:?}",
        rootfs_mounts(env)
    );
    Ok(())
}

/// PATH with the shim's directory first, and a log file for the shims; set once per process,
/// before any test of this file starts threads that could read the environment.
fn setup_env() -> Result<PathBuf> {
    static ONCE: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let dir = shim_dir().map_err(|e| format!("{e:#}"))?;
        let log = PathBuf::from(format!(
            "/var/tmp/crisp-shim-e2e-{}.log",
            std::process::id()
        ));
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![dir];
        // The benchmark's dynamic crisp shim (see DYNAMIC_SHIM).
        if let Some(dynamic) = std::env::var_os("CRISP_SHIM_DYNAMIC") {
            paths.extend(Path::new(&dynamic).parent().map(Path::to_path_buf));
        }
        paths.extend(std::env::split_paths(&path));
        let joined = std::env::join_paths(paths).map_err(|e| e.to_string())?;
        // SAFETY: runs once, first thing in each test (nextest runs one test per process);
        // containerd inherits PATH and finds the shim there, and the shims their log file.
        unsafe {
            std::env::set_var("PATH", joined);
            std::env::set_var("CRISP_SHIM_LOG", &log);
        }
        Ok(log)
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

fn run(handler: &'static str) -> Result<()> {
    run_on(RuntimeKind::Containerd, handler)
}

/// The scenario against `kind`; for crispd the shim is the one built beside crispd (the
/// harness passes it as `shim_binary`), and `handler` is one of crispd's handlers.
fn run_on(kind: RuntimeKind, handler: &'static str) -> Result<()> {
    let shim_log = setup_env()?;
    let tmp = tempfile::Builder::new()
        .prefix("crisp-shim-e2e-")
        .tempdir_in("/var/tmp")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let registry = Registry::start()?;
        registry.push(&["busybox", "pause"])?;
        let env = TestEnv::builder(kind)
            .mirror(registry.host())
            .containerd_config(containerd_fragment(tmp.path())?)
            .start()
            .await?;
        let crun = handler == "crisp-crun" || handler == "crun";
        let outcome = if crun && hybrid_cgroups() {
            crun_refused(&env, handler).await
        } else {
            scenario(&env, handler).await
        };
        if outcome.is_err() {
            eprintln!("{kind} log tail:\n{}", env.daemon_log_tail(60));
            let log = std::fs::read_to_string(&shim_log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "shim log tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let leaks = env.teardown().await;
        outcome?;
        ensure!(leaks.is_empty(), "{handler}: teardown left {leaks:#?}");
        // A failing test keeps the shims' log (its tail is printed above); a passing one
        // leaves nothing in /var/tmp.
        let _ = std::fs::remove_file(&shim_log);
        Ok(())
    })
}

#[test]
fn containerd_crisp_shim_runc() -> Result<()> {
    run("crisp")
}

#[test]
fn containerd_crisp_shim_crun() -> Result<()> {
    run("crisp-crun")
}

/// The same scenario with crispd as the daemon: its default handler (runc).
#[test]
fn crispd_crisp_shim_runc() -> Result<()> {
    run_on(RuntimeKind::Crispd, "")
}

/// crispd's built-in crun handler: refused on this hybrid host, with the reason.
#[test]
fn crispd_crisp_shim_crun() -> Result<()> {
    run_on(RuntimeKind::Crispd, "crun")
}

fn stats(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    (mean, v.get(v.len() / 2).copied().unwrap_or(0.0))
}

/// A shim the benchmark runs: its runtime handler in containerd and its binary (canonical:
/// a running shim is told by /proc/<pid>/exe).
struct BenchShim {
    handler: &'static str,
    binary: PathBuf,
    linkage: Linkage,
}

/// crisp's shim (`CRISP_SHIM_DIR`), the same shim linked dynamically when
/// `CRISP_SHIM_DYNAMIC` names it (`make bench`: then crisp's must be the static one
/// `make release` builds), and containerd's runc shim, last (the ratios' denominator).
fn bench_shims() -> Result<Vec<BenchShim>> {
    let shim = |handler, path: PathBuf| -> Result<BenchShim> {
        let binary = path
            .canonicalize()
            .with_context(|| format!("{handler}: {}", path.display()))?;
        let linkage = linkage(&binary)?;
        Ok(BenchShim {
            handler,
            binary,
            linkage,
        })
    };
    let mut shims = vec![shim("crisp", shim_dir()?.join(SHIM))?];
    if let Some(dynamic) = std::env::var_os("CRISP_SHIM_DYNAMIC").map(PathBuf::from) {
        ensure!(
            dynamic.file_name() == Some(DYNAMIC_SHIM.as_ref()),
            "CRISP_SHIM_DYNAMIC={} must name a file called {DYNAMIC_SHIM}",
            dynamic.display()
        );
        let dynamic = shim("crisp-dynamic", dynamic)?;
        ensure!(
            matches!(shims[0].linkage, Linkage::Static { .. }),
            "{} is {}: make release links the shim statically",
            shims[0].binary.display(),
            shims[0].linkage
        );
        ensure!(
            matches!(dynamic.linkage, Linkage::Dynamic { .. }),
            "CRISP_SHIM_DYNAMIC={} is {}, not the dynamic shim",
            dynamic.binary.display(),
            dynamic.linkage
        );
        shims.push(dynamic);
    }
    shims.push(shim("runc", which("containerd-shim-runc-v2")?)?);
    Ok(shims)
}

/// containerd runs the shim its runtime type names (`io.containerd.crispdyn.v2`:
/// `containerd-shim-crispdyn-v2` on PATH; containerd 1.6 ignores `runtime_path`), so the
/// dynamic crisp shim is a file of that name, whose directory `setup_env` puts on PATH.
const DYNAMIC_SHIM: &str = "containerd-shim-crispdyn-v2";

fn dynamic_shim_fragment(dir: &Path, shims: &[BenchShim]) -> String {
    if !shims.iter().any(|s| s.handler == "crisp-dynamic") {
        return String::new();
    }
    let key = "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.crisp-dynamic";
    format!(
        "{key}]\nruntime_type = \"io.containerd.crispdyn.v2\"\n\
         {key}.options]\nConfigPath = \"{}\"\n",
        dir.join("crisp.toml").display()
    )
}

/// Pids of this env's shims running `binary`.
fn shims_running(env: &TestEnv, binary: &Path) -> Vec<i32> {
    let needle = env.socket.to_string_lossy().into_owned();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .as_deref()
                == Some(binary)
        })
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == needle.as_bytes()))
        })
        .collect()
}

/// Mean VmRSS, Pss, Pss_Anon and Anonymous (KiB) of `pids`.
fn shim_memory(pids: &[i32]) -> [f64; 4] {
    let mut out = [0.0; 4];
    for (i, field) in ["VmRSS", "Pss", "Pss_Anon", "Anonymous"].iter().enumerate() {
        let mut v: Vec<f64> = pids
            .iter()
            .filter_map(|p| match *field {
                "VmRSS" => vm_rss_kib(*p),
                f => smaps_kib(*p, f),
            })
            .map(|k| k as f64)
            .collect();
        out[i] = stats(&mut v).0;
    }
    out
}

/// One line per shim and its ratios to the last one (containerd's runc shim).
fn print_memory(title: &str, shims: &[BenchShim], mem: &[[f64; 4]]) {
    eprintln!(
        "{title} (KiB)\n  {:14} {:11} {:>7} {:>7} {:>8} {:>9}",
        "handler", "linkage", "VmRSS", "Pss", "Pss_Anon", "Anonymous"
    );
    for (s, m) in shims.iter().zip(mem) {
        let linkage = s.linkage.to_string();
        let linkage = linkage.split(' ').next().unwrap_or_default();
        eprintln!(
            "  {:14} {linkage:11} {:7.0} {:7.0} {:8.0} {:9.0}",
            s.handler, m[0], m[1], m[2], m[3]
        );
    }
    let Some(runc) = mem.last() else { return };
    for (s, m) in shims.iter().zip(mem).take(shims.len() - 1) {
        eprintln!(
            "  {}/runc-shim ratios: VmRSS {:.2}, Pss {:.2}, Pss_Anon {:.2}, Anonymous {:.2}",
            s.handler,
            m[0] / runc[0],
            m[1] / runc[1],
            m[2] / runc[2],
            m[3] / runc[3]
        );
    }
}

/// A static shim maps no shared object: nothing ld.so would have loaded (no NSS module, no
/// libgcc_s), which `linkage` alone cannot show for a process that could dlopen.
fn check_maps_no_shared_object(pid: i32, shim: &BenchShim) -> Result<()> {
    if !matches!(shim.linkage, Linkage::Static { .. }) {
        return Ok(());
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let so: Vec<&str> = maps.lines().filter(|l| l.contains(".so")).collect();
    ensure!(
        so.is_empty(),
        "static shim {pid} maps shared objects:\n{}",
        so.join("\n")
    );
    Ok(())
}

/// One pod of one container per shim, all running at once: each shim's own figures (its
/// Pss shares the binary's pages with no other shim of its kind). The pods are removed after.
async fn one_shim_each(env: &TestEnv, shims: &[BenchShim]) -> Result<()> {
    let c = env.cri();
    let mut pods = Vec::new();
    for s in shims {
        let pod = env.pod_config(&format!("one-{}", s.handler))?;
        let pod_id = run_pod(env, &pod, s.handler).await?;
        let cfg = container_config("a", BUSYBOX, &["sleep", "3600"]);
        c.run_container(&pod_id, &cfg, &pod).await?;
        pods.push(pod_id);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut mem = Vec::new();
    for s in shims {
        let pids = shims_running(env, &s.binary);
        ensure!(
            pids.len() == 1,
            "{}: {} shims {:?}, want one",
            s.handler,
            s.binary.display(),
            pids.iter()
                .map(|p| std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default())
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .collect::<Vec<_>>()
        );
        check_maps_no_shared_object(pids[0], s)?;
        mem.push(shim_memory(&pids));
    }
    print_memory("one shim each, a pod of one container", shims, &mem);
    for pod_id in pods {
        c.stop_and_remove_pod(&pod_id).await?;
    }
    Ok(())
}

/// 20 pods of 2 containers per shim, interleaved: mean memory per shim and pod start latency.
async fn twenty_pods_each(env: &TestEnv, shims: &[BenchShim]) -> Result<()> {
    let c = env.cri();
    let mut latency: Vec<Vec<f64>> = shims.iter().map(|_| Vec::new()).collect();
    for i in 0..20 * shims.len() {
        let s = &shims[i % shims.len()];
        let pod = env.pod_config(&format!("bench-{}", s.handler))?;
        let t = Instant::now();
        let pod_id = run_pod(env, &pod, s.handler).await?;
        for name in ["a", "b"] {
            let cfg = container_config(name, BUSYBOX, &["sleep", "3600"]);
            c.run_container(&pod_id, &cfg, &pod).await?;
        }
        latency[i % shims.len()].push(t.elapsed().as_secs_f64() * 1000.0);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut mem = Vec::new();
    for (s, lat) in shims.iter().zip(&mut latency) {
        let pids = shims_running(env, &s.binary);
        let (mean, median) = stats(lat);
        eprintln!(
            "{:14} shims: {:2} | pod start mean {mean:6.1} ms median {median:6.1} ms",
            s.handler,
            pids.len()
        );
        mem.push(shim_memory(&pids));
    }
    print_memory("20 pods of 2 containers each, mean per shim", shims, &mem);
    if let Some(secs) = std::env::var("CRISP_BENCH_HOLD")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        eprintln!(
            "holding {secs} s: crisp shims {:?}",
            shims_running(env, &shims[0].binary)
        );
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
    Ok(())
}

/// Benchmark, not a test: the memory of crisp's shim against containerd's own runc shim (and
/// crisp's shim linked dynamically, `CRISP_SHIM_DYNAMIC`), one containerd running them all:
/// first one pod of one container each, then 20 pods of 2 containers each, interleaved, with
/// pod start latency (RunPodSandbox + create/start of both containers).
/// `make bench` runs it on release builds; by hand:
/// `cargo test -p crisp-e2e --test shim_containerd -- --ignored --nocapture`
/// runs the shim next to this test binary (a debug build), while containerd's shim is a
/// release build: compare like with like with `CRISP_SHIM_DIR=target/release` after
/// `make release`. `CRISP_BENCH_HOLD=<secs>` keeps the pods running after the figures (shim
/// pids printed) to look at the shims' /proc/<pid>/smaps.
#[test]
#[ignore]
fn bench_shim_rss_and_pod_start() -> Result<()> {
    let shim_log = setup_env()?;
    let shims = bench_shims()?;
    for s in &shims {
        eprintln!("{:14} {} ({})", s.handler, s.binary.display(), s.linkage);
    }
    let tmp = tempfile::Builder::new()
        .prefix("crisp-shim-bench-")
        .tempdir_in("/var/tmp")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let registry = Registry::start()?;
        registry.push(&["busybox", "pause"])?;
        let mut fragment = containerd_fragment(tmp.path())?;
        fragment.push_str(&dynamic_shim_fragment(tmp.path(), &shims));
        let env = TestEnv::builder(RuntimeKind::Containerd)
            .mirror(registry.host())
            .containerd_config(fragment)
            .start()
            .await?;
        let outcome = async {
            env.cri().pull(BUSYBOX, None).await?;
            one_shim_each(&env, &shims).await?;
            twenty_pods_each(&env, &shims).await
        }
        .await;
        let leaks = env.teardown().await;
        outcome?;
        ensure!(leaks.is_empty(), "bench: teardown left {leaks:#?}");
        let _ = std::fs::remove_file(&shim_log);
        Ok(())
    })
}
