//! Resource figures: a container's cgroup as its shim reports it and the CPU rate between two
//! samples (`container`), a pod's cgroup and network counters (`pod`), and the cAdvisor-named
//! metric families of ListPodSandboxMetrics built from them (`metrics`).

pub mod container;
pub mod cpu;
pub mod metrics;
pub mod pod;
