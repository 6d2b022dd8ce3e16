//! RunPodSandbox: check what the pod needs exists *now* (promise 4), then hand the set-up to
//! `pod::setup`. A retry with the same pod name while the first call is in flight joins it and
//! gets its result.

use std::sync::Arc;

use crisp_proto::cri::v1::{NamespaceMode, RunPodSandboxRequest, RunPodSandboxResponse};
use tracing::Instrument;

use crate::error::CriError;
use crate::pod::service::PodService;
use crate::pod::setup::{create, pod_key};

/// Every check RunPodSandbox makes before touching anything.
pub fn preflight(d: &PodService, req: &RunPodSandboxRequest) -> Result<(), CriError> {
    let cfg = req
        .config
        .as_ref()
        .ok_or_else(|| CriError::invalid("config: missing"))?;
    let meta = cfg
        .metadata
        .as_ref()
        .ok_or_else(|| CriError::invalid("config.metadata: missing"))?;
    for (field, v) in [
        ("config.metadata.name", &meta.name),
        ("config.metadata.namespace", &meta.namespace),
        ("config.metadata.uid", &meta.uid),
    ] {
        if v.is_empty() {
            return Err(CriError::invalid(format!("{field}: empty")));
        }
    }
    check_binaries(d, &req.runtime_handler)?;
    check_namespaces(d, cfg)
}

/// The handler: known, and its binary present (it may have been installed since start-up);
/// the shim binary too.
fn check_binaries(d: &PodService, handler: &str) -> Result<(), CriError> {
    let Some(bin) = d.cfg.handler_binary(handler) else {
        return Err(CriError::invalid(format!(
            "runtime_handler: {:?} is not configured (known: {:?})",
            handler,
            d.cfg.runtime_handlers.keys().collect::<Vec<_>>()
        )));
    };
    if let Some(bin) = bin
        && crate::util::find_binary(&bin).is_none()
    {
        let key = if handler.is_empty() {
            "runtime".to_string()
        } else {
            format!("runtime_handlers.{handler}.binary")
        };
        return Err(CriError::precondition(format!(
            "runtime handler {:?}: OCI runtime binary {} (setting `{key}`) not found",
            handler,
            bin.display()
        )));
    }
    if crate::util::find_binary(&d.cfg.shim_binary).is_none() {
        return Err(CriError::precondition(format!(
            "shim binary {} (setting `shim_binary`) not found",
            d.cfg.shim_binary.display()
        )));
    }
    Ok(())
}

/// Namespace options that cannot work together, then the network the pod needs (a CNI
/// config unless it uses the host's) and its explicit ID mappings.
fn check_namespaces(
    d: &PodService,
    cfg: &crisp_proto::cri::v1::PodSandboxConfig,
) -> Result<(), CriError> {
    let sc = cfg.linux.as_ref().and_then(|l| l.security_context.as_ref());
    let ns = sc.and_then(|s| s.namespace_options.as_ref());
    let host_network = ns.is_some_and(|n| n.network == NamespaceMode::Node as i32);
    let userns_pod = ns
        .and_then(|n| n.userns_options.as_ref())
        .is_some_and(|u| u.mode == NamespaceMode::Pod as i32);
    // As kubelet's validation ("hostNetwork/hostPID/hostIPC is not allowed when user
    // namespaces are enabled"): the host's namespaces are owned by the host's user namespace,
    // over which a process in the pod's user namespace has no capability. It could neither
    // mount sysfs for the host's netns, nor procfs for the host's PID namespace, nor mqueue
    // for the host's IPC namespace. Checked before the CNI precondition: the config is wrong
    // whatever the node's state.
    if let Some(n) = ns.filter(|_| userns_pod) {
        for (field, mode, what) in [
            ("network", n.network, "host network"),
            ("pid", n.pid, "host PID"),
            ("ipc", n.ipc, "host IPC"),
        ] {
            if mode == NamespaceMode::Node as i32 {
                return Err(CriError::invalid(format!(
                    "config.linux.security_context.namespace_options: {field} NODE ({what}) \
                     cannot be combined with userns_options.mode POD (a user namespace)"
                )));
            }
        }
    }
    if !host_network {
        // FailedPrecondition, naming the directory and what is missing in it.
        d.cni.current()?;
    }
    if let Some(u) = ns.and_then(|n| n.userns_options.as_ref())
        && u.mode == NamespaceMode::Pod as i32
        && !(u.uids.is_empty() && u.gids.is_empty())
    {
        crate::pod::idmap::validate_mappings("uids", &u.uids)?;
        crate::pod::idmap::validate_mappings("gids", &u.gids)?;
    }
    Ok(())
}

