//! CNI: find the network configuration, and run its plugins (ADD / DEL / CHECK) the way the
//! CNI spec (0.4 / 1.0) says a runtime does: exec each plugin of the list in turn with
//! `CNI_*` variables and the plugin's config on stdin, passing each one's result on to the
//! next as `prevResult`.
//!
//! The configuration may appear after crispd starts (a network daemonset writes it), so it is
//! never required at start-up: [`CniManager`] re-reads the directory every second and Status
//! reports NetworkReady=false with the reason until it is there.
//!
//! Each ADD's result and the exact config used are cached in `<root>/cni-cache/<pod>.json`,
//! so DEL after a restart (or after the conflist changed) tears down what ADD set up.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{ErrorKind, HasKind};

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// No usable configuration (yet); the message says what is missing.
    #[error("network plugin not ready: {0}")]
    NotReady(String),
    #[error("CNI config {path}: {message}")]
    BadConfig { path: PathBuf, message: String },
    #[error("CNI plugin {plugin} {command} for pod {pod_id}: {message}")]
    Plugin {
        plugin: String,
        command: &'static str,
        pod_id: String,
        message: String,
    },
    #[error("CNI cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl HasKind for CniError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotReady(_) | Self::BadConfig { .. } => ErrorKind::FailedPrecondition,
            // A plugin is a program outside crispd that failed, crashed or timed out: the
            // pod's network cannot be made now, and kubelet retries. Internal would blame
            // crispd; the message names the plugin and what it said.
            Self::Plugin { .. } => ErrorKind::Unavailable,
            Self::Cache { .. } => ErrorKind::Internal,
        }
    }
}

/// A network configuration list (a `.conf` file is turned into a list of one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkConfig {
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Value>,
    pub source: PathBuf,
}

impl NetworkConfig {
    pub fn parse(path: &Path, text: &str) -> Result<Self, CniError> {
        let bad = |message: String| CniError::BadConfig {
            path: path.to_path_buf(),
            message,
        };
        let v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let name = v
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing `name`".into()))?
            .to_string();
        let cni_version = v
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("0.4.0")
            .to_string();
        let plugins = match v.get("plugins") {
            Some(Value::Array(list)) => list.clone(),
            Some(_) => return Err(bad("`plugins` is not a list".into())),
            // A single-plugin `.conf`: the whole object is the plugin.
            None => vec![v.clone()],
        };
        if plugins.is_empty() {
            return Err(bad("`plugins` is empty".into()));
        }
        for (i, p) in plugins.iter().enumerate() {
            if p.get("type")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(bad(format!("plugins[{i}] has no `type`")));
            }
        }
        Ok(Self {
            name,
            cni_version,
            plugins,
            source: path.to_path_buf(),
        })
    }

    pub fn plugin_types(&self) -> Vec<String> {
        self.plugins
            .iter()
            .filter_map(|p| p.get("type").and_then(Value::as_str).map(str::to_string))
            .collect()
    }

    fn has_capability(plugin: &Value, cap: &str) -> bool {
        plugin
            .get("capabilities")
            .and_then(|c| c.get(cap))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// The lexically first `.conflist` / `.conf` / `.json` in `dir`, checked against `bin_dir`.
pub fn load_dir(dir: &Path, bin_dir: &Path) -> Result<NetworkConfig, CniError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        CniError::NotReady(format!(
            "cannot read CNI config directory {} ({e})",
            dir.display()
        ))
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conflist" | "conf" | "json")
            )
        })
        .collect();
    files.sort();
    let Some(first) = files.first() else {
        return Err(CniError::NotReady(format!(
            "no network config (*.conflist, *.conf) in {}",
            dir.display()
        )));
    };
    let text = std::fs::read_to_string(first).map_err(|e| CniError::BadConfig {
        path: first.clone(),
        message: e.to_string(),
    })?;
    let cfg = NetworkConfig::parse(first, &text)?;
    for t in cfg.plugin_types() {
        let bin = bin_dir.join(&t);
        if !bin.is_file() {
            return Err(CniError::NotReady(format!(
                "CNI plugin `{t}` named by {} is not in {}",
                first.display(),
                bin_dir.display()
            )));
        }
    }
    Ok(cfg)
}

/// Holds the current network configuration, re-read from the directory in the background.
#[derive(Debug)]
pub struct CniManager {
    conf_dir: PathBuf,
    bin_dir: PathBuf,
    cache_dir: PathBuf,
    current: RwLock<Result<Arc<NetworkConfig>, String>>,
}

