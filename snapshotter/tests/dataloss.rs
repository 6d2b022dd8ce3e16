//! The data-loss regression (containerd 2.0 rc: EBUSY on a temporary idmapped lower mount,
//! then a recursive delete through it). Unpack the `layers` test image into committed
//! snapshots, record a manifest of every file of every layer, then 50 times, 4 in parallel,
//! on the fd path and on the fallback path (with EBUSY injected into the first unmounts and
//! one rmdir meeting ENOTEMPTY): prepare an idmapped active snapshot, mount it, start a
//! process inside that holds files and a FIFO open, tear down while it runs, kill it, remove
//! the snapshot. The manifest must be byte-identical afterwards, nothing may stay mounted, and
//! on the fd path no temporary layer mount may ever appear in /proc/self/mountinfo.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::Scratch;
use crisp_snapshotter::mount::{self, FaultySyscalls, IdmapMode, Mounter, Syscalls};
use crisp_snapshotter::{Config, Snapshotter};
use sha2::{Digest, Sha256};

const RUNS: usize = 50;
const PARALLEL: usize = 4;
const MAP: &str = "0:100000:65536";

fn images_dir() -> PathBuf {
    std::env::var_os("CRISP_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-images"))
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').expect("digest");
    layout.join("blobs").join(alg).join(hex)
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).expect("read json")).expect("parse json")
}

