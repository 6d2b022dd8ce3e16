//! The OCI runtime CLI (runc or crun): both take the same commands and flags
//! for what the shim needs, so one small wrapper drives either.
//!
//! Every command goes through [`Reaper::run`], so the shim's global reaper never
//! steals its exit status.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::reaper::{Reaper, ReaperError};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("OCI runtime {binary:?} not found on PATH")]
    NotFound { binary: String },
    #[error("{binary} {command} failed (exit {status}): {message}")]
    Failed {
        binary: String,
        command: &'static str,
        status: i32,
        message: String,
    },
    #[error(transparent)]
    Reaper(#[from] ReaperError),
    #[error("{binary} {command}: unexpected output: {message}")]
    Output {
        binary: String,
        command: &'static str,
        message: String,
    },
}

/// One OCI runtime binary with its state root.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Absolute path: resolved up front so a missing binary is a clean error
    /// and never an exec failure inside `spawn` (which would wait on the child
    /// itself and race the reaper).
    pub binary: PathBuf,
    pub root: PathBuf,
    pub systemd_cgroup: bool,
}

/// Options of `create` and `exec`.
#[derive(Debug)]
pub struct CreateOpts<'a> {
    pub pid_file: &'a Path,
    pub console_socket: Option<&'a Path>,
    pub no_pivot: bool,
    pub no_new_keyring: bool,
}

impl Runtime {
    pub fn new(binary: &str, root: PathBuf, systemd_cgroup: bool) -> Result<Runtime, RuntimeError> {
        let binary = which(binary).ok_or_else(|| RuntimeError::NotFound {
            binary: binary.to_string(),
        })?;
        Ok(Runtime {
            binary,
            root,
            systemd_cgroup,
        })
    }

