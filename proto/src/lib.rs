//! Generated gRPC code for crisp.
//!
//! * [`cri`]: the Kubernetes CRI v1 `RuntimeService` and `ImageService` (client and server),
//!   from Kubernetes 1.36's `api.proto`: it has the user-namespace fields, `image_sub_path`
//!   and the newer status fields that the `k8s-cri` crate lacks.
//! * [`containerd`]: containerd's snapshots API (client and server), which containerd-client
//!   only generates as a client; `crisp-snapshotter` serves it as a proxy plugin.
//!
//! The ttrpc shim APIs (task v2/v3, sandbox, events) come from `containerd-shim-protos`.

#![allow(clippy::all, missing_docs)]

pub mod cri {
    pub mod v1 {
        tonic::include_proto!("runtime.v1");
    }
}

pub mod containerd {
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod snapshots {
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}
