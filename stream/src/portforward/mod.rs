//! Port-forward: each client connection becomes a TCP connection the backend opens inside
//! the pod's network namespace, over SPDY (`portforward.k8s.io`, also tunnelled in a
//! WebSocket) or WebSocket channels (`v4.channel.k8s.io`).

pub mod spdy;
pub mod ws;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub const HEADER_PORT: &str = "port";
pub const HEADER_REQUEST_ID: &str = "requestID";

/// Validates a requested port: a number 1..=65535, and one the CRI request listed when it
/// listed any. The error is the message the client reads on the error stream.
pub fn check_port(raw: Option<&str>, allowed: &[i32]) -> Result<u16, String> {
    let raw = raw.ok_or_else(|| format!("{HEADER_PORT:?} header is required"))?;
    let port: u64 = raw
        .trim()
        .parse()
        .map_err(|_| format!("unable to parse {raw:?} as a port"))?;
    if port == 0 {
        return Err(format!("port {raw:?} must be > 0"));
    }
    let port = u16::try_from(port).map_err(|_| format!("port {raw:?} is above 65535"))?;
    if !allowed.is_empty() && !allowed.contains(&i32::from(port)) {
        return Err(format!(
            "port {port} is not in the PortForward request's ports {allowed:?}"
        ));
    }
    Ok(port)
}

/// Copies client→pod and pod→client until the pod side ends (its EOF or an error): what
/// the pod sends is all the client can still get. Client EOF half-closes the TCP connection.
pub(crate) async fn splice<CR, CW>(mut from_client: CR, mut to_client: CW, tcp: TcpStream)
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
{
    let (tr, mut tw) = tcp.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut from_client, &mut tw).await;
        let _ = tw.shutdown().await;
    };
    let down = async {
        let mut tr = BufReader::with_capacity(32 * 1024, tr);
        let _ = tokio::io::copy_buf(&mut tr, &mut to_client).await;
        let _ = to_client.shutdown().await;
    };
    tokio::pin!(up, down);
    let mut up_done = false;
    loop {
        tokio::select! {
            _ = &mut up, if !up_done => up_done = true,
            _ = &mut down => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_port;

    #[test]
    fn ports_are_checked_like_kubelet_and_against_the_request() {
        assert_eq!(check_port(Some("8080"), &[]), Ok(8080));
        assert!(
            check_port(Some("0"), &[])
                .expect_err("0")
                .contains("must be > 0")
        );
        assert!(
            check_port(Some("70000"), &[])
                .expect_err("big")
                .contains("70000")
        );
        assert!(check_port(Some("http"), &[]).is_err());
        assert!(check_port(None, &[]).is_err());
        assert_eq!(check_port(Some("80"), &[80, 443]), Ok(80));
        assert!(
            check_port(Some("81"), &[80])
                .expect_err("not listed")
                .contains("81")
        );
    }
}
