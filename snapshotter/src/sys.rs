//! The few raw syscalls `rustix` does not wrap. Every `unsafe` block of the crate lives here,
//! each one small and commented.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `MOUNT_ATTR_RDONLY` from `<linux/mount.h>`.
pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
/// `MOUNT_ATTR_NOSUID`.
pub(crate) const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
/// `MOUNT_ATTR_NODEV`.
pub(crate) const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
/// `MOUNT_ATTR_NOEXEC`.
pub(crate) const MOUNT_ATTR_NOEXEC: u64 = 0x0000_0008;
/// `MOUNT_ATTR_IDMAP`.
pub(crate) const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr` (MOUNT_ATTR_SIZE_VER0 = 32 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `mount_setattr(fd, "", AT_EMPTY_PATH, {attr_set, userns_fd})` on a (detached) mount.
pub(crate) fn mount_setattr(
    mnt: BorrowedFd<'_>,
    attr_set: u64,
    userns: Option<BorrowedFd<'_>>,
    recursive: bool,
) -> io::Result<()> {
    let flags = libc::AT_EMPTY_PATH as libc::c_uint
        | if recursive {
            libc::AT_RECURSIVE as libc::c_uint
        } else {
            0
        };
    let attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.map(|fd| fd.as_raw_fd() as u64).unwrap_or(0),
    };
    let empty: &CStr = c"";
    // SAFETY: plain syscall; `empty` and `attr` outlive the call, the size passed is the size of
    // the struct we pass, and the fds are borrowed (kept open by the caller) for the duration.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mnt.as_raw_fd(),
            empty.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts a child process in a new user namespace that does nothing but wait to be killed.
///
/// The child is created with the raw `clone(CLONE_NEWUSER | SIGCHLD)` syscall (fork
/// semantics: same stack, copy-on-write memory), so the new namespace exists as soon as the
/// call returns. In the child only async-signal-safe raw syscalls run: it closes every file
/// descriptor it inherited (`close_range(0, ~0)`), asks to die with its parent thread, and
/// pauses. Returns the child's pid; the caller must kill and reap it.
pub(crate) fn spawn_userns_child() -> io::Result<libc::pid_t> {
    let flags = (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: clone with a null stack behaves like fork. The child executes only the raw
    // syscalls below (async-signal-safe, no allocation, no locks) and never returns into Rust
    // code of the parent: it ends in `_exit`.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: child side, see above. Raw syscalls only.
        unsafe {
            libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
            libc::syscall(
                libc::SYS_prctl,
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0usize,
                0usize,
                0usize,
            );
            loop {
                // ppoll with no fds and no timeout sleeps until a signal arrives.
                libc::syscall(
                    libc::SYS_ppoll,
                    std::ptr::null::<libc::pollfd>(),
                    0usize,
                    std::ptr::null::<libc::timespec>(),
                    std::ptr::null::<libc::sigset_t>(),
                    0usize,
                );
                libc::syscall(libc::SYS_exit_group, 0);
            }
        }
    }
    Ok(pid as libc::pid_t)
}

/// SIGKILL and reap a child started by [`spawn_userns_child`].
pub(crate) fn kill_and_reap(pid: libc::pid_t) {
    // SAFETY: `pid` is our own unreaped child, so it cannot have been recycled.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child; `status` is a valid out pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
}
