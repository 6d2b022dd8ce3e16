//! End-to-end test harness: a CRI client that drives any runtime, test images, a local registry
