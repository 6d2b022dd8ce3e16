//! The HTTP/1.1 upgrade handshakes a client makes, written by hand so the client does not
//! share the server's HTTP stack.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{ClientError, split_url};

const MAX_HEAD: usize = 16 * 1024;

async fn connect(addr: &str) -> Result<TcpStream, ClientError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Upgrades to SPDY/3.1 offering `protocols` in `X-Stream-Protocol-Version` (one header line
/// each, as client-go sends them). Returns the connection and the version the server chose.
pub async fn spdy(
    url: &str,
    protocols: &[&str],
) -> Result<(TcpStream, Option<String>), ClientError> {
    let (addr, _) = split_url(url)?;
    let tcp = connect(&addr).await?;
    spdy_on(tcp, url, protocols).await
}

/// A TLS connection to `addr` (`host:port`) trusting only the certificates in `ca_pem`;
/// the server name is the host part (an IP address or a DNS name).
pub async fn tls_connect(
    addr: &str,
    ca_pem: &std::path::Path,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls;
    let bad = |what: String| ClientError::Protocol(format!("TLS CA {}: {what}", ca_pem.display()));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).map_err(|e| bad(e.to_string()))? {
        roots
            .add(c.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientError::Protocol(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(addr);
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| ClientError::Url(format!("{addr}: {e}")))?;
    let tcp = connect(addr).await?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(ClientError::Io)
}

/// As [`spdy`] on a transport the caller connected (TLS, for an `https://` URL).
pub async fn spdy_on<T>(
    mut tcp: T,
    url: &str,
    protocols: &[&str],
) -> Result<(T, Option<String>), ClientError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (addr, path) = split_url(url)?;
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nContent-Length: 0\r\n"
    );
    for p in protocols {
        req.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await?;

    // Byte by byte: nothing after the head may be consumed, it belongs to SPDY.
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err(ClientError::Protocol("response head over 16 KiB".into()));
        }
        let b = tcp.read_u8().await?;
        head.push(b);
    }
    let mut hs = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut hs);
    resp.parse(&head)
        .map_err(|e| ClientError::Protocol(format!("bad response head: {e}")))?;
    let status = resp.code.unwrap_or(0);
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    if status != 101 {
        let len: usize = get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len.min(64 * 1024)];
        let _ = tcp.read_exact(&mut body).await;
        return Err(ClientError::Http {
            status,
            headers,
            body: String::from_utf8_lossy(&body).trim().to_string(),
        });
    }
    let upgrade = get("upgrade").unwrap_or_default();
    if !upgrade.eq_ignore_ascii_case("SPDY/3.1") {
        return Err(ClientError::Protocol(format!(
            "upgraded to {upgrade:?}, not SPDY/3.1"
        )));
    }
    Ok((tcp, get("x-stream-protocol-version")))
}

/// Opens a WebSocket offering `protocols`; returns it with the subprotocol the server chose.
pub async fn websocket(
    url: &str,
    protocols: &[&str],
) -> Result<(WebSocketStream<TcpStream>, Option<String>), ClientError> {
    let (addr, path) = split_url(url)?;
    let tcp = connect(&addr).await?;
    let mut req = format!("ws://{addr}{path}")
        .into_client_request()
        .map_err(|e| ClientError::Url(e.to_string()))?;
    if !protocols.is_empty() {
        let v = HeaderValue::from_str(&protocols.join(", "))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        req.headers_mut().insert("sec-websocket-protocol", v);
    }
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20));
    let (ws, resp) = tokio_tungstenite::client_async_with_config(req, tcp, Some(cfg))
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(r) => ClientError::Http {
                status: r.status().as_u16(),
                headers: Vec::new(),
                body: r
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).trim().to_string())
                    .unwrap_or_default(),
            },
            other => ClientError::WebSocket(other.to_string()),
        })?;
    let chosen = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((ws, chosen))
}
