//! Starting the pod's pause process without an OCI runtime: join the
//! namespaces the spec names, clone into the new ones, place the child in its
//! cgroup and set its oom_score_adj (and user namespace maps) while it waits
//! on a pipe, then let it set hostname and sysctls and exec the embedded pause.
//!
//! The child runs between clone and exec in a copy of a multi-threaded process:
//! it may only make raw system calls on data prepared before the clone (no
//! allocation, no locks). Everything it needs is in [`ChildArgs`].

use std::{
    ffi::{CString, c_char},
    fs::File,
    io::{self, Read, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use super::plan::{IdMap, NsAction, Plan};
use crate::cgroup;

/// The static pause binary built by build.rs from shim/pause/pause.c.
static PAUSE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pause"));

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("load the pause binary: {0}")]
    Load(io::Error),
    #[error("join {ns} namespace {path}: {err}")]
    Join {
        ns: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    #[error("sysctl {key}: {err}")]
    Sysctl { key: String, err: io::Error },
    #[error("{what}: {err}")]
    Setup { what: String, err: io::Error },
    #[error("pause child failed to {step}: {err}")]
    Child { step: &'static str, err: io::Error },
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("spawn thread: {0}")]
    Thread(String),
}

/// An executable fd of the pause binary: a sealed memfd, or (where memfd
/// exec is refused) a file written once under `fallback_dir`.
pub struct PauseBinary {
    fd: OwnedFd,
}

const MFD_CLOEXEC: u32 = 0x1;
const MFD_ALLOW_SEALING: u32 = 0x2;
/// Linux 6.3+: ask for an executable memfd even when vm.memfd_noexec says otherwise.
const MFD_EXEC: u32 = 0x10;

/// memfd_create(2).
fn memfd_create(name: &str, flags: u32) -> io::Result<OwnedFd> {
    let name = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_create, name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

impl PauseBinary {
    pub fn load(fallback_dir: &Path) -> Result<PauseBinary, SpawnError> {
        match Self::memfd() {
            Ok(fd) => Ok(PauseBinary { fd }),
            Err(e) => {
                tracing::warn!(error = %e, "memfd for pause refused; writing it to a file");
                Self::file(fallback_dir)
                    .map(|fd| PauseBinary { fd })
                    .map_err(SpawnError::Load)
            }
        }
    }

    fn memfd() -> io::Result<OwnedFd> {
        let fd = match memfd_create("crisp-pause", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_EXEC) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                memfd_create("crisp-pause", MFD_CLOEXEC | MFD_ALLOW_SEALING)?
            }
            other => other?,
        };
        let mut f = File::from(fd);
        f.write_all(PAUSE)?;
        // Sealed: nothing in the shim (or anything it runs) can change pause.
        let seals =
            libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
        // SAFETY: fcntl on an fd we own with an integer argument.
        if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from(f))
    }

    fn file(dir: &Path) -> io::Result<OwnedFd> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("pause-{}", PAUSE.len()));
        if std::fs::read(&path).ok().as_deref() != Some(PAUSE) {
            let tmp = dir.join(format!(".pause-{}.tmp", std::process::id()));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o755)
                .open(&tmp)?;
            f.write_all(PAUSE)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &path)?;
        }
        Ok(OwnedFd::from(File::open(&path)?))
    }
}

/// A started pause.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    /// Signals go through the pidfd, so they can never hit a recycled pid.
    pub pidfd: OwnedFd,
    /// Where the time went, in microseconds (logged with the start).
    pub phases: Vec<(&'static str, u64)>,
    /// Keeps the thread that cloned pause alive; see [`Keeper`].
    pub keeper: Keeper,
}

