//! crispd's configuration: one TOML file where every key is optional, plus the command-line
//! flags people change most, which override the file.
//!
//! Only *internal* inconsistencies are checked here (promise 4): a relative path, a log level
//! that does not parse, a handler without a binary. Whether the CNI directory or a runtime
//! binary exists is checked later, in the start-up phase where it matters, and is never fatal.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

/// Where crispd looks for its configuration when `--config` is not given. A missing file at
/// this path is fine (the built-in defaults run a node); a missing file named by `--config` is
/// an error.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/crisp/config.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}` = {value:?}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
}

fn invalid(key: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Which OCI runtime runs containers when a pod names no runtime handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeChoice {
    /// Let the shim probe for one (crun first, then runc).
    Auto,
    Runc,
    Crun,
}

impl RuntimeChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Runc => "runc",
            Self::Crun => "crun",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    Cgroupfs,
    Systemd,
}

/// The shim's placement function takes its own driver type: one conversion, used everywhere.
impl From<CgroupDriver> for crisp_shim::placement::CgroupDriver {
    fn from(d: CgroupDriver) -> Self {
        match d {
            CgroupDriver::Cgroupfs => Self::Cgroupfs,
            CgroupDriver::Systemd => Self::Systemd,
        }
    }
}

impl CgroupDriver {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cgroupfs => "cgroupfs",
            Self::Systemd => "systemd",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Durable state: the store (`crisp.db`), CNI result cache, snapshots, content.
    pub root: PathBuf,
    /// Volatile state: sockets, network namespaces, FIFOs. Lost on reboot, on purpose.
    pub state: PathBuf,
    /// The CRI unix socket kubelet and crictl connect to.
    pub listen: PathBuf,
    /// A tracing filter: `info`, `debug`, or `crisp_cri=debug,info`.
    pub log_level: String,
    /// The OCI runtime for the default handler: `runc` or `crun` make the default handler
    /// that entry of `runtime_handlers` (its binary and options); `auto` lets the shim probe.
    pub runtime: RuntimeChoice,
    pub cgroup_driver: CgroupDriver,
    /// The shim binary crispd starts for each pod (name looked up in PATH, or a path).
    pub shim_binary: PathBuf,
    pub cni: CniConfig,
    pub registry: RegistryConfig,
    /// Named runtime handlers (a pod's `runtime_handler`). The empty name is the default
    /// handler and always exists; it uses `runtime`.
    pub runtime_handlers: BTreeMap<String, RuntimeHandler>,
    pub userns: UsernsConfig,
    pub metrics: MetricsConfig,
    pub pull: PullConfig,
    pub stream: StreamConfig,
    /// Longest CRI log record; longer lines are split into partial (`P`) records.
    pub max_container_log_line_size: usize,
    /// Where CDI spec files are read from, a later directory overriding an earlier one.
    pub cdi_spec_dirs: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CniConfig {
    /// Where network configurations (`*.conflist`, `*.conf`) are read from; the lexically
    /// first one is used. Watched: one written later is picked up without a restart.
    pub conf_dir: PathBuf,
    /// Where the plugin binaries are (Debian's containernetworking-plugins by default).
    pub bin_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Directories of per-registry `hosts.toml` files (containerd's `certs.d` layout), searched
    /// in order; the first that has a directory for a registry wins.
    pub config_dirs: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeHandler {
    /// The OCI runtime binary (a name looked up in PATH, or an absolute path).
    pub binary: PathBuf,
    /// Passed to the shim as runtime options (e.g. `root`, `systemd_cgroup`).
    pub options: BTreeMap<String, String>,
    /// Advertised in Status only when the runtime's `features` lists it too
    /// (`runtime_features`): these switch a feature off, never on.
    pub user_namespaces: bool,
    pub recursive_read_only_mounts: bool,
}

impl Default for RuntimeHandler {
    fn default() -> Self {
        Self {
            binary: PathBuf::new(),
            options: BTreeMap::new(),
            user_namespaces: true,
            recursive_read_only_mounts: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsernsConfig {
    /// The user whose /etc/subuid and /etc/subgid ranges crispd allocates pod ID maps from.
    pub user: String,
    pub subuid_file: PathBuf,
    pub subgid_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Prometheus endpoint; must be a loopback address. Empty disables it.
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PullConfig {
    pub max_concurrent_downloads: usize,
    /// A layer download slower than 1 KiB/s averaged over this many seconds counts as
    /// stalled and is resumed (HTTP Range) on a fresh connection.
    pub stall_window_secs: u64,
}

/// The streaming server (exec, attach, port-forward URLs kubelet and crictl dial).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// The IP address it listens on. kubelet dials the URL itself, so on a node this is
    /// usually loopback (kubelet proxies it to the API server).
    pub address: String,
    /// TCP port; 0 picks a free one at start.
    pub port: u16,
    /// A session with no traffic (PINGs do not count) for this long is closed and its exec
    /// killed: a number with a unit, `s`, `m` or `h` (e.g. `30m`).
    pub idle_timeout: String,
    /// PEM certificate chain (leaf first) to serve HTTPS with; with `tls_key_file`, or neither.
    /// URLs then start with `https://`. Off by default: kubelet dials loopback in plain HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1".into(),
            port: 0,
            idle_timeout: "4h".into(),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// `30s`, `15m`, `4h`: a positive whole number and a unit.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a whole number and a unit, like `4h`".to_string())?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "" => return Err("missing unit (`s`, `m` or `h`)".into()),
        other => return Err(format!("unknown unit `{other}` (`s`, `m` or `h`)")),
    }
    .ok_or_else(|| "too large".to_string())?;
    if secs == 0 {
        return Err("must be more than zero".into());
    }
    Ok(std::time::Duration::from_secs(secs))
}

impl StreamConfig {
    /// The socket address to listen on (validated by [`Config::validate`]).
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        let ip: std::net::IpAddr = self.address.parse().map_err(|e| {
            invalid(
                "stream.address",
                &self.address,
                format!("not an IP address ({e})"),
            )
        })?;
        Ok(SocketAddr::new(ip, self.port))
    }

    pub fn idle(&self) -> Result<std::time::Duration, ConfigError> {
        parse_duration(&self.idle_timeout)
            .map_err(|why| invalid("stream.idle_timeout", &self.idle_timeout, why))
    }

    /// The certificate and key to serve HTTPS with, if both are set; one without the other is
    /// a mistake, not plain HTTP.
    pub fn tls(&self) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (None, None) => Ok(None),
            (Some(c), Some(k)) => Ok(Some((c.clone(), k.clone()))),
            (Some(c), None) => Err(invalid(
                "stream.tls_key_file",
                "(unset)",
                format!("needed with stream.tls_cert_file = {}", c.display()),
            )),
            (None, Some(k)) => Err(invalid(
                "stream.tls_cert_file",
                "(unset)",
                format!("needed with stream.tls_key_file = {}", k.display()),
            )),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        self.idle()?;
        for (key, path) in [
            ("stream.tls_cert_file", &self.tls_cert_file),
            ("stream.tls_key_file", &self.tls_key_file),
        ] {
            if let Some(p) = path
                && let Err(e) = std::fs::File::open(p)
            {
                return Err(invalid(key, p.display(), format!("cannot be read: {e}")));
            }
        }
        self.tls()?;
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        let mut runtime_handlers = BTreeMap::new();
        for name in ["runc", "crun"] {
            runtime_handlers.insert(
                name.to_string(),
                RuntimeHandler {
                    binary: PathBuf::from(name),
                    ..RuntimeHandler::default()
                },
            );
        }
        Self {
            root: "/var/lib/crisp".into(),
            state: "/run/crisp".into(),
            listen: "/run/crisp/crisp.sock".into(),
            log_level: "info".into(),
            runtime: RuntimeChoice::Auto,
            cgroup_driver: CgroupDriver::Cgroupfs,
            shim_binary: "containerd-shim-crisp-v2".into(),
            cni: CniConfig::default(),
            registry: RegistryConfig::default(),
            runtime_handlers,
            userns: UsernsConfig::default(),
            metrics: MetricsConfig::default(),
            pull: PullConfig::default(),
            stream: StreamConfig::default(),
            max_container_log_line_size: 16 * 1024,
            cdi_spec_dirs: vec!["/etc/cdi".into(), "/var/run/cdi".into()],
        }
    }
}

impl Default for CniConfig {
    fn default() -> Self {
        Self {
            conf_dir: "/etc/cni/net.d".into(),
            bin_dir: "/usr/lib/cni".into(),
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        // containerd's directory is read too, so a node moving from containerd keeps its mirrors.
        Self {
            config_dirs: vec![
                "/etc/crisp/certs.d".into(),
                "/etc/containerd/certs.d".into(),
            ],
        }
    }
}

impl Default for UsernsConfig {
    fn default() -> Self {
        Self {
            user: "crisp".into(),
            subuid_file: "/etc/subuid".into(),
            subgid_file: "/etc/subgid".into(),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:1338".into(),
        }
    }
}

impl Default for PullConfig {
    fn default() -> Self {
        Self {
            max_concurrent_downloads: 3,
            stall_window_secs: 30,
        }
    }
}

/// The command line. Flags override the file.
#[derive(Debug, Parser)]
#[command(
    name = "crispd",
    version,
    about = "crisp: a Kubernetes CRI container runtime"
)]
pub struct Cli {
    #[command(flatten)]
    pub flags: Flags,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Print the built-in defaults as TOML (a starting point for /etc/crisp/config.toml).
    Default,
    /// Validate the config file (`--config FILE`, else /etc/crisp/config.toml) and the other
    /// flags given: every unknown key, value of the wrong type and invalid setting is named
    /// with its value; exits non-zero if there is any.
    Check,
}

#[derive(Debug, Default, Args)]
pub struct Flags {
    /// TOML config file [default: /etc/crisp/config.toml if it exists]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Durable state directory [default: /var/lib/crisp]
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Volatile state directory [default: /run/crisp]
    #[arg(long, global = true, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// CRI unix socket path [default: /run/crisp/crisp.sock]
    #[arg(long, global = true, value_name = "SOCKET")]
    pub listen: Option<PathBuf>,
    /// CNI network configuration directory [default: /etc/cni/net.d]
    #[arg(long, global = true, value_name = "DIR")]
    pub cni_conf_dir: Option<PathBuf>,
    /// CNI plugin binary directory [default: /usr/lib/cni]
    #[arg(long, global = true, value_name = "DIR")]
    pub cni_bin_dir: Option<PathBuf>,
    /// Registry hosts.toml directory (replaces the configured list)
    #[arg(long, global = true, value_name = "DIR")]
    pub registry_config_dir: Option<PathBuf>,
    /// OCI runtime for the default handler [default: auto]
    #[arg(long, global = true, value_enum)]
    pub runtime: Option<RuntimeChoice>,
    /// Cgroup driver [default: cgroupfs]
    #[arg(long, global = true, value_enum)]
    pub cgroup_driver: Option<CgroupDriver>,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive [default: info]
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

impl Config {
    /// Parse a TOML document; unknown keys are errors, because a misspelt key silently
    /// ignored is a setting that silently does nothing.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(cfg.with_default_handlers())
    }

    /// Adding a handler must not silently drop the built-in runc and crun ones: the file's
    /// table is merged over the defaults (an entry of the same name replaces the default).
    fn with_default_handlers(mut self) -> Self {
        for (name, h) in Self::default().runtime_handlers {
            self.runtime_handlers.entry(name).or_insert(h);
        }
        self
    }

    /// Parses a config document key by key, for `crispd config check`: serde stops at the
    /// first unknown key or mistyped value, an operator fixing a file wants them all. Each
    /// such key is a problem naming it and its value; the config returned holds the keys
    /// that parsed. Only a TOML syntax error stops the parse.
    pub fn from_toml_all(text: &str, path: &Path) -> Result<(Self, Vec<ConfigError>), ConfigError> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut bad = Vec::new();
        bad_keys(&[], &toml::Value::Table(doc.clone()), &mut bad);
        let mut problems = Vec::new();
        for (keys, value, reason) in bad {
            remove_key(&mut doc, &keys);
            problems.push(invalid(&keys.join("."), value, reason));
        }
        let cfg = match toml::Value::Table(doc).try_into::<Self>() {
            Ok(c) => c,
            // Every key parsed alone but not together: say so rather than guess which.
            Err(e) => {
                problems.push(ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.message().to_string(),
                });
                Self::default()
            }
        };
        Ok((cfg.with_default_handlers(), problems))
    }

