//! Start-up recovery of what a crash or `kill -9` can leave behind, decided from the store
//! (the source of truth): an ID range, network namespace, CNI attachment or container record
//! whose pod has no record is an orphan and is released. Each cleanup is logged by name;
//! one that fails is logged and left for the next start, never fatal.
//!
//! Ordering that makes this safe: RunPodSandbox writes the pod's record before it allocates
//! anything for the pod, so "no record" really means "nobody owns this".

use std::collections::HashSet;
use std::path::Path;

use crate::cni::CniManager;
use crate::store::records::{ContainerRecord, IdRangeRecord, PodRecord};
use crate::store::{Store, StoreError};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub pods: usize,
    pub containers: usize,
    pub released_id_ranges: Vec<String>,
    pub removed_netns: Vec<String>,
    pub removed_containers: Vec<String>,
    pub cni_deleted: Vec<String>,
    pub failures: Vec<String>,
}

/// Store-side and netns orphans (phase "recover").
pub fn recover(store: &Store, netns_dir: &Path) -> Result<Report, StoreError> {
    let pods = store.list::<PodRecord>()?;
    let live: HashSet<String> = pods.iter().map(|(k, _)| k.clone()).collect();
    let mut r = Report {
        pods: pods.len(),
        ..Report::default()
    };

    for (id, _) in store.list::<IdRangeRecord>()? {
        if !live.contains(&id) {
            store.delete::<IdRangeRecord>(&id)?;
            tracing::info!(pod_id = %id, "released orphaned ID range");
            r.released_id_ranges.push(id);
        }
    }
    let ctrs = store.list::<ContainerRecord>()?;
    r.containers = ctrs.len();
    for (id, c) in ctrs {
        if !live.contains(&c.pod_id) {
            store.delete::<ContainerRecord>(&id)?;
            tracing::info!(container_id = %id, pod_id = %c.pod_id, "removed record of container whose pod is gone");
            r.removed_containers.push(id);
            r.containers -= 1;
        }
    }
    for path in crate::netns::list(netns_dir) {
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if live.contains(&name) {
            continue;
        }
        match crate::netns::remove(&path) {
            Ok(()) => {
                tracing::info!(pod_id = %name, path = %path.display(), "removed orphaned netns");
                r.removed_netns.push(name);
            }
            Err(e) => {
                tracing::warn!(pod_id = %name, error = %e, "cannot remove orphaned netns");
                r.failures.push(format!("netns {name}: {e}"));
            }
        }
    }
    Ok(r)
}

/// CNI attachments of pods that no longer exist (phase "cni", once plugins can run): DEL from
/// the cached config releases their IPs and iptables rules.
pub fn recover_cni(store: &Store, cni: &CniManager, r: &mut Report) -> Result<(), StoreError> {
    let live: HashSet<String> = store
        .list::<PodRecord>()?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for pod_id in cni.cached_pods() {
        if live.contains(&pod_id) {
            continue;
        }
        match cni.del_cached(&pod_id) {
            Ok(()) => {
                tracing::info!(pod_id = %pod_id, "CNI DEL for orphaned attachment");
                r.cni_deleted.push(pod_id);
            }
            Err(e) => {
                tracing::warn!(pod_id = %pod_id, error = %e, "CNI DEL of orphaned attachment failed");
                r.failures.push(format!("cni {pod_id}: {e}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::{ContainerState, PodState};

    fn pod(id: &str) -> PodRecord {
        PodRecord {
            id: id.into(),
            name: format!("n-{id}"),
            namespace: "default".into(),
            uid: format!("u-{id}"),
            attempt: 0,
            state: PodState::Ready,
            created_at: 1,
            runtime_handler: String::new(),
            config_pb: String::new(),
            netns_path: None,
            ips: vec![],
            shim_address: None,
            pause_pid: None,
            cgroup_parent: String::new(),
        }
    }

    fn ctr(id: &str, pod_id: &str) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            pod_id: pod_id.into(),
            name: id.into(),
            attempt: 0,
            state: ContainerState::Exited,
            created_at: 1,
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            image: String::new(),
            image_ref: String::new(),
            log_path: String::new(),
            config_pb: String::new(),
            pid: None,
        }
    }

    #[test]
    fn orphans_are_released_and_live_things_kept() {
        let d = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&d.path().join("crisp.db")).expect("store");
        store.put("p1", &pod("p1")).expect("put");
        let range = IdRangeRecord {
            host_uid: 1,
            host_gid: 1,
            len: 65536,
        };
        store.put("p1", &range).expect("put");
        store.put("gone", &range).expect("put");
        store.put("c1", &ctr("c1", "p1")).expect("put");
        store.put("c2", &ctr("c2", "gone")).expect("put");
        let netns = d.path().join("netns");
        std::fs::create_dir_all(&netns).expect("mkdir");
        // Plain files stand in for unmounted namespace files.
        std::fs::write(netns.join("p1"), "").expect("write");
        std::fs::write(netns.join("gone"), "").expect("write");

        let r = recover(&store, &netns).expect("recover");
        assert_eq!(r.pods, 1);
        assert_eq!(r.containers, 1);
        assert_eq!(r.released_id_ranges, vec!["gone"]);
        assert_eq!(r.removed_containers, vec!["c2"]);
        assert_eq!(r.removed_netns, vec!["gone"]);
        assert!(r.failures.is_empty());
        assert!(netns.join("p1").exists() && !netns.join("gone").exists());
        assert!(store.get::<IdRangeRecord>("p1").expect("get").is_some());

        let again = recover(&store, &netns).expect("recover again");
        assert_eq!(
            again,
            Report {
                pods: 1,
                containers: 1,
                ..Report::default()
            }
        );
    }

    #[test]
    fn cni_orphans_are_deleted_from_cache() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&d.path().join("crisp.db")).expect("store");
        store.put("live", &pod("live")).expect("put");
        let bins = d.path().join("bin");
        std::fs::create_dir_all(&bins).expect("mkdir");
        let log = d.path().join("calls");
        let script = format!(
            "#!/bin/sh\ncat >/dev/null\necho \"$CNI_COMMAND $CNI_CONTAINERID\" >> {}\n[ \"$CNI_COMMAND\" = ADD ] && echo '{{\"cniVersion\":\"1.0.0\"}}'\nexit 0\n",
            log.display()
        );
        std::fs::write(bins.join("fake"), script).expect("write");
        std::fs::set_permissions(bins.join("fake"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let conf = d.path().join("net.d");
        std::fs::create_dir_all(&conf).expect("mkdir");
        std::fs::write(
            conf.join("10.conflist"),
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"fake"}]}"#,
        )
        .expect("write");
        let cni = CniManager::new(conf, bins, d.path().join("cache"));
        for id in ["live", "dead"] {
            cni.add(&crate::cni::AttachRequest {
                pod_id: id.into(),
                netns: d.path().display().to_string(),
                ifname: "eth0".into(),
                args: Default::default(),
                port_mappings: vec![],
            })
            .expect("add");
        }
        let mut r = Report::default();
        recover_cni(&store, &cni, &mut r).expect("recover");
        assert_eq!(r.cni_deleted, vec!["dead"]);
        assert_eq!(cni.cached_pods(), vec!["live"]);
        let calls = std::fs::read_to_string(&log).expect("log");
        assert!(
            calls.contains("DEL dead") && !calls.contains("DEL live"),
            "{calls}"
        );
    }
}
