//! Runtime options: the handler's options with per-task overrides merged on top.
//!
//! containerd 2.0.1–2.0.4 *replaced* the handler's `containerd.runc.v1.Options`
//! with a fresh message carrying only `io_uid`/`io_gid` for user-namespaced pods,
//! so `systemd_cgroup` silently became false. Here the effective options are
//! always `handler` with the override merged in by protobuf merge semantics: a
//! field the override sets replaces the handler's, every other field stays.

use containerd_shim_protos::protobuf::{Message, MessageFull, well_known_types::any::Any};
pub use containerd_shim_protos::shim::oci::Options;

use crate::placement::CgroupDriver;

#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("runtime options of type {0:?} are not containerd.runc.v1.Options")]
    WrongType(String),
    #[error("runtime options do not decode: {0}")]
    Decode(#[from] containerd_shim_protos::protobuf::Error),
}

/// Whether `any` holds a `containerd.runc.v1.Options`, whatever host prefix its
/// type URL carries (containerd writes the bare name).
fn is_options(any: &Any) -> bool {
    any.type_url.rsplit('/').next() == Some(Options::descriptor().full_name())
}

/// Decodes runtime options; an absent (empty) Any means "no options".
pub fn decode(any: &Any) -> Result<Option<Options>, OptionsError> {
    if any.type_url.is_empty() && any.value.is_empty() {
        return Ok(None);
    }
    if !is_options(any) {
        return Err(OptionsError::WrongType(any.type_url.clone()));
    }
    Ok(Some(Options::parse_from_bytes(&any.value)?))
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
    if options.systemd_cgroup { CgroupDriver::Systemd } else { CgroupDriver::Cgroupfs }
}

#[cfg(test)]
mod tests {
    use containerd_shim_protos::protobuf::reflect::ReflectValueRef;

    use super::*;

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
        let overrides = Options { io_uid: 65536, io_gid: 65536, ..Default::default() };
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
            assert!(!is_default, "test handler leaves {name} unset; set it so the test covers it");
        }
    }

    #[test]
    fn overrides_replace_only_what_they_set() {
        let handler = full_handler();
        let overrides = Options { binary_name: "crun".into(), ..Default::default() };
        let merged = merge(&handler, Some(&overrides));
        assert_eq!(merged.binary_name, "crun");
        assert_eq!(merged.root, handler.root);
        assert!(merged.systemd_cgroup);
        assert_eq!(merge(&handler, None), handler);
    }

    #[test]
    fn decode_accepts_bare_and_prefixed_type_urls() {
        let opts = Options { systemd_cgroup: true, ..Default::default() };
        let value = opts.write_to_bytes().expect("encode");
        for url in ["containerd.runc.v1.Options", "type.googleapis.com/containerd.runc.v1.Options"] {
            let any = Any { type_url: url.into(), value: value.clone(), ..Default::default() };
            assert_eq!(decode(&any).expect("decodes"), Some(opts.clone()));
        }
        assert!(decode(&Any::default()).expect("empty").is_none());
        let other = Any { type_url: "x.Other".into(), value, ..Default::default() };
        assert!(decode(&other).is_err());
    }
}
