//! Mounts as data, and the one place that performs them.
//!
//! The snapshotter only *describes* mounts ([`Mount`], the mirror of `containerd.types.Mount`);
//! [`mount_all`] / [`unmount_all`] (or a configured [`Mounter`]) apply and tear them down. The
//! shim mounts container root filesystems through here; nothing else in crisp mounts layers.
//!
//! ID mappings travel as containerd 2.x passes them: options `uidmap=<ctr>:<host>:<size>[,..]`
//! and `gidmap=...` (both or neither). On an `overlay` mount they apply to the lower layers
//! (the upper and work dirs already belong to the mapped root); on a `bind` mount to the bind.
//!
//! Safe idmapped overlay (promise 5 of DESIGN.md):
//! * **fd path** (preferred, kernel ≥ 6.15ish): each lower dir becomes a detached clone
//!   (`open_tree(OPEN_TREE_CLONE)`), made read-only and idmapped with `mount_setattr`, and is
//!   handed to overlayfs by file descriptor (`fsconfig(FSCONFIG_SET_FD, "lowerdir+")`). No
//!   temporary mount point ever exists, so nothing can be left mounted and nothing can be
//!   deleted through one.
//! * **temp-mount path** (fallback for older kernels, selectable to be tested): each idmapped
//!   lower dir is attached read-only at `<tmp_root>/<rand>/<n>`, overlay is mounted with
//!   `lowerdir=` those paths, then each temporary mount is unmounted with retries on EBUSY,
//!   then `MNT_DETACH`, and its directory is removed with `rmdir` only after checking it is
//!   no longer a mount point. There is no recursive delete on this path at all; a directory
//!   that cannot be removed is left for `Snapshotter::cleanup`, which uses the mount-aware
//!   [`crate::fsutil::remove_all_no_xdev`].

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustix::fs::CWD;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MoveMountFlags, OpenTreeFlags,
    UnmountFlags,
};
use thiserror::Error;

use crate::fsutil::{self, RemoveError};
use crate::idmap::{IdMap, IdmapError, Userns};
use crate::sys;

/// One mount, mirroring `containerd.types.Mount`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Mount {
    /// Filesystem type: `overlay`, `bind`, `rbind`, `tmpfs`, ...
    pub typ: String,
    /// Source: a path for binds, `overlay` for overlay.
    pub source: String,
    /// Sub-path under the target passed to [`mount_all`]; empty means the target itself.
    pub target: String,
    /// fstab-style options, including `uidmap=` / `gidmap=`.
    pub options: Vec<String>,
}

impl Mount {
    /// The upper directory of this mount, if it is writable: overlay's `upperdir=`, or the
    /// source of a read-write bind. The image unpacker writes layer diffs there.
    pub fn upper_dir(&self) -> Option<PathBuf> {
        match self.typ.as_str() {
            "overlay" => self
                .options
                .iter()
                .find_map(|o| o.strip_prefix("upperdir="))
                .map(PathBuf::from),
            "bind" | "rbind" if !self.options.iter().any(|o| o == "ro") => {
                Some(PathBuf::from(&self.source))
            }
            _ => None,
        }
    }
}

impl From<crisp_proto::containerd::types::Mount> for Mount {
    fn from(m: crisp_proto::containerd::types::Mount) -> Self {
        Mount {
            typ: m.r#type,
            source: m.source,
            target: m.target,
            options: m.options,
        }
    }
}

impl From<Mount> for crisp_proto::containerd::types::Mount {
    fn from(m: Mount) -> Self {
        crisp_proto::containerd::types::Mount {
            r#type: m.typ,
            source: m.source,
            target: m.target,
            options: m.options,
        }
    }
}

#[cfg(feature = "shim-protos")]
impl From<containerd_shim_protos::types::mount::Mount> for Mount {
    fn from(m: containerd_shim_protos::types::mount::Mount) -> Self {
        Mount {
            typ: m.type_,
            source: m.source,
            target: m.target,
            options: m.options,
        }
    }
}

#[cfg(feature = "shim-protos")]
impl From<Mount> for containerd_shim_protos::types::mount::Mount {
    fn from(m: Mount) -> Self {
        let mut out = containerd_shim_protos::types::mount::Mount::new();
        out.type_ = m.typ;
        out.source = m.source;
        out.target = m.target;
        out.options = m.options;
        out
    }
}

