//! Resource figures: a container's cgroup as its shim reports it and the CPU rate between two
//! samples (`container`), a pod's cgroup and network counters (`pod`).

pub mod container;
pub mod cpu;
pub mod pod;
