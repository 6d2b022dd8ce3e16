//! Overlay snapshotter with safe idmapped layer mounts, and the crisp-snapshotter containerd proxy plugin
