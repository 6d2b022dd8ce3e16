//! A private CRI daemon per test: its own root, state dir, socket, CNI network (bridge and
//! subnet), registry mirror config and cgroup parent; started by [`EnvBuilder::start`] and
//! torn down by [`TestEnv::teardown`] or, if the test panicked first, by `Drop`.
//!
//! The same test code drives containerd (the reference) and crispd: only [`RuntimeKind`]
//! differs.
//!
//! Teardown order matters: pods are stopped through CRI first (so the daemon undoes its own
//! work), then the daemon and any shim are killed by recorded pid, processes left in our
//! cgroups are killed, mounts under the root are detached deepest first, cgroups are removed
//! deepest first, then the bridge, then the root itself, never crossing a mount point.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::containerd;
use crate::cri::{self, CriClient};
use crate::leaks::{self, Footprint, ProcRef};

/// Which daemon answers the CRI socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    /// Debian's containerd 1.6 with its CRI plugin and runc: the reference.
    Containerd,
    /// Our own daemon (`crispd`, crate crisp-cri).
    Crispd,
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuntimeKind::Containerd => "containerd",
            RuntimeKind::Crispd => "crispd",
        })
    }
}

/// The CNI plugins the tests use (Debian's containernetworking-plugins).
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Where concurrent tests (separate processes under nextest) record which subnet is theirs.
const LOCK_DIR: &str = "/run/crisp-e2e";
/// `<root>/owner.lock`: flocked by the owning test process for the env's whole life.
const OWNER_LOCK: &str = "owner.lock";
/// `<root>/harness.json`: the env's cgroup parent, network and processes, for the sweeper.
const RECORD: &str = "harness.json";
/// How long a daemon may take to answer `Version`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Options for a test environment.
#[derive(Debug, Clone)]
pub struct EnvBuilder {
    kind: RuntimeKind,
    mirror: Option<String>,
    containerd_fragments: Vec<String>,
    crispd_config: Vec<String>,
    /// Write the network's conflist before the daemon starts (the default).
    cni_config: bool,
    /// Chain the portmap plugin after the bridge (hostPort tests).
    portmap: bool,
    /// Where the daemon finds CNI plugins, if not Debian's [`CNI_BIN_DIR`] (stand-in plugins).
    cni_bin_dir: Option<PathBuf>,
    /// Both daemons' log level; tests want `debug`, benchmarks what a node runs (`info`).
    log_level: &'static str,
    /// Extra environment for crispd (and the shims it starts): a test's failpoints.
    crispd_env: Vec<(String, String)>,
    /// The state dir on a tmpfs of its own, as /run is on a node (see [`EnvBuilder::state_on_tmpfs`]).
    state_tmpfs: bool,
}

impl EnvBuilder {
    /// The registry ("127.0.0.1:PORT") that serves docker.io, registry.k8s.io, ... Without
    /// one, those names point at a closed loopback port, so no pull ever leaves the host.
    pub fn mirror(mut self, host: impl Into<String>) -> Self {
        self.mirror = Some(host.into());
        self
    }

    /// A TOML fragment merged into containerd's config (ignored for crispd).
    pub fn containerd_config(mut self, fragment: impl Into<String>) -> Self {
        self.containerd_fragments.push(fragment.into());
        self
    }

    /// A TOML fragment merged into crispd's config file (ignored for containerd).
    pub fn crispd_config(mut self, fragment: impl Into<String>) -> Self {
        self.crispd_config.push(fragment.into());
        self
    }

    /// Start with an empty CNI config directory: the bridge and subnet are made, but the
    /// conflist is written only by [`TestEnv::write_cni_config`] (start-up order tests).
    pub fn without_cni_config(mut self) -> Self {
        self.cni_config = false;
        self
    }

    /// Chain CNI's portmap plugin (capability `portMappings`) after the bridge, so pods'
    /// hostPort mappings work. Off by default: portmap needs iptables and adds host rules.
    pub fn portmap(mut self) -> Self {
        self.portmap = true;
        self
    }

    /// CNI plugins from `dir` instead of Debian's `/usr/lib/cni`: a test's stand-ins (a plugin
    /// that fails on cue), next to links to the real ones.
    pub fn cni_bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cni_bin_dir = Some(dir.into());
        self
    }

    /// The daemon's state dir (containerd's /run/containerd, crispd's /run/crisp) on a tmpfs
    /// of its own, as /run is on a node. This machine's /run and /var/tmp are one ext4 without
    /// a journal, where every new inode scans the inodes deleted in the last five minutes
    /// (`recently_deleted` in `find_inode_bit`): a benchmark that starts and removes thousands
    /// of pods would measure that scan, not the runtime. Unmounted at teardown.
    pub fn state_on_tmpfs(mut self) -> Self {
        self.state_tmpfs = true;
        self
    }

    /// The daemon's log level (`debug` by default): a benchmark runs both at `info`, as a
    /// node does, so that neither pays for debug lines the other does not write.
    pub fn log_level(mut self, level: &'static str) -> Self {
        self.log_level = level;
        self
    }

    /// An environment variable for crispd, kept across restarts (e.g. a failpoint such as
    /// `CRISP_FAILPOINT_SLOW_COMMIT`); ignored for containerd.
    pub fn crispd_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.crispd_env.push((key.into(), value.into()));
        self
    }

    /// Creates the private root, network and configs, starts the daemon and waits until it
    /// answers CRI `Version`. On error everything made so far is torn down.
    pub async fn start(self) -> Result<TestEnv> {
        let base = base_dir();
        // Leftovers of test processes that were killed before their `Drop` ran.
        sweep_stale(&base);
        let root = tempfile::Builder::new()
            .prefix("crisp-e2e-")
            .tempdir_in(&base)
            .with_context(|| format!("creating a test root under {}", base.display()))?
            // Removal is ours: tempfile's recursive delete would cross mount points.
            .keep();
        let tag = root
            .file_name()
            .map(|n| n.to_string_lossy().replace("crisp-e2e-", ""))
            .unwrap_or_default();
        // Held for the env's life: a sweeper that can take it knows the owner is dead.
        let owner = File::create(root.join(OWNER_LOCK))?;
        // SAFETY: flock on a valid, owned fd.
        if unsafe { libc::flock(owner.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!("cannot lock {}", root.join(OWNER_LOCK).display());
        }
        let cgroup_parent = format!("/crisp-e2e-{}", cri::random_hex(8));
        let mut env = TestEnv::at(self.kind, root, cgroup_parent);
        env.owner = Some(owner);
        // `env` owns everything from here: an early return drops it, which tears down.
        env.prepare(&self, &tag).await?;
        Ok(env)
    }
}

