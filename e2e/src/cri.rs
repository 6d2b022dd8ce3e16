//! A CRI v1 client over a unix socket, and the small helpers tests share: unique pod and
//! container configs, waiting for a container to exit, and reading CRI log files.
//!
//! Nothing here knows which runtime answers the socket: the same calls drive containerd and
//! crispd.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cri::image_service_client::ImageServiceClient;
use cri::runtime_service_client::RuntimeServiceClient;
use crisp_proto::cri::v1 as cri;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// A connected CRI client. Cloning the inner clients is cheap (they share one channel).
#[derive(Clone)]
pub struct CriClient {
    socket: PathBuf,
    runtime: RuntimeServiceClient<Channel>,
    image: ImageServiceClient<Channel>,
}

impl CriClient {
    /// Connects to the CRI socket. The channel is lazy about nothing: this fails if nobody
    /// listens yet, which the harness uses to wait for a daemon.
    pub async fn connect(socket: &Path) -> Result<Self> {
        let path = socket.to_path_buf();
        // The URI is required by tonic but never used: every connection goes to the socket.
        let channel =
            Endpoint::try_from("http://[::]:50051")?
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .with_context(|| format!("connecting to CRI socket {}", socket.display()))?;
        Ok(Self {
            socket: socket.to_path_buf(),
            runtime: RuntimeServiceClient::new(channel.clone()),
            image: ImageServiceClient::new(channel),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The RuntimeService client (pods, containers, status).
    pub fn runtime(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    /// The ImageService client (pull, list, remove).
    pub fn image(&self) -> ImageServiceClient<Channel> {
        self.image.clone()
    }

    /// `Version`, which every CRI runtime answers as soon as it serves.
    pub async fn version(&self) -> Result<cri::VersionResponse> {
        Ok(self
            .runtime()
            .version(cri::VersionRequest {
                version: "v1".into(),
            })
            .await
            .context("CRI Version")?
            .into_inner())
    }

    /// Pulls `image` and returns the image reference the runtime reports.
    pub async fn pull(
        &self,
        image: &str,
        sandbox: Option<&cri::PodSandboxConfig>,
    ) -> Result<String> {
        let resp = self
            .image()
            .pull_image(cri::PullImageRequest {
                image: Some(image_spec(image)),
                auth: None,
                sandbox_config: sandbox.cloned(),
            })
            .await
            .with_context(|| format!("PullImage {image}"))?;
        Ok(resp.into_inner().image_ref)
    }

    /// `ImageStatus`; `None` when the runtime does not have the image.
    pub async fn image_status(&self, image: &str) -> Result<Option<cri::Image>> {
        let resp = self
            .image()
            .image_status(cri::ImageStatusRequest {
                image: Some(image_spec(image)),
                verbose: false,
            })
            .await
            .with_context(|| format!("ImageStatus {image}"))?;
        Ok(resp.into_inner().image)
    }

    pub async fn remove_image(&self, image: &str) -> Result<()> {
        self.image()
            .remove_image(cri::RemoveImageRequest {
                image: Some(image_spec(image)),
            })
            .await
            .with_context(|| format!("RemoveImage {image}"))?;
        Ok(())
    }

    /// RunPodSandbox; returns the sandbox id.
    pub async fn run_pod(&self, config: &cri::PodSandboxConfig) -> Result<String> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.as_str())
            .unwrap_or("");
        let resp = self
            .runtime()
            .run_pod_sandbox(req::run_pod(config, ""))
            .await
            .with_context(|| format!("RunPodSandbox {name}"))?;
        Ok(resp.into_inner().pod_sandbox_id)
    }

    pub async fn pod_status(&self, pod_id: &str) -> Result<cri::PodSandboxStatus> {
        self.runtime()
            .pod_sandbox_status(req::pod_status(pod_id))
            .await
            .with_context(|| format!("PodSandboxStatus {pod_id}"))?
            .into_inner()
            .status
            .with_context(|| format!("PodSandboxStatus {pod_id}: response has no status"))
    }

    /// The pod's primary IP from PodSandboxStatus.
    pub async fn pod_ip(&self, pod_id: &str) -> Result<std::net::IpAddr> {
        let st = self.pod_status(pod_id).await?;
        let ip = st.network.map(|n| n.ip).unwrap_or_default();
        ip.parse()
            .with_context(|| format!("pod {pod_id} has no usable IP (got {ip:?})"))
    }

    pub async fn stop_pod(&self, pod_id: &str) -> Result<()> {
        self.runtime()
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod_id.into(),
            })
            .await
            .with_context(|| format!("StopPodSandbox {pod_id}"))?;
        Ok(())
    }

