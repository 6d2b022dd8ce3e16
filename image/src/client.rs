//! OCI distribution client: manifests and blobs over HTTP(S) with reqwest (rustls), trying the
//! hosts.toml endpoints in order, with Bearer token and Basic auth.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Response, StatusCode};

use crate::error::{Error, Kind, Result};
use crate::hosts::RegistryHost;
use crate::manifest;
use crate::reference::{Digest, Reference};

/// Credentials, mirroring CRI's AuthConfig.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct Auth {
    pub username: String,
    pub password: String,
    /// base64("user:password"), as in docker's config.json.
    pub auth: String,
    /// An OAuth2 refresh token, exchanged at the token endpoint.
    pub identity_token: String,
    /// A bearer token sent to the registry as is.
    pub registry_token: String,
}

impl Auth {
    fn basic(&self) -> Option<(String, String)> {
        if !self.username.is_empty() {
            return Some((self.username.clone(), self.password.clone()));
        }
        if !self.auth.is_empty() {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(self.auth.trim())
                .ok()?;
            let s = String::from_utf8(raw).ok()?;
            let (u, p) = s.split_once(':')?;
            return Some((u.to_string(), p.to_string()));
        }
        None
    }

    pub fn is_empty(&self) -> bool {
        *self == Auth::default()
    }
}

/// Client for one repository on one registry, through its endpoints.
pub struct RegistryClient {
    reference: Reference,
    hosts: Vec<(RegistryHost, reqwest::Client)>,
    auth: Auth,
    /// Authorization header value per endpoint host, learned from challenges.
    tokens: Mutex<HashMap<String, HeaderValue>>,
    /// Limit for whole small requests (manifests, configs, tokens).
    request_timeout: Duration,
}

/// Connection-level timeouts; slow bodies are handled by the stall detector instead.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Manifests, indexes and configs are read into memory; a registry may not make us hold more.
pub const MAX_MANIFEST_BYTES: u64 = 8 << 20;
pub const MAX_CONFIG_BYTES: u64 = 32 << 20;

