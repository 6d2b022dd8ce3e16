//! What the pause process needs, read from the OCI spec containerd 2.x (and
//! crispd) send in `CreateSandboxRequest.options`: which namespaces to create
//! or join, hostname, sysctls, cgroup, oom_score_adj, user and id mappings.
//! Pure functions, so every refusal is unit-tested and names its field.

use std::path::PathBuf;

use serde_json::Value;

/// The type URL containerd gives the pause's runtime spec inside the Any.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {value}: {why}")]
pub struct PlanError {
    /// The spec field (or request field) at fault, e.g. `linux.namespaces[2].type`.
    pub field: String,
    pub value: String,
    pub why: String,
}

fn bad(field: impl Into<String>, value: impl ToString, why: impl Into<String>) -> PlanError {
    PlanError {
        field: field.into(),
        value: value.to_string(),
        why: why.into(),
    }
}

/// What happens to one namespace type.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NsAction {
    /// Absent from the spec: pause stays in the shim's (the host's).
    #[default]
    Host,
    /// Listed without a path: a fresh one.
    New,
    /// Listed with a path: join it.
    Join(PathBuf),
}

/// Which namespace a sysctl belongs to; it may only be set in a private one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysctlNs {
    Net,
    Ipc,
    Uts,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysctl {
    pub key: String,
    pub value: String,
    pub ns: SysctlNs,
}

impl Sysctl {
    /// `/proc/sys/...` for the key (dots are separators unless the key uses slashes).
    pub fn proc_path(&self) -> String {
        let rel = if self.key.contains('/') {
            self.key.clone()
        } else {
            self.key.replace('.', "/")
        };
        format!("/proc/sys/{rel}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub container_id: u32,
    pub host_id: u32,
    pub size: u32,
}

/// Everything the spawn needs, validated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub pid: NsAction,
    pub ipc: NsAction,
    pub uts: NsAction,
    pub net: NsAction,
    pub user: NsAction,
    pub hostname: Option<String>,
    pub sysctls: Vec<Sysctl>,
    /// `linux.cgroupsPath` as sent (the placement rewrites its leaf).
    pub cgroups_path: String,
    pub oom_score_adj: Option<i64>,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub uid_mappings: Vec<IdMap>,
    pub gid_mappings: Vec<IdMap>,
}

/// Decodes the options Any: the spec JSON under [`SPEC_TYPE_URL`]; an empty
/// Any is an empty spec (pause in the host's namespaces, root cgroup parent).
pub fn spec_from_any(type_url: &str, value: &[u8]) -> Result<Value, PlanError> {
    if type_url.is_empty() && value.is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    // containerd may register the type with or without a host prefix.
    let name = type_url
        .strip_prefix("type.googleapis.com/")
        .unwrap_or(type_url);
    if name != SPEC_TYPE_URL {
        return Err(bad(
            "options.type_url",
            format!("{type_url:?}"),
            format!("expected {SPEC_TYPE_URL:?}"),
        ));
    }
    serde_json::from_slice(value)
        .map_err(|e| bad("options.value", "(runtime spec JSON)", e.to_string()))
}

fn u32_field(v: &Value, field: &str) -> Result<u32, PlanError> {
    match v {
        Value::Null => Ok(0),
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(field, n, "not a 32-bit unsigned id")),
        other => Err(bad(field, other, "not a number")),
    }
}

fn id_maps(v: Option<&Value>, field: &str) -> Result<Vec<IdMap>, PlanError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let list = v.as_array().ok_or_else(|| bad(field, v, "not a list"))?;
    let mut out = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let f = |k: &str| {
            u32_field(
                m.get(k).unwrap_or(&Value::Null),
                &format!("{field}[{i}].{k}"),
            )
        };
        let map = IdMap {
            container_id: f("containerID")?,
            host_id: f("hostID")?,
            size: f("size")?,
        };
        if map.size == 0 {
            return Err(bad(
                format!("{field}[{i}].size"),
                0,
                "an id mapping must map at least one id",
            ));
        }
        out.push(map);
    }
    Ok(out)
}

fn classify_sysctl(key: &str) -> Option<SysctlNs> {
    let k = key.replace('/', ".");
    if k.starts_with("net.") {
        Some(SysctlNs::Net)
    } else if k.starts_with("fs.mqueue.")
        || k == "kernel.sem"
        || k.starts_with("kernel.shm")
        || k.starts_with("kernel.msg")
    {
        Some(SysctlNs::Ipc)
    } else if k == "kernel.hostname" || k == "kernel.domainname" {
        Some(SysctlNs::Uts)
    } else {
        None
    }
}

