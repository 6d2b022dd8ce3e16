//! One cgroup placement (DESIGN.md promise 2).
//!
//! Every process of a pod — the sandbox and each container — gets its OCI
//! `linux.cgroupsPath` from [`cgroup_path`], and nothing else in the shim writes
//! that field. Its inputs are the cgroup driver, the pod's cgroup parent and the
//! task id; there is deliberately no parameter for user namespaces, IO ownership
//! or runtime options, so none of them can move a container out of its pod
//! (containerd 2.0.1–2.0.4 put userns containers under `system.slice` because the
//! runtime options that carried the driver were replaced by the IO owner ids).

use std::fmt;

/// Prefix of every cgroup the shim creates, so `crisp-<id>` is recognisably ours.
pub const CGROUP_PREFIX: &str = "crisp";

/// Which cgroup manager the OCI runtime talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    /// Paths written directly under the cgroup mount: `/<parent>/crisp-<id>`.
    Cgroupfs,
    /// systemd transient units: `<slice>:crisp:<id>` (runc/crun's `slice:prefix:name`).
    Systemd,
}

impl fmt::Display for CgroupDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupDriver::Cgroupfs => "cgroupfs",
            CgroupDriver::Systemd => "systemd",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error(
        "task id {0:?} cannot name a cgroup: it must be non-empty and free of '/', ':' and NUL"
    )]
    InvalidId(String),
    #[error("cgroup parent {0:?} is not a valid systemd slice name: {1}")]
    InvalidSlice(String, &'static str),
    #[error("cgroup parent {0:?} is not a valid cgroupfs path: {1}")]
    InvalidPath(String, &'static str),
    #[error("the systemd cgroup driver needs a pod slice as cgroup parent, got an empty one")]
    EmptySlice,
}

/// The OCI `linux.cgroupsPath` for task `id` of the pod whose cgroup parent is `parent`.
///
/// - cgroupfs: `/<parent>/crisp-<id>`; `parent` is a path such as
///   `/kubepods/burstable/pod<uid>` (leading/trailing slashes are normalised).
/// - systemd: `<slice>:crisp:<id>`; `parent` is the pod slice
///   (`kubepods-burstable-pod<uid>.slice`) or a path ending in one
///   (`/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice`).
///   The runtime expands the slice the way [`expand_slice`] does.
pub fn cgroup_path(driver: CgroupDriver, parent: &str, id: &str) -> Result<String, PlacementError> {
    validate_id(id)?;
    match driver {
        CgroupDriver::Cgroupfs => {
            let parent = normalise_path(parent)?;
            Ok(format!("{parent}/{CGROUP_PREFIX}-{id}"))
        }
        CgroupDriver::Systemd => {
            let slice = parent
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or_default();
            if slice.is_empty() {
                return Err(PlacementError::EmptySlice);
            }
            // Validates the name; the expansion itself is the runtime's job.
            expand_slice(slice)?;
            Ok(format!("{slice}:{CGROUP_PREFIX}:{id}"))
        }
    }
}

/// Where a `cgroupsPath` lands inside each cgroup hierarchy, relative to its root
/// (what `/proc/<pid>/cgroup` shows for that process).
pub fn resolved_path(driver: CgroupDriver, cgroups_path: &str) -> Result<String, PlacementError> {
    match driver {
        CgroupDriver::Cgroupfs => normalise_path(cgroups_path),
        CgroupDriver::Systemd => {
            let mut parts = cgroups_path.splitn(3, ':');
            let (slice, prefix, name) = match (parts.next(), parts.next(), parts.next()) {
                (Some(s), Some(p), Some(n)) => (s, p, n),
                _ => {
                    return Err(PlacementError::InvalidSlice(
                        cgroups_path.to_string(),
                        "expected slice:prefix:name",
                    ));
                }
            };
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            let dir = expand_slice(slice)?;
            // runc and crun name the unit `<prefix>-<name>.scope`.
            Ok(format!("{dir}/{prefix}-{name}.scope"))
        }
    }
}

/// Expands a systemd slice name into its cgroup path the way systemd does
/// (`unit_name_to_path` / runc's `ExpandSlice`): every `-` separates a parent
/// slice, so `a-b-c.slice` lives at `/a.slice/a-b.slice/a-b-c.slice`.
/// A literal dash inside a component is written `\x2d` (see [`systemd_escape`])
/// and so never splits. `-.slice` is the root slice.
pub fn expand_slice(slice: &str) -> Result<String, PlacementError> {
    let bad = |why| PlacementError::InvalidSlice(slice.to_string(), why);
    let Some(name) = slice.strip_suffix(".slice") else {
        return Err(bad("it does not end in .slice"));
    };
    if slice.len() > 255 {
        return Err(bad("longer than systemd's 255-byte unit name limit"));
    }
    if name == "-" {
        return Ok(String::new());
    }
    if name.is_empty() {
        return Err(bad("empty name"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'-' | b'_' | b'.' | b'\\'))
    {
        return Err(bad(
            "it holds a character systemd does not allow in unit names",
        ));
    }
    let mut path = String::new();
    let mut prefix = String::new();
    for component in name.split('-') {
        if component.is_empty() {
            return Err(bad(
                "a leading, trailing or doubled '-' makes an empty slice component",
            ));
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(component);
        path.push('/');
        path.push_str(&prefix);
        path.push_str(".slice");
    }
    Ok(path)
}

/// systemd's name escaping (`systemd-escape`): keeps `[A-Za-z0-9:_.]`, turns `/`
/// into `-`, writes everything else (including `-`) as `\xNN`, and escapes a
/// leading `.`. Use it to build a slice component from arbitrary text.
pub fn systemd_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, b) in s.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric() || matches!(b, b':' | b'_') || (b == b'.' && i > 0);
        if b == b'/' {
            out.push('-');
        } else if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

fn validate_id(id: &str) -> Result<(), PlacementError> {
    if id.is_empty() || id.contains(['/', ':', '\0']) || id == "." || id == ".." {
        return Err(PlacementError::InvalidId(id.to_string()));
    }
    Ok(())
}

/// `kubepods//burstable/` → `/kubepods/burstable`; refuses `..` so a parent
/// can never escape the hierarchy.
fn normalise_path(path: &str) -> Result<String, PlacementError> {
    let mut out = String::new();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return Err(PlacementError::InvalidPath(
                path.to_string(),
                "'..' is not allowed",
            ));
        }
        if part.contains('\0') {
            return Err(PlacementError::InvalidPath(path.to_string(), "NUL byte"));
        }
        out.push('/');
        out.push_str(part);
    }
    Ok(out)
}

