//! CDI devices (`ContainerConfig.cdi_devices`, and the `cdi.k8s.io/*` annotations device
//! plugins set): fully-qualified names `vendor.com/class=name` resolved from the CDI spec files
//! (JSON or YAML) in the configured directories, and their container edits (device nodes,
//! mounts, environment, hooks, additional groups) applied to the OCI spec.
//!
//! A small resolver of our own rather than the `container-device-interface` crate: that crate
//! pins oci-spec 0.10 (crispd builds its specs with 0.8), and brings clap, jsonschema and the
//! unmaintained serde_yaml into a library. This file reads the spec format's fields that carry
//! edits and refuses a spec with an edit it does not apply (a field it does not know), so no
//! edit is dropped silently.
//!
//! Directories are read in order, a later one overriding an earlier one for the same device
//! (CDI's priority: `/var/run/cdi` over `/etc/cdi`). Every file is read when a container asks
//! for a CDI device: an unreadable or invalid one fails the request (FailedPrecondition naming
//! the device and the file), as does a device no file defines (naming the directories).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    HookBuilder, HooksBuilder, LinuxDeviceBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    MountBuilder, Spec,
};
use serde::Deserialize;

use crate::container::spec::HostInfo;
use crate::error::{CriError, ErrorKind};

/// Annotations with this prefix list CDI devices (comma-separated), as containerd reads them.
pub const ANNOTATION_PREFIX: &str = "cdi.k8s.io/";

#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    #[error("CDI device {device:?}: spec file {file}: {message}")]
    BadFile {
        device: String,
        file: PathBuf,
        message: String,
    },
    #[error("CDI device {device:?}: not defined by any spec file in {dirs}")]
    Unknown { device: String, dirs: String },
    #[error("CDI device {device:?}: {message}")]
    BadName { device: String, message: String },
    #[error("CDI device {device:?} (spec file {file}): {message}")]
    Edit {
        device: String,
        file: PathBuf,
        message: String,
    },
}

impl CdiError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::BadName { .. } => ErrorKind::InvalidArgument,
            _ => ErrorKind::FailedPrecondition,
        }
    }
}

impl From<CdiError> for CriError {
    fn from(e: CdiError) -> Self {
        CriError::new(e.kind(), e.to_string())
    }
}

/// A CDI spec file (the fields crispd applies; anything else in `containerEdits` is refused).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecFile {
    #[allow(dead_code)]
    cdi_version: String,
    kind: String,
    devices: Vec<Device>,
    #[serde(default)]
    container_edits: Edits,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Device {
    name: String,
    #[serde(default)]
    container_edits: Edits,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Edits {
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    device_nodes: Vec<DeviceNode>,
    #[serde(default)]
    mounts: Vec<CdiMount>,
    #[serde(default)]
    hooks: Vec<CdiHook>,
    #[serde(default)]
    additional_gids: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DeviceNode {
    path: String,
    host_path: Option<String>,
    #[serde(rename = "type")]
    typ: Option<String>,
    major: Option<i64>,
    minor: Option<i64>,
    file_mode: Option<u32>,
    permissions: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CdiMount {
    host_path: String,
    container_path: String,
    #[serde(rename = "type")]
    typ: Option<String>,
    #[serde(default)]
    options: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CdiHook {
    hook_name: String,
    path: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    timeout: Option<i64>,
}

/// One device's edits: the spec-wide ones, then the device's own.
#[derive(Debug, Clone)]
struct Resolved {
    file: PathBuf,
    edits: Vec<Edits>,
}

/// `vendor.com/class=name` split into (kind, name), checked as CDI names them.
pub fn parse_name(device: &str) -> Result<(&str, &str), CdiError> {
    let bad = |m: &str| CdiError::BadName {
        device: device.to_string(),
        message: m.to_string(),
    };
    let (kind, name) = device
        .split_once('=')
        .ok_or_else(|| bad("not a fully-qualified CDI name (vendor.com/class=name)"))?;
    let (vendor, class) = kind
        .split_once('/')
        .ok_or_else(|| bad("kind has no vendor (vendor.com/class)"))?;
    let ok = |s: &str, extra: &[char]| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
    };
    if !ok(vendor, &['-', '_', '.']) || !ok(class, &['-', '_']) {
        return Err(bad("bad vendor or class"));
    }
    if !ok(name, &['-', '_', '.', ':']) {
        return Err(bad("bad device name"));
    }
    Ok((kind, name))
}

/// The CDI devices a container asks for: `cdi_devices`, then the annotations' (sorted by key),
/// each once.
pub fn requested(cfg: &crisp_proto::cri::v1::ContainerConfig) -> Vec<String> {
    let mut out: Vec<String> = cfg.cdi_devices.iter().map(|d| d.name.clone()).collect();
    let ann: BTreeMap<_, _> = cfg
        .annotations
        .iter()
        .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
        .collect();
    for v in ann.values() {
        out.extend(
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|d| seen.insert(d.clone()));
    out
}

/// Every spec file of `dirs`, sorted by name within a directory; a missing directory has none.
fn spec_files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("json" | "yaml" | "yml")
                )
            })
            .collect();
        files.sort();
        out.extend(files);
    }
    out
}

