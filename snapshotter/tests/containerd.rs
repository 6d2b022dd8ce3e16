//! Real containerd (Debian's) uses crisp-snapshotter as a proxy plugin: pull from a local
//! registry, run busybox, remove everything, and our store is empty. Needs root, containerd,
//! ctr, containerd-shim-runc-v2, runc, docker-registry and the test images
//! (`make test-images`); without the images or binaries the test fails with what is missing.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Scratch;
use crisp_snapshotter::{Config, Snapshotter};

struct Proc(Child, &'static str);

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first so containerd can shut down its plugins cleanly.
        // SAFETY: signalling our own, not yet reaped, child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not exit on SIGTERM; killing", self.1);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn images_dir() -> PathBuf {
    std::env::var_os("CRISP_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-images"))
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "{what} did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Proc {
    let f = std::fs::File::create(log).expect("log");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("dup"))
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    Proc(child, name)
}

/// Our containerd namespace. containerd places a `ctr run` container in the cgroup
/// `/<namespace>/<id>` and runc removes only the leaf, so the namespace is per process and its
/// cgroup directories are removed by [`NamespaceCgroups`].
fn namespace() -> String {
    format!("crisp-test-{}", std::process::id())
}

/// Removes this test's `/<namespace>` cgroup in every hierarchy, pass or fail.
struct NamespaceCgroups;
impl Drop for NamespaceCgroups {
    fn drop(&mut self) {
        let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for h in hierarchies.flatten() {
            // rmdir only: it fails on a cgroup that still has processes or children.
            let _ = std::fs::remove_dir(h.path().join(namespace()));
        }
    }
}

fn ctr(sock: &Path, args: &[&str]) -> String {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(sock)
        .args(["--namespace", &namespace()])
        .args(args)
        .output()
        .expect("ctr");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ctr {args:?} failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn containerd_pulls_and_runs_with_crisp_snapshotter() {
    let _cgroups = NamespaceCgroups;
    let seed = images_dir().join("registry");
    assert!(
        seed.join("docker").is_dir(),
        "no registry seed at {} (run `make test-images`)",
        seed.display()
    );
    let s = Scratch::new("crisp-ctd");
    let dir = s.path();

    // Registry: hard-linked copy of the seed storage (the registry never rewrites a blob).
    let storage = dir.join("registry");
    let st = Command::new("cp")
        .arg("-al")
        .arg(&seed)
        .arg(&storage)
        .status()
        .expect("cp");
    assert!(st.success());
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    std::fs::write(
        dir.join("registry.yml"),
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: crisp-test\n",
            storage.display()
        ),
    )
    .expect("registry config");
    let _registry = spawn(
        "docker-registry",
        Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("registry.yml")),
        &dir.join("registry.log"),
    );
    wait_for("docker-registry", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    // Our snapshotter.
    let sn_root = dir.join("sn-root");
    let sn_sock = dir.join("sn.sock");
    let sn_proc = spawn(
        "crisp-snapshotter",
        Command::new(env!("CARGO_BIN_EXE_crisp-snapshotter"))
            .arg("--root")
            .arg(&sn_root)
            .arg("--address")
            .arg(&sn_sock),
        &dir.join("snapshotter.log"),
    );
    wait_for("crisp-snapshotter", || sn_sock.exists());

    // containerd with crisp as a proxy snapshotter.
    let ctd = dir.join("ctd");
    std::fs::create_dir_all(&ctd).expect("mkdir");
    let ctd_sock = ctd.join("containerd.sock");
    std::fs::write(
        ctd.join("config.toml"),
        format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
[proxy_plugins.crisp]
  type = "snapshot"
  address = "{sn}"
"#,
            root = ctd.join("root").display(),
            state = ctd.join("state").display(),
            sock = ctd_sock.display(),
            sn = sn_sock.display()
        ),
    )
    .expect("containerd config");
    let containerd = spawn(
        "containerd",
        Command::new("containerd")
            .arg("--config")
            .arg(ctd.join("config.toml")),
        &dir.join("containerd.log"),
    );
    wait_for("containerd", || {
        Command::new("ctr")
            .arg("--address")
            .arg(&ctd_sock)
            .arg("version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });

    let image = format!("127.0.0.1:{port}/library/busybox:latest");
    ctr(
        &ctd_sock,
        &[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "crisp",
            &image,
        ],
    );
    let snaps = ctr(&ctd_sock, &["snapshots", "--snapshotter", "crisp", "ls"]);
    assert!(
        snaps.lines().count() >= 2,
        "layers committed in crisp: {snaps}"
    );
    let out = ctr(
        &ctd_sock,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "crisp",
            &image,
            "crisp-run-1",
            "sh",
            "-c",
            "echo hello-from-crisp; cat /etc/passwd | head -1",
        ],
    );
    assert!(out.contains("hello-from-crisp"), "{out}");
    assert!(out.contains("root:"), "{out}");
    ctr(&ctd_sock, &["images", "rm", "--sync", &image]);
    let left = ctr(&ctd_sock, &["snapshots", "--snapshotter", "crisp", "ls"]);
    assert_eq!(
        left.lines().skip(1).count(),
        0,
        "containerd still lists snapshots: {left}"
    );

    // Our own store is empty too (stop the server, open the store directly).
    drop(containerd);
    drop(sn_proc);
    let sn = Snapshotter::open(&sn_root, Config::default()).expect("open store");
    let mut names = Vec::new();
    sn.walk::<&str>(&[], |i| {
        names.push(i.name.clone());
        Ok(())
    })
    .expect("walk");
    assert!(names.is_empty(), "store not empty: {names:?}");
    sn.cleanup().expect("cleanup");
    assert_eq!(
        std::fs::read_dir(sn_root.join("snapshots"))
            .expect("dir")
            .count(),
        0
    );
}