/// Recovers the pod's cgroup parent from a `cgroupsPath` someone else wrote
/// (containerd's CRI plugin fills it in with its own naming, e.g.
/// `/kubepods/burstable/pod<uid>/<id>` or `kubepods-…slice:cri-containerd:<id>`),
/// so the shim can re-place the task with [`cgroup_path`].
pub fn parent_of(cgroups_path: &str) -> Option<String> {
    if cgroups_path.is_empty() {
        return None;
    }
    let parts: Vec<&str> = cgroups_path.split(':').collect();
    if parts.len() == 3 {
        return Some(parts[0].to_string()).filter(|s| !s.is_empty());
    }
    let trimmed = cgroups_path.trim_end_matches('/');
    let (parent, _) = trimmed.rsplit_once('/')?;
    Some(if parent.is_empty() {
        "/".to_string()
    } else {
        parent.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug)]
    enum Qos {
        Guaranteed,
        Burstable,
        BestEffort,
    }

    const UID: &str = "5f1d2c3b_9a8e_4d7c_b6a5_0f1e2d3c4b5a";
    const ID: &str = "0123456789abcdef";

    /// The cgroup parent kubelet hands over for a pod of this QoS class.
    fn kubelet_parent(driver: CgroupDriver, qos: Qos) -> String {
        match (driver, qos) {
            (CgroupDriver::Cgroupfs, Qos::Guaranteed) => format!("/kubepods/pod{UID}"),
            (CgroupDriver::Cgroupfs, Qos::Burstable) => format!("/kubepods/burstable/pod{UID}"),
            (CgroupDriver::Cgroupfs, Qos::BestEffort) => format!("/kubepods/besteffort/pod{UID}"),
            (CgroupDriver::Systemd, Qos::Guaranteed) => format!("kubepods-pod{UID}.slice"),
            (CgroupDriver::Systemd, Qos::Burstable) => format!("kubepods-burstable-pod{UID}.slice"),
            (CgroupDriver::Systemd, Qos::BestEffort) => {
                format!("kubepods-besteffort-pod{UID}.slice")
            }
        }
    }

    /// Everything a create request carries, including the inputs that must *not*
    /// influence placement. Only driver, parent and id are passed on: the type
    /// system, not discipline, keeps the rest out.
    struct Task {
        driver: CgroupDriver,
        parent: String,
        id: &'static str,
        #[allow(dead_code)]
        userns: Option<(u32, u32)>,
    }

    fn place(task: &Task) -> String {
        cgroup_path(task.driver, &task.parent, task.id).expect("valid placement")
    }

    #[test]
    fn matrix_driver_qos_userns_same_form() {
        for driver in [CgroupDriver::Cgroupfs, CgroupDriver::Systemd] {
            for qos in [Qos::Guaranteed, Qos::Burstable, Qos::BestEffort] {
                let parent = kubelet_parent(driver, qos);
                let plain = Task {
                    driver,
                    parent: parent.clone(),
                    id: ID,
                    userns: None,
                };
                let userns = Task {
                    driver,
                    parent: parent.clone(),
                    id: ID,
                    userns: Some((65536, 65536)),
                };
                let sandbox = Task {
                    driver,
                    parent: parent.clone(),
                    id: "sandbox0",
                    userns: Some((65536, 65536)),
                };
                let (p, u, s) = (place(&plain), place(&userns), place(&sandbox));
                assert_eq!(
                    p, u,
                    "{driver} {qos:?}: user namespace changed the placement"
                );

                let expected = match driver {
                    CgroupDriver::Cgroupfs => format!("{parent}/crisp-{ID}"),
                    CgroupDriver::Systemd => format!("{parent}:crisp:{ID}"),
                };
                assert_eq!(p, expected, "{driver} {qos:?}");
                // The sandbox has the same form, differing only by id.
                assert_eq!(
                    s,
                    expected.replace(ID, "sandbox0"),
                    "{driver} {qos:?} sandbox"
                );

                // And it resolves to a cgroup under the pod's own cgroup.
                let resolved = resolved_path(driver, &p).expect("resolves");
                let pod_dir = match driver {
                    CgroupDriver::Cgroupfs => parent.clone(),
                    CgroupDriver::Systemd => expand_slice(&parent).expect("slice"),
                };
                assert!(
                    resolved.starts_with(&format!("{pod_dir}/")),
                    "{resolved} not under {pod_dir}"
                );
                assert!(!resolved.contains("system.slice"), "{resolved}");
                let leaf = resolved.rsplit('/').next().unwrap_or_default();
                assert!(
                    leaf == format!("crisp-{ID}") || leaf == format!("crisp-{ID}.scope"),
                    "{leaf}"
                );
            }
        }
    }

    #[test]
    fn slice_expansion_matches_systemd() {
        assert_eq!(
            expand_slice(&format!("kubepods-burstable-pod{UID}.slice")).as_deref(),
            Ok(format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID}.slice"
            )
            .as_str())
        );
        assert_eq!(
            expand_slice("kubepods.slice").as_deref(),
            Ok("/kubepods.slice")
        );
        assert_eq!(expand_slice("-.slice").as_deref(), Ok(""));
        // An escaped dash is part of its component, as in systemd.
        assert_eq!(
            expand_slice("kubepods-pod1\\x2d2.slice").as_deref(),
            Ok("/kubepods.slice/kubepods-pod1\\x2d2.slice")
        );
        for bad in [
            "kubepods",
            "-kubepods.slice",
            "kubepods-.slice",
            "a--b.slice",
            "a/b.slice",
            "a b.slice",
            ".slice",
        ] {
            assert!(expand_slice(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn escape_like_systemd_escape() {
        assert_eq!(systemd_escape("pod1-2"), "pod1\\x2d2");
        assert_eq!(systemd_escape("a/b"), "a-b");
        assert_eq!(systemd_escape(".hidden"), "\\x2ehidden");
        assert_eq!(systemd_escape("a b"), "a\\x20b");
        let slice = format!("kubepods-besteffort-pod{}.slice", systemd_escape("12-34"));
        assert_eq!(
            expand_slice(&slice).as_deref(),
            Ok("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12\\x2d34.slice")
        );
    }

    #[test]
    fn systemd_parent_given_as_path_uses_its_slice() {
        let path =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID}.slice");
        assert_eq!(
            cgroup_path(CgroupDriver::Systemd, &path, ID),
            Ok(format!("kubepods-burstable-pod{UID}.slice:crisp:{ID}"))
        );
    }

    #[test]
    fn rejects_what_cannot_be_placed() {
        assert!(cgroup_path(CgroupDriver::Cgroupfs, "/kubepods", "a/b").is_err());
        assert!(cgroup_path(CgroupDriver::Cgroupfs, "/kubepods", "").is_err());
        assert!(cgroup_path(CgroupDriver::Cgroupfs, "/kubepods/../etc", ID).is_err());
        assert!(cgroup_path(CgroupDriver::Systemd, "", ID).is_err());
        assert!(cgroup_path(CgroupDriver::Systemd, "/kubepods/burstable", ID).is_err());
        assert_eq!(
            cgroup_path(CgroupDriver::Cgroupfs, "kubepods//x/", ID),
            Ok(format!("/kubepods/x/crisp-{ID}"))
        );
        assert_eq!(
            cgroup_path(CgroupDriver::Cgroupfs, "", ID),
            Ok(format!("/crisp-{ID}"))
        );
    }

    #[test]
    fn parent_recovered_from_foreign_paths() {
        assert_eq!(
            parent_of("/kubepods/burstable/podX/abc").as_deref(),
            Some("/kubepods/burstable/podX")
        );
        assert_eq!(
            parent_of("kubepods-burstable-podX.slice:cri-containerd:abc").as_deref(),
            Some("kubepods-burstable-podX.slice")
        );
        assert_eq!(parent_of("/abc").as_deref(), Some("/"));
        assert_eq!(parent_of(""), None);
        assert_eq!(parent_of("abc"), None);
    }
}
