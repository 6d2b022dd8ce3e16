//! Real mounts through `crisp_snapshotter::mount` (needs root).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crisp_snapshotter::fsutil;
use crisp_snapshotter::mount::{FaultySyscalls, IdmapMode, Mount, Mounter};

/// Unmounts everything under the tempdir and removes it, even when the test fails.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("crisp-mount-test")
                .tempdir()
                .expect("tempdir"),
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.path().join(rel);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let m = Mounter::new(IdmapMode::TempMount, self.path().join("tmp"));
        let mut mps =
            crisp_snapshotter::mount::mountinfo_paths_under(self.path()).unwrap_or_default();
        mps.sort();
        for p in mps.iter().rev() {
            let _ = m.unmount_all(p);
        }
        let _ = fsutil::remove_all_no_xdev(self.path());
    }
}

fn overlay(lower: &[&Path], upper: &Path, work: &Path, map: Option<&str>) -> Mount {
    let mut options = vec![
        format!("workdir={}", work.display()),
        format!("upperdir={}", upper.display()),
        format!(
            "lowerdir={}",
            lower
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        ),
    ];
    if let Some(m) = map {
        options.push(format!("uidmap={m}"));
        options.push(format!("gidmap={m}"));
    }
    Mount {
        typ: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options,
    }
}

fn idmapped_overlay(mode: IdmapMode, faults: Option<Arc<FaultySyscalls>>) {
    let s = Scratch::new();
    let (l1, l2, up, wk, mnt) = (
        s.mkdir("l1"),
        s.mkdir("l2"),
        s.mkdir("up"),
        s.mkdir("wk"),
        s.mkdir("mnt"),
    );
    std::fs::write(l1.join("top"), b"top").expect("write");
    std::fs::write(l2.join("bottom"), b"bottom").expect("write");
    std::fs::write(l2.join("top"), b"shadowed").expect("write");
    std::os::unix::fs::chown(&up, Some(100000), Some(100000)).expect("chown");
    let mut m = Mounter::new(mode, s.path().join("tmp"));
    if let Some(f) = &faults {
        m = m.with_syscalls(f.clone());
    }
    m.mount_all(
        &[overlay(&[&l1, &l2], &up, &wk, Some("0:100000:65536"))],
        &mnt,
    )
    .expect("mount");
    assert_eq!(std::fs::read(mnt.join("top")).expect("read"), b"top");
    assert_eq!(std::fs::read(mnt.join("bottom")).expect("read"), b"bottom");
    let md = std::fs::metadata(mnt.join("bottom")).expect("stat");
    assert_eq!(
        (md.uid(), md.gid()),
        (100000, 100000),
        "lower files appear as the mapped root"
    );
    // On disk they stay root's.
    assert_eq!(std::fs::metadata(l2.join("bottom")).expect("stat").uid(), 0);
    std::fs::write(mnt.join("new"), b"n").expect("write through overlay");
    assert!(up.join("new").exists());
    // No temporary mount is left in the mount table.
    let under_tmp =
        crisp_snapshotter::mount::mountinfo_paths_under(&s.path().join("tmp")).expect("mountinfo");
    assert!(under_tmp.is_empty(), "{under_tmp:?}");
    m.unmount_all(&mnt).expect("unmount");
    assert!(!fsutil::is_mount_point(&mnt).expect("check"));
    assert_eq!(std::fs::read(l2.join("bottom")).expect("read"), b"bottom");
}

#[test]
fn idmapped_overlay_fd_path() {
    idmapped_overlay(IdmapMode::Fd, None);
}

#[test]
fn idmapped_overlay_temp_mount_path() {
    idmapped_overlay(IdmapMode::TempMount, None);
}

#[test]
fn idmapped_overlay_temp_mount_path_with_ebusy_and_enotempty() {
    let f = Arc::new(FaultySyscalls::new(3, 1));
    idmapped_overlay(IdmapMode::TempMount, Some(f.clone()));
    assert_eq!(
        f.injected_ebusy.load(std::sync::atomic::Ordering::SeqCst),
        3
    );
    assert_eq!(
        f.injected_enotempty
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[test]
fn bind_ro_and_idmapped_bind() {
    let s = Scratch::new();
    let (src, a, b) = (s.mkdir("src"), s.mkdir("a"), s.mkdir("b"));
    std::fs::write(src.join("f"), b"x").expect("write");
    let m = Mounter::new(IdmapMode::Auto, s.path().join("tmp"));
    m.mount_all(
        &[Mount {
            typ: "bind".into(),
            source: src.display().to_string(),
            target: String::new(),
            options: vec!["ro".into(), "rbind".into()],
        }],
        &a,
    )
    .expect("bind");
    assert!(
        std::fs::write(a.join("g"), b"y").is_err(),
        "ro bind must refuse writes"
    );
    m.mount_all(
        &[Mount {
            typ: "bind".into(),
            source: src.display().to_string(),
            target: String::new(),
            options: vec![
                "rbind".into(),
                "uidmap=0:2000:10".into(),
                "gidmap=0:3000:10".into(),
            ],
        }],
        &b,
    )
    .expect("idmapped bind");
    let md = std::fs::metadata(b.join("f")).expect("stat");
    assert_eq!((md.uid(), md.gid()), (2000, 3000));
    m.unmount_all(&a).expect("unmount");
    m.unmount_all(&b).expect("unmount");
    assert!(src.join("f").exists());
}

#[test]
fn plain_overlay_deep_chain() {
    let s = Scratch::new();
    // 40 layers with long names: far beyond what a 4 KiB option string could hold at depth
    // 200, and enough to check the order (top-most first).
    let mut lowers = Vec::new();
    for i in 0..40 {
        let p = s.mkdir(&format!(
            "layer-with-a-rather-long-name-to-fill-the-page-{i:03}"
        ));
        std::fs::write(p.join("who"), format!("{i}")).expect("write");
        std::fs::write(p.join(format!("f{i}")), b"").expect("write");
        lowers.push(p);
    }
    let (up, wk, mnt) = (s.mkdir("up"), s.mkdir("wk"), s.mkdir("mnt"));
    let refs: Vec<&Path> = lowers.iter().map(|p| p.as_path()).collect();
    let m = Mounter::new(IdmapMode::Fd, s.path().join("tmp"));
    m.mount_all(&[overlay(&refs, &up, &wk, None)], &mnt)
        .expect("mount");
    assert_eq!(std::fs::read_to_string(mnt.join("who")).expect("read"), "0");
    assert!(mnt.join("f39").exists());
    m.unmount_all(&mnt).expect("unmount");
}