/// Errors of the mount module.
#[derive(Debug, Error)]
pub enum MountError {
    /// The mount description itself is wrong.
    #[error("invalid {typ} mount: {reason}")]
    Invalid {
        /// The mount type.
        typ: String,
        /// What is wrong.
        reason: String,
    },
    /// A mapping option did not parse or the user namespace could not be made.
    #[error(transparent)]
    Idmap(#[from] IdmapError),
    /// A syscall failed.
    #[error("{op} {path}: {source}{detail}")]
    Sys {
        /// The operation.
        op: &'static str,
        /// Path it applied to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
        /// Extra text (overlayfs' own messages from the fs context).
        detail: String,
    },
    /// Cleaning up a directory failed.
    #[error(transparent)]
    Remove(#[from] RemoveError),
}

fn sys_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(rustix::io::Errno) -> MountError + 'a {
    move |e| MountError::Sys {
        op,
        path: path.to_path_buf(),
        source: e.into(),
        detail: String::new(),
    }
}

fn invalid(typ: &str, reason: impl Into<String>) -> MountError {
    MountError::Invalid {
        typ: typ.to_string(),
        reason: reason.into(),
    }
}

/// How idmapped overlay lower layers are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdmapMode {
    /// Probe once per process; use [`IdmapMode::Fd`] if the kernel supports it, else
    /// [`IdmapMode::TempMount`].
    #[default]
    Auto,
    /// Detached idmapped mounts handed to overlayfs by fd: no temporary mount point.
    Fd,
    /// Temporary idmapped mounts in a private directory (older kernels).
    TempMount,
}

impl fmt::Display for IdmapMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdmapMode::Auto => "auto",
            IdmapMode::Fd => "fd",
            IdmapMode::TempMount => "temp-mount",
        })
    }
}

impl FromStr for IdmapMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IdmapMode::Auto),
            "fd" => Ok(IdmapMode::Fd),
            "temp-mount" | "tempmount" | "temp" => Ok(IdmapMode::TempMount),
            _ => Err(format!(
                "unknown idmap mode {s:?} (want auto, fd or temp-mount)"
            )),
        }
    }
}

/// The syscalls of teardown, behind a trait so tests can inject EBUSY and ENOTEMPTY (youki's
/// `Syscall` pattern). Everything else calls the kernel directly.
pub trait Syscalls: Send + Sync + fmt::Debug {
    /// `umount2(target, flags)`; `flags` are `MNT_*` / `UMOUNT_*` bits.
    fn umount2(&self, target: &Path, flags: i32) -> io::Result<()>;
    /// `rmdir(path)`: removes an empty directory, never anything else.
    fn rmdir(&self, path: &Path) -> io::Result<()>;
}

/// The real kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealSyscalls;

impl Syscalls for RealSyscalls {
    fn umount2(&self, target: &Path, flags: i32) -> io::Result<()> {
        rustix::mount::unmount(target, UnmountFlags::from_bits_retain(flags as u32))
            .map_err(io::Error::from)
    }
    fn rmdir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }
}

/// Fault injection for tests: the first `ebusy_unmounts` non-detaching unmounts fail with
/// EBUSY (without unmounting), and the first `enotempty_rmdirs` rmdirs fail with ENOTEMPTY
/// (without removing). Everything else goes to the real kernel.
#[derive(Debug, Default)]
pub struct FaultySyscalls {
    /// Remaining EBUSY answers.
    pub ebusy_unmounts: AtomicUsize,
    /// Remaining ENOTEMPTY answers.
    pub enotempty_rmdirs: AtomicUsize,
    /// How many EBUSY were injected.
    pub injected_ebusy: AtomicUsize,
    /// How many ENOTEMPTY were injected.
    pub injected_enotempty: AtomicUsize,
    /// How many `MNT_DETACH` unmounts were requested.
    pub detaches: AtomicUsize,
}

impl FaultySyscalls {
    /// Fails the first `ebusy` unmounts and the first `enotempty` rmdirs.
    pub fn new(ebusy: usize, enotempty: usize) -> Self {
        FaultySyscalls {
            ebusy_unmounts: AtomicUsize::new(ebusy),
            enotempty_rmdirs: AtomicUsize::new(enotempty),
            ..Default::default()
        }
    }
}

