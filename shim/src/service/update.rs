//! Update (resources), CloseIO and ResizePty.

use super::*;

impl TaskService {
    pub async fn update(&self, req: api::UpdateTaskRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let resources = req
            .resources
            .as_ref()
            .ok_or_else(|| TaskError::InvalidArgument("update without resources".into()))?;
        // containerd encodes runtime-spec types as JSON inside the Any.
        let path = c.bundle.join("update-resources.json");
        std::fs::write(&path, &resources.value).map_err(|e| internal!("{e}"))?;
        let res = c.runtime.update(&c.id, &path).await;
        let _ = std::fs::remove_file(&path);
        res.map_err(runtime_error)
    }

    pub fn close_io(&self, req: api::CloseIORequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if req.stdin {
            lock(&p.io).close_stdin();
        }
        Ok(())
    }

    pub fn resize_pty(&self, req: api::ResizePtyRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        lock(&p.io)
            .resize(req.width, req.height)
            .map_err(|e| TaskError::FailedPrecondition(e.to_string()))
    }
}
