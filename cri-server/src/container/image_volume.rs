//! Image volumes (KEP-4639): a CRI `Mount` whose `image` names a pulled image is the image's
//! layers, read-only, at `container_path`.
//!
//! Each volume is a read-only *view* snapshot of the image's top layer (key
//! `imgvol-<container>-<i>`), id-mapped for a user-namespaced pod through the snapshot's
//! idmap labels, so the layers are mounted by the same safe fd path as the container's rootfs
//! (detached idmapped clones handed to overlayfs by fd, promise 5). crispd mounts the view at
//! `<state>/image-volumes/<container>/<i>` in its own mount namespace and the OCI spec binds
//! that (or the chosen sub-directory) into the container, read-only.
//!
//! `image_sub_path` is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS |
//! RESOLVE_NO_XDEV)` from the mounted view, never by joining strings: a `..` that climbs out,
//! an absolute symlink or a symlink climbing out fails with EXDEV and is refused, as is a
//! missing path or one that is not a directory. The bind source is then the kernel's name of
//! the directory that was opened; the view is read-only and its layers immutable, so that
//! name cannot be swapped for a symlink afterwards.
//!
//! An OCI artifact (layers that are plain files) is mounted the same way: the image crate
//! lays its files out once at pull, named by their titles, in a committed snapshot that the
//! record lists as its only chain id, so its view, idmapping, sub-path resolution, release
//! and RemoveImage refusal are exactly those of an image (`crisp_image::artifact`).
//!
//! The volumes are listed in the container's record (`ContainerRecord::image_volumes`), so
//! RemoveContainer (and with it pod removal) releases them and RemoveImage refuses an image a
//! container mounts. A crash between mounting and writing the record leaves a directory no
//! record names: start-up's orphan sweep ([`release_orphans`]) unmounts and removes it, and
//! removes the views whose container is gone.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crisp_proto::cri::v1 as pb;
use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::error::{CriError, ErrorKind};
use crate::store::Store;
use crate::store::records::{ContainerRecord, ImageVolume};

/// Prefix of the view snapshots of image volumes.
const SNAPSHOT_PREFIX: &str = "imgvol-";

/// Where crispd mounts every container's image volumes.
pub fn volumes_dir(state: &Path) -> PathBuf {
    state.join("image-volumes")
}

/// One container's image volumes: `<i>` is the volume of `mounts[i]`.
pub fn container_dir(state: &Path, container_id: &str) -> PathBuf {
    volumes_dir(state).join(container_id)
}

fn snapshot_key(container_id: &str, index: usize) -> String {
    format!("{SNAPSHOT_PREFIX}{container_id}-{index}")
}

/// What CreateContainer needs to make a container's image volumes (owned: it runs on a
/// blocking thread, the view's store commit fsyncs).
pub struct Volumes {
    pub state: PathBuf,
    pub images: crisp_image::Images,
    pub snapshotter: Arc<crisp_snapshotter::Snapshotter>,
    pub container_id: String,
    /// The snapshotter's idmap labels for a user-namespaced pod (empty otherwise).
    pub labels: std::collections::HashMap<String, String>,
}

impl Volumes {
    /// Mount every image volume of `mounts`; on error what was mounted is released again.
    pub fn prepare(&self, mounts: &[pb::Mount]) -> Result<Vec<ImageVolume>, CriError> {
        let mut done = Vec::new();
        for (i, m) in mounts.iter().enumerate() {
            let Some(image) = m.image.as_ref() else {
                continue;
            };
            match self.prepare_one(i, &image.image, &m.image_sub_path) {
                Ok(v) => done.push(v),
                Err(e) => {
                    release(&self.state, &self.snapshotter, &self.container_id, &done);
                    return Err(e);
                }
            }
        }
        Ok(done)
    }

    fn prepare_one(&self, i: usize, image: &str, sub: &str) -> Result<ImageVolume, CriError> {
        let _s = tracing::info_span!("image_volume", container_id = %self.container_id, index = i, image = %image).entered();
        check_sub_path_syntax(i, sub)?;
        let rec = self.images.status(image)?.ok_or_else(|| {
            CriError::not_found(format!(
                "mounts[{i}].image: image {image:?} is not pulled (kubelet pulls an image volume before CreateContainer)"
            ))
        })?;
        let parent = rec.chain_ids.last().map(|c| c.to_string());
        let key = snapshot_key(&self.container_id, i);
        let path = container_dir(&self.state, &self.container_id).join(i.to_string());
        let vol = ImageVolume {
            index: i,
            image: image.to_string(),
            image_id: rec.id.to_string(),
            snapshot: key.clone(),
            mount_path: path.display().to_string(),
            source: path.display().to_string(),
        };
        let res = self
            .mount_view(&key, parent.as_deref(), &path)
            .and_then(|()| {
                if sub.is_empty() {
                    Ok(vol.clone())
                } else {
                    let source = resolve_sub_path(&path, i, sub)?;
                    Ok(ImageVolume {
                        source: source.display().to_string(),
                        ..vol.clone()
                    })
                }
            });
        if res.is_err() {
            release(
                &self.state,
                &self.snapshotter,
                &self.container_id,
                std::slice::from_ref(&vol),
            );
        }
        res
    }