    pub async fn remove_pod(&self, pod_id: &str) -> Result<()> {
        self.runtime()
            .remove_pod_sandbox(req::remove_pod(pod_id))
            .await
            .with_context(|| format!("RemovePodSandbox {pod_id}"))?;
        Ok(())
    }

    /// CreateContainer in `pod_id`; returns the container id.
    pub async fn create_container(
        &self,
        pod_id: &str,
        config: &cri::ContainerConfig,
        pod_config: &cri::PodSandboxConfig,
    ) -> Result<String> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.as_str())
            .unwrap_or("");
        let resp = self
            .runtime()
            .create_container(req::create_container(pod_id, config, pod_config))
            .await
            .with_context(|| format!("CreateContainer {name} in pod {pod_id}"))?;
        Ok(resp.into_inner().container_id)
    }

    pub async fn start_container(&self, id: &str) -> Result<()> {
        self.runtime()
            .start_container(req::start_container(id))
            .await
            .with_context(|| format!("StartContainer {id}"))?;
        Ok(())
    }

    /// CreateContainer then StartContainer; returns the container id.
    pub async fn run_container(
        &self,
        pod_id: &str,
        config: &cri::ContainerConfig,
        pod_config: &cri::PodSandboxConfig,
    ) -> Result<String> {
        let id = self.create_container(pod_id, config, pod_config).await?;
        self.start_container(&id).await?;
        Ok(id)
    }

    /// StopPodSandbox then RemovePodSandbox: the end of most tests' pods.
    pub async fn stop_and_remove_pod(&self, pod_id: &str) -> Result<()> {
        self.stop_pod(pod_id).await?;
        self.remove_pod(pod_id).await
    }

    pub async fn remove_container(&self, id: &str) -> Result<()> {
        self.runtime()
            .remove_container(req::remove_container(id))
            .await
            .with_context(|| format!("RemoveContainer {id}"))?;
        Ok(())
    }

    pub async fn container_status(&self, id: &str) -> Result<cri::ContainerStatus> {
        self.runtime()
            .container_status(req::container_status(id))
            .await
            .with_context(|| format!("ContainerStatus {id}"))?
            .into_inner()
            .status
            .with_context(|| format!("ContainerStatus {id}: response has no status"))
    }

    /// Polls ContainerStatus until the container is EXITED, or fails after `timeout` with the
    /// last state seen.
    pub async fn wait_container_exit(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<cri::ContainerStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.container_status(id).await?;
            if status.state == cri::ContainerState::ContainerExited as i32 {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "container {id} did not exit within {timeout:?}; last state {:?}",
                    cri::ContainerState::try_from(status.state)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// RunPodSandbox with a runtime handler (`""` is the default one); returns the sandbox id.
    pub async fn run_pod_with_handler(
        &self,
        config: &cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String> {
        let resp = self
            .runtime()
            .run_pod_sandbox(req::run_pod(config, handler))
            .await
            .with_context(|| format!("RunPodSandbox with handler {handler:?}"))?;
        Ok(resp.into_inner().pod_sandbox_id)
    }

    /// StopContainer with `timeout` seconds before SIGKILL.
    pub async fn stop_container(&self, id: &str, timeout: i64) -> Result<()> {
        self.runtime()
            .stop_container(req::stop_container(id, timeout))
            .await
            .with_context(|| format!("StopContainer {id}"))?;
        Ok(())
    }

    /// ExecSync `cmd` in container `id` with a `timeout` in seconds (0 = none).
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout: i64,
    ) -> Result<cri::ExecSyncResponse> {
        Ok(self
            .runtime()
            .exec_sync(req::exec_sync(id, cmd, timeout))
            .await
            .with_context(|| format!("ExecSync {cmd:?} in {id}"))?
            .into_inner())
    }

    /// ExecSync that must exit 0; returns its stdout as text.
    pub async fn exec_ok(&self, id: &str, cmd: &[&str]) -> Result<String> {
        let r = self.exec_sync(id, cmd, 30).await?;
        if r.exit_code != 0 {
            bail!(
                "ExecSync {cmd:?} in {id}: exit code {}, stderr {:?}",
                r.exit_code,
                String::from_utf8_lossy(&r.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&r.stdout).into_owned())
    }

    /// PodSandboxStatus with `verbose: true` (the `info` map).
    pub async fn pod_status_verbose(&self, pod_id: &str) -> Result<cri::PodSandboxStatusResponse> {
        Ok(self
            .runtime()
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod_id.into(),
                verbose: true,
            })
            .await
            .with_context(|| format!("PodSandboxStatus {pod_id} (verbose)"))?
            .into_inner())
    }

    /// ContainerStatus with `verbose: true` (the `info` map).
    pub async fn container_status_verbose(&self, id: &str) -> Result<cri::ContainerStatusResponse> {
        Ok(self
            .runtime()
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: true,
            })
            .await
            .with_context(|| format!("ContainerStatus {id} (verbose)"))?
            .into_inner())
    }

    /// The process id the runtime reports in a verbose status: `info["info"]` is a JSON
    /// document with `pid` (containerd's format, which crispd follows).
    pub fn info_pid(info: &std::collections::HashMap<String, String>) -> Result<i32> {
        let doc: serde_json::Value = serde_json::from_str(
            info.get("info")
                .with_context(|| format!("verbose status without \"info\": {info:?}"))?,
        )?;
        let pid = doc
            .get("pid")
            .and_then(|p| p.as_i64())
            .with_context(|| format!("verbose info without pid: {doc}"))?;
        Ok(pid as i32)
    }

    /// The pid of the pod's sandbox process (pause), from its verbose status.
    pub async fn sandbox_pid(&self, pod_id: &str) -> Result<i32> {
        Self::info_pid(&self.pod_status_verbose(pod_id).await?.info)
            .with_context(|| format!("pid of sandbox {pod_id}"))
    }

    /// The pid of a container's init process, from its verbose status.
    pub async fn container_pid(&self, id: &str) -> Result<i32> {
        Self::info_pid(&self.container_status_verbose(id).await?.info)
            .with_context(|| format!("pid of container {id}"))
    }

    /// ListContainers with an optional filter.
    pub async fn list_containers(
        &self,
        filter: Option<cri::ContainerFilter>,
    ) -> Result<Vec<cri::Container>> {
        Ok(self
            .runtime()
            .list_containers(cri::ListContainersRequest { filter })
            .await
            .context("ListContainers")?
            .into_inner()
            .containers)
    }

    /// ListPodSandbox with an optional filter.
    pub async fn list_pods_filtered(
        &self,
        filter: Option<cri::PodSandboxFilter>,
    ) -> Result<Vec<cri::PodSandbox>> {
        Ok(self
            .runtime()
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter })
            .await
            .context("ListPodSandbox")?
            .into_inner()
            .items)
    }

    /// `Status` (verbose off).
    pub async fn status(&self) -> Result<cri::RuntimeStatus> {
        self.runtime()
            .status(cri::StatusRequest { verbose: false })
            .await
            .context("CRI Status")?
            .into_inner()
            .status
            .context("Status response without status")
    }

    /// Ids of every pod sandbox the runtime knows.
    pub async fn list_pods(&self) -> Result<Vec<String>> {
        let resp = self
            .runtime()
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .context("ListPodSandbox")?;
        Ok(resp.into_inner().items.into_iter().map(|p| p.id).collect())
    }
}