/// Layer blobs of the `layers` image, bottom first; None if the image was not built.
fn layer_blobs() -> Option<Vec<PathBuf>> {
    let layout = images_dir().join("layers");
    if !layout.join("index.json").exists() {
        return None;
    }
    let index = json(&layout.join("index.json"));
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .expect("manifest digest");
    let manifest = json(&blob(&layout, mdigest));
    Some(
        manifest["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| blob(&layout, l["digest"].as_str().expect("digest")))
            .collect(),
    )
}

/// Unpacks the image (or, without it, five synthetic layers) into committed snapshots.
fn unpack(sn: &Snapshotter) -> (String, bool) {
    let blobs = layer_blobs();
    let has_image = blobs.is_some();
    let n = blobs.as_ref().map(|b| b.len()).unwrap_or(5);
    let mut parent: Option<String> = None;
    for i in 0..n {
        let key = format!("extract-{i}");
        let m = sn
            .prepare(&key, parent.as_deref(), HashMap::new())
            .expect("prepare");
        let upper = m[0].upper_dir().expect("upper");
        match &blobs {
            Some(b) => {
                let st = std::process::Command::new("tar")
                    .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
                    .arg(&b[i])
                    .arg("-C")
                    .arg(&upper)
                    .status()
                    .expect("tar");
                assert!(st.success(), "tar -x layer {i}");
            }
            None => {
                let d = upper.join(format!("dir{i}"));
                std::fs::create_dir_all(&d).expect("mkdir");
                for f in 0..200 {
                    std::fs::write(d.join(format!("f{f}")), format!("layer {i} file {f}"))
                        .expect("write");
                }
                std::os::unix::fs::symlink("dir0/f0", upper.join(format!("link{i}")))
                    .expect("symlink");
                std::os::unix::fs::chown(d.join("f1"), Some(1000), Some(1000)).expect("chown");
            }
        }
        let name = format!("layer-{i}");
        sn.commit(&name, &key, HashMap::new()).expect("commit");
        parent = Some(name);
    }
    (parent.expect("at least one layer"), has_image)
}

fn xattrs(p: &Path) -> String {
    let mut buf = vec![0u8; 65536];
    let Ok(n) = rustix::fs::llistxattr(p, &mut buf) else {
        return String::new();
    };
    let mut names: Vec<Vec<u8>> = buf[..n]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    names.sort();
    let mut out = String::new();
    for name in names {
        let cname = std::ffi::CString::new(name.clone()).expect("xattr name");
        let mut v = vec![0u8; 65536];
        let len = rustix::fs::lgetxattr(p, cname.as_c_str(), &mut v).unwrap_or(0);
        out.push_str(&format!(
            " {}={}",
            String::from_utf8_lossy(&name),
            hex::encode(&v[..len])
        ));
    }
    out
}

/// One line per file: path, type, mode, uid, gid, size, sha256 or link target, xattrs.
fn manifest(sn: &Snapshotter) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![sn.root().join("snapshots")];
    let root = sn.root().join("snapshots");
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let md = std::fs::symlink_metadata(&p).expect("lstat");
            let ft = md.file_type();
            let content = if ft.is_file() {
                hex::encode(Sha256::digest(std::fs::read(&p).expect("read")))
            } else if ft.is_symlink() {
                format!("-> {}", std::fs::read_link(&p).expect("readlink").display())
            } else if ft.is_char_device() || ft.is_block_device() {
                format!("rdev {}", md.rdev())
            } else {
                String::new()
            };
            let rel = p
                .strip_prefix(&root)
                .expect("under root")
                .display()
                .to_string();
            let size = if ft.is_dir() { 0 } else { md.size() };
            out.insert(
                rel,
                format!(
                    "{:o} {}:{} {} {}{}",
                    md.mode(),
                    md.uid(),
                    md.gid(),
                    size,
                    content,
                    xattrs(&p)
                ),
            );
            if ft.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

/// Teardown syscalls for the fallback path: the injected faults, plus a check that each
/// temporary layer mount refuses writes (it must be read-only) before it is unmounted.
#[derive(Debug)]
struct Checking {
    faults: FaultySyscalls,
    tmp_root: PathBuf,
    ro_checked: AtomicUsize,
    ro_violations: AtomicUsize,
}

impl Syscalls for Checking {
    fn umount2(&self, target: &Path, flags: i32) -> std::io::Result<()> {
        if target.starts_with(&self.tmp_root) && flags & libc::MNT_DETACH == 0 {
            self.ro_checked.fetch_add(1, Ordering::SeqCst);
            match std::fs::write(target.join(".crisp-write-probe"), b"x") {
                Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
                other => {
                    eprintln!(
                        "temporary mount {} accepted a write: {other:?}",
                        target.display()
                    );
                    self.ro_violations.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        self.faults.umount2(target, flags)
    }
    fn rmdir(&self, path: &Path) -> std::io::Result<()> {
        self.faults.rmdir(path)
    }
}

struct Poller {
    stop: Arc<AtomicBool>,
    seen: Arc<AtomicUsize>,
    polls: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Poller {
    /// Polls /proc/self/mountinfo for mount points under `watch` until stopped.
    fn start(watch: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicUsize::new(0));
        let polls = Arc::new(AtomicUsize::new(0));
        let (s, n, c) = (stop.clone(), seen.clone(), polls.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let found = mount::mountinfo_paths_under(&watch).unwrap_or_default();
                n.fetch_add(found.len(), Ordering::SeqCst);
                c.fetch_add(1, Ordering::SeqCst);
            }
        });
        Poller {
            stop,
            seen,
            polls,
            handle: Some(handle),
        }
    }
    fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        (
            self.seen.load(Ordering::SeqCst),
            self.polls.load(Ordering::SeqCst),
        )
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Kills the child on drop.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One container run: prepare, mount, process, teardown while running, kill, remove.
fn one_run(
    sn: &Snapshotter,
    mounter: &Mounter,
    s: &Scratch,
    top: &str,
    i: usize,
    chroot: bool,
    tag: &str,
) {
    let key = format!("{tag}-ctr-{i}");
    let labels: HashMap<String, String> = [
        (
            "containerd.io/snapshot/uidmapping".to_string(),
            MAP.to_string(),
        ),
        (
            "containerd.io/snapshot/gidmapping".to_string(),
            MAP.to_string(),
        ),
    ]
    .into();
    let mounts = sn.prepare(&key, Some(top), labels).expect("prepare");
    let target = s.mkdir(&format!("rootfs/{tag}-{i}"));
    mounter.mount_all(&mounts, &target).expect("mount_all");
    let t = target.display();
    let inner = "exec 3</etc/passwd; mkfifo /crisp-fifo; exec 4<>/crisp-fifo; cd /bin; echo ready $(stat -c %u:%g /bin/busybox) $(stat -c %u /crisp-fifo); exec sleep 1000";
    let mut cmd = if chroot {
        // Own mount namespace, chroot into the rootfs, the image's busybox.
        let mut c = std::process::Command::new("chroot");
        c.arg(&target).args(["/bin/sh", "-c", inner]);
        c
    } else {
        // Same mount namespace as ours, host shell: its cwd and open fds inside the rootfs
        // make our unmount meet a real EBUSY.
        let mut c = std::process::Command::new("sh");
        c.args(["-c", &format!(
            "cd {t}/bin; exec 3<{t}/etc/passwd; mkfifo {t}/crisp-fifo; exec 4<>{t}/crisp-fifo; echo ready $(stat -c %u:%g {t}/bin/busybox) $(stat -c %u {t}/crisp-fifo); exec sleep 1000"
        )]);
        c
    };
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null());
    let uid_map = "0 100000 65536";
    let mut p = Proc(common::spawn_in_userns(chroot, uid_map, uid_map, &mut cmd));
    let mut line = String::new();
    BufReader::new(p.0.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read ready");
    if line.trim().is_empty() {
        let _ = p.0.kill();
        let out = p.0.wait_with_output_ref();
        panic!("process did not start ({tag} {i}): {out}");
    }
    // Lower-layer files are root's inside; the FIFO it made in the upper dir is root's too.
    assert_eq!(line.trim(), "ready 0:0 0", "{tag} run {i}");
    // The FIFO landed in the upper dir owned by the mapped root.
    let upper = mounts[0].upper_dir().expect("upper");
    assert_eq!(
        std::fs::symlink_metadata(upper.join("crisp-fifo"))
            .expect("fifo")
            .uid(),
        100000
    );
    // Tear down while the process still runs.
    mounter
        .unmount_all(&target)
        .expect("unmount_all while busy");
    assert!(!crisp_snapshotter::fsutil::is_mount_point(&target).expect("check"));
    drop(p);
    sn.remove(&key).expect("remove");
    std::fs::remove_dir(&target).expect("rmdir rootfs");
}

trait WaitRef {
    fn wait_with_output_ref(&mut self) -> String;
}

impl WaitRef for std::process::Child {
    fn wait_with_output_ref(&mut self) -> String {
        use std::io::Read;
        let mut err = String::new();
        if let Some(e) = self.stderr.as_mut() {
            let _ = e.read_to_string(&mut err);
        }
        let _ = self.wait();
        err
    }
}

fn campaign(mode: IdmapMode) {
    let s = Scratch::new("crisp-dataloss");
    // The container's root (host uid 100000) must be able to reach its rootfs.
    std::fs::set_permissions(
        s.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let root = s.path().join("root");
    let sn = Snapshotter::open(&root, Config { idmap_mode: mode }).expect("open");
    let (top, has_image) = unpack(&sn);
    let before = manifest(&sn);
    assert!(before.len() > 10, "manifest too small: {}", before.len());
    let tmp_root = root.join("tmp-mounts");
    let checking = Arc::new(Checking {
        faults: FaultySyscalls::new(
            if mode == IdmapMode::TempMount { 12 } else { 0 },
            if mode == IdmapMode::TempMount { 1 } else { 0 },
        ),
        tmp_root: tmp_root.clone(),
        ro_checked: AtomicUsize::new(0),
        ro_violations: AtomicUsize::new(0),
    });
    let mounter = Mounter::new(mode, &tmp_root).with_syscalls(checking.clone());
    let poller = Poller::start(root.clone());
    let started = std::time::Instant::now();
    let tag = mode.to_string();
    std::thread::scope(|scope| {
        for t in 0..PARALLEL {
            let (sn, mounter, s, top, tag) = (&sn, &mounter, &s, top.as_str(), tag.as_str());
            scope.spawn(move || {
                for i in (t..RUNS).step_by(PARALLEL) {
                    one_run(sn, mounter, s, top, i, has_image && i % 2 == 0, tag);
                }
            });
        }
    });
    let elapsed = started.elapsed();
    let (seen, polls) = poller.finish();
    eprintln!(
        "{mode}: {RUNS} runs x{PARALLEL} in {elapsed:?}; mountinfo polls {polls}, temporary mounts seen {seen}; injected EBUSY {} ENOTEMPTY {}, detaches {}; ro checks {}",
        checking.faults.injected_ebusy.load(Ordering::SeqCst),
        checking.faults.injected_enotempty.load(Ordering::SeqCst),
        checking.faults.detaches.load(Ordering::SeqCst),
        checking.ro_checked.load(Ordering::SeqCst),
    );
    // Leftover temporary dirs (the injected ENOTEMPTY) go with cleanup.
    sn.cleanup().expect("cleanup");
    let after = manifest(&sn);
    assert_eq!(before.len(), after.len(), "number of files changed");
    for (k, v) in &before {
        assert_eq!(after.get(k), Some(v), "{k} changed");
    }
    assert_eq!(before, after);
    let left = mount::mountinfo_paths_under(s.path()).expect("mountinfo");
    assert!(left.is_empty(), "still mounted: {left:?}");
    assert!(polls > 0);
    match mode {
        IdmapMode::Fd => assert_eq!(
            seen, 0,
            "fd path: a temporary mount appeared under the snapshotter root"
        ),
        _ => {
            assert_eq!(checking.faults.injected_ebusy.load(Ordering::SeqCst), 12);
            assert_eq!(checking.faults.injected_enotempty.load(Ordering::SeqCst), 1);
            assert!(checking.ro_checked.load(Ordering::SeqCst) > 0);
            assert!(
                seen > 0,
                "the poller should have seen the fallback's temporary mounts"
            );
        }
    }
    assert_eq!(
        checking.ro_violations.load(Ordering::SeqCst),
        0,
        "a temporary layer mount was writable"
    );
    // Only the committed layers remain.
    let dirs = std::fs::read_dir(root.join("snapshots"))
        .expect("dir")
        .count();
    let mut live = 0;
    sn.walk::<&str>(&[], |_| {
        live += 1;
        Ok(())
    })
    .expect("walk");
    assert_eq!(dirs, live);
    assert_eq!(
        std::fs::read_dir(&tmp_root).map(|d| d.count()).unwrap_or(0),
        0
    );
}

#[test]
fn no_data_loss_fd_path() {
    campaign(IdmapMode::Fd);
}

#[test]
fn no_data_loss_temp_mount_path_with_faults() {
    campaign(IdmapMode::TempMount);
}
