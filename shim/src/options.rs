//! Runtime options: the handler's options with per-task overrides merged on top.
//!
//! containerd 2.0.1–2.0.4 *replaced* the handler's `containerd.runc.v1.Options`
//! with a fresh message carrying only `io_uid`/`io_gid` for user-namespaced pods,
//! so `systemd_cgroup` silently became false. Here the effective options are
//! always `handler` with the override merged in by protobuf merge semantics: a
//! field the override sets replaces the handler's, every other field stays.

use std::path::Path;

use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::protobuf::well_known_types::{any::Any, wrappers::BoolValue};
pub use containerd_shim_protos::shim::oci::Options;

use crate::placement::CgroupDriver;

#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("runtime options of type {0:?} are not containerd.runc.v1.Options")]
    WrongType(String),
    #[error("runtime options file {0}: {1}")]
    Config(String, String),
    #[error("runtime options do not decode: {0}")]
    Decode(#[from] containerd_shim_protos::protobuf::Error),
}

/// Whether `any` holds a `containerd.runc.v1.Options`, whatever host prefix its
/// type URL carries (containerd writes the bare name).
fn is_options(any: &Any) -> bool {
    any.type_url.rsplit('/').next() == Some(OPTIONS)
}

/// `Options`' full name, spelled out: `Options::descriptor()` would build the
/// descriptors of its .proto file and imports (see `crate::events`).
const OPTIONS: &str = "containerd.runc.v1.Options";

/// The options type containerd 1.6's CRI plugin sends for runtime types it does
/// not know (ours): `{type_url, config_path}`, where `config_path` names the
/// runtime's own config file.
/// (1.6 registers it as `runtimeoptions.v1.Options`, later releases as
/// `cri.runtimeoptions.v1.Options`.)
pub const CRI_RUNTIME_OPTIONS: &str = "cri.runtimeoptions.v1.Options";
const CRI_RUNTIME_OPTIONS_16: &str = "runtimeoptions.v1.Options";

/// crispd's own create options, a `google.protobuf.BoolValue` under this name: `true` asks
/// Create to start the task too, by the runtime's `run --detach` (create and start in one
/// process: 22 against 30 ms of wall time and 12 against 17 ms of runc's CPU per container
/// here). containerd never sends it; a shim older than it refuses the type (`WrongType`),
/// which crispd takes as "create, then start".
pub const CRISP_CREATE_OPTIONS: &str = "crisp.shim.v1.CreateOptions";

/// Whether `any` is crispd's [`CRISP_CREATE_OPTIONS`] asking for a start on create.
pub fn start_on_create(any: Option<&Any>) -> Result<bool, OptionsError> {
    match any {
        Some(a) if a.type_url.rsplit('/').next() == Some(CRISP_CREATE_OPTIONS) => {
            Ok(BoolValue::parse_from_bytes(&a.value)?.value)
        }
        _ => Ok(false),
    }
}

/// Decodes runtime options; an absent (empty) Any means "no options".
/// Accepts `containerd.runc.v1.Options` and `cri.runtimeoptions.v1.Options`
/// (whose `config_path` file holds the same keys as containerd's runc options
/// table: `BinaryName`, `Root`, `SystemdCgroup`, ...).
pub fn decode(any: &Any) -> Result<Option<Options>, OptionsError> {
    if any.type_url.is_empty() && any.value.is_empty() {
        return Ok(None);
    }
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name == CRISP_CREATE_OPTIONS {
        return Ok(None); // crispd's own; it overrides no runtime option
    }
    if name == CRI_RUNTIME_OPTIONS || name == CRI_RUNTIME_OPTIONS_16 {
        let config_path = proto_string_field(&any.value, 2).unwrap_or_default();
        if config_path.is_empty() {
            return Ok(None);
        }
        return load_toml(Path::new(&config_path)).map(Some);
    }
    if !is_options(any) {
        return Err(OptionsError::WrongType(any.type_url.clone()));
    }
    Ok(Some(Options::parse_from_bytes(&any.value)?))
}

