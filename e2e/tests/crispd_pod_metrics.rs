//! Pod metrics without cAdvisor, end to end through the CRI (real runc, real cgroups, the
//! test's own bridge network): for a running pod with two containers,
//!
//! - every family ListMetricDescriptors lists appears in ListPodSandboxMetrics (in the pod's
//!   metrics or a container's), each sample's label values line up with its descriptor's
//!   keys, and the labels name the pod, its namespace and the container;
//! - the values move when a container burns CPU (cpu seconds), allocates memory (usage,
//!   working set, rss, processes) and writes to its writable layer (fs usage), and when the
//!   host sends TCP traffic into the pod (eth0 bytes and packets received and sent);
//! - StreamPodSandboxMetrics carries the same pods.
//!
//! Each container waits for a trigger file before it works, so the first sample is taken
//! before and the second after, and nothing depends on timing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use crisp_e2e::cri::container_config;
use crisp_e2e::harness::{TestEnv, with_crispd};
use crisp_proto::cri::v1 as api;
use tokio::io::AsyncWriteExt;

const BUSYBOX: &str = "docker.io/library/busybox:latest";
const MIB: u64 = 1024 * 1024;

/// One sample's labels by key, and its value.
#[derive(Debug, Clone)]
struct Sample {
    labels: HashMap<String, String>,
    value: u64,
}

/// name → samples of our pod (pod-level and every container's), keyed by the container
/// label.
type Samples = HashMap<String, Vec<Sample>>;

async fn descriptors(env: &TestEnv) -> Result<HashMap<String, Vec<String>>> {
    let d = env
        .cri()
        .runtime()
        .list_metric_descriptors(api::ListMetricDescriptorsRequest {})
        .await
        .context("ListMetricDescriptors")?
        .into_inner()
        .descriptors;
    ensure!(!d.is_empty(), "ListMetricDescriptors lists nothing");
    Ok(d.into_iter().map(|d| (d.name, d.label_keys)).collect())
}

fn collect(
    keys: &HashMap<String, Vec<String>>,
    metrics: &[api::Metric],
    out: &mut Samples,
) -> Result<()> {
    for m in metrics {
        let k = keys
            .get(&m.name)
            .with_context(|| format!("metric {} has no descriptor", m.name))?;
        ensure!(
            k.len() == m.label_values.len(),
            "{}: {} label keys, {} values",
            m.name,
            k.len(),
            m.label_values.len()
        );
        let labels = k
            .iter()
            .cloned()
            .zip(m.label_values.iter().cloned())
            .collect();
        let value = m.value.as_ref().map(|v| v.value).context("no value")?;
        out.entry(m.name.clone())
            .or_default()
            .push(Sample { labels, value });
    }
    Ok(())
}

async fn pod_samples(
    env: &TestEnv,
    keys: &HashMap<String, Vec<String>>,
    pod_id: &str,
) -> Result<Samples> {
    let all = env
        .cri()
        .runtime()
        .list_pod_sandbox_metrics(api::ListPodSandboxMetricsRequest {})
        .await
        .context("ListPodSandboxMetrics")?
        .into_inner()
        .pod_metrics;
    let pm = all
        .iter()
        .find(|p| p.pod_sandbox_id == pod_id)
        .with_context(|| format!("pod {pod_id} not in ListPodSandboxMetrics"))?;
    let mut out = Samples::new();
    collect(keys, &pm.metrics, &mut out)?;
    for cm in &pm.container_metrics {
        collect(keys, &cm.metrics, &mut out)?;
    }
    Ok(out)
}

