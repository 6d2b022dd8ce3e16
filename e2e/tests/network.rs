//! Pod networking through the harness's own bridge, against each runtime:
//! - the pod gets an address in the test's subnet, and the host reaches a server in the pod
//!   through the bridge (no routing, no NAT, nothing beyond the test's bridge);
//! - two pods reach each other over the bridge by IP (busybox wget to a busybox httpd);
//! - a hostPort mapping (CNI portmap) reaches a busybox httpd in a pod from the host's
//!   loopback, and its iptables rules go with the pod;
//! - the pod's DNSConfig (servers, searches, options) lands in its /etc/resolv.conf and the
//!   pod's hostname is the container's;
//! - a host-network pod's container is in the host's network namespace.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use crisp_e2e::cri::container_config;
use crisp_e2e::harness::{RuntimeKind, TestEnv, read_once};
use crisp_e2e::registry::Registry;
use crisp_proto::cri::v1 as api;
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
    c.run_container(&pod_id, &server, &pod).await?;

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

    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

/// Runs `body` in a fresh env of `kind` (portmap chained if `portmap`), prints the daemon's
/// log tail on failure, tears down and checks for leaks.
async fn with_env<F>(kind: RuntimeKind, portmap: bool, body: F) -> Result<()>
where
    F: for<'a> FnOnce(
        &'a TestEnv,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>>,
{
    let t0 = Instant::now();
    let registry = Registry::start()?;
    registry.push(&["busybox", "pause"])?;
    let mut b = TestEnv::builder(kind).mirror(registry.host());
    if portmap {
        b = b.portmap();
    }
    let env = b.start().await?;
    let outcome = body(&env).await;
    let result = env.finish(&kind.to_string(), outcome).await;
    eprintln!("{kind}: done in {:?}", t0.elapsed());
    result
}

/// A busybox httpd on `port` serving `text` as /index.html (foreground, so it is PID 1's child
/// and dies with the container).
fn httpd(name: &str, port: u16, text: &str) -> api::ContainerConfig {
    let script = format!(
        "mkdir -p /www && echo {text} > /www/index.html && exec httpd -f -p {port} -h /www"
    );
    container_config(name, BUSYBOX, &["sh", "-c", &script])
}

/// Starts a container and waits until it is RUNNING.
async fn start_running(
    env: &TestEnv,
    pod_id: &str,
    pod: &api::PodSandboxConfig,
    cfg: &api::ContainerConfig,
) -> Result<String> {
    let c = env.cri();
    let id = c.run_container(pod_id, cfg, pod).await?;
    let st = c.container_status(&id).await?;
    ensure!(
        st.state == api::ContainerState::ContainerRunning as i32,
        "container {} not running after StartContainer: state {:?}, reason {:?}, exit code {}",
        cfg.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or(""),
        st.state,
        st.reason,
        st.exit_code
    );
    Ok(id)
}

