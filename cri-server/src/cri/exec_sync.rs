//! ExecSync: run a command in a running container through its pod's shim and collect its
//! output, bounded (`container::exec`).

use std::sync::Arc;

use crisp_proto::cri::v1::{ExecSyncRequest, ExecSyncResponse};

use crate::container::service::ContainerService;
use crate::error::CriError;

pub async fn exec_sync(
    d: &Arc<ContainerService>,
    req: ExecSyncRequest,
) -> Result<ExecSyncResponse, CriError> {
    crate::container::exec::exec_sync(d, req).await
}
