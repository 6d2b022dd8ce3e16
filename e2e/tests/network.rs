//! Pod networking through the harness's own bridge: the pod gets an address in the test's
//! subnet, and the host reaches a server in the pod through the bridge (no routing, no NAT,
//! nothing beyond the test's bridge).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use crisp_e2e::cri::container_config;
use crisp_e2e::harness::{RuntimeKind, TestEnv};
use crisp_e2e::registry::Registry;
use tokio::io::AsyncReadExt;

const BUSYBOX: &str = "docker.io/library/busybox:latest";

async fn pod_network(kind: RuntimeKind) -> Result<()> {
    let registry = Registry::start()?;
    registry.push(&["busybox", "pause"])?;
    let env = TestEnv::start(kind, &registry.host()).await?;
    let outcome = serve_from_pod(&env).await;
    let leaks = env.teardown().await;
    outcome?;
    ensure!(leaks.is_empty(), "{kind}: teardown left {leaks:#?}");
    Ok(())
}

async fn serve_from_pod(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    c.pull(BUSYBOX, None).await?;
    let pod = env.pod_config("net")?;
    let pod_id = c.run_pod(&pod).await?;

    let ip = c.pod_ip(&pod_id).await?;
    let net = env.network();
    let IpAddr::V4(v4) = ip else {
        bail!("pod IP {ip} is not IPv4")
    };
    let prefix = net.subnet.trim_end_matches("0/24");
    ensure!(
        v4.to_string().starts_with(prefix),
        "pod IP {ip} is outside the test subnet {}",
        net.subnet
    );

    // One answer per connection, forever: the host may connect before nc listens.
    let server = container_config(
        "server",
        BUSYBOX,
        &[
            "sh",
            "-c",
            "while true; do echo hello-from-pod | nc -l -p 8080; done",
        ],
    );
    let id = c.create_container(&pod_id, &server, &pod).await?;
    c.start_container(&id).await?;

    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        match read_once(ip, 8080).await {
            Ok(s) if s.contains("hello-from-pod") => break s,
            other if Instant::now() >= deadline => {
                bail!(
                    "no answer from {ip}:8080 through bridge {}: {other:?}",
                    net.bridge
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    ensure!(got.trim() == "hello-from-pod", "unexpected answer {got:?}");

    c.stop_pod(&pod_id).await?;
    c.remove_pod(&pod_id).await?;
    Ok(())
}

async fn read_once(ip: IpAddr, port: u16) -> Result<String> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((ip, port)),
    )
    .await
    .context("connect timed out")??;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut buf))
        .await
        .context("read timed out")??;
    Ok(buf)
}

macro_rules! per_runtime {
    ($($name:ident => $kind:expr),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> Result<()> {
            pod_network($kind).await
        }
    )*};
}

per_runtime! {
    containerd_pod_network => RuntimeKind::Containerd,
}