/// The gRPC status code anywhere in an error's chain (CriClient wraps it in context).
pub fn grpc_code(err: &anyhow::Error) -> Option<tonic::Code> {
    err.chain()
        .find_map(|e| e.downcast_ref::<tonic::Status>())
        .map(|s| s.code())
}

/// The call must fail with `code`, and its message must name every word of `names` (CRI
/// errors name the field and the value they are about).
pub fn expect_code<T: std::fmt::Debug>(
    what: &str,
    r: std::result::Result<tonic::Response<T>, tonic::Status>,
    code: tonic::Code,
    names: &[&str],
) -> Result<()> {
    let s = match r {
        Ok(resp) => bail!("{what}: succeeded ({:?}), want {code:?}", resp.into_inner()),
        Err(s) => s,
    };
    anyhow::ensure!(
        s.code() == code,
        "{what}: {:?} ({:?}), want {code:?}",
        s.code(),
        s.message()
    );
    for n in names {
        anyhow::ensure!(
            s.message().contains(n),
            "{what}: {code:?} as wanted, but the message {:?} does not name {n:?}",
            s.message()
        );
    }
    Ok(())
}

/// The call must succeed; returns the response body.
pub fn expect_ok<T>(
    what: &str,
    r: std::result::Result<tonic::Response<T>, tonic::Status>,
) -> Result<T> {
    r.map(|r| r.into_inner())
        .map_err(|s| anyhow::anyhow!("{what}: {:?} {:?}, want OK", s.code(), s.message()))
}