/// Reads the plan from the pause's spec. `netns_path` is the request's field:
/// it fills in a network namespace listed without a path.
pub fn plan(spec: &Value, netns_path: &str) -> Result<Plan, PlanError> {
    let mut p = Plan::default();
    let linux = spec.get("linux").cloned().unwrap_or(Value::Null);
    namespaces(&mut p, &linux)?;
    request_netns(&mut p, netns_path)?;
    if let NsAction::Join(path) = &p.user {
        return Err(bad(
            "linux.namespaces[type=user].path",
            path.display(),
            "joining an existing user namespace is not supported; list it without a path",
        ));
    }
    id_mappings(&mut p, &linux)?;
    hostname(&mut p, spec)?;
    sysctls(&mut p, &linux)?;
    p.cgroups_path = linux
        .get("cgroupsPath")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    process(&mut p, spec)?;
    Ok(p)
}

/// `linux.namespaces`: each one new, joined by path, or (unlisted) the host's.
fn namespaces(p: &mut Plan, linux: &Value) -> Result<(), PlanError> {
    let Some(list) = linux.get("namespaces").filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let list = list
        .as_array()
        .ok_or_else(|| bad("linux.namespaces", list, "not a list"))?;
    for (i, ns) in list.iter().enumerate() {
        let ty = ns.get("type").and_then(Value::as_str).unwrap_or_default();
        let path = ns.get("path").and_then(Value::as_str).unwrap_or_default();
        let action = if path.is_empty() {
            NsAction::New
        } else {
            NsAction::Join(PathBuf::from(path))
        };
        let slot = match ty {
            "pid" => &mut p.pid,
            "ipc" => &mut p.ipc,
            "uts" => &mut p.uts,
            "network" => &mut p.net,
            "user" => &mut p.user,
            // pause needs neither a mount nor a cgroup namespace, and a copy of
            // the host's mounts would only pin them.
            "mount" | "cgroup" | "time" => continue,
            other => {
                return Err(bad(
                    format!("linux.namespaces[{i}].type"),
                    format!("{other:?}"),
                    "not a namespace type",
                ));
            }
        };
        if *slot != NsAction::Host {
            return Err(bad(
                format!("linux.namespaces[{i}].type"),
                format!("{ty:?}"),
                "listed twice",
            ));
        }
        *slot = action;
    }
    Ok(())
}

/// The request's `netns_path` fills in a network namespace listed without a path, and must
/// agree with one listed with a path.
fn request_netns(p: &mut Plan, netns_path: &str) -> Result<(), PlanError> {
    if netns_path.is_empty() {
        return Ok(());
    }
    match &p.net {
        NsAction::New => p.net = NsAction::Join(PathBuf::from(netns_path)),
        NsAction::Join(path) if path.as_os_str() != netns_path => {
            return Err(bad(
                "netns_path",
                netns_path,
                format!(
                    "differs from the spec's network namespace path {}",
                    path.display()
                ),
            ));
        }
        NsAction::Join(_) => {}
        NsAction::Host => {
            return Err(bad(
                "netns_path",
                netns_path,
                "given, but the spec has no network namespace (host network)",
            ));
        }
    }
    Ok(())
}

/// `linux.uidMappings` / `gidMappings`: they imply a user namespace, as in runc, which
/// needs both.
fn id_mappings(p: &mut Plan, linux: &Value) -> Result<(), PlanError> {
    p.uid_mappings = id_maps(linux.get("uidMappings"), "linux.uidMappings")?;
    p.gid_mappings = id_maps(linux.get("gidMappings"), "linux.gidMappings")?;
    let has_maps = !p.uid_mappings.is_empty() || !p.gid_mappings.is_empty();
    if has_maps && p.user == NsAction::Host {
        p.user = NsAction::New; // mappings imply a user namespace, as in runc
    }
    if p.user == NsAction::New && (p.uid_mappings.is_empty() || p.gid_mappings.is_empty()) {
        return Err(bad(
            "linux.uidMappings/gidMappings",
            "(empty)",
            "a new user namespace needs both uid and gid mappings",
        ));
    }
    Ok(())
}

