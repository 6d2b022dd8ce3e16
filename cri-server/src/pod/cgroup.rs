//! The pod's own cgroup: the pause's, named after the pod by the placement function under
//! the pod's cgroup parent. crispd owns it, so what is left in it after a failed start (a
//! pause whose shim never answered, a child stuck before its exec) is crispd's to kill.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crisp_shim::placement::{self, CgroupDriver};

/// The pod cgroup's directory in every mounted hierarchy (none when the placement gives the
/// root: nothing of ours to remove).
pub fn dirs(
    driver: CgroupDriver,
    cgroup_parent: &str,
    pod_id: &str,
) -> Result<Vec<PathBuf>, String> {
    let path = placement::cgroup_path(driver, cgroup_parent, pod_id)
        .and_then(|p| placement::resolved_path(driver, &p))
        .map_err(|e| format!("cgroup of pod {pod_id} under {cgroup_parent:?}: {e}"))?;
    let rel = path.trim_start_matches('/');
    if rel.is_empty() {
        return Ok(Vec::new());
    }
    // The mounted hierarchies (from mountinfo, as the shim finds them): on a pure v2 host the
    // children of /sys/fs/cgroup are cgroups, not hierarchies.
    crisp_shim::cgroup::dirs_of(rel).map_err(|e| e.to_string())
}

/// The pids in `dirs` (their own `cgroup.procs`, not their children's).
fn members(dirs: &[PathBuf]) -> Vec<i32> {
    let mut pids: Vec<i32> = dirs
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// SIGKILL every process in `dirs` until they are empty, for at most `limit`. Returns how
/// many processes were killed; an error names what is still there when time runs out.
pub async fn kill_leftovers(dirs: &[PathBuf], limit: Duration) -> Result<usize, String> {
    let deadline = Instant::now() + limit;
    let mut killed = std::collections::BTreeSet::new();
    loop {
        let pids = members(dirs);
        if pids.is_empty() {
            return Ok(killed.len());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "cgroup {} still holds pids {pids:?} after {limit:?}",
                dirs.first()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default()
            ));
        }
        for pid in pids {
            if pid > 1 && killed.insert(pid) {
                tracing::info!(pid, "killing a process left in the pod's cgroup");
            }
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process left in a pod's cgroup (as a pause stuck before exec was) is killed, and the
    /// cgroup can then be removed.
    #[tokio::test]
    async fn leftovers_are_killed_and_the_cgroup_can_go() {
        let name = format!("crisp-test-leftovers-{}", std::process::id());
        let dirs = crisp_shim::cgroup::dirs_of(&name).expect("cgroup hierarchies");
        assert!(!dirs.is_empty(), "no cgroup hierarchy is mounted");
        crisp_shim::cgroup::create(&dirs).expect("create the test cgroup");
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn sleep");
        let placed = crisp_shim::cgroup::add(&dirs, child.id() as i32);
        let killed = match placed {
            Ok(()) => kill_leftovers(&dirs, Duration::from_secs(5)).await,
            Err(e) => Err(format!("place sleep in {name}: {e}")),
        };
        let status = child.try_wait();
        let _ = child.kill();
        let _ = child.wait();
        let removed = crisp_shim::cgroup::remove(&dirs);
        assert_eq!(killed, Ok(1));
        assert!(
            status.is_ok_and(|s| s.is_some()),
            "sleep still ran after kill_leftovers"
        );
        removed.expect("the emptied cgroup is removed");
    }
}
