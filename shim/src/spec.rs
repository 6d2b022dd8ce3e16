//! The few edits the shim makes to a bundle's `config.json` before the OCI
//! runtime sees it: the cgroup placement and the oom_score_adj floor. The spec
//! is kept as JSON so fields this code does not know pass through untouched.

use std::{io::Write, path::Path};

use serde_json::Value;

use crate::placement::{self, CgroupDriver, PlacementError};

pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("parse {0}: {1}")]
    Parse(String, serde_json::Error),
    #[error("write {0}: {1}")]
    Write(String, std::io::Error),
    #[error(transparent)]
    Placement(#[from] PlacementError),
}

pub fn read(bundle: &Path) -> Result<Value, SpecError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|e| SpecError::Read(path.display().to_string(), e))?;
    serde_json::from_slice(&text).map_err(|e| SpecError::Parse(path.display().to_string(), e))
}

/// Writes temp + fsync + rename, so a crash never leaves a torn config.json.
pub fn write(bundle: &Path, spec: &Value) -> Result<(), SpecError> {
    let path = bundle.join("config.json");
    let tmp = bundle.join(".config.json.crisp-tmp");
    let err = |e| SpecError::Write(path.display().to_string(), e);
    let bytes = serde_json::to_vec(spec)
        .map_err(|e| SpecError::Write(path.display().to_string(), e.into()))?;
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(&bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}

pub fn annotation<'a>(spec: &'a Value, key: &str) -> Option<&'a str> {
    spec.get("annotations")?.get(key)?.as_str()
}

/// The grouping key for one-shim-per-pod: the sandbox id, or the task's own id.
pub fn group_id<'a>(spec: &'a Value, id: &'a str) -> &'a str {
    annotation(spec, SANDBOX_ID_ANNOTATION)
        .filter(|s| !s.is_empty())
        .unwrap_or(id)
}

/// Sets `linux.cgroupsPath` from [`placement::cgroup_path`]. The pod's parent
/// is taken from whatever path the caller wrote (containerd's CRI plugin writes
/// its own `…/<id>` or `slice:cri-containerd:<id>` form), so the sandbox and
/// every container of the pod get the same form. Returns the path set.
pub fn place(spec: &mut Value, driver: CgroupDriver, id: &str) -> Result<String, SpecError> {
    let current = spec
        .pointer("/linux/cgroupsPath")
        .and_then(Value::as_str)
        .unwrap_or("");
    let parent = match placement::parent_of(current) {
        Some(p) => p,
        // No parent given: systemd's default slice, or the cgroupfs root.
        None => match driver {
            CgroupDriver::Systemd => "system.slice".to_string(),
            CgroupDriver::Cgroupfs => String::new(),
        },
    };
    let path = placement::cgroup_path(driver, &parent, id)?;
    if let Some(obj) = spec.as_object_mut() {
        let linux = obj
            .entry("linux")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(linux) = linux.as_object_mut() {
            linux.insert("cgroupsPath".into(), Value::String(path.clone()));
        }
    }
    Ok(path)
}

/// containerd's `restrict_oom_score_adj`: without CAP_SYS_RESOURCE a process
/// may not lower its oom_score_adj below its parent's, so a request below the
/// shim's own would fail the container; raise it to the shim's instead.
/// Returns the (old, new) values when it changed something.
pub fn restrict_oom_score_adj(
    process: &mut Value,
    own: i64,
    has_sys_resource: bool,
) -> Option<(i64, i64)> {
    if has_sys_resource {
        return None;
    }
    let requested = process.get("oomScoreAdj")?.as_i64()?;
    if requested >= own {
        return None;
    }
    process
        .as_object_mut()?
        .insert("oomScoreAdj".into(), Value::from(own));
    Some((requested, own))
}

pub fn own_oom_score_adj() -> i64 {
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether this process has CAP_SYS_RESOURCE in its effective set.
pub fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn placement_replaces_containerds_naming_with_ours() {
        let mut s = json!({"linux": {"cgroupsPath": "/kubepods/besteffort/podU/abc"}, "annotations": {SANDBOX_ID_ANNOTATION: "sb"}});
        assert_eq!(
            place(&mut s, CgroupDriver::Cgroupfs, "abc").expect("place"),
            "/kubepods/besteffort/podU/crisp-abc"
        );
        assert_eq!(
            s["linux"]["cgroupsPath"],
            "/kubepods/besteffort/podU/crisp-abc"
        );
        assert_eq!(group_id(&s, "abc"), "sb");

        let mut s =
            json!({"linux": {"cgroupsPath": "kubepods-besteffort-podU.slice:cri-containerd:abc"}});
        assert_eq!(
            place(&mut s, CgroupDriver::Systemd, "abc").expect("place"),
            "kubepods-besteffort-podU.slice:crisp:abc"
        );
        assert_eq!(group_id(&s, "abc"), "abc");

        let mut s = json!({});
        assert_eq!(
            place(&mut s, CgroupDriver::Cgroupfs, "x").expect("place"),
            "/crisp-x"
        );
    }

    #[test]
    fn oom_score_adj_is_raised_only_without_the_capability() {
        let mut p = json!({"oomScoreAdj": -998});
        assert_eq!(restrict_oom_score_adj(&mut p, 0, true), None);
        assert_eq!(p["oomScoreAdj"], -998);
        assert_eq!(
            restrict_oom_score_adj(&mut p, -500, false),
            Some((-998, -500))
        );
        assert_eq!(p["oomScoreAdj"], -500);
        let mut p = json!({"oomScoreAdj": 100});
        assert_eq!(restrict_oom_score_adj(&mut p, 0, false), None);
        let mut p = json!({});
        assert_eq!(restrict_oom_score_adj(&mut p, 0, false), None);
    }
}
