//! The OCI runtime spec of a container, as a pure function of (pod config, container config,
//! image config, context). Everything it needs from the host (device numbers, a Localhost
//! seccomp profile, the host's devices for privileged containers) comes through [`HostInfo`],
//! so the whole of it is unit-tested with a fake.
//!
//! The choices follow containerd's CRI plugin, so that a container behaves the same under
//! crispd and containerd: command/args precedence, default capabilities, masked and read-only
//! paths, propagation names, sandbox files mounted over /etc/hosts and /etc/resolv.conf.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crisp_proto::cri::v1::{
    self as pb, ContainerConfig, MountPropagation, NamespaceMode, PodSandboxConfig,
    SupplementalGroupsPolicy, security_profile::ProfileType,
};
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Arch, Capabilities, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder,
    LinuxDevice, LinuxDeviceBuilder, LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    LinuxHugepageLimitBuilder, LinuxIdMappingBuilder, LinuxMemoryBuilder, LinuxNamespace,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, LinuxSeccomp,
    LinuxSeccompAction, LinuxSeccompBuilder, LinuxSyscallBuilder, Mount, MountBuilder,
    ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use crate::config::CgroupDriver;
use crate::pod::idmap::PodIdMap;
use crate::error::{ErrorKind, HasKind};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A field of the CRI request is wrong; `field` is its path in the request.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// Something the request names does not exist on this host (a device, a profile).
    #[error("{field}: {message}")]
    Missing { field: String, message: String },
    #[error("building OCI spec: {0}")]
    Oci(#[from] oci_spec::OciSpecError),
}

impl HasKind for SpecError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid { .. } => ErrorKind::InvalidArgument,
            Self::Missing { .. } => ErrorKind::FailedPrecondition,
            Self::Oci(_) => ErrorKind::Internal,
        }
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A device node as the host has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub path: PathBuf,
    /// 'c' or 'b'.
    pub kind: char,
    pub major: i64,
    pub minor: i64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// What the spec builder may ask of the host.
pub trait HostInfo {
    fn device(&self, path: &Path) -> Result<DeviceInfo, String>;
    /// Every device under /dev, for privileged containers.
    fn host_devices(&self) -> Vec<DeviceInfo>;
    /// The text of a Localhost seccomp profile.
    fn read_profile(&self, path: &Path) -> Result<String, String>;
    /// The capabilities crispd itself holds (its effective set, known names only): what a
    /// privileged container or add ["ALL"] gets, as containerd's cap.Current(). runc cannot
    /// grant a container a capability its caller lacks ("unable to apply caps").
    fn current_caps(&self) -> Capabilities;
}

/// The real host.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealHost;

impl HostInfo for RealHost {
    fn device(&self, path: &Path) -> Result<DeviceInfo, String> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let m = std::fs::metadata(path).map_err(|e| e.to_string())?;
        let ft = m.file_type();
        let kind = if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else {
            return Err("not a device node".into());
        };
        let rdev = m.rdev();
        Ok(DeviceInfo {
            path: path.to_path_buf(),
            kind,
            major: i64::from(nix::sys::stat::major(rdev) as u32),
            minor: i64::from(nix::sys::stat::minor(rdev) as u32),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        })
    }

    fn host_devices(&self) -> Vec<DeviceInfo> {
        fn walk(dir: &Path, host: &RealHost, out: &mut Vec<DeviceInfo>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                // /dev/pts and /dev/shm are mounted separately; /dev/mqueue is a filesystem.
                if matches!(p.to_str(), Some("/dev/pts" | "/dev/shm" | "/dev/mqueue")) {
                    continue;
                }
                match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&p, host, out),
                    Ok(t) if t.is_symlink() => {}
                    Ok(_) => {
                        if let Ok(d) = host.device(&p) {
                            out.push(d);
                        }
                    }
                    Err(_) => {}
                }
            }
        }
        let mut out = Vec::new();
        walk(Path::new("/dev"), self, &mut out);
        out
    }

    fn read_profile(&self, path: &Path) -> Result<String, String> {
        std::fs::read_to_string(path).map_err(|e| e.to_string())
    }

    fn current_caps(&self) -> Capabilities {
        // A process's capabilities do not change under it; read them once.
        static CURRENT: std::sync::OnceLock<Capabilities> = std::sync::OnceLock::new();
        CURRENT
            .get_or_init(|| {
                let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                match parse_cap_eff(&status) {
                    Some(bits) => caps_from_bitmap(bits),
                    None => {
                        // Cannot happen on Linux; fall back to every known capability so a
                        // privileged container fails loudly in runc rather than silently
                        // running with none.
                        tracing::warn!("no CapEff in /proc/self/status; assuming all caps");
                        all_caps()
                    }
                }
            })
            .clone()
    }
}

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

