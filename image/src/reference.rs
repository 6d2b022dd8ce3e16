//! Image references, normalised the way kubelet and containerd expect:
//! `busybox` → `docker.io/library/busybox:latest`, `localhost:5000/a/b@sha256:…` kept as is.
//! Pure functions; no I/O.

use std::fmt;

use crate::error::{Error, Result};

pub const DEFAULT_REGISTRY: &str = "docker.io";
const LEGACY_DEFAULT_REGISTRY: &str = "index.docker.io";
const OFFICIAL_REPO_PREFIX: &str = "library/";
pub const DEFAULT_TAG: &str = "latest";

/// A content digest. Only sha256 is accepted: it is the only algorithm we can verify.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Digest> {
        let Some(hex) = s.strip_prefix("sha256:") else {
            return Err(Error::invalid(format!(
                "digest {s:?}: only sha256:<64 hex> digests are supported"
            )));
        };
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Error::invalid(format!(
                "digest {s:?}: expected sha256:<64 lowercase hex>"
            )));
        }
        Ok(Digest(s.to_string()))
    }

    /// Build from raw sha256 output.
    pub fn from_sha256(bytes: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(bytes)))
    }

    /// The sha256 of `data`.
    pub fn of(data: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest::from_sha256(&sha2::Sha256::digest(data))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex part, used as a file name in the content store.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Digest {
    type Error = Error;
    fn try_from(s: String) -> Result<Digest> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

/// A fully qualified image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host with optional port, e.g. `docker.io`, `localhost:5000`.
    pub registry: String,
    /// Repository path, e.g. `library/busybox`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

/// The longest `registry/repository` accepted (docker/distribution's NameTotalLengthMax).
pub const MAX_NAME: usize = 255;

impl Reference {
    /// Parse and normalise a reference as kubelet does (docker's ParseNormalizedNamed followed
    /// by TagNameOnly): add `docker.io`, `library/` and `:latest` where missing.
    pub fn parse(input: &str) -> Result<Reference> {
        let s = input.trim();
        if s.is_empty() {
            return Err(Error::invalid("image reference is empty"));
        }
        if s.len() > 4096 {
            return Err(Error::invalid(format!(
                "image reference is {} bytes long",
                s.len()
            )));
        }
        // A bare 64-hex string is an image id, not a repository name (docker refuses it too).
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid(format!(
                "image reference {s:?}: a 64-hex string is an image id, not a repository name"
            )));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (
                r,
                Some(
                    Digest::parse(d)
                        .map_err(|e| e.context(format!("image reference {input:?}")))?,
                ),
            ),
            None => (s, None),
        };
        // The tag is after the last ':' that comes after the last '/', so a port is not a tag.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            validate_tag(t).map_err(|e| e.context(format!("image reference {input:?}")))?;
        }
        let (mut registry, mut repository) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), remainder.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        if registry == LEGACY_DEFAULT_REGISTRY {
            registry = DEFAULT_REGISTRY.to_string();
        }
        if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            repository = format!("{OFFICIAL_REPO_PREFIX}{repository}");
        }
        validate_repository(&repository)
            .map_err(|e| e.context(format!("image reference {input:?}")))?;
        validate_registry(&registry)
            .map_err(|e| e.context(format!("image reference {input:?}")))?;
        // docker/distribution's limit on the normalised name (found by fuzzing: a name that
        // passed the input's length check grew past it once normalised, so its printed form
        // could not be parsed again).
        let full = registry.len() + 1 + repository.len();
        if full > MAX_NAME {
            return Err(Error::invalid(format!(
                "image reference {input:?}: its name is {full} characters, more than {MAX_NAME}"
            )));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository`, the name part without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// What the registry's manifest endpoint is asked for: the digest if pinned, else the tag.
    pub fn object(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// `registry/repository:tag` if there is a tag: what ListImages shows under repo_tags.
    pub fn tagged(&self) -> Option<String> {
        self.tag.as_ref().map(|t| format!("{}:{t}", self.name()))
    }

    /// `registry/repository@digest`: what ListImages shows under repo_digests.
    pub fn with_digest(&self, d: &Digest) -> String {
        format!("{}@{d}", self.name())
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn validate_tag(t: &str) -> Result<()> {
    let ok = !t.is_empty()
        && t.len() <= 128
        && t.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && (b == b'.' || b == b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "tag {t:?}: must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"
        )))
    }
}

fn validate_repository(r: &str) -> Result<()> {
    if r.is_empty() {
        return Err(Error::invalid("repository name is empty"));
    }
    for comp in r.split('/') {
        if !valid_path_component(comp) {
            return Err(Error::invalid(format!(
                "repository {r:?}: component {comp:?} must be lowercase letters and digits separated by '.', '_', '__' or '-'"
            )));
        }
    }
    Ok(())
}

fn valid_path_component(c: &str) -> bool {
    // [a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn validate_registry(r: &str) -> Result<()> {
    let host = match r.rsplit_once(':') {
        Some((h, port)) if !r.starts_with('[') || h.ends_with(']') => {
            if port.is_empty()
                || !port.bytes().all(|b| b.is_ascii_digit())
                || port.parse::<u16>().is_err()
            {
                return Err(Error::invalid(format!(
                    "registry {r:?}: port {port:?} is not a number 0-65535"
                )));
            }
            h
        }
        _ => r,
    };
    let ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "registry host {host:?} is not a valid host name"
        )))
    }
}

/// Whether `s` names an image by id: `sha256:<hex>` or bare 64 hex, as kubelet passes them
/// to ImageStatus and RemoveImage.
pub fn parse_image_id(s: &str) -> Option<Digest> {
    let s = s.trim();
    if let Ok(d) = Digest::parse(s) {
        return Some(d);
    }
    if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Digest::parse(&format!("sha256:{s}")).ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing: a name under the input limit that grows past it once normalised
    /// (docker.io/library/ added) is refused, so every accepted reference prints back to one
    /// that parses.
    #[test]
    fn a_name_too_long_once_normalised_is_refused() {
        let long = "a".repeat(250);
        let e = Reference::parse(&long).expect_err("docker.io/library/ + 250 characters");
        assert!(e.to_string().contains("more than 255"), "{e}");
        let ok = Reference::parse(&"a".repeat(200)).expect("short enough");
        assert_eq!(Reference::parse(&ok.to_string()).expect("reparses"), ok);
    }

    fn norm(s: &str) -> String {
        match Reference::parse(s) {
            Ok(r) => r.to_string(),
            Err(e) => panic!("{s}: {e}"),
        }
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_hub_short_names() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(norm("library/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(
            norm("docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            norm("index.docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(norm("user/app:v1"), "docker.io/user/app:v1");
    }

    #[test]
    fn registries_ports_and_localhost() {
        assert_eq!(norm("localhost/app"), "localhost/app:latest");
        assert_eq!(norm("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(norm("127.0.0.1:5000/a/b/c:t"), "127.0.0.1:5000/a/b/c:t");
        assert_eq!(
            norm("registry.k8s.io/pause:3.10"),
            "registry.k8s.io/pause:3.10"
        );
        assert_eq!(norm("myhost:5000/app"), "myhost:5000/app:latest");
        let r = Reference::parse("localhost:5000/app").unwrap();
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "app");
        assert_eq!(r.tag.as_deref(), Some("latest"));
    }

    #[test]
    fn digests() {
        assert_eq!(
            norm(&format!("busybox@{D}")),
            format!("docker.io/library/busybox@{D}")
        );
        let r = Reference::parse(&format!("busybox:1.0@{D}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some("1.0"));
        assert_eq!(r.object(), D);
        assert_eq!(
            r.with_digest(r.digest.as_ref().unwrap()),
            format!("docker.io/library/busybox@{D}")
        );
        let r = Reference::parse(&format!("localhost:5000/x@{D}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.tagged(), None);
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "busybox:-x",
            "busybox@sha256:abc",
            "busybox@md5:0123",
            "a//b",
            "a/b/",
            "host:99999/app",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "busy box",
        ] {
            let e = Reference::parse(bad).expect_err(bad);
            assert_eq!(e.kind(), crate::Kind::InvalidArgument, "{bad}: {e}");
        }
        let e = Reference::parse("docker.io/Library/busybox").unwrap_err();
        assert!(e.to_string().contains("\"Library\""), "{e}");
    }

    #[test]
    fn image_ids() {
        assert_eq!(parse_image_id(D).unwrap().as_str(), D);
        assert_eq!(parse_image_id(&D[7..]).unwrap().as_str(), D);
        assert!(parse_image_id("busybox").is_none());
        assert!(Digest::parse("sha256:ABCDEF").is_err());
    }
}
