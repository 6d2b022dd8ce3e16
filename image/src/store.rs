//! The image store: one record per image (keyed by id = config digest) in redb, file
//! `<root>/images.redb`. Tags and repo digests live in the record; every change is one
//! write transaction, so a crash leaves the previous or the next state, never a torn one.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::artifact::ArtifactInfo;
use crate::error::{Error, Kind, Result};
use crate::reference::Digest;

const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");

/// What the store knows about one image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageRecord {
    /// The config digest, as CRI and containerd report it.
    pub id: Digest,
    /// `registry/repo:tag`, one per tag pointing here.
    pub repo_tags: Vec<String>,
    /// `registry/repo@digest`, the digest the reference resolved to (index or manifest).
    pub repo_digests: Vec<String>,
    /// Manifest + config + compressed layers, as containerd's CRI reports it.
    pub size: u64,
    pub manifest_digest: Digest,
    /// Indexes the manifest was chosen from, per repo digest.
    #[serde(default)]
    pub index_digests: Vec<Digest>,
    pub layers: Vec<Digest>,
    pub diff_ids: Vec<Digest>,
    pub chain_ids: Vec<Digest>,
    /// The image config JSON as pulled.
    pub config: String,
    /// Unix seconds of the first pull.
    pub created: u64,
    #[serde(default)]
    pub pinned: bool,
    /// Set for an OCI artifact: its layers are files, `chain_ids` holds the one snapshot
    /// with those files, `id` is the manifest digest (an artifact's config is usually the
    /// shared empty `{}`, so it cannot name it), and `diff_ids` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactInfo>,
}

impl ImageRecord {
    /// Blobs this image needs kept.
    pub fn blobs(&self) -> impl Iterator<Item = &Digest> {
        std::iter::once(&self.id)
            .chain(std::iter::once(&self.manifest_digest))
            .chain(&self.index_digests)
            .chain(&self.layers)
            .chain(self.artifact.iter().map(|a| &a.config_digest))
    }

    /// Whether this is an OCI artifact (files), not a filesystem image.
    pub fn is_artifact(&self) -> bool {
        self.artifact.is_some()
    }

    /// The config's `User`, for CRI's uid/username.
    pub fn user(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.config).ok()?;
        v.get("config")?
            .get("User")?
            .as_str()
            .map(str::to_string)
            .filter(|s| !s.is_empty())
    }
}

pub struct ImageStore {
    db: Database,
}

fn db_err(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::with_source(Kind::Internal, format!("image store: {what}"), e)
}

