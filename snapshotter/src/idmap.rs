//! ID mappings (`ctr:host:size[,ctr:host:size...]`, containerd's syntax for the `uidmap=` /
//! `gidmap=` mount options and the `containerd.io/snapshot/{uid,gid}mapping` labels) and the
//! user namespace that carries them to `mount_setattr(MOUNT_ATTR_IDMAP)`.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use thiserror::Error;

use crate::sys;

/// Label containerd 2.x puts on a snapshot for a user-namespaced pod (uid ranges).
pub const LABEL_UID_MAPPING: &str = "containerd.io/snapshot/uidmapping";
/// Label containerd 2.x puts on a snapshot for a user-namespaced pod (gid ranges).
pub const LABEL_GID_MAPPING: &str = "containerd.io/snapshot/gidmapping";

/// Errors of this module.
#[derive(Debug, Error)]
pub enum IdmapError {
    /// A mapping string did not parse.
    #[error("invalid id mapping {value:?}: {reason}")]
    Invalid {
        /// The text as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Creating the helper user namespace failed.
    #[error("creating user namespace for id mapping: {op}: {source}")]
    Userns {
        /// Which step failed.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// One contiguous range: container ids `[container, container+size)` are host ids
/// `[host, host+size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// First id inside the namespace.
    pub container: u32,
    /// First id on the host.
    pub host: u32,
    /// Number of ids.
    pub size: u32,
}

/// A list of ranges, as in `/proc/<pid>/uid_map`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdMap(pub Vec<IdRange>);

impl IdMap {
    /// Parses containerd's syntax `ctr:host:size[,ctr:host:size...]`.
    pub fn parse(s: &str) -> Result<Self, IdmapError> {
        let invalid = |reason| IdmapError::Invalid {
            value: s.to_string(),
            reason,
        };
        let mut ranges = Vec::new();
        for part in s.split(',') {
            let mut it = part.trim().split(':');
            let (Some(c), Some(h), Some(n), None) = (it.next(), it.next(), it.next(), it.next())
            else {
                return Err(invalid("want container-id:host-id:size[,...]"));
            };
            let num = |x: &str| {
                x.parse::<u32>()
                    .map_err(|_| invalid("ids and size must be unsigned 32-bit integers"))
            };
            let r = IdRange {
                container: num(c)?,
                host: num(h)?,
                size: num(n)?,
            };
            if r.size == 0 {
                return Err(invalid("size must not be 0"));
            }
            if r.container.checked_add(r.size - 1).is_none()
                || r.host.checked_add(r.size - 1).is_none()
            {
                return Err(invalid("range overflows 32 bits"));
            }
            ranges.push(r);
        }
        if ranges.is_empty() {
            return Err(invalid("empty mapping"));
        }
        Ok(IdMap(ranges))
    }

    /// The host id that maps to `id` inside the namespace, if any.
    pub fn to_host(&self, id: u32) -> Option<u32> {
        self.0.iter().find_map(|r| {
            (id >= r.container && id - r.container < r.size).then(|| r.host + (id - r.container))
        })
    }

    /// The host id of the namespace's root (id 0), the owner of upper and work dirs.
    pub fn root_host_id(&self) -> Option<u32> {
        self.to_host(0)
    }

    fn proc_format(&self) -> String {
        self.0
            .iter()
            .map(|r| format!("{} {} {}\n", r.container, r.host, r.size))
            .collect()
    }
}

impl fmt::Display for IdMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}:{}:{}", r.container, r.host, r.size)?;
        }
        Ok(())
    }
}

/// An open user namespace carrying a uid and gid mapping; pass it to
/// `mount_setattr(MOUNT_ATTR_IDMAP)`. The helper process is already gone: the fd alone keeps
/// the namespace alive.
#[derive(Debug)]
pub struct Userns {
    fd: OwnedFd,
}

impl AsFd for Userns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Userns {
    /// Creates a user namespace with these mappings.
    ///
    /// A helper child is cloned straight into a new user namespace; it closes every inherited
    /// fd before anything else and only waits. The parent writes its `uid_map` / `gid_map`,
    /// opens `/proc/<pid>/ns/user`, then kills and reaps it.
    pub fn new(uid: &IdMap, gid: &IdMap) -> Result<Self, IdmapError> {
        let err = |op| move |source| IdmapError::Userns { op, source };
        let pid = sys::spawn_userns_child().map_err(err("clone(CLONE_NEWUSER)"))?;
        let res = (|| {
            let write_map = |file: &str, map: &IdMap, op| {
                let mut f = File::options()
                    .write(true)
                    .open(format!("/proc/{pid}/{file}"))
                    .map_err(err(op))?;
                f.write_all(map.proc_format().as_bytes()).map_err(err(op))
            };
            write_map("uid_map", uid, "write uid_map")?;
            write_map("gid_map", gid, "write gid_map")?;
            let f = File::open(format!("/proc/{pid}/ns/user")).map_err(err("open ns/user"))?;
            Ok(Userns { fd: f.into() })
        })();
        sys::kill_and_reap(pid);
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format() {
        let m = IdMap::parse("0:100000:65536,70000:1000:1").expect("parse");
        assert_eq!(m.0.len(), 2);
        assert_eq!(m.to_string(), "0:100000:65536,70000:1000:1");
        assert_eq!(m.root_host_id(), Some(100000));
        assert_eq!(m.to_host(70000), Some(1000));
        assert_eq!(m.to_host(65536), None);
        for bad in ["", "0:1", "0:1:2:3", "a:1:2", "0:1:0", "0:4294967295:2"] {
            assert!(IdMap::parse(bad).is_err(), "{bad}");
        }
    }
}
