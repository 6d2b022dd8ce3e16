//! crispd, the CRI daemon: serves the Kubernetes CRI v1 RuntimeService and ImageService on a
//! unix socket, runs each pod in a containerd-style shim, and keeps its state in one store.
//!
//! Start-up order and what each module owns are described in `startup` and in
//! `docs/design.md`, which draws the layers: `server → cri → domain (pod, container, stats)
//! → store / shim client / network → error`; no module below `cri/` imports `cri`, `server`
//! or `startup`.
//!
//! | module | owns |
//! |---|---|
//! | `startup` | the named phases: parse config → open store → snapshotter → recover → cni → serve |
//! | `server` | the tonic services: one span per call, handed to `cri/` through `instrument` |
//! | `instrument` | the one error-kind → gRPC-code mapping; call entry/exit logs; call metrics |
//! | `metrics` | the daemon's call counters; Prometheus text on a loopback port |
//! | `cri/` | one thin file per CRI call or family: check, lock, re-read, call the domain |
//! | `daemon` | the pod, container and image services, assembled once |
//! | `pod/` | set-up steps, the one release, recovery, status, the shim watch, pod files, ID ranges |
//! | `container/` | lifecycle and registry, status, exec, resource updates, the OCI spec, bundle, logs, image volumes, CDI devices |
//! | `stats/` | container and pod figures, CPU rates, the cAdvisor-named pod metrics |
//! | `cgroup/` | a cgroup's files (v1/v2) under a root: pod and container dirs, limits written and read back |
//! | `shim/` | the shim client (start protocol, ttrpc, typed call error) and the events endpoint |
//! | `network/` | CNI config, plugin chains and result cache; named netns |
//! | `store/` | `<root>/crisp.db` (redb): versioned records, quarantine of undecodable ones |
//! | `config` | the TOML file, CLI flags, validation naming key and value |
//! | `runtime_features` | what each handler's OCI runtime supports (`<runtime> features`), for Status |
//! | `locks`, `inflight` | per-object locks; single flight for retried slow calls |
//! | `authority` | HTTP/2 `:authority` fix-up for grpc-go < 1.53 clients (kubelet ≤ 1.27) |
//! | `error` | error kinds (`HasKind`) and the CRI error; no gRPC, no metrics |
//! | `stream` | exec, attach and port-forward sessions behind the stream server (`crisp-stream`) |
//!
//! Pods run through the shim's sandbox service (the pause), containers through its task
//! service.

pub mod authority;
pub mod cgroup;
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
pub mod runtime_features;
pub mod server;
pub mod shim;
pub mod startup;
pub mod stats;
pub mod store;
pub mod stream;
pub mod util;
