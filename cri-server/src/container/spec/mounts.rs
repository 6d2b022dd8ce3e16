//! The container's mounts (CRI mounts, sandbox files, /dev/shm, the defaults), rootfs
//! propagation, and the devices it is given.

use super::*;

pub(super) fn mount(dest: &str, typ: &str, src: &str, opts: &[&str]) -> Result<Mount, SpecError> {
    Ok(MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(src)
        .options(opts.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()?)
}

/// Base mounts, sandbox files, then the CRI mounts; a CRI mount replaces any earlier mount at
/// the same destination. Sorted by depth so a parent is mounted before what is inside it.
pub fn mounts(
    ctr: &ContainerConfig,
    ctx: &SpecContext<'_>,
    privileged: bool,
) -> Result<Vec<Mount>, SpecError> {
    let mut out = base_mounts(privileged)?;
    let cri_dests: HashSet<String> = ctr
        .mounts
        .iter()
        .map(|m| m.container_path.trim_end_matches('/').to_string())
        .collect();
    let has_shm = ctx.sandbox_mounts.iter().any(|(d, _)| d == "/dev/shm");
    if !has_shm && !cri_dests.contains("/dev/shm") {
        out.push(mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?);
    }
    sandbox_mounts(ctr, ctx, &cri_dests, &mut out)?;
    for (i, m) in ctr.mounts.iter().enumerate() {
        let mount = cri_mount(i, m, ctx)?;
        out.retain(|x| x.destination() != mount.destination());
        out.push(mount);
    }
    // Stable: mounts at the same depth keep their order.
    out.sort_by_key(|m| m.destination().components().count());
    Ok(out)
}

/// The mounts every container gets: proc, a tmpfs /dev with pts and mqueue, sysfs and the
/// cgroup filesystem (read-only unless privileged).
fn base_mounts(privileged: bool) -> Result<Vec<Mount>, SpecError> {
    let ro_sys = if privileged { "rw" } else { "ro" };
    Ok(vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", ro_sys],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", ro_sys],
        )?,
    ])
}

/// The pod's files (hosts, resolv.conf, hostname) and its /dev/shm, bound in unless a CRI
/// mount takes the destination.
fn sandbox_mounts(
    ctr: &ContainerConfig,
    ctx: &SpecContext<'_>,
    cri_dests: &HashSet<String>,
    out: &mut Vec<Mount>,
) -> Result<(), SpecError> {
    for (dest, src) in &ctx.sandbox_mounts {
        if cri_dests.contains(dest.as_str()) {
            continue;
        }
        // /etc/hosts and friends are writable by root in the container, as under containerd;
        // /dev/shm is the pod's shared one.
        let mut opts = vec!["rbind", "rprivate"];
        if dest == "/dev/shm" {
            opts.extend(["nosuid", "nodev", "noexec"]);
        }
        if dest != "/dev/shm"
            && ctr
                .linux
                .as_ref()
                .and_then(|l| l.security_context.as_ref())
                .is_some_and(|s| s.readonly_rootfs)
        {
            opts.push("ro");
        } else {
            opts.push("rw");
        }
        out.push(mount(dest, "bind", src, &opts)?);
    }
    Ok(())
}