/// What an idle daemon legitimately keeps (see [`TestEnv::idle_baseline`]).
#[derive(Debug, Clone, Default)]
pub struct Idle {
    pub mounts: Vec<PathBuf>,
    pub snapshots: Vec<PathBuf>,
}

/// A running CRI daemon with everything it needs, private to one test.
pub struct TestEnv {
    pub kind: RuntimeKind,
    /// Private root (mode 0711); everything below is the test's.
    pub root: PathBuf,
    /// The daemon's state dir (containerd `state`, crispd `--state`).
    pub state: PathBuf,
    pub socket: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub hosts_dir: PathBuf,
    /// Parent of the pods' log directories.
    pub pod_log_dir: PathBuf,
    /// The daemon's stdout and stderr.
    pub daemon_log: PathBuf,
    /// crispd's shims log here, one `<pod id>.log` each (`CRISP_SHIM_LOG` names the
    /// directory); under containerd, shims log through containerd into `daemon_log`.
    pub shim_log_dir: PathBuf,
    /// cgroupfs parent for every pod, e.g. `/crisp-e2e-0123abcd`.
    pub cgroup_parent: String,
    net: Option<Network>,
    daemon: Option<Child>,
    cri: Option<CriClient>,
    /// Processes recorded while running (daemon, shims), for the leak check.
    seen: Vec<ProcRef>,
    torn_down: bool,
    keep_log_on_panic: bool,
    /// Set by [`TestEnv::finish`] with a failed outcome: the logs are kept.
    failed: bool,
    /// The flock on `<root>/owner.lock`, held while this process owns the env.
    owner: Option<File>,
    /// How the daemon was started, for [`TestEnv::restart_daemon`].
    opts: Option<EnvBuilder>,
}

impl TestEnv {
    /// The env's layout under `root`; nothing is created here.
    fn at(kind: RuntimeKind, root: PathBuf, cgroup_parent: String) -> Self {
        TestEnv {
            kind,
            state: root.join("state"),
            socket: root.join("cri.sock"),
            cni_conf_dir: root.join("net.d"),
            hosts_dir: root.join("hosts.d"),
            pod_log_dir: root.join("pods"),
            daemon_log: root.join(format!("{kind}.log")),
            shim_log_dir: root.join("shim-logs"),
            cgroup_parent,
            root,
            net: None,
            daemon: None,
            cri: None,
            seen: Vec::new(),
            torn_down: false,
            keep_log_on_panic: true,
            failed: false,
            owner: None,
            opts: None,
        }
    }

    /// Writes `<root>/harness.json`: what a sweeper needs to tear this env down if the test
    /// process dies without running `Drop` (nextest's timeout, SIGKILL, abort).
    fn write_record(&self) -> Result<()> {
        let net = self.net.as_ref();
        let record = serde_json::json!({
            "kind": self.kind.to_string(),
            "cgroup_parent": self.cgroup_parent,
            "network": net.map(|n| serde_json::json!({
                "name": n.name, "bridge": n.bridge, "subnet": n.subnet, "gateway": n.gateway,
            })),
            "processes": self.seen.iter().map(|p| serde_json::json!({
                "pid": p.pid, "start_time": p.start_time, "what": p.what,
            })).collect::<Vec<_>>(),
        });
        let tmp = self.root.join(".harness.json.tmp");
        std::fs::write(&tmp, record.to_string())?;
        std::fs::rename(&tmp, self.root.join(RECORD))?;
        Ok(())
    }

    /// Rebuilds an env from its `harness.json` (for the sweeper). It owns nothing yet.
    fn from_record(root: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(root.join(RECORD))
            .with_context(|| format!("reading {}", root.join(RECORD).display()))?;
        let r: serde_json::Value = serde_json::from_str(&text)?;
        let kind = match r["kind"].as_str() {
            Some("containerd") => RuntimeKind::Containerd,
            Some("crispd") => RuntimeKind::Crispd,
            other => bail!("{}: unknown kind {other:?}", root.display()),
        };
        let cgroup_parent = r["cgroup_parent"].as_str().unwrap_or_default().to_string();
        if !cgroup_parent.starts_with("/crisp-e2e-") {
            bail!(
                "{}: cgroup parent {cgroup_parent:?} is not one of ours",
                root.display()
            );
        }
        let mut env = TestEnv::at(kind, root.to_path_buf(), cgroup_parent);
        let field = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
        if r["network"].is_object() {
            let n = &r["network"];
            env.net = Some(Network {
                name: field(n, "name"),
                bridge: field(n, "bridge"),
                subnet: field(n, "subnet"),
                gateway: field(n, "gateway"),
                lock: None,
            });
        }
        for p in r["processes"].as_array().into_iter().flatten() {
            env.seen.push(ProcRef {
                pid: p["pid"].as_i64().unwrap_or_default() as i32,
                start_time: p["start_time"].as_u64().unwrap_or_default(),
                what: field(p, "what"),
            });
        }
        Ok(env)
    }

    pub fn builder(kind: RuntimeKind) -> EnvBuilder {
        EnvBuilder {
            kind,
            mirror: None,
            containerd_fragments: Vec::new(),
            crispd_config: Vec::new(),
            cni_config: true,
            portmap: false,
            cni_bin_dir: None,
            log_level: "debug",
            crispd_env: Vec::new(),
            state_tmpfs: false,
        }
    }

    /// A started environment with `mirror` as the registry for all upstream names.
    pub async fn start(kind: RuntimeKind, mirror: &str) -> Result<Self> {
        Self::builder(kind).mirror(mirror).start().await
    }

    pub fn cri(&self) -> &CriClient {
        self.cri
            .as_ref()
            .expect("TestEnv::cri before the daemon answered")
    }

    /// The pod network: bridge name, subnet, gateway.
    pub fn network(&self) -> &Network {
        self.net
            .as_ref()
            .expect("TestEnv::network before the network was made")
    }