fn take_one(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

impl Syscalls for FaultySyscalls {
    fn umount2(&self, target: &Path, flags: i32) -> io::Result<()> {
        if flags & libc::MNT_DETACH != 0 {
            self.detaches.fetch_add(1, Ordering::SeqCst);
        } else if take_one(&self.ebusy_unmounts) {
            self.injected_ebusy.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        RealSyscalls.umount2(target, flags)
    }
    fn rmdir(&self, path: &Path) -> io::Result<()> {
        if take_one(&self.enotempty_rmdirs) {
            self.injected_enotempty.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(libc::ENOTEMPTY));
        }
        RealSyscalls.rmdir(path)
    }
}

/// How many plain unmount attempts meet EBUSY before falling back to `MNT_DETACH`.
const UNMOUNT_RETRIES: u32 = 5;

/// Applies and tears down mount lists with a chosen idmap mode, temporary-mount directory and
/// syscall layer. [`mount_all`] / [`unmount_all`] use a process-wide default one.
#[derive(Debug, Clone)]
pub struct Mounter {
    mode: IdmapMode,
    tmp_root: PathBuf,
    sys: Arc<dyn Syscalls>,
}

impl Mounter {
    /// A mounter; `tmp_root` holds temporary mounts of the fallback path (created 0700 on use).
    pub fn new(mode: IdmapMode, tmp_root: impl Into<PathBuf>) -> Self {
        Mounter {
            mode,
            tmp_root: tmp_root.into(),
            sys: Arc::new(RealSyscalls),
        }
    }

    /// Replaces the teardown syscalls (fault injection in tests).
    pub fn with_syscalls(mut self, sys: Arc<dyn Syscalls>) -> Self {
        self.sys = sys;
        self
    }

    /// Directory of the fallback path's temporary mounts.
    pub fn tmp_root(&self) -> &Path {
        &self.tmp_root
    }

    /// The mode in use: `Auto` is resolved by a once-per-process probe.
    pub fn mode(&self) -> IdmapMode {
        match self.mode {
            IdmapMode::Auto => {
                if probe_fd_path(&self.tmp_root) {
                    IdmapMode::Fd
                } else {
                    IdmapMode::TempMount
                }
            }
            m => m,
        }
    }

    /// Mounts `mounts` in order on `target` (each on `target/<mount.target>` if set). On error
    /// what was mounted is unmounted again.
    pub fn mount_all(&self, mounts: &[Mount], target: &Path) -> Result<(), MountError> {
        let mut done: Vec<PathBuf> = Vec::new();
        for m in mounts {
            let dest = if m.target.is_empty() {
                target.to_path_buf()
            } else {
                let sub = Path::new(m.target.trim_start_matches('/'));
                if sub
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(invalid(
                        &m.typ,
                        format!("target {:?} must stay below the mount root", m.target),
                    ));
                }
                target.join(sub)
            };
            let span = tracing::debug_span!("mount", typ = %m.typ, target = %dest.display());
            let _g = span.enter();
            if let Err(e) = self.mount_one(m, &dest) {
                for d in done.iter().rev() {
                    if let Err(ue) = self.unmount_all(d) {
                        tracing::warn!(error = %ue, path = %d.display(), "undo mount after error");
                    }
                }
                return Err(e);
            }
            done.push(dest);
        }
        Ok(())
    }

    /// Unmounts everything mounted on `target` (stacked mounts too). EBUSY is retried, then
    /// the mount is detached (`MNT_DETACH`): detaching is safe because nothing here deletes
    /// anything afterwards. A missing target or one that is not a mount point is success.
    pub fn unmount_all(&self, target: &Path) -> Result<(), MountError> {
        if !target.exists() {
            return Ok(());
        }
        unmount_path(self.sys.as_ref(), target)
    }

    fn mount_one(&self, m: &Mount, target: &Path) -> Result<(), MountError> {
        let opts = parse_options(&m.typ, &m.options)?;
        let userns = match (&opts.uidmap, &opts.gidmap) {
            (Some(u), Some(g)) => Some(Userns::new(u, g)?),
            (None, None) => None,
            _ => return Err(invalid(&m.typ, "uidmap and gidmap must be given together")),
        };
        match m.typ.as_str() {
            "overlay" => self.mount_overlay(&opts, userns.as_ref(), target),
            "bind" | "rbind" => {
                let rec = m.typ == "rbind" || opts.rbind;
                mount_bind(
                    Path::new(&m.source),
                    target,
                    rec,
                    opts.attrs,
                    userns.as_ref(),
                )
            }
            _ if opts.bind => mount_bind(
                Path::new(&m.source),
                target,
                opts.rbind,
                opts.attrs,
                userns.as_ref(),
            ),
            typ => {
                if userns.is_some() {
                    return Err(invalid(
                        typ,
                        "uidmap/gidmap are only supported on overlay and bind mounts",
                    ));
                }
                let data = join_data(&opts.data);
                let data = CString::new(data).map_err(|_| invalid(typ, "NUL byte in options"))?;
                rustix::mount::mount(
                    m.source.as_str(),
                    target,
                    typ,
                    opts.flags,
                    Some(data.as_c_str()),
                )
                .map_err(sys_err("mount", target))
            }
        }
    }

    fn mount_overlay(
        &self,
        o: &Options,
        userns: Option<&Userns>,
        target: &Path,
    ) -> Result<(), MountError> {
        if o.lower.is_empty() {
            return Err(invalid("overlay", "no lowerdir"));
        }
        if o.upper.is_some() != o.work.is_some() {
            return Err(invalid(
                "overlay",
                "upperdir and workdir must be given together",
            ));
        }
        match (userns, self.mode()) {
            (Some(ns), IdmapMode::TempMount) => self.mount_overlay_tempmounts(o, ns, target),
            (ns, IdmapMode::Fd) => mount_overlay_fd(o, ns, target),
            (None, _) => mount_overlay_legacy(o, &o.lower, target),
            (Some(_), IdmapMode::Auto) => Err(invalid("overlay", "idmap mode unresolved")),
        }
    }

    fn mount_overlay_tempmounts(
        &self,
        o: &Options,
        ns: &Userns,
        target: &Path,
    ) -> Result<(), MountError> {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true).mode(0o700);
        b.create(&self.tmp_root).map_err(|e| MountError::Sys {
            op: "mkdir",
            path: self.tmp_root.clone(),
            source: e,
            detail: String::new(),
        })?;
        let dir = self.tmp_root.join(rand_name());
        b.recursive(false);
        b.create(&dir).map_err(|e| MountError::Sys {
            op: "mkdir",
            path: dir.clone(),
            source: e,
            detail: String::new(),
        })?;
        let mut tmp = TempMounts {
            dir,
            paths: Vec::new(),
            sys: self.sys.clone(),
            created: Vec::new(),
        };
        let res = (|| {
            let mut lowers = Vec::new();
            for (i, l) in o.lower.iter().enumerate() {
                let p = tmp.dir.join(i.to_string());
                b.create(&p).map_err(|e| MountError::Sys {
                    op: "mkdir",
                    path: p.clone(),
                    source: e,
                    detail: String::new(),
                })?;
                tmp.created.push(p.clone());
                let fd = idmapped_clone(Path::new(l), ns)?;
                rustix::mount::move_mount(
                    fd.as_fd(),
                    c"",
                    CWD,
                    &p,
                    MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
                )
                .map_err(sys_err("move_mount", &p))?;
                tmp.paths.push(p.clone());
                lowers.push(p.to_string_lossy().into_owned());
            }
            mount_overlay_legacy(o, &lowers, target)
        })();
        tmp.teardown();
        res
    }
}