/// Facts about the pod and host that are not in the CRI configs.
#[derive(Debug, Clone)]
pub struct SpecContext<'a> {
    pub container_id: &'a str,
    pub pod_id: &'a str,
    /// The pause process: the container joins its namespaces through /proc/<pid>/ns/*.
    pub pause_pid: u32,
    /// For NamespaceMode::TARGET: the pid of the target container's init.
    pub target_pid: Option<u32>,
    pub cgroup_driver: CgroupDriver,
    /// cgroup v2 (unified): containers get a cgroup namespace and `unified` resources apply.
    pub cgroup_v2: bool,
    pub idmap: Option<&'a PodIdMap>,
    pub image_name: &'a str,
    /// The image's /etc/passwd and /etc/group, for user names (None: not in the image).
    pub passwd: Option<&'a str>,
    pub group: Option<&'a str>,
    /// Pod files mounted into every container unless it mounts the path itself:
    /// /etc/hosts, /etc/resolv.conf, /etc/hostname, /dev/shm.
    pub sandbox_mounts: Vec<(String, String)>,
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

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub const ANN_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const ANN_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const ANN_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
pub const ANN_SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
pub const ANN_SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
pub const ANN_SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
pub const ANN_IMAGE_NAME: &str = "io.kubernetes.cri.image-name";

