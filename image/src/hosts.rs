//! Registry host configuration in containerd's `certs.d` format, so that a node's existing
//! `/etc/containerd/certs.d` works unchanged:
//!
//! ```text
//! <dir>/<registry>/hosts.toml     (or <dir>/_default/hosts.toml)
//! server = "https://registry-1.docker.io"
//! [host."http://127.0.0.1:5000"]
//!   capabilities = ["pull", "resolve"]
//!   skip_verify = true
//!   ca = "/etc/certs/ca.pem"          # or a list
//!   header = { X-Token = "abc" }      # values may be lists
//!   override_path = false
//! ```
//!
//! The result is the ordered list of endpoints to try: mirrors in file order, then the origin
//! (`server`, or the registry itself). Pure apart from reading the files; no network.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What an endpoint may be used for (containerd's host capabilities).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetch blobs and manifests by digest.
    pub pull: bool,
    /// Resolve a tag to a digest.
    pub resolve: bool,
    pub push: bool,
}

impl Capabilities {
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
}

/// One endpoint to try for a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryHost {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]`.
    pub host: String,
    /// API root, normally `/v2`.
    pub path: String,
    pub capabilities: Capabilities,
    pub skip_verify: bool,
    /// PEM files with extra trusted CAs.
    pub ca: Vec<PathBuf>,
    pub headers: Vec<(String, String)>,
    /// The registry itself (`server`), as opposed to a mirror.
    pub is_origin: bool,
}

impl RegistryHost {
    /// `scheme://host/path` + `suffix` (which starts with '/').
    pub fn url(&self, suffix: &str) -> String {
        format!("{}://{}{}{}", self.scheme, self.host, self.path, suffix)
    }

    /// Human-readable name used in logs and errors.
    pub fn display(&self) -> String {
        format!("{}://{}", self.scheme, self.host)
    }
}

/// Whether a registry host is on this machine, where containerd (and we) default to plain HTTP.
pub fn is_localhost(host: &str) -> bool {
    let h = strip_port(host);
    h == "localhost" || h == "::1" || h == "[::1]" || h.starts_with("127.")
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The endpoints to use for `registry` (e.g. `docker.io`, `localhost:5000`), reading
/// `<config_dir>/<registry>/hosts.toml` or `<config_dir>/_default/hosts.toml` if present.
pub fn resolve(config_dir: Option<&Path>, registry: &str) -> Result<Vec<RegistryHost>> {
    let origin_default = default_origin(registry);
    let Some(dir) = config_dir else {
        return Ok(vec![origin_default]);
    };
    for name in [
        registry.to_string(),
        registry.replace(':', "_") + "_",
        "_default".to_string(),
    ] {
        let d = dir.join(&name);
        if !d.is_dir() {
            continue;
        }
        let file = d.join("hosts.toml");
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let hosts = parse_hosts_toml(&text, &d, registry)
                    .map_err(|e| e.context(format!("{}", file.display())))?;
                return Ok(hosts);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Legacy docker certs.d layout: the directory holds only *.crt CA files.
                let mut origin = origin_default;
                origin.ca = crt_files(&d);
                return Ok(vec![origin]);
            }
            Err(e) => return Err(Error::io(format!("reading {}", file.display()), e)),
        }
    }
    Ok(vec![origin_default])
}