/// pause has PR_SET_PDEATHSIG=SIGKILL, which fires when the *thread* that
/// cloned it ends: so that thread parks until this is dropped (pause exited),
/// and a shim that dies (even by SIGKILL) takes its pod's pause with it, as
/// containerd's `shim delete` would.
#[derive(Debug)]
pub struct Keeper(#[allow(dead_code)] std::sync::mpsc::Sender<()>);

struct Started {
    pid: i32,
    pidfd: OwnedFd,
    phases: Vec<(&'static str, u64)>,
}

/// pidfd_send_signal(2); an exited process is not an error.
pub fn signal(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: a valid pidfd, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// What the child reads between clone and exec: only raw pointers into
/// buffers owned by the parent's stack frame, which the clone copied.
struct ChildArgs {
    sync_r: RawFd,
    err_w: RawFd,
    exe: RawFd,
    hostname: Option<CString>,
    /// (path, value) of sysctls of the namespaces the child creates.
    sysctls: Vec<(CString, CString)>,
    /// In a new user namespace: become its root (mapped) before anything else,
    /// since namespaced sysctls check the euid against the namespace's root.
    ns_root: bool,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    /// `argv[0]` points into `argv0` (a CString's buffer stays put when the struct moves).
    argv0: CString,
    argv: [*const c_char; 2],
    envp: [*const c_char; 1],
    empty: CString,
}

/// Child steps, reported back through the error pipe.
const STEPS: [&str; 10] = [
    "wait for the shim",
    "set the hostname",
    "write a sysctl",
    "set groups",
    "set gid",
    "set uid",
    "exec pause",
    "become root of its user namespace",
    "set its parent-death signal",
    "set no_new_privs",
];

/// Runs in the child: raw syscalls only (no allocation, no lock: the clone copied one thread
/// of a multi-threaded process), one named step each, in this order. Never returns.
fn child_main(a: &ChildArgs) -> ! {
    wait_for_parent(a);
    if a.ns_root {
        become_ns_root(a);
    }
    set_hostname(a);
    write_sysctls(a);
    set_ids_and_drop_caps(a);
    set_parent_death_signal(a);
    set_no_new_privs(a);
    exec_pause(a)
}

/// Report the failed step and errno on the error pipe and exit.
fn fail(a: &ChildArgs, step: usize) -> ! {
    // SAFETY: errno location is thread-local and always valid.
    let errno = unsafe { *libc::__errno_location() };
    let msg = [(step as i32).to_ne_bytes(), errno.to_ne_bytes()].concat_array();
    // SAFETY: write/_exit are async-signal-safe; msg lives on this stack.
    unsafe {
        libc::write(a.err_w, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// Step 0: block until the shim has written the id maps, oom_score_adj and cgroups.
fn wait_for_parent(a: &ChildArgs) {
    let mut b = [0u8; 1];
    // SAFETY: read(2) on the sync pipe's read end (open, owned by this process) into a
    // one-byte stack buffer.
    if unsafe { libc::read(a.sync_r, b.as_mut_ptr().cast(), 1) } != 1 {
        fail(a, 0);
    }
}

/// Step 7: in a new user namespace, become its root (the maps are written by now).
fn become_ns_root(a: &ChildArgs) {
    // SAFETY: raw setresgid/setresuid syscalls with integer arguments, this thread only.
    if unsafe { raw_setresgid(0) < 0 || raw_setresuid(0) < 0 } {
        fail(a, 7);
    }
}

/// Step 1: the pod's hostname, in its own UTS namespace.
fn set_hostname(a: &ChildArgs) {
    if let Some(h) = &a.hostname
        // SAFETY: `h` is a CString prepared before the clone; the length excludes the NUL.
        && unsafe { libc::sethostname(h.as_ptr(), h.as_bytes().len()) } < 0
    {
        fail(a, 1);
    }
}

/// Step 2: the sysctls of the namespaces the child created, written from inside them.
fn write_sysctls(a: &ChildArgs) {
    for (path, value) in &a.sysctls {
        // SAFETY: `path` is a CString prepared before the clone; the fd is checked.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            fail(a, 2);
        }
        let v = value.as_bytes();
        // SAFETY: write(2) of a buffer prepared before the clone to the fd opened above,
        // which is then closed.
        let written = unsafe { libc::write(fd, v.as_ptr().cast(), v.len()) };
        // SAFETY: closes the fd opened above, used by nothing else.
        unsafe { libc::close(fd) };
        if written != v.len() as isize {
            fail(a, 2);
        }
    }
}

/// Steps 3, 4, 5: groups and gid, then (while CAP_SETPCAP is still held) an empty bounding
/// set, so even a root pause execs with no capabilities, then the uid.
fn set_ids_and_drop_caps(a: &ChildArgs) {
    // SAFETY: the raw setgroups syscall (see [`raw_setresuid`] for why not glibc's);
    // `groups` is a Vec prepared before the clone; its pointer and length agree.
    if unsafe { libc::syscall(libc::SYS_setgroups, a.groups.len(), a.groups.as_ptr()) } < 0 {
        fail(a, 3);
    }
    // SAFETY: raw setresgid with integer arguments; changes only this thread's gids.
    if unsafe { raw_setresgid(a.gid) } < 0 {
        fail(a, 4);
    }
    // Numbers past the kernel's last capability fail with EINVAL: ignored.
    for cap in 0..64 {
        // SAFETY: prctl(PR_CAPBSET_DROP) with integer arguments; affects only this process.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
    }
    // SAFETY: raw setresuid with integer arguments; changes only this thread's uids.
    if unsafe { raw_setresuid(a.uid) } < 0 {
        fail(a, 5);
    }
}

/// Step 8: die with the shim's keeper thread (set after the id changes, which clear it).
fn set_parent_death_signal(a: &ChildArgs) {
    let sig = libc::SIGKILL as libc::c_ulong;
    // SAFETY: prctl(PR_SET_PDEATHSIG) with integer arguments; affects only this process.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig, 0, 0, 0) } < 0 {
        fail(a, 8);
    }
}

/// Step 9: no privilege can be gained through exec from here on.
fn set_no_new_privs(a: &ChildArgs) {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) with integer arguments; affects only this process.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) } < 0 {
        fail(a, 9);
    }
}

/// Step 6: exec the pause binary from its memfd; returning at all is the failure.
fn exec_pause(a: &ChildArgs) -> ! {
    // SAFETY: execveat on the pause memfd (open in this process) with an empty path and
    // AT_EMPTY_PATH; argv and envp are NULL-terminated arrays prepared before the clone,
    // pointing at CStrings that live as long as `a`.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            a.exe,
            a.empty.as_ptr(),
            a.argv.as_ptr(),
            a.envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
    }
    fail(a, 6)
}

