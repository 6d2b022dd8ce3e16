//! The shim's only `waitpid`: one reaper for every child.
//!
//! The shim is a subreaper, so container processes (re-parented to it when runc
//! exits) and the runc/crun processes it spawns all end up as its children. A
//! `Command::wait` on one of them would race a `waitpid(-1)` on the others and
//! one side would get ECHILD — or worse, the exit status of the wrong process.
//! So nothing in the shim waits on its own: [`Reaper::spawn`] registers the pid
//! of a command it starts *while holding the lock the reaper needs to dispatch*,
//! so the exit can never be reaped before someone is listening for it, and
//! container processes (whose pid the shim learns later from a pid file) are
//! looked up in a short table of unclaimed exits.

use std::{
    collections::HashMap,
    io::Read,
    process::{Command, Stdio},
    sync::{Condvar, Mutex, OnceLock},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::wait::{WaitStatus, waitpid},
    unistd::Pid,
};
use tokio::sync::{mpsc, oneshot};

/// Exits nobody has claimed yet are kept this long (a container's exit can be
/// reaped before the shim has read its pid file).
const UNCLAIMED_TTL: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub pid: i32,
    /// Exit code, or 128 + signal number, as containerd reports it.
    pub status: i32,
    pub at: std::time::SystemTime,
}

#[derive(Default)]
struct Table {
    /// One-shot waiters for commands the shim spawned.
    waiters: HashMap<i32, oneshot::Sender<Exit>>,
    /// Exits nobody waited for yet, by pid.
    unclaimed: HashMap<i32, (Exit, Instant)>,
}

/// The process-wide reaper: there can only be one `waitpid(-1)` per process.
pub struct Reaper {
    table: Mutex<Table>,
    /// Wakes the reaper thread when it idles with no children.
    wake: Condvar,
    /// Every exit of a pid that has no one-shot waiter goes to each subscriber, so
    /// task services can match their container and exec processes.
    subscribers: Mutex<Vec<mpsc::UnboundedSender<Exit>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error("spawn {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("{0} vanished without an exit status")]
    Lost(String),
}

/// Output of a finished command.
#[derive(Debug)]
pub struct Output {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

static GLOBAL: OnceLock<&'static Reaper> = OnceLock::new();

impl Reaper {
    /// The reaper, started on first use. It runs on its own thread blocked in
    /// `waitpid(-1)`, independent of any async runtime.
    pub fn global() -> &'static Reaper {
        GLOBAL.get_or_init(|| {
            let reaper: &'static Reaper = Box::leak(Box::new(Reaper {
                table: Mutex::default(),
                wake: Condvar::new(),
                subscribers: Mutex::default(),
            }));
            let spawned = std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || reaper.reap_forever());
            if let Err(e) = spawned {
                // Without a reaper no exit is ever reported; nothing can work.
                tracing::error!(error = %e, "cannot start the reaper thread");
            }
            reaper
        })
    }

    /// The stream of exits of processes the shim did not spawn through [`Reaper::run`]
    /// (containers, execs). An exit is also kept for [`Reaper::take_unclaimed`]; the
    /// subscriber that takes it from there is the one that handles it.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Exit> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }

    fn reap_forever(&self) {
        loop {
            let exit = match waitpid(Pid::from_raw(-1), None) {
                Ok(WaitStatus::Exited(pid, code)) => Exit {
                    pid: pid.as_raw(),
                    status: code,
                    at: now(),
                },
                Ok(WaitStatus::Signaled(pid, sig, _)) => Exit {
                    pid: pid.as_raw(),
                    status: 128 + sig as i32,
                    at: now(),
                },
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => {
                    // No children right now: sleep until a spawn wakes us, or a
                    // little while, since re-parented orphans wake nobody.
                    let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = self.wake.wait_timeout(table, Duration::from_millis(50));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            self.dispatch(exit);
        }
    }

    fn dispatch(&self, exit: Exit) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = table.waiters.remove(&exit.pid) {
            let _ = tx.send(exit);
            return;
        }
        let cutoff = Instant::now();
        table
            .unclaimed
            .retain(|_, (_, t)| cutoff.duration_since(*t) < UNCLAIMED_TTL);
        table.unclaimed.insert(exit.pid, (exit, Instant::now()));
        drop(table);
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|tx| tx.send(exit).is_ok());
    }

    /// Takes an exit of `pid` that arrived before anyone asked for it.
    pub fn take_unclaimed(&self, pid: i32) -> Option<Exit> {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.unclaimed.remove(&pid).map(|(e, _)| e)
    }

    /// Runs `cmd` to completion with stdin from /dev/null unless set, capturing
    /// stdout and stderr, and gets its status from the reaper, never from a wait
    /// of its own.
    pub async fn run(&'static self, mut cmd: Command) -> Result<Output, ReaperError> {
        let name = format!("{:?}", cmd.get_program());
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let (tx, rx) = oneshot::channel();
        let mut child = {
            // Holding the table lock across fork+exec: the reaper cannot dispatch
            // this pid's exit until the waiter is registered.
            let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
            let child = cmd
                .spawn()
                .map_err(|e| ReaperError::Spawn(name.clone(), e))?;
            table.waiters.insert(child.id() as i32, tx);
            self.wake.notify_all();
            child
        };
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        // Read both pipes on blocking threads; they close when the command (and
        // anything it left running with them, which runc does not) exits.
        let out = tokio::task::spawn_blocking(move || read_all(stdout));
        let err = tokio::task::spawn_blocking(move || read_all(stderr));
        let exit = rx.await.map_err(|_| ReaperError::Lost(name.clone()))?;
        // `child` is dropped without waiting: the reaper already collected it.
        drop(child);
        Ok(Output {
            status: exit.status,
            stdout: out.await.unwrap_or_default(),
            stderr: err.await.unwrap_or_default(),
        })
    }
}

