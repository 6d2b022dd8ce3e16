//! Start: the init process or an exec'd one.

use super::*;

impl TaskService {
    pub async fn start(&self, req: api::StartRequest) -> Result<api::StartResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let mut st = p.state.lock().await;
        if st.status != ProcStatus::Created {
            return Err(TaskError::FailedPrecondition(format!(
                "process is {:?}, not created",
                st.status
            )));
        }
        if p.exec_id.is_empty() {
            c.runtime.start(&c.id).await.map_err(runtime_error)?;
            st.transition(ProcStatus::Running)?;
            let ev = TaskStart {
                container_id: c.id.clone(),
                pid: st.pid as u32,
                ..Default::default()
            };
            self.inner
                .events
                .publish(topics::TASK_START_EVENT_TOPIC, ev)
                .await;
            let oom_tx = self.inner.oom_tx.clone();
            let cid = c.id.clone();
            if let Err(e) = cgroup::watch_oom(st.pid, move || {
                let _ = oom_tx.send(cid.clone());
            }) {
                warn!(error = %e, "no OOM events for this task");
            }
        } else {
            let pid = self.start_exec(&c, &p).await?;
            st.pid = pid;
            st.transition(ProcStatus::Running)?;
            lock(&self.inner.pids).insert(pid, (c.id.clone(), p.exec_id.clone()));
            let ev = TaskExecStarted {
                container_id: c.id.clone(),
                exec_id: p.exec_id.clone(),
                pid: pid as u32,
                ..Default::default()
            };
            self.inner
                .events
                .publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, ev)
                .await;
        }
        // The process may have exited (and been reaped) before it was indexed;
        // its start event is out, so its exit can follow now.
        let pid = st.pid;
        if let Some(exit) = Reaper::global().take_unclaimed(pid) {
            self.process_exited(&c, &p, &mut st, exit).await;
        }
        Ok(api::StartResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn start_exec(&self, c: &Container, p: &Proc) -> Result<i32> {
        let spec_path = c.bundle.join(format!("exec-{}.json", p.exec_id));
        let pid_file = c.bundle.join(format!("exec-{}.pid", p.exec_id));
        let mut process: serde_json::Value =
            serde_json::from_slice(p.exec_spec.as_deref().unwrap_or(b"{}"))
                .map_err(|e| TaskError::InvalidArgument(format!("exec spec: {e}")))?;
        spec::restrict_oom_score_adj(
            &mut process,
            spec::own_oom_score_adj(),
            spec::has_cap_sys_resource(),
        );
        let bytes = serde_json::to_vec(&process).map_err(|e| internal!("{e}"))?;
        std::fs::write(&spec_path, bytes).map_err(|e| internal!("write exec spec: {e}"))?;
        let (stdio, mut pio) =
            io::open(&p.stdio).map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let console = if p.stdio.terminal {
            Some(Console::new().map_err(|e| internal!("{e}"))?)
        } else {
            None
        };
        let console_path = console.as_ref().map(Console::path);
        let copts = CreateOpts {
            pid_file: &pid_file,
            console_socket: console_path.as_deref(),
            no_pivot: false,
            no_new_keyring: false,
        };
        let res = c.runtime.exec(&c.id, &spec_path, &copts, stdio).await;
        let _ = std::fs::remove_file(&spec_path);
        res.map_err(runtime_error)?;
        if let Some(console) = console {
            console
                .receive()
                .and_then(|m| io::attach_console(m, &p.stdio, &mut pio))
                .map_err(|e| internal!("{e}"))?;
        }
        *lock(&p.io) = pio;
        let pid = read_pid(&pid_file).map_err(|e| internal!("{e}"))?;
        let _ = std::fs::remove_file(&pid_file);
        Ok(pid)
    }
}