impl CniManager {
    pub fn new(conf_dir: PathBuf, bin_dir: PathBuf, cache_dir: PathBuf) -> Self {
        let m = Self {
            conf_dir,
            bin_dir,
            cache_dir,
            current: RwLock::new(Err("not loaded yet".into())),
        };
        m.reload();
        m
    }

    /// Re-read the directory; logs only when the outcome changes.
    pub fn reload(&self) {
        // Keep only the inner message: `current()` wraps it in NotReady again.
        let next = load_dir(&self.conf_dir, &self.bin_dir)
            .map(Arc::new)
            .map_err(|e| match e {
                CniError::NotReady(m) => m,
                other => other.to_string(),
            });
        let mut cur = match self.current.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let changed = match (&*cur, &next) {
            (Ok(a), Ok(b)) => a != b,
            (Err(a), Err(b)) => a != b,
            _ => true,
        };
        if changed {
            match &next {
                Ok(c) => tracing::info!(network = %c.name, file = %c.source.display(),
                    plugins = ?c.plugin_types(), "CNI network config loaded"),
                Err(why) => tracing::warn!(reason = %why, "CNI not ready"),
            }
        }
        *cur = next;
    }

    /// Poll the directory. Polling rather than inotify: it also notices a directory created
    /// later, a bind mount replaced, or a plugin binary installed after the config.
    pub fn spawn_watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let m = Arc::clone(&me);
                // Directory reads are blocking I/O; keep them off the async workers.
                let _ = tokio::task::spawn_blocking(move || m.reload()).await;
            }
        })
    }

    /// The config to use now, or why there is none.
    pub fn current(&self) -> Result<Arc<NetworkConfig>, CniError> {
        let cur = match self.current.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        cur.clone().map_err(CniError::NotReady)
    }

    pub fn conf_dir(&self) -> &Path {
        &self.conf_dir
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    fn cache_path(&self, pod_id: &str) -> PathBuf {
        self.cache_dir.join(format!("{pod_id}.json"))
    }

    /// Set up the pod's network in `netns`. The result and config are cached first thing after
    /// success, so a crash after ADD still lets DEL clean up.
    pub fn add(&self, req: &AttachRequest) -> Result<CniResult, CniError> {
        let cfg = self.current()?;
        let result = run_list(&cfg, &self.bin_dir, Command::Add, req, None)?;
        let entry = CacheEntry {
            version: 1,
            config: (*cfg).clone(),
            request: req.clone(),
            result: result.clone(),
        };
        write_cache(&self.cache_path(&req.pod_id), &entry)?;
        Ok(CniResult::from_value(&result))
    }

    /// Check the pod's network is as ADD left it.
    pub fn check(&self, pod_id: &str) -> Result<(), CniError> {
        let Some(entry) = read_cache(&self.cache_path(pod_id))? else {
            return Err(CniError::NotReady(format!(
                "no CNI result cached for pod {pod_id}"
            )));
        };
        run_list(
            &entry.config,
            &self.bin_dir,
            Command::Check,
            &entry.request,
            Some(entry.result),
        )?;
        Ok(())
    }

    /// Tear down what ADD did, using the cached config and result when there is one (so it
    /// works after a restart, and after the directory's config changed). Idempotent: a pod with
    /// nothing cached and no current config has nothing to delete.
    pub fn del(&self, req: &AttachRequest) -> Result<(), CniError> {
        let path = self.cache_path(&req.pod_id);
        let (cfg, request, prev) = match read_cache(&path)? {
            Some(e) => (Arc::new(e.config), e.request, Some(e.result)),
            None => match self.current() {
                Ok(c) => (c, req.clone(), None),
                Err(_) => return Ok(()),
            },
        };
        // The netns may already be gone (pod removed after a reboot); plugins must still
        // release IPs and iptables rules, and CNI says DEL with an empty netns is allowed.
        let mut request = request;
        // Also when the file is there but no longer a namespace (a crash between umount and
        // unlink, or during creation): plugins reject a path that is not nsfs.
        let ns = Path::new(&request.netns);
        if !ns.exists() || (ns.is_file() && !crate::network::netns::is_netns(ns)) {
            request.netns = String::new();
        }
        run_list(&cfg, &self.bin_dir, Command::Del, &request, prev)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CniError::Cache { path, source }),
        }
    }

    pub fn has_cache(&self, pod_id: &str) -> bool {
        self.cache_path(pod_id).exists()
    }

    /// Pods with a cached ADD result, sorted: what recovery compares with the store.
    pub fn cached_pods(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.cache_dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.strip_suffix(".json")
                            .filter(|s| !s.starts_with('.'))
                            .map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// DEL using only what the cache recorded (the pod is gone, so nothing else is known).
    pub fn del_cached(&self, pod_id: &str) -> Result<(), CniError> {
        let path = self.cache_path(pod_id);
        let Some(entry) = read_cache(&path)? else {
            // Unreadable: nothing to run DEL with; drop it so it is not retried forever.
            let _ = std::fs::remove_file(&path);
            return Ok(());
        };
        self.del(&entry.request)
    }
}

