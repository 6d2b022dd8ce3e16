//! A private containerd 1.6 instance: its config (a TOML table that later issues extend with
//! fragments such as a proxy snapshotter or another runtime) and the registry hosts
//! directory that makes upstream image names resolve to the local test registry.
//!
//! Every path containerd would otherwise take from the host (/var/lib/containerd,
//! /run/containerd, /etc/cni/net.d, /var/run/netns, /run/containerd/runc) is pointed into
//! the test's own root. What 1.6 cannot move is the shim socket directory
//! /run/containerd/s (see [`crate::harness`], which removes our sockets there by address).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The sandbox (pause) image containerd 1.6 uses by default; the test registry serves it.
pub const SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.6";

/// Upstream registries whose names the tests use; each gets a hosts.toml pointing at the
/// local registry.
pub const MIRRORED_REGISTRIES: &[(&str, &str)] = &[
    ("docker.io", "https://registry-1.docker.io"),
    ("registry.k8s.io", "https://registry.k8s.io"),
    ("k8s.gcr.io", "https://k8s.gcr.io"),
    ("gcr.io", "https://gcr.io"),
    ("quay.io", "https://quay.io"),
];

/// Plugins that would read or write host state outside the test root, or that need
/// kernels/filesystems this host does not have.
pub const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.internal.v1.opt",
    "io.containerd.tracing.processor.v1.otlp",
];

/// Paths a private containerd uses. All but `cni_bin_dir` belong to the test.
#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub hosts_dir: PathBuf,
}

impl Paths {
    /// Where runc keeps container state (its `--root`); the shim's default is
    /// /run/containerd/runc/<namespace>, shared with the host's containerd.
    pub fn runc_root(&self) -> PathBuf {
        self.state.join("runc")
    }
}

/// containerd's config.toml as a table, so tests can merge fragments into it.
#[derive(Debug, Clone)]
pub struct Config {
    table: toml::Table,
}

/// A loopback TCP port nothing listens on now (the kernel's pick, released at once).
fn free_loopback_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr().context("local address")?.port())
}

impl Config {
    /// The base config for a private instance with the CRI plugin, runc, a private CNI
    /// config dir and the registry hosts dir.
    pub fn new(paths: &Paths) -> Result<Self> {
        let p = |p: &Path| toml::Value::String(p.to_string_lossy().into_owned());
        let s = |s: &str| toml::Value::String(s.to_owned());
        let ttrpc = format!("{}.ttrpc", paths.socket.display());
        let base = format!(
            r#"
version = 2
root = {root}
state = {state}
# Keep the daemon from moving itself (and so the shims) into another OOM score or cgroup.
oom_score = 0
disabled_plugins = {disabled}

[grpc]
address = {socket}

# 1.6 would default to "<grpc address>.ttrpc" too; written out so the path is on record.
[ttrpc]
address = {ttrpc}

[debug]
level = "debug"

[plugins."io.containerd.grpc.v1.cri"]
sandbox_image = {sandbox}
# This host lacks CAP_SYS_RESOURCE: raising a container's oom_score_adj above ours fails.
restrict_oom_score_adj = true
# Otherwise pod network namespaces are bind-mounted under the host's /var/run/netns.
netns_mounts_under_state_dir = true
enable_selinux = false
disable_apparmor = true
# A free port picked for this instance: containerd 1.6 puts the configured port, not the
# bound one, into the URLs it returns, so "0" would hand clients http://127.0.0.1:0/.
stream_server_address = "127.0.0.1"
stream_server_port = {stream_port}

[plugins."io.containerd.grpc.v1.cri".containerd]
snapshotter = "overlayfs"
default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
BinaryName = "runc"
SystemdCgroup = false
Root = {runc_root}

[plugins."io.containerd.grpc.v1.cri".cni]
bin_dir = {cni_bin}
conf_dir = {cni_conf}
max_conf_num = 1

[plugins."io.containerd.grpc.v1.cri".registry]
config_path = {hosts}
"#,
            root = p(&paths.root),
            state = p(&paths.state),
            disabled = toml::Value::Array(DISABLED_PLUGINS.iter().map(|d| s(d)).collect()),
            socket = p(&paths.socket),
            ttrpc = s(&ttrpc),
            sandbox = s(SANDBOX_IMAGE),
            runc_root = p(&paths.runc_root()),
            cni_bin = p(&paths.cni_bin_dir),
            cni_conf = p(&paths.cni_conf_dir),
            hosts = p(&paths.hosts_dir),
            stream_port = s(&free_loopback_port()?.to_string()),
        );
        let table = base
            .parse::<toml::Table>()
            .context("parsing the built-in containerd config")?;
        Ok(Self { table })
    }

    /// Merges a TOML fragment (e.g. `[proxy_plugins.crisp]` or another runtime under
    /// `plugins."io.containerd.grpc.v1.cri".containerd.runtimes`): tables merge key by key,
    /// anything else in the fragment replaces the base value.
    pub fn merge(&mut self, fragment: &str) -> Result<&mut Self> {
        let frag = fragment
            .parse::<toml::Table>()
            .with_context(|| format!("parsing containerd config fragment:\n{fragment}"))?;
        merge_tables(&mut self.table, frag);
        Ok(self)
    }

    pub fn table(&self) -> &toml::Table {
        &self.table
    }

    pub fn to_toml(&self) -> String {
        self.table.to_string()
    }
}