/// Build the container's OCI spec.
pub fn build(
    pod: &PodSandboxConfig,
    ctr: &ContainerConfig,
    image: &ImageConfiguration,
    ctx: &SpecContext<'_>,
    host: &dyn HostInfo,
) -> Result<Spec, SpecError> {
    let img = image.config().clone().unwrap_or_default();
    let linux_cfg = ctr.linux.clone().unwrap_or_default();
    let sc = linux_cfg.security_context.clone().unwrap_or_default();
    let pod_sc = pod
        .linux
        .as_ref()
        .and_then(|l| l.security_context.clone())
        .unwrap_or_default();
    let privileged = sc.privileged;
    if privileged && !pod_sc.privileged {
        return Err(invalid(
            "linux.security_context.privileged",
            "a privileged container needs a privileged pod sandbox",
        ));
    }

    // --- process ---
    let args = command_line(ctr, img.entrypoint().as_deref(), img.cmd().as_deref())?;
    let mut env = environment(img.env().as_deref().unwrap_or_default(), &ctr.envs);
    if ctr.tty && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".into());
    }
    let cwd = if !ctr.working_dir.is_empty() {
        ctr.working_dir.clone()
    } else {
        img.working_dir()
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into())
    };
    if !cwd.starts_with('/') {
        return Err(invalid("working_dir", format!("{cwd:?} is not absolute")));
    }
    let user = resolve_user(&sc, img.user().as_deref().unwrap_or(""), ctx)?;
    let caps = capabilities(&sc, privileged, &host.current_caps())?;
    let mut proc = ProcessBuilder::default()
        .terminal(ctr.tty)
        .args(args)
        .env(env)
        .cwd(cwd)
        .user(
            UserBuilder::default()
                .uid(user.uid)
                .gid(user.gid)
                .additional_gids(user.additional_gids)
                .build()?,
        )
        .capabilities(caps)
        .no_new_privileges(sc.no_new_privs)
        .build()?;
    // No rlimits of our own: the container inherits the shim's, as under containerd
    // (oci-spec's default would cap open files at 1024).
    proc.set_rlimits(None);
    if let Some(r) = &linux_cfg.resources
        && r.oom_score_adj != 0
    {
        let adj = i32::try_from(r.oom_score_adj)
            .ok()
            .filter(|a| (-1000..=1000).contains(a))
            .ok_or_else(|| {
                invalid(
                    "linux.resources.oom_score_adj",
                    format!("{} out of range", r.oom_score_adj),
                )
            })?;
        proc.set_oom_score_adj(Some(adj));
    }
    if !privileged && let Some(p) = apparmor_profile(&sc)? {
        proc.set_apparmor_profile(Some(p));
    }

    // --- mounts ---
    let mounts = mounts(ctr, ctx, privileged)?;

    // --- linux ---
    let ns_opts = sc.namespace_options.clone().unwrap_or_default();
    let host_network = NamespaceMode::try_from(
        pod_sc
            .namespace_options
            .as_ref()
            .map(|n| n.network)
            .unwrap_or(0),
    ) == Ok(NamespaceMode::Node);
    let namespaces = namespaces(&ns_opts, host_network, ctx)?;

    let cgroup_parent = pod
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.as_str())
        .unwrap_or("");
    let driver = crisp_shim::placement::CgroupDriver::from(ctx.cgroup_driver);
    // Promise 2: the one placement function, shared with the shim.
    let cgroups_path = crisp_shim::placement::cgroup_path(driver, cgroup_parent, ctx.container_id)
        .map_err(|e| invalid("pod linux.cgroup_parent", e.to_string()))?;

    let (devices, mut dev_rules) = devices(ctr, privileged, host)?;
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(PathBuf::from(cgroups_path))
        .devices(devices)
        .build()?;
    linux.set_rootfs_propagation(rootfs_propagation(ctr));
    let mut res = resources(linux_cfg.resources.as_ref(), ctx.cgroup_v2)?;
    let mut rules = vec![
        LinuxDeviceCgroupBuilder::default()
            .allow(privileged)
            .access("rwm")
            .build()?,
    ];
    rules.append(&mut dev_rules);
    res.set_devices(Some(rules));
    linux.set_resources(Some(res));
    if !privileged {
        let masked = if sc.masked_paths.is_empty() {
            DEFAULT_MASKED.iter().map(|s| s.to_string()).collect()
        } else {
            sc.masked_paths.clone()
        };
        let ro = if sc.readonly_paths.is_empty() {
            DEFAULT_READONLY.iter().map(|s| s.to_string()).collect()
        } else {
            sc.readonly_paths.clone()
        };
        linux.set_masked_paths(Some(masked));
        linux.set_readonly_paths(Some(ro));
        linux.set_seccomp(seccomp(&sc, host)?);
    } else {
        linux.set_masked_paths(None);
        linux.set_readonly_paths(None);
    }
    if let Some(m) = ctx.idmap {
        let conv = |v: &[pb::IdMapping]| {
            v.iter()
                .map(|m| {
                    LinuxIdMappingBuilder::default()
                        .host_id(m.host_id)
                        .container_id(m.container_id)
                        .size(m.length)
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()
        };
        linux.set_uid_mappings(Some(conv(&m.uids)?));
        linux.set_gid_mappings(Some(conv(&m.gids)?));
    }

    // --- annotations ---
    let meta = pod.metadata.clone().unwrap_or_default();
    let mut ann: std::collections::HashMap<String, String> = ctr
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    ann.insert(ANN_CONTAINER_TYPE.into(), "container".into());
    ann.insert(ANN_SANDBOX_ID.into(), ctx.pod_id.into());
    ann.insert(
        ANN_CONTAINER_NAME.into(),
        ctr.metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default(),
    );
    ann.insert(ANN_SANDBOX_NAME.into(), meta.name);
    ann.insert(ANN_SANDBOX_NAMESPACE.into(), meta.namespace);
    ann.insert(ANN_SANDBOX_UID.into(), meta.uid);
    ann.insert(ANN_IMAGE_NAME.into(), ctx.image_name.into());

    let mut spec = SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path("rootfs")
                .readonly(sc.readonly_rootfs)
                .build()?,
        )
        .process(proc)
        .mounts(mounts)
        .linux(linux)
        .annotations(ann)
        .build()?;
    // Builders start from oci-spec's own defaults (hostname "youki", default masked paths);
    // every such field is set explicitly here.
    spec.set_hostname((!host_network && !pod.hostname.is_empty()).then(|| pod.hostname.clone()));
    Ok(spec)
}