/// Temporary mounts of the fallback path and their directories.
struct TempMounts {
    dir: PathBuf,
    created: Vec<PathBuf>,
    paths: Vec<PathBuf>,
    sys: Arc<dyn Syscalls>,
}

impl TempMounts {
    /// Unmounts (retries, then detach), verifies, and rmdirs. Never deletes recursively;
    /// what cannot be removed is left for `Snapshotter::cleanup` and logged.
    fn teardown(&mut self) {
        for p in self.paths.drain(..).rev() {
            if let Err(e) = unmount_path(self.sys.as_ref(), &p) {
                tracing::error!(path = %p.display(), error = %e, "temporary idmapped mount not unmounted; leaving its directory");
            }
        }
        for p in self.created.drain(..).rev() {
            rmdir_if_not_mountpoint(self.sys.as_ref(), &p);
        }
        rmdir_if_not_mountpoint(self.sys.as_ref(), &self.dir);
    }
}

fn rmdir_if_not_mountpoint(sys: &dyn Syscalls, p: &Path) {
    match fsutil::is_mount_point(p) {
        Ok(false) => {
            if let Err(e) = sys.rmdir(p) {
                tracing::warn!(path = %p.display(), error = %e, "temporary directory not removed; left for cleanup");
            }
        }
        Ok(true) => {
            tracing::error!(path = %p.display(), "still a mount point; not removing it");
        }
        Err(e) => {
            tracing::warn!(path = %p.display(), error = %e, "cannot check mount point; not removing it")
        }
    }
}