/// Two pods over the bridge: a client container in pod B fetches pod A's page by A's IP.
/// (No `wget -T`: Debian busybox 1.35's wget segfaults with it.)
async fn pods_reach_each_other(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    c.pull(BUSYBOX, None).await?;
    let pod_a = env.pod_config("net-a")?;
    let a_id = c.run_pod(&pod_a).await?;
    let pod_b = env.pod_config("net-b")?;
    let b_id = c.run_pod(&pod_b).await?;
    let a_ip = c.pod_ip(&a_id).await?;
    let b_ip = c.pod_ip(&b_id).await?;
    ensure!(a_ip != b_ip, "both pods got IP {a_ip}");

    start_running(env, &a_id, &pod_a, &httpd("web", 8080, "hello-from-a")).await?;
    let client = start_running(
        env,
        &b_id,
        &pod_b,
        &container_config("client", BUSYBOX, &["sleep", "3600"]),
    )
    .await?;

    let url = format!("http://{a_ip}:8080/index.html");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = c
            .exec_sync(&client, &["wget", "-q", "-O", "-", &url], 10)
            .await?;
        let out = String::from_utf8_lossy(&r.stdout);
        if r.exit_code == 0 && out.trim() == "hello-from-a" {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "pod B ({b_ip}) cannot fetch {url} from pod A over bridge {}: exit {}, stdout {out:?}, stderr {:?}",
                env.network().bridge,
                r.exit_code,
                String::from_utf8_lossy(&r.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // And the way back, by the address B sees itself with.
    let own = c
        .exec_ok(&client, &["ip", "-4", "-o", "addr", "show", "eth0"])
        .await?;
    ensure!(
        own.contains(&format!("{b_ip}/")),
        "pod B's eth0 does not carry {b_ip}: {own:?}"
    );

    for id in [&a_id, &b_id] {
        c.stop_and_remove_pod(id).await?;
    }
    Ok(())
}

/// A free TCP port on the host's loopback (bound and released; the kernel does not hand it
/// out again right away).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// `iptables-save` lines that mention `needle` (the hostPort): what portmap left.
fn iptables_rules_with(needle: &str) -> Result<Vec<String>> {
    let out = std::process::Command::new("iptables-save")
        .args(["-t", "nat"])
        .output()
        .context("running iptables-save (Debian package iptables)")?;
    ensure!(
        out.status.success(),
        "iptables-save: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect())
}

/// hostPort: 127.0.0.1:<hostPort> on the host reaches httpd on port 80 in the pod.
async fn host_port(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    c.pull(BUSYBOX, None).await?;
    let port = free_port()?;
    let mut pod = env.pod_config("hostport")?;
    pod.port_mappings = vec![api::PortMapping {
        protocol: api::Protocol::Tcp as i32,
        container_port: 80,
        host_port: port as i32,
        host_ip: String::new(),
    }];
    let pod_id = c.run_pod(&pod).await?;
    start_running(env, &pod_id, &pod, &httpd("web", 80, "hello-from-hostport")).await?;

    let deadline = Instant::now() + Duration::from_secs(20);
    let local: IpAddr = "127.0.0.1".parse()?;
    loop {
        match http_get(local, port, "/index.html").await {
            Ok(body) if body.trim() == "hello-from-hostport" => break,
            other if Instant::now() >= deadline => bail!(
                "127.0.0.1:{port} (hostPort -> pod port 80) gave {other:?}; nat rules naming the port: {:#?}",
                iptables_rules_with(&format!("--dport {port}")).unwrap_or_default()
            ),
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
    c.stop_pod(&pod_id).await?;
    let left = iptables_rules_with(&format!("--dport {port}"))?;
    ensure!(
        left.is_empty(),
        "StopPodSandbox left hostPort rules: {left:#?}"
    );
    c.remove_pod(&pod_id).await?;
    Ok(())
}

/// A minimal HTTP/1.0 GET; returns the body of a 200 answer.
async fn http_get(ip: IpAddr, port: u16, path: &str) -> Result<String> {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((ip, port)),
    )
    .await
    .context("connect timed out")??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut buf))
        .await
        .context("read timed out")??;
    let (head, body) = buf
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header end in {buf:?}"))?;
    ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "HTTP answer {head:?}"
    );
    Ok(body.to_string())
}

/// DNSConfig and hostname, as the container sees them.
async fn dns_and_hostname(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    c.pull(BUSYBOX, None).await?;
    let mut pod = env.pod_config("dns")?;
    pod.hostname = "crisp-e2e-host".into();
    pod.dns_config = Some(api::DnsConfig {
        servers: vec!["192.0.2.53".into(), "192.0.2.54".into()],
        searches: vec!["svc.e2e.test".into(), "e2e.test".into()],
        options: vec!["ndots:5".into(), "timeout:2".into()],
    });
    let pod_id = c.run_pod(&pod).await?;
    let id = start_running(
        env,
        &pod_id,
        &pod,
        &container_config("dns", BUSYBOX, &["sleep", "3600"]),
    )
    .await?;

    let resolv = c.exec_ok(&id, &["cat", "/etc/resolv.conf"]).await?;
    let lines: Vec<&str> = resolv.lines().map(str::trim).collect();
    for want in ["nameserver 192.0.2.53", "nameserver 192.0.2.54"] {
        ensure!(
            lines.contains(&want),
            "/etc/resolv.conf lacks {want:?}:\n{resolv}"
        );
    }
    let words = |prefix: &str| -> Vec<String> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(prefix))
            .flat_map(|r| r.split_whitespace().map(str::to_string))
            .collect()
    };
    ensure!(
        words("search ") == ["svc.e2e.test", "e2e.test"],
        "/etc/resolv.conf search domains {:?}, want [svc.e2e.test, e2e.test]:\n{resolv}",
        words("search ")
    );
    let opts = words("options ");
    for want in ["ndots:5", "timeout:2"] {
        ensure!(
            opts.iter().any(|o| o == want),
            "/etc/resolv.conf options {opts:?} lack {want}:\n{resolv}"
        );
    }

    let host = c.exec_ok(&id, &["hostname"]).await?;
    ensure!(
        host.trim() == "crisp-e2e-host",
        "hostname in the container is {host:?}, want the pod's crisp-e2e-host"
    );
    let etc = c.exec_ok(&id, &["cat", "/etc/hostname"]).await?;
    ensure!(
        etc.trim() == "crisp-e2e-host",
        "/etc/hostname is {etc:?}, want crisp-e2e-host"
    );
    let hosts = c.exec_ok(&id, &["cat", "/etc/hosts"]).await?;
    ensure!(
        hosts.contains("localhost"),
        "/etc/hosts has no localhost entry:\n{hosts}"
    );

    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