    /// A read-only view of the image (idmapped for a userns pod) mounted at `path`.
    fn mount_view(&self, key: &str, parent: Option<&str>, path: &Path) -> Result<(), CriError> {
        let what = |s: &str| format!("container {}: image volume {key}: {s}", self.container_id);
        let mounts = self
            .snapshotter
            .view(key, parent, self.labels.clone())
            .map_err(|e| CriError::context(&what("view snapshot"), e))?;
        // 0711: the OCI runtime reaches the volume by its path, nobody lists the directory.
        mkdir_0711(&volumes_dir(&self.state))
            .and_then(|()| mkdir_0711(&container_dir(&self.state, &self.container_id)))
            .and_then(|()| mkdir_0711(path))
            .map_err(|e| CriError::internal(what(&format!("mkdir {}: {e}", path.display()))))?;
        self.snapshotter
            .mounter()
            .mount_all(&mounts, path)
            .map_err(|e| CriError::internal(what(&format!("mount: {e}"))))?;
        tracing::debug!(path = %path.display(), idmapped = !self.labels.is_empty(), "image volume mounted");
        Ok(())
    }
}

fn mkdir_0711(p: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o711).create(p) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

fn bad_sub_path(i: usize, sub: &str, why: &str) -> CriError {
    CriError::new(
        ErrorKind::InvalidArgument,
        format!("mounts[{i}].image_sub_path: {sub:?} {why}"),
    )
}

/// The sub-path as written: relative, no `..` (kubelet refuses both too).
pub fn check_sub_path_syntax(i: usize, sub: &str) -> Result<(), CriError> {
    let p = Path::new(sub);
    if p.is_absolute() {
        return Err(bad_sub_path(
            i,
            sub,
            "is absolute; it must be relative to the image",
        ));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(bad_sub_path(i, sub, "escapes the image (\"..\")"));
    }
    if sub.contains('\0') {
        return Err(bad_sub_path(i, sub, "contains a NUL byte"));
    }
    Ok(())
}

/// The directory `sub` names below the mounted image at `root`, resolved by the kernel without
/// ever leaving it; its path as the kernel names the opened directory.
fn resolve_sub_path(root: &Path, i: usize, sub: &str) -> Result<PathBuf, CriError> {
    let internal =
        |e: std::io::Error| CriError::internal(format!("image volume {}: {e}", root.display()));
    let dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| internal(e.into()))?;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV;
    let fd = rustix::fs::openat2(
        dir.as_fd(),
        sub,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        resolve,
    )
    .map_err(|e| match e {
        rustix::io::Errno::NOENT => bad_sub_path(i, sub, "does not exist in the image"),
        rustix::io::Errno::XDEV => bad_sub_path(
            i,
            sub,
            "leads out of the image (a symlink or \"..\" escapes it)",
        ),
        rustix::io::Errno::NOTDIR => {
            bad_sub_path(i, sub, "is not a directory (a component is a file)")
        }
        rustix::io::Errno::LOOP => bad_sub_path(i, sub, "has too many levels of symlinks"),
        e => internal(e.into()),
    })?;
    let st = rustix::fs::fstat(fd.as_fd()).map_err(|e| internal(e.into()))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory {
        return Err(bad_sub_path(i, sub, "is not a directory"));
    }
    let name = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&fd)
    ))
    .map_err(internal)?;
    // The kernel's name must still be below the mount (it is, unless the path was renamed,
    // which a read-only view does not allow): checked rather than assumed. The kernel names
    // it without symlinks, so the root is compared the same way.
    let real_root = std::fs::canonicalize(root).map_err(internal)?;
    if !name.starts_with(&real_root) {
        return Err(CriError::internal(format!(
            "image volume {}: sub-path {sub:?} resolved to {} outside it",
            root.display(),
            name.display()
        )));
    }
    Ok(name)
}

/// Unmount and remove the volumes, then their views and the container's directory. Every step
/// is tried; failures are logged (a left mount is found again by [`release_orphans`]).
pub fn release(
    state: &Path,
    sn: &crisp_snapshotter::Snapshotter,
    container_id: &str,
    vols: &[ImageVolume],
) -> bool {
    let mut ok = true;
    for v in vols {
        ok &= release_path(sn, Path::new(&v.mount_path));
        ok &= remove_view(sn, &v.snapshot);
    }
    let dir = container_dir(state, container_id);
    // Not empty: other volumes of the container are still there (a failed volume releases
    // itself before the ones prepared earlier); the last release removes the directory.
    if let Err(e) = std::fs::remove_dir(&dir)
        && !matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::DirectoryNotEmpty
        )
    {
        tracing::warn!(container_id, dir = %dir.display(), error = %e, "image volumes dir not removed");
        ok = false;
    }
    ok
}

