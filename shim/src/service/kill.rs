//! Kill: signal a process through the runtime.

use super::*;

impl TaskService {
    pub async fn kill(&self, req: api::KillRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let st = p.state.lock().await;
        if p.exec_id.is_empty() {
            if st.status == ProcStatus::Stopped && !req.all {
                return Err(TaskError::NotFound(format!(
                    "task {} has already exited",
                    c.id
                )));
            }
            return match c.runtime.kill(&c.id, req.signal, req.all).await {
                Ok(()) => Ok(()),
                Err(RuntimeError::Failed { message, .. })
                    if message.contains("not running") || message.contains("does not exist") =>
                {
                    Err(TaskError::NotFound(format!("task {}: {message}", c.id)))
                }
                Err(e) => Err(runtime_error(e)),
            };
        }
        if st.status != ProcStatus::Running {
            return Err(TaskError::NotFound(format!(
                "exec {} is not running",
                p.exec_id
            )));
        }
        let sig = nix::sys::signal::Signal::try_from(req.signal as i32)
            .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        // The pid cannot be reused: it is our child and not reaped while Running
        // (the reaper's exit goes through this same lock first).
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(st.pid), sig)
            .map_err(|e| internal!("kill {}: {e}", st.pid))
    }
}
