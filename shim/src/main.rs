//! containerd-shim-crisp-v2: `start`, `delete` and serve mode of the shim v2
//! protocol. anyhow lives here, at the binary boundary only.

use std::{
    ffi::OsString,
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::{
        fd::{AsRawFd, RawFd},
        unix::{
            fs::{FileTypeExt, OpenOptionsExt},
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context, bail};
use containerd_shim::Flags;
use containerd_shim_protos::{
    api::DeleteResponse,
    protobuf::{
        Message, MessageField,
        well_known_types::{any::Any, timestamp::Timestamp},
    },
    ttrpc::r#async::{Server, transport::Listener},
};
use crisp_shim::{
    options,
    reaper::Reaper,
    runtime::{self, Runtime},
    sandbox::{self, SandboxService},
    service::{self, Config, Events, TaskService},
    spec,
};

/// Optional log for the server (tests, debugging): a file, or a directory in which each
/// shim writes `<id>.log` (the e2e harness keeps them when a test fails); otherwise the
/// bundle's `log` FIFO containerd reads.
const LOG_ENV: &str = "CRISP_SHIM_LOG";

// The static shim's linker (Makefile: shim/link-hot-first.sh) orders the code by
// shim/hot-symbols.txt, files cargo cannot see: naming them here makes them sources of this
// binary, so a new order relinks it (and only it; a build script's rerun would rebuild the
// library and everything that depends on it). Unused constants: nothing of them is linked.
const _LINK_ORDER: &str = include_str!("../hot-symbols.txt");
const _LINKER: &str = include_str!("../link-hot-first.sh");

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-crisp-v2: {e}");
            std::process::exit(2);
        }
    };
    let result = if flags.version {
        println!("containerd-shim-crisp-v2 {}", env!("CARGO_PKG_VERSION"));
        Ok(())
    } else if flags.info {
        info()
    } else {
        match flags.action.as_str() {
            "start" => start(&flags),
            "delete" => delete(&flags),
            // Serve mode run by hand (`-socket`), for debugging: the default handler.
            _ => serve(&flags, &flags.socket, Default::default()),
        }
    };
    if let Err(e) = result {
        eprintln!("containerd-shim-crisp-v2: {e:#}");
        std::process::exit(1);
    }
}

