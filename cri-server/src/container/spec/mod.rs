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
use crate::error::{ErrorKind, HasKind};
use crate::pod::idmap::PodIdMap;

mod mounts;
mod namespaces;
mod resources;
mod security;
mod user;
pub use self::mounts::*;
pub use self::namespaces::*;
pub use self::resources::*;
pub use self::security::*;
pub use self::user::*;

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
    /// Image volumes crispd mounted: (index in `mounts`, the host directory to bind).
    pub image_volumes: Vec<(usize, String)>,
}

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
    let proc = process(ctr, &img, &linux_cfg, ctx, host)?;
    let mounts = mounts(ctr, ctx, privileged)?;
    let host_network = NamespaceMode::try_from(
        pod_sc
            .namespace_options
            .as_ref()
            .map(|n| n.network)
            .unwrap_or(0),
    ) == Ok(NamespaceMode::Node);
    let linux = linux(pod, ctr, &linux_cfg, host_network, ctx, host)?;
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
        .annotations(annotations(pod, ctr, ctx))
        .build()?;
    // Builders start from oci-spec's own defaults (hostname "youki", default masked paths);
    // every such field is set explicitly here.
    spec.set_hostname((!host_network && !pod.hostname.is_empty()).then(|| pod.hostname.clone()));
    Ok(spec)
}

/// The process: command line, environment, cwd, user, capabilities, oom_score_adj, AppArmor.
fn process(
    ctr: &ContainerConfig,
    img: &oci_spec::image::Config,
    linux_cfg: &pb::LinuxContainerConfig,
    ctx: &SpecContext<'_>,
    host: &dyn HostInfo,
) -> Result<oci_spec::runtime::Process, SpecError> {
    let sc = linux_cfg.security_context.clone().unwrap_or_default();
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
    let caps = capabilities(&sc, sc.privileged, &host.current_caps())?;
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
    if !sc.privileged
        && let Some(p) = apparmor_profile(&sc)?
    {
        proc.set_apparmor_profile(Some(p));
    }
    Ok(proc)
}

/// The `linux` section: namespaces, the cgroup path (promise 2), devices and resources,
/// masked and read-only paths, seccomp, user-namespace maps.
fn linux(
    pod: &PodSandboxConfig,
    ctr: &ContainerConfig,
    linux_cfg: &pb::LinuxContainerConfig,
    host_network: bool,
    ctx: &SpecContext<'_>,
    host: &dyn HostInfo,
) -> Result<oci_spec::runtime::Linux, SpecError> {
    let sc = linux_cfg.security_context.clone().unwrap_or_default();
    let privileged = sc.privileged;
    let ns_opts = sc.namespace_options.clone().unwrap_or_default();
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
    confine(&mut linux, &sc, host)?;
    if let Some(m) = ctx.idmap {
        linux.set_uid_mappings(Some(id_mappings(&m.uids)?));
        linux.set_gid_mappings(Some(id_mappings(&m.gids)?));
    }
    Ok(linux)
}

/// Masked and read-only paths (the context's or containerd's defaults) and seccomp; none of
/// it for a privileged container.
fn confine(
    linux: &mut oci_spec::runtime::Linux,
    sc: &pb::LinuxContainerSecurityContext,
    host: &dyn HostInfo,
) -> Result<(), SpecError> {
    if sc.privileged {
        linux.set_masked_paths(None);
        linux.set_readonly_paths(None);
        return Ok(());
    }
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
    linux.set_seccomp(seccomp(sc, host)?);
    Ok(())
}

fn id_mappings(
    v: &[pb::IdMapping],
) -> Result<Vec<oci_spec::runtime::LinuxIdMapping>, oci_spec::OciSpecError> {
    v.iter()
        .map(|m| {
            LinuxIdMappingBuilder::default()
                .host_id(m.host_id)
                .container_id(m.container_id)
                .size(m.length)
                .build()
        })
        .collect()
}

/// The container's annotations and the CRI ones containerd adds (type, sandbox, name, image).
fn annotations(
    pod: &PodSandboxConfig,
    ctr: &ContainerConfig,
    ctx: &SpecContext<'_>,
) -> std::collections::HashMap<String, String> {
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
    ann
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

#[cfg(test)]
mod tests;
