use super::*;
use crisp_proto::cri::v1::{
    Capability as PbCap, ContainerMetadata, Device, Int64Value, KeyValue, LinuxContainerConfig,
    LinuxContainerResources, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, Mount as PbMount, NamespaceOption, PodSandboxMetadata,
    SecurityProfile,
};
use oci_spec::image::{ConfigBuilder, ImageConfigurationBuilder};

struct FakeHost;
impl HostInfo for FakeHost {
    fn device(&self, path: &Path) -> Result<DeviceInfo, String> {
        match path.to_str() {
            Some("/dev/fuse") => Ok(DeviceInfo {
                path: path.into(),
                kind: 'c',
                major: 10,
                minor: 229,
                mode: 0o666,
                uid: 0,
                gid: 0,
            }),
            Some("/dev/loop0") => Ok(DeviceInfo {
                path: path.into(),
                kind: 'b',
                major: 7,
                minor: 0,
                mode: 0o660,
                uid: 0,
                gid: 6,
            }),
            _ => Err("No such file or directory".into()),
        }
    }
    fn host_devices(&self) -> Vec<DeviceInfo> {
        vec![self.device(Path::new("/dev/fuse")).expect("fuse")]
    }
    fn read_profile(&self, path: &Path) -> Result<String, String> {
        match path.to_str() {
            Some("/profiles/deny-chmod.json") => Ok(r#"{"defaultAction":"SCMP_ACT_ALLOW",
                "syscalls":[{"names":["chmod","fchmodat"],"action":"SCMP_ACT_ERRNO"}]}"#
                .into()),
            Some("/profiles/garbage.json") => Ok("not json".into()),
            _ => Err("No such file or directory".into()),
        }
    }
    fn current_caps(&self) -> Capabilities {
        caps_from_bitmap(FAKE_CAP_EFF)
    }
}

/// This machine's CapEff: every capability of kernel 5.9 but CAP_SYS_RESOURCE (bit 24).
const FAKE_CAP_EFF: u64 = 0x0000_01ff_feff_ffff;

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\napp:x:1000:1000::/home/app:/bin/sh\n";
const GROUP: &str = "root:x:0:\nwheel:x:10:app\nvideo:x:44:app,other\napp:x:1000:\nstaff:x:50:\n";

fn image(user: &str, entrypoint: &[&str], cmd: &[&str]) -> ImageConfiguration {
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    ImageConfigurationBuilder::default()
        .config(
            ConfigBuilder::default()
                .user(user)
                .entrypoint(v(entrypoint))
                .cmd(v(cmd))
                .env(vec!["PATH=/image/bin".to_string(), "FOO=image".to_string()])
                .working_dir("/work")
                .build()
                .expect("config"),
        )
        .build()
        .expect("image")
}

fn pod() -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "web".into(),
            uid: "uid-1".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "web-host".into(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: "/kubepods/besteffort/poduid-1".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ctr() -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "app".into(),
            attempt: 0,
        }),
        ..Default::default()
    }
}

fn ctx() -> SpecContext<'static> {
    SpecContext {
        container_id: "c1",
        pod_id: "p1",
        pause_pid: 4242,
        target_pid: None,
        cgroup_driver: CgroupDriver::Cgroupfs,
        cgroup_v2: false,
        idmap: None,
        image_name: "docker.io/library/busybox:latest",
        passwd: Some(PASSWD),
        group: Some(GROUP),
        sandbox_mounts: vec![
            ("/etc/hosts".into(), "/run/crisp/pods/p1/hosts".into()),
            (
                "/etc/resolv.conf".into(),
                "/run/crisp/pods/p1/resolv.conf".into(),
            ),
            ("/dev/shm".into(), "/run/crisp/pods/p1/shm".into()),
        ],
        image_volumes: Vec::new(),
    }
}

fn with_sc(mut c: ContainerConfig, sc: LinuxContainerSecurityContext) -> ContainerConfig {
    let mut l = c.linux.take().unwrap_or_default();
    l.security_context = Some(sc);
    c.linux = Some(l);
    c
}

fn build_ok(p: &PodSandboxConfig, c: &ContainerConfig, img: &ImageConfiguration) -> Spec {
    build(p, c, img, &ctx(), &FakeHost).expect("spec builds")
}

fn caps_of(s: &Spec) -> Capabilities {
    s.process()
        .as_ref()
        .and_then(|p| p.capabilities().as_ref())
        .and_then(|c| c.effective().clone())
        .unwrap_or_default()
}

fn cap(n: &str) -> Capability {
    Capability::from_str(n).expect("cap")
}

fn mount_at<'a>(s: &'a Spec, dest: &str) -> Option<&'a Mount> {
    s.mounts()
        .as_ref()?
        .iter()
        .find(|m| m.destination() == Path::new(dest))
}

fn ns_of(s: &Spec) -> Vec<(LinuxNamespaceType, Option<PathBuf>)> {
    s.linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default()
        .iter()
        .map(|n| (n.typ(), n.path().clone()))
        .collect()
}

// ---- command, env, cwd ----

#[test]
fn image_entrypoint_and_cmd_when_cri_says_nothing() {
    let s = build_ok(&pod(), &ctr(), &image("", &["/entry"], &["a", "b"]));
    let p = s.process().clone().expect("process");
    assert_eq!(p.args().clone().expect("args"), vec!["/entry", "a", "b"]);
    assert_eq!(p.cwd(), Path::new("/work"));
}

