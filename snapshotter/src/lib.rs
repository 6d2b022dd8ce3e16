//! Overlay snapshotter with safe idmapped layer mounts, and the `crisp-snapshotter` containerd
//! proxy plugin.
//!
//! * [`mount`]: mounts as data ([`mount::Mount`]) and the only code that mounts layers
//!   ([`mount::mount_all`], [`mount::unmount_all`]), including the safe idmapped overlay.
//! * [`fsutil`]: the one recursive remover, which never crosses a mount point.
//! * [`idmap`]: ID mappings and the user namespace that carries them.

pub mod fsutil;
pub mod idmap;
pub mod mount;
mod sys;
