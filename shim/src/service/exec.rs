//! Exec: add a process to a running container (started by Start).

use super::*;

impl TaskService {
    pub async fn exec(&self, req: api::ExecProcessRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        if c.init.state.lock().await.status != ProcStatus::Running {
            return Err(TaskError::FailedPrecondition(format!(
                "task {} is not running",
                c.id
            )));
        }
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| TaskError::InvalidArgument("exec without a process spec".into()))?;
        for s in [&req.stdin, &req.stdout, &req.stderr] {
            if !io::is_supported(s) {
                return Err(TaskError::InvalidArgument(format!("unsupported stdio {s}")));
            }
        }
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        {
            let mut execs = lock(&c.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(TaskError::AlreadyExists(format!(
                    "exec {} already exists",
                    req.exec_id
                )));
            }
            execs.insert(
                req.exec_id.clone(),
                Proc::new(&req.exec_id, paths, Some(spec)),
            );
        }
        let ev = TaskExecAdded {
            container_id: c.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.inner
            .events
            .publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, ev)
            .await;
        Ok(())
    }
}
