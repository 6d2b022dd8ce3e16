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
            self.init_running(&c, &mut st).await?;
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
        self.claim_early_exit(&c, &p, &mut st).await;
        Ok(api::StartResponse {
            pid: st.pid as u32,
            ..Default::default()
        })
    }

    /// The init process runs (started by Start, or by a Create that started it): its state,
    /// its start event and its OOM watch.
    pub(super) async fn init_running(&self, c: &Container, st: &mut ProcState) -> Result<()> {
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
        Ok(())
    }

    /// The process may have exited (and been reaped) before its pid was indexed; its start
    /// event is out, so its exit can follow now.
    pub(super) async fn claim_early_exit(&self, c: &Container, p: &Proc, st: &mut ProcState) {
        if let Some(exit) = Reaper::global().take_unclaimed(st.pid) {
            self.process_exited(c, p, st, exit).await;
        }
    }

    /// The runtime refuses an exec into a container whose init has just died (a kill the
    /// shim has not yet reported): that is the caller's stale view, not a fault of ours.
    async fn exec_refused(&self, c: &Container, e: RuntimeError) -> TaskError {
        let (pid, exited) = {
            let st = c.init.state.lock().await;
            (st.pid, st.exited.is_some())
        };
        if exited || !process_alive(pid) {
            return TaskError::FailedPrecondition(format!(
                "container {} has stopped (init pid {pid} is gone): {e}",
                c.id
            ));
        }
        runtime_error(e)
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
        if let Err(e) = res {
            return Err(self.exec_refused(c, e).await);
        }
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

/// A pid that is gone or a zombie no longer runs the container.
fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the last ')' (the command name may hold one).
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::process_alive;

    #[test]
    fn a_running_pid_is_alive_and_a_reaped_one_is_not() {
        assert!(process_alive(std::process::id() as i32));
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id() as i32;
        child.wait().expect("wait");
        assert!(
            !process_alive(pid),
            "reaped pid {pid} still counts as alive"
        );
        assert!(!process_alive(0));
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id() as i32;
        // Not waited for: once it exits it stays a zombie until the test ends.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while process_alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} never exited"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(child);
    }
}
