//! The container's namespaces: the pod's joined through its pause, or its own.

use super::*;

pub(super) fn join(
    ty: LinuxNamespaceType,
    pid: u32,
    name: &str,
) -> Result<LinuxNamespace, SpecError> {
    Ok(LinuxNamespaceBuilder::default()
        .typ(ty)
        .path(format!("/proc/{pid}/ns/{name}"))
        .build()?)
}

pub(super) fn fresh(ty: LinuxNamespaceType) -> Result<LinuxNamespace, SpecError> {
    Ok(LinuxNamespaceBuilder::default().typ(ty).build()?)
}

/// Join the pause process's namespaces as the modes say; a new mount namespace always.
pub fn namespaces(
    opts: &pb::NamespaceOption,
    host_network: bool,
    ctx: &SpecContext<'_>,
) -> Result<Vec<LinuxNamespace>, SpecError> {
    let p = ctx.pause_pid;
    let mode = |field: &str, v: i32| {
        NamespaceMode::try_from(v)
            .map_err(|_| invalid(field, format!("unknown namespace mode {v}")))
    };
    let mut ns = vec![fresh(LinuxNamespaceType::Mount)?];
    if !host_network {
        ns.push(join(LinuxNamespaceType::Network, p, "net")?);
        ns.push(join(LinuxNamespaceType::Uts, p, "uts")?);
    }
    match mode("namespace_options.ipc", opts.ipc)? {
        NamespaceMode::Node => {}
        NamespaceMode::Container => ns.push(fresh(LinuxNamespaceType::Ipc)?),
        _ => ns.push(join(LinuxNamespaceType::Ipc, p, "ipc")?),
    }
    match mode("namespace_options.pid", opts.pid)? {
        NamespaceMode::Node => {}
        NamespaceMode::Pod => ns.push(join(LinuxNamespaceType::Pid, p, "pid")?),
        NamespaceMode::Container => ns.push(fresh(LinuxNamespaceType::Pid)?),
        NamespaceMode::Target => {
            let t = ctx.target_pid.ok_or_else(|| {
                invalid(
                    "namespace_options.target_id",
                    format!("target container {:?} is not running", opts.target_id),
                )
            })?;
            ns.push(join(LinuxNamespaceType::Pid, t, "pid")?);
        }
    }
    if ctx.idmap.is_some() {
        // Containers join the pod's user namespace, which the shim created for the pause.
        ns.push(join(LinuxNamespaceType::User, p, "user")?);
    }
    if ctx.cgroup_v2 {
        ns.push(fresh(LinuxNamespaceType::Cgroup)?);
    }
    Ok(ns)
}