fn parse_file(path: &Path) -> Result<SpecFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("unreadable: {e}"))?;
    let spec: SpecFile = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| format!("invalid JSON: {e}"))?
    } else {
        serde_yaml_ng::from_str(&text).map_err(|e| format!("invalid YAML: {e}"))?
    };
    parse_name(&format!("{}=x", spec.kind)).map_err(|_| format!("bad kind {:?}", spec.kind))?;
    Ok(spec)
}

/// Resolve `devices` from the spec files of `dirs`.
fn resolve(devices: &[String], dirs: &[PathBuf]) -> Result<Vec<(String, Resolved)>, CdiError> {
    for d in devices {
        parse_name(d)?;
    }
    let mut known: HashMap<String, Resolved> = HashMap::new();
    for file in spec_files(dirs) {
        let spec = parse_file(&file).map_err(|message| CdiError::BadFile {
            device: devices.join(", "),
            file: file.clone(),
            message,
        })?;
        for dev in &spec.devices {
            known.insert(
                format!("{}={}", spec.kind, dev.name),
                Resolved {
                    file: file.clone(),
                    edits: vec![spec.container_edits.clone(), dev.container_edits.clone()],
                },
            );
        }
    }
    devices
        .iter()
        .map(|d| {
            known
                .get(d)
                .cloned()
                .map(|r| (d.clone(), r))
                .ok_or_else(|| CdiError::Unknown {
                    device: d.clone(),
                    dirs: dirs
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        })
        .collect()
}

/// Resolve the container's CDI devices and apply their edits to `spec`.
pub fn apply(
    spec: &mut Spec,
    devices: &[String],
    dirs: &[PathBuf],
    host: &dyn HostInfo,
) -> Result<(), CdiError> {
    if devices.is_empty() {
        return Ok(());
    }
    for (device, r) in resolve(devices, dirs)? {
        let edit_err = |message: String| CdiError::Edit {
            device: device.clone(),
            file: r.file.clone(),
            message,
        };
        for e in &r.edits {
            apply_edits(spec, e, host).map_err(edit_err)?;
        }
        tracing::info!(device = %device, file = %r.file.display(), "CDI device applied");
    }
    Ok(())
}

fn apply_edits(spec: &mut Spec, e: &Edits, host: &dyn HostInfo) -> Result<(), String> {
    apply_env(spec, &e.env);
    for n in &e.device_nodes {
        apply_device(spec, n, host)?;
    }
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for m in &e.mounts {
        if !m.container_path.starts_with('/') {
            return Err(format!(
                "mount containerPath {:?} is not absolute",
                m.container_path
            ));
        }
        mounts.retain(|x| x.destination() != Path::new(&m.container_path));
        mounts.push(
            MountBuilder::default()
                .destination(&m.container_path)
                .source(&m.host_path)
                .typ(m.typ.clone().unwrap_or_else(|| "bind".into()))
                .options(m.options.clone())
                .build()
                .map_err(|e| e.to_string())?,
        );
    }
    mounts.sort_by_key(|m| m.destination().components().count());
    spec.set_mounts(Some(mounts));
    for h in &e.hooks {
        apply_hook(spec, h)?;
    }
    if !e.additional_gids.is_empty()
        && let Some(p) = spec.process_mut()
    {
        let mut gids = p.user().additional_gids().clone().unwrap_or_default();
        gids.extend(e.additional_gids.iter().filter(|g| **g != 0));
        gids.dedup();
        p.user_mut().set_additional_gids(Some(gids));
    }
    Ok(())
}

/// `KEY=value` entries replace the same key, others are appended.
fn apply_env(spec: &mut Spec, env: &[String]) {
    let Some(p) = spec.process_mut() else { return };
    let mut cur = p.env().clone().unwrap_or_default();
    for kv in env {
        let key = kv.split_once('=').map(|(k, _)| k).unwrap_or(kv);
        cur.retain(|e| e.split_once('=').map(|(k, _)| k).unwrap_or(e) != key);
        cur.push(kv.clone());
    }
    p.set_env(Some(cur));
}

/// A device node, with the host's type and numbers when the spec leaves them out, and the
/// device cgroup rule that lets the container use it.
fn apply_device(spec: &mut Spec, n: &DeviceNode, host: &dyn HostInfo) -> Result<(), String> {
    let host_path = n.host_path.as_deref().unwrap_or(&n.path);
    let info = match (n.major, n.minor) {
        (Some(_), Some(_)) => None,
        _ => Some(
            host.device(Path::new(host_path))
                .map_err(|e| format!("device node {host_path}: {e}"))?,
        ),
    };
    let kind = n
        .typ
        .as_deref()
        .and_then(|t| t.chars().next())
        .or(info.as_ref().map(|i| i.kind))
        .unwrap_or('c');
    let typ = match kind {
        'b' => LinuxDeviceType::B,
        'c' | 'u' => LinuxDeviceType::C,
        'p' => LinuxDeviceType::P,
        other => return Err(format!("device node {}: unknown type {other:?}", n.path)),
    };
    let major = n.major.or(info.as_ref().map(|i| i.major)).unwrap_or(0);
    let minor = n.minor.or(info.as_ref().map(|i| i.minor)).unwrap_or(0);
    let mode = n
        .file_mode
        .or(info.as_ref().map(|i| i.mode))
        .unwrap_or(0o666);
    let dev = LinuxDeviceBuilder::default()
        .path(&n.path)
        .typ(typ)
        .major(major)
        .minor(minor)
        .file_mode(mode)
        .uid(n.uid.unwrap_or(0))
        .gid(n.gid.unwrap_or(0))
        .build()
        .map_err(|e| e.to_string())?;
    let perms = n.permissions.clone().unwrap_or_else(|| "rwm".into());
    if perms.is_empty() || !perms.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
        return Err(format!("device node {}: permissions {perms:?}", n.path));
    }
    let rule = LinuxDeviceCgroupBuilder::default()
        .allow(true)
        .typ(typ)
        .major(major)
        .minor(minor)
        .access(perms)
        .build()
        .map_err(|e| e.to_string())?;
    let linux = spec.linux_mut().get_or_insert_with(Default::default);
    let mut devs = linux.devices().clone().unwrap_or_default();
    devs.retain(|d| d.path() != Path::new(&n.path));
    devs.push(dev);
    linux.set_devices(Some(devs));
    let res = linux.resources_mut().get_or_insert_with(Default::default);
    let mut rules = res.devices().clone().unwrap_or_default();
    rules.push(rule);
    res.set_devices(Some(rules));
    Ok(())
}

fn apply_hook(spec: &mut Spec, h: &CdiHook) -> Result<(), String> {
    let hook = HookBuilder::default()
        .path(&h.path)
        .args(h.args.clone())
        .env(h.env.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let mut hook = hook;
    hook.set_timeout(h.timeout);
    let hooks = spec
        .hooks_mut()
        .get_or_insert_with(|| HooksBuilder::default().build().unwrap_or_default());
    let list = match h.hook_name.as_str() {
        #[allow(deprecated)]
        "prestart" => hooks.prestart_mut(),
        "createRuntime" => hooks.create_runtime_mut(),
        "createContainer" => hooks.create_container_mut(),
        "startContainer" => hooks.start_container_mut(),
        "poststart" => hooks.poststart_mut(),
        "poststop" => hooks.poststop_mut(),
        other => return Err(format!("unknown hookName {other:?}")),
    };
    list.get_or_insert_with(Vec::new).push(hook);
    Ok(())
}

#[cfg(test)]
mod tests;
