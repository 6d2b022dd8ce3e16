//! Manifests, indexes and image configs (Docker v2 schema 2 and OCI), and platform choice.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::reference::Digest;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// The empty descriptor's type (`{}`), the config of image-spec 1.1 artifacts.
pub const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";

/// Accept header for manifest requests: all four, so registries never down-convert.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: Digest,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// An artifact layer's file name lives here (`org.opencontainers.image.title`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ImageManifest {
    /// The manifest's own `mediaType` (OCI manifests may leave it out).
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// Set by OCI artifacts (image-spec 1.1).
    #[serde(rename = "artifactType", default)]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Index {
    pub manifests: Vec<Descriptor>,
}

/// A parsed manifest document.
pub enum Parsed {
    Index(Index),
    Manifest(ImageManifest),
}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(rename = "schemaVersion", default)]
    schema_version: Option<u32>,
    manifests: Option<serde_json::Value>,
    config: Option<serde_json::Value>,
}

/// Parse a manifest or index; `content_type` is the registry's Content-Type header.
pub fn parse(body: &[u8], content_type: &str, what: &str) -> Result<Parsed> {
    let probe: Probe = serde_json::from_slice(body)
        .map_err(|e| Error::data_loss(format!("manifest {what}: not valid JSON: {e}")))?;
    if probe.schema_version == Some(1) {
        return Err(Error::precondition(format!(
            "manifest {what}: Docker schema 1 manifests are not supported; push the image again with a current client"
        )));
    }
    let mt = probe.media_type.clone().unwrap_or_else(|| {
        content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string()
    });
    let is_index = mt == DOCKER_LIST
        || mt == OCI_INDEX
        || (probe.manifests.is_some() && probe.config.is_none());
    if is_index {
        let idx: Index = serde_json::from_slice(body)
            .map_err(|e| Error::data_loss(format!("index {what}: {e}")))?;
        return Ok(Parsed::Index(idx));
    }
    if mt == DOCKER_MANIFEST || mt == OCI_MANIFEST || probe.config.is_some() {
        let m: ImageManifest = serde_json::from_slice(body)
            .map_err(|e| Error::data_loss(format!("manifest {what}: {e}")))?;
        return Ok(Parsed::Manifest(m));
    }
    Err(Error::precondition(format!(
        "manifest {what}: unsupported media type {mt:?}"
    )))
}

/// This node's platform in OCI terms.
pub fn node_platform() -> Platform {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "arm" => "arm",
        other => other,
    };
    let variant = match arch {
        "arm64" => Some("v8".to_string()),
        "arm" => Some("v7".to_string()),
        _ => None,
    };
    Platform {
        architecture: arch.to_string(),
        os: "linux".to_string(),
        variant,
    }
}

/// Choose the manifest for `want` from an index, as containerd's platform matcher does:
/// same os and architecture; an exact variant match wins, then an entry without variant
/// (or arm64's implied v8).
pub fn choose<'a>(idx: &'a Index, want: &Platform) -> Option<&'a Descriptor> {
    let candidates = idx.manifests.iter().filter(|d| {
        d.platform.as_ref().is_some_and(|p| p.os == want.os && p.architecture == want.architecture)
            // Attestation manifests (buildx) carry platform unknown/unknown; skip anything
            // that is not an image manifest.
            && (d.media_type.is_empty() || d.media_type == DOCKER_MANIFEST || d.media_type == OCI_MANIFEST)
    });
    let mut fallback = None;
    for d in candidates {
        let v = d.platform.as_ref().and_then(|p| p.variant.clone());
        if v == want.variant {
            return Some(d);
        }
        if fallback.is_none() && (v.is_none() || want.variant.is_none()) {
            fallback = Some(d);
        }
    }
    fallback
}

/// The image config fields we use; the raw JSON is kept too.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<RunConfig>,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct RunConfig {
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

pub fn parse_config(body: &[u8], digest: &Digest) -> Result<ImageConfig> {
    serde_json::from_slice(body)
        .map_err(|e| Error::data_loss(format!("image config {digest}: {e}")))
}

/// Chain ids as the OCI image spec defines them: chain[0] = diff[0],
/// chain[i] = sha256(chain[i-1] + " " + diff[i]).
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => Digest::of(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(arch: &str, variant: Option<&str>, n: u8) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: Digest::of(&[n]),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: variant.map(Into::into),
            }),
            annotations: Default::default(),
        }
    }

    #[test]
    fn platform_choice() {
        let idx = Index {
            manifests: vec![
                desc("arm", Some("v7"), 1),
                desc("arm64", Some("v8"), 2),
                desc("amd64", None, 3),
            ],
        };
        let amd = Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
        };
        assert_eq!(choose(&idx, &amd).unwrap().digest, Digest::of(&[3]));
        let arm = Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            variant: Some("v8".into()),
        };
        assert_eq!(choose(&idx, &arm).unwrap().digest, Digest::of(&[2]));
        let idx2 = Index {
            manifests: vec![desc("arm64", None, 4)],
        };
        assert_eq!(choose(&idx2, &arm).unwrap().digest, Digest::of(&[4]));
        let s390 = Platform {
            architecture: "s390x".into(),
            os: "linux".into(),
            variant: None,
        };
        assert!(choose(&idx, &s390).is_none());
    }

    #[test]
    fn chain_id_matches_spec() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        assert_eq!(c[1], Digest::of(format!("{a} {b}").as_bytes()));
    }

    #[test]
    fn parses_both_formats() {
        let d = Digest::of(b"x");
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"c","digest":"{d}","size":1}},"layers":[]}}"#
        );
        assert!(matches!(
            parse(m.as_bytes(), "", "t").unwrap(),
            Parsed::Manifest(_)
        ));
        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":1}}]}}"#
        );
        assert!(matches!(
            parse(i.as_bytes(), OCI_INDEX, "t").unwrap(),
            Parsed::Index(_)
        ));
        let e = parse(br#"{"schemaVersion":1}"#, "", "t").err().unwrap();
        assert!(e.to_string().contains("schema 1"));
        // The artifact manifest image-spec 1.1 withdrew (no config; docker-registry 2.8
        // refuses it too): a clear refusal, not a parse error.
        let a = br#"{"mediaType":"application/vnd.oci.artifact.manifest.v1+json","blobs":[]}"#;
        let e = parse(a, "", "t").err().unwrap();
        assert_eq!(e.kind(), crate::Kind::FailedPrecondition);
        assert!(
            e.to_string().contains("vnd.oci.artifact.manifest.v1"),
            "{e}"
        );
        // An image-spec 1.1 artifact parses as a manifest, its titles kept.
        let art = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"x/y","config":{{"mediaType":"{EMPTY_CONFIG}","digest":"{d}","size":2}},"layers":[{{"mediaType":"text/plain","digest":"{d}","size":1,"annotations":{{"org.opencontainers.image.title":"a.txt"}}}}]}}"#
        );
        let Parsed::Manifest(m) = parse(art.as_bytes(), "", "t").unwrap() else {
            panic!("an artifact is a manifest");
        };
        assert_eq!(m.artifact_type.as_deref(), Some("x/y"));
        assert_eq!(
            m.layers[0].annotations["org.opencontainers.image.title"],
            "a.txt"
        );
    }
}