fn info() -> anyhow::Result<()> {
    let info = containerd_shim_protos::types::introspection::RuntimeInfo {
        name: "io.containerd.crisp.v2".into(),
        ..Default::default()
    };
    std::io::stdout().write_all(&info.write_to_bytes()?)?;
    Ok(())
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// `start`: print the address of the pod's shim, starting it if this is the
/// pod's first task. Tasks carrying the same `io.kubernetes.cri.sandbox-id`
/// share one socket (its name is derived from the sandbox id, as containerd's
/// own runc shim does), so they share one shim.
fn start(flags: &Flags) -> anyhow::Result<()> {
    let bundle = std::env::current_dir().context("current directory (the bundle)")?;
    let group = match spec::read(&bundle) {
        Ok(s) => spec::group_id(&s, &flags.id).to_string(),
        Err(_) => flags.id.clone(),
    };
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &group);
    let path = PathBuf::from(socket_path(&address));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // Serialise starts of one pod: without it a second start could take the
    // first one's fresh socket for a stale one and remove it.
    // One lock file for all pods, so no per-pod lock file is left behind.
    let lock_path = path
        .parent()
        .unwrap_or(Path::new("/"))
        .join("crisp-shim-start.lock");
    let lock_file = File::create(&lock_path).context("shim start lock")?;
    let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("lock shim start: {e}"))?;

    if UnixStream::connect(&path).is_err() {
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
            // Nobody listens: a shim that died left it behind.
            std::fs::remove_file(&path)
                .with_context(|| format!("remove stale socket {}", path.display()))?;
        }
        spawn_server(flags, &bundle, &address, lock.as_raw_fd())?;
    }
    std::fs::write(bundle.join("address"), &address).context("write address file")?;
    let mut out = std::io::stdout();
    out.write_all(address.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Forks the server off this process, which has just checked that no shim serves the pod.
/// A fork, not a second exec of the binary: the server is this very program, and an exec
/// would pay again for loading it and for glibc's start-up (a static binary probes the CPU's
/// caches with dozens of `cpuid`s, each a VM exit under a hypervisor: a quarter of a shim's
/// CPU time in a pod start on the benchmark's VM). This process has no other threads yet, so
/// the child may go on running Rust code; it leaves the caller's pipes and this process's
/// group at once, and closes its stdout (the pipe read here) once it listens.
fn spawn_server(flags: &Flags, bundle: &Path, address: &str, lock: RawFd) -> anyhow::Result<()> {
    // Runtime options arrive on stdin as a protobuf Any (containerd 1.6+).
    let mut input = Vec::new();
    if !nix::unistd::isatty(std::io::stdin()).unwrap_or(false) {
        let _ = std::io::stdin().take(10 << 20).read_to_end(&mut input);
    }
    let handler = Any::parse_from_bytes(&input)
        .ok()
        .filter(|a| !a.type_url.is_empty())
        .and_then(|a| options::decode(&a).ok().flatten())
        .unwrap_or_default();
    let (ready_r, ready_w) = nix::unistd::pipe().context("pipe for the server's readiness")?;
    // SAFETY: no other thread exists (no runtime is built before this point in `start`), so
    // the child's copy of the process is consistent; it only runs this program's own code.
    match unsafe { nix::unistd::fork() }.context("fork shim server")? {
        nix::unistd::ForkResult::Child => {
            drop(ready_r);
            let code = match become_server(flags, address, handler, ready_w, lock) {
                Ok(()) => 0,
                Err(e) => {
                    // To the shim's log if it has one, and to the readiness pipe if the
                    // server never got as far as closing it: `start` reports what it reads.
                    tracing::error!("shim server: {e:#}");
                    let _ = writeln!(std::io::stdout(), "{e:#}");
                    1
                }
            };
            std::process::exit(code);
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(ready_w);
            // The server closes its end once it listens (or when it dies).
            let mut ready = Vec::new();
            let _ = File::from(ready_r).read_to_end(&mut ready);
            if UnixStream::connect(socket_path(address)).is_err() {
                let status =
                    nix::sys::wait::waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
                bail!(
                    "shim server (pid {child}) did not start serving on {address} (status {status:?}): {}",
                    String::from_utf8_lossy(&ready).trim()
                );
            }
            std::fs::write(bundle.join("shim.pid"), child.to_string()).context("write shim.pid")?;
            Ok(())
        }
    }
}

/// The forked child's side: leave `start`'s lock, stdio and process group, then serve.
fn become_server(
    flags: &Flags,
    address: &str,
    handler: options::Options,
    ready: std::os::fd::OwnedFd,
    lock: RawFd,
) -> anyhow::Result<()> {
    // Close, never unlock: the lock belongs to `start`'s open file, which the parent still
    // holds until it has printed the address. (The parent's `Flock` is never dropped here:
    // this process ends in `exit`.)
    // SAFETY: `lock` is an open fd inherited from the parent; nothing else here uses it.
    unsafe { libc::close(lock) };
    // Stdout becomes the readiness pipe first (`signal_ready` points it at /dev/null), so
    // that an error from here on reaches `start`, not the caller reading the address.
    nix::unistd::dup2_stdout(&ready).context("stdout")?;
    drop(ready);
    // Its own process group: signals meant for the caller's group never reach it.
    nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))
        .context("setpgid")?;
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("/dev/null")?;
    nix::unistd::dup2_stdin(&null).context("stdin")?;
    nix::unistd::dup2_stderr(&null).context("stderr")?;
    serve(flags, address, handler)
}

