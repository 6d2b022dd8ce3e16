//! A private image registry per test: Debian's `docker-registry` (distribution 2.8) on a free
//! 127.0.0.1 port, plain HTTP, storage in its own temporary directory, deletes enabled.
//!
//! Getting images into it is cheap: `hack/images/build.sh` pushed every test image once into
//! a seed storage (see [`crate::images`]); [`Registry::push`] copies that storage's small link
//! files for the asked repositories and hard-links their blobs, so a test has busybox and
//! pause in a few milliseconds and even `large` (208 MiB) costs nothing. The registry never
//! rewrites a blob file in place (uploads are renamed into place, deletes unlink), so the
//! shared inodes stay intact. [`Registry::push_layout`] pushes any other OCI layout with
//! skopeo, for images a test builds itself.
//!
//! Everything here is synchronous and quick (start-up is ~100 ms); from async code call it
//! directly, or through `spawn_blocking` around `push_layout`, which runs skopeo.
//!
//! The registry is stopped by its pid on drop (SIGTERM, then SIGKILL after 5 s), reaped, and
//! its directory removed, even when the test panicked.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::images::{self, TestImage};

/// How long the registry may take to answer `/v2/` after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Storage driver's path below the root directory.
const STORAGE: &str = "docker/registry/v2";

/// A running docker-registry owned by one test.
#[derive(Debug)]
pub struct Registry {
    child: Option<Child>,
    pid: u32,
    port: u16,
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    log: PathBuf,
}

/// An HTTP response from the registry.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).context("registry response is not JSON")
    }
}