/// Deep merge: tables key by key, anything else replaced.
pub(crate) fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Writes a containerd-style registry hosts directory (`<dir>/<registry>/hosts.toml`) that
/// sends every mirrored registry to `mirror` ("127.0.0.1:PORT") over plain HTTP.
///
/// `server` is the mirror too, not the upstream: with the upstream as `server`, a miss in the
/// mirror would fall through to the internet, and tests must only talk to 127.0.0.0/8.
/// crispd reads the same format (`--registry-config-dir`).
pub fn write_hosts_dir(dir: &Path, mirror: &str) -> Result<()> {
    if mirror.contains('/') || !mirror.contains(':') {
        bail!("registry mirror must be HOST:PORT, got {mirror:?}");
    }
    for (name, upstream) in MIRRORED_REGISTRIES {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        let body = format!(
            "# {name} (upstream {upstream}) is served by the e2e test registry.\n\
             server = \"http://{mirror}\"\n\n\
             [host.\"http://{mirror}\"]\n\
             capabilities = [\"pull\", \"resolve\"]\n\
             skip_verify = true\n"
        );
        let f = d.join("hosts.toml");
        std::fs::write(&f, body).with_context(|| format!("writing {}", f.display()))?;
    }
    Ok(())
}

/// The CRI plugin's containerd namespace; shims and their sockets are keyed by it.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// Where containerd 1.6 puts a shim's socket: `/run/containerd/s/<sha256(address/ns/id)>`
/// (`runtime/v2/shim/util_unix.go`, `SocketAddress`), whatever `state` says. For the runc
/// shim the id is the sandbox id (one shim per pod). A shim that is killed leaves the socket
/// file there, and its bundle (with the `address` file naming it) is gone by teardown, so
/// the harness recomputes the path from the sandbox ids in the daemon's log.
pub fn shim_socket(grpc_address: &Path, namespace: &str, id: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let key = grpc_address.join(namespace).join(id);
    let digest = Sha256::digest(key.as_os_str().as_encoded_bytes());
    PathBuf::from("/run/containerd/s").join(hex::encode(digest))
}

/// Sandbox ids from containerd's log (`RunPodSandbox ... returns sandbox id "<id>"`).
pub fn sandbox_ids_in_log(log: &str) -> Vec<String> {
    const MARK: &str = "returns sandbox id ";
    let mut ids = Vec::new();
    for line in log.lines() {
        let Some(i) = line.find(MARK) else { continue };
        let id: String = line[i + MARK.len()..]
            .trim_start_matches(['\\', '"'])
            .chars()
            .take_while(|c| c.is_ascii_hexdigit())
            .collect();
        if id.len() == 64 && !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// The containerd binary: `$CONTAINERD_BIN`, else `containerd` on PATH.
pub fn binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CONTAINERD_BIN") {
        return Ok(PathBuf::from(p));
    }
    crate::harness::which("containerd").context(
        "containerd not found on PATH (Debian package `containerd`; or set CONTAINERD_BIN); \
         it is the reference runtime the e2e tests compare against",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Paths {
        Paths {
            root: "/r".into(),
            state: "/r/state".into(),
            socket: "/r/c.sock".into(),
            cni_conf_dir: "/r/net.d".into(),
            cni_bin_dir: "/usr/lib/cni".into(),
            hosts_dir: "/r/hosts".into(),
        }
    }

    #[test]
    fn fragments_merge_into_the_base() {
        let mut c = Config::new(&paths()).unwrap();
        c.merge(
            r#"
[proxy_plugins.crisp]
type = "snapshot"
address = "/r/snap.sock"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crisp]
runtime_type = "io.containerd.crisp.v2"
[plugins."io.containerd.grpc.v1.cri".containerd]
snapshotter = "crisp"
"#,
        )
        .unwrap();
        let t = c.to_toml().parse::<toml::Table>().unwrap();
        let ctd = &t["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
        assert_eq!(ctd["snapshotter"].as_str(), Some("crisp"));
        assert_eq!(ctd["default_runtime_name"].as_str(), Some("runc"));
        assert_eq!(
            ctd["runtimes"]["runc"]["options"]["Root"].as_str(),
            Some("/r/state/runc")
        );
        assert!(ctd["runtimes"]["crisp"].is_table());
        assert_eq!(
            t["proxy_plugins"]["crisp"]["type"].as_str(),
            Some("snapshot")
        );
        assert_eq!(t["version"].as_integer(), Some(2));
    }

    #[test]
    fn sandbox_ids_come_from_the_log() {
        let id = "a5a002853c4cbf1fc3c94708bdddaf70b1f7086fd44deae5d605ae5bfa50a713";
        let log = format!(
            "time=\"x\" level=info msg=\"RunPodSandbox for &PodSandboxMetadata{{Name:busy,}} \
             returns sandbox id \\\"{id}\\\"\"\nother line\n"
        );
        assert_eq!(sandbox_ids_in_log(&log), vec![id.to_string()]);
        let sock = shim_socket(Path::new("/r/cri.sock"), CRI_NAMESPACE, id);
        assert!(sock.starts_with("/run/containerd/s"));
        assert_eq!(sock.file_name().unwrap().len(), 64);
    }

    #[test]
    fn hosts_dir_points_every_registry_at_the_mirror() {
        let d = tempfile::tempdir().unwrap();
        write_hosts_dir(d.path(), "127.0.0.1:5000").unwrap();
        let t: toml::Table = std::fs::read_to_string(d.path().join("docker.io/hosts.toml"))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(t["server"].as_str(), Some("http://127.0.0.1:5000"));
        assert!(t["host"]["http://127.0.0.1:5000"]["capabilities"].is_array());
        assert!(write_hosts_dir(d.path(), "http://x/").is_err());
    }
}