/// setresuid(2) as the raw syscall, for this thread only. glibc's wrappers (setresuid,
/// setresgid, setgroups) run its "setxid" protocol: they take glibc's thread-list lock and
/// signal every thread glibc believes exists. The child comes from a raw clone3, so glibc
/// still lists the shim's threads and that lock may have been held by one of them at the
/// clone (a thread starting or exiting): the child then blocks forever before exec, the
/// shim's StartSandbox never answers and the pod's cgroup stays busy. The child is the only
/// thread of its process, so the per-thread syscall is exactly what it needs.
///
/// # Safety
/// A plain syscall with integer arguments.
unsafe fn raw_setresuid(id: libc::uid_t) -> libc::c_long {
    // SAFETY: integer arguments only; see the function's doc.
    unsafe { libc::syscall(libc::SYS_setresuid, id, id, id) }
}

/// setresgid(2) as the raw syscall; see [`raw_setresuid`] for why.
///
/// # Safety
/// A plain syscall with integer arguments.
unsafe fn raw_setresgid(id: libc::gid_t) -> libc::c_long {
    // SAFETY: integer arguments only; see [`raw_setresuid`].
    unsafe { libc::syscall(libc::SYS_setresgid, id, id, id) }
}

/// `[[u8; 4]; 2]` → `[u8; 8]` without allocating (the child may not allocate).
trait ConcatArray {
    fn concat_array(self) -> [u8; 8];
}
impl ConcatArray for [[u8; 4]; 2] {
    fn concat_array(self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&self[0]);
        out[4..].copy_from_slice(&self[1]);
        out
    }
}

