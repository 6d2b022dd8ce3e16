//! Version: who we are and which CRI API we speak.

use crisp_proto::cri::v1::{VersionRequest, VersionResponse};

use crate::error::CriError;

pub const RUNTIME_NAME: &str = "crisp";
/// The CRI API version (`v1`), as containerd reports it.
pub const RUNTIME_API_VERSION: &str = "v1";
/// The kubelet-facing "version" field; containerd and CRI-O report 0.1.0 here.
pub const KUBE_API_VERSION: &str = "0.1.0";

pub async fn version(_req: VersionRequest) -> Result<VersionResponse, CriError> {
    Ok(VersionResponse {
        version: KUBE_API_VERSION.into(),
        runtime_name: RUNTIME_NAME.into(),
        runtime_version: env!("CARGO_PKG_VERSION").into(),
        runtime_api_version: RUNTIME_API_VERSION.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_crisp_v1() {
        let v = version(VersionRequest::default()).await.expect("ok");
        assert_eq!(v.runtime_name, "crisp");
        assert_eq!(v.runtime_api_version, "v1");
        assert!(!v.runtime_version.is_empty());
    }
}
