//! Overlay snapshotter with safe idmapped layer mounts, and the `crisp-snapshotter` containerd
//! proxy plugin.
//!
//! * [`Snapshotter`]: containerd's snapshotter semantics (prepare, view, commit, remove, stat,
//!   update, usage, walk, mounts, cleanup) over one embedded store. The store is `redb`: pure
//!   Rust (no C library to build or link), ACID transactions with crash safety, one file, one
//!   writer at a time, which is exactly the serialisation the snapshot state machine needs.
//! * [`mount`]: mounts as data ([`mount::Mount`]) and the only code that mounts layers
//!   ([`mount::mount_all`], [`mount::unmount_all`]), including the safe idmapped overlay.
//! * [`fsutil`]: the one recursive remover, which never crosses a mount point.
//! * [`idmap`]: ID mappings and the user namespace that carries them.
//! * [`service`]: the `containerd.services.snapshots.v1.Snapshots` gRPC service.

pub mod error;
pub mod failpoint;
pub mod filter;
pub mod fsutil;
pub mod idmap;
pub mod mount;
pub mod service;
mod snapshotter;
mod sys;

pub use error::{Error, ErrorKind, Result};
pub use snapshotter::{Config, Info, Kind, Snapshotter, Usage};