/// pipe2(2) with O_CLOEXEC: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh fds nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// setns(2) into the namespace at `path`.
fn join(ns: &'static str, flag: libc::c_int, path: &Path) -> Result<(), SpawnError> {
    let err = |err| SpawnError::Join {
        ns,
        path: path.to_path_buf(),
        err,
    };
    let f = File::open(path).map_err(err)?;
    // SAFETY: setns on an fd we hold open; affects only this (throwaway) thread.
    if unsafe { libc::setns(f.as_raw_fd(), flag) } < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// clone3's flag to start the child in the cgroup2 directory `clone_args.cgroup`.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

enum Forked {
    Child,
    /// pid, pidfd, and whether the child started in the requested cgroup2 dir.
    Parent(i32, OwnedFd, bool),
}

/// clone3(2) without a new stack (fork-like), with a pidfd, and into the
/// cgroup2 directory `cgroup` if given; where clone3 is filtered (older
/// seccomp profiles), clone(2) + pidfd_open(2).
fn fork_into(flags: u64, cgroup: Option<RawFd>) -> io::Result<Forked> {
    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags: flags | libc::CLONE_PIDFD as u64,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    if let Some(fd) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = fd as u64;
    }
    // SAFETY: a valid clone_args of the size passed; no CLONE_VM, so the child
    // gets a copy of this address space and continues on a copy of this stack.
    let mut r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    let mut placed = cgroup.is_some();
    if r < 0 && placed && io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
        // The cgroup refused a direct start: place the child after the clone instead.
        args.flags &= !CLONE_INTO_CGROUP;
        args.cgroup = 0;
        placed = false;
        // SAFETY: as above.
        r = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut args as *mut CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
    }
    let pid = if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        placed = false;
        // SAFETY: raw clone with a NULL stack behaves like fork; the other
        // arguments are zero, so their per-architecture order does not matter.
        let r = unsafe { libc::syscall(libc::SYS_clone, flags | libc::SIGCHLD as u64, 0, 0, 0, 0) };
        if r == 0 {
            return Ok(Forked::Child);
        }
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pidfd_open on our own (unreaped: it waits on our pipe) child.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, r as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        pidfd = fd as libc::c_int;
        r
    } else if r < 0 {
        return Err(io::Error::last_os_error());
    } else {
        r
    };
    if pid == 0 {
        return Ok(Forked::Child);
    }
    // SAFETY: the kernel just created this pidfd for us.
    Ok(Forked::Parent(
        pid as i32,
        unsafe { OwnedFd::from_raw_fd(pidfd) },
        placed,
    ))
}

fn map_text(maps: &[IdMap]) -> String {
    maps.iter()
        .map(|m| format!("{} {} {}\n", m.container_id, m.host_id, m.size))
        .collect()
}

fn cstring(what: &str, s: &str) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|e| SpawnError::Setup {
        what: what.to_string(),
        err: io::Error::other(e),
    })
}

/// Starts pause as `plan` says, in `cgroup_dirs`, with `oom_score_adj` (already
/// floored at the shim's own). Blocking. The namespace joins happen on a thread
/// of pause's own, which no other work ever runs on; it parks until the
/// returned [`Keeper`] is dropped (or ends at once if the start failed).
pub fn spawn(
    pause: Arc<PauseBinary>,
    plan: Plan,
    cgroup_dirs: Vec<PathBuf>,
    oom_score_adj: Option<i64>,
) -> Result<Spawned, SpawnError> {
    let (res_tx, res_rx) = std::sync::mpsc::channel();
    let (keep_tx, keep_rx) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("pause-keeper".into())
        .spawn(move || {
            let r = spawn_on_this_thread(pause.fd.as_raw_fd(), &plan, &cgroup_dirs, oom_score_adj);
            let ok = r.is_ok();
            let _ = res_tx.send(r);
            if ok {
                // Returns (Err) once the Keeper's sender is dropped.
                let _ = keep_rx.recv();
            }
        })
        .map_err(|e| SpawnError::Thread(e.to_string()))?;
    let started = res_rx
        .recv()
        .map_err(|_| SpawnError::Thread("pause-keeper thread died".into()))??;
    Ok(Spawned {
        pid: started.pid,
        pidfd: started.pidfd,
        phases: started.phases,
        keeper: Keeper(keep_tx),
    })
}

