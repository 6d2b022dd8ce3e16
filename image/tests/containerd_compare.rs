//! Every test image pulled by crisp and by Debian's containerd (a private instance of ours,
//! CRI plugin off) from the same local registry must give identical trees: paths, types,
//! modes, uid/gid, mtimes, xattrs, symlink targets, device numbers, hard-link groups, content hashes.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crisp_e2e::registry::Registry;
use crisp_image::{Config, Images};
use crisp_snapshotter::Snapshotter;
use sha2::{Digest as _, Sha256};

struct Containerd {
    child: Child,
    sock: PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Our own child, by pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_containerd(dir: &Path) -> Containerd {
    std::fs::create_dir_all(dir).unwrap();
    let sock = dir.join("containerd.sock");
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.snapshotter.v1.aufs\", \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.internal.v1.opt\", \"io.containerd.tracing.processor.v1.otlp\"]\n[grpc]\naddress = \"{}\"\n",
            dir.join("root").display(),
            dir.join("state").display(),
            sock.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    let child = Command::new("containerd")
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let c = Containerd { child, sock };
    let t0 = Instant::now();
    while ctr(&c, &["version"]).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "containerd did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c
}

fn ctr(c: &Containerd, args: &[&str]) -> Result<String, String> {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(&c.sock)
        .args(["--namespace", "cmp"])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    rdev: u64,
    /// None for directories the unpacker made because the layer lists no entry for them:
    /// both runtimes stamp those with the time of the pull.
    mtime: Option<(i64, i64)>,
    link: Option<PathBuf>,
    sha: Option<String>,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// Index of the first path sharing this inode (hard links), if any.
    hardlink_of: Option<String>,
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: test helper; buffers outlive the calls.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let mut out = BTreeMap::new();
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
    {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: as above.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if m >= 0 {
            v.truncate(m as usize);
            out.insert(String::from_utf8_lossy(name).into_owned(), v);
        }
    }
    out
}

fn walk(root: &Path, made_after: i64) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<u64, String> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_file() {
                "file"
            } else if ft.is_char_device() {
                "char"
            } else if ft.is_block_device() {
                "block"
            } else if ft.is_fifo() {
                "fifo"
            } else {
                "other"
            };
            if ft.is_dir() {
                stack.push(p.clone());
            }
            let hardlink_of = if !ft.is_dir() && m.nlink() > 1 {
                match inodes.get(&m.ino()) {
                    Some(first) => Some(first.clone()),
                    None => {
                        inodes.insert(m.ino(), rel.clone());
                        None
                    }
                }
            } else {
                None
            };
            let sha = ft
                .is_file()
                .then(|| hex::encode(Sha256::digest(std::fs::read(&p).unwrap())));
            let link = ft.is_symlink().then(|| std::fs::read_link(&p).unwrap());
            out.insert(
                rel,
                Node {
                    kind,
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    rdev: m.rdev(),
                    mtime: (m.mtime() < made_after).then(|| (m.mtime(), m.mtime_nsec())),
                    link,
                    sha,
                    xattrs: xattrs(&p),
                    hardlink_of,
                },
            );
        }
    }
    out
}

/// Detaches a mount when dropped, so a failed assertion never leaves the temp dir's removal
/// walking into a mounted tree.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Ok(c) = CString::new(self.0.as_os_str().as_bytes()) {
            // SAFETY: c is a valid NUL-terminated path; failure (not mounted) is fine.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn run(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trees_match_containerd() {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - 5;
    let reg = Registry::start().unwrap();
    let names = [
        "busybox",
        "layers",
        "user",
        "busybox-zstd",
        "multiarch",
        "pause",
        "large",
    ];
    reg.push(&names).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let hosts = tmp.path().join("certs.d");
    crisp_e2e::containerd::write_hosts_dir(&hosts, &reg.host()).unwrap();
    let cd = start_containerd(&tmp.path().join("containerd"));
    let snap =
        Arc::new(Snapshotter::open(&tmp.path().join("snapshotter"), Default::default()).unwrap());
    let images = Images::open(
        &tmp.path().join("images"),
        snap.clone(),
        Config {
            hosts_dir: Some(hosts.clone()),
            ..Default::default()
        },
    )
    .unwrap();

    for (n, name) in names.iter().enumerate() {
        let image = crisp_e2e::images::get(name).unwrap();
        let upstream = image.upstream();
        let id = images.pull(&upstream, None).await.unwrap();
        let rec = images.status(id.as_str()).unwrap().unwrap();
        let chain = rec.chain_ids.last().unwrap().to_string();

        ctr(
            &cd,
            &[
                "images",
                "pull",
                "--hosts-dir",
                hosts.to_str().unwrap(),
                &upstream,
            ],
        )
        .unwrap();

        // Ours.
        let ours_mnt = tmp.path().join(format!("ours-{n}"));
        std::fs::create_dir_all(&ours_mnt).unwrap();
        let key = format!("cmp-{n}");
        let mounts = snap.view(&key, Some(&chain), HashMap::new()).unwrap();
        crisp_snapshotter::mount::mount_all(&mounts, &ours_mnt).unwrap();
        let ours_guard = Unmount(ours_mnt.clone());
        // containerd's: a view of the same chain id in its overlayfs snapshotter.
        let theirs_mnt = tmp.path().join(format!("theirs-{n}"));
        std::fs::create_dir_all(&theirs_mnt).unwrap();
        // The view has no GC root in containerd, so take its mounts when creating it: they
        // name only the parents' directories, which the pulled image keeps alive.
        let cmd = ctr(
            &cd,
            &[
                "snapshots",
                "view",
                "--target",
                theirs_mnt.to_str().unwrap(),
                &key,
                &chain,
            ],
        )
        .unwrap();
        run(cmd.trim());
        let theirs_guard = Unmount(theirs_mnt.clone());

        let ours = walk(&ours_mnt, started);
        let theirs = walk(&theirs_mnt, started);
        let root_meta = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.mode() & 0o7777, m.uid(), m.gid())
        };
        let roots = (root_meta(&ours_mnt), root_meta(&theirs_mnt));
        drop(theirs_guard);
        crisp_snapshotter::mount::unmount_all(&ours_mnt).unwrap();
        std::mem::forget(ours_guard);
        snap.remove(&key).unwrap();

        let mut diffs = Vec::new();
        if roots.0 != roots.1 {
            diffs.push(format!(
                "/: crisp {:?} != containerd {:?}",
                roots.0, roots.1
            ));
        }
        for (p, t) in &theirs {
            match ours.get(p) {
                None => diffs.push(format!("{p}: missing in crisp ({t:?})")),
                Some(o) if o != t => diffs.push(format!("{p}: crisp {o:?} != containerd {t:?}")),
                _ => {}
            }
        }
        for p in ours.keys().filter(|p| !theirs.contains_key(*p)) {
            diffs.push(format!("{p}: only in crisp"));
        }
        assert!(
            diffs.is_empty(),
            "{name}: {} differences:\n{}",
            diffs.len(),
            diffs
                .iter()
                .take(30)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(!ours.is_empty(), "{name}: empty tree");
        eprintln!("{name}: {} entries identical", ours.len());
    }
}