/// Host network (NamespaceMode NODE): no CNI, the container sees the host's interfaces
/// (the test's bridge among them).
async fn host_network(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    c.pull(BUSYBOX, None).await?;
    let mut pod = env.pod_config("hostnet")?;
    // kubelet sends no hostname for a host-network pod (the UTS namespace is the host's).
    pod.hostname.clear();
    pod.linux.get_or_insert_default().security_context = Some(api::LinuxSandboxSecurityContext {
        namespace_options: Some(api::NamespaceOption {
            network: api::NamespaceMode::Node as i32,
            pid: api::NamespaceMode::Container as i32,
            ipc: api::NamespaceMode::Pod as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    let pod_id = c.run_pod(&pod).await?;
    let id = start_running(
        env,
        &pod_id,
        &pod,
        &container_config("h", BUSYBOX, &["sleep", "3600"]),
    )
    .await?;
    let dev = c.exec_ok(&id, &["cat", "/proc/net/dev"]).await?;
    let bridge = &env.network().bridge;
    ensure!(
        dev.contains(&format!("{bridge}:")),
        "host-network container does not see the host's bridge {bridge}:\n{dev}"
    );
    let own = std::fs::read_link("/proc/self/ns/net")?;
    let pid = c.container_pid(&id).await?;
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net"))?;
    ensure!(
        own == theirs,
        "host-network container is in {theirs:?}, the host is in {own:?}"
    );
    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

macro_rules! per_runtime {
    ($($prefix:ident => $kind:expr),* $(,)?) => {$(
        mod $prefix {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pod_network() -> Result<()> {
                super::pod_network($kind).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pods_reach_each_other() -> Result<()> {
                with_env($kind, false, |e| Box::pin(super::pods_reach_each_other(e))).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn host_port() -> Result<()> {
                with_env($kind, true, |e| Box::pin(super::host_port(e))).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn host_network() -> Result<()> {
                with_env($kind, false, |e| Box::pin(super::host_network(e))).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dns_and_hostname() -> Result<()> {
                with_env($kind, false, |e| Box::pin(super::dns_and_hostname(e))).await
            }
        }
    )*};
}

per_runtime! {
    containerd => RuntimeKind::Containerd,
    crispd => RuntimeKind::Crispd,
}