    /// `crispd config check`: reads what [`Config::load`] would (the `--config` file, else
    /// the default path if it exists), applies the flags, and lists every problem. `Ok` says
    /// what was checked.
    pub fn check(flags: &Flags) -> Result<String, Vec<ConfigError>> {
        let (path, text) = match &flags.config {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => (path.clone(), Some(text)),
                Err(source) => {
                    return Err(vec![ConfigError::Read {
                        path: path.clone(),
                        source,
                    }]);
                }
            },
            None => {
                let path = PathBuf::from(DEFAULT_CONFIG_PATH);
                match std::fs::read_to_string(&path) {
                    Ok(text) => (path, Some(text)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => (path, None),
                    Err(source) => return Err(vec![ConfigError::Read { path, source }]),
                }
            }
        };
        let (mut cfg, mut problems) = match &text {
            Some(text) => Self::from_toml_all(text, &path).map_err(|e| vec![e])?,
            None => (Self::default(), Vec::new()),
        };
        cfg.apply_flags(flags);
        problems.extend(cfg.problems());
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(match text {
            Some(_) => format!("{}: valid", path.display()),
            None => format!(
                "no config file at {}: crispd runs with the built-in defaults, which are valid",
                path.display()
            ),
        })
    }

    pub fn to_toml(&self) -> String {
        // Serialising our own plain structs cannot fail; fall back to an explanation rather
        // than panicking if it ever does.
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// The file (explicit or default path), then the flags, then validation.
    pub fn load(flags: &Flags) -> Result<Self, ConfigError> {
        let mut cfg = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Self::from_toml(&text, path)?
            }
            None => {
                let path = Path::new(DEFAULT_CONFIG_PATH);
                match std::fs::read_to_string(path) {
                    Ok(text) => Self::from_toml(&text, path)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::default(),
                    Err(source) => {
                        return Err(ConfigError::Read {
                            path: path.to_path_buf(),
                            source,
                        });
                    }
                }
            }
        };
        cfg.apply_flags(flags);
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn apply_flags(&mut self, f: &Flags) {
        if let Some(v) = &f.root {
            self.root = v.clone();
        }
        if let Some(v) = &f.state {
            self.state = v.clone();
        }
        if let Some(v) = &f.listen {
            self.listen = v.clone();
        }
        if let Some(v) = &f.cni_conf_dir {
            self.cni.conf_dir = v.clone();
        }
        if let Some(v) = &f.cni_bin_dir {
            self.cni.bin_dir = v.clone();
        }
        if let Some(v) = &f.registry_config_dir {
            self.registry.config_dirs = vec![v.clone()];
        }
        if let Some(v) = f.runtime {
            self.runtime = v;
        }
        if let Some(v) = f.cgroup_driver {
            self.cgroup_driver = v;
        }
        if let Some(v) = &f.log_level {
            self.log_level = v.clone();
        }
    }