/// containerd's rule: CRI `command` replaces the image Entrypoint, CRI `args` replace its Cmd;
/// a command given without args does not pick up the image's Cmd.
pub fn command_line(
    ctr: &ContainerConfig,
    entrypoint: Option<&[String]>,
    cmd: Option<&[String]>,
) -> Result<Vec<String>, SpecError> {
    let mut out: Vec<String> = Vec::new();
    if !ctr.command.is_empty() {
        out.extend(ctr.command.iter().cloned());
        out.extend(ctr.args.iter().cloned());
    } else {
        out.extend(entrypoint.unwrap_or_default().iter().cloned());
        if !ctr.args.is_empty() {
            out.extend(ctr.args.iter().cloned());
        } else {
            out.extend(cmd.unwrap_or_default().iter().cloned());
        }
    }
    if out.is_empty() {
        return Err(invalid(
            "command",
            "no command: neither the container config nor the image gives one",
        ));
    }
    Ok(out)
}

/// Image env first, CRI envs override by key (keeping the image's position); PATH defaulted.
pub fn environment(image_env: &[String], cri: &[pb::KeyValue]) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let mut vals: BTreeMap<String, String> = BTreeMap::new();
    let mut set = |k: String, v: String| {
        if !vals.contains_key(&k) {
            order.push(k.clone());
        }
        vals.insert(k, v);
    };
    for e in image_env {
        let (k, v) = e.split_once('=').unwrap_or((e.as_str(), ""));
        set(k.to_string(), v.to_string());
    }
    for kv in cri {
        set(
            kv.key.clone(),
            String::from_utf8_lossy(&kv.value).into_owned(),
        );
    }
    if !vals.contains_key("PATH") {
        order.insert(0, "PATH".into());
        vals.insert("PATH".into(), DEFAULT_PATH.into());
    }
    order
        .into_iter()
        .map(|k| format!("{k}={}", vals[&k]))
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

fn passwd_entries(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].into(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
            })
        })
        .collect()
}

/// (name, gid, members) from /etc/group.
fn group_entries(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 3 {
                return None;
            }
            let members = f
                .get(3)
                .map(|m| {
                    m.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            Some((f[0].to_string(), f[2].parse().ok()?, members))
        })
        .collect()
}