/// The value of family `name` for container `container` (or "POD"), with `extra` labels.
fn value(s: &Samples, name: &str, container: &str, extra: &[(&str, &str)]) -> Result<u64> {
    s.get(name)
        .into_iter()
        .flatten()
        .find(|x| {
            x.labels.get("container").map(String::as_str) == Some(container)
                && extra
                    .iter()
                    .all(|(k, v)| x.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|x| x.value)
        .with_context(|| format!("no {name} sample for {container} {extra:?}"))
}

/// Sends `n` bytes to the pod's `nc` listener from the host, retrying until it listens.
async fn send_to_pod(ip: std::net::IpAddr, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::net::TcpStream::connect((ip, 8080)).await {
            Ok(mut s) => {
                s.write_all(&vec![b'x'; n])
                    .await
                    .context("writing to the pod")?;
                s.shutdown().await.context("closing")?;
                return Ok(());
            }
            Err(e) if Instant::now() > deadline => bail!("connecting to {ip}:8080: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn metrics(env: &TestEnv) -> Result<()> {
    let c = env.cri();
    let pod = env.pod_config("metrics")?;
    let pod_id = c.run_pod(&pod).await?;
    let meta = pod.metadata.clone().context("metadata")?;
    // burner: listens on 8080 from the start, spins a CPU once triggered.
    let burner = container_config(
        "burner",
        BUSYBOX,
        &[
            "sh",
            "-c",
            "nc -l -p 8080 >/dev/null & while [ ! -e /go ]; do sleep 0.2; done; while :; do :; done",
        ],
    );
    // holder: once triggered, holds 32 MiB (dd's buffer, stuck on a pipe nobody reads).
    let holder = container_config(
        "holder",
        BUSYBOX,
        &[
            "sh",
            "-c",
            "while [ ! -e /go ]; do sleep 0.2; done; \
             dd if=/dev/zero bs=32M count=1 2>/dev/null | sleep 3600",
        ],
    );
    let burner_id = c.run_container(&pod_id, &burner, &pod).await?;
    let holder_id = c.run_container(&pod_id, &holder, &pod).await?;
    let keys = descriptors(env).await?;

    let before = pod_samples(env, &keys, &pod_id).await?;
    for name in keys.keys() {
        ensure!(
            before.contains_key(name),
            "{name} is described but not in ListPodSandboxMetrics: {:?}",
            before.keys().collect::<Vec<_>>()
        );
    }
    for (name, samples) in &before {
        for s in samples {
            ensure!(
                s.labels.get("pod") == Some(&meta.name)
                    && s.labels.get("namespace") == Some(&meta.namespace),
                "{name}: labels {:?} do not name the pod",
                s.labels
            );
        }
    }
    let st = c.container_status(&burner_id).await?;
    ensure!(
        value(&before, "container_start_time_seconds", "burner", &[])?
            == (st.started_at / 1_000_000_000) as u64,
        "start time differs from ContainerStatus.started_at {}",
        st.started_at
    );
    let id_label = &before["container_memory_usage_bytes"]
        .iter()
        .find(|s| s.labels.get("container").map(String::as_str) == Some("holder"))
        .context("holder memory sample")?
        .labels;
    ensure!(
        id_label.get("name") == Some(&holder_id)
            && id_label.get("id").is_some_and(|i| i.ends_with(&holder_id)),
        "holder's name/id labels: {id_label:?}"
    );

    // Work: trigger both, write 4 MiB into the writable layer, send 256 KiB into the pod.
    c.exec_ok(&burner_id, &["touch", "/go"]).await?;
    c.exec_ok(&holder_id, &["touch", "/go"]).await?;
    c.exec_ok(
        &holder_id,
        &["dd", "if=/dev/zero", "of=/filler", "bs=1M", "count=4"],
    )
    .await?;
    let ip = c.pod_ip(&pod_id).await?;
    send_to_pod(ip, 256 * 1024).await?;

    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let after = pod_samples(env, &keys, &pod_id).await?;
        match moved(&before, &after) {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => return Err(e.context("after 40 s")),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }

    // The stream carries the same pod.
    let mut stream = c
        .runtime()
        .stream_pod_sandbox_metrics(api::StreamPodSandboxMetricsRequest {})
        .await
        .context("StreamPodSandboxMetrics")?
        .into_inner();
    let mut ids = Vec::new();
    while let Some(msg) = stream.message().await.context("stream")? {
        ids.extend(
            msg.pod_sandbox_metrics
                .into_iter()
                .map(|p| p.pod_sandbox_id),
        );
    }
    ensure!(ids == vec![pod_id.clone()], "streamed pods {ids:?}");

    c.stop_and_remove_pod(&pod_id).await?;
    Ok(())
}

/// What the work must have moved between two samples.
fn moved(before: &Samples, after: &Samples) -> Result<()> {
    let up = |name: &str, ctr: &str, extra: &[(&str, &str)], by: u64| -> Result<()> {
        let (a, b) = (
            value(before, name, ctr, extra)?,
            value(after, name, ctr, extra)?,
        );
        ensure!(
            b >= a + by,
            "{name}{{container={ctr}}} went {a} → {b}, want +{by}"
        );
        Ok(())
    };
    up(
        "container_cpu_usage_seconds_total",
        "burner",
        &[("cpu", "total")],
        2,
    )?;
    up("container_memory_usage_bytes", "holder", &[], 24 * MIB)?;
    up(
        "container_memory_working_set_bytes",
        "holder",
        &[],
        24 * MIB,
    )?;
    up("container_memory_rss", "holder", &[], 24 * MIB)?;
    up("container_processes", "holder", &[], 1)?;
    up("container_fs_usage_bytes", "holder", &[], 4 * MIB)?;
    let eth0 = [("interface", "eth0")];
    up(
        "container_network_receive_bytes_total",
        "POD",
        &eth0,
        256 * 1024,
    )?;
    up("container_network_receive_packets_total", "POD", &eth0, 4)?;
    up("container_network_transmit_packets_total", "POD", &eth0, 1)?;
    up("container_network_transmit_bytes_total", "POD", &eth0, 1)?;
    Ok(())
}

mod crispd {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pod_metrics() -> Result<()> {
        with_crispd("pod_metrics", |_| Ok(()), |e| Box::pin(super::metrics(e))).await
    }
}