#[test]
fn cri_args_replace_cmd_and_command_replaces_entrypoint() {
    let img = image("", &["/entry"], &["a"]);
    let c = ContainerConfig {
        args: vec!["x".into()],
        ..ctr()
    };
    let s = build_ok(&pod(), &c, &img);
    assert_eq!(
        s.process()
            .as_ref()
            .and_then(|p| p.args().clone())
            .expect("args"),
        vec!["/entry", "x"]
    );
    let c = ContainerConfig {
        command: vec!["/bin/sh".into()],
        ..ctr()
    };
    let s = build_ok(&pod(), &c, &img);
    assert_eq!(
        s.process()
            .as_ref()
            .and_then(|p| p.args().clone())
            .expect("args"),
        vec!["/bin/sh"],
        "a CRI command does not pick up the image Cmd"
    );
    let c = ContainerConfig {
        command: vec!["/bin/sh".into()],
        args: vec!["-c".into(), "true".into()],
        ..ctr()
    };
    let s = build_ok(&pod(), &c, &img);
    assert_eq!(
        s.process()
            .as_ref()
            .and_then(|p| p.args().clone())
            .expect("args"),
        vec!["/bin/sh", "-c", "true"]
    );
}

#[test]
fn no_command_anywhere_is_invalid_argument() {
    let e = build(&pod(), &ctr(), &image("", &[], &[]), &ctx(), &FakeHost).expect_err("no command");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().starts_with("command:"), "{e}");
}

#[test]
fn env_cri_overrides_image_and_path_defaults() {
    let env = environment(
        &["PATH=/image/bin".into(), "FOO=image".into(), "BAR".into()],
        &[
            KeyValue {
                key: "FOO".into(),
                value: b"cri".to_vec(),
            },
            KeyValue {
                key: "NEW".into(),
                value: b"1".to_vec(),
            },
        ],
    );
    assert_eq!(env, vec!["PATH=/image/bin", "FOO=cri", "BAR=", "NEW=1"]);
    let env = environment(&[], &[]);
    assert_eq!(env, vec![format!("PATH={DEFAULT_PATH}")]);
}

#[test]
fn working_dir_override_and_validation() {
    let c = ContainerConfig {
        working_dir: "/srv".into(),
        ..ctr()
    };
    let s = build_ok(&pod(), &c, &image("", &["/e"], &[]));
    assert_eq!(
        s.process().as_ref().map(|p| p.cwd().clone()),
        Some(PathBuf::from("/srv"))
    );
    let c = ContainerConfig {
        working_dir: "srv".into(),
        ..ctr()
    };
    let e = build(&pod(), &c, &image("", &["/e"], &[]), &ctx(), &FakeHost).expect_err("relative");
    assert!(e.to_string().contains("working_dir"), "{e}");
}

// ---- user ----

fn user_of(s: &Spec) -> (u32, u32, Vec<u32>) {
    let u = s.process().as_ref().expect("process").user().clone();
    (
        u.uid(),
        u.gid(),
        u.additional_gids().clone().unwrap_or_default(),
    )
}

#[test]
fn image_user_by_name_resolves_uid_gid_and_groups() {
    let s = build_ok(&pod(), &ctr(), &image("app", &["/e"], &[]));
    assert_eq!(user_of(&s), (1000, 1000, vec![1000, 10, 44]));
}

#[test]
fn image_user_with_group_and_numeric_forms() {
    let s = build_ok(&pod(), &ctr(), &image("app:staff", &["/e"], &[]));
    assert_eq!(user_of(&s).0, 1000);
    assert_eq!(user_of(&s).1, 50);
    let s = build_ok(&pod(), &ctr(), &image("1234:99", &["/e"], &[]));
    assert_eq!(user_of(&s), (1234, 99, vec![99]));
    let s = build_ok(&pod(), &ctr(), &image("", &["/e"], &[]));
    assert_eq!(user_of(&s), (0, 0, vec![0]));
}

#[test]
fn unknown_image_user_is_invalid() {
    let e = build(
        &pod(),
        &ctr(),
        &image("ghost", &["/e"], &[]),
        &ctx(),
        &FakeHost,
    )
    .expect_err("ghost");
    assert!(
        e.to_string().contains("ghost") && e.to_string().contains("/etc/passwd"),
        "{e}"
    );
}

#[test]
fn cri_run_as_user_group_and_supplemental_groups_override() {
    let sc = LinuxContainerSecurityContext {
        run_as_user: Some(Int64Value { value: 1000 }),
        run_as_group: Some(Int64Value { value: 3000 }),
        supplemental_groups: vec![4000, 10],
        ..Default::default()
    };
    let s = build_ok(
        &pod(),
        &with_sc(ctr(), sc.clone()),
        &image("nobody", &["/e"], &[]),
    );
    assert_eq!(user_of(&s), (1000, 3000, vec![3000, 10, 44, 4000]));
    let strict = LinuxContainerSecurityContext {
        supplemental_groups_policy: SupplementalGroupsPolicy::Strict as i32,
        ..sc
    };
    let s = build_ok(
        &pod(),
        &with_sc(ctr(), strict),
        &image("nobody", &["/e"], &[]),
    );
    assert_eq!(
        user_of(&s),
        (1000, 3000, vec![3000, 4000, 10]),
        "Strict ignores the image's groups"
    );
    let by_name = LinuxContainerSecurityContext {
        run_as_username: "app".into(),
        ..Default::default()
    };
    let s = build_ok(&pod(), &with_sc(ctr(), by_name), &image("", &["/e"], &[]));
    assert_eq!(user_of(&s).0, 1000);
    let neg = LinuxContainerSecurityContext {
        run_as_user: Some(Int64Value { value: -1 }),
        ..Default::default()
    };
    let e = build(
        &pod(),
        &with_sc(ctr(), neg),
        &image("", &["/e"], &[]),
        &ctx(),
        &FakeHost,
    )
    .expect_err("neg");
    assert!(e.to_string().contains("run_as_user"), "{e}");
}

