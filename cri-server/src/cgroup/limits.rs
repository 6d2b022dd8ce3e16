//! CPU and memory limits in a cgroup's files, in CRI's units: written for a pod's cgroup by
//! UpdatePodSandboxResources and read back for ContainerStatus (kubelet's resize loop compares
//! what the status reports with what it asked for, so the status must say what the kernel
//! holds, not what was asked).
//!
//! | CRI field | cgroup v1 | cgroup v2 |
//! |---|---|---|
//! | memory_limit_in_bytes | memory.limit_in_bytes | memory.max |
//! | cpu_shares | cpu.shares | cpu.weight (converted, lossy) |
//! | cpu_quota, cpu_period | cpu.cfs_quota_us, cpu.cfs_period_us | cpu.max |
//! | cpuset_cpus, cpuset_mems | cpuset.cpus, cpuset.mems | cpuset.cpus, cpuset.mems |

use crisp_proto::cri::v1::LinuxContainerResources;

use super::{CgroupError, Hierarchy, read_string, read_u64, write};

/// Above this a memory limit means "none" (the kernel rounds the unlimited value down).
const UNLIMITED: u64 = 1 << 62;

/// The kernel keeps memory limits in whole pages, rounding the written value down.
const PAGE: i64 = 4096;

/// cpu.shares → cpu.weight, the conversion kubelet, runc and crun use: [2, 262144] onto
/// [1, 10000] linearly.
pub fn shares_to_weight(shares: i64) -> u64 {
    let s = shares.clamp(2, 262_144) as u64;
    1 + ((s - 2) * 9999) / 262_142
}

/// The inverse of [`shares_to_weight`]: the smallest share count with that weight.
pub fn weight_to_shares(weight: u64) -> i64 {
    let w = weight.clamp(1, 10_000);
    let s = 2 + ((w - 1) * 262_142).div_ceil(9999);
    s as i64
}

/// Write the fields `r` sets (a zero or empty field leaves the file as it is) to cgroup
/// `rel`. The CPU period goes before the quota, so a new pair is checked as a pair.
pub fn apply(h: &Hierarchy, rel: &str, r: &LinuxContainerResources) -> Result<(), CgroupError> {
    if h.is_v2() {
        apply_v2(h, rel, r)
    } else {
        apply_v1(h, rel, r)
    }?;
    for (file, v) in [
        ("cpuset.cpus", &r.cpuset_cpus),
        ("cpuset.mems", &r.cpuset_mems),
    ] {
        if !v.is_empty() {
            write(&h.dir("cpuset", rel)?.join(file), v)?;
        }
    }
    Ok(())
}

fn apply_v1(h: &Hierarchy, rel: &str, r: &LinuxContainerResources) -> Result<(), CgroupError> {
    if r.memory_limit_in_bytes > 0 {
        let dir = h.dir("memory", rel)?;
        write(
            &dir.join("memory.limit_in_bytes"),
            &r.memory_limit_in_bytes.to_string(),
        )?;
    }
    if r.cpu_shares == 0 && r.cpu_period == 0 && r.cpu_quota == 0 {
        return Ok(());
    }
    let dir = h.dir("cpu", rel)?;
    if r.cpu_shares > 0 {
        write(&dir.join("cpu.shares"), &r.cpu_shares.to_string())?;
    }
    if r.cpu_period > 0 {
        write(&dir.join("cpu.cfs_period_us"), &r.cpu_period.to_string())?;
    }
    if r.cpu_quota != 0 {
        write(&dir.join("cpu.cfs_quota_us"), &r.cpu_quota.to_string())?;
    }
    Ok(())
}

fn apply_v2(h: &Hierarchy, rel: &str, r: &LinuxContainerResources) -> Result<(), CgroupError> {
    let dir = h.dir("", rel)?;
    if r.memory_limit_in_bytes > 0 {
        write(
            &dir.join("memory.max"),
            &r.memory_limit_in_bytes.to_string(),
        )?;
    }
    if r.cpu_shares > 0 {
        write(
            &dir.join("cpu.weight"),
            &shares_to_weight(r.cpu_shares).to_string(),
        )?;
    }
    if r.cpu_quota != 0 || r.cpu_period > 0 {
        // One file holds both: keep the half the request leaves unset.
        let path = dir.join("cpu.max");
        let (old_quota, old_period) = parse_cpu_max(&path, &read_string(&path)?)?;
        let quota = if r.cpu_quota != 0 {
            r.cpu_quota
        } else {
            old_quota
        };
        let period = if r.cpu_period > 0 {
            r.cpu_period
        } else {
            old_period
        };
        let quota = if quota < 0 {
            "max".to_string()
        } else {
            quota.to_string()
        };
        write(&path, &format!("{quota} {period}"))?;
    }
    Ok(())
}

/// `cpu.max`: `<quota|max> <period>`; quota -1 for max.
fn parse_cpu_max(path: &std::path::Path, text: &str) -> Result<(i64, i64), CgroupError> {
    let bad = || CgroupError::Parse {
        path: path.to_path_buf(),
        text: text.trim().to_string(),
    };
    let mut it = text.split_whitespace();
    let quota = match it.next().ok_or_else(bad)? {
        "max" => -1,
        q => q.parse().map_err(|_| bad())?,
    };
    let period = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    Ok((quota, period))
}

