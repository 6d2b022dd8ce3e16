//! Small OCI images a test builds itself: a base test image's layers (or none) plus layers
//! of listed entries with chosen owners, modes and symlinks, and a config with the fields a
//! test sets (StopSignal). Written as an OCI layout that [`crate::registry::Registry::push_layout`]
//! pushes, so the runtime pulls it like any image.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::images::TestImage;

/// One entry of a layer.
#[derive(Debug, Clone)]
pub enum Entry {
    Dir {
        path: &'static str,
        uid: u64,
        gid: u64,
        mode: u32,
    },
    File {
        path: &'static str,
        content: &'static str,
        uid: u64,
        gid: u64,
        mode: u32,
    },
    Symlink {
        path: &'static str,
        target: &'static str,
    },
}

/// An image under construction.
#[derive(Debug, Default)]
pub struct ImageBuilder {
    /// (digest, size, media type, diff id) of each layer, bottom first.
    layers: Vec<(String, u64, String, String)>,
    blobs: Vec<(String, Vec<u8>)>,
    base_layout: Option<PathBuf>,
    config: serde_json::Map<String, serde_json::Value>,
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

impl ImageBuilder {
    /// An image with no layers yet.
    pub fn empty() -> Self {
        Self::default()
    }

    /// An image starting with `base`'s layers and config (Cmd, Env, ...).
    pub fn on(base: &TestImage) -> Result<Self> {
        let layout = base.layout()?;
        let index = read_json(&layout.join("index.json"))?;
        let mdigest = index["manifests"][0]["digest"]
            .as_str()
            .context("base index has no manifest")?;
        let manifest = read_json(&blob_path(&layout, mdigest))?;
        let cdigest = manifest["config"]["digest"].as_str().context("no config")?;
        let config = read_json(&blob_path(&layout, cdigest))?;
        let diff_ids = config["rootfs"]["diff_ids"]
            .as_array()
            .context("no diff_ids")?;
        let mut b = Self {
            base_layout: Some(layout.clone()),
            config: config["config"].as_object().cloned().unwrap_or_default(),
            ..Self::default()
        };
        for (l, diff) in manifest["layers"]
            .as_array()
            .context("no layers")?
            .iter()
            .zip(diff_ids)
        {
            b.layers.push((
                l["digest"].as_str().context("layer digest")?.to_string(),
                l["size"].as_u64().context("layer size")?,
                l["mediaType"].as_str().context("layer type")?.to_string(),
                diff.as_str().context("diff id")?.to_string(),
            ));
        }
        Ok(b)
    }

    /// Sets a field of the image config's `config` (e.g. "StopSignal").
    pub fn config(mut self, key: &str, value: serde_json::Value) -> Self {
        self.config.insert(key.to_string(), value);
        self
    }

