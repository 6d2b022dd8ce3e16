//! Read-only pod calls answered from the store: ListPodSandbox (filters by id, state and
//! labels) and PodSandboxStatus. The store is the source of truth; only a verbose
//! PodSandboxStatus also asks the pod's shim, for the details it alone knows.

use std::collections::HashMap;
use std::time::Duration;

use containerd_shim_protos::sandbox_api::SandboxStatusRequest;

use crisp_proto::cri::v1::{
    LinuxPodSandboxStatus, ListPodSandboxRequest, ListPodSandboxResponse, Namespace, PodIp,
    PodSandbox, PodSandboxConfig, PodSandboxFilter, PodSandboxNetworkStatus, PodSandboxState,
    PodSandboxStatus, PodSandboxStatusRequest, PodSandboxStatusResponse,
};
use prost::Message;

use crate::error::CriError;
use crate::pod::service::PodService;
use crate::shim::client::ctx;
use crate::store::Store;
use crate::store::records::{PodRecord, PodState};

/// Decode the CRI config kept with a record (hex of its protobuf encoding).
pub fn pod_config(rec: &PodRecord) -> PodSandboxConfig {
    crate::util::hex_decode(&rec.config_pb)
        .and_then(|b| PodSandboxConfig::decode(b.as_slice()).ok())
        .unwrap_or_default()
}

pub fn encode_config(cfg: &PodSandboxConfig) -> String {
    crate::util::hex_encode(&cfg.encode_to_vec())
}

fn state_of(rec: &PodRecord) -> PodSandboxState {
    match rec.state {
        PodState::Ready => PodSandboxState::SandboxReady,
        // A pod still being created is not ready yet, as containerd reports it.
        PodState::Creating | PodState::NotReady => PodSandboxState::SandboxNotready,
    }
}

