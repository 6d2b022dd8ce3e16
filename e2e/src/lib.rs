//! End-to-end test harness: a CRI client that drives any runtime (crispd or containerd),
//! the test images and the local registry that serves them, and the leak check.
//!
//! Everything a test starts lives under its own temporary root, socket, port, subnet and
//! cgroup parent, and is torn down on drop, even when the test fails.

// Unit tests may unwrap: a panic there is the failure report.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod containerd;
pub mod cri;
pub mod harness;
pub mod images;
pub mod leaks;
pub mod registry;
