//! Filesystem helpers that never cross a mount point.
//!
//! [`remove_all_no_xdev`] is the ONE recursive remover of the crate (promise 5 of DESIGN.md):
//! snapshot removal, `cleanup()` and temporary directories all go through it. It walks with
//! directory fds (`openat(O_NOFOLLOW|O_DIRECTORY)`, `unlinkat`), never follows a symlink, and
//! compares the device and the mount id (`statx(STATX_MNT_ID)`) of every directory it opens
//! with those of the directory it was asked to remove. A directory on another mount (a bind
//! mount, an idmapped temporary mount that failed to unmount, an overlay still mounted) is not
//! entered: the walk stops and the error names that path.

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, Dir, Mode, OFlags, StatxFlags};
use thiserror::Error;

/// Errors of the safe remover and its helpers.
#[derive(Debug, Error)]
pub enum RemoveError {
    /// A directory inside the tree is on another mount (device or mount id differs).
    #[error(
        "refusing to remove {path}: it is on another mount (mount id {found_mnt} dev {found_dev:#x}, expected mount id {want_mnt} dev {want_dev:#x}); nothing beyond it was touched"
    )]
    CrossesMount {
        /// The directory that is a mount point.
        path: PathBuf,
        /// Its mount id.
        found_mnt: u64,
        /// Its device.
        found_dev: u64,
        /// Mount id of the tree being removed.
        want_mnt: u64,
        /// Device of the tree being removed.
        want_dev: u64,
    },
    /// A syscall failed on `path`.
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The path it was applied to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl RemoveError {
    fn io(op: &'static str, path: &Path, e: rustix::io::Errno) -> Self {
        RemoveError::Io {
            op,
            path: path.to_path_buf(),
            source: e.into(),
        }
    }
}

/// Device and mount id of a file; two directories on the same mount have equal `MountIdent`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountIdent {
    /// `makedev(stx_dev_major, stx_dev_minor)`.
    pub dev: u64,
    /// `stx_mnt_id` (0 if the kernel did not report it).
    pub mnt_id: u64,
}

fn ident_at(
    dirfd: BorrowedFd<'_>,
    name: &CStr,
    path: &Path,
) -> Result<(MountIdent, bool), RemoveError> {
    let flags = if name.to_bytes().is_empty() {
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW
    } else {
        AtFlags::SYMLINK_NOFOLLOW
    };
    let st = rustix::fs::statx(
        dirfd,
        name,
        flags,
        StatxFlags::BASIC_STATS | StatxFlags::MNT_ID,
    )
    .map_err(|e| RemoveError::io("statx", path, e))?;
    let mnt_id = if st.stx_mask & StatxFlags::MNT_ID.bits() != 0 {
        st.stx_mnt_id
    } else {
        0
    };
    let dev = rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor);
    // STATX_ATTR_MOUNT_ROOT = 0x2000: the file is the root of a mount.
    let mount_root =
        st.stx_attributes_mask.bits() & 0x2000 != 0 && st.stx_attributes.bits() & 0x2000 != 0;
    Ok((MountIdent { dev, mnt_id }, mount_root))
}

/// Device and mount id of `path` (not following a final symlink).
pub fn mount_ident(path: &Path) -> Result<MountIdent, RemoveError> {
    let c = cpath(path)?;
    Ok(ident_at(CWD, &c, path)?.0)
}

/// Whether `path` is a mount point: the root of a mount (STATX_ATTR_MOUNT_ROOT), or on a
/// different mount than its parent directory.
pub fn is_mount_point(path: &Path) -> Result<bool, RemoveError> {
    let c = cpath(path)?;
    let (me, root) = ident_at(CWD, &c, path)?;
    if root {
        return Ok(true);
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let pc = cpath(parent)?;
    let (p, _) = ident_at(CWD, &pc, parent)?;
    Ok(p != me)
}

fn cpath(path: &Path) -> Result<CString, RemoveError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| RemoveError::Io {
        op: "path",
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
    })
}

fn open_dir_at(dirfd: BorrowedFd<'_>, name: &CStr, path: &Path) -> Result<OwnedFd, RemoveError> {
    rustix::fs::openat(
        dirfd,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| RemoveError::io("open", path, e))
}

/// Removes `path` and everything below it, without ever crossing into another mount.
///
/// * A missing `path` is success.
/// * If `path` itself is a mount point the call refuses before deleting anything.
/// * If a directory below is on another mount, the walk stops at once and returns
///   [`RemoveError::CrossesMount`] naming it; nothing inside it is touched. Entries already
///   removed before the walk met it stay removed.
pub fn remove_all_no_xdev(path: &Path) -> Result<(), RemoveError> {
    let c = cpath(path)?;
    let st = match rustix::fs::statx(CWD, &c, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::TYPE) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(RemoveError::io("statx", path, e)),
    };
    let is_dir = u32::from(st.stx_mode) & libc::S_IFMT == libc::S_IFDIR;
    if !is_dir {
        return match rustix::fs::unlinkat(CWD, &c, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(RemoveError::io("unlink", path, e)),
        };
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let parent_ident = mount_ident(parent)?;
    let root = open_dir_at(CWD, &c, path)?;
    let (want, mount_root) = ident_at(root.as_fd(), c"", path)?;
    if mount_root || want != parent_ident {
        return Err(RemoveError::CrossesMount {
            path: path.to_path_buf(),
            found_mnt: want.mnt_id,
            found_dev: want.dev,
            want_mnt: parent_ident.mnt_id,
            want_dev: parent_ident.dev,
        });
    }
    remove_contents(root.as_fd(), path, want, 0)?;
    drop(root);
    match rustix::fs::unlinkat(CWD, &c, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(RemoveError::io("rmdir", path, e)),
    }
}