    fn name(&self) -> String {
        self.binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        if self.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
        }
        cmd
    }

    async fn run(&self, command: &'static str, cmd: Command) -> Result<Vec<u8>, RuntimeError> {
        tracing::debug!(?cmd, "oci runtime");
        let out = Reaper::global().run(cmd).await?;
        if out.status != 0 {
            return Err(RuntimeError::Failed {
                binary: self.name(),
                command,
                status: out.status,
                message: error_message(&out.stderr, &out.stdout),
            });
        }
        Ok(out.stdout)
    }

    /// `create`, or with `start` `run --detach` (created and started by one runtime process):
    /// the container's stdio are the stdio of this runtime process unless a console socket
    /// is given, so the caller passes them in.
    pub async fn create(
        &self,
        id: &str,
        bundle: &Path,
        opts: &CreateOpts<'_>,
        stdio: [std::process::Stdio; 3],
        start: bool,
    ) -> Result<(), RuntimeError> {
        let mut cmd = self.command();
        let command = if start { "run" } else { "create" };
        cmd.arg(command);
        if start {
            cmd.arg("--detach");
        }
        cmd.arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(opts.pid_file);
        if let Some(sock) = opts.console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        if opts.no_pivot {
            cmd.arg("--no-pivot");
        }
        if opts.no_new_keyring {
            cmd.arg("--no-new-keyring");
        }
        cmd.arg(id);
        let [i, o, e] = stdio;
        self.run_with_stdio(command, cmd, i, o, e).await
    }

    /// Runs a command whose stdout/stderr go somewhere other than our pipes (the
    /// container's stdio). Errors are then read from runc's `--log` file.
    async fn run_with_stdio(
        &self,
        command: &'static str,
        cmd: Command,
        stdin: std::process::Stdio,
        stdout: std::process::Stdio,
        stderr: std::process::Stdio,
    ) -> Result<(), RuntimeError> {
        // The runtime's own messages would land in the container's log; send them
        // to a log file instead and read it on failure.
        let log = tempfile_path(command);
        let mut args: Vec<std::ffi::OsString> = cmd.get_args().map(|a| a.to_owned()).collect();
        args.insert(0, "--log-format".into());
        args.insert(1, "json".into());
        args.insert(2, "--log".into());
        args.insert(3, log.clone().into_os_string());
        let mut real = Command::new(cmd.get_program());
        real.args(args);
        if let Some(dir) = cmd.get_current_dir() {
            real.current_dir(dir);
        }
        // The container's stdin (a pipe the shim feeds, or /dev/null): `real` is a new
        // Command, so it must be set here; `cmd`'s would be lost with it.
        real.stdin(stdin);
        let out = Reaper::global().run_stdio(real, stdout, stderr).await;
        let logged = std::fs::read(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        let status = out?;
        if status != 0 {
            return Err(RuntimeError::Failed {
                binary: self.name(),
                command,
                status,
                message: json_log_errors(&logged),
            });
        }
        Ok(())
    }

    pub async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let mut cmd = self.command();
        cmd.arg("start").arg(id);
        self.run("start", cmd).await.map(drop)
    }

    pub async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), RuntimeError> {
        let mut cmd = self.command();
        cmd.arg("kill");
        if all {
            cmd.arg("--all");
        }
        cmd.arg(id).arg(signal.to_string());
        self.run("kill", cmd).await.map(drop)
    }

    pub async fn delete(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let mut cmd = self.command();
        cmd.arg("delete");
        if force {
            cmd.arg("--force");
        }
        cmd.arg(id);
        self.run("delete", cmd).await.map(drop)
    }

    /// `exec --detach`: the process is re-parented to the shim when the runtime exits.
    pub async fn exec(
        &self,
        id: &str,
        process_json: &Path,
        opts: &CreateOpts<'_>,
        stdio: [std::process::Stdio; 3],
    ) -> Result<(), RuntimeError> {
        let mut cmd = self.command();
        cmd.arg("exec")
            .arg("--detach")
            .arg("--process")
            .arg(process_json);
        cmd.arg("--pid-file").arg(opts.pid_file);
        if let Some(sock) = opts.console_socket {
            cmd.arg("--console-socket").arg(sock);
        }
        cmd.arg(id);
        let [i, o, e] = stdio;
        self.run_with_stdio("exec", cmd, i, o, e).await
    }

    pub async fn ps(&self, id: &str) -> Result<Vec<u32>, RuntimeError> {
        let mut cmd = self.command();
        cmd.arg("ps").arg("--format").arg("json").arg(id);
        let out = self.run("ps", cmd).await?;
        serde_json::from_slice::<Option<Vec<u32>>>(&out)
            .map(Option::unwrap_or_default)
            .map_err(|e| RuntimeError::Output {
                binary: self.name(),
                command: "ps",
                message: e.to_string(),
            })
    }

    /// `update --resources <file>`; `resources` is a LinuxResources JSON document.
    pub async fn update(&self, id: &str, resources_json: &Path) -> Result<(), RuntimeError> {
        let mut cmd = self.command();
        cmd.arg("update")
            .arg("--resources")
            .arg(resources_json)
            .arg(id);
        self.run("update", cmd).await.map(drop)
    }

    pub async fn version(&self) -> Result<String, RuntimeError> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--version");
        let out = self.run("--version", cmd).await?;
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string())
    }
}

fn tempfile_path(what: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("crisp-shim-{}-{what}-{n}.log", std::process::id()))
}

/// The `msg` of error-level lines of a runc/crun JSON log, or the raw text.
pub fn json_log_errors(log: &[u8]) -> String {
    let text = String::from_utf8_lossy(log);
    let mut msgs = Vec::new();
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            let level = v.get("level").and_then(|l| l.as_str()).unwrap_or("");
            if matches!(level, "error" | "fatal" | "panic")
                && let Some(m) = v.get("msg").and_then(|m| m.as_str())
            {
                msgs.push(m.to_string());
            }
        }
    }
    if msgs.is_empty() {
        text.trim().to_string()
    } else {
        msgs.join("; ")
    }
}