/// `hostname`: only in a private uts namespace.
fn hostname(p: &mut Plan, spec: &Value) -> Result<(), PlanError> {
    let Some(h) = spec
        .get("hostname")
        .and_then(Value::as_str)
        .filter(|h| !h.is_empty())
    else {
        return Ok(());
    };
    if p.uts == NsAction::Host {
        return Err(bad(
            "hostname",
            h,
            "cannot be set without a private uts namespace",
        ));
    }
    if h.len() > 64 || h.contains('\0') {
        return Err(bad("hostname", h, "longer than 64 bytes or holds a NUL"));
    }
    p.hostname = Some(h.to_string());
    Ok(())
}

/// `linux.sysctl`: namespaced ones only, each in a namespace the pod has its own of.
fn sysctls(p: &mut Plan, linux: &Value) -> Result<(), PlanError> {
    let Some(map) = linux.get("sysctl").filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let map = map
        .as_object()
        .ok_or_else(|| bad("linux.sysctl", map, "not a map"))?;
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort(); // deterministic order
    for key in keys {
        let sc = sysctl(p, key, &map[key])?;
        p.sysctls.push(sc);
    }
    Ok(())
}

fn sysctl(p: &Plan, key: &str, value: &Value) -> Result<Sysctl, PlanError> {
    let field = format!("linux.sysctl[{key:?}]");
    let value = value
        .as_str()
        .ok_or_else(|| bad(&field, value, "value is not a string"))?;
    if key.is_empty() || key.contains("..") || key.contains('\0') || key.starts_with(['.', '/']) {
        return Err(bad(&field, key, "not a sysctl name"));
    }
    if value.contains('\0') {
        return Err(bad(&field, value, "value holds a NUL"));
    }
    let ns = classify_sysctl(key).ok_or_else(|| {
        bad(
            &field,
            key,
            "not a namespaced sysctl (net.*, kernel.shm*/msg*/sem, fs.mqueue.*)",
        )
    })?;
    let (private, ns_name) = match ns {
        SysctlNs::Net => (p.net != NsAction::Host, "network"),
        SysctlNs::Ipc => (p.ipc != NsAction::Host, "ipc"),
        SysctlNs::Uts => (p.uts != NsAction::Host, "uts"),
    };
    if !private {
        return Err(bad(
            &field,
            key,
            format!("needs a private {ns_name} namespace; the spec shares the host's"),
        ));
    }
    Ok(Sysctl {
        key: key.to_string(),
        value: value.to_string(),
        ns,
    })
}