    /// A pod config with a unique identity, its log directory under this env and the env's
    /// cgroup parent.
    pub fn pod_config(&self, name: &str) -> Result<crisp_proto::cri::v1::PodSandboxConfig> {
        cri::pod_config(name, &self.pod_log_dir, &self.cgroup_parent)
    }

    /// [`TestEnv::pod_config`] for a pod in its own user namespace (`userns_options` mode Pod).
    pub fn userns_pod_config(&self, name: &str) -> Result<crisp_proto::cri::v1::PodSandboxConfig> {
        use crisp_proto::cri::v1 as api;
        let mut cfg = self.pod_config(name)?;
        let linux = cfg.linux.get_or_insert_with(Default::default);
        let sc = linux.security_context.get_or_insert_with(Default::default);
        let ns = sc.namespace_options.get_or_insert_with(Default::default);
        ns.userns_options = Some(api::UserNamespace {
            mode: api::NamespaceMode::Pod as i32,
            ..Default::default()
        });
        Ok(cfg)
    }

    /// The last `n` lines of the daemon's log (for failure messages).
    pub fn daemon_log_tail(&self, n: usize) -> String {
        tail(&self.daemon_log, n)
    }

    async fn prepare(&mut self, opts: &EnvBuilder, tag: &str) -> Result<()> {
        // 0711: processes in a user namespace must be able to traverse to rootfs and logs.
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o711))?;
        for d in [
            &self.state,
            &self.cni_conf_dir,
            &self.hosts_dir,
            &self.pod_log_dir,
        ] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        if opts.state_tmpfs {
            nix::mount::mount(
                Some("tmpfs"),
                &self.state,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                Some("mode=0711,size=2g"),
            )
            .with_context(|| format!("mounting a tmpfs on {}", self.state.display()))?;
        }
        // Port 9 (discard) on loopback is closed: without a mirror, pulls fail locally.
        let mirror = opts.mirror.as_deref().unwrap_or("127.0.0.1:9");
        containerd::write_hosts_dir(&self.hosts_dir, mirror)?;

        let net = Network::create(tag)?;
        self.net = Some(net);
        self.opts = Some(opts.clone());
        if opts.portmap {
            which("iptables")
                .context("the portmap CNI plugin needs iptables (Debian package iptables)")?;
        }
        if opts.cni_config {
            self.write_cni_config()?;
        }
        self.write_record()?;
        self.spawn_daemon().await
    }

    /// Starts the daemon (first start or restart) with the options the env was made with,
    /// appending to its log, and waits until it answers `Version`.
    async fn spawn_daemon(&mut self) -> Result<()> {
        let opts = self.opts.clone().context("daemon options not recorded")?;
        let mut cmd = match self.kind {
            RuntimeKind::Containerd => self.containerd_command(&opts)?,
            RuntimeKind::Crispd => self.crispd_command(&opts)?,
        };
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.daemon_log)
            .with_context(|| format!("opening {}", self.daemon_log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        self.seen.extend(ProcRef::of(
            child.id() as i32,
            format!("{} daemon", self.kind),
        ));
        self.write_record()?;
        self.daemon = Some(child);
        self.cri = Some(self.wait_ready().await?);
        Ok(())
    }

    fn containerd_command(&self, opts: &EnvBuilder) -> Result<Command> {
        let bin = containerd::binary()?;
        let paths = containerd::Paths {
            root: self.root.join("root"),
            state: self.state.clone(),
            socket: self.socket.clone(),
            cni_conf_dir: self.cni_conf_dir.clone(),
            cni_bin_dir: opts
                .cni_bin_dir
                .clone()
                .unwrap_or_else(|| CNI_BIN_DIR.into()),
            hosts_dir: self.hosts_dir.clone(),
        };
        let mut config = containerd::Config::new(&paths)?;
        config.merge(&format!("[debug]\nlevel = {:?}\n", opts.log_level))?;
        for frag in &opts.containerd_fragments {
            config.merge(frag)?;
        }
        let file = self.root.join("containerd.toml");
        std::fs::write(&file, config.to_toml())
            .with_context(|| format!("writing {}", file.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&file);
        Ok(cmd)
    }

    fn crispd_command(&self, opts: &EnvBuilder) -> Result<Command> {
        let bin = crispd_binary()?;
        let file = self.root.join("crispd.toml");
        let mut config = toml::Table::new();
        // The built-in 127.0.0.1:1338 would make concurrent daemons collide: no metrics.
        config.insert(
            "metrics".into(),
            toml::Value::Table(toml::toml! { address = "" }),
        );
        // runc's state under the test's own state dir, as containerd's is (`--runtime runc`
        // makes the runc handler the default one), not in the host's /run/crisp/runc.
        let runc_root = self.state.join("runc").display().to_string();
        config.insert(
            "runtime_handlers".into(),
            toml::Value::Table(
                toml::toml! { [runc] binary = "runc" [runc.options] root = runc_root },
            ),
        );
        // The shim built with this crispd, not whatever `containerd-shim-crisp-v2` is on PATH.
        let shim = bin.with_file_name("containerd-shim-crisp-v2");
        if shim.is_file() {
            config.insert(
                "shim_binary".into(),
                toml::Value::String(shim.display().to_string()),
            );
        }
        for frag in &opts.crispd_config {
            let t = frag
                .parse::<toml::Table>()
                .with_context(|| format!("parsing crispd config fragment:\n{frag}"))?;
            containerd::merge_tables(&mut config, t);
        }
        let text = format!("# Written by the e2e harness; paths come as flags.\n{config}");
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        std::fs::create_dir_all(&self.shim_log_dir)
            .with_context(|| format!("creating {}", self.shim_log_dir.display()))?;
        let mut cmd = Command::new(bin);
        // Inherited by every shim crispd starts: each logs to `<dir>/<pod id>.log`.
        cmd.env("CRISP_SHIM_LOG", &self.shim_log_dir);
        cmd.envs(opts.crispd_env.iter().map(|(k, v)| (k, v)));
        cmd.arg("--config")
            .arg(&file)
            .arg("--root")
            .arg(self.root.join("root"))
            .arg("--state")
            .arg(&self.state)
            .arg("--listen")
            .arg(&self.socket)
            .arg("--cni-conf-dir")
            .arg(&self.cni_conf_dir)
            .arg("--cni-bin-dir")
            .arg(
                opts.cni_bin_dir
                    .as_deref()
                    .unwrap_or(Path::new(CNI_BIN_DIR)),
            )
            .arg("--registry-config-dir")
            .arg(&self.hosts_dir)
            .args([
                "--runtime",
                "runc",
                "--cgroup-driver",
                "cgroupfs",
                "--log-level",
                opts.log_level,
            ]);
        Ok(cmd)
    }

    /// Polls the socket until `Version` answers, failing early (with the log) if the daemon
    /// exits.
    async fn wait_ready(&mut self) -> Result<CriClient> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_err = None;
        loop {
            if let Some(child) = self.daemon.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "{} exited during start-up ({status}); last log lines from {}:\n{}",
                    self.kind,
                    self.daemon_log.display(),
                    self.daemon_log_tail(40)
                );
            }
            if self.socket.exists() {
                match CriClient::connect(&self.socket).await {
                    Ok(c) => match c.version().await {
                        Ok(_) => return Ok(c),
                        Err(e) => last_err = Some(e),
                    },
                    Err(e) => last_err = Some(e),
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not answer CRI Version on {} within {START_TIMEOUT:?} (last error: {:?}); \
                     last log lines:\n{}",
                    self.kind,
                    self.socket.display(),
                    last_err,
                    self.daemon_log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The end of a test: the daemon's log tail if `outcome` failed, teardown, the leak check.
    /// Returns `outcome`'s error first, else the leaks as one; `what` names the test.
    pub async fn finish(mut self, what: &str, outcome: Result<()>) -> Result<()> {
        if outcome.is_err() {
            eprintln!("{what}: daemon log tail:\n{}", self.daemon_log_tail(60));
            self.failed = true;
        }
        let leaks = self.teardown().await;
        outcome?;
        anyhow::ensure!(leaks.is_empty(), "{what}: teardown left {leaks:#?}");
        Ok(())
    }

    /// Tears everything down and returns what the leak check still finds (empty = clean).
    /// Tests `assert!(env.teardown().await.is_empty())`.
    pub async fn teardown(mut self) -> Vec<String> {
        if let Some(cri) = self.cri.clone() {
            remove_all_pods(&cri).await;
        }
        tokio::task::spawn_blocking(move || self.teardown_blocking())
            .await
            .unwrap_or_else(|e| vec![format!("teardown panicked: {e}")])
    }

    /// What this env has created so far, as the leak check sees it: paths, cgroup parent,
    /// network, and every process it knows (the daemon, and shims and containers found by
    /// their pid files or by a command line naming a path under the root).
    pub fn footprint(&self) -> Footprint {
        let mut procs = self.seen.clone();
        let mut outside = Vec::new();
        scan_runtime_files(&self.root, &self.cgroup_parent, &mut procs, &mut outside);
        // With the trailing slash, a root that is a prefix of another test's root never matches.
        let root_str = format!("{}/", self.root.display());
        for pid in leaks::processes_mentioning(&root_str) {
            if !procs.iter().any(|p| p.pid == pid) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let what = format!("{} (command line names {root_str})", comm.trim());
                procs.extend(ProcRef::of(pid, what));
            }
        }
        // A crisp shim listens in /run/containerd/s (as containerd's shims do) and removes its
        // socket only when it exits cleanly: note the sockets of the live ones, so a shim
        // killed by teardown leaves no socket behind.
        for p in procs.iter().filter(|p| is_crisp_shim(p.pid)) {
            for sock in unix_sockets_of(p.pid) {
                if is_shim_socket(&sock) && !outside.contains(&sock) {
                    outside.push(sock);
                }
            }
        }
        if self.kind == RuntimeKind::Containerd {
            let log = std::fs::read_to_string(&self.daemon_log).unwrap_or_default();
            for id in containerd::sandbox_ids_in_log(&log) {
                let sock = containerd::shim_socket(&self.socket, containerd::CRI_NAMESPACE, &id);
                if !outside.contains(&sock) {
                    outside.push(sock);
                }
            }
        }
        Footprint {
            root: self.root.clone(),
            cgroup_parent: self.cgroup_parent.clone(),
            bridge: self
                .net
                .as_ref()
                .map(|n| n.bridge.clone())
                .unwrap_or_default(),
            cni_network: self
                .net
                .as_ref()
                .map(|n| n.name.clone())
                .unwrap_or_default(),
            processes: procs,
            outside_files: outside,
        }
    }

    /// Whether a panic keeps the daemon log (under /var/tmp/crisp-e2e-logs); on by default,
    /// off for tests that panic on purpose. Leaks always keep it, and so does
    /// `CRISP_E2E_KEEP_LOGS=1`.
    pub fn keep_log_on_panic(&mut self, keep: bool) {
        self.keep_log_on_panic = keep;
    }

    /// The daemon's pid while it runs (tests that crash it on purpose kill it by this).
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|c| c.id())
    }

    /// Where the network's host-local IPAM keeps its allocations (under the root).
    pub fn cni_ipam_dir(&self) -> PathBuf {
        self.root.join("cni-ipam")
    }

    /// Writes the env's conflist into its CNI config directory (done at start unless the
    /// env was built [`EnvBuilder::without_cni_config`]); returns the file written.
    pub fn write_cni_config(&self) -> Result<PathBuf> {
        let portmap = self.opts.as_ref().is_some_and(|o| o.portmap);
        let conflist = if portmap {
            let plugin = serde_json::json!({
                "type": "portmap",
                "capabilities": { "portMappings": true },
            });
            self.network()
                .conflist_with(&self.cni_ipam_dir(), &[plugin])
        } else {
            self.network().conflist(&self.cni_ipam_dir())
        };
        let f = self.cni_conf_dir.join("10-crisp-e2e.conflist");
        // Written aside and renamed in, so a daemon watching the directory never reads half.
        let tmp = self.root.join(".conflist.tmp");
        std::fs::write(&tmp, conflist).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &f).with_context(|| format!("renaming to {}", f.display()))?;
        Ok(f)
    }

    /// crispd's store (`<root>/root/crisp.db`, the `--root` the harness passes).
    pub fn crispd_db(&self) -> PathBuf {
        self.root.join("root").join("crisp.db")
    }

    /// `kill -9` the daemon, as a crash would, and reap it. Shims and containers keep running.
    pub fn kill_daemon(&mut self) -> Result<()> {
        let mut child = self.daemon.take().context("the daemon is not running")?;
        child.kill().context("SIGKILL to the daemon")?;
        child.wait().context("reaping the daemon")?;
        self.cri = None;
        Ok(())
    }

    /// Starts the daemon again on the same root, state, socket, config and flags (after
    /// [`TestEnv::kill_daemon`]; a daemon still running is killed first) and waits until it
    /// answers `Version`. The log continues in the same file after a marker line.
    pub async fn restart_daemon(&mut self) -> Result<()> {
        if self.daemon.is_some() {
            self.kill_daemon()?;
        }
        {
            use std::io::Write;
            let mut log = File::options().append(true).open(&self.daemon_log)?;
            writeln!(log, "===== crisp-e2e: restarting {} =====", self.kind)?;
        }
        self.spawn_daemon().await
    }

    /// Pids of the live crisp shims (`containerd-shim-crisp-v2`) whose command line names a
    /// path under this env's root (crispd's events socket, containerd's socket).
    pub fn shim_pids(&self) -> Vec<i32> {
        let root = format!("{}/", self.root.display());
        leaks::processes_mentioning(&root)
            .into_iter()
            .filter(|pid| is_crisp_shim(*pid))
            .collect()
    }

    /// Entries of crispd's snapshot directory (`<root>/root/snapshots/snapshots`): image
    /// layers and containers' writable layers.
    pub fn snapshot_dirs(&self) -> Vec<PathBuf> {
        let dir = self.root.join("root").join("snapshots").join("snapshots");
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Named network namespaces crispd holds (`<state>/netns/*`).
    pub fn netns_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.state.join("netns"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// What a daemon with no pods should not have, while it keeps running: shim processes,
    /// processes or cgroups under the env's cgroup parent, mounts under the root that were
    /// not in `baseline` (taken when the daemon was idle), netns files, and snapshots not in
    /// `snapshots_baseline`. Empty means clean.
    pub fn idle_leftovers(&self, baseline: &Idle) -> Vec<String> {
        let mut v = Vec::new();
        for pid in self.shim_pids() {
            v.push(format!("shim process {pid}"));
        }
        let parent = self.cgroup_parent.trim_end_matches('/');
        for d in leaks::cgroup_dirs(parent) {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.split_whitespace() {
                v.push(format!("process {pid} in cgroup {}", d.display()));
            }
            // The parent itself may stay (the daemon or the harness made it); a child is a pod's.
            if !d.ends_with(parent.trim_start_matches('/')) {
                v.push(format!("cgroup {}", d.display()));
            }
        }
        // crispd makes its netns directory a shared mount on itself at the first pod (as
        // `ip netns` does) and keeps it while it runs: that one is not a pod's.
        let netns_dir = self.state.join("netns");
        for m in leaks::mounts_under(&self.root) {
            if !baseline.mounts.contains(&m) && m != netns_dir {
                v.push(format!("mount {}", m.display()));
            }
        }
        for f in self.netns_files() {
            v.push(format!("netns {}", f.display()));
        }
        for s in self.snapshot_dirs() {
            if !baseline.snapshots.contains(&s) {
                v.push(format!("snapshot {}", s.display()));
            }
        }
        v
    }

    /// What an idle daemon legitimately has: take it after pulling images, before any pod.
    pub fn idle_baseline(&self) -> Idle {
        Idle {
            mounts: leaks::mounts_under(&self.root),
            snapshots: self.snapshot_dirs(),
        }
    }

    /// Everything after the CRI calls. Idempotent; safe on a half-started env.
    fn teardown_blocking(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        // Record what is running before anything is removed: pid files vanish with the root.
        let fp = self.footprint();

        if let Some(child) = self.daemon.take() {
            stop_child(child, Duration::from_secs(10));
        }
        // The daemon is gone; shims it left are ours by pid file or by command line.
        for p in fp.processes.iter().filter(|p| p.alive()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        kill_cgroup_processes(&self.cgroup_parent, Duration::from_secs(5));
        for p in &fp.processes {
            wait_gone(p, Duration::from_secs(5));
        }

        for _ in 0..3 {
            let mounts = leaks::mounts_under(&self.root);
            if mounts.is_empty() {
                break;
            }
            for m in mounts {
                let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        remove_cgroups(&self.cgroup_parent, Duration::from_secs(5));
        if let Some(net) = &self.net {
            net.remove();
        }
        for f in &fp.outside_files {
            let _ = std::fs::remove_file(f);
        }
        for f in leaks::cni_cache_files(&fp.cni_network, &fp.root) {
            let _ = std::fs::remove_file(f);
        }

        // Keep the logs when something went wrong: the root is about to go.
        let before: Vec<String> = leaks::check(&fp)
            .into_iter()
            .filter(|l| !l.starts_with("test root"))
            .collect();
        let keep_always = std::env::var_os("CRISP_E2E_KEEP_LOGS").is_some_and(|v| v == "1");
        if !before.is_empty() || keep_always || self.failed {
            self.keep_logs();
        }
        let removal = remove_tree(&self.root);
        if let Some(net) = self.net.take() {
            net.release();
        }
        let mut leaks = leaks::check(&fp);
        if let Err(e) = removal {
            leaks.push(format!("removing {}: {e:#}", self.root.display()));
        }
        leaks
    }

    /// Copies the daemon's log and every shim's into `/var/tmp/crisp-e2e-logs/<root name>/`
    /// and says where, with the daemon log's last lines.
    fn keep_logs(&self) {
        let name = self
            .root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dest = Path::new(KEPT_LOGS).join(name);
        match copy_logs(&self.daemon_log, &self.shim_log_dir, &dest) {
            Ok(shims) => eprintln!(
                "crisp-e2e: {} log and {shims} shim log(s) kept in {}; last daemon lines:\n{}",
                self.kind,
                dest.display(),
                self.daemon_log_tail(30)
            ),
            Err(e) => eprintln!(
                "crisp-e2e: could not keep the logs in {}: {e:#}; last daemon lines:\n{}",
                dest.display(),
                self.daemon_log_tail(30)
            ),
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        // Dropped without `teardown`/`finish`: the test ended early, by a panic or by
        // returning an error. Either way it failed, so its logs are kept (unless it panics
        // on purpose and said so).
        self.failed |= !std::thread::panicking() || self.keep_log_on_panic;
        // We may be inside the test's runtime (even unwinding from a panic in it): make the
        // best-effort CRI calls on a fresh runtime in a thread of their own.
        if self.cri.is_some() {
            let socket = self.socket.clone();
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async {
                    if let Ok(Ok(c)) =
                        tokio::time::timeout(Duration::from_secs(5), CriClient::connect(&socket))
                            .await
                    {
                        remove_all_pods(&c).await;
                    }
                });
            })
            .join();
        }
        let leaks = self.teardown_blocking();
        if !leaks.is_empty() {
            eprintln!(
                "crisp-e2e: teardown of {} left: {leaks:#?}",
                self.root.display()
            );
        }
    }
}

/// Where the logs of a failed test are kept, one directory per test root.
pub const KEPT_LOGS: &str = "/var/tmp/crisp-e2e-logs";

/// Copies `daemon_log` and every file of `shim_dir` into `dest`; the number of shim logs.
fn copy_logs(daemon_log: &Path, shim_dir: &Path, dest: &Path) -> Result<usize> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    if let Some(name) = daemon_log.file_name() {
        std::fs::copy(daemon_log, dest.join(name))
            .with_context(|| format!("copying {}", daemon_log.display()))?;
    }
    let mut n = 0;
    let entries = match std::fs::read_dir(shim_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("listing {}", shim_dir.display())),
    };
    let shims = dest.join("shims");
    std::fs::create_dir_all(&shims).with_context(|| format!("creating {}", shims.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("listing {}", shim_dir.display()))?;
        std::fs::copy(e.path(), shims.join(e.file_name()))
            .with_context(|| format!("copying {}", e.path().display()))?;
        n += 1;
    }
    Ok(n)
}

