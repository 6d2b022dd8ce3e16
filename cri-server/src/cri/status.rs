//! Status: RuntimeReady, NetworkReady (with the reason kubelet shows), the runtime handlers.
//!
//! NetworkReady comes from the CNI manager's latest look at the config directory, so a
//! conflist written after start-up flips it within a second (promise 4).

use std::collections::HashMap;
use std::path::Path;

use crisp_proto::cri::v1::{
    RuntimeCondition, RuntimeFeatures, RuntimeHandler, RuntimeHandlerFeatures, RuntimeStatus,
    StatusRequest, StatusResponse,
};

use crate::daemon::Daemon;
use crate::error::CriError;

pub const RUNTIME_READY: &str = "RuntimeReady";
pub const NETWORK_READY: &str = "NetworkReady";
/// The reason kubelet and every other runtime use for a missing network config.
pub const NETWORK_PLUGIN_NOT_READY: &str = "NetworkPluginNotReady";

pub async fn status(d: &Daemon, req: StatusRequest) -> Result<StatusResponse, CriError> {
    let network = match d.cni.current() {
        Ok(_) => RuntimeCondition {
            r#type: NETWORK_READY.into(),
            status: true,
            reason: String::new(),
            message: String::new(),
        },
        Err(e) => RuntimeCondition {
            r#type: NETWORK_READY.into(),
            status: false,
            reason: NETWORK_PLUGIN_NOT_READY.into(),
            message: e.to_string(),
        },
    };
    // crispd is serving and its store is open: the runtime is ready. A handler whose binary is
    // missing makes only the pods that ask for it fail (named in their error), not the node.
    let runtime = RuntimeCondition {
        r#type: RUNTIME_READY.into(),
        status: true,
        reason: String::new(),
        message: String::new(),
    };

    // The default handler runs the configured runtime, or the one the shim picks (`auto`),
    // with the switches of the named handler of that runtime, if any.
    let default_binary = match d.cfg.runtime {
        crate::config::RuntimeChoice::Auto => crate::runtime_features::auto_runtime().await,
        r => r.as_str().to_string(),
    };
    let default = d.cfg.runtime_handlers.get(default_binary.as_str());
    let mut handlers = vec![handler("", Path::new(&default_binary), default).await];
    for (name, h) in &d.cfg.runtime_handlers {
        handlers.push(handler(name, &h.binary, Some(h)).await);
    }

    let mut info = HashMap::new();
    if req.verbose {
        info.insert("info".to_string(), verbose_info(d).to_string());
    }

    Ok(StatusResponse {
        status: Some(RuntimeStatus {
            conditions: vec![runtime, network],
        }),
        info,
        runtime_handlers: handlers,
        features: Some(RuntimeFeatures {
            supplemental_groups_policy: true,
            user_namespaces_host_network: false,
        }),
    })
}

/// Status's verbose data, all under the one key `info` (a JSON object): `crictl info`
/// merges every key of the map into the top level of its output after its own `status`,
/// `runtimeHandlers` and `features`, so any other key risks shadowing one of them, now or
/// in a later crictl. Inside, containerd's names for the same facts: `config` (the daemon's
/// effective configuration), `cniconfig` (the network config in use) and
/// `lastCNILoadStatus` ("OK" or why none loaded); `conditions` are crispd's start-up notes.
fn verbose_info(d: &Daemon) -> serde_json::Value {
    let conds: Vec<_> = d
        .conditions
        .list()
        .into_iter()
        .map(|c| serde_json::json!({"key": c.key, "message": c.message}))
        .collect();
    let config = serde_json::to_value(&*d.cfg)
        .unwrap_or_else(|e| serde_json::Value::String(format!("unrenderable: {e}")));
    let (cni, cni_status) = match d.cni.current() {
        Ok(c) => (
            serde_json::to_value(&*c).unwrap_or(serde_json::Value::Null),
            "OK".to_string(),
        ),
        Err(e) => (serde_json::Value::Null, e.to_string()),
    };
    serde_json::json!({
        "config": config,
        "cniconfig": cni,
        "lastCNILoadStatus": cni_status,
        "conditions": conds,
    })
}

/// One handler's features: what its OCI runtime reports (`runtime_features`), unless the
/// handler's config switches a feature off.
async fn handler(
    name: &str,
    binary: &Path,
    h: Option<&crate::config::RuntimeHandler>,
) -> RuntimeHandler {
    let probed = crate::runtime_features::of(binary).await;
    let (userns, rro) = h
        .map(|h| (h.user_namespaces, h.recursive_read_only_mounts))
        .unwrap_or((true, true));
    RuntimeHandler {
        name: name.into(),
        features: Some(RuntimeHandlerFeatures {
            recursive_read_only_mounts: rro && probed.recursive_read_only_mounts,
            user_namespaces: userns && probed.user_namespaces,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemon(dir: &std::path::Path) -> Daemon {
        Daemon::for_test(dir)
    }

    #[tokio::test]
    async fn network_not_ready_names_what_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = daemon(dir.path());
        let s = status(&d, StatusRequest { verbose: true })
            .await
            .expect("ok");
        let conds = s.status.expect("status").conditions;
        let rt = conds
            .iter()
            .find(|c| c.r#type == RUNTIME_READY)
            .expect("runtime");
        assert!(rt.status);
        let net = conds
            .iter()
            .find(|c| c.r#type == NETWORK_READY)
            .expect("network");
        assert!(!net.status);
        assert_eq!(net.reason, NETWORK_PLUGIN_NOT_READY);
        assert!(net.message.contains("net.d"), "{}", net.message);
        let names: Vec<_> = s.runtime_handlers.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, vec!["", "crun", "runc"]);
        // crictl info merges the map over its own status/runtimeHandlers/features: one key.
        assert_eq!(s.info.keys().collect::<Vec<_>>(), vec!["info"]);
        let doc: serde_json::Value = serde_json::from_str(&s.info["info"]).expect("JSON");
        assert!(doc["config"]["listen"].is_string(), "{doc}");
        assert!(doc["cniconfig"].is_null(), "{doc}");
        assert!(
            doc["lastCNILoadStatus"]
                .as_str()
                .is_some_and(|m| m.contains("net.d")),
            "{doc}"
        );
    }

    #[tokio::test]
    async fn network_ready_once_config_appears() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = daemon(dir.path());
        std::fs::create_dir_all(dir.path().join("net.d")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("bin")).expect("mkdir");
        std::fs::write(dir.path().join("bin/loopback"), "").expect("write");
        std::fs::write(
            dir.path().join("net.d/99-lo.conf"),
            r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
        )
        .expect("write");
        d.cni.reload();
        let s = status(&d, StatusRequest::default()).await.expect("ok");
        let conds = s.status.expect("status").conditions;
        assert!(conds.iter().all(|c| c.status), "{conds:?}");
    }
}
