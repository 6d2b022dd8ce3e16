//! Port-forward's one runtime task: a TCP connection to localhost:`port` made inside the
//! pod's network namespace, so nothing is exposed on the host.
//!
//! `setns` changes the calling thread, so the connect runs on a thread of its own
//! (`netns::run_in`) that joins the pod's namespace, connects and exits; no tokio worker ever
//! runs in the pod's namespace, and the socket keeps the namespace it was made in. A
//! host-network pod has no namespace of its own: its localhost is the host's, which is what
//! the pod's processes see too.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::daemon::Daemon;
use crate::instrument::CriError;
use crate::store::records::PodState;

/// How long one connect attempt may take (localhost: a refusal is immediate).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn port_forward(
    d: &Arc<Daemon>,
    pod_id: &str,
    port: u16,
) -> Result<tokio::net::TcpStream, CriError> {
    if port == 0 {
        return Err(CriError::invalid("port: 0 is not a TCP port (1-65535)"));
    }
    let pod = crate::cri::pods::find(&d.store, pod_id)?;
    if pod.state != PodState::Ready {
        return Err(CriError::precondition(format!(
            "PortForward: pod sandbox {} is not ready ({:?})",
            pod.id, pod.state
        )));
    }
    let netns = pod.netns_path.clone().map(PathBuf::from);
    let pod_id = pod.id.clone();
    let std = tokio::task::spawn_blocking(move || -> Result<TcpStream, CriError> {
        match &netns {
            Some(path) => crate::netns::run_in(path, move || connect_local(port))
                .map_err(|e| CriError::internal(format!("PortForward: pod {pod_id}: {e}")))?,
            None => connect_local(port),
        }
        .map_err(|e| {
            CriError::precondition(format!(
                "PortForward: pod {pod_id}: nothing accepts on localhost port {port}: {e}"
            ))
        })
    })
    .await
    .map_err(|e| CriError::internal(format!("PortForward task: {e}")))??;
    std.set_nonblocking(true)
        .map_err(|e| CriError::internal(format!("PortForward: socket: {e}")))?;
    tokio::net::TcpStream::from_std(std)
        .map_err(|e| CriError::internal(format!("PortForward: socket: {e}")))
}

/// 127.0.0.1 first, then ::1, as kubelet's own port-forward does; the IPv4 error is the one
/// reported when both fail and IPv6 is simply absent.
fn connect_local(port: u16) -> std::io::Result<TcpStream> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT) {
        Ok(s) => Ok(s),
        Err(e4) => {
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT).map_err(|e6| {
                std::io::Error::new(e4.kind(), format!("127.0.0.1: {e4}; [::1]: {e6}"))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_only_listener_is_reached() {
        let Ok(l) = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)) else {
            panic!("this test needs IPv6 on the loopback interface (::1)");
        };
        let port = l.local_addr().expect("addr").port();
        connect_local(port).expect("reaches [::1]");
    }

    #[test]
    fn closed_port_names_both_addresses() {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        let e = connect_local(port).expect_err("closed");
        assert!(
            e.to_string().contains("127.0.0.1") && e.to_string().contains("[::1]"),
            "{e}"
        );
    }
}