/// Everything a plugin invocation needs about the pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachRequest {
    pub pod_id: String,
    pub netns: String,
    pub ifname: String,
    /// `K8S_POD_NAMESPACE=...;K8S_POD_NAME=...` style arguments.
    pub args: BTreeMap<String, String>,
    pub port_mappings: Vec<PortMapping>,
}

/// The `portMappings` runtime config of the portmap plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: i32,
    pub container_port: i32,
    pub protocol: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

/// The parts of a CNI result crispd uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CniResult {
    pub ips: Vec<String>,
    pub raw: Value,
}

impl CniResult {
    fn from_value(v: &Value) -> Self {
        let mut ips = Vec::new();
        if let Some(list) = v.get("ips").and_then(Value::as_array) {
            for ip in list {
                if let Some(addr) = ip.get("address").and_then(Value::as_str) {
                    // "10.1.2.3/24" → "10.1.2.3"
                    ips.push(addr.split('/').next().unwrap_or(addr).to_string());
                }
            }
        }
        Self {
            ips,
            raw: v.clone(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    version: u32,
    config: NetworkConfig,
    request: AttachRequest,
    result: Value,
}

fn write_cache(path: &Path, entry: &CacheEntry) -> Result<(), CniError> {
    let err = |source| CniError::Cache {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let bytes = serde_json::to_vec_pretty(entry).map_err(|e| err(e.into()))?;
    crate::util::write_atomic(path, &bytes).map_err(err)
}

fn read_cache(path: &Path) -> Result<Option<CacheEntry>, CniError> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<CacheEntry>(&bytes) {
            Ok(e) => Ok(Some(e)),
            Err(e) => {
                // A torn cache file cannot be used for DEL; fall back to the current config.
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable CNI cache");
                Ok(None)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CniError::Cache {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
}

impl Command {
    fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
        }
    }
}

/// The stdin document for one plugin of the list (CNI spec: "network configuration
/// derivation"): the plugin's object plus the list's name and version, runtimeConfig for the
/// capabilities it declares, and the previous result.
pub fn plugin_input(
    cfg: &NetworkConfig,
    plugin: &Value,
    req: &AttachRequest,
    prev: Option<&Value>,
) -> Value {
    let mut obj = plugin.as_object().cloned().unwrap_or_default();
    obj.insert("name".into(), json!(cfg.name));
    obj.insert("cniVersion".into(), json!(cfg.cni_version));
    let mut runtime = serde_json::Map::new();
    if NetworkConfig::has_capability(plugin, "portMappings") && !req.port_mappings.is_empty() {
        runtime.insert("portMappings".into(), json!(req.port_mappings));
    }
    if !runtime.is_empty() {
        obj.insert("runtimeConfig".into(), Value::Object(runtime));
    }
    if let Some(p) = prev {
        obj.insert("prevResult".into(), p.clone());
    }
    Value::Object(obj)
}

/// Run every plugin of the list for one command. ADD runs in order, threading each result into
/// the next; DEL runs in reverse and keeps going after a failure (to release as much as it
/// can), reporting the first error; CHECK runs in order with the cached result.
fn run_list(
    cfg: &NetworkConfig,
    bin_dir: &Path,
    cmd: Command,
    req: &AttachRequest,
    cached: Option<Value>,
) -> Result<Value, CniError> {
    match cmd {
        Command::Add => {
            let mut prev: Option<Value> = None;
            for plugin in &cfg.plugins {
                let input = plugin_input(cfg, plugin, req, prev.as_ref());
                let out = exec_plugin(bin_dir, cmd, req, plugin, &input)?;
                prev = Some(out);
            }
            Ok(prev.unwrap_or(Value::Null))
        }
        Command::Check => {
            for plugin in &cfg.plugins {
                let input = plugin_input(cfg, plugin, req, cached.as_ref());
                exec_plugin(bin_dir, cmd, req, plugin, &input)?;
            }
            Ok(Value::Null)
        }
        Command::Del => {
            let mut first_err = None;
            for plugin in cfg.plugins.iter().rev() {
                let input = plugin_input(cfg, plugin, req, cached.as_ref());
                if let Err(e) = exec_plugin(bin_dir, cmd, req, plugin, &input) {
                    tracing::warn!(pod_id = %req.pod_id, error = %e, "CNI DEL step failed");
                    first_err.get_or_insert(e);
                }
            }
            match first_err {
                Some(e) => Err(e),
                None => Ok(Value::Null),
            }
        }
    }
}

/// How long one plugin may run; bridge + iptables are quick, a hung plugin must not hang a pod.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

fn exec_plugin(
    bin_dir: &Path,
    cmd: Command,
    req: &AttachRequest,
    plugin: &Value,
    input: &Value,
) -> Result<Value, CniError> {
    let ty = plugin
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let fail = |message: String| CniError::Plugin {
        plugin: ty.clone(),
        command: cmd.as_str(),
        pod_id: req.pod_id.clone(),
        message,
    };
    let args: Vec<String> = req.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut child = std::process::Command::new(bin_dir.join(&ty))
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("CNI_COMMAND", cmd.as_str())
        .env("CNI_CONTAINERID", &req.pod_id)
        .env("CNI_NETNS", &req.netns)
        .env("CNI_IFNAME", &req.ifname)
        .env("CNI_PATH", bin_dir)
        .env("CNI_ARGS", args.join(";"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("exec {}: {e}", bin_dir.join(&ty).display())))?;
    let bytes = serde_json::to_vec(input).map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&bytes)
            .map_err(|e| fail(format!("writing stdin: {e}")))?;
    }
    let out = crate::util::wait_output_timeout(child, PLUGIN_TIMEOUT)
        .map_err(|e| fail(format!("waiting: {e}")))?;
    if !out.status.success() {
        // Plugins report errors as JSON on stdout: {"code":..,"msg":..,"details":..}.
        let msg = serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| {
                let m = v.get("msg").and_then(Value::as_str)?.to_string();
                let d = v.get("details").and_then(Value::as_str).unwrap_or_default();
                Some(if d.is_empty() { m } else { format!("{m}: {d}") })
            })
            .unwrap_or_else(|| {
                format!(
                    "{}; stdout: {}; stderr: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            });
        return Err(fail(msg));
    }
    if cmd != Command::Add || out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&out.stdout).map_err(|e| fail(format!("bad result JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_plugin_is_unavailable_not_internal() {
        let e = CniError::Plugin {
            plugin: "bridge".into(),
            command: "ADD",
            pod_id: "p".into(),
            message: "try again later".into(),
        };
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.to_string().contains("bridge ADD"), "{e}");
    }

    const LIST: &str = r#"{
        "cniVersion": "1.0.0", "name": "testnet",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]}"#;

    fn req() -> AttachRequest {
        AttachRequest {
            pod_id: "p1".into(),
            netns: "/run/crisp/netns/p1".into(),
            ifname: "eth0".into(),
            args: BTreeMap::new(),
            port_mappings: vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: String::new(),
            }],
        }
    }

