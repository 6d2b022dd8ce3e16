//! OCI artifacts: manifests whose layers are plain files (a model, a config bundle, a
//! script), not filesystem tars. Pulled like images into the content store (every blob
//! verified by digest), then laid out once as a directory of files in a committed snapshot,
//! so an image volume mounts an artifact exactly as it mounts an image: a read-only view,
//! idmapped for user-namespaced pods, with `image_sub_path` resolved inside it.
//!
//! Recognition follows CRI-O (`internal/ociartifact`): a manifest is an image when its media
//! type is an image manifest (OCI or Docker), its config is an image config (or has no media
//! type) and it declares no `artifactType`; anything else is an artifact.
//!
//! Each layer becomes the file its `org.opencontainers.image.title` annotation names (or,
//! as CRI-O also accepts, `org.cnai.model.filepath`). A title is a relative path: `a.txt`
//! or `dir/a.txt` (oras pushes a file given as `dir/a.txt` under that title, and CRI-O's
//! `image_sub_path` selects such directories). A layer without a title, or a title that is
//! empty, absolute, has a `..`, `.` or empty component, repeats another, or names a file
//! that another title uses as a directory, is refused with InvalidArgument naming the layer
//! digest and the title: CRI-O skips untitled layers with a log line, which leaves a volume
//! silently missing files. The tree is written with single-name `*at` calls and O_NOFOLLOW
//! below a directory fd, so nothing is ever written outside it.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::content::ContentStore;
use crate::error::{Error, Result};
use crate::manifest::{self, Descriptor, ImageManifest};
use crate::reference::Digest;
use crate::sys;

/// The OCI annotation naming a layer's file.
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";
/// CNCF ModelPack's per-layer file path, which CRI-O accepts when there is no title.
pub const ANNOTATION_CNAI_FILEPATH: &str = "org.cnai.model.filepath";
/// Longest file name component Linux accepts.
const NAME_MAX: usize = 255;

/// What a manifest describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    /// A filesystem image: layers are tars, the config has diff_ids.
    Image,
    /// An OCI artifact: layers are plain files.
    Artifact,
}

/// Classify a manifest as CRI-O does (see the module doc).
pub fn classify(m: &ImageManifest) -> ManifestKind {
    let image_manifest = matches!(
        m.media_type.as_str(),
        "" | manifest::OCI_MANIFEST | manifest::DOCKER_MANIFEST
    );
    let image_config = matches!(
        m.config.media_type.as_str(),
        "" | manifest::OCI_CONFIG | manifest::DOCKER_CONFIG
    );
    let artifact_type = m.artifact_type.as_deref().is_some_and(|t| !t.is_empty());
    if image_manifest && image_config && !artifact_type {
        ManifestKind::Image
    } else {
        ManifestKind::Artifact
    }
}

/// One layer of an artifact and the file it becomes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArtifactFile {
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub media_type: String,
    /// Relative path below the artifact's directory (validated).
    pub path: String,
}

/// What the image store records about an artifact besides what every image has.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArtifactInfo {
    /// The manifest's `artifactType`, else its config media type (as the image spec says).
    pub artifact_type: String,
    pub config_media_type: String,
    /// The config blob (often the empty `{}`): kept by GC with the artifact.
    pub config_digest: Digest,
    pub files: Vec<ArtifactFile>,
}

impl ArtifactInfo {
    /// The files of `m` (titles validated) and its type.
    pub fn of(m: &ImageManifest) -> Result<ArtifactInfo> {
        let artifact_type = m
            .artifact_type
            .clone()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| m.config.media_type.clone());
        Ok(ArtifactInfo {
            artifact_type,
            config_media_type: m.config.media_type.clone(),
            config_digest: m.config.digest.clone(),
            files: files_of(&m.layers)?,
        })
    }
}

/// Name of the committed snapshot holding the files of the artifact whose manifest is
/// `manifest_digest` (the manifest fixes every file's name and content). A digest, so image
/// GC treats it like a layer snapshot: kept while a record lists it, removed after.
pub fn tree_name(manifest_digest: &Digest) -> Digest {
    Digest::of(format!("crisp artifact files of {manifest_digest}").as_bytes())
}

fn bad_title(layer: &Descriptor, title: &str, why: &str) -> Error {
    Error::invalid(format!(
        "artifact layer {}: title {title:?} {why}",
        layer.digest
    ))
}