fn error_message(stderr: &[u8], stdout: &[u8]) -> String {
    let e = String::from_utf8_lossy(stderr).trim().to_string();
    if e.is_empty() {
        String::from_utf8_lossy(stdout).trim().to_string()
    } else {
        e
    }
}

/// Finds `binary` on PATH (or takes it as given when it holds a '/').
pub fn which(binary: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if binary.contains('/') {
        let p = PathBuf::from(binary);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(binary))
        .find(|p| executable(p))
}

/// The cgroup layout of this host, as OCI runtimes care about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLayout {
    /// cgroup2 mounted at /sys/fs/cgroup.
    Unified,
    /// Only v1 controllers.
    Legacy,
    /// v1 controllers plus a cgroup2 hierarchy at /sys/fs/cgroup/unified.
    Hybrid,
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

pub fn cgroup_layout() -> CgroupLayout {
    let fs_type = |p: &str| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type().0)
            .ok()
    };
    if fs_type("/sys/fs/cgroup") == Some(CGROUP2_SUPER_MAGIC) {
        CgroupLayout::Unified
    } else if fs_type("/sys/fs/cgroup/unified") == Some(CGROUP2_SUPER_MAGIC) {
        CgroupLayout::Hybrid
    } else {
        CgroupLayout::Legacy
    }
}

/// Why `binary` cannot run containers on this host, if we know it cannot.
/// crun (at least up to the 1.8 Debian ships) refuses hybrid layouts with
/// "cgroups in hybrid mode not supported".
pub fn known_unusable(binary: &str, layout: CgroupLayout) -> Option<String> {
    let name = Path::new(binary)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (name == "crun" && layout == CgroupLayout::Hybrid).then(|| {
        "crun refuses this host's hybrid cgroup layout (v1 controllers plus cgroup2 at /sys/fs/cgroup/unified): \"cgroups in hybrid mode not supported\"".to_string()
    })
}

/// The default OCI runtime: crun when it is installed and works with this
/// host's cgroups, runc otherwise. The choice and its reason are logged.
pub async fn probe_default() -> String {
    let layout = cgroup_layout();
    match which("crun") {
        None => {
            tracing::info!(
                runtime = "runc",
                "default OCI runtime: runc (crun is not installed)"
            );
            "runc".into()
        }
        Some(crun) => {
            if let Some(why) = known_unusable("crun", layout) {
                tracing::info!(runtime = "runc", reason = %why, "default OCI runtime: runc");
                return "runc".into();
            }
            let rt = Runtime {
                binary: crun,
                root: std::env::temp_dir(),
                systemd_cgroup: false,
            };
            match rt.version().await {
                Ok(v) => {
                    tracing::info!(runtime = "crun", version = %v, ?layout, "default OCI runtime: crun");
                    "crun".into()
                }
                Err(e) => {
                    tracing::info!(runtime = "runc", reason = %e, "default OCI runtime: runc (crun --version failed)");
                    "runc".into()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crun_is_refused_only_on_hybrid_hosts() {
        assert!(known_unusable("crun", CgroupLayout::Hybrid).is_some_and(|m| m.contains("hybrid")));
        assert!(known_unusable("/usr/bin/crun", CgroupLayout::Hybrid).is_some());
        assert!(known_unusable("crun", CgroupLayout::Unified).is_none());
        assert!(known_unusable("runc", CgroupLayout::Hybrid).is_none());
    }

    #[test]
    fn json_log_errors_picks_error_lines() {
        let log = br#"{"level":"info","msg":"hi"}
{"level":"error","msg":"cgroups in hybrid mode not supported"}"#;
        assert_eq!(json_log_errors(log), "cgroups in hybrid mode not supported");
        assert_eq!(json_log_errors(b"plain text\n"), "plain text");
    }

    #[tokio::test]
    async fn probe_picks_runc_on_this_hybrid_host() {
        if cgroup_layout() == CgroupLayout::Hybrid {
            assert_eq!(probe_default().await, "runc");
        }
    }
}
