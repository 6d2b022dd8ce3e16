//! containerd-shim-crisp-v2, the per-pod containerd shim v2.
//!
//! - `placement`: the one cgroup placement function (DESIGN.md promise 2)
//! - `options`: handler runtime options merged with per-task overrides
//! - `events`: task events to containerd and `Any` packing, without protobuf reflection
//! - `reaper`: the process-wide `waitpid`, so no exit status is ever stolen
//! - `runtime`: the runc/crun CLI and the start-up probe that picks one
//! - `sandbox`: containerd's sandbox API; the pod's pause started without a runtime

pub mod cgroup;
pub mod events;
pub mod io;
pub mod mount;
pub mod options;
pub mod placement;
pub mod reaper;
pub mod runtime;
pub mod sandbox;
pub mod service;
pub mod spec;