/// Reads runc-style options from a TOML file (the keys of containerd's
/// `[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.X.options]`).
pub fn load_toml(path: &Path) -> Result<Options, OptionsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| OptionsError::Config(path.display().to_string(), e.to_string()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        OptionsError::Config(path.display().to_string(), e.to_string())
    })?;
    let s = |k: &str| {
        table
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let b = |k: &str| table.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    let u = |k: &str| {
        table
            .get(k)
            .and_then(|v| v.as_integer())
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0)
    };
    Ok(Options {
        no_pivot_root: b("NoPivotRoot"),
        no_new_keyring: b("NoNewKeyring"),
        shim_cgroup: s("ShimCgroup"),
        io_uid: u("IoUid"),
        io_gid: u("IoGid"),
        binary_name: s("BinaryName"),
        root: s("Root"),
        systemd_cgroup: b("SystemdCgroup"),
        criu_image_path: s("CriuImagePath"),
        criu_work_path: s("CriuWorkPath"),
        ..Default::default()
    })
}

/// The string field `field` of a protobuf message, decoded by hand: the one
/// message we need it for has no generated type in our dependencies.
fn proto_string_field(mut buf: &[u8], field: u64) -> Option<String> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf.split_first()?;
            *buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        match key & 7 {
            0 => {
                varint(&mut buf)?;
            }
            1 => buf = buf.get(8..)?,
            5 => buf = buf.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut buf)?).ok()?;
                let (data, rest) = (buf.get(..len)?, buf.get(len..)?);
                if key >> 3 == field {
                    return String::from_utf8(data.to_vec()).ok();
                }
                buf = rest;
            }
            _ => return None,
        }
    }
    None
}

/// The effective options of one task: `handler` with `overrides` on top.
///
/// proto3 scalars have no presence, so an override can set a value but cannot
/// reset a handler's `true` to `false`; that is the price of never losing one.
pub fn merge(handler: &Options, overrides: Option<&Options>) -> Options {
    let mut merged = handler.clone();
    if let Some(o) = overrides {
        // Encoding a message and merging the bytes is protobuf's MergeFrom: only
        // fields that are set in `o` are written, so only they replace.
        match o.write_to_bytes() {
            Ok(bytes) => {
                if let Err(e) = merged.merge_from_bytes(&bytes) {
                    tracing::warn!(error = %e, "runtime option overrides did not merge; using handler options");
                    merged = handler.clone();
                }
            }
            Err(e) => tracing::warn!(error = %e, "runtime option overrides did not encode"),
        }
    }
    merged
}

/// The cgroup driver the effective options ask for.
pub fn driver(options: &Options) -> CgroupDriver {
    if options.systemd_cgroup {
        CgroupDriver::Systemd
    } else {
        CgroupDriver::Cgroupfs
    }
}

#[cfg(test)]
mod tests {
    use containerd_shim_protos::protobuf::{MessageFull, reflect::ReflectValueRef};

    use super::*;

    #[test]
    fn crispds_create_options_start_the_task_and_override_nothing() {
        let any = |value: bool| Any {
            type_url: CRISP_CREATE_OPTIONS.into(),
            value: BoolValue {
                value,
                ..Default::default()
            }
            .write_to_bytes()
            .expect("encode"),
            ..Default::default()
        };
        assert!(start_on_create(Some(&any(true))).expect("decodes"));
        assert!(!start_on_create(Some(&any(false))).expect("decodes"));
        assert!(!start_on_create(None).expect("decodes"));
        assert!(decode(&any(true)).expect("decodes").is_none());
        let runc = Any {
            type_url: OPTIONS.into(),
            value: Options::default().write_to_bytes().expect("encode"),
            ..Default::default()
        };
        assert!(!start_on_create(Some(&runc)).expect("decodes"));
        let torn = Any {
            type_url: CRISP_CREATE_OPTIONS.into(),
            value: vec![0x08],
            ..Default::default()
        };
        assert!(
            start_on_create(Some(&torn)).is_err(),
            "a torn message is an error"
        );
    }

    #[test]
    fn options_name_is_the_descriptors() {
        assert_eq!(OPTIONS, Options::descriptor().full_name());
    }