/// Who the process runs as: CRI run_as_user / run_as_username / run_as_group over the image's
/// USER, names resolved in the image's /etc/passwd and /etc/group; supplemental groups are the
/// user's groups in the image (unless the policy is Strict) plus the CRI ones.
pub fn resolve_user(
    sc: &pb::LinuxContainerSecurityContext,
    image_user: &str,
    ctx: &SpecContext<'_>,
) -> Result<ResolvedUser, SpecError> {
    let passwd = ctx.passwd.map(passwd_entries).unwrap_or_default();
    let groups = ctx.group.map(group_entries).unwrap_or_default();
    let find_user =
        |field: &str, name: &str| -> Result<(u32, Option<u32>, Option<String>), SpecError> {
            if let Ok(uid) = name.parse::<u32>() {
                let e = passwd.iter().find(|e| e.uid == uid);
                return Ok((uid, e.map(|e| e.gid), e.map(|e| e.name.clone())));
            }
            passwd
                .iter()
                .find(|e| e.name == name)
                .map(|e| (e.uid, Some(e.gid), Some(e.name.clone())))
                .ok_or_else(|| {
                    invalid(
                        field,
                        format!("user {name:?} not found in the image's /etc/passwd"),
                    )
                })
        };
    let find_group = |field: &str, name: &str| -> Result<u32, SpecError> {
        if let Ok(gid) = name.parse::<u32>() {
            return Ok(gid);
        }
        groups
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, g, _)| *g)
            .ok_or_else(|| {
                invalid(
                    field,
                    format!("group {name:?} not found in the image's /etc/group"),
                )
            })
    };

    let (image_u, image_g) = match image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image_user, None),
    };
    let (uid, mut gid, name) = if let Some(u) = &sc.run_as_user {
        let uid = u32::try_from(u.value).map_err(|_| {
            invalid(
                "linux.security_context.run_as_user",
                format!("{} out of range", u.value),
            )
        })?;
        find_user("linux.security_context.run_as_user", &uid.to_string())?
    } else if !sc.run_as_username.is_empty() {
        find_user(
            "linux.security_context.run_as_username",
            &sc.run_as_username,
        )?
    } else if !image_u.is_empty() {
        find_user("image config User", image_u)?
    } else {
        (0, Some(0), Some("root".into()))
    };
    // An image's explicit group applies only when the user also comes from the image.
    if sc.run_as_user.is_none()
        && sc.run_as_username.is_empty()
        && let Some(g) = image_g.filter(|g| !g.is_empty())
    {
        gid = Some(find_group("image config User", g)?);
    }
    if let Some(g) = &sc.run_as_group {
        // As containerd: a group alone would pair with whatever user the image names, which
        // the pod author did not choose.
        if sc.run_as_user.is_none() && sc.run_as_username.is_empty() {
            return Err(invalid(
                "linux.security_context.run_as_group",
                format!("user group \"{}\" is specified without user", g.value),
            ));
        }
        gid = Some(u32::try_from(g.value).map_err(|_| {
            invalid(
                "linux.security_context.run_as_group",
                format!("{} out of range", g.value),
            )
        })?);
    }
    let gid = gid.unwrap_or(0);
    let mut extra: Vec<u32> = Vec::new();
    let strict = SupplementalGroupsPolicy::try_from(sc.supplemental_groups_policy)
        == Ok(SupplementalGroupsPolicy::Strict);
    if !strict && let Some(n) = &name {
        for (_, g, members) in &groups {
            if members.iter().any(|m| m == n) && *g != gid && !extra.contains(g) {
                extra.push(*g);
            }
        }
    }
    for g in &sc.supplemental_groups {
        let g = u32::try_from(*g).map_err(|_| {
            invalid(
                "linux.security_context.supplemental_groups",
                format!("{g} out of range"),
            )
        })?;
        if !extra.contains(&g) {
            extra.push(g);
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids: extra,
    })
}

