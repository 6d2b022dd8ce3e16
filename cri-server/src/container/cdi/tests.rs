use super::*;
use crate::container::spec::DeviceInfo;

struct Host;
impl HostInfo for Host {
    fn device(&self, path: &Path) -> Result<DeviceInfo, String> {
        if path == Path::new("/dev/null") {
            Ok(DeviceInfo {
                path: path.into(),
                kind: 'c',
                major: 1,
                minor: 3,
                mode: 0o666,
                uid: 0,
                gid: 0,
            })
        } else {
            Err("no such device".into())
        }
    }
    fn host_devices(&self) -> Vec<DeviceInfo> {
        Vec::new()
    }
    fn read_profile(&self, _: &Path) -> Result<String, String> {
        Err("none".into())
    }
    fn current_caps(&self) -> oci_spec::runtime::Capabilities {
        Default::default()
    }
}

const YAML: &str = r#"
cdiVersion: "0.6.0"
kind: crisp.test/gpu
containerEdits:
  env: ["GPU_COMMON=1"]
devices:
  - name: g0
    containerEdits:
      env: ["GPU=g0"]
      deviceNodes:
        - path: /dev/crisp-gpu0
          hostPath: /dev/null
      mounts:
        - hostPath: /opt/gpu
          containerPath: /usr/local/gpu
          options: ["ro", "rbind"]
      hooks:
        - hookName: createContainer
          path: /bin/true
          args: ["true", "x"]
"#;

fn spec() -> Spec {
    let mut s = Spec::default();
    s.set_mounts(Some(Vec::new()));
    s
}

#[test]
fn names() {
    assert_eq!(
        parse_name("crisp.test/gpu=g0").expect("ok"),
        ("crisp.test/gpu", "g0")
    );
    for bad in [
        "gpu",
        "crisp.test=g0",
        "/gpu=g0",
        "crisp.test/gpu=",
        "a/b=c d",
    ] {
        let e = parse_name(bad).expect_err(bad);
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
    }
}

#[test]
fn yaml_spec_edits_are_applied() {
    let t = tempfile::tempdir().expect("tmp");
    std::fs::write(t.path().join("gpu.yaml"), YAML).expect("write");
    let mut s = spec();
    apply(
        &mut s,
        &["crisp.test/gpu=g0".into()],
        &[t.path().to_path_buf()],
        &Host,
    )
    .expect("apply");
    let env = s
        .process()
        .as_ref()
        .and_then(|p| p.env().clone())
        .unwrap_or_default();
    assert!(env.contains(&"GPU=g0".to_string()), "{env:?}");
    assert!(env.contains(&"GPU_COMMON=1".to_string()), "{env:?}");
    let linux = s.linux().as_ref().expect("linux");
    let dev = linux
        .devices()
        .as_ref()
        .and_then(|d| d.iter().find(|d| d.path() == Path::new("/dev/crisp-gpu0")))
        .expect("device");
    assert_eq!((dev.major(), dev.minor()), (1, 3));
    let rules = linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().clone())
        .unwrap_or_default();
    assert!(
        rules
            .iter()
            .any(|r| r.allow() && r.major() == Some(1) && r.minor() == Some(3))
    );
    let m = s.mounts().as_ref().expect("mounts");
    assert!(
        m.iter()
            .any(|m| m.destination() == Path::new("/usr/local/gpu")
                && m.source().as_deref() == Some(Path::new("/opt/gpu")))
    );
    let hooks = s
        .hooks()
        .as_ref()
        .and_then(|h| h.create_container().clone());
    assert_eq!(hooks.map(|h| h.len()), Some(1));
}

#[test]
fn unknown_device_and_bad_files_name_what_failed() {
    let t = tempfile::tempdir().expect("tmp");
    std::fs::write(t.path().join("gpu.yaml"), YAML).expect("write");
    let e = apply(
        &mut spec(),
        &["crisp.test/gpu=g9".into()],
        &[t.path().into()],
        &Host,
    )
    .expect_err("unknown");
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(e.to_string().contains("crisp.test/gpu=g9"), "{e}");
    assert!(
        e.to_string().contains(&t.path().display().to_string()),
        "{e}"
    );

    std::fs::write(t.path().join("broken.json"), "{ not json").expect("write");
    let e = apply(
        &mut spec(),
        &["crisp.test/gpu=g0".into()],
        &[t.path().into()],
        &Host,
    )
    .expect_err("broken");
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(e.to_string().contains("broken.json"), "{e}");
    assert!(e.to_string().contains("crisp.test/gpu=g0"), "{e}");
    std::fs::remove_file(t.path().join("broken.json")).expect("rm");

    // An edit crispd does not apply is refused, not dropped.
    std::fs::write(
        t.path().join("rdt.yaml"),
        "cdiVersion: \"0.6.0\"\nkind: crisp.test/rdt\ndevices:\n  - name: r\n    containerEdits:\n      intelRdt: {closID: x}\n",
    )
    .expect("write");
    let e = apply(
        &mut spec(),
        &["crisp.test/gpu=g0".into()],
        &[t.path().into()],
        &Host,
    )
    .expect_err("intelRdt");
    assert!(e.to_string().contains("rdt.yaml"), "{e}");
}

#[test]
fn later_dirs_override_and_annotations_add_devices() {
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    std::fs::write(a.path().join("gpu.yaml"), YAML).expect("write");
    std::fs::write(
        b.path().join("gpu.yaml"),
        YAML.replace("GPU=g0", "GPU=override"),
    )
    .expect("w");
    let mut s = spec();
    apply(
        &mut s,
        &["crisp.test/gpu=g0".into()],
        &[a.path().into(), b.path().into()],
        &Host,
    )
    .expect("apply");
    let env = s
        .process()
        .as_ref()
        .and_then(|p| p.env().clone())
        .unwrap_or_default();
    assert!(env.contains(&"GPU=override".to_string()), "{env:?}");

    let cfg = crisp_proto::cri::v1::ContainerConfig {
        cdi_devices: vec![crisp_proto::cri::v1::CdiDevice {
            name: "crisp.test/gpu=g0".into(),
        }],
        annotations: [(
            "cdi.k8s.io/plugin".to_string(),
            "crisp.test/gpu=g0, crisp.test/gpu=g1".to_string(),
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    assert_eq!(
        requested(&cfg),
        vec!["crisp.test/gpu=g0", "crisp.test/gpu=g1"]
    );
}
