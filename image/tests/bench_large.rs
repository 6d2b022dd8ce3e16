//! Benchmark, not a test (ignored by default; run with
//! `cargo nextest run -p crisp-image --test bench_large --run-ignored only --no-capture`):
//! cold pull + unpack of the `large` image from a local registry by crisp and by Debian's
//! containerd, and the cost of a second pull of an image already present.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crisp_e2e::registry::Registry;
use crisp_image::{Config, Images};
use crisp_snapshotter::Snapshotter;

fn ctr(sock: &Path, args: &[&str]) -> bool {
    Command::new("ctr")
        .arg("--address")
        .arg(sock)
        .args(["--namespace", "bench"])
        .args(args)
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn drop_caches() {
    // Cold means the registry's files are not in the page cache either. Dirty pages are not
    // dropped: sync first, or the last run's writeback lands in this one.
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_large_pull() {
    let reg = Registry::start().unwrap();
    reg.push(&["large"]).unwrap();
    let image = crisp_e2e::images::get("large").unwrap();
    let upstream = image.upstream();
    let tmp = tempfile::tempdir().unwrap();
    let hosts = tmp.path().join("certs.d");
    crisp_e2e::containerd::write_hosts_dir(&hosts, &reg.host()).unwrap();

    // crisp
    let snap =
        Arc::new(Snapshotter::open(&tmp.path().join("snapshotter"), Default::default()).unwrap());
    let images = Images::open(
        &tmp.path().join("images"),
        snap,
        Config {
            hosts_dir: Some(hosts.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    drop_caches();
    let t0 = Instant::now();
    let id = images.pull(&upstream, None).await.unwrap();
    let crisp_cold = t0.elapsed();
    let size = images.status(id.as_str()).unwrap().unwrap().size;
    let before = reg.requests().unwrap().len();
    let t0 = Instant::now();
    images.pull(&upstream, None).await.unwrap();
    let crisp_warm = t0.elapsed();
    let crisp_warm_requests = reg.requests().unwrap().len() - before;

    // containerd
    let cdir = tmp.path().join("containerd");
    std::fs::create_dir_all(&cdir).unwrap();
    let sock = cdir.join("c.sock");
    std::fs::write(
        cdir.join("config.toml"),
        format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\naddress = \"{}\"\n",
            cdir.join("root").display(),
            cdir.join("state").display(),
            sock.display()
        ),
    )
    .unwrap();
    let mut child = Command::new("containerd")
        .arg("--config")
        .arg(cdir.join("config.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ctr(&sock, &["version"]) {
        assert!(t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(100));
    }
    drop_caches();
    let t0 = Instant::now();
    assert!(ctr(
        &sock,
        &[
            "images",
            "pull",
            "--hosts-dir",
            hosts.to_str().unwrap(),
            &upstream
        ]
    ));
    let cd_cold = t0.elapsed();
    let before = reg.requests().unwrap().len();
    let t0 = Instant::now();
    assert!(ctr(
        &sock,
        &[
            "images",
            "pull",
            "--hosts-dir",
            hosts.to_str().unwrap(),
            &upstream
        ]
    ));
    let cd_warm = t0.elapsed();
    let cd_warm_requests = reg.requests().unwrap().len() - before;
    let _ = child.kill();
    let _ = child.wait();

    let mb = size as f64 / 1e6;
    eprintln!("large image: {mb:.1} MB (compressed layers + config + manifest)");
    eprintln!(
        "crisp      cold {:>7.2}s {:>7.1} MB/s   second pull {:>6.1} ms, {crisp_warm_requests} registry request(s)",
        crisp_cold.as_secs_f64(),
        mb / crisp_cold.as_secs_f64(),
        crisp_warm.as_secs_f64() * 1e3
    );
    eprintln!(
        "containerd cold {:>7.2}s {:>7.1} MB/s   second pull {:>6.1} ms, {cd_warm_requests} registry request(s)",
        cd_cold.as_secs_f64(),
        mb / cd_cold.as_secs_f64(),
        cd_warm.as_secs_f64() * 1e3
    );
    eprintln!(
        "ratio containerd/crisp cold time: {:.2}",
        cd_cold.as_secs_f64() / crisp_cold.as_secs_f64()
    );
}