    /// Adds an uncompressed tar layer of `entries`.
    pub fn layer(mut self, entries: &[Entry]) -> Result<Self> {
        let mut tar = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_ustar();
            h.set_mtime(1_700_000_000);
            match e {
                Entry::Dir {
                    path,
                    uid,
                    gid,
                    mode,
                } => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_uid(*uid);
                    h.set_gid(*gid);
                    h.set_mode(*mode);
                    h.set_size(0);
                    tar.append_data(&mut h, path, std::io::empty())?;
                }
                Entry::File {
                    path,
                    content,
                    uid,
                    gid,
                    mode,
                } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_uid(*uid);
                    h.set_gid(*gid);
                    h.set_mode(*mode);
                    h.set_size(content.len() as u64);
                    tar.append_data(&mut h, path, content.as_bytes())?;
                }
                Entry::Symlink { path, target } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    tar.append_link(&mut h, path, target)?;
                }
            }
        }
        let data = tar.into_inner()?;
        let digest = sha(&data);
        self.layers.push((
            digest.clone(),
            data.len() as u64,
            "application/vnd.oci.image.layer.v1.tar".into(),
            digest.clone(),
        ));
        self.blobs.push((digest, data));
        Ok(self)
    }

    /// Writes the OCI layout at `dir` with the ref name `tag`.
    pub fn write(&self, dir: &Path, tag: &str) -> Result<()> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs)?;
        let put = |data: &[u8]| -> Result<String> {
            let d = sha(data);
            fs::write(blob_path(dir, &d), data)?;
            Ok(d)
        };
        for (d, data) in &self.blobs {
            fs::write(blob_path(dir, d), data)?;
        }
        if let Some(base) = &self.base_layout {
            for (d, ..) in &self.layers {
                let src = blob_path(base, d);
                if src.exists() && !blob_path(dir, d).exists() {
                    fs::copy(&src, blob_path(dir, d))
                        .with_context(|| format!("copying {}", src.display()))?;
                }
            }
        }
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": self.config,
            "rootfs": {
                "type": "layers",
                "diff_ids": self.layers.iter().map(|l| l.3.clone()).collect::<Vec<_>>(),
            },
        });
        let config = serde_json::to_vec(&config)?;
        let cdigest = put(&config)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cdigest,
                "size": config.len(),
            },
            "layers": self.layers.iter().map(|(d, s, t, _)| serde_json::json!({
                "mediaType": t, "digest": d, "size": s,
            })).collect::<Vec<_>>(),
        });
        let manifest = serde_json::to_vec(&manifest)?;
        let mdigest = put(&manifest)?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": mdigest,
                "size": manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        });
        fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(())
    }
}

/// An OCI artifact as image-spec 1.1 defines it (what `oras push --artifact-type` makes): an
/// image manifest with `artifactType`, the empty config `{}` and one plain-file layer per
/// file, named by its `org.opencontainers.image.title` annotation. Deterministic: the same
/// files give the same digests.
#[derive(Debug, Default)]
pub struct ArtifactBuilder {
    /// (title, media type, content); a `None` title leaves the annotation out.
    files: Vec<(Option<String>, String, Vec<u8>)>,
}

/// The artifact type the tests' artifacts declare.
pub const TEST_ARTIFACT_TYPE: &str = "application/vnd.crisp.test.files.v1";

impl ArtifactBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a `text/plain` layer titled `title` (any string: tests pass bad ones too).
    pub fn file(mut self, title: &str, content: &[u8]) -> Self {
        self.files
            .push((Some(title.into()), "text/plain".into(), content.to_vec()));
        self
    }

    /// Adds a layer of `media_type` without a title annotation.
    pub fn untitled(mut self, media_type: &str, content: &[u8]) -> Self {
        self.files.push((None, media_type.into(), content.to_vec()));
        self
    }

    /// The layer digest ("sha256:…") of the file titled `title`.
    pub fn digest_of(&self, title: &str) -> Option<String> {
        self.files
            .iter()
            .find(|(t, ..)| t.as_deref() == Some(title))
            .map(|(_, _, c)| sha(c))
    }

    /// Writes the OCI layout at `dir` with the ref name `tag`; returns the manifest digest.
    pub fn write(&self, dir: &Path, tag: &str) -> Result<String> {
        fs::create_dir_all(dir.join("blobs/sha256"))?;
        let put = |data: &[u8]| -> Result<String> {
            let d = sha(data);
            fs::write(blob_path(dir, &d), data)?;
            Ok(d)
        };
        let empty = put(b"{}")?;
        let mut layers = Vec::new();
        for (title, media_type, content) in &self.files {
            let mut l = serde_json::json!({
                "mediaType": media_type, "digest": put(content)?, "size": content.len(),
            });
            if let Some(t) = title {
                l["annotations"] = serde_json::json!({ "org.opencontainers.image.title": t });
            }
            layers.push(l);
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": TEST_ARTIFACT_TYPE,
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": empty, "size": 2, "data": "e30=",
            },
            "layers": layers,
        });
        let manifest = serde_json::to_vec(&manifest)?;
        let mdigest = put(&manifest)?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": TEST_ARTIFACT_TYPE,
                "digest": mdigest,
                "size": manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        });
        fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(mdigest)
    }
}
