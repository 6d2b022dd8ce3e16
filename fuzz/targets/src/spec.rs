//! The OCI spec builder over any CRI pod and container config.

use std::collections::HashSet;
use std::path::Path;

use crisp_cri::config::CgroupDriver;
use crisp_cri::container::spec::{self, DeviceInfo, HostInfo, SpecContext};
use crisp_proto::cri::v1::{ContainerConfig, PodSandboxConfig};
use oci_spec::image::{ConfigBuilder, ImageConfiguration, ImageConfigurationBuilder};
use oci_spec::runtime::Capabilities;
use prost::Message;

/// Sources of the filesystems every container gets (not host paths).
const FS_SOURCES: &[&str] = &[
    "proc", "tmpfs", "devpts", "mqueue", "sysfs", "cgroup", "shm",
];

/// The pod files crispd binds into every container.
const SANDBOX_FILES: &[(&str, &str)] = &[
    ("/etc/hosts", "/run/crisp/pods/p1/hosts"),
    ("/etc/resolv.conf", "/run/crisp/pods/p1/resolv.conf"),
    ("/dev/shm", "/run/crisp/pods/p1/shm"),
];

/// `data` is a little-endian u16 length, that many bytes of a protobuf PodSandboxConfig,
/// then a protobuf ContainerConfig, as kubelet would send them. Invariant: the builder does
/// not panic, and every mount's source is a filesystem name or a host path the request (a
/// CRI mount's host_path) or crispd (the pod's files) named.
pub fn oci_spec(data: &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = (u16::from_le_bytes(*len) as usize).min(rest.len());
    let (pod, ctr) = rest.split_at(len);
    let (Ok(pod), Ok(ctr)) = (PodSandboxConfig::decode(pod), ContainerConfig::decode(ctr)) else {
        return;
    };
    let ctx = SpecContext {
        container_id: "c1",
        pod_id: "p1",
        pause_pid: 4242,
        target_pid: Some(4343),
        cgroup_driver: CgroupDriver::Cgroupfs,
        cgroup_v2: ctr.linux.is_some() && pod.hostname.len() % 2 == 1,
        idmap: None,
        image_name: "docker.io/library/busybox:latest",
        passwd: Some("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"),
        group: Some("root:x:0:\nwheel:x:10:app\napp:x:1000:\n"),
        sandbox_mounts: SANDBOX_FILES
            .iter()
            .map(|(d, s)| (d.to_string(), s.to_string()))
            .collect(),
        // Image volumes are mounted by crispd before the spec is built; none here, so a
        // request naming one must be refused, never bound from a path it names.
        image_volumes: Vec::new(),
    };
    let Ok(spec) = spec::build(&pod, &ctr, &image(), &ctx, &FakeHost) else {
        return;
    };
    let named: HashSet<&str> = ctr
        .mounts
        .iter()
        .map(|m| m.host_path.as_str())
        .chain(SANDBOX_FILES.iter().map(|(_, s)| *s))
        .chain(FS_SOURCES.iter().copied())
        .collect();
    for m in spec.mounts().as_deref().unwrap_or_default() {
        let src = m
            .source()
            .as_deref()
            .map(Path::to_string_lossy)
            .unwrap_or_default();
        assert!(
            named.contains(src.as_ref()),
            "mount at {:?} has source {src:?}, which the request did not name",
            m.destination()
        );
    }
}

fn image() -> ImageConfiguration {
    let config = ConfigBuilder::default()
        .cmd(vec!["sh".to_string()])
        .env(vec!["PATH=/bin".to_string()])
        .build()
        .expect("image config");
    ImageConfigurationBuilder::default()
        .config(config)
        .build()
        .expect("image configuration")
}

/// A host with /dev/null and /dev/fuse, no seccomp profiles, and a fixed capability set.
struct FakeHost;

impl HostInfo for FakeHost {
    fn device(&self, path: &Path) -> Result<DeviceInfo, String> {
        let (major, minor) = match path.to_str() {
            Some("/dev/null") => (1, 3),
            Some("/dev/fuse") => (10, 229),
            _ => return Err("No such file or directory".into()),
        };
        Ok(DeviceInfo {
            path: path.into(),
            kind: 'c',
            major,
            minor,
            mode: 0o666,
            uid: 0,
            gid: 0,
        })
    }

    fn host_devices(&self) -> Vec<DeviceInfo> {
        ["/dev/null", "/dev/fuse"]
            .iter()
            .filter_map(|p| self.device(Path::new(p)).ok())
            .collect()
    }

    fn read_profile(&self, _path: &Path) -> Result<String, String> {
        Err("No such file or directory".into())
    }

    fn current_caps(&self) -> Capabilities {
        spec::caps_from_bitmap(0x0000_01ff_feff_ffff)
    }
}
