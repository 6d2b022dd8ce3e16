//! Capabilities, AppArmor, and seccomp: containerd's defaults and what the security
//! context asks for.

use super::*;

/// The CapEff bitmap of a /proc/<pid>/status text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The known capabilities (ALL_CAPS is in bit order) whose bits are set; unknown bits are
/// ignored, as containerd's cap.FromBitmap does.
pub fn caps_from_bitmap(bits: u64) -> Capabilities {
    ALL_CAPS
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1u64 << i) != 0)
        .filter_map(|(_, n)| Capability::from_str(n).ok())
        .collect()
}

/// Capabilities every container gets unless it drops them (containerd's and Docker's set).
pub const DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

pub(super) fn parse_cap(field: &str, s: &str) -> Result<Capability, SpecError> {
    let name = s.trim().to_ascii_uppercase();
    let name = name.strip_prefix("CAP_").unwrap_or(&name);
    Capability::from_str(name).map_err(|_| invalid(field, format!("unknown capability {s:?}")))
}

/// Every capability the kernel has (as of 5.9), in bit order (index = capability number).
pub const ALL_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

pub(super) fn all_caps() -> Capabilities {
    ALL_CAPS
        .iter()
        .filter_map(|n| Capability::from_str(n).ok())
        .collect()
}

/// Default set, plus adds, minus drops, as containerd's CRI plugin does: add ["ALL"] means
/// `current` (the capabilities crispd holds, not every capability the kernel knows: runc
/// cannot grant more than its caller has), then drop ["ALL"] empties the set, then the single
/// adds and drops apply (drop ALL + add X is the usual least-privilege pattern). A privileged
/// container gets exactly `current`. A single add outside `current` is passed on as
/// containerd does (runc refuses it when the container is created).
pub fn capabilities(
    sc: &pb::LinuxContainerSecurityContext,
    privileged: bool,
    current: &Capabilities,
) -> Result<oci_spec::runtime::LinuxCapabilities, SpecError> {
    let c = sc.capabilities.clone().unwrap_or_default();
    let mut set: Capabilities = if privileged {
        current.clone()
    } else {
        DEFAULT_CAPS
            .iter()
            .map(|n| parse_cap("default", n))
            .collect::<Result<_, _>>()?
    };
    if !privileged {
        let is_all = |v: &[String]| v.iter().any(|s| s.eq_ignore_ascii_case("ALL"));
        if is_all(&c.add_capabilities) {
            set = current.clone();
        }
        if is_all(&c.drop_capabilities) {
            set.clear();
        }
        for a in c
            .add_capabilities
            .iter()
            .filter(|s| !s.eq_ignore_ascii_case("ALL"))
        {
            set.insert(parse_cap(
                "linux.security_context.capabilities.add_capabilities",
                a,
            )?);
        }
        for d in c
            .drop_capabilities
            .iter()
            .filter(|s| !s.eq_ignore_ascii_case("ALL"))
        {
            set.remove(&parse_cap(
                "linux.security_context.capabilities.drop_capabilities",
                d,
            )?);
        }
    }
    let mut ambient: Capabilities = HashSet::new();
    for a in &c.add_ambient_capabilities {
        let cap = parse_cap(
            "linux.security_context.capabilities.add_ambient_capabilities",
            a,
        )?;
        // An ambient capability must also be permitted and inheritable.
        set.insert(cap);
        ambient.insert(cap);
    }
    Ok(LinuxCapabilitiesBuilder::default()
        .bounding(set.clone())
        .effective(set.clone())
        .permitted(set)
        .inheritable(ambient.clone())
        .ambient(ambient)
        .build()?)
}

