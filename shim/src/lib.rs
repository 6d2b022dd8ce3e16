//! containerd-shim-crisp-v2, the per-pod containerd shim v2