/// Where test roots are made: `$CRISP_E2E_TMPDIR`, else /var/tmp.
pub fn base_dir() -> PathBuf {
    std::env::var_os("CRISP_E2E_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp".into())
}

/// Tears down every env under `base` whose owning test process is gone without running
/// `Drop` (killed by a timeout, SIGKILL, abort). Ownership is the flock on `owner.lock`:
/// it is free exactly when the owner is dead, and holding it keeps two sweepers apart.
/// Returns each swept root with what its teardown still found.
pub fn sweep_stale(base: &Path) -> Vec<(PathBuf, Vec<String>)> {
    let mut swept = Vec::new();
    let Ok(rd) = std::fs::read_dir(base) else {
        return swept;
    };
    for e in rd.flatten() {
        let root = e.path();
        let named = e.file_name().to_string_lossy().starts_with("crisp-e2e-");
        if !named || !root.join(RECORD).is_file() {
            continue;
        }
        // Open without creating: a root still being made has no lock file yet; skip it.
        let Ok(lock) = File::open(root.join(OWNER_LOCK)) else {
            continue;
        };
        // SAFETY: flock on a valid, owned fd.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue; // alive, or another sweeper has it
        }
        let leaks = match TestEnv::from_record(&root) {
            Ok(mut env) => {
                env.owner = Some(lock);
                env.keep_log_on_panic = false;
                env.teardown_blocking()
            }
            Err(e) => vec![format!("unreadable record: {e:#}")],
        };
        if !leaks.is_empty() {
            eprintln!(
                "crisp-e2e: sweeping stale {} left {leaks:#?}",
                root.display()
            );
        }
        swept.push((root, leaks));
    }
    swept
}