pub(super) fn apparmor_profile(
    sc: &pb::LinuxContainerSecurityContext,
) -> Result<Option<String>, SpecError> {
    // Only an explicit Localhost profile is applied: crispd loads no profile of its own, and
    // naming one the kernel does not have would fail every container.
    #[allow(deprecated)]
    let legacy = sc.apparmor_profile.clone();
    match &sc.apparmor {
        Some(p) if ProfileType::try_from(p.profile_type) == Ok(ProfileType::Localhost) => {
            if p.localhost_ref.is_empty() {
                return Err(invalid(
                    "linux.security_context.apparmor.localhost_ref",
                    "empty",
                ));
            }
            Ok(Some(p.localhost_ref.clone()))
        }
        Some(_) => Ok(None),
        None => Ok(legacy.strip_prefix("localhost/").map(str::to_string)),
    }
}

/// containerd's default masked paths.
pub const DEFAULT_MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// containerd's default read-only paths.
pub const DEFAULT_READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Syscalls the RuntimeDefault profile refuses with EPERM. A deny list, not moby's allow list:
/// it blocks what Docker's default profile blocks for a container without extra capabilities
/// (kernel modules, kexec, keyrings, clock and swap changes, mounting, bpf, perf, ptrace of
/// other tasks' memory, userfaultfd), while letting new syscalls through rather than breaking
/// images built for newer kernels.
pub const DEFAULT_DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "syslog",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

pub(super) fn native_arches() -> Vec<Arch> {
    match std::env::consts::ARCH {
        "x86_64" => vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32],
        "aarch64" => vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm],
        _ => vec![Arch::ScmpArchNative],
    }
}

pub fn default_seccomp() -> Result<LinuxSeccomp, SpecError> {
    Ok(LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(native_arches())
        .syscalls(vec![
            LinuxSyscallBuilder::default()
                .names(
                    DEFAULT_DENIED_SYSCALLS
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>(),
                )
                .action(LinuxSeccompAction::ScmpActErrno)
                .errno_ret(libc::EPERM as u32)
                .build()?,
        ])
        .build()?)
}

/// RuntimeDefault → our default profile; Unconfined (or nothing said) → none; Localhost → the
/// profile file, in OCI `linux.seccomp` JSON (Docker's format parses the same for the fields
/// both have).
pub fn seccomp(
    sc: &pb::LinuxContainerSecurityContext,
    host: &dyn HostInfo,
) -> Result<Option<LinuxSeccomp>, SpecError> {
    #[allow(deprecated)]
    let legacy = sc.seccomp_profile_path.clone();
    let (kind, path) = match &sc.seccomp {
        Some(p) => (
            ProfileType::try_from(p.profile_type).ok(),
            p.localhost_ref.clone(),
        ),
        None => match legacy.as_str() {
            "" | "unconfined" => (Some(ProfileType::Unconfined), String::new()),
            "runtime/default" | "docker/default" => {
                (Some(ProfileType::RuntimeDefault), String::new())
            }
            other => match other.strip_prefix("localhost/") {
                Some(p) => (Some(ProfileType::Localhost), p.to_string()),
                None => {
                    return Err(invalid(
                        "linux.security_context.seccomp_profile_path",
                        format!("{other:?} is not runtime/default, unconfined or localhost/<path>"),
                    ));
                }
            },
        },
    };
    match kind {
        Some(ProfileType::Unconfined) => Ok(None),
        Some(ProfileType::RuntimeDefault) => Ok(Some(default_seccomp()?)),
        Some(ProfileType::Localhost) => {
            let field = "linux.security_context.seccomp.localhost_ref";
            if !path.starts_with('/') {
                return Err(invalid(field, format!("{path:?} is not an absolute path")));
            }
            let text = host
                .read_profile(Path::new(&path))
                .map_err(|e| SpecError::Missing {
                    field: field.into(),
                    message: format!("{path}: {e}"),
                })?;
            let p: LinuxSeccomp = serde_json::from_str(&text)
                .map_err(|e| invalid(field, format!("{path}: not a seccomp profile: {e}")))?;
            Ok(Some(p))
        }
        None => Err(invalid(
            "linux.security_context.seccomp.profile_type",
            "unknown profile type",
        )),
    }
}