impl Registry {
    /// Starts an empty registry on a free 127.0.0.1 port and waits until `/v2/` answers.
    pub fn start() -> Result<Registry> {
        let binary = which("docker-registry").context(
            "docker-registry not found: install the Debian package docker-registry (hack/install-deps.sh)",
        )?;
        let dir = tempfile::Builder::new()
            .prefix("crisp-registry-")
            .tempdir()
            .context("creating the registry's temporary directory")?;
        let root = dir.path().join("storage");
        fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
        let log = dir.path().join("registry.log");

        // The port is free when we look but another process may take it before the registry
        // binds it; then the registry exits at once and we try another.
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            let config = dir.path().join("config.yml");
            fs::write(&config, config_yaml(&root, port))
                .with_context(|| format!("writing {}", config.display()))?;
            let out = File::options()
                .create(true)
                .append(true)
                .open(&log)
                .with_context(|| format!("opening {}", log.display()))?;
            let err = out.try_clone().context("duplicating the registry log")?;
            let child = Command::new(&binary)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?;
            let pid = child.id();
            let mut registry = Registry {
                child: Some(child),
                pid,
                port,
                dir: None,
                root: root.clone(),
                log: log.clone(),
            };
            match registry.wait_ready() {
                Ok(()) => {
                    registry.dir = Some(dir);
                    return Ok(registry);
                }
                Err(e) => {
                    // Dropping `registry` stops the child; the directory stays for the retry.
                    last_err = Some(e);
                }
            }
        }
        let tail = log_tail(&log, 20);
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
            .with_context(|| format!("docker-registry did not start; its log ends:\n{tail}"))
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("waiting for docker-registry")?
            {
                self.child = None;
                bail!("docker-registry exited at start-up ({status})");
            }
            match self.get("/v2/", None) {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => bail!("docker-registry answered /v2/ with HTTP {}", r.status),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(25))
                }
                Err(e) => {
                    return Err(e).context(format!(
                        "docker-registry not answering after {START_TIMEOUT:?}"
                    ));
                }
            }
        }
    }

    /// "127.0.0.1:PORT", for image names and mirror configs.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its temporary directory (storage, config, log); removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap_or(&self.root)
    }

    /// Its stdout and stderr: one access-log line per request (see [`Registry::requests`]).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The requests it answered so far, oldest first, as "METHOD PATH STATUS"
    /// (e.g. "GET /v2/library/busybox/manifests/latest 200"), from its access log.
    pub fn requests(&self) -> Result<Vec<String>> {
        let text = fs::read_to_string(&self.log)
            .with_context(|| format!("reading {}", self.log.display()))?;
        Ok(text.lines().filter_map(parse_access_line).collect())
    }

    /// `image`'s name on this registry, first tag: "127.0.0.1:PORT/library/busybox:latest".
    pub fn reference(&self, image: &str) -> Result<String> {
        Ok(images::get(image)?.reference(&self.host()))
    }

    /// Makes the named test images (see [`images::ALL`]) available under all their tags.
    /// Idempotent. Fails if the images are not built (the error says how to build them).
    pub fn push(&self, names: &[&str]) -> Result<()> {
        let seed = images::registry_seed()?;
        for name in names {
            let image = images::get(name)?;
            self.push_from_seed(&seed, image)
                .with_context(|| format!("making test image {name} available"))?;
        }
        Ok(())
    }

    /// Makes every test image available.
    pub fn push_test_images(&self) -> Result<()> {
        let names: Vec<&str> = images::ALL.iter().map(|i| i.name).collect();
        self.push(&names)
    }

    fn push_from_seed(&self, seed: &Path, image: &TestImage) -> Result<()> {
        let src_repo = seed
            .join(STORAGE)
            .join("repositories")
            .join(image.repository);
        if !src_repo.is_dir() {
            bail!(
                "{} has no repository {}: run `make test-images` (hack/images/build.sh)",
                seed.display(),
                image.repository
            );
        }
        // Blobs first, links second: the registry never sees a tag whose blobs are missing.
        for digest in repo_digests(&src_repo)? {
            let rel = Path::new(STORAGE)
                .join("blobs/sha256")
                .join(&digest[..2])
                .join(&digest)
                .join("data");
            let (src, dst) = (seed.join(&rel), self.root.join(&rel));
            if dst.exists() {
                continue;
            }
            let parent = dst.parent().context("blob path has no parent")?;
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            match fs::hard_link(&src, &dst) {
                Ok(()) => {}
                // Another filesystem (TMPDIR elsewhere): copy instead.
                Err(e) if e.kind() == ErrorKind::CrossesDevices => {
                    fs::copy(&src, &dst).with_context(|| {
                        format!("copying {} to {}", src.display(), dst.display())
                    })?;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("linking {} to {}", src.display(), dst.display())
                    });
                }
            }
        }
        // Link files are copied, never shared: the registry rewrites them in place (a tag
        // moved by a later push), which must not reach the seed.
        copy_tree(
            &src_repo,
            &self
                .root
                .join(STORAGE)
                .join("repositories")
                .join(image.repository),
        )
    }

    /// Pushes the OCI layout `layout` (its ref `tag`) as `repository:tag2` ("library/foo:1")
    /// with skopeo. For images a test builds itself; test images use [`Registry::push`].
    pub fn push_layout(&self, layout: &Path, tag: &str, target: &str) -> Result<()> {
        let out = Command::new("skopeo")
            .args(["copy", "-q", "--all", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{target}", self.host()))
            .stdin(Stdio::null())
            .output()
            .context("running skopeo (Debian package skopeo)")?;
        if !out.status.success() {
            bail!(
                "skopeo copy oci:{}:{tag} to {}/{target} failed ({}): {}",
                layout.display(),
                self.host(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// A plain HTTP GET of `path` ("/v2/…"), with an Accept header if given.
    pub fn get(&self, path: &str, accept: Option<&str>) -> Result<Response> {
        self.request("GET", path, accept)
    }

    /// A plain HTTP request (GET, HEAD, DELETE) of `path`.
    pub fn request(&self, method: &str, path: &str, accept: Option<&str>) -> Result<Response> {
        http_request(&self.host(), method, path, accept)
    }

    /// Stops the registry and removes its directory, reporting what went wrong (drop does
    /// the same but can only print).
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let mut problems = Vec::new();
        if let Some(mut child) = self.child.take() {
            // The pid is ours until we reap it, so signalling it cannot hit another process.
            let pid = Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX));
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            let mut exited = false;
            while Instant::now() < deadline {
                match child.try_wait() {
                    Ok(Some(_)) => {
                        exited = true;
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    Err(e) => {
                        problems.push(format!(
                            "waiting for docker-registry (pid {}): {e}",
                            self.pid
                        ));
                        break;
                    }
                }
            }
            if !exited {
                let _ = child.kill();
                if let Err(e) = child.wait() {
                    problems.push(format!("reaping docker-registry (pid {}): {e}", self.pid));
                }
            }
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                problems.push(format!("removing {}: {e}", path.display()));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!(problems.join("; "))
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("registry cleanup: {e:#}");
        }
    }
}

fn config_yaml(root: &Path, port: u16) -> String {
    // Access logs (one line per request on stdout) stay on: tests count requests with them.
    // Level warn keeps the rest of the log quiet; a fixed http secret (it only signs upload
    // state, and the registry is loopback-only) avoids a warning in every log.
    format!(
        "version: 0.1\n\
         log:\n  level: warn\n  formatter: text\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
         maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: 127.0.0.1:{port}\n  secret: crisp-e2e-not-secret\n",
        root.display()
    )
}

/// A port nobody listens on right now.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(l.local_addr().context("reading the bound port")?.port())
}

/// Every blob digest (hex) a repository in registry storage refers to: its layers and
/// configs (`_layers`) and its manifests and indexes (`_manifests/revisions`).
fn repo_digests(repo: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for sub in ["_layers/sha256", "_manifests/revisions/sha256"] {
        let dir = repo.join(sub);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let name = entry
                .file_name()
                .into_string()
                .map_err(|n| anyhow::anyhow!("bad digest dir {n:?}"))?;
            if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("unexpected entry {} in {}", name, dir.display());
            }
            out.push(name);
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Copies the directory tree `src` to `dst` (directories and regular files; the registry's
/// repository tree has nothing else).
fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    for entry in fs::read_dir(src).with_context(|| format!("listing {}", src.display()))? {
        let entry = entry.with_context(|| format!("listing {}", src.display()))?;
        let (s, d) = (entry.path(), dst.join(entry.file_name()));
        let ty = entry
            .file_type()
            .with_context(|| format!("stat {}", s.display()))?;
        if ty.is_dir() {
            copy_tree(&s, &d)?;
        } else if ty.is_file() {
            if !d.exists() {
                fs::copy(&s, &d)
                    .with_context(|| format!("copying {} to {}", s.display(), d.display()))?;
            }
        } else {
            bail!("{} is neither a file nor a directory", s.display());
        }
    }
    Ok(())
}

/// "METHOD PATH STATUS" from a combined-log-format line:
/// `127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"`.
fn parse_access_line(line: &str) -> Option<String> {
    let (_, rest) = line.split_once("] \"")?;
    let (request, rest) = rest.split_once('"')?;
    let mut req = request.split(' ');
    let (method, path) = (req.next()?, req.next()?);
    let status = rest.split_whitespace().next()?;
    if !method.chars().all(|c| c.is_ascii_uppercase()) || status.parse::<u16>().is_err() {
        return None;
    }
    Some(format!("{method} {path} {status}"))
}

fn log_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn which(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} is not in PATH"))
}

/// HTTP/1.0 over a fresh connection: enough for a registry on loopback, and no client crate.
fn http_request(host: &str, method: &str, path: &str, accept: Option<&str>) -> Result<Response> {
    let mut s = TcpStream::connect(host).with_context(|| format!("connecting to {host}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .context("setting a read timeout")?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: crisp-e2e\r\n");
    if let Some(a) = accept {
        req.push_str(&format!("Accept: {a}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .with_context(|| format!("sending {method} {path} to {host}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading the answer to {method} {path} from {host}"))?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("{method} {path}: no end of headers in the answer"))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("{method} {path}: bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_access_log_lines() {
        let l = r#"127.0.0.1 - - [23/Nov/2026:12:33:00 +0000] "GET /v2/library/busybox/manifests/latest HTTP/1.1" 200 527 "" "containerd/1.6""#;
        assert_eq!(
            parse_access_line(l).as_deref(),
            Some("GET /v2/library/busybox/manifests/latest 200")
        );
        assert_eq!(
            parse_access_line("time=\"x\" level=warning msg=\"hi\""),
            None
        );
    }
}
