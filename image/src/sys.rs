//! Tiny wrappers over the *at syscalls used to unpack layers through directory file
//! descriptors. Each `unsafe` block is one FFI call with pointers to live, NUL-terminated
//! buffers; results are checked with errno. Nothing here resolves a path on its own: callers
//! pass a directory fd and a single name, or use [`openat2_in_root`].

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Open `path` (relative) below `root` with openat2(2), treating `root` as `/` for every
/// component and symlink (RESOLVE_IN_ROOT), never through /proc magic links, and, with
/// `no_symlinks`, failing with ELOOP on any symlink at all.
pub fn openat2_in_root(
    root: BorrowedFd<'_>,
    path: &OsStr,
    flags: libc::c_int,
    no_symlinks: bool,
) -> io::Result<OwnedFd> {
    let p = cstr(path)?;
    let mut resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    if no_symlinks {
        resolve |= libc::RESOLVE_NO_SYMLINKS;
    }
    // SAFETY: open_how is a plain C struct; zeroed is a valid value for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = resolve;
    // SAFETY: p and how outlive the call; the kernel reads size_of::<open_how>() bytes.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            p.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// openat(2) of a single name in `dir`; callers pass O_NOFOLLOW so a symlink is never followed.
pub fn openat(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let n = cstr(name)?;
    // SAFETY: n is NUL-terminated and outlives the call.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            n.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn open_dir(path: &std::path::Path) -> io::Result<OwnedFd> {
    let p = cstr(path.as_os_str())?;
    // SAFETY: p is NUL-terminated and outlives the call.
    let fd = unsafe {
        libc::open(
            p.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &OsStr, mode: libc::mode_t) -> io::Result<()> {
    let n = cstr(name)?;
    // SAFETY: n outlives the call.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), n.as_ptr(), mode) })
}

pub fn mknodat(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    mode: libc::mode_t,
    dev: libc::dev_t,
) -> io::Result<()> {
    let n = cstr(name)?;
    // SAFETY: n outlives the call.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), n.as_ptr(), mode, dev) })
}

pub fn symlinkat(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let t = cstr(target)?;
    let n = cstr(name)?;
    // SAFETY: t and n outlive the call.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), n.as_ptr()) })
}

/// linkat(2) without AT_SYMLINK_FOLLOW: a hard link to a symlink links the symlink itself.
pub fn linkat(
    odir: BorrowedFd<'_>,
    oname: &OsStr,
    ndir: BorrowedFd<'_>,
    nname: &OsStr,
) -> io::Result<()> {
    let o = cstr(oname)?;
    let n = cstr(nname)?;
    // SAFETY: o and n outlive the call.
    check(unsafe {
        libc::linkat(
            odir.as_raw_fd(),
            o.as_ptr(),
            ndir.as_raw_fd(),
            n.as_ptr(),
            0,
        )
    })
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &OsStr, remove_dir: bool) -> io::Result<()> {
    let n = cstr(name)?;
    let flags = if remove_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: n outlives the call.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), n.as_ptr(), flags) })
}

/// fstatat(2) without following a final symlink; None if the name does not exist.
pub fn lstatat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<libc::stat>> {
    let n = cstr(name)?;
    // SAFETY: stat is plain data; zeroed is valid and the kernel overwrites it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: n and st outlive the call.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            n.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(st))
}

/// Change owner of `name` in `dir` without following a symlink.
pub fn lchownat(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
    let n = cstr(name)?;
    // SAFETY: n outlives the call.
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            n.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })
}

pub fn fchmod(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })
}

/// chmod of a name in `dir`; only used on nodes we just created (devices, fifos), never symlinks.
pub fn fchmodat(dir: BorrowedFd<'_>, name: &OsStr, mode: libc::mode_t) -> io::Result<()> {
    let n = cstr(name)?;
    // SAFETY: n outlives the call.
    check(unsafe { libc::fchmodat(dir.as_raw_fd(), n.as_ptr(), mode, 0) })
}

fn timespec(secs: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: nsec as _,
    }
}

pub fn futimens(fd: BorrowedFd<'_>, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let ts = [timespec(atime.0, atime.1), timespec(mtime.0, mtime.1)];
    // SAFETY: ts is two valid timespecs.
    check(unsafe { libc::futimens(fd.as_raw_fd(), ts.as_ptr()) })
}

/// Set times of `name` in `dir` without following a symlink.
pub fn lutimensat(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    atime: (i64, i64),
    mtime: (i64, i64),
) -> io::Result<()> {
    let n = cstr(name)?;
    let ts = [timespec(atime.0, atime.1), timespec(mtime.0, mtime.1)];
    // SAFETY: n and ts outlive the call.
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            n.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

pub fn fsetxattr(fd: BorrowedFd<'_>, name: &OsStr, value: &[u8]) -> io::Result<()> {
    let n = cstr(name)?;
    // SAFETY: n and value outlive the call; the kernel reads value.len() bytes.
    check(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

/// Set an xattr on a symlink itself, addressed through its parent's fd in /proc so that no
/// path outside the layer is ever resolved.
pub fn lsetxattr_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    attr: &OsStr,
    value: &[u8],
) -> io::Result<()> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name.as_bytes());
    let p = cstr(OsStr::from_bytes(&p))?;
    let a = cstr(attr)?;
    // SAFETY: p, a and value outlive the call.
    check(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            a.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

pub fn makedev(major: u32, minor: u32) -> libc::dev_t {
    libc::makedev(major, minor)
}

/// Starts writeback of `len` bytes at `offset` and returns without waiting for it
/// (`SYNC_FILE_RANGE_WRITE`): the fsync that makes a large file durable later then finds most
/// of it already written instead of writing it all at the end of a pull.
pub fn start_writeback(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let (off, n) = (offset as libc::off64_t, len as libc::off64_t);
    // SAFETY: a syscall on a live descriptor; no pointers.
    check(unsafe { libc::sync_file_range(fd.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE) })
}