/// `delete`: clean up after a task whose shim is gone.
fn delete(flags: &Flags) -> anyhow::Result<()> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir()?
    } else {
        PathBuf::from(&flags.bundle)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let runtime = match service::read_record(&bundle) {
            Some(r) => Runtime {
                binary: r.binary,
                root: r.root,
                systemd_cgroup: r.systemd_cgroup,
            },
            // The pod's own bundle: pause never ran under an OCI runtime.
            None if sandbox::read_record(&bundle).is_some() => return anyhow::Ok(()),
            None => Runtime::new(
                "runc",
                PathBuf::from("/run/crisp/runc").join(&flags.namespace),
                false,
            )?,
        };
        if let Err(e) = runtime.delete(&flags.id, true).await {
            eprintln!("delete {}: {e}", flags.id);
        }
        anyhow::Ok(())
    })?;
    // The rootfs under this bundle is the only mount the shim made for the task.
    crisp_shim::mount::unmount_all(&bundle.join("rootfs")).context("unmount rootfs")?;
    // A pod bundle: the pause died with the shim; its cgroup is left to remove.
    sandbox::cleanup_after_dead_shim(&bundle).context("remove the pause's cgroup")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let resp = DeleteResponse {
        pid: 0,
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: MessageField::some(Timestamp {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos() as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    std::io::stdout().write_all(&resp.write_to_bytes()?)?;
    Ok(())
}

fn init_logging(flags: &Flags) {
    let writer: Box<dyn Write + Send> = match std::env::var_os(LOG_ENV) {
        Some(p) => match OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_file(PathBuf::from(p), &flags.id))
        {
            Ok(f) => Box::new(f),
            Err(_) => Box::new(std::io::sink()),
        },
        // containerd reads the bundle's `log` FIFO and forwards it to its own log.
        // Non-blocking, so a reader that went away can never stall the shim.
        None => match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("log")
        {
            Ok(f) => Box::new(f),
            Err(_) => Box::new(std::io::sink()),
        },
    };
    // A plain level, not an EnvFilter: parsing even "info" into an EnvFilter
    // compiles regexes, code and heap every shim would carry for nothing.
    // RUST_LOG still counts when it is a bare level ("debug", "trace").
    use tracing_subscriber::filter::LevelFilter;
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(if flags.debug {
            LevelFilter::DEBUG
        } else {
            LevelFilter::INFO
        });
    let writer = Arc::new(Mutex::new(writer));
    let make = move || LockedWriter(writer.clone());
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(make)
        .try_init();
}

/// `CRISP_SHIM_LOG`'s file: the path itself, or `<path>/<id>.log` when it is a directory.
fn log_file(path: PathBuf, id: &str) -> PathBuf {
    if path.is_dir() {
        path.join(format!("{id}.log"))
    } else {
        path
    }
}

struct LockedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for LockedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // A lost log line is better than a shim blocked on its log.
        let _ = w.write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn serve(flags: &Flags, socket: &str, handler: options::Options) -> anyhow::Result<()> {
    if socket.is_empty() {
        bail!("serve mode needs -socket");
    }
    one_malloc_arena();
    init_logging(flags);
    // Subreaper: container processes re-parent to us when runc exits, so their
    // exits reach our reaper.
    nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
    // One thread: the shim mostly waits; blocking work has its own threads.
    // A few dozen fds at most (sockets, an eventfd per container): the default
    // epoll batch of 1024 events is a 12 KiB buffer for nothing.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_io_events_per_tick(64)
        .build()?;
    rt.block_on(async move {
        let span = tracing::info_span!("shim", namespace = %flags.namespace, id = %flags.id, pid = std::process::id());
        let _enter = span.enter();
        Reaper::global();
        let default_runtime = runtime::probe_default().await;
        let publisher = match std::env::var("TTRPC_ADDRESS") {
            Ok(addr) => Some(crisp_shim::events::Publisher::connect(&addr).await),
            Err(_) => None,
        };
        let shutdown = Arc::new(tokio::sync::Notify::new());
        let config = Config { namespace: flags.namespace.clone(), handler, default_runtime };
        let events = Events::new(publisher, &flags.namespace);
        let svc = TaskService::new(config, events.clone(), shutdown.clone());
        let sandbox = SandboxService::new(svc.clone(), events, shutdown.clone());

        let path = socket_path(socket).to_string();
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && UnixStream::connect(&path).is_ok() => {
                tracing::info!(%path, "another shim already serves this pod");
                return Ok(());
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("listen on {path}"))),
        };
        let listener = Listener::try_from(listener).context("ttrpc listener")?;
        let mut server = Server::new().add_listener(listener).register_service(service::services(svc))
            .register_service(sandbox::services(sandbox));
        server.start().await.context("start ttrpc server")?;
        tracing::info!(socket = %path, "serving");
        signal_ready();

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = shutdown.notified() => {}
            _ = term.recv() => tracing::info!("SIGTERM"),
        }
        let _ = server.shutdown().await;
        let _ = std::fs::remove_file(&path);
        tracing::info!("shim exits");
        anyhow::Ok(())
    })
}

/// glibc gives each thread that allocates an arena of its own (up to 8 per
/// core), each with its own free lists and dirty pages. The shim's threads
/// (reaper, OOM watchers, pause keeper, blocking pool) allocate little and
/// rarely at once, so they share the main heap. Called before any thread starts.
fn one_malloc_arena() {
    // SAFETY: mallopt(3) only sets an allocator parameter; the return value
    // (0 when refused) needs no handling, the default is merely less frugal.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// Closes stdout (by pointing it at /dev/null), which `start` waits for.
fn signal_ready() {
    if let Ok(null) = File::options().write(true).open("/dev/null") {
        let mut stdout = std::io::stdout();
        let _ = nix::unistd::dup2_stdout(&null).map(|_| stdout.flush());
    }
}
