//! Containers below the CRI handlers: the lifecycle on the pod's shim with its registry of
//! locks, log copiers and exit watchers (`lifecycle`), records as CRI status (`status`), the
//! OCI spec as a pure function (`spec`), image volumes (`image_volume`), CDI devices (`cdi`), the bundle directory (`bundle`), CRI log files
//! (`logs`) with the attach hubs their copiers feed (`attach`), ExecSync (`exec`) and
//! resource updates (`resources`).

pub mod attach;
pub mod bundle;
pub mod cdi;
pub mod exec;
pub mod image_volume;
pub mod lifecycle;
pub mod logs;
pub mod registry;
pub mod resources;
pub mod service;
pub mod spec;
pub mod status;