    /// Internal consistency only; nothing here touches the file system. The first problem
    /// of [`Config::problems`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.problems().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every internal inconsistency, each naming its key and value (`crispd config check`
    /// lists them all, so fixing one does not just reveal the next).
    pub fn problems(&self) -> Vec<ConfigError> {
        let mut p = Vec::new();
        self.path_problems(&mut p);
        self.name_problems(&mut p);
        self.limit_problems(&mut p);
        p
    }

    /// Paths: absolute, `root` and `state` apart, the socket path short enough.
    fn path_problems(&self, p: &mut Vec<ConfigError>) {
        for (key, path) in [
            ("root", &self.root),
            ("state", &self.state),
            ("listen", &self.listen),
            ("cni.conf_dir", &self.cni.conf_dir),
            ("cni.bin_dir", &self.cni.bin_dir),
            ("userns.subuid_file", &self.userns.subuid_file),
            ("userns.subgid_file", &self.userns.subgid_file),
        ] {
            if !path.is_absolute() {
                p.push(invalid(key, path.display(), "must be an absolute path"));
            }
        }
        for (i, dir) in self.registry.config_dirs.iter().enumerate() {
            if !dir.is_absolute() {
                p.push(invalid(
                    &format!("registry.config_dirs[{i}]"),
                    dir.display(),
                    "must be an absolute path",
                ));
            }
        }
        if self.root == self.state {
            p.push(invalid(
                "state",
                self.state.display(),
                "must differ from `root`: one is durable, the other is wiped on reboot",
            ));
        }
        // A unix socket path is limited to 108 bytes including the NUL.
        if self.listen.as_os_str().len() > 107 {
            p.push(invalid(
                "listen",
                self.listen.display(),
                "longer than 107 bytes",
            ));
        }
    }