/// Why `title` cannot name a file below the artifact's directory, if it cannot.
pub fn title_problem(title: &str) -> Option<&'static str> {
    if title.is_empty() {
        return Some("is empty");
    }
    if title.contains('\0') {
        return Some("contains a NUL byte");
    }
    if title.starts_with('/') {
        return Some("is absolute; it must be relative to the volume");
    }
    for c in title.split('/') {
        match c {
            ".." => return Some("escapes the volume (\"..\")"),
            "" | "." => return Some("is not a clean relative path (empty or \".\" component)"),
            c if c.len() > NAME_MAX => return Some("has a component longer than 255 bytes"),
            _ => {}
        }
    }
    None
}

/// Every layer as a file, refusing what cannot be laid out safely and unambiguously.
pub fn files_of(layers: &[Descriptor]) -> Result<Vec<ArtifactFile>> {
    let mut seen: BTreeMap<&str, &Digest> = BTreeMap::new();
    let mut files = Vec::with_capacity(layers.len());
    for l in layers {
        let title = l
            .annotations
            .get(ANNOTATION_TITLE)
            .or_else(|| l.annotations.get(ANNOTATION_CNAI_FILEPATH))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "artifact layer {} has no {ANNOTATION_TITLE} annotation: crispd cannot name its file",
                    l.digest
                ))
            })?;
        if let Some(why) = title_problem(title) {
            return Err(bad_title(l, title, why));
        }
        if let Some(other) = seen.get(title.as_str()) {
            return Err(bad_title(
                l,
                title,
                &format!("repeats the title of layer {other}"),
            ));
        }
        seen.insert(title, &l.digest);
        files.push(ArtifactFile {
            digest: l.digest.clone(),
            size: l.size,
            media_type: l.media_type.clone(),
            path: title.clone(),
        });
    }
    // "a" and "a/b" cannot both exist: one would have to be a file and a directory.
    let dirs: HashSet<&str> = files
        .iter()
        .flat_map(|f| f.path.match_indices('/').map(|(i, _)| &f.path[..i]))
        .collect();
    if let Some(f) = files.iter().find(|f| dirs.contains(f.path.as_str())) {
        let l = layers
            .iter()
            .find(|l| l.digest == f.digest)
            .unwrap_or(&layers[0]);
        return Err(bad_title(
            l,
            &f.path,
            "is a file, but another layer's title uses it as a directory",
        ));
    }
    Ok(files)
}

fn io_err(what: &str, dir: &Path, e: std::io::Error) -> Error {
    Error::io(format!("artifact files in {}: {what}", dir.display()), e)
}

/// Write every file below `dir` (an empty, freshly prepared snapshot directory): contents
/// from the content store, re-hashed while copied and checked against the layer digest,
/// owned by root, 0644 (directories 0755), every file and directory fsynced, so the
/// snapshot committed afterwards holds exactly the verified bytes even across a crash.
pub fn write_tree(content: &ContentStore, files: &[ArtifactFile], dir: &Path) -> Result<()> {
    let root = File::open(dir).map_err(|e| io_err("opening", dir, e))?;
    let mut made_dirs: Vec<(String, OwnedFd)> = Vec::new();
    for f in files {
        let (parent, name) = match f.path.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, f.path.as_str()),
        };
        let pfd = match parent {
            None => root.as_fd(),
            Some(p) => {
                let fd = ensure_dirs(root.as_fd(), p, &mut made_dirs)
                    .map_err(|e| io_err(&format!("making directory {p:?}"), dir, e))?;
                // Re-borrow from the list: `ensure_dirs` keeps every fd it opened.
                made_dirs[fd].1.as_fd()
            }
        };
        write_file(content, f, pfd, name).map_err(|e| match e {
            WriteErr::Io(e) => io_err(&format!("writing {:?}", f.path), dir, e),
            WriteErr::Store(e) => e,
        })?;
    }
    for (p, fd) in &made_dirs {
        sys_fsync(fd.as_fd()).map_err(|e| io_err(&format!("syncing {p:?}"), dir, e))?;
    }
    root.sync_all().map_err(|e| io_err("syncing", dir, e))
}

enum WriteErr {
    Io(std::io::Error),
    Store(Error),
}

impl From<std::io::Error> for WriteErr {
    fn from(e: std::io::Error) -> Self {
        WriteErr::Io(e)
    }
}