impl Reaper {
    /// Like [`Reaper::run`] but with the caller's stdout/stderr (a container's
    /// stdio when the runtime passes its own on); returns the exit status.
    pub async fn run_stdio(
        &'static self,
        mut cmd: Command,
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<i32, ReaperError> {
        let name = format!("{:?}", cmd.get_program());
        cmd.stdout(stdout).stderr(stderr);
        let (tx, rx) = oneshot::channel();
        let child = {
            let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
            let child = cmd
                .spawn()
                .map_err(|e| ReaperError::Spawn(name.clone(), e))?;
            table.waiters.insert(child.id() as i32, tx);
            self.wake.notify_all();
            child
        };
        // Our copies of the stdio handles live in `cmd`; drop them now so the
        // container holds the only ones.
        drop(cmd);
        let exit = rx.await.map_err(|_| ReaperError::Lost(name))?;
        drop(child);
        Ok(exit.status)
    }
}

fn read_all<R: Read>(r: Option<R>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(mut r) = r {
        let _ = r.read_to_end(&mut buf);
    }
    buf
}

fn now() -> std::time::SystemTime {
    std::time::SystemTime::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many short commands while a global reaper runs: each gets its own status.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_never_loses_its_status_to_the_global_reaper() {
        let reaper = Reaper::global();
        let mut jobs = Vec::new();
        for i in 0..40 {
            let r = reaper;
            jobs.push(tokio::spawn(async move {
                let mut cmd = Command::new("sh");
                cmd.args([
                    "-c",
                    &format!("echo out{i}; echo err{i} >&2; exit {}", i % 7),
                ]);
                let out = r.run(cmd).await.expect("runs");
                assert_eq!(out.status, i % 7);
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout).trim(),
                    format!("out{i}")
                );
                assert_eq!(
                    String::from_utf8_lossy(&out.stderr).trim(),
                    format!("err{i}")
                );
            }));
        }
        for j in jobs {
            j.await.expect("job");
        }
    }

    #[tokio::test]
    async fn signals_are_reported_as_128_plus_signal() {
        let reaper = Reaper::global();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "kill -9 $$"]);
        assert_eq!(reaper.run(cmd).await.expect("runs").status, 137);
    }
}
