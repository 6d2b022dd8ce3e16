//! The files a pod's containers see at /etc/resolv.conf, /etc/hosts and /etc/hostname, written
//! once per pod under `<state>/pods/<id>/` and bind-mounted into each container (see
//! `spec::SpecContext::sandbox_mounts`), as containerd does.

use std::io;
use std::path::{Path, PathBuf};

use crisp_proto::cri::v1::DnsConfig;

use crate::error::{ErrorKind, HasKind};

/// Why the pod's files could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A host file the pod's file is copied from could not be read (the node is misconfigured:
    /// containerd fails RunPodSandbox here too).
    #[error("reading the host's {path}: {source}")]
    HostFile { path: PathBuf, source: io::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

impl HasKind for FilesError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::HostFile { .. } => ErrorKind::FailedPrecondition,
            Self::Write { .. } => ErrorKind::Internal,
        }
    }
}

/// Whether the pod's resolv.conf is the host's (no DNSConfig, or an empty one).
fn uses_host_resolv(dns: Option<&DnsConfig>) -> bool {
    dns.is_none_or(|d| d.servers.is_empty() && d.searches.is_empty() && d.options.is_empty())
}

/// Used when the host has no /etc/hosts.
pub const DEFAULT_HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// resolv.conf from the pod's DNSConfig; without one (or an empty one) the host's file is used
/// unchanged, which is what kubelet's `Default` DNS policy expects.
pub fn resolv_conf(dns: Option<&DnsConfig>, host_resolv: &str) -> String {
    let Some(d) = dns.filter(|_| !uses_host_resolv(dns)) else {
        return host_resolv.to_string();
    };
    let mut out = String::new();
    if !d.searches.is_empty() {
        out.push_str(&format!("search {}\n", d.searches.join(" ")));
    }
    for s in &d.servers {
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !d.options.is_empty() {
        out.push_str(&format!("options {}\n", d.options.join(" ")));
    }
    out
}

/// Where the pod's files live.
pub fn pod_dir(state: &Path, pod_id: &str) -> PathBuf {
    state.join("pods").join(pod_id)
}

/// The host's file `name` under `host_etc`; `missing` (if given) stands in for a file that
/// does not exist. Any other failure is an error naming the file: never an empty file.
fn host_file(host_etc: &Path, name: &str, missing: Option<&str>) -> Result<String, FilesError> {
    let path = host_etc.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == io::ErrorKind::NotFound && missing.is_some() => {
            Ok(missing.unwrap_or_default().to_string())
        }
        Err(source) => Err(FilesError::HostFile { path, source }),
    }
}

/// Write resolv.conf, hosts and hostname for a pod; returns (container path, host path) pairs
/// for the spec builder. The host's resolv.conf, when the pod uses it, must be readable.
pub fn write(
    dir: &Path,
    hostname: &str,
    dns: Option<&DnsConfig>,
    host_etc: &Path,
) -> Result<Vec<(String, String)>, FilesError> {
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FilesError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(werr(dir))?;
    let host_resolv = if uses_host_resolv(dns) {
        host_file(host_etc, "resolv.conf", None)?
    } else {
        String::new()
    };
    let host_hosts = host_file(host_etc, "hosts", Some(DEFAULT_HOSTS))?;
    let files = [
        (
            "/etc/resolv.conf",
            "resolv.conf",
            resolv_conf(dns, &host_resolv),
        ),
        ("/etc/hosts", "hosts", host_hosts),
        ("/etc/hostname", "hostname", format!("{hostname}\n")),
    ];
    let mut out = Vec::new();
    for (dest, name, content) in files {
        let p = dir.join(name);
        crate::util::write_volatile(&p, content.as_bytes()).map_err(werr(&p))?;
        // Readable by the container's users, whoever they map to.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).map_err(werr(&p))?;
        out.push((dest.to_string(), p.display().to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_config_becomes_resolv_conf() {
        let d = DnsConfig {
            servers: vec!["10.96.0.10".into(), "8.8.8.8".into()],
            searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            options: vec!["ndots:5".into(), "timeout:1".into()],
        };
        assert_eq!(
            resolv_conf(Some(&d), "nameserver 1.1.1.1\n"),
            "search default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver 8.8.8.8\noptions ndots:5 timeout:1\n"
        );
    }

    #[test]
    fn no_dns_config_copies_the_host() {
        assert_eq!(
            resolv_conf(None, "nameserver 1.1.1.1\n"),
            "nameserver 1.1.1.1\n"
        );
        assert_eq!(resolv_conf(Some(&DnsConfig::default()), "x\n"), "x\n");
    }

    #[test]
    fn writes_the_three_files() {
        let d = tempfile::tempdir().expect("tempdir");
        let etc = d.path().join("etc");
        std::fs::create_dir_all(&etc).expect("mkdir");
        std::fs::write(etc.join("resolv.conf"), "nameserver 9.9.9.9\n").expect("write");
        let dir = pod_dir(&d.path().join("state"), "p1");
        let dns = DnsConfig {
            options: vec!["ndots:2".into()],
            ..Default::default()
        };
        let m = write(&dir, "web-0", Some(&dns), &etc).expect("write");
        let get = |dest: &str| {
            let src = &m.iter().find(|(d, _)| d == dest).expect("mount").1;
            std::fs::read_to_string(src).expect("read")
        };
        assert_eq!(get("/etc/resolv.conf"), "options ndots:2\n");
        assert_eq!(get("/etc/hosts"), DEFAULT_HOSTS, "no host file: defaults");
        assert_eq!(get("/etc/hostname"), "web-0\n");
        let m = write(&dir, "web-0", None, &etc).expect("rewrite");
        assert_eq!(m.len(), 3);
        assert_eq!(get("/etc/resolv.conf"), "nameserver 9.9.9.9\n");
    }

    /// The pod uses the host's resolv.conf and it cannot be read: an error naming the file,
    /// FailedPrecondition (containerd fails RunPodSandbox too), never an empty resolv.conf.
    #[test]
    fn unreadable_host_resolv_conf_is_an_error_naming_it() {
        let d = tempfile::tempdir().expect("tempdir");
        let etc = d.path().join("etc");
        std::fs::create_dir_all(etc.join("resolv.conf")).expect("a directory where the file is");
        let dir = pod_dir(&d.path().join("state"), "p1");
        let e = write(&dir, "web-0", None, &etc).expect_err("unreadable resolv.conf");
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "reading the host's {}",
                etc.join("resolv.conf").display()
            )),
            "{msg}"
        );
        std::fs::remove_dir(etc.join("resolv.conf")).expect("rmdir");
        let e = write(&dir, "web-0", None, &etc).expect_err("missing resolv.conf");
        assert!(e.to_string().contains("resolv.conf"), "{e}");
        // A pod with its own DNS config does not need the host's file.
        let dns = DnsConfig {
            servers: vec!["10.0.0.10".into()],
            ..Default::default()
        };
        write(&dir, "web-0", Some(&dns), &etc).expect("own DNS config");
    }
}