    /// Names: the log filter, the shim and runtime binaries, the userns user, the metrics
    /// address.
    fn name_problems(&self, p: &mut Vec<ConfigError>) {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            p.push(invalid("log_level", &self.log_level, e.to_string()));
        }
        if self.shim_binary.as_os_str().is_empty() {
            p.push(invalid("shim_binary", "", "must name the shim binary"));
        }
        for (name, h) in &self.runtime_handlers {
            if name.is_empty() {
                p.push(invalid(
                    "runtime_handlers",
                    "\"\"",
                    "the empty name is the default handler; configure it with `runtime`",
                ));
            } else if h.binary.as_os_str().is_empty() {
                p.push(invalid(
                    &format!("runtime_handlers.{name}.binary"),
                    "",
                    "must name an OCI runtime binary",
                ));
            }
        }
        if self.userns.user.is_empty() || self.userns.user.contains(':') {
            p.push(invalid(
                "userns.user",
                &self.userns.user,
                "must be a user name",
            ));
        }
        if !self.metrics.address.is_empty() {
            match self.metrics.address.parse::<SocketAddr>() {
                Err(e) => p.push(invalid(
                    "metrics.address",
                    &self.metrics.address,
                    format!("not host:port ({e})"),
                )),
                Ok(addr) if !addr.ip().is_loopback() => p.push(invalid(
                    "metrics.address",
                    &self.metrics.address,
                    "must be a loopback address; metrics are not for the network",
                )),
                Ok(_) => {}
            }
        }
    }

    /// Limits: pulls, streaming and log lines.
    fn limit_problems(&self, p: &mut Vec<ConfigError>) {
        if self.pull.max_concurrent_downloads == 0 {
            p.push(invalid(
                "pull.max_concurrent_downloads",
                0,
                "must be at least 1",
            ));
        }
        if self.pull.stall_window_secs == 0 {
            p.push(invalid("pull.stall_window_secs", 0, "must be at least 1"));
        }
        if let Err(e) = self.stream.validate() {
            p.push(e);
        }
        if self.max_container_log_line_size < 64 {
            p.push(invalid(
                "max_container_log_line_size",
                self.max_container_log_line_size,
                "must be at least 64 bytes",
            ));
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.root.join("crisp.db")
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// The `hosts.toml` directory the image service reads: the first configured one that
    /// exists (the image service takes one directory), else the first configured.
    pub fn registry_hosts_dir(&self) -> Option<PathBuf> {
        self.registry
            .config_dirs
            .iter()
            .find(|d| d.is_dir())
            .or_else(|| self.registry.config_dirs.first())
            .cloned()
    }

    pub fn cni_cache_dir(&self) -> PathBuf {
        self.root.join("cni-cache")
    }

    pub fn netns_dir(&self) -> PathBuf {
        self.state.join("netns")
    }

    /// The `runtime_handlers` entry a pod's handler names: the default handler ("") is the
    /// one `runtime` names (`runc` or `crun`), binary and options; `None` with `auto`, whose
    /// shim probes.
    fn handler_entry<'a>(&self, handler: &'a str) -> Option<&'a str> {
        match (handler, self.runtime) {
            ("", RuntimeChoice::Auto) => None,
            ("", other) => Some(other.as_str()),
            (named, _) => Some(named),
        }
    }

    /// The OCI runtime binary for a pod's runtime handler; `None` for an unknown handler.
    /// The default handler with `runtime = auto` yields `Some(None)`: the shim probes.
    pub fn handler_binary(&self, handler: &str) -> Option<Option<PathBuf>> {
        let Some(name) = self.handler_entry(handler) else {
            return Some(None);
        };
        match self.runtime_handlers.get(name) {
            Some(h) => Some(Some(h.binary.clone())),
            // `runtime` names a binary even where the table has no entry of that name.
            None if handler.is_empty() => Some(Some(PathBuf::from(name))),
            None => None,
        }
    }

    /// The runtime options a pod's handler passes to its shim (`root` among them); none for
    /// the default handler with `auto`, or for an unknown handler.
    pub fn handler_options(&self, handler: &str) -> BTreeMap<String, String> {
        self.handler_entry(handler)
            .and_then(|name| self.runtime_handlers.get(name))
            .map(|h| h.options.clone())
            .unwrap_or_default()
    }
}