fn list(dir: BorrowedFd<'_>, path: &Path) -> Result<Vec<(CString, Option<bool>)>, RemoveError> {
    let d = Dir::read_from(dir).map_err(|e| RemoveError::io("opendir", path, e))?;
    let mut names = Vec::new();
    for ent in d {
        let ent = ent.map_err(|e| RemoveError::io("readdir", path, e))?;
        let name = ent.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let ft = ent.file_type();
        let is_dir = match ft {
            rustix::fs::FileType::Unknown => None,
            ft => Some(ft == rustix::fs::FileType::Directory),
        };
        names.push((name.to_owned(), is_dir));
    }
    Ok(names)
}

const MAX_DEPTH: usize = 4096;

fn remove_contents(
    dir: BorrowedFd<'_>,
    path: &Path,
    want: MountIdent,
    depth: usize,
) -> Result<(), RemoveError> {
    if depth > MAX_DEPTH {
        return Err(RemoveError::Io {
            op: "walk",
            path: path.to_path_buf(),
            source: io::Error::other("directory tree too deep"),
        });
    }
    for (name, is_dir) in list(dir, path)? {
        let child = path.join(OsStr::from_bytes(name.to_bytes()));
        let is_dir = match is_dir {
            Some(d) => d,
            None => {
                match rustix::fs::statx(dir, &name, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::TYPE) {
                    Ok(st) => u32::from(st.stx_mode) & libc::S_IFMT == libc::S_IFDIR,
                    Err(rustix::io::Errno::NOENT) => continue,
                    Err(e) => return Err(RemoveError::io("statx", &child, e)),
                }
            }
        };
        if is_dir {
            let fd = match open_dir_at(dir, &name, &child) {
                Ok(fd) => fd,
                Err(RemoveError::Io { source, .. })
                    if source.raw_os_error() == Some(libc::ENOENT) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (got, mount_root) = ident_at(fd.as_fd(), c"", &child)?;
            if got != want || mount_root {
                return Err(RemoveError::CrossesMount {
                    path: child,
                    found_mnt: got.mnt_id,
                    found_dev: got.dev,
                    want_mnt: want.mnt_id,
                    want_dev: want.dev,
                });
            }
            remove_contents(fd.as_fd(), &child, want, depth + 1)?;
            drop(fd);
            match rustix::fs::unlinkat(dir, &name, AtFlags::REMOVEDIR) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(RemoveError::io("rmdir", &child, e)),
            }
        } else {
            match rustix::fs::unlinkat(dir, &name, AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(RemoveError::io("unlink", &child, e)),
            }
        }
    }
    Ok(())
}

/// Disk usage of a tree: bytes (`st_blocks * 512`) and inodes, each hard-linked inode counted
/// once, the same way containerd's `fs.DiskUsage` counts. Does not cross mount points.
pub fn disk_usage(path: &Path) -> Result<(i64, i64), RemoveError> {
    let c = cpath(path)?;
    let root = open_dir_at(CWD, &c, path)?;
    let (want, _) = ident_at(root.as_fd(), c"", path)?;
    let mut seen = HashSet::new();
    let mut size = 0i64;
    usage_rec(root.as_fd(), c"", path, want, &mut seen, &mut size, 0)?;
    Ok((size, seen.len() as i64))
}

fn usage_rec(
    dir: BorrowedFd<'_>,
    name: &CStr,
    path: &Path,
    want: MountIdent,
    seen: &mut HashSet<(u64, u64)>,
    size: &mut i64,
    depth: usize,
) -> Result<(), RemoveError> {
    let flags = if name.to_bytes().is_empty() {
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW
    } else {
        AtFlags::SYMLINK_NOFOLLOW
    };
    let st = match rustix::fs::statx(dir, name, flags, StatxFlags::BASIC_STATS) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(RemoveError::io("statx", path, e)),
    };
    let dev = rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor);
    if seen.insert((dev, st.stx_ino)) {
        *size += (st.stx_blocks as i64).saturating_mul(512);
    }
    if u32::from(st.stx_mode) & libc::S_IFMT != libc::S_IFDIR || depth > MAX_DEPTH {
        return Ok(());
    }
    let fd = if name.to_bytes().is_empty() {
        rustix::io::dup(dir).map_err(|e| RemoveError::io("dup", path, e))?
    } else {
        open_dir_at(dir, name, path)?
    };
    let (got, _) = ident_at(fd.as_fd(), c"", path)?;
    if got != want {
        return Ok(());
    }
    for (child, _) in list(fd.as_fd(), path)? {
        let cp = path.join(OsStr::from_bytes(child.to_bytes()));
        usage_rec(fd.as_fd(), &child, &cp, want, seen, size, depth + 1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_tree_with_symlinks_without_following() {
        let t = tempfile::tempdir().expect("tempdir");
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("keep"), b"x").expect("write");
        let victim = t.path().join("victim");
        std::fs::create_dir_all(victim.join("a/b/c")).expect("mkdir");
        std::fs::write(victim.join("a/b/c/f"), b"data").expect("write");
        std::os::unix::fs::symlink(&outside, victim.join("a/link")).expect("symlink");
        let (size, inodes) = disk_usage(&victim).expect("usage");
        assert!(inodes >= 5, "{inodes}");
        assert!(size > 0);
        remove_all_no_xdev(&victim).expect("remove");
        assert!(!victim.exists());
        assert!(outside.join("keep").exists());
        // Missing path is fine.
        remove_all_no_xdev(&victim).expect("remove missing");
    }
}