fn write_file(
    content: &ContentStore,
    f: &ArtifactFile,
    dir: BorrowedFd<'_>,
    name: &str,
) -> std::result::Result<(), WriteErr> {
    let mut src = content.open_blob(&f.digest).map_err(WriteErr::Store)?;
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
    let fd = sys::openat(dir, OsStr::new(name), flags, 0o644)?;
    sys::fchmod(fd.as_fd(), 0o644)?;
    let mut out = File::from(fd);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        written += n as u64;
    }
    let got = Digest::from_sha256(&hasher.finalize());
    if got != f.digest || written != f.size {
        return Err(WriteErr::Store(Error::data_loss(format!(
            "artifact layer {} ({:?}): the stored blob has digest {got} and {written} bytes, the manifest says {} bytes",
            f.digest, f.path, f.size
        ))));
    }
    out.sync_all()?;
    Ok(())
}

/// Open (making them) the directories of `path` below `root`, one name at a time with
/// O_NOFOLLOW; returns the index in `made` of the deepest one.
fn ensure_dirs(
    root: BorrowedFd<'_>,
    path: &str,
    made: &mut Vec<(String, OwnedFd)>,
) -> std::io::Result<usize> {
    let mut at: Option<usize> = None;
    let mut so_far = String::new();
    for comp in path.split('/') {
        if !so_far.is_empty() {
            so_far.push('/');
        }
        so_far.push_str(comp);
        if let Some(i) = made.iter().position(|(p, _)| *p == so_far) {
            at = Some(i);
            continue;
        }
        let parent = match at {
            None => root,
            Some(i) => made[i].1.as_fd(),
        };
        match sys::mkdirat(parent, OsStr::new(comp), 0o755) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
        let fd = sys::openat(parent, OsStr::new(comp), flags, 0)?;
        sys::fchmod(fd.as_fd(), 0o755)?;
        made.push((so_far.clone(), fd));
        at = Some(made.len() - 1);
    }
    at.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty directory path"))
}