// ---- capabilities / privileged ----

#[test]
fn default_capabilities_and_add_drop() {
    let s = build_ok(&pod(), &ctr(), &image("", &["/e"], &[]));
    let caps = caps_of(&s);
    assert_eq!(caps.len(), DEFAULT_CAPS.len());
    assert!(caps.contains(&cap("CHOWN")) && !caps.contains(&cap("SYS_ADMIN")));
    let sc = LinuxContainerSecurityContext {
        capabilities: Some(PbCap {
            add_capabilities: vec!["SYS_ADMIN".into(), "CAP_NET_ADMIN".into()],
            drop_capabilities: vec!["chown".into()],
            add_ambient_capabilities: vec![],
        }),
        ..Default::default()
    };
    let caps = caps_of(&build_ok(
        &pod(),
        &with_sc(ctr(), sc),
        &image("", &["/e"], &[]),
    ));
    assert!(caps.contains(&cap("SYS_ADMIN")) && caps.contains(&cap("NET_ADMIN")));
    assert!(!caps.contains(&cap("CHOWN")));
}

#[test]
fn drop_all_then_add() {
    let sc = LinuxContainerSecurityContext {
        capabilities: Some(PbCap {
            add_capabilities: vec!["NET_BIND_SERVICE".into()],
            drop_capabilities: vec!["ALL".into()],
            add_ambient_capabilities: vec![],
        }),
        ..Default::default()
    };
    let caps = caps_of(&build_ok(
        &pod(),
        &with_sc(ctr(), sc),
        &image("", &["/e"], &[]),
    ));
    assert_eq!(caps, HashSet::from([cap("NET_BIND_SERVICE")]));
}