/// Unmounts every mount stacked on `p`: plain unmount retried on EBUSY, then `MNT_DETACH`.
fn unmount_path(sys: &dyn Syscalls, p: &Path) -> Result<(), MountError> {
    let nofollow = libc::UMOUNT_NOFOLLOW;
    let mut busy = 0u32;
    for _ in 0..64 {
        if !fsutil::is_mount_point(p)? {
            return Ok(());
        }
        let detach = busy >= UNMOUNT_RETRIES;
        let flags = nofollow | if detach { libc::MNT_DETACH } else { 0 };
        match sys.umount2(p, flags) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && !detach => {
                busy += 1;
                tracing::debug!(path = %p.display(), attempt = busy, "unmount: EBUSY, retrying");
                std::thread::sleep(Duration::from_millis(5 << busy.min(6)));
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // Not a mount point (any more): re-checked at the top of the loop.
                if !fsutil::is_mount_point(p)? {
                    return Ok(());
                }
                if detach {
                    return Err(MountError::Sys {
                        op: "umount",
                        path: p.to_path_buf(),
                        source: e,
                        detail: String::new(),
                    });
                }
                busy = UNMOUNT_RETRIES;
            }
            Err(e) => {
                if detach {
                    return Err(MountError::Sys {
                        op: "umount",
                        path: p.to_path_buf(),
                        source: e,
                        detail: String::new(),
                    });
                }
                busy = UNMOUNT_RETRIES;
            }
        }
    }
    Err(MountError::Sys {
        op: "umount",
        path: p.to_path_buf(),
        source: io::Error::other("still mounted after 64 unmounts"),
        detail: String::new(),
    })
}