/// One CRI mount (`mounts[i]`), checked: an absolute destination, a host path (or an image
/// volume crispd mounted), a known propagation, recursive read-only only when read-only and
/// private.
fn cri_mount(i: usize, m: &pb::Mount, ctx: &SpecContext<'_>) -> Result<Mount, SpecError> {
    let field = |f: &str| format!("mounts[{i}].{f}");
    if !m.container_path.starts_with('/') {
        return Err(invalid(
            field("container_path"),
            format!("{:?} is not absolute", m.container_path),
        ));
    }
    let image_source = if m.image.is_some() {
        if !m.host_path.is_empty() {
            return Err(invalid(
                field("host_path"),
                format!("{:?} given with an image volume", m.host_path),
            ));
        }
        // Prepared by CreateContainer before the spec (container::image_volume).
        let src = ctx
            .image_volumes
            .iter()
            .find(|(n, _)| *n == i)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| invalid(field("image"), "image volume was not prepared"))?;
        Some(src)
    } else {
        None
    };
    if image_source.is_none() && m.host_path.is_empty() {
        return Err(invalid(field("host_path"), "empty"));
    }
    let prop = match MountPropagation::try_from(m.propagation) {
        Ok(MountPropagation::PropagationPrivate) => "rprivate",
        Ok(MountPropagation::PropagationHostToContainer) => "rslave",
        Ok(MountPropagation::PropagationBidirectional) => "rshared",
        Err(_) => {
            return Err(invalid(
                field("propagation"),
                format!("unknown value {}", m.propagation),
            ));
        }
    };
    if m.recursive_read_only && !m.readonly {
        return Err(invalid(field("recursive_read_only"), "needs readonly too"));
    }
    if m.recursive_read_only && prop != "rprivate" {
        return Err(invalid(
            field("recursive_read_only"),
            "needs private propagation",
        ));
    }
    let dest = m.container_path.trim_end_matches('/');
    let dest = if dest.is_empty() { "/" } else { dest };
    if let Some(src) = image_source {
        // An image volume is read-only whatever the mount asks (KEP-4639), and never carries
        // devices or set-id bits of the image into effect.
        return mount(
            dest,
            "bind",
            &src,
            &["rbind", prop, "ro", "nosuid", "nodev"],
        );
    }
    let mut opts = vec!["rbind", prop, if m.readonly { "ro" } else { "rw" }];
    if m.recursive_read_only {
        opts.push("rro");
    }
    mount(dest, "bind", &m.host_path, &opts)
}

/// The propagation of the container's root mount, as containerd sets it: a bidirectional
/// volume needs a shared root (else mounts made in the container never reach the host, the
/// volume being a slave of the runtime's default rslave root), a host-to-container one at
/// least a slave root. None keeps runc's default (rslave) root.
pub fn rootfs_propagation(ctr: &ContainerConfig) -> Option<String> {
    let has = |p: MountPropagation| ctr.mounts.iter().any(|m| m.propagation == p as i32);
    if has(MountPropagation::PropagationBidirectional) {
        Some("rshared".into())
    } else if has(MountPropagation::PropagationHostToContainer) {
        Some("rslave".into())
    } else {
        None
    }
}

pub(super) fn device_of(info: &DeviceInfo, dest: &str) -> Result<LinuxDevice, SpecError> {
    let typ = if info.kind == 'b' {
        LinuxDeviceType::B
    } else {
        LinuxDeviceType::C
    };
    Ok(LinuxDeviceBuilder::default()
        .path(dest)
        .typ(typ)
        .major(info.major)
        .minor(info.minor)
        .file_mode(info.mode)
        .uid(info.uid)
        .gid(info.gid)
        .build()?)
}

pub(super) fn devices(
    ctr: &ContainerConfig,
    privileged: bool,
    host: &dyn HostInfo,
) -> Result<(Vec<LinuxDevice>, Vec<LinuxDeviceCgroup>), SpecError> {
    let mut devs = Vec::new();
    let mut rules = Vec::new();
    if privileged {
        for d in host.host_devices() {
            devs.push(device_of(&d, &d.path.display().to_string())?);
        }
    }
    for (i, d) in ctr.devices.iter().enumerate() {
        let field = format!("devices[{i}]");
        let perms = if d.permissions.is_empty() {
            "rwm"
        } else {
            d.permissions.as_str()
        };
        if !perms.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
            return Err(invalid(
                format!("{field}.permissions"),
                format!("{perms:?} is not a subset of \"rwm\""),
            ));
        }
        let info = host
            .device(Path::new(&d.host_path))
            .map_err(|e| SpecError::Missing {
                field: format!("{field}.host_path"),
                message: format!("{}: {e}", d.host_path),
            })?;
        let dest = if d.container_path.is_empty() {
            &d.host_path
        } else {
            &d.container_path
        };
        devs.retain(|x: &LinuxDevice| x.path() != Path::new(dest));
        devs.push(device_of(&info, dest)?);
        rules.push(
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(if info.kind == 'b' {
                    LinuxDeviceType::B
                } else {
                    LinuxDeviceType::C
                })
                .major(info.major)
                .minor(info.minor)
                .access(perms)
                .build()?,
        );
    }
    Ok((devs, rules))
}