/// The footprint of an env whose owner is gone, read from its record (tests of the sweeper
/// take it before sweeping, to check afterwards that all of it went).
pub fn stale_footprint(root: &Path) -> Result<Footprint> {
    let mut env = TestEnv::from_record(root)?;
    let fp = env.footprint();
    env.torn_down = true; // only looked at: dropping it must not tear anything down
    Ok(fp)
}

/// Stops and removes every pod the daemon knows (all are ours: the daemon is private).
async fn remove_all_pods(cri: &CriClient) {
    let Ok(Ok(pods)) = tokio::time::timeout(Duration::from_secs(10), cri.list_pods()).await else {
        return;
    };
    for id in pods {
        let _ = tokio::time::timeout(Duration::from_secs(30), cri.stop_pod(&id)).await;
        let _ = tokio::time::timeout(Duration::from_secs(30), cri.remove_pod(&id)).await;
    }
}

/// Walks `root` (not crossing mounts) for pid files (containerd's `init.pid`, any other
/// `*.pid`) of processes that are ours, and `address` files naming shim sockets outside the
/// root (containerd 1.6 puts them in /run/containerd/s/<hash of our socket path>).
fn scan_runtime_files(
    root: &Path,
    cgroup_parent: &str,
    procs: &mut Vec<ProcRef>,
    outside: &mut Vec<PathBuf>,
) {
    let root_str = format!("{}/", root.display());
    let Ok(dev) = std::fs::symlink_metadata(root).map(|m| m.dev()) else {
        return;
    };
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            let Ok(md) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let name = e.file_name().to_string_lossy().into_owned();
            if md.is_dir() {
                // Rootfs mounts and the like: what is inside is the container's, not ours.
                if md.dev() == dev {
                    stack.push(path);
                }
            } else if md.is_file() && md.len() < 4096 {
                if name.ends_with(".pid") {
                    let pid = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|s| s.trim().parse::<i32>().ok());
                    // Image content under the root can hold any `*.pid` file: a pid counts only
                    // if the process is in our cgroups or names our root (a shim).
                    if let Some(pid) = pid
                        && pid > 1
                        && !procs.iter().any(|p| p.pid == pid)
                        && leaks::process_is_ours(pid, &root_str, cgroup_parent)
                    {
                        procs.extend(ProcRef::of(pid, format!("pid file {}", path.display())));
                    }
                } else if name == "address"
                    && let Ok(s) = std::fs::read_to_string(&path)
                {
                    let s = s.trim();
                    let p = PathBuf::from(s.strip_prefix("unix://").unwrap_or(s));
                    // Only containerd's shim socket dir: an `address` file in image content
                    // must never make us delete an arbitrary host file.
                    if is_shim_socket(&p) && !outside.contains(&p) {
                        outside.push(p);
                    }
                }
            }
        }
    }
}