/// Timings of the spawn's phases, for the sandbox's start-up log.
struct Laps {
    clock: std::time::Instant,
    phases: Vec<(&'static str, u64)>,
}

impl Laps {
    fn new() -> Laps {
        Laps {
            clock: std::time::Instant::now(),
            phases: Vec::new(),
        }
    }

    fn lap(&mut self, name: &'static str) {
        self.phases
            .push((name, self.clock.elapsed().as_micros() as u64));
        self.clock = std::time::Instant::now();
    }
}

fn spawn_on_this_thread(
    exe: RawFd,
    plan: &Plan,
    cgroup_dirs: &[PathBuf],
    oom_score_adj: Option<i64>,
) -> Result<Started, SpawnError> {
    let mut laps = Laps::new();
    // 1. Join the namespaces given by path (as host root, before any user namespace), and
    //    write the sysctls of joined ones.
    let flags = join_namespaces(plan)?;
    let child_sysctls = write_joined_sysctls(plan)?;
    laps.lap("join+sysctl");
    // 2. Cgroups.
    let mut place = Placement::enter(cgroup_dirs)?;
    laps.lap("cgroup");
    // 3. Everything the child touches, prepared now.
    let setup_err = |err| SpawnError::Setup {
        what: "pipe".into(),
        err,
    };
    let (sync_r, sync_w) = pipe().map_err(setup_err)?;
    let (err_r, err_w) = pipe().map_err(setup_err)?;
    let args = child_args(
        plan,
        exe,
        sync_r.as_raw_fd(),
        err_w.as_raw_fd(),
        child_sysctls,
    )?;
    // 4. Clone.
    let (pid, pidfd) = clone_child(flags, &args, &mut place)?;
    drop(sync_r);
    drop(err_w);
    laps.lap("clone");
    let undo = |e: SpawnError| {
        let _ = signal(&pidfd, libc::SIGKILL);
        e
    };
    // 5. While the child waits: user namespace maps, oom_score_adj, cgroup.
    prepare_child(pid, plan, oom_score_adj, &place.after_clone).map_err(undo)?;
    laps.lap("maps+oom");
    // 6. Release the child and learn whether its exec worked.
    release_child(sync_w, err_r).map_err(|e| undo(where_stuck(pid, e)))?;
    laps.lap("exec");
    Ok(Started {
        pid,
        pidfd,
        phases: laps.phases,
    })
}

/// setns into each namespace the plan joins by path; the clone flags of those it creates.
fn join_namespaces(plan: &Plan) -> Result<u64, SpawnError> {
    let joins: [(&'static str, libc::c_int, &NsAction); 4] = [
        ("ipc", libc::CLONE_NEWIPC, &plan.ipc),
        ("uts", libc::CLONE_NEWUTS, &plan.uts),
        ("network", libc::CLONE_NEWNET, &plan.net),
        ("pid", libc::CLONE_NEWPID, &plan.pid),
    ];
    let mut flags: u64 = 0;
    for (ns, flag, action) in joins {
        match action {
            NsAction::Join(path) => join(ns, flag, path)?,
            NsAction::New => flags |= flag as u64,
            NsAction::Host => {}
        }
    }
    if plan.user == NsAction::New {
        flags |= libc::CLONE_NEWUSER as u64;
    }
    Ok(flags)
}

/// Sysctls of joined namespaces are written here, with the host's privileges over them;
/// those of new namespaces are returned for the child to write, inside them.
fn write_joined_sysctls(plan: &Plan) -> Result<Vec<(CString, CString)>, SpawnError> {
    let mut child_sysctls = Vec::new();
    for sc in &plan.sysctls {
        let joined = matches!(
            match sc.ns {
                super::plan::SysctlNs::Net => &plan.net,
                super::plan::SysctlNs::Ipc => &plan.ipc,
                super::plan::SysctlNs::Uts => &plan.uts,
            },
            NsAction::Join(_)
        );
        if joined {
            std::fs::write(sc.proc_path(), &sc.value).map_err(|err| SpawnError::Sysctl {
                key: sc.key.clone(),
                err,
            })?;
        } else {
            child_sysctls.push((
                cstring("sysctl path", &sc.proc_path())?,
                cstring("sysctl value", &sc.value)?,
            ));
        }
    }
    Ok(child_sysctls)
}

/// Where the clone goes in each cgroup hierarchy. This thread moves itself into the v1 ones
/// (cheap, see cgroup::move_current_thread) so the clone starts there, and moves back right
/// after; a cgroup2 directory is entered by the clone itself (CLONE_INTO_CGROUP). Elsewhere,
/// the child is placed after the clone.
struct Placement {
    /// Where this thread was, to go back after the clone: it lives on as the Keeper and must
    /// not hold the pod's cgroups.
    moved: Vec<PathBuf>,
    v2_dir: Option<(File, PathBuf)>,
    after_clone: Vec<PathBuf>,
}

impl Placement {
    fn enter(cgroup_dirs: &[PathBuf]) -> Result<Placement, SpawnError> {
        cgroup::create(cgroup_dirs)?;
        let homes: Vec<(PathBuf, PathBuf)> = cgroup::hierarchies()?
            .into_iter()
            .zip(cgroup::current_thread_dirs()?)
            .filter_map(|(h, home)| Some((h.mountpoint, home?)))
            .collect();
        let mut p = Placement {
            moved: Vec::new(),
            v2_dir: None,
            after_clone: Vec::new(),
        };
        for dir in cgroup_dirs {
            if cgroup::is_v2(dir) {
                p.enter_v2(dir)?;
            } else {
                p.enter_v1(dir, &homes);
            }
        }
        Ok(p)
    }

    fn enter_v2(&mut self, dir: &Path) -> Result<(), SpawnError> {
        if self.v2_dir.is_some() {
            self.after_clone.push(dir.to_path_buf());
            return Ok(());
        }
        let f = File::open(dir).map_err(|err| SpawnError::Setup {
            what: format!("open {}", dir.display()),
            err,
        })?;
        self.v2_dir = Some((f, dir.to_path_buf()));
        Ok(())
    }

    fn enter_v1(&mut self, dir: &Path, homes: &[(PathBuf, PathBuf)]) {
        let home = homes
            .iter()
            .filter(|(m, _)| dir.starts_with(m))
            .max_by_key(|(m, _)| m.as_os_str().len())
            .map(|(_, h)| h.clone());
        match home {
            Some(home) => match cgroup::move_current_thread(dir) {
                Ok(()) => self.moved.push(home),
                Err(e) => {
                    tracing::debug!(error = %e, "thread move refused; placing the child after the clone");
                    self.after_clone.push(dir.to_path_buf());
                }
            },
            None => self.after_clone.push(dir.to_path_buf()),
        }
    }

    /// After the clone: this thread leaves the pod's cgroups.
    fn leave(&self) {
        for home in &self.moved {
            if let Err(e) = cgroup::move_current_thread(home) {
                // The pod's cgroup then stays busy until this thread ends with pause.
                tracing::warn!(error = %e, "pause-keeper thread could not leave the pod's cgroup");
            }
        }
    }
}

/// The child's arguments, every buffer allocated before the clone.
fn child_args(
    plan: &Plan,
    exe: RawFd,
    sync_r: RawFd,
    err_w: RawFd,
    sysctls: Vec<(CString, CString)>,
) -> Result<ChildArgs, SpawnError> {
    let mut groups: Vec<libc::gid_t> = plan.additional_gids.clone();
    groups.sort_unstable();
    groups.dedup();
    let mut args = ChildArgs {
        sync_r,
        err_w,
        exe,
        hostname: plan
            .hostname
            .as_deref()
            .map(|h| cstring("hostname", h))
            .transpose()?,
        sysctls,
        ns_root: plan.user == NsAction::New,
        uid: plan.uid,
        gid: plan.gid,
        groups,
        argv0: cstring("argv", "pause")?,
        argv: [std::ptr::null(), std::ptr::null()],
        envp: [std::ptr::null()],
        empty: cstring("path", "")?,
    };
    args.argv[0] = args.argv0.as_ptr();
    Ok(args)
}

/// Clone the child (which runs [`child_main`] and never returns here); this thread then
/// leaves the pod's cgroups. Returns the child's pid and pidfd.
fn clone_child(
    flags: u64,
    args: &ChildArgs,
    place: &mut Placement,
) -> Result<(i32, OwnedFd), SpawnError> {
    let cgroup_fd = place.v2_dir.as_ref().map(|(f, _)| f.as_raw_fd());
    let forked = fork_into(flags, cgroup_fd).map_err(|err| SpawnError::Setup {
        what: "clone".into(),
        err,
    })?;
    let (pid, pidfd, placed) = match forked {
        Forked::Child => child_main(args),
        Forked::Parent(pid, fd, placed) => (pid, fd, placed),
    };
    if let Some((_, dir)) = place.v2_dir.take().filter(|_| !placed) {
        place.after_clone.push(dir);
    }
    place.leave();
    Ok((pid, pidfd))
}

/// While the child waits on the sync pipe: its user namespace maps, its oom_score_adj and
/// the cgroups it could not be cloned into.
fn prepare_child(
    pid: i32,
    plan: &Plan,
    oom_score_adj: Option<i64>,
    after_clone: &[PathBuf],
) -> Result<(), SpawnError> {
    let setup = |what: &str, path: String, text: String| {
        std::fs::write(&path, text).map_err(|err| SpawnError::Setup {
            what: format!("{what} ({path})"),
            err,
        })
    };
    if plan.user == NsAction::New {
        let uid_map = map_text(&plan.uid_mappings);
        setup("uid map", format!("/proc/{pid}/uid_map"), uid_map)?;
        let gid_map = map_text(&plan.gid_mappings);
        setup("gid map", format!("/proc/{pid}/gid_map"), gid_map)?;
    }
    if let Some(adj) = oom_score_adj {
        let path = format!("/proc/{pid}/oom_score_adj");
        setup("oom_score_adj", path, adj.to_string())?;
    }
    cgroup::add(after_clone, pid).map_err(SpawnError::from)
}

/// How long pause may take from its release to its exec (normally well under a millisecond).
/// Past it the child is stuck (the StartSandbox hang was a child blocked in a lock copied
/// held): the spawn fails and the caller kills it, instead of the shim waiting forever.
const EXEC_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// poll(2) until `f` is readable (data or EOF) or `limit` passes (TimedOut).
fn wait_readable(f: &File, limit: std::time::Duration) -> io::Result<()> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd on an fd we own, for its length of one.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            n if n > 0 => return Ok(()),
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no exec within {limit:?}"),
                ));
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// A child that missed its exec deadline: say where it waits (its kernel wait channel), so
/// the log names the cause next time.
fn where_stuck(pid: i32, e: SpawnError) -> SpawnError {
    match e {
        SpawnError::Setup { what, err } if err.kind() == io::ErrorKind::TimedOut => {
            let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
            SpawnError::Setup {
                what: format!("{what} (pause {pid} waits in {wchan:?})"),
                err,
            }
        }
        e => e,
    }
}

