//! Benchmark (not a test): prepare + mount + unmount + remove of an active snapshot on the
//! 5-layer `layers` image, with and without ID mapping, fd path vs temp-mount fallback, and
//! containerd's own overlayfs snapshotter on the same image in the same run.
//!
//! `cargo bench -p crisp-snapshotter --bench prepare_mount` (release), or quicker
//! `cargo test -p crisp-snapshotter --bench prepare_mount` (dev profile). Needs root,
//! containerd, ctr, docker-registry and `make test-images`. `CRISP_BENCH_ITERS` (default 100).
//!
//! Every variant mounts through the same `Mounter`, so the snapshotter part is what differs:
//! * crisp library in-process (layers unpacked with tar into its own root);
//! * crisp-snapshotter over gRPC (layers pulled and unpacked by containerd through the proxy);
//! * containerd's overlayfs over containerd's gRPC API (layers pulled by containerd).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Scratch;
use crisp_proto::containerd::services::snapshots::v1 as pb;
use crisp_snapshotter::mount::{IdmapMode, Mount, Mounter};
use crisp_snapshotter::{Config, Snapshotter};
use hyper_util::rt::TokioIo;
use pb::snapshots_client::SnapshotsClient;
use tonic::transport::{Channel, Endpoint, Uri};

const MAP: &str = "0:100000:65536";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own, not yet reaped, child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> Proc {
    let f = std::fs::File::create(log).expect("log");
    Proc(
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .expect("spawn"),
    )
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "{what} did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ctr(sock: &Path, args: &[&str]) -> String {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(sock)
        .args(["--namespace", "bench"])
        .args(args)
        .output()
        .expect("ctr");
    assert!(
        out.status.success(),
        "ctr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The committed snapshot nobody has as parent (the image's top layer).
fn top_of(sock: &Path, snapshotter: &str) -> String {
    let ls = ctr(sock, &["snapshots", "--snapshotter", snapshotter, "ls"]);
    let rows: Vec<Vec<String>> = ls
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    let parents: Vec<&String> = rows
        .iter()
        .filter(|r| r.len() == 3)
        .map(|r| &r[1])
        .collect();
    let tops: Vec<&String> = rows
        .iter()
        .map(|r| &r[0])
        .filter(|k| !parents.contains(k))
        .collect();
    assert_eq!(tops.len(), 1, "{ls}");
    tops[0].clone()
}

async fn connect(sock: PathBuf) -> SnapshotsClient<Channel> {
    let ch = Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let s = sock.clone();
            async move { tokio::net::UnixStream::connect(s).await.map(TokioIo::new) }
        }))
        .await
        .expect("connect");
    SnapshotsClient::new(ch)
}

fn req<T>(t: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(t);
    r.metadata_mut()
        .insert("containerd-namespace", "bench".parse().expect("metadata"));
    r
}

#[derive(Debug)]
struct Stats {
    name: String,
    mean: f64,
    p50: f64,
    p95: f64,
}

fn stats(name: &str, mut v: Vec<Duration>) -> Stats {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
    Stats {
        name: name.to_string(),
        mean,
        p50: ms(v[v.len() / 2]),
        p95: ms(v[v.len() * 95 / 100]),
    }
}

