//! CreateTask: place the container in its cgroup, mount its rootfs, run the runtime's
//! `create` (or, when crispd asks for it, `run --detach`), register the init process.

use super::*;

/// What a failed create undoes, in reverse order of what was done (named undo steps).
struct CreateUndo {
    id: String,
    runtime: Runtime,
    rootfs: Option<PathBuf>,
}

impl CreateUndo {
    /// Undo, and hand back `why` for the caller's error.
    async fn run(&self, why: String) -> String {
        if let Err(e) = self.runtime.delete(&self.id, true).await {
            tracing::debug!(step = "runtime delete", error = %e, "undo");
        }
        if let Some(t) = &self.rootfs
            && let Err(e) = mount::unmount_all(t)
        {
            warn!(step = "unmount rootfs", error = %e, "undo");
        }
        why
    }
}

/// The one placement and the oom_score_adj floor, written into the bundle's spec.
fn place_in_spec(
    bundle: &Path,
    driver: crate::placement::CgroupDriver,
    id: &str,
) -> Result<String> {
    let mut oci = spec::read(bundle).map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
    let cgroups_path =
        spec::place(&mut oci, driver, id).map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
    if let Some(process) = oci.get_mut("process")
        && let Some((from, to)) = spec::restrict_oom_score_adj(
            process,
            spec::own_oom_score_adj(),
            spec::has_cap_sys_resource(),
        )
    {
        info!(
            from,
            to, "no CAP_SYS_RESOURCE: oom_score_adj raised to the shim's own"
        );
    }
    spec::write(bundle, &oci).map_err(|e| internal!("{e}"))?;
    Ok(cgroups_path)
}

/// The bundle's part of a create: the spec's placement, the rootfs mounts and the runtime
/// record. File I/O and mount(2), so it runs on a blocking thread, never on the shim's one
/// runtime thread. A failed record is returned for the caller to undo the rest.
fn prepare_bundle(
    bundle: &Path,
    driver: crate::placement::CgroupDriver,
    id: &str,
    rootfs: &[api::Mount],
    runtime: &Runtime,
) -> Result<(String, Option<PathBuf>, std::io::Result<()>)> {
    let cgroups_path = place_in_spec(bundle, driver, id)?;
    let rootfs = mount_rootfs(bundle, rootfs)?;
    let record = RuntimeRecord {
        binary: runtime.binary.clone(),
        root: runtime.root.clone(),
        systemd_cgroup: runtime.systemd_cgroup,
        rootfs_mounted: rootfs.is_some(),
    };
    let recorded = write_record(bundle, &record);
    Ok((cgroups_path, rootfs, recorded))
}

/// Mount the rootfs the request carries at `<bundle>/rootfs`; None when it brings none (the
/// spec names its own root).
fn mount_rootfs(bundle: &Path, rootfs: &[api::Mount]) -> Result<Option<PathBuf>> {
    let mounts = mount::from_proto(rootfs);
    let rootfs = (!mounts.is_empty()).then(|| bundle.join("rootfs"));
    if let Some(target) = &rootfs {
        std::fs::create_dir_all(target).map_err(|e| internal!("create rootfs dir: {e}"))?;
        mount::mount_all(&mounts, target).map_err(|e| internal!("mount rootfs: {e}"))?;
    }
    Ok(rootfs)
}