fn crt_files(d: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(d)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "crt"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn default_origin(registry: &str) -> RegistryHost {
    let (scheme, host) = if registry == "docker.io" {
        ("https", "registry-1.docker.io".to_string())
    } else if is_localhost(registry) {
        ("http", registry.to_string())
    } else {
        ("https", registry.to_string())
    };
    RegistryHost {
        scheme: scheme.to_string(),
        host,
        path: "/v2".to_string(),
        capabilities: Capabilities::ALL,
        skip_verify: false,
        ca: Vec::new(),
        headers: Vec::new(),
        is_origin: true,
    }
}

/// Parse one hosts.toml. `base` is its directory (relative `ca` paths are relative to it).
pub fn parse_hosts_toml(text: &str, base: &Path, registry: &str) -> Result<Vec<RegistryHost>> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| Error::invalid(format!("invalid TOML: {}", e.message())))?;
    let mut hosts = Vec::new();
    if let Some(h) = table.get("host") {
        let Some(h) = h.as_table() else {
            return Err(Error::invalid(
                "`host` must be a table of [host.\"<url>\"] sections",
            ));
        };
        // preserve_order keeps the file order: mirrors are tried in the order written.
        for (url, cfg) in h {
            let Some(cfg) = cfg.as_table() else {
                return Err(Error::invalid(format!("host {url:?}: must be a table")));
            };
            hosts.push(
                parse_host(url, cfg, base, false)
                    .map_err(|e| e.context(format!("host {url:?}")))?,
            );
        }
    }
    let origin = match table.get("server") {
        Some(v) => {
            let Some(server) = v.as_str() else {
                return Err(Error::invalid("`server` must be a string URL"));
            };
            parse_host(server, &table, base, true)
                .map_err(|e| e.context(format!("server {server:?}")))?
        }
        None => {
            let mut o = default_origin(registry);
            // Top-level settings without `server` still apply to the default origin.
            let parsed = parse_host(&o.display(), &table, base, true)?;
            o.capabilities = parsed.capabilities;
            o.skip_verify = parsed.skip_verify;
            o.ca = parsed.ca;
            o.headers = parsed.headers;
            o
        }
    };
    hosts.push(origin);
    Ok(hosts)
}

fn parse_host(url: &str, cfg: &toml::Table, base: &Path, is_origin: bool) -> Result<RegistryHost> {
    let url = url.trim();
    let (scheme, rest) = match url.split_once("://") {
        Some((s @ ("http" | "https"), r)) => (s.to_string(), r),
        Some((s, _)) => return Err(Error::invalid(format!("scheme {s:?} is not http or https"))),
        None => ("https".to_string(), url),
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if host.is_empty() {
        return Err(Error::invalid("URL has no host"));
    }
    let override_path = match cfg.get("override_path") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| Error::invalid("override_path must be true or false"))?,
    };
    let path = clean_path(path);
    let path = if path.is_empty() {
        if override_path {
            String::new()
        } else {
            "/v2".to_string()
        }
    } else if !override_path && !path.ends_with("/v2") {
        format!("{path}/v2")
    } else {
        path
    };
    let capabilities = match cfg.get("capabilities") {
        None => Capabilities::ALL,
        Some(v) => {
            let arr = v
                .as_array()
                .ok_or_else(|| Error::invalid("capabilities must be a list of strings"))?;
            let mut c = Capabilities {
                pull: false,
                resolve: false,
                push: false,
            };
            for item in arr {
                match item.as_str() {
                    Some("pull") => c.pull = true,
                    Some("resolve") => c.resolve = true,
                    Some("push") => c.push = true,
                    other => {
                        return Err(Error::invalid(format!(
                            "capability {other:?}: expected \"pull\", \"resolve\" or \"push\""
                        )));
                    }
                }
            }
            c
        }
    };
    let skip_verify = match cfg.get("skip_verify") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| Error::invalid("skip_verify must be true or false"))?,
    };
    let ca = match cfg.get("ca") {
        None => Vec::new(),
        Some(toml::Value::String(s)) => vec![base.join(s)],
        Some(toml::Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(|s| base.join(s))
                    .ok_or_else(|| Error::invalid("ca must be a path or a list of paths"))
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(Error::invalid("ca must be a path or a list of paths")),
    };
    let mut headers = Vec::new();
    if let Some(h) = cfg.get("header") {
        let t = h
            .as_table()
            .ok_or_else(|| Error::invalid("header must be a table of name = value"))?;
        for (k, v) in t {
            match v {
                toml::Value::String(s) => headers.push((k.clone(), s.clone())),
                toml::Value::Array(a) => {
                    for x in a {
                        let s = x.as_str().ok_or_else(|| {
                            Error::invalid(format!("header {k:?}: values must be strings"))
                        })?;
                        headers.push((k.clone(), s.to_string()));
                    }
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "header {k:?}: value must be a string or list of strings"
                    )));
                }
            }
        }
    }
    Ok(RegistryHost {
        scheme,
        host: host.to_string(),
        path,
        capabilities,
        skip_verify,
        ca,
        headers,
        is_origin,
    })
}