/// Read a whole body, refusing more than `limit` bytes.
async fn read_limited(
    host: &RegistryHost,
    mut resp: Response,
    limit: u64,
    what: &str,
) -> Result<Bytes> {
    if let Some(n) = resp.content_length()
        && n > limit
    {
        return Err(Error::precondition(format!(
            "{} sent a {n}-byte {what}; the limit is {limit}",
            host.display()
        )));
    }
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| net_err(host, what, e))? {
        if buf.len() as u64 + chunk.len() as u64 > limit {
            return Err(Error::precondition(format!(
                "{} sent a {what} over {limit} bytes",
                host.display()
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// HTTP clients by what sets them apart, shared by all pulls. Building a client loads and
/// parses the system's trust roots (25 ms of every cold pull, with two clients for a mirror
/// and its origin), and a client that lives for one pull never reuses a connection. The key
/// holds the CA files' contents, read at each pull, so a rotated CA takes effect at the next
/// pull; the system roots are read when a client is first built, as Go reads them once.
#[derive(Debug, Default)]
pub struct ClientCache {
    clients: Mutex<HashMap<ClientKey, reqwest::Client>>,
}

/// Distinct configurations are few (hosts.toml entries); past this many the cache starts over
/// rather than keep clients for configurations long gone.
const MAX_CACHED_CLIENTS: usize = 32;

#[derive(Debug, PartialEq, Eq, Hash)]
struct ClientKey {
    skip_verify: bool,
    /// Each CA file's path (for errors) and contents.
    ca: Vec<(std::path::PathBuf, Vec<u8>)>,
    headers: Vec<(String, String)>,
}

impl ClientCache {
    fn get(&self, h: &RegistryHost) -> Result<reqwest::Client> {
        let key = client_key(h)?;
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let c = build_client(&key, h)?;
        if clients.len() >= MAX_CACHED_CLIENTS {
            clients.clear();
        }
        clients.insert(key, c.clone());
        Ok(c)
    }
}

fn client_key(h: &RegistryHost) -> Result<ClientKey> {
    let ca =
        h.ca.iter()
            .map(|path| {
                let pem = std::fs::read(path).map_err(|e| {
                    Error::io(
                        format!("reading CA file {} for {}", path.display(), h.display()),
                        e,
                    )
                })?;
                Ok((path.clone(), pem))
            })
            .collect::<Result<Vec<_>>>()?;
    Ok(ClientKey {
        skip_verify: h.skip_verify,
        ca,
        headers: h.headers.clone(),
    })
}

fn build_client(key: &ClientKey, h: &RegistryHost) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("crisp/", env!("CARGO_PKG_VERSION")))
        .danger_accept_invalid_certs(key.skip_verify);
    for (path, pem) in &key.ca {
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
            Error::with_source(
                Kind::InvalidArgument,
                format!("CA file {}", path.display()),
                e,
            )
        })?;
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    let mut headers = HeaderMap::new();
    for (k, v) in &key.headers {
        let name = header::HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| Error::invalid(format!("header name {k:?} for {}", h.display())))?;
        let value = HeaderValue::from_str(v)
            .map_err(|_| Error::invalid(format!("header {k:?} value for {}", h.display())))?;
        headers.append(name, value);
    }
    b.default_headers(headers).build().map_err(|e| {
        Error::with_source(
            Kind::Internal,
            format!("building HTTP client for {}", h.display()),
            e,
        )
    })
}

fn net_err(host: &RegistryHost, what: &str, e: reqwest::Error) -> Error {
    // reqwest's Display stops at "error sending request"; the cause (refused, TLS, reset)
    // is further down the chain, and it is what an operator needs.
    let mut msg = format!("{what} from {}: {e}", host.display());
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    Error::new(Kind::Unavailable, msg)
}

impl RegistryClient {
    pub fn new(
        reference: &Reference,
        hosts: Vec<RegistryHost>,
        auth: Auth,
        clients: &ClientCache,
    ) -> Result<Self> {
        let hosts = hosts
            .into_iter()
            .map(|h| {
                let c = clients.get(&h)?;
                Ok((h, c))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RegistryClient {
            reference: reference.clone(),
            hosts,
            auth,
            tokens: Mutex::new(HashMap::new()),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        })
    }

    /// Limit whole small requests (manifests, configs, tokens) to `d`.
    pub fn with_request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }

    pub fn hosts(&self) -> impl Iterator<Item = &RegistryHost> {
        self.hosts.iter().map(|(h, _)| h)
    }

    fn url(&self, host: &RegistryHost, suffix: &str) -> String {
        let mut u = host.url(&format!("/{}{}", self.reference.repository, suffix));
        if !host.is_origin {
            // containerd tells mirrors which registry is meant, so one mirror can serve many.
            u.push_str(&format!("?ns={}", self.reference.registry));
        }
        u
    }

    fn token_for(&self, host: &RegistryHost) -> Option<HeaderValue> {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&host.host)
            .cloned()
    }

    /// GET `url` on `host` with auth: the first 401 is answered by a token request (Bearer)
    /// or Basic credentials, then the request is repeated once.
    async fn get(
        &self,
        idx: usize,
        url: &str,
        extra: HeaderMap,
        timeout: Option<Duration>,
    ) -> Result<Response> {
        let (host, client) = &self.hosts[idx];
        let mut attempt = 0;
        loop {
            let mut req = client.get(url).headers(extra.clone());
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            if let Some(tok) = self.token_for(host) {
                req = req.header(header::AUTHORIZATION, tok);
            } else if !self.auth.registry_token.is_empty() {
                req = req.bearer_auth(&self.auth.registry_token);
            }
            let resp = req.send().await.map_err(|e| net_err(host, "request", e))?;
            if resp.status() != StatusCode::UNAUTHORIZED || attempt > 0 {
                return Ok(resp);
            }
            attempt += 1;
            let challenge = resp
                .headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(str::to_string)
                .collect::<Vec<_>>();
            let value = self.answer_challenge(host, client, &challenge).await?;
            self.tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(host.host.clone(), value);
        }
    }

    async fn answer_challenge(
        &self,
        host: &RegistryHost,
        client: &reqwest::Client,
        challenges: &[String],
    ) -> Result<HeaderValue> {
        for c in challenges {
            let (scheme, params) = c.split_once(' ').unwrap_or((c.as_str(), ""));
            let params = parse_params(params);
            if scheme.eq_ignore_ascii_case("basic") {
                let Some((u, p)) = self.auth.basic() else {
                    return Err(Error::new(
                        Kind::Unauthenticated,
                        format!(
                            "{} asks for credentials and none are configured",
                            host.display()
                        ),
                    ));
                };
                let v = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
                return HeaderValue::from_str(&format!("Basic {v}"))
                    .map_err(|_| Error::invalid("credentials contain invalid characters"));
            }
            if scheme.eq_ignore_ascii_case("bearer") {
                let Some(realm) = params.get("realm") else {
                    continue;
                };
                let scope = params
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| format!("repository:{}:pull", self.reference.repository));
                let service = params.get("service").cloned().unwrap_or_default();
                let token = self
                    .fetch_token(host, client, realm, &service, &scope)
                    .await?;
                return HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| Error::data_loss("token contains invalid characters"));
            }
        }
        Err(Error::new(
            Kind::Unauthenticated,
            format!(
                "{} answered 401 without a usable WWW-Authenticate challenge",
                host.display()
            ),
        ))
    }

    async fn fetch_token(
        &self,
        host: &RegistryHost,
        client: &reqwest::Client,
        realm: &str,
        service: &str,
        scope: &str,
    ) -> Result<String> {
        let resp = if !self.auth.identity_token.is_empty() {
            // OAuth2 refresh-token grant, as containerd does for identity tokens.
            let form = [
                ("grant_type", "refresh_token"),
                ("refresh_token", self.auth.identity_token.as_str()),
                ("service", service),
                ("scope", scope),
                ("client_id", "crisp"),
            ];
            let body = form
                .iter()
                .map(|(k, v)| format!("{k}={}", urlencode(v)))
                .collect::<Vec<_>>()
                .join("&");
            client
                .post(realm)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(body)
                .timeout(self.request_timeout)
                .send()
                .await
        } else {
            let url = format!(
                "{realm}?service={}&scope={}",
                urlencode(service),
                urlencode(scope)
            );
            let mut req = client.get(url).timeout(self.request_timeout);
            if let Some((u, p)) = self.auth.basic() {
                req = req.basic_auth(u, Some(p));
            }
            req.send().await
        }
        .map_err(|e| net_err(host, "token request", e))?;
        let status = resp.status();
        if !status.is_success() {
            let kind = if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                Kind::Unauthenticated
            } else {
                Kind::Unavailable
            };
            return Err(Error::new(
                kind,
                format!(
                    "token endpoint {realm} for {} answered {status}",
                    host.display()
                ),
            ));
        }
        #[derive(serde::Deserialize)]
        struct Tok {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = read_limited(host, resp, 1 << 20, "token response").await?;
        let t: Tok = serde_json::from_slice(&body)
            .map_err(|e| Error::data_loss(format!("token endpoint {realm}: invalid JSON: {e}")))?;
        t.token
            .or(t.access_token)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::data_loss(format!("token endpoint {realm} returned no token")))
    }

    /// Fetch a manifest or index by tag or digest. Tags are resolved only on endpoints with
    /// the `resolve` capability; digests are fetched from `pull` endpoints and verified.
    /// Returns the body, its media type and its digest.
    pub async fn manifest(&self, object: &str) -> Result<(Bytes, String, Digest)> {
        let by_digest = Digest::parse(object).ok();
        let mut errors = Vec::new();
        for (idx, (host, _)) in self.hosts.iter().enumerate() {
            let cap = if by_digest.is_some() {
                host.capabilities.pull
            } else {
                host.capabilities.resolve
            };
            if !cap {
                continue;
            }
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, HeaderValue::from_static(manifest::ACCEPT));
            let url = self.url(host, &format!("/manifests/{object}"));
            let resp = match self.get(idx, &url, h, Some(self.request_timeout)).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(host = %host.display(), error = %e, "manifest request failed; trying next host");
                    errors.push(e);
                    continue;
                }
            };
            let status = resp.status();
            if !status.is_success() {
                let kind = match status {
                    StatusCode::NOT_FOUND => Kind::NotFound,
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Kind::Unauthenticated,
                    _ => Kind::Unavailable,
                };
                errors.push(Error::new(
                    kind,
                    format!(
                        "{} answered {status} for manifest {object} of {}",
                        host.display(),
                        self.reference.repository
                    ),
                ));
                continue;
            }
            let ct = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = match read_limited(host, resp, MAX_MANIFEST_BYTES, "manifest").await {
                Ok(b) => b,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let got = Digest::of(&body);
            if let Some(want) = &by_digest
                && &got != want
            {
                errors.push(Error::data_loss(format!(
                    "{} served manifest {want} with digest {got}",
                    host.display()
                )));
                continue;
            }
            return Ok((body, ct, got));
        }
        Err(summarise(
            errors,
            &format!("manifest {object} of {}", self.reference.name()),
        ))
    }

    /// Fetch a small blob (a config) whole, verifying its digest.
    pub async fn blob_bytes(&self, digest: &Digest) -> Result<Bytes> {
        let mut errors = Vec::new();
        for idx in self.pull_hosts() {
            let host = &self.hosts[idx].0;
            let attempt = async {
                let resp = self.open_blob_on(idx, digest, 0).await?;
                let b = read_limited(host, resp, MAX_CONFIG_BYTES, "config blob").await?;
                if Digest::of(&b) != *digest {
                    return Err(Error::data_loss(format!(
                        "{} served blob {digest} with digest {}",
                        host.display(),
                        Digest::of(&b)
                    )));
                }
                Ok(b)
            };
            match tokio::time::timeout(self.request_timeout, attempt).await {
                Ok(Ok(b)) => return Ok(b),
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push(Error::unavailable(format!(
                    "{}: no complete answer for blob {digest} within {:?}",
                    host.display(),
                    self.request_timeout
                ))),
            }
        }
        Err(summarise(
            errors,
            &format!("blob {digest} of {}", self.reference.name()),
        ))
    }

    /// Indices of endpoints that may serve blobs, in order.
    pub fn pull_hosts(&self) -> Vec<usize> {
        (0..self.hosts.len())
            .filter(|&i| self.hosts[i].0.capabilities.pull)
            .collect()
    }

    pub fn host(&self, idx: usize) -> &RegistryHost {
        &self.hosts[idx].0
    }

    /// Start a blob download on endpoint `idx` from byte `offset` (HTTP Range when > 0).
    /// Returns the response, whose status is 200 or 206.
    pub async fn open_blob_on(&self, idx: usize, digest: &Digest, offset: u64) -> Result<Response> {
        let host = &self.hosts[idx].0;
        let url = self.url(host, &format!("/blobs/{digest}"));
        let mut h = HeaderMap::new();
        if offset > 0
            && let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-"))
        {
            h.insert(header::RANGE, v);
        }
        let resp = self.get(idx, &url, h, None).await?;
        let status = resp.status();
        if status == StatusCode::OK || status == StatusCode::PARTIAL_CONTENT {
            return Ok(resp);
        }
        let kind = match status {
            StatusCode::NOT_FOUND => Kind::NotFound,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Kind::Unauthenticated,
            _ => Kind::Unavailable,
        };
        Err(Error::new(
            kind,
            format!("{} answered {status} for blob {digest}", host.display()),
        ))
    }
}

