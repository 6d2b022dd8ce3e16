//! The container's cgroup resources (CPU, memory, hugepages, unified) from the CRI's.

use super::*;

pub fn resources(
    r: Option<&pb::LinuxContainerResources>,
    cgroup_v2: bool,
) -> Result<oci_spec::runtime::LinuxResources, SpecError> {
    let mut b = LinuxResourcesBuilder::default();
    let Some(r) = r else { return Ok(b.build()?) };
    let f = |n: &str| format!("linux.resources.{n}");
    for (name, v) in [
        ("cpu_period", r.cpu_period),
        ("cpu_quota", r.cpu_quota),
        ("cpu_shares", r.cpu_shares),
        ("memory_limit_in_bytes", r.memory_limit_in_bytes),
    ] {
        if v < 0 && !(name == "cpu_quota" && v == -1) {
            return Err(invalid(f(name), format!("{v} is negative")));
        }
    }
    let mut cpu = LinuxCpuBuilder::default();
    if r.cpu_shares > 0 {
        cpu = cpu.shares(r.cpu_shares as u64);
    }
    if r.cpu_quota != 0 {
        cpu = cpu.quota(r.cpu_quota);
    }
    if r.cpu_period > 0 {
        cpu = cpu.period(r.cpu_period as u64);
    }
    if !r.cpuset_cpus.is_empty() {
        cpu = cpu.cpus(r.cpuset_cpus.clone());
    }
    if !r.cpuset_mems.is_empty() {
        cpu = cpu.mems(r.cpuset_mems.clone());
    }
    b = b.cpu(cpu.build()?);
    if r.memory_limit_in_bytes > 0 {
        let swap = if r.memory_swap_limit_in_bytes > 0 {
            if r.memory_swap_limit_in_bytes < r.memory_limit_in_bytes {
                return Err(invalid(
                    f("memory_swap_limit_in_bytes"),
                    "smaller than memory_limit_in_bytes",
                ));
            }
            r.memory_swap_limit_in_bytes
        } else {
            // No swap beyond the limit unless kubelet asks for it (its NoSwap default).
            r.memory_limit_in_bytes
        };
        b = b.memory(
            LinuxMemoryBuilder::default()
                .limit(r.memory_limit_in_bytes)
                .swap(swap)
                .build()?,
        );
    }
    if !r.hugepage_limits.is_empty() {
        let mut v = Vec::new();
        for h in &r.hugepage_limits {
            let limit = i64::try_from(h.limit).map_err(|_| {
                invalid(f("hugepage_limits"), format!("limit {} too large", h.limit))
            })?;
            v.push(
                LinuxHugepageLimitBuilder::default()
                    .page_size(h.page_size.clone())
                    .limit(limit)
                    .build()?,
            );
        }
        b = b.hugepage_limits(v);
    }
    if !r.unified.is_empty() {
        if !cgroup_v2 {
            return Err(invalid(
                f("unified"),
                "cgroup v2 settings on a cgroup v1 host",
            ));
        }
        b = b.unified(r.unified.clone());
    }
    Ok(b.build()?)
}