fn memory_limit(raw: &str, path: &std::path::Path) -> Result<i64, CgroupError> {
    let raw = raw.trim();
    if raw == "max" {
        return Ok(0);
    }
    let v: u64 = raw.parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        text: raw.to_string(),
    })?;
    Ok(if v > UNLIMITED { 0 } else { v as i64 })
}

/// The memory limit cgroup `rel` holds now, in bytes (0: none).
pub fn memory_limit_of(h: &Hierarchy, rel: &str) -> Result<i64, CgroupError> {
    let p = if h.is_v2() {
        h.dir("", rel)?.join("memory.max")
    } else {
        h.dir("memory", rel)?.join("memory.limit_in_bytes")
    };
    memory_limit(&read_string(&p)?, &p)
}

/// Whether a cgroup holding `applied` bytes already has the limit `wanted` asks for (the
/// kernel keeps whole pages).
pub fn same_memory_limit(applied: i64, wanted: i64) -> bool {
    wanted > 0 && applied == wanted / PAGE * PAGE
}

/// The limits cgroup `rel` holds now, in CRI's units: 0 memory for no limit, quota -1 for
/// none, shares converted back from v2's weight. cpuset fields are empty where the host has
/// no cpuset controller.
pub fn read(h: &Hierarchy, rel: &str) -> Result<LinuxContainerResources, CgroupError> {
    let mut r = LinuxContainerResources::default();
    if h.is_v2() {
        let dir = h.dir("", rel)?;
        let p = dir.join("memory.max");
        r.memory_limit_in_bytes = memory_limit(&read_string(&p)?, &p)?;
        r.cpu_shares = weight_to_shares(read_u64(&dir.join("cpu.weight"))?);
        let p = dir.join("cpu.max");
        (r.cpu_quota, r.cpu_period) = parse_cpu_max(&p, &read_string(&p)?)?;
    } else {
        let p = h.dir("memory", rel)?.join("memory.limit_in_bytes");
        r.memory_limit_in_bytes = memory_limit(&read_string(&p)?, &p)?;
        let cpu = h.dir("cpu", rel)?;
        r.cpu_shares = read_u64(&cpu.join("cpu.shares"))? as i64;
        r.cpu_period = read_u64(&cpu.join("cpu.cfs_period_us"))? as i64;
        let p = cpu.join("cpu.cfs_quota_us");
        let text = read_string(&p)?;
        r.cpu_quota = text.trim().parse().map_err(|_| CgroupError::Parse {
            path: p.clone(),
            text: text.trim().to_string(),
        })?;
    }
    match h.dir("cpuset", rel) {
        Ok(dir) => {
            r.cpuset_cpus = read_cpuset(&dir.join("cpuset.cpus"))?;
            r.cpuset_mems = read_cpuset(&dir.join("cpuset.mems"))?;
        }
        Err(CgroupError::NoController { .. }) => {}
        Err(e) => return Err(e),
    }
    Ok(r)
}

/// A cpuset file, empty where the controller is not enabled for the cgroup (v2 has no
/// cpuset files then; v1 has no hierarchy, handled by the caller).
fn read_cpuset(path: &std::path::Path) -> Result<String, CgroupError> {
    match read_string(path) {
        Ok(s) => Ok(s.trim().to_string()),
        Err(CgroupError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(String::new())
        }
        Err(e) => Err(e),
    }
}