/// One error out of the per-host errors: the most telling kind, every host's message.
fn summarise(errors: Vec<Error>, what: &str) -> Error {
    if errors.is_empty() {
        return Error::precondition(format!(
            "{what}: no configured host may serve it (check capabilities in hosts.toml)"
        ));
    }
    let kind = if errors.iter().all(|e| e.kind() == Kind::NotFound) {
        Kind::NotFound
    } else if errors.iter().any(|e| e.kind() == Kind::Unauthenticated) {
        Kind::Unauthenticated
    } else if errors.iter().any(|e| e.kind() == Kind::DataLoss) {
        Kind::DataLoss
    } else {
        errors[errors.len() - 1].kind()
    };
    let msgs: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    Error::new(kind, format!("{what}: {}", msgs.join("; ")))
}

fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq]
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        rest = &rest[eq + 1..];
        let value;
        if let Some(r) = rest.strip_prefix('"') {
            let end = r.find('"').unwrap_or(r.len());
            value = r[..end].to_string();
            rest = r.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        rest = rest.trim_start_matches(',').trim_start();
        out.insert(key, value);
    }
    out
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_params() {
        let p = parse_params(
            r#"realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/busybox:pull");
    }

    #[test]
    fn basic_from_auth_field() {
        let a = Auth {
            auth: base64::engine::general_purpose::STANDARD.encode("u:p:w"),
            ..Default::default()
        };
        assert_eq!(a.basic(), Some(("u".into(), "p:w".into())));
        assert_eq!(
            urlencode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }

    /// A registry that wants a Bearer token from its token endpoint, which wants Basic
    /// credentials "u:p"; or, with `basic_only`, Basic credentials on the registry itself.
    async fn mock_registry(
        basic_only: bool,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let tokens = std::sync::Arc::new(AtomicUsize::new(0));
        let (a, t) = (addr.clone(), tokens.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut c, _)) = l.accept().await else {
                    return;
                };
                let (addr, tokens) = (a.clone(), t.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut n = 0;
                    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(m) => n += m,
                        }
                    }
                    // A POST's form body follows the headers (Content-Length bytes).
                    let head_end = buf[..n].windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let len: usize = head
                        .lines()
                        .find(|l| l.to_ascii_lowercase().starts_with("content-length:"))
                        .and_then(|l| l[15..].trim().parse().ok())
                        .unwrap_or(0);
                    while n < head_end + len {
                        match c.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(m) => n += m,
                        }
                    }
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let form = String::from_utf8_lossy(&buf[head_end..n]).to_string();
                    let path = req.split(' ').nth(1).unwrap_or("").to_string();
                    let auth = req
                        .lines()
                        .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
                        .map(|l| l[14..].trim().to_string())
                        .unwrap_or_default();
                    let basic = format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode("u:p")
                    );
                    let (status, headers, body) = if req.starts_with("POST /token") {
                        tokens.fetch_add(1, Ordering::SeqCst);
                        if form.contains("grant_type=refresh_token")
                            && form.contains("refresh_token=rt")
                            && form.contains("scope=repository%3Alib%2Fapp%3Apull")
                        {
                            (
                                "200 OK",
                                String::new(),
                                r#"{"access_token":"tok"}"#.to_string(),
                            )
                        } else {
                            ("401 Unauthorized", String::new(), String::new())
                        }
                    } else if path.starts_with("/token") {
                        tokens.fetch_add(1, Ordering::SeqCst);
                        if auth == basic && path.contains("scope=repository%3Alib%2Fapp%3Apull") {
                            ("200 OK", String::new(), r#"{"token":"tok"}"#.to_string())
                        } else {
                            ("401 Unauthorized", String::new(), String::new())
                        }
                    } else if (basic_only && auth == basic) || (!basic_only && auth == "Bearer tok")
                    {
                        (
                            "200 OK",
                            "Content-Type: application/vnd.oci.image.index.v1+json\r\n".to_string(),
                            r#"{"manifests":[]}"#.to_string(),
                        )
                    } else if basic_only {
                        (
                            "401 Unauthorized",
                            "WWW-Authenticate: Basic realm=\"reg\"\r\n".to_string(),
                            String::new(),
                        )
                    } else {
                        (
                            "401 Unauthorized",
                            format!(
                                "WWW-Authenticate: Bearer realm=\"http://{addr}/token\",service=\"reg\",scope=\"repository:lib/app:pull\"\r\n"
                            ),
                            String::new(),
                        )
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = c.write_all(resp.as_bytes()).await;
                });
            }
        });
        (addr, tokens)
    }

    fn client_for(addr: &str, auth: Auth) -> RegistryClient {
        let r = Reference::parse(&format!("{addr}/lib/app:1")).unwrap();
        let hosts = crate::hosts::resolve(None, &r.registry).unwrap();
        RegistryClient::new(&r, hosts, auth, &ClientCache::default()).unwrap()
    }

    #[tokio::test]
    async fn bearer_token_with_basic_credentials() {
        let (addr, tokens) = mock_registry(false).await;
        let good = client_for(
            &addr,
            Auth {
                username: "u".into(),
                password: "p".into(),
                ..Default::default()
            },
        );
        let (body, _, _) = good.manifest("1").await.unwrap();
        assert_eq!(&body[..], br#"{"manifests":[]}"#);
        // The token is cached: a second request needs no new one.
        good.manifest("1").await.unwrap();
        assert_eq!(tokens.load(std::sync::atomic::Ordering::SeqCst), 1);
        let bad = client_for(
            &addr,
            Auth {
                username: "u".into(),
                password: "wrong".into(),
                ..Default::default()
            },
        );
        let e = bad.manifest("1").await.unwrap_err();
        assert_eq!(e.kind(), Kind::Unauthenticated, "{e}");
        assert!(e.to_string().contains("token endpoint"), "{e}");
        // An identity token is exchanged with the OAuth2 refresh-token grant.
        let idt = client_for(
            &addr,
            Auth {
                identity_token: "rt".into(),
                ..Default::default()
            },
        );
        idt.manifest("1").await.unwrap();
        let bad_idt = client_for(
            &addr,
            Auth {
                identity_token: "nope".into(),
                ..Default::default()
            },
        );
        assert_eq!(
            bad_idt.manifest("1").await.unwrap_err().kind(),
            Kind::Unauthenticated
        );
        // A registry token is sent as is.
        let tok = client_for(
            &addr,
            Auth {
                registry_token: "tok".into(),
                ..Default::default()
            },
        );
        tok.manifest("1").await.unwrap();
    }

    #[tokio::test]
    async fn basic_challenge_uses_the_auth_field() {
        let (addr, _) = mock_registry(true).await;
        let auth = base64::engine::general_purpose::STANDARD.encode("u:p");
        let c = client_for(
            &addr,
            Auth {
                auth,
                ..Default::default()
            },
        );
        c.manifest("1").await.unwrap();
        let none = client_for(&addr, Auth::default());
        let e = none.manifest("1").await.unwrap_err();
        assert_eq!(e.kind(), Kind::Unauthenticated, "{e}");
        assert!(
            e.to_string().contains("no credentials")
                || e.to_string().contains("none are configured"),
            "{e}"
        );
    }
}