    fn full_handler() -> Options {
        Options {
            no_pivot_root: true,
            no_new_keyring: true,
            shim_cgroup: "/crisp/shims".into(),
            io_uid: 1,
            io_gid: 2,
            binary_name: "runc".into(),
            root: "/run/crisp/runc".into(),
            systemd_cgroup: true,
            criu_image_path: "/var/lib/criu/img".into(),
            criu_work_path: "/var/lib/criu/work".into(),
            task_api_address: "unix:///run/crisp/task.sock".into(),
            task_api_version: 3,
            ..Default::default()
        }
    }

    #[test]
    fn every_handler_option_survives_a_userns_override() {
        let handler = full_handler();
        // Exactly what containerd 2.0's userns path sent instead of the handler's options.
        let overrides = Options {
            io_uid: 65536,
            io_gid: 65536,
            ..Default::default()
        };
        let merged = merge(&handler, Some(&overrides));
        assert_eq!(merged.io_uid, 65536);
        assert_eq!(merged.io_gid, 65536);
        assert_eq!(driver(&merged), CgroupDriver::Systemd);

        // Walk every field the message has, so a field added to the proto later is covered too.
        let descriptor = Options::descriptor();
        for field in descriptor.fields() {
            let name = field.name();
            if name == "io_uid" || name == "io_gid" {
                continue;
            }
            let h = field.get_singular_field_or_default(&handler);
            let m = field.get_singular_field_or_default(&merged);
            assert_eq!(h, m, "handler option {name} lost in merge");
            let is_default = matches!(h, ReflectValueRef::Bool(false))
                || matches!(h, ReflectValueRef::String(""))
                || matches!(h, ReflectValueRef::U32(0));
            assert!(
                !is_default,
                "test handler leaves {name} unset; set it so the test covers it"
            );
        }
    }

    #[test]
    fn overrides_replace_only_what_they_set() {
        let handler = full_handler();
        let overrides = Options {
            binary_name: "crun".into(),
            ..Default::default()
        };
        let merged = merge(&handler, Some(&overrides));
        assert_eq!(merged.binary_name, "crun");
        assert_eq!(merged.root, handler.root);
        assert!(merged.systemd_cgroup);
        assert_eq!(merge(&handler, None), handler);
    }

    #[test]
    fn cri_runtime_options_point_at_a_toml_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("crisp-crun.toml");
        std::fs::write(
            &file,
            "BinaryName = \"crun\"\nSystemdCgroup = true\nRoot = \"/run/x\"\n",
        )
        .expect("write");
        // cri.runtimeoptions.v1.Options { type_url = 1, config_path = 2 }, encoded by hand.
        let path = file.display().to_string();
        let mut value = vec![0x0a, 1, b'x', 0x12, path.len() as u8];
        value.extend_from_slice(path.as_bytes());
        let any = Any {
            type_url: CRI_RUNTIME_OPTIONS.into(),
            value,
            ..Default::default()
        };
        let opts = decode(&any).expect("decodes").expect("some");
        assert_eq!(opts.binary_name, "crun");
        assert_eq!(opts.root, "/run/x");
        assert!(opts.systemd_cgroup);
        let empty = Any {
            type_url: CRI_RUNTIME_OPTIONS.into(),
            value: vec![],
            ..Default::default()
        };
        assert!(decode(&empty).expect("decodes").is_none());
    }

    #[test]
    fn decode_accepts_bare_and_prefixed_type_urls() {
        let opts = Options {
            systemd_cgroup: true,
            ..Default::default()
        };
        let value = opts.write_to_bytes().expect("encode");
        for url in [
            "containerd.runc.v1.Options",
            "type.googleapis.com/containerd.runc.v1.Options",
        ] {
            let any = Any {
                type_url: url.into(),
                value: value.clone(),
                ..Default::default()
            };
            assert_eq!(decode(&any).expect("decodes"), Some(opts.clone()));
        }
        assert!(decode(&Any::default()).expect("empty").is_none());
        let other = Any {
            type_url: "x.Other".into(),
            value,
            ..Default::default()
        };
        assert!(decode(&other).is_err());
    }
}