/// `process`: oomScoreAdj and the user (uid, gid, additional gids).
fn process(p: &mut Plan, spec: &Value) -> Result<(), PlanError> {
    let process = spec.get("process").cloned().unwrap_or(Value::Null);
    if let Some(v) = process.get("oomScoreAdj").filter(|v| !v.is_null()) {
        let adj = v
            .as_i64()
            .filter(|a| (-1000..=1000).contains(a))
            .ok_or_else(|| bad("process.oomScoreAdj", v, "not in -1000..=1000"))?;
        p.oom_score_adj = Some(adj);
    }
    let user = process.get("user").cloned().unwrap_or(Value::Null);
    p.uid = u32_field(user.get("uid").unwrap_or(&Value::Null), "process.user.uid")?;
    p.gid = u32_field(user.get("gid").unwrap_or(&Value::Null), "process.user.gid")?;
    if let Some(list) = user.get("additionalGids").and_then(Value::as_array) {
        for (i, g) in list.iter().enumerate() {
            p.additional_gids
                .push(u32_field(g, &format!("process.user.additionalGids[{i}]"))?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod_spec() -> Value {
        json!({
            "hostname": "pod-a",
            "process": {"user": {"uid": 65535, "gid": 65535}, "oomScoreAdj": -998},
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network", "path": "/run/netns/a"}, {"type": "mount"}],
                "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shmmni": "100"},
                "cgroupsPath": "/kubepods/besteffort/podU/sandbox",
            }
        })
    }

    #[test]
    fn pod_spec_becomes_a_namespace_plan() {
        let p = plan(&pod_spec(), "/run/netns/a").expect("plan");
        assert_eq!(
            (p.pid.clone(), p.ipc.clone(), p.uts.clone()),
            (NsAction::New, NsAction::New, NsAction::New)
        );
        assert_eq!(p.net, NsAction::Join("/run/netns/a".into()));
        assert_eq!(p.user, NsAction::Host);
        assert_eq!(p.hostname.as_deref(), Some("pod-a"));
        assert_eq!(p.sysctls.len(), 2);
        assert_eq!(p.sysctls[0].ns, SysctlNs::Ipc);
        assert_eq!(
            p.sysctls[1].proc_path(),
            "/proc/sys/net/ipv4/ip_unprivileged_port_start"
        );
        assert_eq!(p.cgroups_path, "/kubepods/besteffort/podU/sandbox");
        assert_eq!(p.oom_score_adj, Some(-998));
        assert_eq!((p.uid, p.gid), (65535, 65535));
    }

    #[test]
    fn request_netns_fills_a_pathless_network_namespace() {
        let spec = json!({"linux": {"namespaces": [{"type": "network"}]}});
        assert_eq!(
            plan(&spec, "/run/netns/b").expect("plan").net,
            NsAction::Join("/run/netns/b".into())
        );
        assert_eq!(plan(&spec, "").expect("plan").net, NsAction::New);
        // Host network: absent type stays in the host's.
        assert_eq!(plan(&json!({}), "").expect("plan").net, NsAction::Host);
    }

    #[test]
    fn user_namespace_from_mappings() {
        let spec = json!({"linux": {
            "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
            "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
        }});
        let p = plan(&spec, "").expect("plan");
        assert_eq!(p.user, NsAction::New);
        assert_eq!(
            p.uid_mappings,
            vec![IdMap {
                container_id: 0,
                host_id: 100000,
                size: 65536
            }]
        );
        let half = json!({"linux": {"namespaces": [{"type": "user"}], "uidMappings": [{"containerID": 0, "hostID": 1, "size": 1}]}});
        assert!(
            plan(&half, "")
                .expect_err("no gid map")
                .field
                .contains("gidMappings")
        );
    }

    fn field_of(spec: Value, netns: &str) -> String {
        plan(&spec, netns).expect_err("refused").field
    }

    #[test]
    fn bad_specs_name_their_field() {
        assert_eq!(
            field_of(json!({"linux": {"namespaces": [{"type": "bogus"}]}}), ""),
            "linux.namespaces[0].type"
        );
        assert_eq!(
            field_of(
                json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "pid"}]}}),
                ""
            ),
            "linux.namespaces[1].type"
        );
        assert_eq!(field_of(json!({"hostname": "x"}), ""), "hostname");
        assert_eq!(
            field_of(
                json!({"linux": {"sysctl": {"net.core.somaxconn": "1"}}}),
                ""
            ),
            "linux.sysctl[\"net.core.somaxconn\"]"
        );
        assert_eq!(
            field_of(
                json!({"linux": {"namespaces": [{"type": "network"}], "sysctl": {"vm.swappiness": "1"}}}),
                ""
            ),
            "linux.sysctl[\"vm.swappiness\"]"
        );
        assert_eq!(
            field_of(
                json!({"linux": {"namespaces": [{"type": "ipc"}], "sysctl": {"kernel.shmmax": 1}}}),
                ""
            ),
            "linux.sysctl[\"kernel.shmmax\"]"
        );
        assert_eq!(
            field_of(json!({"process": {"oomScoreAdj": 5000}}), ""),
            "process.oomScoreAdj"
        );
        assert_eq!(
            field_of(json!({"process": {"user": {"uid": -1}}}), ""),
            "process.user.uid"
        );
        assert_eq!(field_of(json!({}), "/run/netns/x"), "netns_path");
        assert_eq!(
            field_of(
                json!({"linux": {"namespaces": [{"type": "network", "path": "/a"}]}}),
                "/b"
            ),
            "netns_path"
        );
        assert_eq!(
            field_of(
                json!({"linux": {"namespaces": [{"type": "user", "path": "/proc/1/ns/user"}]}}),
                ""
            ),
            "linux.namespaces[type=user].path"
        );
        let e =
            plan(&json!({"linux": {"namespaces": [{"type": "bogus"}]}}), "").expect_err("refused");
        assert!(e.to_string().contains("\"bogus\""), "{e}");
    }

    #[test]
    fn options_any_is_the_runtime_spec() {
        let v = spec_from_any(SPEC_TYPE_URL, br#"{"hostname":"h"}"#).expect("spec");
        assert_eq!(v["hostname"], "h");
        assert!(
            spec_from_any("", b"")
                .expect("empty")
                .as_object()
                .is_some_and(|o| o.is_empty())
        );
        assert_eq!(
            spec_from_any("containerd.runc.v1.Options", b"x")
                .expect_err("wrong type")
                .field,
            "options.type_url"
        );
        assert_eq!(
            spec_from_any(SPEC_TYPE_URL, b"{not json")
                .expect_err("bad json")
                .field,
            "options.value"
        );
    }
}
