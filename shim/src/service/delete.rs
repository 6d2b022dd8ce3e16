//! Delete: a process that has exited, or the whole task (runtime delete, unmount).

use super::*;

impl TaskService {
    pub async fn delete(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse> {
        let c = self.container(&req.id)?;
        if !req.exec_id.is_empty() {
            let p = c.process(&req.exec_id)?;
            let st = p.state.lock().await;
            if st.status == ProcStatus::Running {
                return Err(TaskError::FailedPrecondition(format!(
                    "exec {} is still running",
                    req.exec_id
                )));
            }
            lock(&c.execs).remove(&req.exec_id);
            lock(&p.io).close_stdin();
            let e = st.exited.unwrap_or(Exited {
                status: 0,
                at: SystemTime::now(),
            });
            return Ok(api::DeleteResponse {
                pid: st.pid as u32,
                exit_status: e.status,
                exited_at: MessageField::some(ts(e.at)),
                ..Default::default()
            });
        }
        let mut st = c.init.state.lock().await;
        if st.status == ProcStatus::Running {
            return Err(TaskError::FailedPrecondition(format!(
                "task {} is still running",
                c.id
            )));
        }
        if let Err(e) = c.runtime.delete(&c.id, true).await {
            // A container the runtime no longer knows is already deleted.
            tracing::debug!(error = %e, "runtime delete");
        }
        if let Some(t) = &c.rootfs
            && let Err(e) = mount::unmount_all(t)
        {
            return Err(internal!("{e}"));
        }
        lock(&c.init.io).close_stdin();
        if st.status == ProcStatus::Created {
            // Never started: deleted before it ran. Report it like a kill.
            st.transition(ProcStatus::Stopped)?;
            st.exited = Some(Exited {
                status: 128 + 9,
                at: SystemTime::now(),
            });
            c.init.exited_tx.send_replace(st.exited);
        }
        lock(&self.inner.containers).remove(&c.id);
        lock(&self.inner.pids).retain(|_, (cid, _)| *cid != c.id);
        let e = st.exited.unwrap_or(Exited {
            status: 0,
            at: SystemTime::now(),
        });
        let ev = TaskDelete {
            container_id: c.id.clone(),
            pid: st.pid as u32,
            exit_status: e.status,
            exited_at: MessageField::some(ts(e.at)),
            id: c.id.clone(),
            ..Default::default()
        };
        self.inner
            .events
            .publish(topics::TASK_DELETE_EVENT_TOPIC, ev)
            .await;
        info!("deleted");
        Ok(api::DeleteResponse {
            pid: st.pid as u32,
            exit_status: e.status,
            exited_at: MessageField::some(ts(e.at)),
            ..Default::default()
        })
    }
}