/// A detached, read-only, idmapped clone of `dir` (not attached anywhere).
fn idmapped_clone(dir: &Path, ns: &Userns) -> Result<OwnedFd, MountError> {
    let fd = rustix::mount::open_tree(
        CWD,
        dir,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map_err(sys_err("open_tree", dir))?;
    sys::mount_setattr(
        fd.as_fd(),
        sys::MOUNT_ATTR_IDMAP | sys::MOUNT_ATTR_RDONLY,
        Some(ns.as_fd()),
        false,
    )
    .map_err(|e| MountError::Sys {
        op: "mount_setattr(idmap)",
        path: dir.to_path_buf(),
        source: e,
        detail: String::new(),
    })?;
    Ok(fd)
}

fn mount_bind(
    source: &Path,
    target: &Path,
    rec: bool,
    attrs: u64,
    ns: Option<&Userns>,
) -> Result<(), MountError> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if rec {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let fd = rustix::mount::open_tree(CWD, source, flags).map_err(sys_err("open_tree", source))?;
    let set = attrs
        | if ns.is_some() {
            sys::MOUNT_ATTR_IDMAP
        } else {
            0
        };
    if set != 0 {
        sys::mount_setattr(fd.as_fd(), set, ns.map(|n| n.as_fd()), rec).map_err(|e| {
            MountError::Sys {
                op: "mount_setattr",
                path: source.to_path_buf(),
                source: e,
                detail: String::new(),
            }
        })?;
    }
    rustix::mount::move_mount(
        fd.as_fd(),
        c"",
        CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(sys_err("move_mount", target))
}

/// Reads overlayfs' messages from an fs context fd (best effort).
fn fs_context_messages(fs: &OwnedFd) -> String {
    let mut out = String::new();
    let mut buf = [0u8; 1024];
    for _ in 0..16 {
        match rustix::io::read(fs, &mut buf) {
            Ok(n) if n > 0 => {
                out.push_str(": ");
                out.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            _ => break,
        }
    }
    out
}

/// Overlay through the new mount API; lower layers by fd (idmapped) or by path (`lowerdir+`),
/// one `fsconfig` per layer, so chain depth is not limited by the page-sized option string.
fn mount_overlay_fd(o: &Options, ns: Option<&Userns>, target: &Path) -> Result<(), MountError> {
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(sys_err("fsopen(overlay)", target))?;
    let ctx_err = |op: &'static str, path: &Path, e: rustix::io::Errno| MountError::Sys {
        op,
        path: path.to_path_buf(),
        source: e.into(),
        detail: fs_context_messages(&fs),
    };
    let mut layer_fds = Vec::new();
    for l in &o.lower {
        let lp = Path::new(l);
        match ns {
            Some(ns) => {
                let fd = idmapped_clone(lp, ns)?;
                rustix::mount::fsconfig_set_fd(&fs, "lowerdir+", fd.as_fd())
                    .map_err(|e| ctx_err("fsconfig(lowerdir+ fd)", lp, e))?;
                layer_fds.push(fd);
            }
            None => rustix::mount::fsconfig_set_string(&fs, "lowerdir+", l.as_str())
                .map_err(|e| ctx_err("fsconfig(lowerdir+)", lp, e))?,
        }
    }
    if let (Some(u), Some(w)) = (&o.upper, &o.work) {
        rustix::mount::fsconfig_set_string(&fs, "upperdir", u.as_str())
            .map_err(|e| ctx_err("fsconfig(upperdir)", Path::new(u), e))?;
        rustix::mount::fsconfig_set_string(&fs, "workdir", w.as_str())
            .map_err(|e| ctx_err("fsconfig(workdir)", Path::new(w), e))?;
    }
    for d in &o.data {
        match d.split_once('=') {
            Some((k, v)) => rustix::mount::fsconfig_set_string(&fs, k, v),
            None => rustix::mount::fsconfig_set_flag(&fs, d.as_str()),
        }
        .map_err(|e| ctx_err("fsconfig", target, e))?;
    }
    rustix::mount::fsconfig_create(&fs).map_err(|e| ctx_err("fsconfig(create)", target, e))?;
    let mnt = rustix::mount::fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::from_bits_retain(o.attrs as u32),
    )
    .map_err(|e| ctx_err("fsmount", target, e))?;
    drop(layer_fds);
    rustix::mount::move_mount(
        mnt.as_fd(),
        c"",
        CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(sys_err("move_mount", target))
}

/// Overlay through classic `mount(2)` with a `lowerdir=a:b:c` option string.
fn mount_overlay_legacy(o: &Options, lowers: &[String], target: &Path) -> Result<(), MountError> {
    let mut parts = Vec::new();
    if let (Some(u), Some(w)) = (&o.upper, &o.work) {
        parts.push(format!("workdir={w}"));
        parts.push(format!("upperdir={u}"));
    }
    parts.push(format!("lowerdir={}", lowers.join(":")));
    parts.extend(o.data.iter().cloned());
    let data = parts.join(",");
    let page = page_size();
    if data.len() >= page {
        return Err(invalid(
            "overlay",
            format!(
                "options are {} bytes, over the {page}-byte page limit of mount(2); this kernel needs fsconfig lowerdir+ for chains this deep",
                data.len()
            ),
        ));
    }
    let data = CString::new(data).map_err(|_| invalid("overlay", "NUL byte in options"))?;
    let flags = MountFlags::from_bits_retain(attrs_to_ms(o.attrs));
    rustix::mount::mount("overlay", target, "overlay", flags, Some(data.as_c_str()))
        .map_err(sys_err("mount(overlay)", target))
}

fn page_size() -> usize {
    rustix::param::page_size()
}

fn attrs_to_ms(attrs: u64) -> u32 {
    let mut f = 0u32;
    if attrs & sys::MOUNT_ATTR_RDONLY != 0 {
        f |= libc::MS_RDONLY as u32;
    }
    if attrs & sys::MOUNT_ATTR_NOSUID != 0 {
        f |= libc::MS_NOSUID as u32;
    }
    if attrs & sys::MOUNT_ATTR_NODEV != 0 {
        f |= libc::MS_NODEV as u32;
    }
    if attrs & sys::MOUNT_ATTR_NOEXEC != 0 {
        f |= libc::MS_NOEXEC as u32;
    }
    f
}

/// Parsed options of one mount.
#[derive(Debug)]
struct Options {
    lower: Vec<String>,
    upper: Option<String>,
    work: Option<String>,
    uidmap: Option<IdMap>,
    gidmap: Option<IdMap>,
    /// `MOUNT_ATTR_*` bits (ro, nosuid, nodev, noexec).
    attrs: u64,
    /// `MS_*` flags for classic mounts.
    flags: MountFlags,
    bind: bool,
    rbind: bool,
    /// Filesystem-specific options passed through.
    data: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            lower: Vec::new(),
            upper: None,
            work: None,
            uidmap: None,
            gidmap: None,
            attrs: 0,
            flags: MountFlags::empty(),
            bind: false,
            rbind: false,
            data: Vec::new(),
        }
    }
}

