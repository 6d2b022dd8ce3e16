//! End-to-end test harness: a CRI client that drives any runtime (crispd or containerd),
//! the test images and the local registry that serves them, and the leak check.
//!
//! Everything a test starts lives under its own temporary root, socket, port, subnet and
//! cgroup parent, and is torn down on drop, even when the test fails.
//!
//! A test, the same for every runtime (see `tests/lifecycle.rs`):
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use crisp_e2e::{cri::container_config, harness::{RuntimeKind, TestEnv}, registry::Registry};
//! let registry = Registry::start()?; // declared first: dropped after the env
//! registry.push(&["busybox", "pause"])?;
//! let env = TestEnv::start(RuntimeKind::Containerd, &registry.host()).await?;
//! let pod = env.pod_config("demo")?; // unique name/uid/namespace, the env's cgroup parent
//! let pod_id = env.cri().run_pod(&pod).await?;
//! // ... CreateContainer with container_config(..), wait_container_exit, read_log ...
//! let leaks = env.teardown().await; // or just drop it (also on panic)
//! assert!(leaks.is_empty(), "{leaks:#?}");
//! # Ok(()) }
//! ```
//!
//! Environment: `CRISP_E2E_TMPDIR` (where roots go, default /var/tmp), `CRISP_E2E_KEEP_LOGS=1`
//! (keep every daemon log in /var/tmp/crisp-e2e-logs; a failing or leaking test keeps its log
//! anyway), `CONTAINERD_BIN`, `CRISP_BIN` (crispd; default: next to the test binary's
//! target dir). Host paths the harness uses outside the root: /run/crisp-e2e (subnet locks),
//! /run/containerd/s (containerd 1.6 shim sockets, removed by hash), /var/lib/cni/results
//! (libcni's cache, removed by network name or netns path).

// Unit tests may unwrap: a panic there is the failure report.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod containerd;
pub mod cri;
pub mod elf;
pub mod harness;
pub mod images;
pub mod leaks;
pub mod oci_build;
pub mod procfs;
pub mod registry;