impl TaskService {
    pub async fn create(&self, req: api::CreateTaskRequest) -> Result<api::CreateTaskResponse> {
        let id = req.id.clone();
        if lock(&self.inner.containers).contains_key(&id) {
            return Err(TaskError::AlreadyExists(format!(
                "task {id} already exists"
            )));
        }
        let overrides = match req.options.as_ref() {
            Some(any) => {
                options::decode(any).map_err(|e| TaskError::InvalidArgument(e.to_string()))?
            }
            None => None,
        };
        let start = options::start_on_create(req.options.as_ref())
            .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let opts = options::merge(&self.inner.config.handler, overrides.as_ref());
        let driver = options::driver(&opts);
        let runtime = self.runtime_for(&opts)?;
        let bundle = PathBuf::from(&req.bundle);
        let (cgroups_path, rootfs, recorded) = {
            let (b, i, m, rt) = (
                bundle.clone(),
                id.clone(),
                req.rootfs.clone(),
                runtime.clone(),
            );
            let span = tracing::Span::current();
            let prepare = move || span.in_scope(|| prepare_bundle(&b, driver, &i, &m, &rt));
            tokio::task::spawn_blocking(prepare)
                .await
                .map_err(|e| internal!("prepare bundle: {e}"))??
        };
        info!(runtime = %runtime.binary.display(), %cgroups_path, %driver, "creating");
        let undo = CreateUndo {
            id: id.clone(),
            runtime: runtime.clone(),
            rootfs: rootfs.clone(),
        };
        if let Err(e) = recorded {
            return Err(internal!(
                "{}",
                undo.run(format!("record runtime: {e}")).await
            ));
        }
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let (pid, pio) = run_create(&undo, &bundle, &opts, &paths, start).await?;
        let c = Arc::new(Container {
            id: id.clone(),
            bundle,
            runtime,
            rootfs,
            init: Proc::new("", paths, None),
            execs: Mutex::default(),
        });
        *lock(&c.init.io) = pio;
        // Held until the events are out: an exit the reaper hands over waits for this lock,
        // so a process that `run` started and that died at once still exits after it started.
        let mut st = c.init.state.lock().await;
        st.pid = pid;
        lock(&self.inner.containers).insert(id.clone(), Arc::clone(&c));
        lock(&self.inner.pids).insert(pid, (id, String::new()));
        self.publish_create(req, pid).await;
        if start {
            self.init_running(&c, &mut st).await?;
            self.claim_early_exit(&c, &c.init, &mut st).await;
        }
        Ok(api::CreateTaskResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn publish_create(&self, req: api::CreateTaskRequest, pid: i32) {
        let ev = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint,
            pid: pid as u32,
            ..Default::default()
        };
        self.inner
            .events
            .publish(topics::TASK_CREATE_EVENT_TOPIC, ev)
            .await;
    }
}

/// Open the stdio, run the runtime's `create` (`run --detach` with `start`; with a console
/// socket for a terminal) and read the init's pid; any failure is undone before it is
/// returned.
async fn run_create(
    undo: &CreateUndo,
    bundle: &Path,
    opts: &Options,
    paths: &StdioPaths,
    start: bool,
) -> Result<(i32, ProcessIo)> {
    let (stdio, mut pio) = match io::open(paths) {
        Ok(x) => x,
        Err(e) => return Err(TaskError::InvalidArgument(undo.run(e.to_string()).await)),
    };
    let console = if paths.terminal {
        match Console::new() {
            Ok(c) => Some(c),
            Err(e) => return Err(internal!("{}", undo.run(e.to_string()).await)),
        }
    } else {
        None
    };
    let pid_file = bundle.join("init.pid");
    let console_path = console.as_ref().map(Console::path);
    let copts = CreateOpts {
        pid_file: &pid_file,
        console_socket: console_path.as_deref(),
        no_pivot: opts.no_pivot_root,
        no_new_keyring: opts.no_new_keyring,
    };
    let runtime = &undo.runtime;
    if let Err(e) = runtime.create(&undo.id, bundle, &copts, stdio, start).await {
        let mut msg = e.to_string();
        if let Some(why) =
            runtime::known_unusable(&runtime.binary.to_string_lossy(), runtime::cgroup_layout())
        {
            msg = format!("{msg} ({why})");
        }
        warn!(error = %msg, "create failed");
        return Err(TaskError::FailedPrecondition(undo.run(msg).await));
    }
    if let Some(console) = console {
        let attached = console
            .receive()
            .and_then(|m| io::attach_console(m, paths, &mut pio));
        if let Err(e) = attached {
            return Err(internal!("{}", undo.run(e.to_string()).await));
        }
    }
    match read_pid(&pid_file) {
        Ok(p) => Ok((p, pio)),
        Err(e) => Err(internal!("{}", undo.run(e).await)),
    }
}