fn parse_options(typ: &str, options: &[String]) -> Result<Options, MountError> {
    let mut o = Options::default();
    for opt in options {
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt.as_str(), None),
        };
        match (k, v) {
            ("uidmap", Some(v)) => o.uidmap = Some(IdMap::parse(v)?),
            ("gidmap", Some(v)) => o.gidmap = Some(IdMap::parse(v)?),
            ("lowerdir", Some(v)) if typ == "overlay" => {
                o.lower = v
                    .split(':')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            ("upperdir", Some(v)) if typ == "overlay" => o.upper = Some(v.to_string()),
            ("workdir", Some(v)) if typ == "overlay" => o.work = Some(v.to_string()),
            ("ro", None) => {
                o.attrs |= sys::MOUNT_ATTR_RDONLY;
                o.flags |= MountFlags::RDONLY;
            }
            ("rw", None) => {
                o.attrs &= !sys::MOUNT_ATTR_RDONLY;
                o.flags -= MountFlags::RDONLY;
            }
            ("nosuid", None) => {
                o.attrs |= sys::MOUNT_ATTR_NOSUID;
                o.flags |= MountFlags::NOSUID;
            }
            ("nodev", None) => {
                o.attrs |= sys::MOUNT_ATTR_NODEV;
                o.flags |= MountFlags::NODEV;
            }
            ("noexec", None) => {
                o.attrs |= sys::MOUNT_ATTR_NOEXEC;
                o.flags |= MountFlags::NOEXEC;
            }
            ("suid" | "dev" | "exec" | "defaults" | "relatime" | "async", None) => {}
            ("noatime", None) => o.flags |= MountFlags::NOATIME,
            ("bind", None) => o.bind = true,
            ("rbind", None) => {
                o.bind = true;
                o.rbind = true;
            }
            ("private" | "rprivate" | "slave" | "rslave" | "shared" | "rshared", None) => {
                // Propagation is the caller's business (the shim sets it on the rootfs).
            }
            _ => {
                if opt.contains(',') {
                    return Err(invalid(typ, format!("option {opt:?} contains a comma")));
                }
                o.data.push(opt.clone());
            }
        }
    }
    Ok(o)
}

fn join_data(data: &[String]) -> String {
    data.join(",")
}

pub(crate) fn rand_name() -> String {
    format!("{:016x}", rand::random::<u64>())
}

static PROBE: OnceLock<bool> = OnceLock::new();

/// Whether idmapped layers can be handed to overlayfs by fd on this kernel. Probed once per
/// process (a real overlay mount under `scratch`), logged, then cached.
pub fn probe_fd_path(scratch: &Path) -> bool {
    *PROBE.get_or_init(|| match try_probe(scratch) {
        Ok(()) => {
            tracing::info!("idmapped overlay: using the fd path (open_tree + mount_setattr + fsconfig lowerdir+ fd); no temporary mounts");
            true
        }
        Err(e) => {
            tracing::info!(error = %e, "idmapped overlay: fd path unavailable, using temporary idmapped mounts (unmount with retries, MNT_DETACH, rmdir only)");
            false
        }
    })
}

fn try_probe(scratch: &Path) -> Result<(), MountError> {
    let dir = scratch.join(format!("probe-{}", rand_name()));
    let mk = |p: &Path| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(p)
            .map_err(|e| MountError::Sys {
                op: "mkdir",
                path: p.to_path_buf(),
                source: e,
                detail: String::new(),
            })
    };
    let (lower, upper, work, merged) = (
        dir.join("lower"),
        dir.join("upper"),
        dir.join("work"),
        dir.join("merged"),
    );
    for p in [&lower, &upper, &work, &merged] {
        mk(p)?;
    }
    let res = (|| {
        std::fs::write(lower.join("f"), b"x").map_err(|e| MountError::Sys {
            op: "write",
            path: lower.join("f"),
            source: e,
            detail: String::new(),
        })?;
        let map = IdMap::parse("0:100000:65536")?;
        let ns = Userns::new(&map, &map)?;
        let o = Options {
            lower: vec![lower.to_string_lossy().into_owned()],
            upper: Some(upper.to_string_lossy().into_owned()),
            work: Some(work.to_string_lossy().into_owned()),
            ..Default::default()
        };
        mount_overlay_fd(&o, Some(&ns), &merged)?;
        let st = std::fs::metadata(merged.join("f"));
        let unmount = unmount_path(&RealSyscalls, &merged);
        let st = st.map_err(|e| MountError::Sys {
            op: "stat",
            path: merged.join("f"),
            source: e,
            detail: String::new(),
        })?;
        unmount?;
        use std::os::unix::fs::MetadataExt;
        if st.uid() != 100000 {
            return Err(invalid(
                "overlay",
                format!(
                    "probe saw uid {} through the idmapped layer, want 100000",
                    st.uid()
                ),
            ));
        }
        Ok(())
    })();
    if let Err(e) = fsutil::remove_all_no_xdev(&dir) {
        tracing::warn!(error = %e, "removing idmap probe directory");
    }
    res
}