/// An ExecSync answer must have exactly this exit code, stdout and stderr.
pub fn expect_exec(
    what: &str,
    r: &cri::ExecSyncResponse,
    exit_code: i32,
    stdout: &str,
    stderr: &str,
) -> Result<()> {
    anyhow::ensure!(
        r.exit_code == exit_code,
        "{what}: exit code {}, want {exit_code}",
        r.exit_code
    );
    anyhow::ensure!(
        r.stdout == stdout.as_bytes(),
        "{what}: stdout {:?}, want {stdout:?}",
        String::from_utf8_lossy(&r.stdout)
    );
    anyhow::ensure!(
        r.stderr == stderr.as_bytes(),
        "{what}: stderr {:?}, want {stderr:?}",
        String::from_utf8_lossy(&r.stderr)
    );
    Ok(())
}

/// Request bodies of the RuntimeService calls, for the client's methods and for tests that
/// call `runtime()` directly to see the raw gRPC status.
pub mod req {
    use super::cri;

    pub fn run_pod(config: &cri::PodSandboxConfig, handler: &str) -> cri::RunPodSandboxRequest {
        cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        }
    }

    pub fn pod_status(pod_id: &str) -> cri::PodSandboxStatusRequest {
        cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.into(),
            verbose: false,
        }
    }

    pub fn remove_pod(pod_id: &str) -> cri::RemovePodSandboxRequest {
        cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.into(),
        }
    }

    pub fn create_container(
        pod_id: &str,
        config: &cri::ContainerConfig,
        pod_config: &cri::PodSandboxConfig,
    ) -> cri::CreateContainerRequest {
        cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config.clone()),
            sandbox_config: Some(pod_config.clone()),
        }
    }

    pub fn start_container(id: &str) -> cri::StartContainerRequest {
        cri::StartContainerRequest {
            container_id: id.into(),
        }
    }

    pub fn stop_container(id: &str, timeout: i64) -> cri::StopContainerRequest {
        cri::StopContainerRequest {
            container_id: id.into(),
            timeout,
        }
    }

    pub fn remove_container(id: &str) -> cri::RemoveContainerRequest {
        cri::RemoveContainerRequest {
            container_id: id.into(),
        }
    }

    pub fn container_status(id: &str) -> cri::ContainerStatusRequest {
        cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        }
    }

    pub fn exec_sync(id: &str, cmd: &[&str], timeout: i64) -> cri::ExecSyncRequest {
        cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout,
        }
    }
}

/// A named condition (`RuntimeReady`, `NetworkReady`) of a runtime status.
pub fn condition<'a>(st: &'a cri::RuntimeStatus, name: &str) -> Option<&'a cri::RuntimeCondition> {
    st.conditions.iter().find(|c| c.r#type == name)
}

pub fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}