fn parse_cap(field: &str, s: &str) -> Result<Capability, SpecError> {
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

fn all_caps() -> Capabilities {
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

fn apparmor_profile(sc: &pb::LinuxContainerSecurityContext) -> Result<Option<String>, SpecError> {
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

fn mount(dest: &str, typ: &str, src: &str, opts: &[&str]) -> Result<Mount, SpecError> {
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
    let ro_sys = if privileged { "rw" } else { "ro" };
    let mut out = vec![
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
    ];
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
    for (i, m) in ctr.mounts.iter().enumerate() {
        let field = |f: &str| format!("mounts[{i}].{f}");
        if !m.container_path.starts_with('/') {
            return Err(invalid(
                field("container_path"),
                format!("{:?} is not absolute", m.container_path),
            ));
        }
        if m.image.is_some() {
            return Err(SpecError::Invalid {
                field: field("image"),
                message: "image volumes are not supported yet".into(),
            });
        }
        if m.host_path.is_empty() {
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
        let mut opts = vec!["rbind", prop, if m.readonly { "ro" } else { "rw" }];
        if m.recursive_read_only {
            opts.push("rro");
        }
        let dest = m.container_path.trim_end_matches('/');
        let dest = if dest.is_empty() { "/" } else { dest };
        out.retain(|x| x.destination() != Path::new(dest));
        out.push(mount(dest, "bind", &m.host_path, &opts)?);
    }
    // Stable: mounts at the same depth keep their order.
    out.sort_by_key(|m| m.destination().components().count());
    Ok(out)
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

fn join(ty: LinuxNamespaceType, pid: u32, name: &str) -> Result<LinuxNamespace, SpecError> {
    Ok(LinuxNamespaceBuilder::default()
        .typ(ty)
        .path(format!("/proc/{pid}/ns/{name}"))
        .build()?)
}

fn fresh(ty: LinuxNamespaceType) -> Result<LinuxNamespace, SpecError> {
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

fn device_of(info: &DeviceInfo, dest: &str) -> Result<LinuxDevice, SpecError> {
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

fn devices(
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

pub fn resources(
    r: Option<&pb::LinuxContainerResources>,
    cgroup_v2: bool,
) -> Result<oci_spec::runtime::LinuxResources, SpecError> {
    let mut b = LinuxResourcesBuilder::default();
    let Some(r) = r else { return Ok(b.build()?) };
    let f = |n: &str| format!("linux.resources.{n}");
    for (name, v) in [
        ("cpu_period", r.cpu_period),
        ("cpu_quota", r.cpu_quota),
        ("cpu_shares", r.cpu_shares),
        ("memory_limit_in_bytes", r.memory_limit_in_bytes),
    ] {
        if v < 0 && !(name == "cpu_quota" && v == -1) {
            return Err(invalid(f(name), format!("{v} is negative")));
        }
    }
    let mut cpu = LinuxCpuBuilder::default();
    if r.cpu_shares > 0 {
        cpu = cpu.shares(r.cpu_shares as u64);
    }
    if r.cpu_quota != 0 {
        cpu = cpu.quota(r.cpu_quota);
    }
    if r.cpu_period > 0 {
        cpu = cpu.period(r.cpu_period as u64);
    }
    if !r.cpuset_cpus.is_empty() {
        cpu = cpu.cpus(r.cpuset_cpus.clone());
    }
    if !r.cpuset_mems.is_empty() {
        cpu = cpu.mems(r.cpuset_mems.clone());
    }
    b = b.cpu(cpu.build()?);
    if r.memory_limit_in_bytes > 0 {
        let swap = if r.memory_swap_limit_in_bytes > 0 {
            if r.memory_swap_limit_in_bytes < r.memory_limit_in_bytes {
                return Err(invalid(
                    f("memory_swap_limit_in_bytes"),
                    "smaller than memory_limit_in_bytes",
                ));
            }
            r.memory_swap_limit_in_bytes
        } else {
            // No swap beyond the limit unless kubelet asks for it (its NoSwap default).
            r.memory_limit_in_bytes
        };
        b = b.memory(
            LinuxMemoryBuilder::default()
                .limit(r.memory_limit_in_bytes)
                .swap(swap)
                .build()?,
        );
    }
    if !r.hugepage_limits.is_empty() {
        let mut v = Vec::new();
        for h in &r.hugepage_limits {
            let limit = i64::try_from(h.limit).map_err(|_| {
                invalid(f("hugepage_limits"), format!("limit {} too large", h.limit))
            })?;
            v.push(
                LinuxHugepageLimitBuilder::default()
                    .page_size(h.page_size.clone())
                    .limit(limit)
                    .build()?,
            );
        }
        b = b.hugepage_limits(v);
    }
    if !r.unified.is_empty() {
        if !cgroup_v2 {
            return Err(invalid(
                f("unified"),
                "cgroup v2 settings on a cgroup v1 host",
            ));
        }
        b = b.unified(r.unified.clone());
    }
    Ok(b.build()?)
}

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

fn native_arches() -> Vec<Arch> {
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

#[cfg(test)]
mod tests;