/// Collects `(keys, value, reason)` for each key under `at` whose value does not deserialize
/// into [`Config`] on its own, descending into tables so the deepest failing key is named.
fn bad_keys(at: &[String], value: &toml::Value, out: &mut Vec<(Vec<String>, String, String)>) {
    let wrapped = at.iter().rev().fold(value.clone(), |v, k| {
        toml::Value::Table(toml::Table::from_iter([(k.clone(), v)]))
    });
    let Err(e) = wrapped.try_into::<Config>() else {
        return;
    };
    if let toml::Value::Table(t) = value {
        let before = out.len();
        for (k, v) in t {
            let mut keys = at.to_vec();
            keys.push(k.clone());
            bad_keys(&keys, v, out);
        }
        if out.len() > before {
            return;
        }
    }
    let shown = match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    out.push((at.to_vec(), shown, e.message().to_string()));
}

/// Removes the key at `keys` from `doc`; the empty path empties the document.
fn remove_key(doc: &mut toml::Table, keys: &[String]) {
    let Some((last, parents)) = keys.split_last() else {
        doc.clear();
        return;
    };
    let mut t = doc;
    for k in parents {
        match t.get_mut(k) {
            Some(toml::Value::Table(next)) => t = next,
            _ => return,
        }
    }
    t.remove(last);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_round_trip_through_toml() {
        let d = Config::default();
        d.validate().expect("defaults are valid");
        let text = d.to_toml();
        let back = Config::from_toml(&text, Path::new("x")).expect("printed defaults parse");
        assert_eq!(d, back);
    }

    #[test]
    fn stream_section_defaults_and_checks_name_the_key() {
        let d = Config::default();
        assert!(d.to_toml().contains("[stream]"), "{}", d.to_toml());
        assert_eq!(
            d.stream.listen_addr().expect("addr").to_string(),
            "127.0.0.1:0"
        );
        assert_eq!(d.stream.idle().expect("idle").as_secs(), 4 * 3600);
        let c = Config::from_toml(
            "[stream]\nport = 10010\nidle_timeout = \"30m\"\n",
            Path::new("x"),
        )
        .expect("parses");
        assert_eq!(c.stream.port, 10010);
        assert_eq!(c.stream.idle().expect("idle").as_secs(), 1800);
        for (text, key) in [
            ("[stream]\naddress = \"localhost\"\n", "stream.address"),
            ("[stream]\nidle_timeout = \"0s\"\n", "stream.idle_timeout"),
            ("[stream]\nidle_timeout = \"4\"\n", "stream.idle_timeout"),
            ("[stream]\nidle_timeout = \"4d\"\n", "stream.idle_timeout"),
        ] {
            let c = Config::from_toml(text, Path::new("x")).expect("parses");
            match c.validate() {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(Config::from_toml("[stream]\nport = 70000\n", Path::new("x")).is_err());
        assert!(Config::from_toml("[stream]\ntls_cert = \"/c.pem\"\n", Path::new("x")).is_err());
    }

    #[test]
    fn stream_tls_needs_both_files_and_names_the_missing_or_unreadable_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("c.pem");
        std::fs::write(&cert, "x").expect("write");
        let c = Config::default();
        assert_eq!(c.stream.tls().expect("neither"), None);
        for (text, key) in [
            (
                format!("[stream]\ntls_cert_file = \"{}\"\n", cert.display()),
                "stream.tls_key_file",
            ),
            (
                format!("[stream]\ntls_key_file = \"{}\"\n", cert.display()),
                "stream.tls_cert_file",
            ),
            (
                format!(
                    "[stream]\ntls_cert_file = \"{}\"\ntls_key_file = \"/nonexistent/k.pem\"\n",
                    cert.display()
                ),
                "stream.tls_key_file",
            ),
        ] {
            let c = Config::from_toml(&text, Path::new("x")).expect("parses");
            match c.validate() {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        let both = format!(
            "[stream]\ntls_cert_file = \"{0}\"\ntls_key_file = \"{0}\"\n",
            cert.display()
        );
        let c = Config::from_toml(&both, Path::new("x")).expect("parses");
        assert_eq!(c.stream.tls().expect("both"), Some((cert.clone(), cert)));
    }

    #[test]
    fn empty_file_is_the_defaults() {
        let c = Config::from_toml("", Path::new("x")).expect("empty parses");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c = Config::from_toml(
            "root = \"/data/crisp\"\n[cni]\nconf_dir = \"/opt/cni\"\n",
            Path::new("x"),
        )
        .expect("parses");
        assert_eq!(c.root, PathBuf::from("/data/crisp"));
        assert_eq!(c.cni.conf_dir, PathBuf::from("/opt/cni"));
        assert_eq!(c.cni.bin_dir, PathBuf::from("/usr/lib/cni"));
        assert_eq!(c.state, PathBuf::from("/run/crisp"));
    }

    #[test]
    fn handlers_in_the_file_add_to_the_built_in_ones() {
        let c = Config::from_toml(
            "[runtime_handlers.kata]\nbinary = \"/opt/kata/runtime\"\n[runtime_handlers.runc]\nbinary = \"/usr/local/sbin/runc\"\n",
            Path::new("x"),
        )
        .expect("parses");
        let names: Vec<_> = c.runtime_handlers.keys().map(String::as_str).collect();
        assert_eq!(names, vec!["crun", "kata", "runc"]);
        assert_eq!(
            c.runtime_handlers["runc"].binary,
            PathBuf::from("/usr/local/sbin/runc")
        );
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let e = Config::from_toml("roots = \"/x\"\n", Path::new("/etc/crisp/config.toml"))
            .expect_err("unknown key");
        let msg = e.to_string();
        assert!(msg.contains("roots"), "{msg}");
        assert!(msg.contains("/etc/crisp/config.toml"), "{msg}");
    }

    #[test]
    fn bad_enum_value_is_an_error() {
        let e = Config::from_toml("cgroup_driver = \"cgroupv3\"\n", Path::new("x"))
            .expect_err("bad driver");
        assert!(e.to_string().contains("cgroupv3"), "{e}");
    }

    #[test]
    fn validation_names_key_and_value() {
        let c = Config {
            root: "relative/root".into(),
            ..Config::default()
        };
        let msg = c.validate().expect_err("relative").to_string();
        assert!(
            msg.contains("`root`") && msg.contains("relative/root"),
            "{msg}"
        );

        let c = Config {
            log_level: "loud[".into(),
            ..Config::default()
        };
        let msg = c.validate().expect_err("bad level").to_string();
        assert!(msg.contains("log_level") && msg.contains("loud["), "{msg}");

        let mut c = Config::default();
        c.metrics.address = "0.0.0.0:1338".into();
        let msg = c.validate().expect_err("not loopback").to_string();
        assert!(
            msg.contains("metrics.address") && msg.contains("0.0.0.0:1338"),
            "{msg}"
        );

        let mut c = Config::default();
        c.runtime_handlers
            .insert("kata".into(), RuntimeHandler::default());
        let msg = c.validate().expect_err("no binary").to_string();
        assert!(msg.contains("runtime_handlers.kata.binary"), "{msg}");

        let c = Config {
            state: "/var/lib/crisp".into(),
            ..Config::default()
        };
        assert!(
            c.validate()
                .expect_err("same")
                .to_string()
                .contains("`state`")
        );
    }

    #[test]
    fn flags_override_the_file() {
        let mut c = Config::from_toml(
            "root = \"/from/file\"\nruntime = \"crun\"\n[registry]\nconfig_dirs = [\"/a\", \"/b\"]\n",
            Path::new("x"),
        )
        .expect("parses");
        let cli = Cli::try_parse_from([
            "crispd",
            "--root",
            "/r",
            "--state",
            "/s",
            "--listen",
            "/s/c.sock",
            "--cni-conf-dir",
            "/d",
            "--cni-bin-dir",
            "/usr/lib/cni",
            "--registry-config-dir",
            "/h",
            "--runtime",
            "runc",
            "--cgroup-driver",
            "cgroupfs",
            "--log-level",
            "debug",
        ])
        .expect("the e2e harness's flags parse");
        c.apply_flags(&cli.flags);
        c.validate().expect("valid");
        assert_eq!(c.root, PathBuf::from("/r"));
        assert_eq!(c.state, PathBuf::from("/s"));
        assert_eq!(c.listen, PathBuf::from("/s/c.sock"));
        assert_eq!(c.cni.conf_dir, PathBuf::from("/d"));
        assert_eq!(c.registry.config_dirs, vec![PathBuf::from("/h")]);
        assert_eq!(c.runtime, RuntimeChoice::Runc);
        assert_eq!(c.log_level, "debug");
    }

    #[test]
    fn config_default_subcommand_parses() {
        let cli = Cli::try_parse_from(["crispd", "config", "default"]).expect("parses");
        assert!(matches!(
            cli.command,
            Some(Command::Config {
                action: ConfigAction::Default
            })
        ));
        let cli = Cli::try_parse_from(["crispd", "config", "check", "--config", "/c.toml"])
            .expect("parses");
        assert!(matches!(
            cli.command,
            Some(Command::Config {
                action: ConfigAction::Check
            })
        ));
        assert_eq!(cli.flags.config, Some(PathBuf::from("/c.toml")));
        assert!(Cli::try_parse_from(["crispd", "--runtime", "kata"]).is_err());
    }

    #[test]
    fn check_names_every_bad_key_and_value() {
        let doc = r#"
roots = "/x"
log_level = "debug"
cgroup_driver = "cgroupv3"
[pull]
max_concurrent_downloads = "three"
stall_window_secs = 10
[metrics]
address = "localhost"
[runtime_handlers.kata]
bianry = "/opt/kata/runtime"
"#;
        let (cfg, mut problems) =
            Config::from_toml_all(doc, Path::new("x")).expect("the TOML is well formed");
        // The keys that parsed are kept; the bad ones fall back to their defaults.
        assert_eq!(cfg.log_level, "debug");
        assert_eq!(cfg.pull.stall_window_secs, 10);
        assert_eq!(cfg.pull.max_concurrent_downloads, 3);
        problems.extend(cfg.problems());
        let msgs: Vec<String> = problems.iter().map(ToString::to_string).collect();
        let want = [
            ("`roots`", "\"/x\"", "unknown field"),
            ("`cgroup_driver`", "\"cgroupv3\"", "unknown variant"),
            (
                "`pull.max_concurrent_downloads`",
                "\"three\"",
                "invalid type",
            ),
            (
                "`runtime_handlers.kata.bianry`",
                "\"/opt/kata/runtime\"",
                "unknown field",
            ),
            ("`runtime_handlers.kata.binary`", "\"\"", "must name"),
            ("`metrics.address`", "\"localhost\"", "not host:port"),
        ];
        for (key, value, reason) in want {
            assert!(
                msgs.iter()
                    .any(|m| m.contains(key) && m.contains(value) && m.contains(reason)),
                "no problem naming {key} = {value} ({reason}) in {msgs:#?}"
            );
        }
        assert_eq!(msgs.len(), want.len(), "{msgs:#?}");
    }

    #[test]
    fn check_reports_a_syntax_error_and_accepts_the_defaults() {
        let e = Config::from_toml_all("root = \"/x\n", Path::new("/c.toml")).expect_err("syntax");
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        assert!(e.to_string().contains("/c.toml"), "{e}");

        let (cfg, problems) = Config::from_toml_all(&Config::default().to_toml(), Path::new("x"))
            .expect("defaults parse");
        assert!(problems.is_empty(), "{problems:?}");
        assert!(cfg.problems().is_empty());
    }

    #[test]
    fn check_reads_the_named_file_and_applies_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[metrics]\naddress = \"0.0.0.0:1338\"\n").expect("write");
        let flags = Flags {
            config: Some(path.clone()),
            root: Some("relative".into()),
            ..Flags::default()
        };
        let problems = Config::check(&flags).expect_err("two problems");
        let msgs: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(msgs.len(), 2, "{msgs:#?}");
        assert!(
            msgs[0].contains("`root`") && msgs[0].contains("relative"),
            "{msgs:#?}"
        );
        assert!(
            msgs[1].contains("`metrics.address`") && msgs[1].contains("0.0.0.0:1338"),
            "{msgs:#?}"
        );

        std::fs::write(&path, Config::default().to_toml()).expect("write");
        let flags = Flags {
            config: Some(path.clone()),
            ..Flags::default()
        };
        let ok = Config::check(&flags).expect("defaults are valid");
        assert!(ok.contains(&path.display().to_string()), "{ok}");

        let flags = Flags {
            config: Some(dir.path().join("missing.toml")),
            ..Flags::default()
        };
        let problems = Config::check(&flags).expect_err("missing file");
        assert!(
            matches!(problems[..], [ConfigError::Read { .. }]),
            "{problems:?}"
        );
    }

    #[test]
    fn handler_binary_resolution() {
        let mut c = Config::default();
        assert_eq!(c.handler_binary(""), Some(None));
        c.runtime = RuntimeChoice::Runc;
        assert_eq!(c.handler_binary(""), Some(Some("runc".into())));
        assert_eq!(c.handler_binary("crun"), Some(Some("crun".into())));
        assert_eq!(c.handler_binary("nope"), None);
    }

    #[test]
    fn default_handler_is_the_one_runtime_names() {
        let mut c = Config::default();
        let runc = c.runtime_handlers.get_mut("runc").expect("runc handler");
        runc.binary = "/opt/runc".into();
        runc.options.insert("root".into(), "/run/x/runc".into());
        assert!(
            c.handler_options("").is_empty(),
            "auto: the shim probes, no options"
        );
        c.runtime = RuntimeChoice::Runc;
        assert_eq!(c.handler_binary(""), Some(Some("/opt/runc".into())));
        assert_eq!(c.handler_options("")["root"], "/run/x/runc");
        assert!(c.handler_options("crun").is_empty());
        assert!(c.handler_options("nope").is_empty());
    }

    #[test]
    fn load_reads_explicit_file_and_reports_missing_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "log_level = \"debug\"\n").expect("write");
        let flags = Flags {
            config: Some(path.clone()),
            ..Flags::default()
        };
        assert_eq!(Config::load(&flags).expect("loads").log_level, "debug");
        let flags = Flags {
            config: Some(dir.path().join("missing.toml")),
            ..Flags::default()
        };
        assert!(matches!(
            Config::load(&flags),
            Err(ConfigError::Read { .. })
        ));
    }
}
