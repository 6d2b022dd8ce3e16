//! The StartSandbox hang, as a test: the pause child runs between a raw clone and exec in a
//! copy of a multi-threaded process, so any glibc call there that takes a lock another
//! thread may have held at the clone can block it forever. glibc's setresuid/setresgid/
//! setgroups did (the setxid protocol takes the thread-list lock and waits on threads that
//! are being created); the child now makes raw syscalls. Here pause is spawned again and
//! again while other threads start and exit without pause, each spawn with a deadline: with
//! the glibc wrappers back in the child, a spawn hung within the first ten in each of six
//! runs (the child waiting in futex_do_wait), and the test failed on the spawn's exec deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use super::*;

/// A spawn takes milliseconds; this is far beyond any scheduling delay on a loaded machine,
/// and beyond the spawn's own exec deadline (a stuck child then fails the spawn itself).
const DEADLINE: Duration = Duration::from_secs(30);
/// Spawns per run (about 4 s here): the old code hung within the first ten.
const SPAWNS: usize = 1500;
/// Threads that do nothing but start a thread and join it, to keep glibc's thread list busy.
const CHURNERS: usize = 4;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test spawns pause with setgroups/setresuid: it needs root"
    );
}

/// Threads that start and exit without pause until `stop` is set.
fn churn(stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    (0..CHURNERS)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = std::thread::spawn(|| {}).join();
                }
            })
        })
        .collect()
}

/// Pids of this process's children that have not exec'd: a clone still runs under the name
/// of the thread that made it, `pause-keeper`.
fn unexeced_children() -> Vec<i32> {
    let mut pids = Vec::new();
    let tasks = std::fs::read_dir("/proc/self/task").expect("list /proc/self/task");
    for t in tasks.flatten() {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "pause-keeper" {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Where a stuck child is, for the failure message: its kernel wait channel and state.
fn describe(pid: i32) -> String {
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit(") ").next().and_then(|s| s.split(' ').next());
    format!("pid {pid} state {} wchan {wchan:?}", state.unwrap_or("?"))
}

/// Kills pause and reaps it (it is this process's child).
fn finish(s: Spawned) {
    signal(&s.pidfd, libc::SIGKILL).expect("kill pause");
    drop(s.keeper);
    let mut status = 0;
    // SAFETY: waitpid on our own child, into a local.
    let r = unsafe { libc::waitpid(s.pid, &mut status, 0) };
    assert_eq!(r, s.pid, "reap pause {}", s.pid);
}

/// One spawn with the deadline. On a hang, the stuck children are described and killed
/// (which lets the spawn return) before the error is returned.
fn spawn_with_deadline(pause: &Arc<PauseBinary>) -> Result<Spawned, String> {
    let (tx, rx) = mpsc::channel();
    let p = pause.clone();
    std::thread::spawn(move || {
        let _ = tx.send(spawn(p, Plan::default(), Vec::new(), None));
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(r) => r.map_err(|e| format!("spawn failed: {e}")),
        Err(_) => {
            let stuck = unexeced_children();
            let what: Vec<String> = stuck.iter().map(|&p| describe(p)).collect();
            for &pid in &stuck {
                // SAFETY: kill(2) of a child of this process that never exec'd.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if let Ok(Ok(s)) = rx.recv_timeout(DEADLINE) {
                finish(s);
            }
            Err(format!(
                "no pause within {DEADLINE:?}; children stuck before exec: {}",
                what.join(", ")
            ))
        }
    }
}

#[test]
fn pause_spawns_while_threads_start_and_exit() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir for the pause binary");
    let pause = Arc::new(PauseBinary::load(dir.path()).expect("load pause"));
    let stop = Arc::new(AtomicBool::new(false));
    let churners = churn(&stop);
    let t0 = Instant::now();
    let mut failure = None;
    for i in 0..SPAWNS {
        match spawn_with_deadline(&pause) {
            Ok(s) => finish(s),
            Err(e) => {
                failure = Some(format!("spawn {} of {SPAWNS}: {e}", i + 1));
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in churners {
        c.join().expect("churner thread");
    }
    if let Some(f) = failure {
        panic!("{f}");
    }
    eprintln!("{SPAWNS} pauses spawned in {:?}", t0.elapsed());
}