/// Unmount one volume directory and rmdir it (never a recursive delete: promise 5).
fn release_path(sn: &crisp_snapshotter::Snapshotter, p: &Path) -> bool {
    if let Err(e) = sn.mounter().unmount_all(p) {
        tracing::warn!(path = %p.display(), error = %e, "image volume not unmounted");
        return false;
    }
    match std::fs::remove_dir(p) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            tracing::warn!(path = %p.display(), error = %e, "image volume dir not removed");
            false
        }
    }
}

fn remove_view(sn: &crisp_snapshotter::Snapshotter, key: &str) -> bool {
    match sn.remove(key) {
        Ok(()) => true,
        Err(e) if e.kind() == crisp_snapshotter::ErrorKind::NotFound => true,
        Err(e) => {
            tracing::warn!(snapshot = key, error = %e, "image volume view not removed");
            false
        }
    }
}

/// Release one container's volumes as its record lists them; an error names what is left.
pub fn release_recorded(
    state: &Path,
    sn: &crisp_snapshotter::Snapshotter,
    rec: &ContainerRecord,
) -> Result<(), CriError> {
    if release(state, sn, &rec.id, &rec.image_volumes) {
        Ok(())
    } else {
        Err(CriError::internal(format!(
            "container {}: image volumes under {} not fully released (see the log)",
            rec.id,
            container_dir(state, &rec.id).display()
        )))
    }
}

/// Start-up: volume directories and views of containers that have no record (a crash inside
/// CreateContainer or RemoveContainer) are unmounted and removed. Returns the container ids.
pub fn release_orphans(
    state: &Path,
    sn: &crisp_snapshotter::Snapshotter,
    known: &HashSet<String>,
) -> Vec<String> {
    let mut orphans = std::collections::BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir(volumes_dir(state)) {
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if !known.contains(&id) {
                orphans.insert(id);
            }
        }
    }
    let mut views = Vec::new();
    let walked = sn.walk(&[] as &[&str], |i| {
        if let Some(rest) = i.name.strip_prefix(SNAPSHOT_PREFIX)
            && let Some((id, _)) = rest.rsplit_once('-')
            && !known.contains(id)
        {
            views.push((id.to_string(), i.name.clone()));
        }
        Ok(())
    });
    if let Err(e) = walked {
        tracing::warn!(error = %e, "listing image volume views");
    }
    for (id, _) in &views {
        orphans.insert(id.clone());
    }
    for id in &orphans {
        let dir = container_dir(state, id);
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                release_path(sn, &e.path());
            }
        }
        let _ = std::fs::remove_dir(&dir);
        for (_, key) in views.iter().filter(|(v, _)| v == id) {
            remove_view(sn, key);
        }
        tracing::info!(container_id = %id, "released orphaned image volumes");
    }
    orphans.into_iter().collect()
}

/// RemoveImage's check: the containers that mount image `image_id` as a volume.
pub fn users_of(store: &Store, image_id: &str) -> Result<Vec<String>, CriError> {
    Ok(store
        .list::<ContainerRecord>()?
        .into_iter()
        .filter(|(_, c)| c.image_volumes.iter().any(|v| v.image_id == image_id))
        .map(|(id, _)| id)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_path_syntax() {
        assert!(check_sub_path_syntax(0, "").is_ok());
        assert!(check_sub_path_syntax(0, "data/many").is_ok());
        for bad in ["../x", "/etc", "a/../../b", "a/.."] {
            let e = check_sub_path_syntax(3, bad).expect_err(bad);
            assert_eq!(e.kind, ErrorKind::InvalidArgument);
            assert!(
                e.message.contains("mounts[3].image_sub_path"),
                "{}",
                e.message
            );
            assert!(e.message.contains(bad), "{}", e.message);
        }
    }

    #[test]
    fn sub_path_resolution_stays_below_the_root() {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path();
        std::fs::create_dir_all(root.join("d/e")).expect("mkdir");
        std::fs::write(root.join("f"), "x").expect("file");
        std::os::unix::fs::symlink("../../..", root.join("d/out")).expect("symlink");
        std::os::unix::fs::symlink("/etc", root.join("abs")).expect("symlink");
        std::os::unix::fs::symlink("d/e", root.join("in")).expect("symlink");
        let root = root.canonicalize().expect("canon");
        assert_eq!(
            resolve_sub_path(&root, 0, "d/e").expect("d/e"),
            root.join("d/e")
        );
        assert_eq!(
            resolve_sub_path(&root, 0, "in").expect("in"),
            root.join("d/e")
        );
        for (bad, why) in [
            ("d/out", "leads out"),
            ("abs", "leads out"),
            ("f", "not a directory"),
            ("nope", "does not exist"),
            ("f/x", "not a directory"),
        ] {
            let e = resolve_sub_path(&root, 1, bad).expect_err(bad);
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{bad}: {}", e.message);
            assert!(e.message.contains(why), "{bad}: {}", e.message);
            assert!(
                e.message.contains("mounts[1].image_sub_path"),
                "{}",
                e.message
            );
        }
    }
}
