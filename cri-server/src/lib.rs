//! crispd, the CRI daemon: serves the Kubernetes CRI v1 RuntimeService and ImageService on a
//! unix socket, runs each pod in a containerd-style shim, and keeps its state in one store.
//!
//! Start-up order and what each module owns are described in `startup` and in
//! `../shared/DESIGN.md`.

pub mod cni;
pub mod config;
pub mod cri;
pub mod daemon;
pub mod idmap;
pub mod inflight;
pub mod instrument;
pub mod logs;
pub mod metrics;
pub mod netns;
pub mod recover;
pub mod sandbox_files;
pub mod server;
pub mod spec;
pub mod startup;
pub mod store;
pub mod util;
