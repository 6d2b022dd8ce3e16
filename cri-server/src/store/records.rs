//! The records crispd keeps in its store. Each is versioned (see [`super::Record`]); change a
//! field incompatibly and the version goes up.
//!
//! CRI configs are kept as their protobuf encoding (hex in the JSON) rather than mirrored in
//! serde structs: the CRI message is the source of truth, and a field kubelet adds later
//! survives a round trip through the store.

use serde::{Deserialize, Serialize};

use super::{CONTAINERS, ID_RANGES, PODS, Record, SHIMS, Table};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodState {
    /// Reserved (name taken), being set up.
    Creating,
    Ready,
    NotReady,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodRecord {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub attempt: u32,
    pub state: PodState,
    /// Nanoseconds since the epoch.
    pub created_at: i64,
    pub runtime_handler: String,
    /// `PodSandboxConfig`, protobuf-encoded, hex.
    pub config_pb: String,
    /// Our network namespace (bind mount under `<state>/netns`), if the pod has its own.
    pub netns_path: Option<String>,
    pub ips: Vec<String>,
    /// Where the pod's shim listens (ttrpc address), once started.
    pub shim_address: Option<String>,
    /// Pid of the pause process, for joining namespaces.
    pub pause_pid: Option<u32>,
    pub cgroup_parent: String,
}

impl Record for PodRecord {
    const TABLE: Table = PODS;
    const VERSION: u32 = 1;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerState {
    Created,
    Running,
    Exited,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub pod_id: String,
    pub name: String,
    pub attempt: u32,
    pub state: ContainerState,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    pub image: String,
    pub image_ref: String,
    pub log_path: String,
    /// `ContainerConfig`, protobuf-encoded, hex.
    pub config_pb: String,
    pub pid: Option<u32>,
}

impl Record for ContainerRecord {
    const TABLE: Table = CONTAINERS;
    const VERSION: u32 = 1;
}

/// One pod's slice of the subordinate ID space (promise 1). Keyed by pod id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRangeRecord {
    /// First host uid / gid of the pod's range; container ID 0 maps to these.
    pub host_uid: u32,
    pub host_gid: u32,
    pub len: u32,
}

impl Record for IdRangeRecord {
    const TABLE: Table = ID_RANGES;
    const VERSION: u32 = 1;
}

/// A running shim, keyed by pod id: enough to reconnect after crispd restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimRecord {
    pub address: String,
    pub pid: Option<u32>,
    pub bundle: String,
}

impl Record for ShimRecord {
    const TABLE: Table = SHIMS;
    const VERSION: u32 = 1;
}
