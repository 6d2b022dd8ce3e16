//! Memory figures of a process from /proc, for the benchmarks.

/// VmRSS in KiB: every page mapped, shared ones (the binary's text, libc) in full.
pub fn vm_rss_kib(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(kib)
}

/// A field of /proc/<pid>/smaps_rollup in KiB: `Pss` shares each page among the processes
/// mapping it (N shims of one binary pay for its text once), `Anonymous` is what a process
/// adds of its own.
pub fn smaps_kib(pid: i32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(kib)
}

fn kib(v: &str) -> Option<u64> {
    v.trim().trim_end_matches("kB").trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_memory_is_read() {
        let me = std::process::id() as i32;
        assert!(vm_rss_kib(me).is_some_and(|k| k > 0));
        assert!(smaps_kib(me, "Pss").is_some_and(|k| k > 0));
        assert!(smaps_kib(me, "NoSuchField").is_none());
    }
}
