//! RunPodSandbox, crispd's side: validate the request and check that what the pod needs exists
//! *now* (promise 4: things may appear after start-up), failing with the field or setting that
//! is wrong. Starting the pause process belongs to the shim's sandbox service, which is not
//! wired in yet: a request that passes every check gets Unimplemented saying so.

use crisp_proto::cri::v1::{NamespaceMode, RunPodSandboxRequest, RunPodSandboxResponse};

use crate::daemon::Daemon;
use crate::instrument::CriError;

/// Every check RunPodSandbox makes before touching anything.
pub fn preflight(d: &Daemon, req: &RunPodSandboxRequest) -> Result<(), CriError> {
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
    // The handler: known, and its binary present (it may have been installed since start-up).
    let Some(bin) = d.cfg.handler_binary(&req.runtime_handler) else {
        return Err(CriError::invalid(format!(
            "runtime_handler: {:?} is not configured (known: {:?})",
            req.runtime_handler,
            d.cfg.runtime_handlers.keys().collect::<Vec<_>>()
        )));
    };
    if let Some(bin) = bin
        && crate::startup::find_binary(&bin).is_none()
    {
        let key = if req.runtime_handler.is_empty() {
            "runtime".to_string()
        } else {
            format!("runtime_handlers.{}.binary", req.runtime_handler)
        };
        return Err(CriError::precondition(format!(
            "runtime handler {:?}: OCI runtime binary {} (setting `{key}`) not found",
            req.runtime_handler,
            bin.display()
        )));
    }
    if crate::startup::find_binary(&d.cfg.shim_binary).is_none() {
        return Err(CriError::precondition(format!(
            "shim binary {} (setting `shim_binary`) not found",
            d.cfg.shim_binary.display()
        )));
    }
    let sc = cfg.linux.as_ref().and_then(|l| l.security_context.as_ref());
    let ns = sc.and_then(|s| s.namespace_options.as_ref());
    let host_network = ns.is_some_and(|n| n.network == NamespaceMode::Node as i32);
    if !host_network {
        // FailedPrecondition, naming the directory and what is missing in it.
        d.cni.current()?;
    }
    if let Some(u) = ns.and_then(|n| n.userns_options.as_ref())
        && u.mode == NamespaceMode::Pod as i32
        && !(u.uids.is_empty() && u.gids.is_empty())
    {
        crate::idmap::validate_mappings("uids", &u.uids)?;
        crate::idmap::validate_mappings("gids", &u.gids)?;
    }
    Ok(())
}

pub async fn run_pod_sandbox(
    d: &Daemon,
    req: RunPodSandboxRequest,
) -> Result<RunPodSandboxResponse, CriError> {
    preflight(d, &req)?;
    Err(CriError::unimplemented(
        "RunPodSandbox: the request is valid, but starting the pod needs the shim's sandbox \
         service, which crispd does not drive yet",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instrument::ErrorKind;
    use crisp_proto::cri::v1::{PodSandboxConfig, PodSandboxMetadata};

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
        let mut d = Daemon::for_test(dir.path());
        let mut cfg = (*d.cfg).clone();
        cfg.shim_binary = "/bin/sh".into(); // exists: the shim is not what this test is about
        cfg.runtime_handlers.insert(
            "ghost".into(),
            crate::config::RuntimeHandler {
                binary: "/nonexistent/ghost".into(),
                ..Default::default()
            },
        );
        d.cfg = std::sync::Arc::new(cfg);

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
        let e = run_pod_sandbox(&d, req("runc"))
            .await
            .expect_err("not wired");
        assert_eq!(e.kind, ErrorKind::Unimplemented);
    }
}