fn labels_match(labels: &HashMap<String, String>, selector: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

pub fn matches(rec: &PodRecord, cfg: &PodSandboxConfig, f: &PodSandboxFilter) -> bool {
    // containerd matches ids by prefix so a truncated id (as crictl shows) works.
    (f.id.is_empty() || rec.id.starts_with(&f.id))
        && f.state
            .as_ref()
            .is_none_or(|s| s.state == state_of(rec) as i32)
        && labels_match(&cfg.labels, &f.label_selector)
}

pub fn list_pod_sandbox(
    store: &Store,
    req: ListPodSandboxRequest,
) -> Result<ListPodSandboxResponse, CriError> {
    let filter = req.filter.unwrap_or_default();
    let mut items = Vec::new();
    for (_, rec) in store.list::<PodRecord>()? {
        let cfg = pod_config(&rec);
        if !matches(&rec, &cfg, &filter) {
            continue;
        }
        items.push(PodSandbox {
            id: rec.id.clone(),
            metadata: cfg.metadata.clone(),
            state: state_of(&rec) as i32,
            created_at: rec.created_at,
            labels: cfg.labels.clone(),
            annotations: cfg.annotations.clone(),
            runtime_handler: rec.runtime_handler.clone(),
        });
    }
    items.sort_by_key(|p| p.created_at);
    Ok(ListPodSandboxResponse { items })
}

/// Find a pod by full id or unique prefix.
pub fn find(store: &Store, id: &str) -> Result<PodRecord, CriError> {
    crate::store::find_by_id_or_prefix(
        store,
        id,
        "pod_sandbox_id",
        "pod sandbox",
        |r: &PodRecord| &r.id,
    )
}

pub fn pod_sandbox_status(
    store: &Store,
    req: PodSandboxStatusRequest,
) -> Result<PodSandboxStatusResponse, CriError> {
    let rec = find(store, &req.pod_sandbox_id)?;
    let cfg = pod_config(&rec);
    let network = rec.ips.first().map(|ip| PodSandboxNetworkStatus {
        ip: ip.clone(),
        additional_ips: rec
            .ips
            .iter()
            .skip(1)
            .map(|ip| PodIp { ip: ip.clone() })
            .collect(),
    });
    let mut info = HashMap::new();
    if req.verbose {
        // One key, `info`, holding a JSON object, as containerd answers: crictl merges every
        // key of this map into the top level of its output, after its own `status`, so any
        // other key could shadow what crictl prints. Names follow containerd's where it has
        // the same fact (pid, runtimeHandler).
        let v = serde_json::json!({
            "pid": rec.pause_pid,
            "netNamespacePath": rec.netns_path,
            "shimAddress": rec.shim_address,
            "cgroupParent": rec.cgroup_parent,
            "runtimeHandler": rec.runtime_handler,
        });
        info.insert("info".to_string(), v.to_string());
    }
    Ok(PodSandboxStatusResponse {
        status: Some(PodSandboxStatus {
            id: rec.id.clone(),
            metadata: cfg.metadata.clone(),
            state: state_of(&rec) as i32,
            created_at: rec.created_at,
            network,
            linux: Some(LinuxPodSandboxStatus {
                namespaces: Some(Namespace {
                    options: cfg
                        .linux
                        .as_ref()
                        .and_then(|l| l.security_context.as_ref())
                        .and_then(|s| s.namespace_options.clone()),
                }),
            }),
            labels: cfg.labels.clone(),
            annotations: cfg.annotations.clone(),
            runtime_handler: rec.runtime_handler.clone(),
        }),
        info,
        containers_statuses: vec![],
        timestamp: crate::util::now_nanos(),
    })
}

/// How long a verbose PodSandboxStatus waits for the pod's shim (a human's `crictl inspectp`;
/// kubelet does not ask for verbose).
const SHIM_STATUS_CALL: Duration = Duration::from_secs(5);

/// PodSandboxStatus as served. With `verbose`, the entries of the shim's own verbose
/// SandboxStatus (cgroupsPath, bundle, status, exitStatus) join the `info` object. Without a
/// shim that answers (gone, or a pod still being set up) the store's answer stands: the
/// details are extras.
pub async fn pod_sandbox_status_served(
    d: &PodService,
    req: PodSandboxStatusRequest,
) -> Result<PodSandboxStatusResponse, CriError> {
    let verbose = req.verbose;
    let mut resp = pod_sandbox_status(&d.store, req)?;
    let Some(id) = resp
        .status
        .as_ref()
        .filter(|_| verbose)
        .map(|s| s.id.clone())
    else {
        return Ok(resp);
    };
    let Some(shim) = d.shims.get(&id) else {
        return Ok(resp);
    };
    let req = SandboxStatusRequest {
        sandbox_id: id.clone(),
        verbose: true,
        ..Default::default()
    };
    match shim
        .sandbox()
        .sandbox_status(ctx(SHIM_STATUS_CALL), &req)
        .await
    {
        Ok(st) => merge_shim_info(&mut resp.info, st.info),
        Err(e) => {
            tracing::warn!(pod_id = %id, error = %e, "verbose PodSandboxStatus: the shim did not answer; store's info only")
        }
    }
    Ok(resp)
}

/// The shim's entries join our `info` object, never the map itself (its `status` would
/// replace crictl's). Its `status` is the pause process's state, which containerd calls
/// `processStatus`; `netnsPath` repeats our `netNamespacePath`. On a clash ours stays.
fn merge_shim_info(info: &mut HashMap<String, String>, shim: HashMap<String, String>) {
    let Some(doc) = info.get_mut("info") else {
        return;
    };
    let mut obj = match serde_json::from_str::<serde_json::Value>(doc) {
        Ok(serde_json::Value::Object(o)) => o,
        _ => return,
    };
    for (k, v) in shim {
        let key = match k.as_str() {
            "status" => "processStatus".to_string(),
            "netnsPath" => continue,
            _ => k,
        };
        let value = match key.as_str() {
            "exitStatus" => v
                .parse::<u32>()
                .map(serde_json::Value::from)
                .unwrap_or(serde_json::Value::String(v)),
            _ => serde_json::Value::String(v),
        };
        obj.entry(key).or_insert(value);
    }
    *doc = serde_json::Value::Object(obj).to_string();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::Daemon;
    use crate::error::ErrorKind;
    use crisp_proto::cri::v1::{PodSandboxMetadata, PodSandboxStateValue};

    fn rec(id: &str, state: PodState, app: &str, created: i64) -> PodRecord {
        let cfg = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: format!("name-{id}"),
                uid: format!("uid-{id}"),
                namespace: "ns".into(),
                attempt: 0,
            }),
            labels: [("app".to_string(), app.to_string())].into(),
            ..Default::default()
        };
        PodRecord {
            name: format!("name-{id}"),
            namespace: "ns".into(),
            uid: format!("uid-{id}"),
            created_at: created,
            runtime_handler: "runc".into(),
            config_pb: encode_config(&cfg),
            netns_path: Some(format!("/run/crisp/netns/{id}")),
            ips: vec!["10.1.0.5".into(), "fd00::5".into()],
            pause_pid: Some(42),
            ..PodRecord::for_test(id, state)
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&d.path().join("crisp.db")).expect("store");
        s.put("aaa111", &rec("aaa111", PodState::Ready, "web", 2))
            .expect("put");
        s.put("aab222", &rec("aab222", PodState::NotReady, "web", 1))
            .expect("put");
        s.put("bbb333", &rec("bbb333", PodState::Ready, "db", 3))
            .expect("put");
        (d, s)
    }

    fn ids(r: ListPodSandboxResponse) -> Vec<String> {
        r.items.into_iter().map(|p| p.id).collect()
    }

    #[test]
    fn list_filters() {
        let (_d, s) = store();
        let all = list_pod_sandbox(&s, ListPodSandboxRequest::default()).expect("list");
        assert_eq!(ids(all), vec!["aab222", "aaa111", "bbb333"], "oldest first");
        let f = |filter: PodSandboxFilter| {
            ids(list_pod_sandbox(
                &s,
                ListPodSandboxRequest {
                    filter: Some(filter),
                },
            )
            .expect("list"))
        };
        assert_eq!(
            f(PodSandboxFilter {
                id: "aa".into(),
                ..Default::default()
            }),
            vec!["aab222", "aaa111"]
        );
        assert_eq!(
            f(PodSandboxFilter {
                state: Some(PodSandboxStateValue {
                    state: PodSandboxState::SandboxReady as i32
                }),
                ..Default::default()
            }),
            vec!["aaa111", "bbb333"]
        );
        assert_eq!(
            f(PodSandboxFilter {
                label_selector: [("app".into(), "web".into())].into(),
                ..Default::default()
            }),
            vec!["aab222", "aaa111"]
        );
        assert!(
            f(PodSandboxFilter {
                label_selector: [("app".into(), "x".into())].into(),
                ..Default::default()
            })
            .is_empty()
        );
    }

    #[test]
    fn status_by_id_and_prefix_with_ips() {
        let (_d, s) = store();
        let r = pod_sandbox_status(
            &s,
            PodSandboxStatusRequest {
                pod_sandbox_id: "bbb".into(),
                verbose: true,
            },
        )
        .expect("status");
        let st = r.status.expect("status");
        assert_eq!(st.id, "bbb333");
        assert_eq!(st.state, PodSandboxState::SandboxReady as i32);
        assert_eq!(st.metadata.map(|m| m.name), Some("name-bbb333".into()));
        let net = st.network.expect("network");
        assert_eq!(net.ip, "10.1.0.5");
        assert_eq!(net.additional_ips[0].ip, "fd00::5");
        assert!(r.info["info"].contains("\"pid\":42"));
    }

    #[test]
    fn status_errors() {
        let (_d, s) = store();
        let e = pod_sandbox_status(
            &s,
            PodSandboxStatusRequest {
                pod_sandbox_id: "zzz".into(),
                verbose: false,
            },
        )
        .expect_err("unknown");
        assert_eq!(e.kind, ErrorKind::NotFound);
        let e = pod_sandbox_status(
            &s,
            PodSandboxStatusRequest {
                pod_sandbox_id: "aa".into(),
                verbose: false,
            },
        )
        .expect_err("ambiguous");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        let e = pod_sandbox_status(&s, PodSandboxStatusRequest::default()).expect_err("empty");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
    }

    #[test]
    fn config_round_trips_through_hex() {
        let r = rec("x", PodState::Ready, "web", 1);
        assert_eq!(pod_config(&r).labels["app"], "web");
        assert_eq!(crate::util::hex_decode("0g"), None);
        assert_eq!(crate::util::hex_decode("abc"), None);
    }

    #[test]
    fn shim_info_joins_our_info_object_and_never_the_map() {
        let mut info: HashMap<String, String> =
            [("info".to_string(), r#"{"pid":42}"#.to_string())].into();
        merge_shim_info(
            &mut info,
            [
                ("pid".to_string(), "7".to_string()),
                ("bundle".to_string(), "/run/x".to_string()),
                ("status".to_string(), "stopped".to_string()),
                ("exitStatus".to_string(), "137".to_string()),
                ("netnsPath".to_string(), "/run/netns/x".to_string()),
            ]
            .into(),
        );
        // crictl inspectp merges these keys over its own `status`: only `info` may be here.
        assert_eq!(info.keys().collect::<Vec<_>>(), vec!["info"]);
        let doc: serde_json::Value = serde_json::from_str(&info["info"]).expect("JSON");
        assert_eq!(doc["pid"], 42, "ours wins a clash");
        assert_eq!(doc["bundle"], "/run/x");
        assert_eq!(doc["processStatus"], "stopped");
        assert_eq!(doc["exitStatus"], 137);
        assert!(
            doc.get("status").is_none() && doc.get("netnsPath").is_none(),
            "{doc}"
        );
    }

    #[tokio::test]
    async fn verbose_status_without_a_shim_is_the_store_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Daemon::for_test(dir.path()).pods;
        d.store
            .put("aaa111", &rec("aaa111", PodState::NotReady, "web", 2))
            .expect("put");
        let r = pod_sandbox_status_served(
            &d,
            PodSandboxStatusRequest {
                pod_sandbox_id: "aaa".into(),
                verbose: true,
            },
        )
        .await
        .expect("status");
        assert_eq!(r.info.keys().collect::<Vec<_>>(), vec!["info"]);
        assert!(r.info["info"].contains("\"pid\":42"), "{}", r.info["info"]);
    }
}
