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

/// Something a pod owns outside its record, each acquired by one RunPodSandbox step and
/// released by `pod::release`. Listed in acquisition order; released in reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Owned {
    /// A subordinate ID range (user-namespaced pods).
    IdRange,
    /// The pod's network namespace and its CNI attachment.
    Network,
    /// The pod directory and the files in it.
    Files,
    /// The pod's shim process and its socket.
    Shim,
    /// The pause process (the shim's sandbox).
    Pause,
}

impl Owned {
    /// Everything a pod can own, in acquisition order.
    pub const ALL: [Owned; 5] = [
        Self::IdRange,
        Self::Network,
        Self::Files,
        Self::Shim,
        Self::Pause,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::IdRange => "id range",
            Self::Network => "network",
            Self::Files => "pod files",
            Self::Shim => "shim",
            Self::Pause => "pause",
        }
    }
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
    /// What the pod owns and must release, added *before* each is acquired (so after a crash
    /// the record names everything that may exist). Absent in records of an older crispd:
    /// then everything is released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owned: Option<Vec<Owned>>,
}

impl PodRecord {
    /// What release must undo: the recorded list, or everything for an older record.
    pub fn owned(&self) -> Vec<Owned> {
        self.owned.clone().unwrap_or_else(|| Owned::ALL.to_vec())
    }

    /// Record that the pod is about to own `item` (stored by the caller).
    pub fn own(&mut self, item: Owned) {
        let list = self.owned.get_or_insert_with(Vec::new);
        if !list.contains(&item) {
            list.push(item);
        }
    }

    /// `item` is released: the pod no longer owns it.
    pub fn disown(&mut self, item: Owned) {
        if let Some(list) = self.owned.as_mut() {
            list.retain(|i| *i != item);
        } else {
            self.owned = Some(Owned::ALL.into_iter().filter(|i| *i != item).collect());
        }
    }
}

#[cfg(test)]
impl PodRecord {
    /// A bare record for tests: `id`, in `state`, named `n-<id>` in `default`; a fixture
    /// overrides what it cares about with `..PodRecord::for_test(..)`, so a new field is
    /// added here once instead of in every test.
    pub fn for_test(id: &str, state: PodState) -> PodRecord {
        PodRecord {
            id: id.into(),
            name: format!("n-{id}"),
            namespace: "default".into(),
            uid: format!("u-{id}"),
            attempt: 0,
            state,
            created_at: 1,
            runtime_handler: String::new(),
            config_pb: String::new(),
            netns_path: None,
            ips: vec![],
            shim_address: None,
            pause_pid: None,
            cgroup_parent: String::new(),
            owned: None,
        }
    }
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
    /// The image volumes crispd mounted for it (`container::image_volume`), released with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_volumes: Vec<ImageVolume>,
    /// The effective stop signal (`SIGTERM`): the config's over the image's STOPSIGNAL over
    /// SIGTERM, fixed at CreateContainer. None in records of an older crispd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
}

/// One image volume of a container: `mounts[index]`, a read-only view snapshot of an image
/// mounted at `mount_path`; `source` is what the container binds (a sub-directory of it when
/// `image_sub_path` chose one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageVolume {
    pub index: usize,
    /// The image as the mount named it, and its id (config digest): RemoveImage compares ids.
    pub image: String,
    pub image_id: String,
    /// The view snapshot's key.
    pub snapshot: String,
    pub mount_path: String,
    pub source: String,
}

#[cfg(test)]
impl ContainerRecord {
    /// A bare record for tests: container `id` (also its name) of pod `pod_id`, in `state`.
    pub fn for_test(id: &str, pod_id: &str, state: ContainerState) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            pod_id: pod_id.into(),
            name: id.into(),
            attempt: 0,
            state,
            created_at: 1,
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            image: String::new(),
            image_ref: String::new(),
            log_path: String::new(),
            config_pb: String::new(),
            pid: None,
            image_volumes: Vec::new(),
            stop_signal: None,
        }
    }
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
