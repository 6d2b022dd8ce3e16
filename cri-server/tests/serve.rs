//! Start the real `crispd` binary with the e2e harness's flags in a temp dir and talk CRI to
//! it over its unix socket: Version, Status (NetworkReady flips when a conflist appears, with
//! no restart), RuntimeConfig, an Unimplemented call with a message.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crisp_proto::cri::v1 as pb;
use crisp_proto::cri::v1::runtime_service_client::RuntimeServiceClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Kills crispd when the test ends, pass or fail (by its own PID only).
struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    /// Graceful stop (SIGTERM), as a node would: a crispd that ran a pod then unmounts its
    /// netns directory, which a SIGKILL in Drop would leave behind. Async, so this test's own
    /// client connections can answer crispd's GOAWAY meanwhile.
    async fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.0.try_wait(), Ok(None)) {
            assert!(Instant::now() < deadline, "crispd did not exit on SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn connect(sock: &Path) -> anyhow::Result<Channel> {
    let sock = sock.to_path_buf();
    let ch = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(sock).await?))
            }
        }))
        .await?;
    Ok(ch)
}

fn start(dir: &Path, cni_dir: &Path) -> (Daemon, PathBuf) {
    let sock = dir.join("crisp.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_crispd"))
        .args(["--root", &dir.join("root").display().to_string()])
        .args(["--state", &dir.join("state").display().to_string()])
        .args(["--listen", &sock.display().to_string()])
        .args(["--cni-conf-dir", &cni_dir.display().to_string()])
        .args(["--cni-bin-dir", "/usr/lib/cni"])
        .args([
            "--registry-config-dir",
            &dir.join("hosts").display().to_string(),
        ])
        .args([
            "--runtime",
            "runc",
            "--cgroup-driver",
            "cgroupfs",
            "--log-level",
            "debug",
        ])
        // No config file on this machine should leak into the test.
        .args(["--config", &write_empty_config(dir).display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn crispd");
    (Daemon(child), sock)
}

fn write_empty_config(dir: &Path) -> PathBuf {
    let p = dir.join("config.toml");
    // Metrics off: parallel tests must not fight over a port.
    // A handler whose binary does not exist: must not stop start-up (promise 4). The shim is
    // the one built beside crispd when there is one; otherwise any existing binary stands in,
    // since these tests never get as far as starting a shim.
    let shim = std::path::Path::new(env!("CARGO_BIN_EXE_crispd"))
        .with_file_name("containerd-shim-crisp-v2");
    let shim = if shim.is_file() {
        shim
    } else {
        PathBuf::from("/bin/true")
    };
    std::fs::write(
        &p,
        format!(
            "shim_binary = \"{}\"\n[metrics]\naddress = \"\"\n[runtime_handlers.ghost]\nbinary = \"/nonexistent/ghost-runtime\"\n",
            shim.display()
        ),
    )
    .expect("write config");
    p
}

async fn wait_for_socket(sock: &Path, d: &mut Daemon) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = d.0.try_wait() {
            panic!("crispd exited early: {status}");
        }
        if sock.exists()
            && let Ok(ch) = connect(sock).await
        {
            return ch;
        }
        assert!(Instant::now() < deadline, "crispd did not start serving");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn network_ready(s: &pb::StatusResponse) -> Option<pb::RuntimeCondition> {
    s.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == "NetworkReady")
        .cloned()
}