/// Whether `pid` runs `containerd-shim-crisp-v2` (its argv[0]).
fn is_crisp_shim(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        c.split(|b| *b == 0)
            .next()
            .is_some_and(|a0| a0.ends_with(b"containerd-shim-crisp-v2"))
    })
}

/// Paths of the named unix sockets process `pid` holds (a shim's ttrpc socket): the inodes
/// of its `socket:[N]` fds, looked up in /proc/net/unix.
pub fn unix_sockets_of(pid: i32) -> Vec<PathBuf> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    l.strip_prefix("socket:[")
                        .and_then(|r| r.strip_suffix(']'))
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let mut v: Vec<PathBuf> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            // Num RefCount Protocol Flags Type St Inode Path
            let f: Vec<&str> = l.split_whitespace().collect();
            let (inode, path) = (f.get(6)?, f.get(7)?);
            (inodes.iter().any(|i| i == inode) && path.starts_with('/'))
                .then(|| PathBuf::from(path))
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Whether `p` is a containerd-style shim socket (`/run/containerd/s/<64 hex>`), the only
/// files outside the root the harness ever removes.
pub fn is_shim_socket_path(p: &Path) -> bool {
    is_shim_socket(p)
}

/// `/run/containerd/s/<64 hex>`: where containerd 1.6 shims listen.
fn is_shim_socket(p: &Path) -> bool {
    p.parent() == Some(Path::new("/run/containerd/s"))
        && p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// SIGTERM, then SIGKILL after `grace`; always reaps.
fn stop_child(mut child: Child, grace: Duration) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn wait_gone(p: &ProcRef, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while p.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills every process in a cgroup under `parent` (they are our containers), until the
/// cgroups are empty or `timeout` passes.
fn kill_cgroup_processes(parent: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut any = false;
        for dir in leaks::cgroup_dirs(parent) {
            let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
                continue;
            };
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                any = true;
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if !any || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// rmdir every cgroup under `parent`, deepest first, retrying while the kernel still
/// releases them (EBUSY right after the last process died).
fn remove_cgroups(parent: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let dirs = leaks::cgroup_dirs(parent);
        if dirs.is_empty() {
            return;
        }
        for d in dirs {
            let _ = std::fs::remove_dir(&d);
        }
        if Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes `root` recursively without ever crossing into another filesystem or a mount
/// point (DESIGN.md promise 5): a directory still mounted is left, and reported.
fn remove_tree(root: &Path) -> Result<()> {
    if !root.exists() {
        return Ok(());
    }
    let mounted = leaks::mounts_under(root);
    if !mounted.is_empty() {
        bail!("still mounted, not removing: {mounted:?}");
    }
    let dev = std::fs::symlink_metadata(root)?.dev();
    remove_tree_on(root, dev)
}

fn remove_tree_on(dir: &Path, dev: u64) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = e?.path();
        let md = std::fs::symlink_metadata(&path)?;
        if md.is_dir() {
            if md.dev() != dev {
                bail!("{} is on another filesystem; not removing", path.display());
            }
            remove_tree_on(&path, dev)?;
        } else {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

/// The test's pod network: a bridge the harness creates (with the gateway address on it),
/// a /24 held by a lock file, and a CNI network name.
///
/// The harness makes the bridge itself and the CNI bridge plugin runs with
/// `isGateway: false`: with `isGateway: true` the plugin turns on the host-wide
/// net.ipv4.ip_forward, which tests must not change. The host still reaches pods (and pods
/// the host) through the bridge address; nothing is routed beyond it.
#[derive(Debug)]
pub struct Network {
    pub name: String,
    pub bridge: String,
    /// Third and second octets: the subnet is 10.<b>.<c>.0/24.
    pub subnet: String,
    pub gateway: String,
    lock: Option<(File, PathBuf)>,
}

impl Network {
    fn create(tag: &str) -> Result<Self> {
        let taken = ipv4_prefixes_in_use()?;
        std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
        // Random start so concurrent tests rarely even contend for the same lock.
        let start = u32::from_str_radix(&cri::random_hex(6), 16)? as usize;
        let count = (250 - 88 + 1) * 256;
        for i in 0..count {
            let n = (start + i) % count;
            let (b, c) = (88 + n / 256, n % 256);
            // cri-server/tests/cni_netns.rs takes 10.234.<pid % 250 + 1>.0/24 without a lock.
            if b == 234 {
                continue;
            }
            let net = (10u32 << 24) | ((b as u32) << 16) | ((c as u32) << 8);
            if taken
                .iter()
                .any(|&(addr, len)| overlaps(net, 24, addr, len))
            {
                continue;
            }
            let path = subnet_lock_path(&format!("10.{b}.{c}.0/24"));
            let Some(file) = try_lock(&path)? else {
                continue;
            };
            let mut me = Self {
                name: format!("crisp-e2e-{tag}"),
                bridge: String::new(),
                subnet: format!("10.{b}.{c}.0/24"),
                gateway: format!("10.{b}.{c}.1"),
                lock: Some((file, path)),
            };
            me.bridge = make_bridge(&me.gateway)?;
            return Ok(me);
        }
        bail!("no free /24 in 10.88.0.0-10.250.255.0 (all in use by routes or other tests)")
    }

    /// The CNI conflist: bridge + host-local with its allocations under the test root
    /// (the default, /var/lib/cni/networks, is host state).
    pub fn conflist(&self, ipam_dir: &Path) -> String {
        self.conflist_with(ipam_dir, &[])
    }

    /// The conflist with `extra` plugins chained after the bridge (e.g. portmap).
    pub fn conflist_with(&self, ipam_dir: &Path, extra: &[serde_json::Value]) -> String {
        let mut list = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": self.name,
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": false,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": self.subnet, "gateway": self.gateway }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": ipam_dir,
                }
            }]
        });
        if let Some(plugins) = list["plugins"].as_array_mut() {
            plugins.extend(extra.iter().cloned());
        }
        list.to_string()
    }

    /// Deletes veths still attached to our bridge, and the bridge.
    fn remove(&self) {
        if !self.bridge.is_empty() && leaks::link_exists(&self.bridge) {
            let brif = Path::new("/sys/class/net").join(&self.bridge).join("brif");
            if let Ok(rd) = std::fs::read_dir(brif) {
                for e in rd.flatten() {
                    let _ = ip(&["link", "del", &e.file_name().to_string_lossy()]);
                }
            }
            let _ = ip(&["link", "del", &self.bridge]);
        }
    }

    /// Gives the subnet back. The lock file is unlinked while still locked, so a racing
    /// test that opened the old inode notices (see `try_lock`).
    fn release(mut self) {
        // A sweeper does not hold the lock of the dead owner: take it first (it is free
        // once the owner died), so the unlink cannot race a test that just locked it.
        let lock = self.lock.take().or_else(|| {
            let path = subnet_lock_path(&self.subnet);
            try_lock(&path).ok().flatten().map(|f| (f, path))
        });
        if let Some((file, path)) = lock {
            let _ = std::fs::remove_file(&path);
            drop(file);
        }
    }
}