static DEFAULT: OnceLock<Mounter> = OnceLock::new();

/// Sets the process-wide mounter used by [`mount_all`] / [`unmount_all`]; fails (returning it)
/// if one was already set or used.
pub fn set_default_mounter(m: Mounter) -> Result<(), Mounter> {
    DEFAULT.set(m)
}

/// The process-wide mounter: `CRISP_IDMAP_MODE` (auto | fd | temp-mount, default auto) and
/// `CRISP_TMP_MOUNTS` (default `/run/crisp/tmp-mounts`) unless [`set_default_mounter`] ran.
pub fn default_mounter() -> &'static Mounter {
    DEFAULT.get_or_init(|| {
        let mode = std::env::var("CRISP_IDMAP_MODE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_default();
        let tmp = std::env::var_os("CRISP_TMP_MOUNTS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/crisp/tmp-mounts"));
        Mounter::new(mode, tmp)
    })
}

/// Mounts `mounts` on `target` with the process-wide [`Mounter`].
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<(), MountError> {
    default_mounter().mount_all(mounts, target)
}

/// Unmounts everything on `target` with the process-wide [`Mounter`].
pub fn unmount_all(target: &Path) -> Result<(), MountError> {
    default_mounter().unmount_all(target)
}

/// Mount points in `/proc/self/mountinfo` at or below `prefix` (component-wise; tests poll this).
pub fn mountinfo_paths_under(prefix: &Path) -> io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(prefix))
        .collect())
}

fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from(std::ffi::OsStr::from_bytes(&out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let o = parse_options(
            "overlay",
            &[
                "workdir=/w".into(),
                "upperdir=/u".into(),
                "lowerdir=/a:/b".into(),
                "uidmap=0:100000:65536".into(),
                "gidmap=0:100000:65536".into(),
                "index=off".into(),
                "ro".into(),
            ],
        )
        .expect("parse");
        assert_eq!(o.lower, vec!["/a", "/b"]);
        assert_eq!(o.upper.as_deref(), Some("/u"));
        assert_eq!(o.data, vec!["index=off"]);
        assert!(o.uidmap.is_some() && o.gidmap.is_some());
        assert_eq!(o.attrs & sys::MOUNT_ATTR_RDONLY, sys::MOUNT_ATTR_RDONLY);
        assert!(parse_options("overlay", &["uidmap=x".into()]).is_err());
    }

    #[test]
    fn upper_dir_of_mounts() {
        let m = Mount {
            typ: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec!["upperdir=/x/fs".into(), "lowerdir=/y".into()],
        };
        assert_eq!(m.upper_dir(), Some(PathBuf::from("/x/fs")));
        let b = Mount {
            typ: "bind".into(),
            source: "/s".into(),
            target: String::new(),
            options: vec!["rw".into(), "rbind".into()],
        };
        assert_eq!(b.upper_dir(), Some(PathBuf::from("/s")));
        let r = Mount {
            options: vec!["ro".into(), "rbind".into()],
            ..b
        };
        assert_eq!(r.upper_dir(), None);
    }

    #[cfg(feature = "shim-protos")]
    #[test]
    fn shim_proto_round_trip() {
        let m = Mount {
            typ: "overlay".into(),
            source: "overlay".into(),
            target: "t".into(),
            options: vec!["lowerdir=/a".into()],
        };
        let p: containerd_shim_protos::types::mount::Mount = m.clone().into();
        assert_eq!(p.type_, "overlay");
        assert_eq!(Mount::from(p), m);
        let q: crisp_proto::containerd::types::Mount = m.clone().into();
        assert_eq!(Mount::from(q), m);
    }

    #[test]
    fn target_may_not_escape() {
        let m = Mount {
            typ: "tmpfs".into(),
            source: "tmpfs".into(),
            target: "../x".into(),
            options: vec![],
        };
        let err = Mounter::new(IdmapMode::Fd, "/nonexistent")
            .mount_all(&[m], Path::new("/nonexistent/t"));
        assert!(matches!(err, Err(MountError::Invalid { .. })), "{err:?}");
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo("/a\\040b"), PathBuf::from("/a b"));
    }
}