#[tokio::test]
async fn serves_version_status_and_picks_up_cni_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cni_dir = dir.path().join("net.d");
    std::fs::create_dir_all(&cni_dir).expect("mkdir");
    let (mut d, sock) = start(dir.path(), &cni_dir);
    let mut c = RuntimeServiceClient::new(wait_for_socket(&sock, &mut d).await);

    let v = c
        .version(pb::VersionRequest::default())
        .await
        .expect("Version")
        .into_inner();
    assert_eq!(v.runtime_name, "crisp");
    assert_eq!(v.runtime_api_version, "v1");

    let s = c
        .status(pb::StatusRequest { verbose: true })
        .await
        .expect("Status")
        .into_inner();
    let conds = s.status.clone().expect("status").conditions;
    assert!(
        conds.iter().any(|c| c.r#type == "RuntimeReady" && c.status),
        "{conds:?}"
    );
    let net = network_ready(&s).expect("NetworkReady present");
    assert!(!net.status);
    assert_eq!(net.reason, "NetworkPluginNotReady");
    assert!(net.message.contains("net.d"), "{}", net.message);

    let rc = c
        .runtime_config(pb::RuntimeConfigRequest {})
        .await
        .expect("RuntimeConfig");
    assert_eq!(
        rc.into_inner().linux.map(|l| l.cgroup_driver),
        Some(pb::CgroupDriver::Cgroupfs as i32)
    );

    // Written after start-up: must be picked up without a restart, within 5 s.
    std::fs::write(
        cni_dir.join("10-test.conflist"),
        r#"{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"loopback"}]}"#,
    )
    .expect("write conflist");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = c
            .status(pb::StatusRequest::default())
            .await
            .expect("Status")
            .into_inner();
        if network_ready(&s).is_some_and(|n| n.status) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "NetworkReady did not flip within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let e = c
        .checkpoint_container(pb::CheckpointContainerRequest::default())
        .await
        .expect_err("checkpointing is not supported");
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    // The message says why: criu cannot run on this kernel.
    assert!(e.message().contains("criu check"), "{}", e.message());

    // The event stream opens (and stays open: nothing happens on an idle node).
    let mut events = c
        .get_container_events(pb::GetEventsRequest {})
        .await
        .expect("GetContainerEvents")
        .into_inner();
    let next = tokio::time::timeout(Duration::from_millis(200), events.message()).await;
    assert!(
        next.is_err(),
        "no events on an idle node, and the stream is not closed"
    );

    // Unknown ids: NotFound, except stops and removals, which CRI makes idempotent.
    c.stop_container(pb::StopContainerRequest {
        container_id: "nope".into(),
        timeout: 0,
    })
    .await
    .expect("stopping a missing container is OK");
    c.stop_pod_sandbox(pb::StopPodSandboxRequest {
        pod_sandbox_id: "nope".into(),
    })
    .await
    .expect("stopping a missing pod is OK");
    c.remove_container(pb::RemoveContainerRequest {
        container_id: "nope".into(),
    })
    .await
    .expect("removing a missing container is OK");
    c.remove_pod_sandbox(pb::RemovePodSandboxRequest {
        pod_sandbox_id: "nope".into(),
    })
    .await
    .expect("removing a missing pod is OK");
    let e = c
        .pod_sandbox_status(pb::PodSandboxStatusRequest {
            pod_sandbox_id: "nope".into(),
            verbose: false,
        })
        .await
        .expect_err("unknown pod");
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c
        .create_container(pb::CreateContainerRequest {
            pod_sandbox_id: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown pod");
    assert_eq!(e.code(), tonic::Code::NotFound);
}

#[test]
fn config_default_prints_parseable_toml() {
    let out = Command::new(env!("CARGO_BIN_EXE_crispd"))
        .args(["config", "default"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf8");
    assert!(text.contains("root = \"/var/lib/crisp\""), "{text}");
    assert!(text.contains("[cni]"), "{text}");
}

#[test]
fn bad_config_names_key_and_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("c.toml");
    std::fs::write(&p, "cgroup_driver = \"cgroupfs\"\nroot = \"relative\"\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_crispd"))
        .args(["--config", &p.display().to_string()])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`root`") && err.contains("relative"), "{err}");
}

/// The ImageService wraps crisp-image: pull an upstream name through a `_default` mirror to a
/// local registry, list, status, remove.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_lists_and_removes_images_through_a_mirror() {
    use crisp_proto::cri::v1::image_service_client::ImageServiceClient;
    // Missing pieces fail the test by name (`make test` installs and builds them).
    let reg = crisp_e2e::registry::Registry::start()
        .unwrap_or_else(|e| panic!("needs Debian's docker-registry: {e:#}"));
    reg.push(&["busybox"])
        .unwrap_or_else(|e| panic!("needs the test images (make test-images): {e:#}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let mirror = dir.path().join("hosts/_default");
    std::fs::create_dir_all(&mirror).expect("mkdir");
    std::fs::write(
        mirror.join("hosts.toml"),
        format!(
            "[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            reg.host()
        ),
    )
    .expect("hosts.toml");
    let cni_dir = dir.path().join("net.d");
    let (mut d, sock) = start(dir.path(), &cni_dir);
    let mut c = ImageServiceClient::new(wait_for_socket(&sock, &mut d).await);
    let spec = |name: &str| {
        Some(pb::ImageSpec {
            image: name.into(),
            ..Default::default()
        })
    };

    let pulled = c
        .pull_image(pb::PullImageRequest {
            image: spec("busybox"),
            ..Default::default()
        })
        .await
        .expect("PullImage")
        .into_inner();
    assert!(
        pulled.image_ref.starts_with("sha256:"),
        "{}",
        pulled.image_ref
    );

    let list = c
        .list_images(pb::ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner();
    assert_eq!(list.images.len(), 1);
    assert!(
        list.images[0]
            .repo_tags
            .iter()
            .any(|t| t == "docker.io/library/busybox:latest"),
        "{:?}",
        list.images[0].repo_tags
    );

    let st = c
        .image_status(pb::ImageStatusRequest {
            image: spec("busybox"),
            verbose: true,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    assert_eq!(st.image.map(|i| i.id), Some(pulled.image_ref.clone()));
    assert!(st.info.contains_key("info"));

    let fs = c
        .image_fs_info(pb::ImageFsInfoRequest {})
        .await
        .expect("ImageFsInfo")
        .into_inner();
    assert!(!fs.image_filesystems.is_empty());

    c.remove_image(pb::RemoveImageRequest {
        image: spec("busybox"),
    })
    .await
    .expect("RemoveImage");
    c.remove_image(pb::RemoveImageRequest {
        image: spec("busybox"),
    })
    .await
    .expect("RemoveImage of a missing image is OK");
    let st = c
        .image_status(pb::ImageStatusRequest {
            image: spec("busybox"),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    assert!(st.image.is_none());
    let e = c
        .pull_image(pb::PullImageRequest {
            image: spec(""),
            ..Default::default()
        })
        .await
        .expect_err("empty name");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

/// SIGTERM: crispd stops serving, exits 0 and leaves neither its socket nor a mount behind.
#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cni_dir = dir.path().join("net.d");
    let (mut d, sock) = start(dir.path(), &cni_dir);
    let ch = wait_for_socket(&sock, &mut d).await;
    // An open event stream (kubelet keeps one) must not hold up shutdown.
    let mut c = RuntimeServiceClient::new(ch);
    let _events = c
        .get_container_events(pb::GetEventsRequest {})
        .await
        .expect("GetContainerEvents")
        .into_inner();
    let pid = nix::unistd::Pid::from_raw(d.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = d.0.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "crispd did not exit on SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    assert!(!sock.exists(), "socket removed");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&dir.path().display().to_string()),
        "no mount left under the test dir"
    );
}

/// Start-up order (promise 4): empty CNI dir and a handler whose binary is missing. crispd
/// serves; RunPodSandbox names what is missing; a conflist written later is picked up within
/// 5 s without a restart and then the network check passes.
#[tokio::test]
async fn missing_things_are_named_and_picked_up_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cni_dir = dir.path().join("net.d");
    std::fs::create_dir_all(&cni_dir).expect("mkdir");
    let (mut d, sock) = start(dir.path(), &cni_dir);
    let mut c = RuntimeServiceClient::new(wait_for_socket(&sock, &mut d).await);
    let pod = |handler: &str| pb::RunPodSandboxRequest {
        config: Some(pb::PodSandboxConfig {
            metadata: Some(pb::PodSandboxMetadata {
                name: "p".into(),
                uid: "u".into(),
                namespace: "ns".into(),
                attempt: 0,
            }),
            ..Default::default()
        }),
        runtime_handler: handler.into(),
    };
    let s = c
        .status(pb::StatusRequest::default())
        .await
        .expect("Status")
        .into_inner();
    let conds = s.status.clone().expect("status").conditions;
    assert!(conds.iter().any(|c| c.r#type == "RuntimeReady" && c.status));
    assert!(network_ready(&s).is_some_and(|n| !n.status));

    let e = c
        .run_pod_sandbox(pod("ghost"))
        .await
        .expect_err("ghost handler");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("runtime_handlers.ghost.binary"),
        "{}",
        e.message()
    );
    let e = c
        .run_pod_sandbox(pod("runc"))
        .await
        .expect_err("no network");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("net.d"), "{}", e.message());

    std::fs::write(
        cni_dir.join("10-test.conflist"),
        r#"{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"loopback"}]}"#,
    )
    .expect("write conflist");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match c.run_pod_sandbox(pod("runc")).await {
            Ok(r) => {
                // Past every check, the pod runs: take it down again so nothing is left.
                let id = r.into_inner().pod_sandbox_id;
                c.stop_pod_sandbox(pb::StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await
                .expect("StopPodSandbox");
                c.remove_pod_sandbox(pb::RemovePodSandboxRequest { pod_sandbox_id: id })
                    .await
                    .expect("RemovePodSandbox");
                break;
            }
            Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                assert!(e.message().contains("net.d"), "{}", e.message());
                assert!(
                    Instant::now() < deadline,
                    "CNI config not picked up within 5 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("RunPodSandbox after the conflist appeared: {e:?}"),
        }
    }
    d.stop().await;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&dir.path().display().to_string()),
        "crispd left a mount under {}",
        dir.path().display()
    );
}

/// Recovery: a torn pod record is quarantined and never blocks start-up, an orphaned ID range
/// is released, good records are served, and a `kill -9`ed crispd restarts on the same root.
#[tokio::test]
async fn recovers_after_kill_and_quarantines_torn_records() {
    use crisp_cri::store::records::{IdRangeRecord, PodRecord, PodState};
    use crisp_cri::store::{PODS, QUARANTINE, Store};
    let dir = tempfile::tempdir().expect("tempdir");
    let cni_dir = dir.path().join("net.d");
    let db = dir.path().join("root/crisp.db");
    {
        let s = Store::open(&db).expect("store");
        let good = PodRecord {
            id: "good".into(),
            name: "g".into(),
            namespace: "ns".into(),
            uid: "u".into(),
            attempt: 0,
            state: PodState::NotReady,
            created_at: 1,
            runtime_handler: String::new(),
            config_pb: String::new(),
            netns_path: None,
            ips: vec![],
            shim_address: None,
            pause_pid: None,
            cgroup_parent: String::new(),
            owned: None,
        };
        s.put("good", &good).expect("put");
        s.put(
            "gone",
            &IdRangeRecord {
                host_uid: 1,
                host_gid: 1,
                len: 65536,
            },
        )
        .expect("put");
        // A record torn mid-write, written through redb itself.
        s.write(|txn| {
            let mut t = txn
                .open_table(PODS)
                .map_err(crisp_cri::store::StoreError::from)?;
            t.insert("torn", &b"{\"version\":1,\"rec"[..])
                .map_err(crisp_cri::store::StoreError::from)?;
            Ok::<_, crisp_cri::store::StoreError>(())
        })
        .expect("raw write");
    }
    for round in 0..2 {
        let (mut d, sock) = start(dir.path(), &cni_dir);
        let mut c = RuntimeServiceClient::new(wait_for_socket(&sock, &mut d).await);
        let pods = c
            .list_pod_sandbox(pb::ListPodSandboxRequest::default())
            .await
            .expect("ListPodSandbox")
            .into_inner();
        let ids: Vec<_> = pods.items.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, vec!["good"], "round {round}");
        // kill -9 (Drop sends SIGKILL), then look at the store it left.
        drop(c);
        drop(d);
        let s = Store::open(&db).expect("reopen");
        let q: Vec<_> = s
            .list_raw(QUARANTINE)
            .expect("q")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(q, vec!["pods/torn"]);
        assert!(
            s.get::<IdRangeRecord>("gone").expect("get").is_none(),
            "orphan range released"
        );
    }
}