    #[test]
    fn parses_list_and_single_conf() {
        let c = NetworkConfig::parse(Path::new("a.conflist"), LIST).expect("list");
        assert_eq!(c.name, "testnet");
        assert_eq!(c.plugin_types(), vec!["bridge", "portmap"]);
        let c = NetworkConfig::parse(
            Path::new("a.conf"),
            r#"{"cniVersion":"0.4.0","name":"n","type":"bridge"}"#,
        )
        .expect("conf");
        assert_eq!(c.plugin_types(), vec!["bridge"]);
        assert!(NetworkConfig::parse(Path::new("x"), r#"{"name":"n","plugins":[{}]}"#).is_err());
        assert!(NetworkConfig::parse(Path::new("x"), "{").is_err());
    }

    #[test]
    fn plugin_input_derivation() {
        let c = NetworkConfig::parse(Path::new("a.conflist"), LIST).expect("list");
        let bridge = plugin_input(&c, &c.plugins[0], &req(), None);
        assert_eq!(bridge["name"], "testnet");
        assert_eq!(bridge["cniVersion"], "1.0.0");
        assert!(
            bridge.get("runtimeConfig").is_none(),
            "bridge has no portMappings capability"
        );
        assert!(bridge.get("prevResult").is_none());
        let prev = json!({"ips": [{"address": "10.0.0.2/24"}]});
        let pm = plugin_input(&c, &c.plugins[1], &req(), Some(&prev));
        assert_eq!(pm["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        assert_eq!(pm["runtimeConfig"]["portMappings"][0]["containerPort"], 80);
        assert_eq!(pm["prevResult"], prev);
    }

    #[test]
    fn result_ips() {
        let r = CniResult::from_value(&json!({"ips": [{"address": "10.0.0.2/24"},
            {"address": "fd00::2/64"}]}));
        assert_eq!(r.ips, vec!["10.0.0.2", "fd00::2"]);
    }

    #[test]
    fn load_dir_picks_lexically_first_and_reports_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bins = tempfile::tempdir().expect("tempdir");
        let e = load_dir(dir.path(), bins.path()).expect_err("empty");
        assert!(
            matches!(e, CniError::NotReady(ref m) if m.contains("no network config")),
            "{e}"
        );
        std::fs::write(dir.path().join("20-b.conflist"), LIST).expect("write");
        std::fs::write(
            dir.path().join("10-a.conf"),
            r#"{"cniVersion":"0.4.0","name":"first","type":"bridge"}"#,
        )
        .expect("write");
        std::fs::write(dir.path().join("README"), "not a config").expect("write");
        let e = load_dir(dir.path(), bins.path()).expect_err("no binaries");
        assert!(e.to_string().contains("`bridge`"), "{e}");
        std::fs::write(bins.path().join("bridge"), "").expect("write");
        assert_eq!(load_dir(dir.path(), bins.path()).expect("ok").name, "first");
    }

    #[test]
    fn manager_picks_up_a_config_written_later() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bins = tempfile::tempdir().expect("tempdir");
        let cache = tempfile::tempdir().expect("tempdir");
        let m = CniManager::new(
            dir.path().to_path_buf(),
            bins.path().to_path_buf(),
            cache.path().to_path_buf(),
        );
        assert!(m.current().is_err());
        std::fs::write(bins.path().join("bridge"), "").expect("write");
        std::fs::write(bins.path().join("portmap"), "").expect("write");
        std::fs::write(dir.path().join("10.conflist"), LIST).expect("write");
        m.reload();
        assert_eq!(m.current().expect("ready").name, "testnet");
    }

    /// A stand-in plugin (shell script) that records its environment and stdin and returns a
    /// result: the chain, env and prevResult passing are checked without root.
    #[test]
    fn add_and_del_run_the_chain_with_fake_plugins() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let bins = tempfile::tempdir().expect("tempdir");
        let cache = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("calls.log");
        for name in ["bridge", "portmap"] {
            let script = format!(
                "#!/bin/sh\nin=$(cat)\necho \"{name} $CNI_COMMAND $CNI_CONTAINERID $CNI_IFNAME $CNI_NETNS prev=$(echo \"$in\" | grep -c prevResult)\" >> {log}\n\
                 if [ \"$CNI_COMMAND\" = ADD ]; then echo '{{\"cniVersion\":\"1.0.0\",\"ips\":[{{\"address\":\"10.9.0.5/24\"}}]}}'; fi\n",
                log = log.display()
            );
            let p = bins.path().join(name);
            std::fs::write(&p, script).expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        std::fs::write(dir.path().join("10.conflist"), LIST).expect("write");
        let m = CniManager::new(
            dir.path().to_path_buf(),
            bins.path().to_path_buf(),
            cache.path().to_path_buf(),
        );
        let mut r = req();
        r.netns = dir.path().display().to_string(); // exists, so DEL keeps it
        let res = m.add(&r).expect("add");
        assert_eq!(res.ips, vec!["10.9.0.5"]);
        assert!(m.has_cache("p1"));
        // DEL works from the cache even after the directory's config is gone.
        std::fs::remove_file(dir.path().join("10.conflist")).expect("rm");
        m.reload();
        m.del(&r).expect("del");
        assert!(!m.has_cache("p1"));
        m.del(&r).expect("del again is a no-op");
        let calls = std::fs::read_to_string(&log).expect("log");
        let lines: Vec<&str> = calls.lines().collect();
        let nsp = dir.path().display().to_string();
        assert_eq!(
            lines,
            vec![
                format!("bridge ADD p1 eth0 {nsp} prev=0"),
                format!("portmap ADD p1 eth0 {nsp} prev=1"),
                format!("portmap DEL p1 eth0 {nsp} prev=1"),
                format!("bridge DEL p1 eth0 {nsp} prev=1"),
            ]
        );
    }
}