fn sys_fsync(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    File::from(fd.try_clone_to_owned()?).sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{DOCKER_MANIFEST, OCI_CONFIG, OCI_MANIFEST};

    fn desc(media_type: &str, n: u8, title: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest: Digest::of(&[n]),
            size: 1,
            platform: None,
            annotations: title
                .map(|t| BTreeMap::from([(ANNOTATION_TITLE.to_string(), t.to_string())]))
                .unwrap_or_default(),
        }
    }

    fn manifest(mt: &str, config_mt: &str, artifact_type: Option<&str>) -> ImageManifest {
        ImageManifest {
            media_type: mt.into(),
            artifact_type: artifact_type.map(Into::into),
            config: desc(config_mt, 0, None),
            layers: vec![],
        }
    }

    #[test]
    fn classification_follows_cri_o() {
        use ManifestKind::*;
        let cases = [
            (OCI_MANIFEST, OCI_CONFIG, None, Image),
            (DOCKER_MANIFEST, manifest::DOCKER_CONFIG, None, Image),
            ("", "", None, Image),
            // image-spec 1.1 artifact: empty config and an artifactType.
            (
                OCI_MANIFEST,
                manifest::EMPTY_CONFIG,
                Some("application/x.t.v1"),
                Artifact,
            ),
            // artifactType alone makes an artifact, even with an image config.
            (
                OCI_MANIFEST,
                OCI_CONFIG,
                Some("application/x.t.v1"),
                Artifact,
            ),
            // a config of its own type (Helm, pre-1.1 artifacts).
            (
                OCI_MANIFEST,
                "application/vnd.cncf.helm.config.v1+json",
                None,
                Artifact,
            ),
            (OCI_MANIFEST, manifest::EMPTY_CONFIG, None, Artifact),
            // an empty artifactType is none.
            (OCI_MANIFEST, OCI_CONFIG, Some(""), Image),
        ];
        for (mt, cmt, at, want) in cases {
            assert_eq!(classify(&manifest(mt, cmt, at)), want, "{mt} {cmt} {at:?}");
        }
    }

    #[test]
    fn titles_name_files_below_the_volume() {
        let ok = files_of(&[
            desc("text/plain", 1, Some("a.txt")),
            desc("text/plain", 2, Some("sub/b.txt")),
            desc("text/plain", 3, Some("sub/deeper/c")),
        ])
        .unwrap();
        let paths: Vec<_> = ok.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["a.txt", "sub/b.txt", "sub/deeper/c"]);
        let mut cnai = desc("x", 4, None);
        cnai.annotations
            .insert(ANNOTATION_CNAI_FILEPATH.into(), "model.bin".into());
        assert_eq!(files_of(&[cnai]).unwrap()[0].path, "model.bin");
    }

    #[test]
    fn bad_titles_are_refused_naming_layer_and_title() {
        for (title, why) in [
            ("/etc/passwd", "absolute"),
            ("../x", "escapes"),
            ("a/../../x", "escapes"),
            ("..", "escapes"),
            ("a//b", "clean relative"),
            ("./a", "clean relative"),
            ("a/", "clean relative"),
            ("", "empty"),
            ("a\0b", "NUL"),
        ] {
            let l = desc("text/plain", 9, Some(title));
            let e = files_of(&[desc("text/plain", 1, Some("ok")), l.clone()]).expect_err(title);
            assert_eq!(e.kind(), crate::Kind::InvalidArgument, "{title:?}");
            let m = e.to_string();
            assert!(m.contains(l.digest.as_str()), "{m}");
            assert!(m.contains(&format!("{title:?}")), "{m}");
            assert!(m.contains(why), "{title:?}: {m}");
        }
        let long = "x".repeat(256);
        assert!(files_of(&[desc("t", 1, Some(&long))]).is_err());
        let e = files_of(&[desc("t", 1, Some("a")), desc("t", 2, Some("a"))]).unwrap_err();
        assert!(e.to_string().contains("repeats the title of layer"), "{e}");
        assert!(e.to_string().contains(Digest::of(&[2]).as_str()), "{e}");
        let e = files_of(&[desc("t", 1, Some("a")), desc("t", 2, Some("a/b"))]).unwrap_err();
        assert!(e.to_string().contains("uses it as a directory"), "{e}");
        let e = files_of(&[desc("t", 5, None)]).unwrap_err();
        assert_eq!(e.kind(), crate::Kind::InvalidArgument);
        assert!(e.to_string().contains(Digest::of(&[5]).as_str()), "{e}");
        assert!(e.to_string().contains(ANNOTATION_TITLE), "{e}");
    }

    #[tokio::test]
    async fn tree_holds_verified_files_and_nothing_else() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let content = ContentStore::open(&tmp.path().join("c")).unwrap();
        let (a, b) = (b"alpha\n".to_vec(), b"beta\n".to_vec());
        let (da, db) = (Digest::of(&a), Digest::of(&b));
        content.put(&da, &a).await.unwrap();
        content.put(&db, &b).await.unwrap();
        let file = |d: &Digest, size, path: &str| ArtifactFile {
            digest: d.clone(),
            size,
            media_type: "text/plain".into(),
            path: path.into(),
        };
        let out = tmp.path().join("fs");
        std::fs::create_dir(&out).unwrap();
        let files = [
            file(&da, 6, "a.txt"),
            file(&db, 5, "d/e/b.txt"),
            file(&da, 6, "d/a"),
        ];
        write_tree(&content, &files, &out).unwrap();
        assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), a);
        assert_eq!(std::fs::read(out.join("d/e/b.txt")).unwrap(), b);
        assert_eq!(std::fs::read(out.join("d/a")).unwrap(), a);
        let md = std::fs::metadata(out.join("d/e/b.txt")).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o644);
        assert_eq!(
            std::fs::metadata(out.join("d/e")).unwrap().mode() & 0o7777,
            0o755
        );
        let mut names: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a.txt", "d"]);

        // A size the blob does not have is data loss, not a truncated file.
        let again = tmp.path().join("fs2");
        std::fs::create_dir(&again).unwrap();
        let e = write_tree(&content, &[file(&da, 7, "a.txt")], &again).unwrap_err();
        assert_eq!(e.kind(), crate::Kind::DataLoss, "{e}");

        // A symlink planted where a directory goes is never followed.
        let planted = tmp.path().join("fs3");
        std::fs::create_dir(&planted).unwrap();
        std::os::unix::fs::symlink(tmp.path(), planted.join("d")).unwrap();
        assert!(write_tree(&content, &[file(&db, 5, "d/x")], &planted).is_err());
        assert!(!tmp.path().join("x").exists());
    }
}