fn subnet_lock_path(subnet: &str) -> PathBuf {
    let net = subnet.trim_end_matches(".0/24");
    PathBuf::from(format!("{LOCK_DIR}/subnet-{net}.lock"))
}

/// Creates `crb<6 hex>` with `gateway`/24 on it, up.
fn make_bridge(gateway: &str) -> Result<String> {
    for _ in 0..10 {
        let name = format!("crb{}", cri::random_hex(6));
        if leaks::link_exists(&name) {
            continue;
        }
        ip(&["link", "add", "name", &name, "type", "bridge"])?;
        let setup = ip(&["addr", "add", &format!("{gateway}/24"), "dev", &name])
            .and_then(|_| ip(&["link", "set", "dev", &name, "up"]));
        if let Err(e) = setup {
            let _ = ip(&["link", "del", &name]);
            return Err(e);
        }
        return Ok(name);
    }
    bail!("could not find a free bridge name")
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (Debian package iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Every IPv4 prefix on an interface or in any routing table, except default routes.
fn ipv4_prefixes_in_use() -> Result<Vec<(u32, u8)>> {
    let mut v = Vec::new();
    for args in [
        &["-4", "-o", "addr", "show"][..],
        &["-4", "route", "show", "table", "all"][..],
    ] {
        let out = Command::new("ip")
            .args(args)
            .output()
            .context("running `ip` (Debian package iproute2)")?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(p) = line.split_whitespace().find_map(parse_prefix) {
                v.push(p);
            }
        }
    }
    Ok(v)
}

fn parse_prefix(s: &str) -> Option<(u32, u8)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, l.parse().ok()?),
        None => (s, 32),
    };
    let ip: std::net::Ipv4Addr = addr.parse().ok()?;
    (len > 0 && len <= 32).then_some((u32::from(ip), len))
}