fn clean_path(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("/{}", parts.join("/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, reg: &str, text: &str) {
        std::fs::create_dir_all(dir.join(reg)).unwrap();
        std::fs::write(dir.join(reg).join("hosts.toml"), text).unwrap();
    }

    #[test]
    fn no_config_means_origin_only() {
        let h = resolve(None, "docker.io").unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(
            h[0].url("/library/busybox/manifests/latest"),
            "https://registry-1.docker.io/v2/library/busybox/manifests/latest"
        );
        let h = resolve(None, "localhost:5000").unwrap();
        assert_eq!(h[0].scheme, "http");
        let h = resolve(None, "quay.io").unwrap();
        assert_eq!(h[0].display(), "https://quay.io");
    }

    #[test]
    fn mirrors_in_order_then_origin() {
        let tmp = tempfile::tempdir().unwrap();
        write(
            tmp.path(),
            "docker.io",
            r#"
server = "https://registry-1.docker.io"
[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve"]
[host."https://mirror.example.com/base"]
  capabilities = ["pull"]
  skip_verify = true
  ca = ["ca1.pem", "/abs/ca2.pem"]
  header = { X-A = "1", X-B = ["2", "3"] }
[host."https://other.example.com/custom"]
  override_path = true
"#,
        );
        let h = resolve(Some(tmp.path()), "docker.io").unwrap();
        assert_eq!(h.len(), 4);
        assert_eq!(h[0].display(), "http://127.0.0.1:5000");
        assert_eq!(h[0].path, "/v2");
        assert!(h[0].capabilities.resolve && !h[0].capabilities.push);
        assert_eq!(h[1].url("/x"), "https://mirror.example.com/base/v2/x");
        assert!(!h[1].capabilities.resolve);
        assert!(h[1].skip_verify);
        assert_eq!(
            h[1].ca,
            vec![
                tmp.path().join("docker.io/ca1.pem"),
                PathBuf::from("/abs/ca2.pem")
            ]
        );
        assert_eq!(
            h[1].headers,
            vec![
                ("X-A".into(), "1".into()),
                ("X-B".into(), "2".into()),
                ("X-B".into(), "3".into())
            ]
        );
        assert_eq!(h[2].url("/x"), "https://other.example.com/custom/x");
        assert!(h[3].is_origin && !h[2].is_origin);
        assert_eq!(h[3].display(), "https://registry-1.docker.io");
    }

    #[test]
    fn default_dir_and_port_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "_default", "[host.\"http://127.0.0.1:9\"]\n");
        write(
            tmp.path(),
            "localhost:5000",
            "server = \"http://localhost:5000\"\nskip_verify = true\n",
        );
        let h = resolve(Some(tmp.path()), "quay.io").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].display(), "http://127.0.0.1:9");
        assert_eq!(h[1].display(), "https://quay.io");
        let h = resolve(Some(tmp.path()), "localhost:5000").unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].display(), "http://localhost:5000");
        assert!(h[0].skip_verify);
    }

    #[test]
    fn top_level_settings_apply_to_default_origin() {
        let tmp = tempfile::tempdir().unwrap();
        write(
            tmp.path(),
            "reg.example",
            "ca = \"ca.pem\"\n[header]\nAuthorization = \"x\"\n",
        );
        let h = resolve(Some(tmp.path()), "reg.example").unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].display(), "https://reg.example");
        assert_eq!(h[0].ca, vec![tmp.path().join("reg.example/ca.pem")]);
        assert_eq!(h[0].headers.len(), 1);
    }

    #[test]
    fn bad_files_name_the_field() {
        let tmp = tempfile::tempdir().unwrap();
        for (text, needle) in [
            ("server = 5", "server"),
            ("[host.\"ftp://x\"]\n", "ftp"),
            ("[host.\"https://x\"]\ncapabilities = [\"fly\"]\n", "fly"),
            (
                "[host.\"https://x\"]\nskip_verify = \"yes\"\n",
                "skip_verify",
            ),
            ("this is not toml", "TOML"),
        ] {
            write(tmp.path(), "r.example", text);
            let e = resolve(Some(tmp.path()), "r.example").unwrap_err();
            assert!(e.to_string().contains(needle), "{text}: {e}");
            assert!(e.to_string().contains("hosts.toml"), "{e}");
        }
    }
}
