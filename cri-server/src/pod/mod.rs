//! Pods below the CRI handlers: their records as CRI status (`status`), the named set-up steps
//! of RunPodSandbox (`setup`), the release of everything a pod owns (`release`), start-up
//! recovery (`recover`), the watch on each ready pod's shim (`watch`), the pod's files
//! (`files`), its user-namespace ID range (`idmap`), its own cgroup (`cgroup`) and its
//! pod-level resources (`resources`, UpdatePodSandboxResources).

pub mod cgroup;
pub mod files;
pub mod idmap;
pub mod recover;
pub mod release;
pub mod resources;
pub mod service;
pub mod setup;
pub mod status;
pub mod watch;
