//! RunPodSandbox runs CNI ADD beside the shim's start and the pause's CreateSandbox +
//! StartSandbox (for pods without a user namespace). Either branch may fail while the other
//! succeeds; the undo must then release what both acquired:
//! - CNI ADD fails (a chained `tuning` plugin refuses after bridge + host-local attached the
//!   pod) while the shim and the pause start: no pod, shim, pause cgroup, netns, veth or IP
//!   allocation is left, twice in a row;
//! - the pause fails (runc cannot set a sysctl the kernel does not have) while CNI ADD
//!   attaches the pod: the same, and then a pod with a good config starts and gets an IP.
//!
//! crispd only: containerd runs its steps in line.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use crisp_e2e::cri;
use crisp_e2e::harness::{Idle, RuntimeKind, TestEnv};
use crisp_e2e::registry::Registry;

/// host-local's allocations: one file per address in use, named after it.
fn allocated_ips(ipam_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(nets) = std::fs::read_dir(ipam_dir) else {
        return out;
    };
    for net in nets.flatten() {
        let Ok(files) = std::fs::read_dir(net.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.parse::<std::net::IpAddr>().is_ok() {
                out.push(name);
            }
        }
    }
    out
}

/// Veths attached to the env's bridge (a pod's host side that CNI DEL did not remove).
fn bridge_ports(env: &TestEnv) -> Vec<String> {
    let brif = Path::new("/sys/class/net")
        .join(&env.network().bridge)
        .join("brif");
    std::fs::read_dir(brif)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// RunPodSandbox must fail with a message naming `needle`, retrying while the daemon has not
/// loaded the conflist yet (FailedPrecondition).
async fn run_pod_fails(
    env: &TestEnv,
    name: &str,
    sysctl: Option<&str>,
    needle: &str,
) -> Result<()> {
    let mut cfg = env.pod_config(name)?;
    if let Some(key) = sysctl {
        let linux = cfg.linux.get_or_insert_with(Default::default);
        linux.sysctls.insert(key.to_string(), "1".to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match env.cri().run_pod(&cfg).await {
            Ok(id) => bail!("pod {id} started although its set-up must fail"),
            Err(e)
                if cri::grpc_code(&e) == Some(tonic::Code::FailedPrecondition)
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => break e,
        }
    };
    let msg = format!("{err:#}");
    ensure!(
        msg.contains(needle),
        "{name}: error does not name {needle:?}: {msg}"
    );
    Ok(())
}

/// Nothing of a failed pod is left.
async fn nothing_left(env: &TestEnv, baseline: &Idle, what: &str) -> Result<()> {
    ensure!(
        env.cri().list_pods().await?.is_empty(),
        "{what}: a pod record is left"
    );
    let left = env.idle_leftovers(baseline);
    ensure!(left.is_empty(), "{what}: left {left:?}");
    let ips = allocated_ips(&env.cni_ipam_dir());
    ensure!(ips.is_empty(), "{what}: IPs still allocated: {ips:?}");
    let ports = bridge_ports(env);
    ensure!(
        ports.is_empty(),
        "{what}: veths still on the bridge: {ports:?}"
    );
    Ok(())
}

fn install_conflist(env: &TestEnv, extra: &[serde_json::Value]) -> Result<()> {
    let conflist = env.network().conflist_with(&env.cni_ipam_dir(), extra);
    let tmp = env.root.join(".conflist.tmp");
    std::fs::write(&tmp, conflist)?;
    std::fs::rename(&tmp, env.cni_conf_dir.join("10-crisp-e2e.conflist"))?;
    Ok(())
}

async fn cni_fails(env: &TestEnv, baseline: &Idle) -> Result<()> {
    // bridge + host-local succeed, then tuning fails on a sysctl that does not exist.
    let tuning = serde_json::json!({
        "type": "tuning",
        "sysctl": { "net.ipv4.conf.eth0.crisp_no_such_sysctl": "1" },
    });
    install_conflist(env, &[tuning])?;
    for attempt in 0..2 {
        run_pod_fails(env, &format!("cni-fails-{attempt}"), None, "tuning").await?;
        nothing_left(env, baseline, &format!("failed CNI ADD, attempt {attempt}")).await?;
    }
    Ok(())
}

/// A good pod, once the daemon has loaded the conflist now in place (it watches the directory).
async fn good_pod(env: &TestEnv, name: &str) -> Result<String> {
    let cfg = env.pod_config(name)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match env.cri().run_pod(&cfg).await {
            Ok(id) => return Ok(id),
            Err(e) if Instant::now() < deadline => {
                eprintln!("{name}: not yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => return Err(e),
        }
    }
}

async fn pause_fails(env: &TestEnv, baseline: &Idle) -> Result<()> {
    install_conflist(env, &[])?;
    // The conflist without tuning is in use once a good pod starts.
    let first = good_pod(env, "conflist-loaded").await?;
    env.cri().stop_and_remove_pod(&first).await?;
    nothing_left(env, baseline, "the first good pod, removed").await?;
    // Passes crispd's checks (a namespaced net.* sysctl); runc cannot write it.
    let bad = "net.ipv4.conf.all.crisp_pause_no_such_sysctl";
    for attempt in 0..2 {
        let name = format!("pause-fails-{attempt}");
        run_pod_fails(env, &name, Some(bad), "crisp_pause_no_such_sysctl").await?;
        nothing_left(env, baseline, &format!("failed pause, attempt {attempt}")).await?;
    }
    let id = good_pod(env, "after-failures").await?;
    let ip = env.cri().pod_ip(&id).await?;
    ensure!(
        allocated_ips(&env.cni_ipam_dir()) == vec![ip.to_string()],
        "the good pod's IP {ip} is the only allocation: {:?}",
        allocated_ips(&env.cni_ipam_dir())
    );
    env.cri().stop_and_remove_pod(&id).await?;
    nothing_left(env, baseline, "the good pod, removed").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crispd_failed_branch_of_pod_setup_undoes_both() -> Result<()> {
    let registry = Registry::start()?;
    registry.push(&["pause"])?;
    let env = TestEnv::builder(RuntimeKind::Crispd)
        .mirror(registry.host())
        .without_cni_config()
        .start()
        .await?;
    let baseline = env.idle_baseline();
    let outcome = async {
        cni_fails(&env, &baseline).await?;
        pause_fails(&env, &baseline).await
    }
    .await;
    if outcome.is_err() {
        eprintln!("crispd log tail:\n{}", env.daemon_log_tail(80));
    }
    let leaks = env.teardown().await;
    outcome?;
    ensure!(leaks.is_empty(), "teardown left {leaks:#?}");
    Ok(())
}