/// Let the child go on, and learn whether its exec worked: the error pipe closes on exec
/// (O_CLOEXEC) or carries (step, errno), within [`EXEC_DEADLINE`].
fn release_child(sync_w: OwnedFd, err_r: OwnedFd) -> Result<(), SpawnError> {
    let mut w = File::from(sync_w);
    w.write_all(&[0]).map_err(|err| SpawnError::Setup {
        what: "release pause".into(),
        err,
    })?;
    drop(w);
    let mut err_r = File::from(err_r);
    wait_readable(&err_r, EXEC_DEADLINE).map_err(|err| SpawnError::Setup {
        what: "wait for pause to exec".into(),
        err,
    })?;
    let mut msg = Vec::new();
    err_r
        .read_to_end(&mut msg)
        .map_err(|err| SpawnError::Setup {
            what: "read pause status".into(),
            err,
        })?;
    if msg.len() >= 8 {
        let step = i32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize;
        let errno = i32::from_ne_bytes([msg[4], msg[5], msg[6], msg[7]]);
        return Err(SpawnError::Child {
            step: STEPS.get(step).copied().unwrap_or("?"),
            err: io::Error::from_raw_os_error(errno),
        });
    }
    Ok(())
}

#[cfg(test)]
#[path = "spawn_tests.rs"]
mod tests;