impl ImageStore {
    pub fn open(root: &Path) -> Result<ImageStore> {
        let path = root.join("images.redb");
        let db = Database::create(&path)
            .map_err(|e| db_err(&format!("opening {}", path.display()), e))?;
        let tx = db.begin_write().map_err(|e| db_err("begin", e))?;
        tx.open_table(IMAGES)
            .map_err(|e| db_err("creating table", e))?;
        tx.commit().map_err(|e| db_err("commit", e))?;
        Ok(ImageStore { db })
    }

    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        let tx = self.db.begin_read().map_err(|e| db_err("begin", e))?;
        let t = tx.open_table(IMAGES).map_err(|e| db_err("open table", e))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| db_err("iterate", e))? {
            let (k, v) = item.map_err(|e| db_err("read", e))?;
            let rec: ImageRecord = serde_json::from_slice(v.value()).map_err(|e| {
                Error::internal(format!("image store: record {} is corrupt: {e}", k.value()))
            })?;
            out.push(rec);
        }
        Ok(out)
    }

    pub fn get(&self, id: &Digest) -> Result<Option<ImageRecord>> {
        let tx = self.db.begin_read().map_err(|e| db_err("begin", e))?;
        let t = tx.open_table(IMAGES).map_err(|e| db_err("open table", e))?;
        match t.get(id.as_str()).map_err(|e| db_err("get", e))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|e| Error::internal(format!("image store: record {id} is corrupt: {e}"))),
        }
    }

    /// Insert or merge `rec` (tags and digests are added to an existing record), and move
    /// each of its tags away from any other image: a tag names one image.
    pub fn upsert(&self, rec: ImageRecord) -> Result<ImageRecord> {
        let tx = self.db.begin_write().map_err(|e| db_err("begin", e))?;
        let merged;
        {
            let mut t = tx.open_table(IMAGES).map_err(|e| db_err("open table", e))?;
            let mut others = Vec::new();
            for item in t.iter().map_err(|e| db_err("iterate", e))? {
                let (k, v) = item.map_err(|e| db_err("read", e))?;
                if k.value() == rec.id.as_str() {
                    continue;
                }
                if let Ok(o) = serde_json::from_slice::<ImageRecord>(v.value())
                    && o.repo_tags.iter().any(|t| rec.repo_tags.contains(t))
                {
                    others.push(o);
                }
            }
            for mut o in others {
                o.repo_tags.retain(|t| !rec.repo_tags.contains(t));
                put(&mut t, &o)?;
            }
            let existing = match t.get(rec.id.as_str()).map_err(|e| db_err("get", e))? {
                Some(v) => serde_json::from_slice::<ImageRecord>(v.value()).ok(),
                None => None,
            };
            merged = match existing {
                None => rec,
                Some(mut e) => {
                    for x in rec.repo_tags {
                        if !e.repo_tags.contains(&x) {
                            e.repo_tags.push(x);
                        }
                    }
                    for x in rec.repo_digests {
                        if !e.repo_digests.contains(&x) {
                            e.repo_digests.push(x);
                        }
                    }
                    for x in rec.index_digests {
                        if !e.index_digests.contains(&x) {
                            e.index_digests.push(x);
                        }
                    }
                    e
                }
            };
            put(&mut t, &merged)?;
        }
        tx.commit().map_err(|e| db_err("commit", e))?;
        Ok(merged)
    }

    pub fn set_pinned(&self, id: &Digest, pinned: bool) -> Result<bool> {
        let tx = self.db.begin_write().map_err(|e| db_err("begin", e))?;
        let found = {
            let mut t = tx.open_table(IMAGES).map_err(|e| db_err("open table", e))?;
            let rec =
                match t.get(id.as_str()).map_err(|e| db_err("get", e))? {
                    Some(v) => Some(serde_json::from_slice::<ImageRecord>(v.value()).map_err(
                        |e| Error::internal(format!("image store: record {id} is corrupt: {e}")),
                    )?),
                    None => None,
                };
            match rec {
                Some(mut r) => {
                    r.pinned = pinned;
                    put(&mut t, &r)?;
                    true
                }
                None => false,
            }
        };
        tx.commit().map_err(|e| db_err("commit", e))?;
        Ok(found)
    }

    pub fn delete(&self, id: &Digest) -> Result<bool> {
        let tx = self.db.begin_write().map_err(|e| db_err("begin", e))?;
        let existed = {
            let mut t = tx.open_table(IMAGES).map_err(|e| db_err("open table", e))?;
            t.remove(id.as_str())
                .map_err(|e| db_err("remove", e))?
                .is_some()
        };
        tx.commit().map_err(|e| db_err("commit", e))?;
        Ok(existed)
    }
}

fn put(t: &mut redb::Table<'_, &str, &[u8]>, rec: &ImageRecord) -> Result<()> {
    let v = serde_json::to_vec(rec)
        .map_err(|e| Error::internal(format!("image store: encoding {}: {e}", rec.id)))?;
    t.insert(rec.id.as_str(), v.as_slice())
        .map_err(|e| db_err("insert", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u8, tag: &str) -> ImageRecord {
        ImageRecord {
            id: Digest::of(&[n]),
            repo_tags: vec![tag.into()],
            repo_digests: vec![format!("r@{}", Digest::of(&[n, 1]))],
            size: 1,
            manifest_digest: Digest::of(&[n, 2]),
            index_digests: vec![],
            layers: vec![],
            diff_ids: vec![],
            chain_ids: vec![],
            config: "{}".into(),
            created: 0,
            pinned: false,
            artifact: None,
        }
    }

    #[test]
    fn tags_move_and_records_survive_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let s = ImageStore::open(tmp.path()).unwrap();
            s.upsert(rec(1, "a:latest")).unwrap();
            s.upsert(rec(2, "a:latest")).unwrap();
            let mut r = rec(2, "a:v2");
            r.repo_digests.clear();
            let m = s.upsert(r).unwrap();
            assert_eq!(
                m.repo_tags,
                vec!["a:latest".to_string(), "a:v2".to_string()]
            );
        }
        let s = ImageStore::open(tmp.path()).unwrap();
        let one = s.get(&Digest::of(&[1])).unwrap().unwrap();
        assert!(one.repo_tags.is_empty());
        assert_eq!(s.list().unwrap().len(), 2);
        assert!(s.set_pinned(&Digest::of(&[2]), true).unwrap());
        assert!(s.get(&Digest::of(&[2])).unwrap().unwrap().pinned);
        assert!(!s.set_pinned(&Digest::of(&[9]), true).unwrap());
        assert!(s.delete(&Digest::of(&[1])).unwrap());
        assert!(!s.delete(&Digest::of(&[1])).unwrap());
        assert_eq!(s.list().unwrap().len(), 1);
    }
}