fn overlaps(a: u32, alen: u8, b: u32, blen: u8) -> bool {
    let len = alen.min(blen);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    a & mask == b & mask
}

/// Takes an exclusive non-blocking flock on `path`; `None` if another test holds it.
/// Rechecks the inode after locking: a holder that released meanwhile unlinked the file,
/// and a lock on an unlinked inode protects nothing.
fn try_lock(path: &Path) -> Result<Option<File>> {
    for _ in 0..5 {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock {}", path.display()))?;
        // SAFETY: flock on a valid, owned fd.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Ok(None);
        }
        match std::fs::metadata(path) {
            Ok(md) if md.ino() == f.metadata()?.ino() => return Ok(Some(f)),
            _ => continue,
        }
    }
    Ok(None)
}

/// Connects to `ip:port` and reads until the server closes (2 s for each step): one answer
/// of a test's `nc -l` or httpd server.
pub async fn read_once(ip: std::net::IpAddr, port: u16) -> Result<String> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((ip, port)),
    )
    .await
    .context("connect timed out")??;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut buf))
        .await
        .context("read timed out")??;
    Ok(buf)
}

/// A test body for [`with_crispd`]: borrows the env for as long as it runs.
pub type CrispdBody =
    for<'a> fn(
        &'a TestEnv,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>>;

/// A fresh crispd whose local registry serves busybox and pause (and whatever `prepare`
/// pushes), with busybox pulled; then `body`, the daemon's log tail on failure, teardown and
/// the leak check; prints how long it took.
pub async fn with_crispd(
    name: &str,
    prepare: impl FnOnce(&crate::registry::Registry) -> Result<()>,
    body: CrispdBody,
) -> Result<()> {
    let t0 = Instant::now();
    let registry = crate::registry::Registry::start()?;
    registry.push(&["busybox", "pause"])?;
    prepare(&registry)?;
    let env = TestEnv::start(RuntimeKind::Crispd, &registry.host()).await?;
    let outcome = async {
        env.cri()
            .pull(&crate::images::BUSYBOX.upstream(), None)
            .await?;
        body(&env).await
    }
    .await;
    let result = env.finish(name, outcome).await;
    eprintln!("{name}: {:?}", t0.elapsed());
    result
}

/// Finds `name` on PATH.
pub fn which(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .with_context(|| format!("{name} not found on PATH"))
}

/// crispd: `$CRISP_BIN`, else next to the test binary's profile dir
/// (target/<profile>/crispd; test binaries live in target/<profile>/deps).
pub fn crispd_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CRISP_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let candidate = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .map(|d| d.join("crispd"))
        .context("locating the target dir from the test binary")?;
    if !candidate.is_file() {
        bail!(
            "crispd not found at {} (build it with `cargo build -p crisp-cri`, or set CRISP_BIN)",
            candidate.display()
        );
    }
    Ok(candidate)
}

fn tail(path: &Path, n: usize) -> String {
    let Ok(f) = File::open(path) else {
        return format!("<no log at {}>", path.display());
    };
    let lines: Vec<String> = BufReader::new(f).lines().map_while(|l| l.ok()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_overlap() {
        assert_eq!(parse_prefix("10.88.3.0/24"), Some((0x0a580300, 24)));
        assert_eq!(parse_prefix("192.0.2.2"), Some((0xc0000202, 32)));
        assert_eq!(parse_prefix("default"), None);
        assert!(overlaps(0x0a580300, 24, 0x0a000000, 8));
        assert!(overlaps(0x0a580300, 24, 0x0a580305, 32));
        assert!(!overlaps(0x0a580300, 24, 0x0a580400, 24));
    }

    #[test]
    fn lock_is_exclusive_and_survives_release() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lock");
        let a = try_lock(&p).unwrap().expect("first lock");
        assert!(try_lock(&p).unwrap().is_none());
        std::fs::remove_file(&p).unwrap();
        drop(a);
        assert!(try_lock(&p).unwrap().is_some());
    }
}
