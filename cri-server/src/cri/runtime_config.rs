//! RuntimeConfig: tells kubelet which cgroup driver we use, so it need not be configured twice.

use crisp_proto::cri::v1::{
    CgroupDriver as PbDriver, LinuxRuntimeConfiguration, RuntimeConfigRequest,
    RuntimeConfigResponse,
};

use crate::config::{CgroupDriver, Config};
use crate::error::CriError;

pub async fn runtime_config(
    cfg: &Config,
    _req: RuntimeConfigRequest,
) -> Result<RuntimeConfigResponse, CriError> {
    let driver = match cfg.cgroup_driver {
        CgroupDriver::Cgroupfs => PbDriver::Cgroupfs,
        CgroupDriver::Systemd => PbDriver::Systemd,
    };
    Ok(RuntimeConfigResponse {
        linux: Some(LinuxRuntimeConfiguration {
            cgroup_driver: driver as i32,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_configured_driver() {
        let mut cfg = Config::default();
        let r = runtime_config(&cfg, RuntimeConfigRequest {})
            .await
            .expect("ok");
        assert_eq!(
            r.linux.map(|l| l.cgroup_driver),
            Some(PbDriver::Cgroupfs as i32)
        );
        cfg.cgroup_driver = CgroupDriver::Systemd;
        let r = runtime_config(&cfg, RuntimeConfigRequest {})
            .await
            .expect("ok");
        assert_eq!(
            r.linux.map(|l| l.cgroup_driver),
            Some(PbDriver::Systemd as i32)
        );
    }
}
