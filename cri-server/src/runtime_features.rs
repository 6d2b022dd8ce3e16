//! What each runtime handler really supports, for Status: asked of the OCI runtime itself with
//! `<runtime> features` (the OCI runtime-spec's features document, runc ≥ 1.1), never assumed.
//!
//! - user namespaces: the runtime lists the `user` namespace (crispd maps the rootfs and image
//!   volumes itself, through the snapshotter's idmapped layers);
//! - recursive read-only mounts: the runtime lists the `rro` mount option.
//!
//! A runtime that has no `features` command (Debian's crun 1.8) or is not installed advertises
//! neither: kubelet then refuses those pods up front instead of a container failing later.
//! A handler's config can switch a feature off, never on.
//!
//! The answer depends only on the binary, so it is asked once per binary path per process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The features Status reports for one handler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    pub user_namespaces: bool,
    pub recursive_read_only_mounts: bool,
}

/// Features of the OCI runtime's `features` JSON document; none for anything unreadable.
pub fn parse(doc: &str) -> Features {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(doc) else {
        return Features::default();
    };
    let has = |list: &serde_json::Value, item: &str| {
        list.as_array()
            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(item)))
    };
    Features {
        user_namespaces: has(&v["linux"]["namespaces"], "user"),
        recursive_read_only_mounts: has(&v["mountOptions"], "rro"),
    }
}

fn cache() -> &'static Mutex<HashMap<PathBuf, Features>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Features>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The runtime the shim picks for the default handler when the config says `auto`, asked
/// once (the shim's own probe: crun where it works with this host's cgroups, else runc).
pub async fn auto_runtime() -> String {
    static AUTO: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    AUTO.get_or_init(crisp_shim::runtime::probe_default)
        .await
        .clone()
}

/// The features of the runtime `binary` (a name looked up in PATH, or a path).
pub async fn of(binary: &Path) -> Features {
    let Some(path) = crisp_shim::runtime::which(&binary.to_string_lossy()) else {
        tracing::info!(runtime = %binary.display(), "runtime not installed: no features advertised");
        return Features::default();
    };
    if let Some(f) = cache().lock().ok().and_then(|c| c.get(&path).copied()) {
        return f;
    }
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new(&path)
            .arg("features")
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let f = match out {
        Ok(Ok(o)) if o.status.success() => parse(&String::from_utf8_lossy(&o.stdout)),
        other => {
            tracing::info!(runtime = %path.display(), result = ?other.map(|r| r.map(|o| o.status)),
                "`features` unavailable: no user namespaces or rro advertised for it");
            Features::default()
        }
    };
    if let Ok(mut c) = cache().lock() {
        c.insert(path, f);
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_features_document() {
        let doc = r#"{"mountOptions":["ro","rro","rbind"],
                      "linux":{"namespaces":["mount","user","pid"]}}"#;
        assert_eq!(
            parse(doc),
            Features {
                user_namespaces: true,
                recursive_read_only_mounts: true
            }
        );
        let old = r#"{"mountOptions":["ro"],"linux":{"namespaces":["mount"]}}"#;
        assert_eq!(parse(old), Features::default());
        assert_eq!(parse("unknown command features"), Features::default());
    }
}
