//! Exec, Attach and PortForward: validate the request, then hand back the stream server's
//! URL for it (a single-use token). The session itself runs when the client dials the URL
//! (`crate::stream`).

use std::sync::Arc;

use crisp_proto::cri::v1::{
    AttachRequest, AttachResponse, ExecRequest, ExecResponse, PortForwardRequest,
    PortForwardResponse,
};

use crate::cri::exec_sync::running_shim;
use crate::daemon::Daemon;
use crate::instrument::CriError;
use crate::store::records::PodState;

/// The stream flags every exec and attach must satisfy, named as CRI names them.
pub fn check_streams(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> Result<(), CriError> {
    if tty && stderr {
        return Err(CriError::invalid(
            "stderr: must be false when tty is true (a terminal has one output stream)",
        ));
    }
    if !(stdin || stdout || stderr) {
        return Err(CriError::invalid(
            "stdin, stdout, stderr: all false; at least one stream is required",
        ));
    }
    Ok(())
}

fn server(d: &Daemon) -> Result<&crate::stream::Streaming, CriError> {
    d.stream.get().ok_or_else(|| {
        CriError::new(
            crate::instrument::ErrorKind::Unavailable,
            "the stream server is not running (start-up phase `stream`)",
        )
    })
}

pub async fn exec(d: &Arc<Daemon>, req: ExecRequest) -> Result<ExecResponse, CriError> {
    let rec = crate::cri::containers::find(&d.store, &req.container_id)?;
    running_shim(d, &rec, "Exec")?;
    if req.cmd.is_empty() {
        return Err(CriError::invalid("cmd: empty; Exec needs a command"));
    }
    check_streams(req.tty, req.stdin, req.stdout, req.stderr)?;
    let url = server(d)?.exec_url(crisp_stream::ExecRequest {
        container_id: rec.id,
        cmd: req.cmd,
        tty: req.tty,
        stdin: req.stdin,
        stdout: req.stdout,
        stderr: req.stderr,
    })?;
    Ok(ExecResponse { url })
}

pub async fn attach(d: &Arc<Daemon>, req: AttachRequest) -> Result<AttachResponse, CriError> {
    let rec = crate::cri::containers::find(&d.store, &req.container_id)?;
    running_shim(d, &rec, "Attach")?;
    check_streams(req.tty, req.stdin, req.stdout, req.stderr)?;
    let cfg = crate::cri::containers::container_config(&rec);
    if req.stdin && !cfg.stdin {
        return Err(CriError::invalid(format!(
            "stdin: container {} was created without stdin; attach without it",
            rec.id
        )));
    }
    // The container's own terminal decides how its output comes (a TTY container's on
    // stdout); `tty` here only says what the client expects, as in containerd.
    let url = server(d)?.attach_url(crisp_stream::AttachRequest {
        container_id: rec.id,
        tty: cfg.tty,
        stdin: req.stdin,
        stdout: req.stdout,
        stderr: req.stderr && !cfg.tty,
    })?;
    Ok(AttachResponse { url })
}

pub async fn port_forward(
    d: &Arc<Daemon>,
    req: PortForwardRequest,
) -> Result<PortForwardResponse, CriError> {
    let pod = crate::cri::pods::find(&d.store, &req.pod_sandbox_id)?;
    if pod.state != PodState::Ready {
        return Err(CriError::precondition(format!(
            "pod sandbox {} is not ready ({:?})",
            pod.id, pod.state
        )));
    }
    for p in &req.port {
        if !(1..=65535).contains(p) {
            return Err(CriError::invalid(format!(
                "port: {p} is not a TCP port (1-65535)"
            )));
        }
    }
    let url = server(d)?.port_forward_url(&pod.id, &req.port)?;
    Ok(PortForwardResponse { url })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::exec_sync::tests::test_record;
    use crate::instrument::ErrorKind;
    use crate::store::records::ContainerState;

    #[test]
    fn stream_flags_name_the_field() {
        let e = check_streams(true, true, true, true).expect_err("tty+stderr");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.starts_with("stderr:"), "{}", e.message);
        let e = check_streams(false, false, false, false).expect_err("nothing");
        assert!(e.message.contains("at least one"), "{}", e.message);
        check_streams(true, true, true, false).expect("tty without stderr");
        check_streams(false, false, false, true).expect("stderr only");
    }

    #[tokio::test]
    async fn calls_check_objects_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Arc::new(Daemon::for_test(dir.path()));
        let exec_req = |id: &str| ExecRequest {
            container_id: id.into(),
            cmd: vec!["sh".into()],
            stdout: true,
            ..Default::default()
        };
        let e = exec(&d, exec_req("nope")).await.expect_err("unknown");
        assert_eq!(e.kind, ErrorKind::NotFound);
        d.store
            .put("c1", &test_record("c1", ContainerState::Exited))
            .expect("put");
        let e = exec(&d, exec_req("c1")).await.expect_err("exited");
        assert_eq!(e.kind, ErrorKind::FailedPrecondition);
        let e = attach(
            &d,
            AttachRequest {
                container_id: "c1".into(),
                stdout: true,
                ..Default::default()
            },
        )
        .await
        .expect_err("exited");
        assert_eq!(e.kind, ErrorKind::FailedPrecondition);
        let e = port_forward(
            &d,
            PortForwardRequest {
                pod_sandbox_id: "nope".into(),
                port: vec![80],
            },
        )
        .await
        .expect_err("unknown pod");
        assert_eq!(e.kind, ErrorKind::NotFound);
    }
}