pub async fn run_pod_sandbox(
    d: &Arc<PodService>,
    req: RunPodSandboxRequest,
) -> Result<RunPodSandboxResponse, CriError> {
    preflight(d, &req)?;
    let key = req.config.as_ref().map(pod_key).unwrap_or_default();
    let dd = Arc::clone(d);
    let span = tracing::Span::current();
    let (r, role) = d
        .pod_inflight
        .run(&key, async move { create(&dd, req).await }.instrument(span))
        .await;
    if role == crate::inflight::Role::Joined {
        tracing::info!(pod = %key, "joined a RunPodSandbox already in flight");
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::Daemon;
    use crate::error::ErrorKind;
    use crisp_proto::cri::v1::{NamespaceOption, PodSandboxConfig, PodSandboxMetadata};

    fn req(handler: &str) -> RunPodSandboxRequest {
        RunPodSandboxRequest {
            config: Some(PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: "web".into(),
                    uid: "u1".into(),
                    namespace: "default".into(),
                    attempt: 0,
                }),
                ..Default::default()
            }),
            runtime_handler: handler.into(),
        }
    }

    #[tokio::test]
    async fn names_what_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Daemon::for_test_with(dir.path(), |cfg| {
            cfg.shim_binary = "/bin/sh".into(); // exists: the shim is not what this test is about
            cfg.runtime_handlers.insert(
                "ghost".into(),
                crate::config::RuntimeHandler {
                    binary: "/nonexistent/ghost".into(),
                    ..Default::default()
                },
            );
        })
        .pods;

        let mut r = req("");
        r.config
            .as_mut()
            .and_then(|c| c.metadata.as_mut())
            .expect("meta")
            .uid
            .clear();
        let e = run_pod_sandbox(&d, r).await.expect_err("no uid");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("config.metadata.uid"), "{}", e.message);

        let e = run_pod_sandbox(&d, req("kata"))
            .await
            .expect_err("unknown handler");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(
            e.message.contains("runtime_handler") && e.message.contains("kata"),
            "{}",
            e.message
        );

        let e = run_pod_sandbox(&d, req("ghost"))
            .await
            .expect_err("missing binary");
        assert_eq!(e.kind, ErrorKind::FailedPrecondition);
        assert!(
            e.message.contains("runtime_handlers.ghost.binary"),
            "{}",
            e.message
        );

        // No CNI config: FailedPrecondition naming the directory.
        let e = run_pod_sandbox(&d, req("runc"))
            .await
            .expect_err("no network");
        assert_eq!(e.kind, ErrorKind::FailedPrecondition);
        assert!(e.message.contains("net.d"), "{}", e.message);

        // Once a config appears, the request passes every check.
        std::fs::create_dir_all(dir.path().join("net.d")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("bin")).expect("mkdir");
        std::fs::write(dir.path().join("bin/loopback"), "").expect("write");
        std::fs::write(
            dir.path().join("net.d/10.conf"),
            r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
        )
        .expect("write");
        d.cni.reload();
        // Past the checks, the plugin (an empty file) cannot run: the call fails and undoes
        // what it did — no record, no netns, no pod dir.
        let e = run_pod_sandbox(&d, req("runc"))
            .await
            .expect_err("plugin cannot run");
        assert_ne!(e.kind, ErrorKind::Unimplemented);
        assert_eq!(d.store.count(crate::store::PODS).expect("count"), 0);
        assert!(
            crate::network::netns::list(&d.cfg.netns_dir()).is_empty(),
            "netns undone"
        );
        crate::network::netns::release_dir_if_empty(&d.cfg.netns_dir());
        assert!(
            std::fs::read_dir(d.cfg.state.join("pods"))
                .map(|r| r.count())
                .unwrap_or(0)
                == 0
        );
    }

    /// A pod with a user namespace (mode POD) and the given namespace options.
    fn userns_pod_with(ns: NamespaceOption) -> RunPodSandboxRequest {
        use crisp_proto::cri::v1::{
            LinuxPodSandboxConfig, LinuxSandboxSecurityContext, UserNamespace,
        };
        let mut r = req("");
        if let Some(cfg) = r.config.as_mut() {
            cfg.linux = Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        userns_options: Some(UserNamespace {
                            mode: NamespaceMode::Pod as i32,
                            ..Default::default()
                        }),
                        ..ns
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        r
    }

    #[test]
    fn host_namespaces_with_a_user_namespace_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Daemon::for_test_with(dir.path(), |c| c.shim_binary = "/bin/sh".into()).pods;
        let node = NamespaceMode::Node as i32;
        for (field, ns) in [
            (
                "network",
                NamespaceOption {
                    network: node,
                    ..Default::default()
                },
            ),
            (
                "pid",
                NamespaceOption {
                    pid: node,
                    ..Default::default()
                },
            ),
            (
                "ipc",
                NamespaceOption {
                    ipc: node,
                    ..Default::default()
                },
            ),
        ] {
            // No CNI config in this daemon: the config error comes first for every field,
            // host network or not.
            let e = preflight(&d, &userns_pod_with(ns)).expect_err(field);
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{field}: {}", e.message);
            assert!(
                e.message.contains("namespace_options")
                    && e.message.contains("userns_options.mode POD")
                    && e.message.contains(&format!("{field} NODE")),
                "{}",
                e.message
            );
        }
        // The pod's own PID and IPC namespaces with a user namespace pass these checks (and
        // stop at the missing CNI config).
        let e = preflight(&d, &userns_pod_with(NamespaceOption::default())).expect_err("no CNI");
        assert_eq!(e.kind, ErrorKind::FailedPrecondition, "{}", e.message);
    }
}