/// A random lowercase hex string, for names that must not collide across concurrent tests.
pub fn random_hex(len: usize) -> String {
    let mut s = String::new();
    while s.len() < len {
        s.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    s.truncate(len);
    s
}

/// A pod config with a unique name, uid and namespace, its log directory under `log_root`
/// (created here) and the test's cgroup parent, so that concurrent tests never share a pod
/// identity, a log file or a cgroup.
pub fn pod_config(
    name: &str,
    log_root: &Path,
    cgroup_parent: &str,
) -> Result<cri::PodSandboxConfig> {
    let suffix = random_hex(8);
    let uid = uuid::Uuid::new_v4().to_string();
    let log_directory = log_root.join(format!("{name}-{suffix}"));
    std::fs::create_dir_all(&log_directory)
        .with_context(|| format!("creating pod log directory {}", log_directory.display()))?;
    Ok(cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: format!("{name}-{suffix}"),
            uid,
            namespace: format!("e2e-{suffix}"),
            attempt: 0,
        }),
        hostname: name.chars().take(63).collect(),
        log_directory: log_directory.to_string_lossy().into_owned(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.into(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A container config: `image`, `command` as the entrypoint, the log file `<name>.log`
/// relative to the pod's log directory (as kubelet does).
pub fn container_config(name: &str, image: &str, command: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(image_spec(image)),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// The host path of a container's log file: the pod's log directory joined with the
/// container's log path.
pub fn log_file(pod: &cri::PodSandboxConfig, container: &cri::ContainerConfig) -> PathBuf {
    Path::new(&pod.log_directory).join(&container.log_path)
}

/// One line of a CRI log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// RFC 3339 timestamp with nanoseconds, as written.
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// `false` for `F` (full line), `true` for `P` (partial: continues in the next entry).
    pub partial: bool,
    pub text: String,
}

/// Parses one `<RFC3339Nano> <stream> <P|F> <text>` line.
pub fn parse_log_line(line: &str) -> Result<LogLine> {
    let mut parts = line.splitn(4, ' ');
    let (Some(time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("CRI log line has fewer than 3 fields: {line:?}");
    };
    let text = parts.next().unwrap_or("");
    if !(time.len() >= 20 && time.as_bytes()[4] == b'-' && time.contains('T')) {
        bail!("CRI log line does not start with an RFC 3339 time: {line:?}");
    }
    if stream != "stdout" && stream != "stderr" {
        bail!("CRI log line has stream {stream:?}, not stdout/stderr: {line:?}");
    }
    // The tag may carry more flags after ':' in future formats; the first is P or F.
    let partial = match tag.split(':').next() {
        Some("P") => true,
        Some("F") => false,
        _ => bail!("CRI log line has tag {tag:?}, not P or F: {line:?}"),
    };
    Ok(LogLine {
        time: time.into(),
        stream: stream.into(),
        partial,
        text: text.into(),
    })
}

/// Reads and parses every line of a CRI log file.
pub fn read_log(path: &Path) -> Result<Vec<LogLine>> {
    let content = std::fs::read_to_string(path)
        .with_context(|| format!("reading CRI log {}", path.display()))?;
    content
        .lines()
        .map(parse_log_line)
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("parsing CRI log {}", path.display()))
}

/// Waits until the log file holds a full line whose text is `text`: the runtime writes the
/// log asynchronously, so a container can be EXITED before its last line is on disk.
pub async fn wait_log_line(path: &Path, text: &str, timeout: Duration) -> Result<LogLine> {
    let deadline = Instant::now() + timeout;
    loop {
        if path.exists()
            && let Some(line) = read_log(path)?
                .into_iter()
                .find(|l| !l.partial && l.text == text)
        {
            return Ok(line);
        }
        if Instant::now() >= deadline {
            let content = std::fs::read_to_string(path).unwrap_or_else(|e| format!("<{e}>"));
            bail!(
                "{} has no line {text:?} after {timeout:?}; content: {content:?}",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_partial_lines() {
        let l = parse_log_line("2026-11-23T12:00:00.123456789Z stdout F hello crisp").unwrap();
        assert_eq!(l.stream, "stdout");
        assert!(!l.partial);
        assert_eq!(l.text, "hello crisp");
        let l = parse_log_line("2026-11-23T12:00:00.1+01:00 stderr P ").unwrap();
        assert!(l.partial);
        assert_eq!(l.text, "");
    }

    #[test]
    fn rejects_malformed_lines() {
        assert!(parse_log_line("hello").is_err());
        assert!(parse_log_line("2026-11-23T12:00:00Z stdin F x").is_err());
        assert!(parse_log_line("2026-11-23T12:00:00Z stdout X x").is_err());
    }
}