#[test]
fn ambient_caps_are_inheritable_and_permitted() {
    let sc = LinuxContainerSecurityContext {
        capabilities: Some(PbCap {
            add_ambient_capabilities: vec!["NET_ADMIN".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let s = build_ok(&pod(), &with_sc(ctr(), sc), &image("", &["/e"], &[]));
    let c = s
        .process()
        .as_ref()
        .and_then(|p| p.capabilities().clone())
        .expect("caps");
    assert!(
        c.ambient()
            .as_ref()
            .expect("ambient")
            .contains(&cap("NET_ADMIN"))
    );
    assert!(
        c.inheritable()
            .as_ref()
            .expect("inh")
            .contains(&cap("NET_ADMIN"))
    );
    assert!(
        c.permitted()
            .as_ref()
            .expect("perm")
            .contains(&cap("NET_ADMIN"))
    );
}

#[test]
fn unknown_capability_is_invalid_naming_the_field() {
    let sc = LinuxContainerSecurityContext {
        capabilities: Some(PbCap {
            add_capabilities: vec!["FLY".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let e = build(
        &pod(),
        &with_sc(ctr(), sc),
        &image("", &["/e"], &[]),
        &ctx(),
        &FakeHost,
    )
    .expect_err("FLY");
    assert!(
        e.to_string().contains("add_capabilities") && e.to_string().contains("FLY"),
        "{e}"
    );
}

fn privileged_pod() -> PodSandboxConfig {
    let mut p = pod();
    if let Some(l) = p.linux.as_mut() {
        l.security_context = Some(LinuxSandboxSecurityContext {
            privileged: true,
            ..Default::default()
        });
    }
    p
}

#[test]
fn privileged_gets_everything_and_no_confinement() {
    let sc = LinuxContainerSecurityContext {
        privileged: true,
        seccomp: Some(SecurityProfile {
            profile_type: ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        }),
        ..Default::default()
    };
    let s = build_ok(
        &privileged_pod(),
        &with_sc(ctr(), sc),
        &image("", &["/e"], &[]),
    );
    assert!(caps_of(&s).contains(&cap("SYS_ADMIN")));
    assert!(caps_of(&s).len() >= 38);
    let l = s.linux().clone().expect("linux");
    assert!(l.seccomp().is_none());
    assert!(l.masked_paths().as_ref().is_none_or(|m| m.is_empty()));
    assert!(l.readonly_paths().as_ref().is_none_or(|m| m.is_empty()));
    let devs = l.devices().clone().unwrap_or_default();
    assert!(
        devs.iter().any(|d| d.path() == Path::new("/dev/fuse")),
        "host devices added"
    );
    let rules = l
        .resources()
        .as_ref()
        .and_then(|r| r.devices().clone())
        .expect("rules");
    assert!(rules[0].allow(), "all devices allowed");
    let sys = mount_at(&s, "/sys").expect("sys");
    assert!(
        sys.options()
            .as_ref()
            .expect("opts")
            .contains(&"rw".to_string())
    );
}

#[test]
fn privileged_container_in_unprivileged_pod_is_refused() {
    let sc = LinuxContainerSecurityContext {
        privileged: true,
        ..Default::default()
    };
    let e = build(
        &pod(),
        &with_sc(ctr(), sc),
        &image("", &["/e"], &[]),
        &ctx(),
        &FakeHost,
    )
    .expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("privileged"), "{e}");
}

// ---- rootfs, no_new_privs, masked paths ----

#[test]
fn readonly_rootfs_no_new_privs_and_default_masks() {
    let sc = LinuxContainerSecurityContext {
        readonly_rootfs: true,
        no_new_privs: true,
        ..Default::default()
    };
    let s = build_ok(&pod(), &with_sc(ctr(), sc), &image("", &["/e"], &[]));
    let root = s.root().clone().expect("root");
    assert_eq!(root.readonly(), Some(true));
    assert_eq!(root.path(), Path::new("rootfs"));
    assert_eq!(
        s.process().as_ref().and_then(|p| p.no_new_privileges()),
        Some(true)
    );
    let l = s.linux().clone().expect("linux");
    let masked = l.masked_paths().clone().expect("masked");
    assert!(
        masked.contains(&"/proc/kcore".to_string())
            && masked.contains(&"/sys/firmware".to_string())
    );
    assert!(
        l.readonly_paths()
            .clone()
            .expect("ro")
            .contains(&"/proc/sys".to_string())
    );
    // Sandbox files follow the read-only rootfs.
    let hosts = mount_at(&s, "/etc/hosts").expect("hosts");
    assert!(
        hosts
            .options()
            .as_ref()
            .expect("opts")
            .contains(&"ro".to_string())
    );
}

#[test]
fn kubelet_masked_paths_replace_defaults() {
    let sc = LinuxContainerSecurityContext {
        masked_paths: vec!["/proc/only".into()],
        readonly_paths: vec!["/proc/ro".into()],
        ..Default::default()
    };
    let s = build_ok(&pod(), &with_sc(ctr(), sc), &image("", &["/e"], &[]));
    let l = s.linux().clone().expect("linux");
    assert_eq!(l.masked_paths().clone().expect("m"), vec!["/proc/only"]);
    assert_eq!(l.readonly_paths().clone().expect("r"), vec!["/proc/ro"]);
}

// ---- mounts ----

#[test]
fn cri_mounts_with_propagation_readonly_and_order() {
    let c = ContainerConfig {
        mounts: vec![
            PbMount {
                container_path: "/data/sub".into(),
                host_path: "/h/sub".into(),
                readonly: true,
                ..Default::default()
            },
            PbMount {
                container_path: "/data".into(),
                host_path: "/h/data".into(),
                propagation: MountPropagation::PropagationBidirectional as i32,
                ..Default::default()
            },
            PbMount {
                container_path: "/slave".into(),
                host_path: "/h/slave".into(),
                propagation: MountPropagation::PropagationHostToContainer as i32,
                ..Default::default()
            },
            PbMount {
                container_path: "/rro".into(),
                host_path: "/h/rro".into(),
                readonly: true,
                recursive_read_only: true,
                ..Default::default()
            },
        ],
        ..ctr()
    };
    let s = build_ok(&pod(), &c, &image("", &["/e"], &[]));
    let opts = |d: &str| {
        mount_at(&s, d)
            .and_then(|m| m.options().clone())
            .unwrap_or_default()
    };
    assert_eq!(opts("/data/sub"), vec!["rbind", "rprivate", "ro"]);
    assert_eq!(opts("/data"), vec!["rbind", "rshared", "rw"]);
    assert_eq!(opts("/slave"), vec!["rbind", "rslave", "rw"]);
    assert_eq!(opts("/rro"), vec!["rbind", "rprivate", "ro", "rro"]);
    let dests: Vec<PathBuf> = s
        .mounts()
        .clone()
        .expect("mounts")
        .iter()
        .map(|m| m.destination().clone())
        .collect();
    let pos = |d: &str| {
        dests
            .iter()
            .position(|x| x == Path::new(d))
            .expect("present")
    };
    assert!(
        pos("/data") < pos("/data/sub"),
        "parent before child: {dests:?}"
    );
    assert!(pos("/dev") < pos("/dev/shm"));
}

#[test]
fn sandbox_files_are_mounted_unless_the_container_mounts_them() {
    let s = build_ok(&pod(), &ctr(), &image("", &["/e"], &[]));
    assert_eq!(
        mount_at(&s, "/etc/resolv.conf").and_then(|m| m.source().clone()),
        Some(PathBuf::from("/run/crisp/pods/p1/resolv.conf"))
    );
    assert_eq!(
        mount_at(&s, "/dev/shm").and_then(|m| m.source().clone()),
        Some(PathBuf::from("/run/crisp/pods/p1/shm"))
    );
    let c = ContainerConfig {
        mounts: vec![PbMount {
            container_path: "/etc/hosts".into(),
            host_path: "/my/hosts".into(),
            ..Default::default()
        }],
        ..ctr()
    };
    let s = build_ok(&pod(), &c, &image("", &["/e"], &[]));
    let hosts: Vec<_> = s
        .mounts()
        .clone()
        .expect("m")
        .into_iter()
        .filter(|m| m.destination() == Path::new("/etc/hosts"))
        .collect();
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].source().clone(), Some(PathBuf::from("/my/hosts")));
}

#[test]
fn bad_mounts_name_the_field() {
    for (m, needle) in [
        (
            PbMount {
                container_path: "rel".into(),
                host_path: "/h".into(),
                ..Default::default()
            },
            "mounts[0].container_path",
        ),
        (
            PbMount {
                container_path: "/c".into(),
                host_path: "".into(),
                ..Default::default()
            },
            "mounts[0].host_path",
        ),
        (
            PbMount {
                container_path: "/c".into(),
                host_path: "/h".into(),
                propagation: 9,
                ..Default::default()
            },
            "mounts[0].propagation",
        ),
        (
            PbMount {
                container_path: "/c".into(),
                host_path: "/h".into(),
                recursive_read_only: true,
                ..Default::default()
            },
            "mounts[0].recursive_read_only",
        ),
    ] {
        let c = ContainerConfig {
            mounts: vec![m],
            ..ctr()
        };
        let e = build(&pod(), &c, &image("", &["/e"], &[]), &ctx(), &FakeHost).expect_err(needle);
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains(needle), "{e} !~ {needle}");
    }
}

// ---- devices ----

#[test]
fn devices_are_resolved_and_allowed_with_permissions() {
    let c = ContainerConfig {
        devices: vec![
            Device {
                container_path: "/dev/myfuse".into(),
                host_path: "/dev/fuse".into(),
                permissions: "rw".into(),
            },
            Device {
                container_path: "".into(),
                host_path: "/dev/loop0".into(),
                permissions: "".into(),
            },
        ],
        ..ctr()
    };
    let s = build_ok(&pod(), &c, &image("", &["/e"], &[]));
    let l = s.linux().clone().expect("linux");
    let devs = l.devices().clone().expect("devices");
    assert_eq!(devs.len(), 2);
    assert_eq!(devs[0].path(), Path::new("/dev/myfuse"));
    assert_eq!((devs[0].major(), devs[0].minor()), (10, 229));
    assert_eq!(devs[1].typ(), LinuxDeviceType::B);
    let rules = l
        .resources()
        .as_ref()
        .and_then(|r| r.devices().clone())
        .expect("rules");
    assert!(!rules[0].allow(), "deny-all first");
    assert_eq!(rules[1].access().as_deref(), Some("rw"));
    assert_eq!(rules[2].access().as_deref(), Some("rwm"));
}

#[test]
fn missing_device_is_a_precondition_and_bad_permissions_invalid() {
    let c = ContainerConfig {
        devices: vec![Device {
            container_path: "/dev/x".into(),
            host_path: "/dev/nope".into(),
            permissions: "rw".into(),
        }],
        ..ctr()
    };
    let e = build(&pod(), &c, &image("", &["/e"], &[]), &ctx(), &FakeHost).expect_err("missing");
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(
        e.to_string().contains("devices[0].host_path") && e.to_string().contains("/dev/nope"),
        "{e}"
    );
    let c = ContainerConfig {
        devices: vec![Device {
            container_path: "/dev/x".into(),
            host_path: "/dev/fuse".into(),
            permissions: "rwx".into(),
        }],
        ..ctr()
    };
    let e = build(&pod(), &c, &image("", &["/e"], &[]), &ctx(), &FakeHost).expect_err("perm");
    assert!(e.to_string().contains("devices[0].permissions"), "{e}");
}

// ---- resources ----

#[test]
fn resources_map_to_oci() {
    let mut c = ctr();
    c.linux = Some(LinuxContainerConfig {
        resources: Some(LinuxContainerResources {
            cpu_period: 100000,
            cpu_quota: 50000,
            cpu_shares: 512,
            memory_limit_in_bytes: 64 << 20,
            oom_score_adj: 500,
            cpuset_cpus: "0-1".into(),
            cpuset_mems: "0".into(),
            hugepage_limits: vec![pb::HugepageLimit {
                page_size: "2MB".into(),
                limit: 0,
            }],
            ..Default::default()
        }),
        security_context: None,
    });
    let s = build_ok(&pod(), &c, &image("", &["/e"], &[]));
    let r = s
        .linux()
        .clone()
        .and_then(|l| l.resources().clone())
        .expect("resources");
    let cpu = r.cpu().clone().expect("cpu");
    assert_eq!(cpu.shares(), Some(512));
    assert_eq!(cpu.quota(), Some(50000));
    assert_eq!(cpu.period(), Some(100000));
    assert_eq!(cpu.cpus().as_deref(), Some("0-1"));
    assert_eq!(cpu.mems().as_deref(), Some("0"));
    let mem = (*r.memory()).expect("memory");
    assert_eq!(mem.limit(), Some(64 << 20));
    assert_eq!(mem.swap(), Some(64 << 20), "no swap beyond the limit");
    assert_eq!(
        r.hugepage_limits().clone().expect("hp")[0].page_size(),
        "2MB"
    );
    assert_eq!(
        s.process().as_ref().and_then(|p| p.oom_score_adj()),
        Some(500)
    );
}

#[test]
fn bad_resources_are_invalid() {
    let bad = |r: LinuxContainerResources| {
        let mut c = ctr();
        c.linux = Some(LinuxContainerConfig {
            resources: Some(r),
            security_context: None,
        });
        build(&pod(), &c, &image("", &["/e"], &[]), &ctx(), &FakeHost)
            .expect_err("bad")
            .to_string()
    };
    assert!(
        bad(LinuxContainerResources {
            cpu_shares: -2,
            ..Default::default()
        })
        .contains("cpu_shares")
    );
    assert!(
        bad(LinuxContainerResources {
            oom_score_adj: 5000,
            ..Default::default()
        })
        .contains("oom_score_adj")
    );
    assert!(
        bad(LinuxContainerResources {
            unified: [("memory.max".to_string(), "1".to_string())].into(),
            ..Default::default()
        })
        .contains("unified")
    );
    assert!(
        bad(LinuxContainerResources {
            memory_limit_in_bytes: 100,
            memory_swap_limit_in_bytes: 50,
            ..Default::default()
        })
        .contains("memory_swap_limit_in_bytes")
    );
}

// ---- seccomp ----

fn seccomp_of(sc: LinuxContainerSecurityContext) -> Result<Option<LinuxSeccomp>, SpecError> {
    build(
        &pod(),
        &with_sc(ctr(), sc),
        &image("", &["/e"], &[]),
        &ctx(),
        &FakeHost,
    )
    .map(|s| s.linux().clone().and_then(|l| l.seccomp().clone()))
}

fn profile(t: ProfileType, r: &str) -> LinuxContainerSecurityContext {
    LinuxContainerSecurityContext {
        seccomp: Some(SecurityProfile {
            profile_type: t as i32,
            localhost_ref: r.into(),
        }),
        ..Default::default()
    }
}

#[test]
fn seccomp_runtime_default_unconfined_and_unset() {
    let d = seccomp_of(profile(ProfileType::RuntimeDefault, ""))
        .expect("ok")
        .expect("profile");
    assert_eq!(d.default_action(), LinuxSeccompAction::ScmpActAllow);
    let denied = &d.syscalls().clone().expect("syscalls")[0];
    assert!(denied.names().contains(&"kexec_load".to_string()));
    assert!(denied.names().contains(&"mount".to_string()));
    assert_eq!(denied.action(), LinuxSeccompAction::ScmpActErrno);
    assert!(
        seccomp_of(profile(ProfileType::Unconfined, ""))
            .expect("ok")
            .is_none()
    );
    assert!(
        seccomp_of(LinuxContainerSecurityContext::default())
            .expect("ok")
            .is_none(),
        "unset = unconfined"
    );
}

#[test]
fn seccomp_localhost_loads_the_file() {
    let p = seccomp_of(profile(ProfileType::Localhost, "/profiles/deny-chmod.json"))
        .expect("ok")
        .expect("profile");
    assert_eq!(
        p.syscalls().clone().expect("s")[0].names(),
        &vec!["chmod".to_string(), "fchmodat".to_string()]
    );
    let e =
        seccomp_of(profile(ProfileType::Localhost, "/profiles/missing.json")).expect_err("missing");
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(e.to_string().contains("/profiles/missing.json"), "{e}");
    let e =
        seccomp_of(profile(ProfileType::Localhost, "/profiles/garbage.json")).expect_err("garbage");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = seccomp_of(profile(ProfileType::Localhost, "relative.json")).expect_err("relative");
    assert!(e.to_string().contains("absolute"), "{e}");
}

#[test]
#[allow(deprecated)]
fn seccomp_legacy_path_field() {
    let sc = |p: &str| LinuxContainerSecurityContext {
        seccomp_profile_path: p.into(),
        ..Default::default()
    };
    assert!(seccomp_of(sc("runtime/default")).expect("ok").is_some());
    assert!(seccomp_of(sc("unconfined")).expect("ok").is_none());
    assert!(
        seccomp_of(sc("localhost//profiles/deny-chmod.json"))
            .expect("ok")
            .is_some()
    );
    assert!(seccomp_of(sc("bogus")).is_err());
}

// ---- namespaces, hostname, cgroups, annotations, idmap ----

#[test]
fn namespaces_join_the_pause_process() {
    let s = build_ok(&pod(), &ctr(), &image("", &["/e"], &[]));
    let ns = ns_of(&s);
    let has = |t: LinuxNamespaceType, p: Option<&str>| ns.contains(&(t, p.map(PathBuf::from)));
    assert!(has(LinuxNamespaceType::Mount, None));
    assert!(has(LinuxNamespaceType::Network, Some("/proc/4242/ns/net")));
    assert!(has(LinuxNamespaceType::Uts, Some("/proc/4242/ns/uts")));
    assert!(has(LinuxNamespaceType::Ipc, Some("/proc/4242/ns/ipc")));
    // pid mode POD (0) is the CRI default value: the pod shares a pid namespace.
    assert!(has(LinuxNamespaceType::Pid, Some("/proc/4242/ns/pid")));
    assert!(!ns.iter().any(|(t, _)| *t == LinuxNamespaceType::User));
    assert_eq!(s.hostname().as_deref(), Some("web-host"));
}

#[test]
fn container_pid_namespace_host_network_and_target() {
    let sc = LinuxContainerSecurityContext {
        namespace_options: Some(NamespaceOption {
            pid: NamespaceMode::Container as i32,
            ipc: NamespaceMode::Node as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut p = pod();
    if let Some(l) = p.linux.as_mut() {
        l.security_context = Some(LinuxSandboxSecurityContext {
            namespace_options: Some(NamespaceOption {
                network: NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let s = build_ok(&p, &with_sc(ctr(), sc), &image("", &["/e"], &[]));
    let ns = ns_of(&s);
    assert!(ns.contains(&(LinuxNamespaceType::Pid, None)));
    assert!(!ns.iter().any(|(t, _)| matches!(
        t,
        LinuxNamespaceType::Network | LinuxNamespaceType::Uts | LinuxNamespaceType::Ipc
    )));
    assert!(
        s.hostname().is_none(),
        "host network keeps the host's hostname"
    );

    let target = LinuxContainerSecurityContext {
        namespace_options: Some(NamespaceOption {
            pid: NamespaceMode::Target as i32,
            target_id: "other".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let e = build(
        &pod(),
        &with_sc(ctr(), target.clone()),
        &image("", &["/e"], &[]),
        &ctx(),
        &FakeHost,
    )
    .expect_err("target not running");
    assert!(e.to_string().contains("target_id"), "{e}");
    let mut cx = ctx();
    cx.target_pid = Some(777);
    let s = build(
        &pod(),
        &with_sc(ctr(), target),
        &image("", &["/e"], &[]),
        &cx,
        &FakeHost,
    )
    .expect("ok");
    assert!(ns_of(&s).contains(&(
        LinuxNamespaceType::Pid,
        Some(PathBuf::from("/proc/777/ns/pid"))
    )));
}

#[test]
fn cgroups_path_comes_from_the_placement_function() {
    let s = build_ok(&pod(), &ctr(), &image("", &["/e"], &[]));
    let path = s
        .linux()
        .clone()
        .and_then(|l| l.cgroups_path().clone())
        .expect("path");
    let want = crisp_shim::placement::cgroup_path(
        crisp_shim::placement::CgroupDriver::Cgroupfs,
        "/kubepods/besteffort/poduid-1",
        "c1",
    )
    .expect("placement");
    assert_eq!(path, PathBuf::from(want));
    let mut cx = ctx();
    cx.cgroup_driver = CgroupDriver::Systemd;
    let mut p = pod();
    if let Some(l) = p.linux.as_mut() {
        l.cgroup_parent = "kubepods-besteffort-poduid1.slice".into();
    }
    let s = build(&p, &ctr(), &image("", &["/e"], &[]), &cx, &FakeHost).expect("systemd");
    let path = s
        .linux()
        .clone()
        .and_then(|l| l.cgroups_path().clone())
        .expect("path");
    assert!(
        path.to_string_lossy()
            .starts_with("kubepods-besteffort-poduid1.slice:"),
        "{path:?}"
    );
}

#[test]
fn annotations_identify_pod_and_container() {
    let s = build_ok(&pod(), &ctr(), &image("", &["/e"], &[]));
    let a = s.annotations().clone().expect("annotations");
    assert_eq!(a[ANN_SANDBOX_ID], "p1");
    assert_eq!(a[ANN_CONTAINER_TYPE], "container");
    assert_eq!(a[ANN_CONTAINER_NAME], "app");
    assert_eq!(a[ANN_SANDBOX_NAMESPACE], "default");
    assert_eq!(a[ANN_IMAGE_NAME], "docker.io/library/busybox:latest");
    // The shim groups tasks by the same key.
    assert_eq!(ANN_SANDBOX_ID, crisp_shim::spec::SANDBOX_ID_ANNOTATION);
}

#[test]
fn user_namespace_mappings_and_join() {
    let map = PodIdMap {
        uids: vec![pb::IdMapping {
            host_id: 100000,
            container_id: 0,
            length: 65536,
        }],
        gids: vec![pb::IdMapping {
            host_id: 200000,
            container_id: 0,
            length: 65536,
        }],
        allocated: true,
    };
    let mut cx = ctx();
    cx.idmap = Some(&map);
    let s = build(&pod(), &ctr(), &image("", &["/e"], &[]), &cx, &FakeHost).expect("ok");
    let l = s.linux().clone().expect("linux");
    let u = l.uid_mappings().clone().expect("uids");
    assert_eq!(
        (u[0].host_id(), u[0].container_id(), u[0].size()),
        (100000, 0, 65536)
    );
    assert_eq!(l.gid_mappings().clone().expect("gids")[0].host_id(), 200000);
    assert!(ns_of(&s).contains(&(
        LinuxNamespaceType::User,
        Some(PathBuf::from("/proc/4242/ns/user"))
    )));
}

#[test]
fn spec_serialises_to_valid_oci_json() {
    let s = build_ok(&pod(), &ctr(), &image("app", &["/e"], &["x"]));
    let v = serde_json::to_value(&s).expect("json");
    assert_eq!(v["root"]["path"], "rootfs");
    assert_eq!(v["process"]["user"]["uid"], 1000);
    assert!(v["linux"]["namespaces"].is_array());
    let back: Spec = serde_json::from_value(v).expect("round trip");
    assert_eq!(back, s);
}

// ---- capabilities crispd itself holds ----

#[test]
fn cap_eff_parsing_keeps_known_bits_only() {
    let status = "Name:\tcrispd\nCapInh:\t0000000000000000\nCapPrm:\t000001fffeffffff\n\
                  CapEff:\t000021fffeffffff\nCapBnd:\t000001fffeffffff\n";
    let bits = parse_cap_eff(status).expect("CapEff");
    assert_eq!(bits, 0x0000_21ff_feff_ffff);
    let caps = caps_from_bitmap(bits);
    assert_eq!(
        caps.len(),
        ALL_CAPS.len() - 1,
        "bit 45 is unknown, bit 24 unset"
    );
    assert!(!caps.contains(&cap("SYS_RESOURCE")));
    assert!(caps.contains(&cap("CHOWN")) && caps.contains(&cap("CHECKPOINT_RESTORE")));
    assert_eq!(parse_cap_eff("Name:\tx\n"), None);
}

#[test]
fn privileged_gets_exactly_the_caps_crispd_holds() {
    let sc = LinuxContainerSecurityContext {
        privileged: true,
        capabilities: Some(PbCap {
            drop_capabilities: vec!["CHOWN".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let s = build_ok(
        &privileged_pod(),
        &with_sc(ctr(), sc),
        &image("", &["/e"], &[]),
    );
    let c = s
        .process()
        .as_ref()
        .and_then(|p| p.capabilities().clone())
        .expect("caps");
    let want = caps_from_bitmap(FAKE_CAP_EFF);
    assert_eq!(c.bounding().clone(), Some(want.clone()));
    assert_eq!(c.effective().clone(), Some(want.clone()));
    assert_eq!(c.permitted().clone(), Some(want));
    assert!(!caps_of(&s).contains(&cap("SYS_RESOURCE")));
}

#[test]
fn add_all_is_the_caps_crispd_holds_then_drop_all_wins() {
    let with_caps = |add: &[&str], drop: &[&str]| {
        let sc = LinuxContainerSecurityContext {
            capabilities: Some(PbCap {
                add_capabilities: add.iter().map(|s| s.to_string()).collect(),
                drop_capabilities: drop.iter().map(|s| s.to_string()).collect(),
                add_ambient_capabilities: vec![],
            }),
            ..Default::default()
        };
        caps_of(&build_ok(
            &pod(),
            &with_sc(ctr(), sc),
            &image("", &["/e"], &[]),
        ))
    };
    let mut want = caps_from_bitmap(FAKE_CAP_EFF);
    assert_eq!(with_caps(&["ALL"], &[]), want);
    want.remove(&cap("CHOWN"));
    assert_eq!(with_caps(&["all"], &["CHOWN"]), want);
    // containerd applies add ALL before drop ALL: both together leave only the single adds.
    assert_eq!(
        with_caps(&["ALL", "KILL"], &["ALL"]),
        HashSet::from([cap("KILL")])
    );
    // A single add crispd lacks is passed on, as containerd does (runc then refuses it).
    assert!(with_caps(&["SYS_RESOURCE"], &[]).contains(&cap("SYS_RESOURCE")));
}

#[test]
fn run_as_group_without_user_is_invalid() {
    let sc = LinuxContainerSecurityContext {
        run_as_group: Some(Int64Value { value: 3000 }),
        ..Default::default()
    };
    let e = build(
        &pod(),
        &with_sc(ctr(), sc.clone()),
        &image("app", &["/e"], &[]),
        &ctx(),
        &FakeHost,
    )
    .expect_err("group without user");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(
        e.to_string()
            .contains("linux.security_context.run_as_group")
            && e.to_string().contains("3000"),
        "{e}"
    );
    let by_name = LinuxContainerSecurityContext {
        run_as_username: "app".into(),
        ..sc
    };
    let s = build_ok(&pod(), &with_sc(ctr(), by_name), &image("", &["/e"], &[]));
    assert_eq!(user_of(&s).0, 1000);
    assert_eq!(user_of(&s).1, 3000);
}

#[test]
fn volume_propagation_sets_the_root_propagation_as_containerd() {
    let with_props = |props: &[MountPropagation]| {
        let mut c = ctr();
        c.mounts = props
            .iter()
            .enumerate()
            .map(|(i, p)| PbMount {
                container_path: format!("/v{i}"),
                host_path: format!("/host/v{i}"),
                propagation: *p as i32,
                ..Default::default()
            })
            .collect();
        let s = build_ok(&pod(), &c, &image("", &["/e"], &[]));
        s.linux()
            .as_ref()
            .and_then(|l| l.rootfs_propagation().clone())
    };
    assert_eq!(with_props(&[]), None);
    assert_eq!(with_props(&[MountPropagation::PropagationPrivate]), None);
    assert_eq!(
        with_props(&[MountPropagation::PropagationHostToContainer]).as_deref(),
        Some("rslave")
    );
    assert_eq!(
        with_props(&[
            MountPropagation::PropagationHostToContainer,
            MountPropagation::PropagationBidirectional
        ])
        .as_deref(),
        Some("rshared")
    );
}

#[test]
fn image_volume_is_a_read_only_bind_of_the_prepared_dir() {
    let mut c = ctr();
    c.mounts = vec![pb::Mount {
        container_path: "/vol/".into(),
        image: Some(pb::ImageSpec {
            image: "busybox".into(),
            ..Default::default()
        }),
        readonly: false,
        ..Default::default()
    }];
    let mut x = ctx();
    x.image_volumes = vec![(0, "/run/crisp/image-volumes/c1/0/data".into())];
    let m = mounts(&c, &x, false).expect("mounts");
    let v = m
        .iter()
        .find(|m| m.destination() == Path::new("/vol"))
        .expect("volume mount");
    assert_eq!(
        v.source().as_deref(),
        Some(Path::new("/run/crisp/image-volumes/c1/0/data"))
    );
    let opts = v.options().clone().unwrap_or_default();
    assert!(opts.iter().any(|o| o == "ro"), "{opts:?}");
    // Not prepared: refused naming the field, never a bind of nothing.
    let e = mounts(&c, &ctx(), false).expect_err("unprepared");
    assert!(e.to_string().contains("mounts[0].image"), "{e}");
}
