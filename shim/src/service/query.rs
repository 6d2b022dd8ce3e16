//! The read-only calls: State, Wait, Pids, Stats, Connect.

use super::*;

impl TaskService {
    pub async fn state(&self, req: api::StateRequest) -> Result<api::StateResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let st = p.state.lock().await;
        let status = match st.status {
            ProcStatus::Created => Status::CREATED,
            ProcStatus::Running => Status::RUNNING,
            ProcStatus::Stopped => Status::STOPPED,
        };
        let mut resp = api::StateResponse {
            id: if p.exec_id.is_empty() {
                c.id.clone()
            } else {
                p.exec_id.clone()
            },
            bundle: c.bundle.display().to_string(),
            pid: st.pid as u32,
            status: EnumOrUnknown::new(status),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exec_id: p.exec_id.clone(),
            ..Default::default()
        };
        if let Some(e) = st.exited {
            resp.exit_status = e.status;
            resp.exited_at = MessageField::some(ts(e.at));
        }
        Ok(resp)
    }

    pub async fn wait(&self, req: api::WaitRequest) -> Result<api::WaitResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let mut rx = p.exited_tx.subscribe();
        let e = loop {
            if let Some(e) = *rx.borrow_and_update() {
                break e;
            }
            if rx.changed().await.is_err() {
                return Err(internal!("process vanished"));
            }
        };
        Ok(api::WaitResponse {
            exit_status: e.status,
            exited_at: MessageField::some(ts(e.at)),
            ..Default::default()
        })
    }

    pub async fn pids(&self, req: api::PidsRequest) -> Result<api::PidsResponse> {
        let c = self.container(&req.id)?;
        let pids = c.runtime.ps(&c.id).await.map_err(runtime_error)?;
        let mut execs = HashMap::new();
        let procs: Vec<Arc<Proc>> = lock(&c.execs).values().cloned().collect();
        for p in procs {
            let pid = p.state.lock().await.pid;
            execs.insert(pid as u32, p.exec_id.clone());
        }
        let processes = pids
            .into_iter()
            .map(|pid| {
                let mut info = api::ProcessInfo {
                    pid,
                    ..Default::default()
                };
                if let Some(exec_id) = execs.get(&pid) {
                    let d = ProcessDetails {
                        exec_id: exec_id.clone(),
                        ..Default::default()
                    };
                    if let Ok(any) = events::pack("type.googleapis.com/", &d) {
                        info.info = MessageField::some(any);
                    }
                }
                info
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    pub async fn stats(&self, req: api::StatsRequest) -> Result<api::StatsResponse> {
        let c = self.container(&req.id)?;
        let pid = c.init.state.lock().await.pid;
        let any = tokio::task::spawn_blocking(move || cgroup::stats(pid))
            .await
            .map_err(|e| internal!("{e}"))?
            .map_err(|e| TaskError::NotFound(e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    pub async fn connect(&self, req: api::ConnectRequest) -> Result<api::ConnectResponse> {
        let task_pid = match self.container(&req.id) {
            Ok(c) => c.init.state.lock().await.pid as u32,
            Err(_) => 0,
        };
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }
}