/// What ContainerStatus reports: the values the cgroup holds (`applied`), except where the
/// kernel's own rounding is the only difference from what was asked (`wanted`): memory in
/// whole pages, v2's lossy shares → weight. Then the asked value is reported, so kubelet sees
/// its resize done; any other difference is reported as the kernel holds it. Fields no cgroup
/// file shows (swap, oom_score_adj, hugepages, unified) are the asked ones.
pub fn reported(
    applied: &LinuxContainerResources,
    wanted: &LinuxContainerResources,
    v2: bool,
) -> LinuxContainerResources {
    let mut r = wanted.clone();
    r.memory_limit_in_bytes =
        if same_memory_limit(applied.memory_limit_in_bytes, wanted.memory_limit_in_bytes) {
            wanted.memory_limit_in_bytes
        } else {
            applied.memory_limit_in_bytes
        };
    let same_shares = if v2 {
        shares_to_weight(applied.cpu_shares) == shares_to_weight(wanted.cpu_shares)
    } else {
        applied.cpu_shares == wanted.cpu_shares.max(2)
    };
    if !(wanted.cpu_shares > 0 && same_shares) {
        r.cpu_shares = applied.cpu_shares;
    }
    // An unset quota reads back as -1 (none): the same thing.
    if !(wanted.cpu_quota == 0 && applied.cpu_quota == -1) {
        r.cpu_quota = applied.cpu_quota;
    }
    r.cpu_period = applied.cpu_period;
    if !applied.cpuset_cpus.is_empty() || !wanted.cpuset_cpus.is_empty() {
        r.cpuset_cpus = applied.cpuset_cpus.clone();
    }
    if !applied.cpuset_mems.is_empty() || !wanted.cpuset_mems.is_empty() {
        r.cpuset_mems = applied.cpuset_mems.clone();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::tests::fake_root;
    use crate::error::{ErrorKind, HasKind};

    fn res() -> LinuxContainerResources {
        LinuxContainerResources::default()
    }

    #[test]
    fn weight_conversion_round_trips_to_the_same_weight() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        for s in [2, 3, 100, 512, 1024, 1536, 4096, 100_000, 262_144] {
            let w = shares_to_weight(s);
            assert_eq!(shares_to_weight(weight_to_shares(w)), w, "shares {s}");
        }
    }

    #[test]
    fn v2_limits_written_and_read_back() {
        let d = fake_root(
            true,
            &[
                ("pod/memory.max", "max\n"),
                ("pod/cpu.weight", "100\n"),
                ("pod/cpu.max", "max 100000\n"),
            ],
        );
        let h = Hierarchy::at(d.path());
        let want = LinuxContainerResources {
            memory_limit_in_bytes: 100_000_000,
            cpu_shares: 1536,
            cpu_quota: 150_000,
            ..res()
        };
        apply(&h, "/pod", &want).expect("apply");
        let file = |f: &str| std::fs::read_to_string(d.path().join("pod").join(f)).expect(f);
        assert_eq!(file("memory.max"), "100000000");
        assert_eq!(file("cpu.weight"), "59");
        assert_eq!(file("cpu.max"), "150000 100000", "the period is kept");
        // What a kernel would show: memory in whole pages.
        std::fs::write(d.path().join("pod/memory.max"), "99999744\n").expect("write");
        let got = read(&h, "/pod").expect("read");
        assert_eq!(got.memory_limit_in_bytes, 99_999_744);
        assert_eq!(shares_to_weight(got.cpu_shares), 59);
        assert_eq!((got.cpu_quota, got.cpu_period), (150_000, 100_000));
        let shown = reported(&got, &want, true);
        assert_eq!(
            shown.memory_limit_in_bytes, 100_000_000,
            "page rounding only"
        );
        assert_eq!(shown.cpu_shares, 1536, "weight rounding only");
        assert_eq!(shown.cpu_quota, 150_000);
        // No quota any more; a different memory limit than asked is reported as it is.
        apply(
            &h,
            "/pod",
            &LinuxContainerResources {
                cpu_quota: -1,
                ..res()
            },
        )
        .expect("apply");
        assert_eq!(file("cpu.max"), "max 100000");
        std::fs::write(d.path().join("pod/memory.max"), "max\n").expect("write");
        let got = read(&h, "/pod").expect("read");
        assert_eq!((got.memory_limit_in_bytes, got.cpu_quota), (0, -1));
        assert_eq!(reported(&got, &want, true).memory_limit_in_bytes, 0);
    }

    #[test]
    fn v1_limits_written_and_read_back() {
        let d = fake_root(
            false,
            &[
                ("memory/pod/memory.limit_in_bytes", "9223372036854771712\n"),
                ("cpu,cpuacct/pod/cpu.shares", "1024\n"),
                ("cpu,cpuacct/pod/cpu.cfs_period_us", "100000\n"),
                ("cpu,cpuacct/pod/cpu.cfs_quota_us", "-1\n"),
                ("cpuset/pod/cpuset.cpus", "0-1\n"),
                ("cpuset/pod/cpuset.mems", "0\n"),
            ],
        );
        let h = Hierarchy::at(d.path());
        let got = read(&h, "/pod").expect("read");
        assert_eq!(got.memory_limit_in_bytes, 0, "unlimited");
        assert_eq!((got.cpu_shares, got.cpu_quota), (1024, -1));
        assert_eq!(got.cpuset_cpus, "0-1");
        let want = LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            cpu_shares: 512,
            cpu_quota: 50_000,
            cpu_period: 100_000,
            ..res()
        };
        apply(&h, "pod", &want).expect("apply");
        let got = read(&h, "/pod").expect("read");
        assert_eq!(got.memory_limit_in_bytes, 64 << 20);
        assert_eq!(
            (got.cpu_shares, got.cpu_quota, got.cpu_period),
            (512, 50_000, 100_000)
        );
        let shown = reported(&got, &want, false);
        assert_eq!(shown.cpuset_cpus, "0-1", "what the cgroup holds");
        assert_eq!(shown.cpu_shares, 512);
    }

    #[test]
    fn a_missing_cgroup_is_not_found() {
        let d = fake_root(false, &[("memory/other/x", ""), ("cpu/other/x", "")]);
        let e = read(&Hierarchy::at(d.path()), "/gone").expect_err("gone");
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        let d = fake_root(true, &[("pod/cpu.max", "bogus\n")]);
        let e = apply(
            &Hierarchy::at(d.path()),
            "/pod",
            &LinuxContainerResources {
                cpu_quota: 10_000,
                ..res()
            },
        )
        .expect_err("bad cpu.max");
        assert!(e.to_string().contains("cpu.max"), "{e}");
    }
}