fn check_mounted(target: &Path) {
    assert!(
        target.join("bin/busybox").exists(),
        "rootfs not mounted at {}",
        target.display()
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("prepare_mount bench needs root; skipped");
        return;
    }
    let iters: usize = std::env::var("CRISP_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let images = std::env::var_os("CRISP_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-images"));
    let s = Scratch::new("crisp-bench");
    let dir = s.path().to_path_buf();
    let mut results = Vec::new();

    // ---- crisp library in-process, layers unpacked with tar.
    {
        let layout = images.join("layers");
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
                .expect("json");
        let blob = |d: &str| {
            layout
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:"))
        };
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(blob(
                index["manifests"][0]["digest"].as_str().expect("digest"),
            ))
            .expect("manifest"),
        )
        .expect("json");
        for (mode, tag) in [(IdmapMode::Fd, "fd"), (IdmapMode::TempMount, "temp-mount")] {
            let root = dir.join(format!("lib-{tag}"));
            let sn = Snapshotter::open(&root, Config { idmap_mode: mode }).expect("open");
            let mut parent: Option<String> = None;
            for (i, l) in manifest["layers"]
                .as_array()
                .expect("layers")
                .iter()
                .enumerate()
            {
                let key = format!("x{i}");
                let m = sn
                    .prepare(&key, parent.as_deref(), HashMap::new())
                    .expect("prepare");
                let up = m[0].upper_dir().expect("upper");
                let st = Command::new("tar")
                    .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
                    .arg(blob(l["digest"].as_str().expect("d")))
                    .arg("-C")
                    .arg(&up)
                    .status()
                    .expect("tar");
                assert!(st.success());
                sn.commit(&format!("l{i}"), &key, HashMap::new())
                    .expect("commit");
                parent = Some(format!("l{i}"));
            }
            let top = parent.expect("layers");
            let mounter = Mounter::new(mode, root.join("tmp-mounts"));
            let target = s.mkdir(&format!("mnt-lib-{tag}"));
            for idmap in [false, true] {
                if !idmap && mode == IdmapMode::TempMount {
                    continue; // without a mapping both modes mount the same way
                }
                let labels: HashMap<String, String> = if idmap {
                    [
                        (
                            "containerd.io/snapshot/uidmapping".to_string(),
                            MAP.to_string(),
                        ),
                        (
                            "containerd.io/snapshot/gidmapping".to_string(),
                            MAP.to_string(),
                        ),
                    ]
                    .into()
                } else {
                    HashMap::new()
                };
                let mut times = Vec::new();
                let mut phases = [Duration::ZERO; 4];
                for i in 0..iters + 5 {
                    let t0 = Instant::now();
                    let m = sn
                        .prepare(&format!("c{i}"), Some(&top), labels.clone())
                        .expect("prepare");
                    let t1 = Instant::now();
                    mounter.mount_all(&m, &target).expect("mount");
                    check_mounted(&target);
                    let t2 = Instant::now();
                    mounter.unmount_all(&target).expect("unmount");
                    let t3 = Instant::now();
                    sn.remove(&format!("c{i}")).expect("remove");
                    if i >= 5 {
                        times.push(t0.elapsed());
                        for (p, d) in
                            phases
                                .iter_mut()
                                .zip([t1 - t0, t2 - t1, t3 - t2, t3.elapsed()])
                        {
                            *p += d;
                        }
                    }
                }
                let ms = |d: Duration| d.as_secs_f64() * 1000.0 / iters as f64;
                eprintln!(
                    "{tag} idmap={idmap}: prepare {:.2} ms, mount {:.2} ms, unmount {:.2} ms, remove {:.2} ms",
                    ms(phases[0]),
                    ms(phases[1]),
                    ms(phases[2]),
                    ms(phases[3])
                );
                let name = if idmap {
                    format!("crisp library, idmapped, {tag} path")
                } else {
                    "crisp library, no idmap".to_string()
                };
                results.push(stats(&name, times));
            }
        }
    }

    // ---- containerd (overlayfs) and crisp-snapshotter over gRPC, layers pulled by containerd.
    let seed = images.join("registry");
    let storage = dir.join("registry");
    assert!(
        Command::new("cp")
            .arg("-al")
            .arg(&seed)
            .arg(&storage)
            .status()
            .expect("cp")
            .success()
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    std::fs::write(
        dir.join("registry.yml"),
        format!("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: x\n", storage.display()),
    )
    .expect("config");
    let _reg = spawn(
        Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("registry.yml")),
        &dir.join("registry.log"),
    );
    wait_for("registry", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let sn_sock = dir.join("sn.sock");
    let _sn = spawn(
        Command::new(env!("CARGO_BIN_EXE_crisp-snapshotter"))
            .arg("--root")
            .arg(dir.join("sn-root"))
            .arg("--address")
            .arg(&sn_sock),
        &dir.join("sn.log"),
    );
    wait_for("crisp-snapshotter", || sn_sock.exists());
    let ctd = dir.join("ctd");
    std::fs::create_dir_all(&ctd).expect("mkdir");
    let ctd_sock = ctd.join("c.sock");
    std::fs::write(
        ctd.join("config.toml"),
        format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n[proxy_plugins.crisp]\n  type = \"snapshot\"\n  address = \"{}\"\n",
            ctd.join("root").display(),
            ctd.join("state").display(),
            ctd_sock.display(),
            sn_sock.display()
        ),
    )
    .expect("config");
    let _ctd = spawn(
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
    let image = format!("127.0.0.1:{port}/library/layers:latest");
    for sn in ["overlayfs", "crisp"] {
        ctr(
            &ctd_sock,
            &[
                "images",
                "pull",
                "--plain-http",
                "--snapshotter",
                sn,
                &image,
            ],
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mounter = Mounter::new(IdmapMode::Fd, dir.join("tmp-mounts"));
    let target = s.mkdir("mnt-grpc");
    for (label, sock, snapshotter, idmap) in [
        (
            "containerd overlayfs (containerd gRPC)",
            ctd_sock.clone(),
            "overlayfs",
            false,
        ),
        (
            "crisp-snapshotter direct gRPC, no idmap",
            sn_sock.clone(),
            "crisp",
            false,
        ),
        (
            "crisp-snapshotter direct gRPC, idmapped fd",
            sn_sock.clone(),
            "crisp",
            true,
        ),
        (
            "crisp via containerd proxy plugin, no idmap",
            ctd_sock.clone(),
            "crisp",
            false,
        ),
    ] {
        let times = rt.block_on(async {
            let mut c = connect(sock.clone()).await;
            let top = if sock == sn_sock {
                // containerd's metadata layer names backend snapshots "<ns>/<n>/<chain id>":
                // find the top one in our own list.
                let mut st = c
                    .list(req(pb::ListSnapshotsRequest {
                        snapshotter: "crisp".into(),
                        filters: vec![],
                    }))
                    .await
                    .expect("list")
                    .into_inner();
                let mut infos = Vec::new();
                while let Some(m) = st.message().await.expect("list") {
                    infos.extend(m.info);
                }
                let parents: Vec<String> = infos.iter().map(|i| i.parent.clone()).collect();
                let tops: Vec<String> = infos
                    .iter()
                    .filter(|i| i.kind == pb::Kind::Committed as i32 && !parents.contains(&i.name))
                    .map(|i| i.name.clone())
                    .collect();
                assert_eq!(tops.len(), 1, "{tops:?}");
                tops[0].clone()
            } else {
                top_of(&ctd_sock, snapshotter)
            };
            let mut times = Vec::new();
            for i in 0..iters + 5 {
                let key = format!("bench-{snapshotter}-{idmap}-{i}");
                let labels: HashMap<String, String> = if idmap {
                    [
                        (
                            "containerd.io/snapshot/uidmapping".to_string(),
                            MAP.to_string(),
                        ),
                        (
                            "containerd.io/snapshot/gidmapping".to_string(),
                            MAP.to_string(),
                        ),
                    ]
                    .into()
                } else {
                    // Without a lease or a gc.root label containerd's GC would collect it
                    // mid-iteration.
                    [("containerd.io/gc.root".to_string(), "bench".to_string())].into()
                };
                let t0 = Instant::now();
                let m = c
                    .prepare(req(pb::PrepareSnapshotRequest {
                        snapshotter: snapshotter.into(),
                        key: key.clone(),
                        parent: top.clone(),
                        labels,
                    }))
                    .await
                    .expect("prepare")
                    .into_inner()
                    .mounts;
                let mounts: Vec<Mount> = m.into_iter().map(Into::into).collect();
                let (mounter, target2) = (mounter.clone(), target.clone());
                tokio::task::spawn_blocking(move || {
                    mounter.mount_all(&mounts, &target2).expect("mount");
                    check_mounted(&target2);
                    mounter.unmount_all(&target2).expect("unmount");
                })
                .await
                .expect("join");
                c.remove(req(pb::RemoveSnapshotRequest {
                    snapshotter: snapshotter.into(),
                    key,
                }))
                .await
                .expect("remove");
                if i >= 5 {
                    times.push(t0.elapsed());
                }
            }
            times
        });
        results.push(stats(label, times));
    }
    ctr(&ctd_sock, &["images", "rm", "--sync", &image]);

    let base = results
        .iter()
        .find(|r| r.name.starts_with("containerd overlayfs"))
        .map(|r| r.mean)
        .unwrap_or(f64::NAN);
    println!(
        "\nprepare + mount + unmount + remove on the 5-layer `layers` image, {iters} iterations each"
    );
    println!(
        "{:<48} {:>9} {:>9} {:>9} {:>12}",
        "variant", "mean ms", "p50 ms", "p95 ms", "vs ctrd ovl"
    );
    for r in &results {
        println!(
            "{:<48} {:>9.3} {:>9.3} {:>9.3} {:>11.2}x",
            r.name,
            r.mean,
            r.p50,
            r.p95,
            r.mean / base
        );
    }
}
