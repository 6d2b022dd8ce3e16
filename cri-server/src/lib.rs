//! crispd, the CRI daemon: serves the Kubernetes CRI v1 RuntimeService and ImageService on a
//! unix socket, runs each pod in a containerd-style shim, and keeps its state in one store.
//!
//! Start-up order and what each module owns are described in `startup` and in
//! `docs/design.md`.
//!
//! | module | owns |
//! |---|---|
//! | `config` | the TOML file, CLI flags, validation naming key and value |
//! | `startup` | the named phases: parse config → open store → snapshotter → recover → cni → serve |
//! | `store` | `<root>/crisp.db` (redb): versioned records, quarantine of undecodable ones |
//! | `idmap` | pod ID ranges from subuid/subgid, one store transaction per allocation |
//! | `cni`, `netns` | network config discovery and polling, plugin chains, result cache; named netns |
//! | `spec` | the OCI spec as a pure function of pod, container and image config |
//! | `logs` | CRI-format container log files |
//! | `recover` | start-up: orphans (ID ranges, netns, CNI attachments, records, shims), pods reconnected to their shims or marked NotReady |
//! | `shim_client` | the shim v2 `start` protocol; one ttrpc connection per pod (task + sandbox services) |
//! | `shim_events` | crispd's ttrpc events endpoint the shims publish task exits / OOMs to |
//! | `pod_watch` | one WaitSandbox per ready pod: a dead shim or pause makes the pod NotReady |
//! | `pod_stats` | PodSandboxStats from the pod's cgroup and the pause's eth0 |
//! | `daemon` | what the calls share: config, store, services, per-pod locks, event channels |
//! | `sandbox_files` | the pod's hostname, hosts and resolv.conf |
//! | `bundle` | a container's bundle directory and its `config.json` |
//! | `authority` | HTTP/2 `:authority` fix-up for grpc-go < 1.53 clients (kubelet ≤ 1.27) |
//! | `inflight` | single flight for retried slow calls (RunPodSandbox) |
//! | `error` | error kinds (`HasKind`) and the CRI error; no gRPC, no metrics |
//! | `instrument` | the one error-kind → gRPC-code mapping; call entry/exit logs and metrics |
//! | `server`, `cri/` | the tonic services; one file per CRI call or family |
//! | `metrics` | Prometheus text on a loopback port |
//!
//! Pods run through the shim's sandbox service (the pause), containers through its task
//! service. Streaming calls (Exec, Attach, PortForward) belong to a later issue.

pub mod authority;
pub mod config;
pub mod container;
pub mod cri;
pub mod daemon;
pub mod error;
pub mod inflight;
pub mod instrument;
pub mod locks;
pub mod metrics;
pub mod network;
pub mod pod;
pub mod server;
pub mod shim;
pub mod startup;
pub mod stats;
pub mod store;
pub mod util;
