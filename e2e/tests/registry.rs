//! The test images and the local registry, checked from the outside with skopeo and plain
//! HTTP: what every other end-to-end test relies on.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use crisp_e2e::images::{self, BUSYBOX, BUSYBOX_ZSTD, LARGE, LAYERS, MULTIARCH, PAUSE, USER};
use crisp_e2e::registry::Registry;
use serde_json::Value;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// `skopeo inspect --tls-verify=false [args] docker://<reference>` as JSON.
fn skopeo_inspect(args: &[&str], reference: &str) -> Result<Value> {
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .args(args)
        .arg(format!("docker://{reference}"))
        .output()
        .context("running skopeo (Debian package skopeo)")?;
    if !out.status.success() {
        bail!(
            "skopeo inspect {args:?} {reference}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("skopeo inspect {args:?} {reference}: not JSON"))
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn serves_every_test_image_as_built() -> Result<()> {
    let registry = Registry::start()?;
    let host = registry.host();
    let (pid, dir) = (registry.pid(), registry.dir().to_path_buf());
    assert!(host.starts_with("127.0.0.1:"), "{host}");
    registry.push_test_images()?;

    // Every image, under every tag, resolves to the digest of its layout.
    for image in images::ALL {
        let want = image.digest()?;
        for tag in image.tags {
            let r = registry.request(
                "HEAD",
                &format!("/v2/{}/manifests/{tag}", image.repository),
                Some(ACCEPT_ALL),
            )?;
            assert_eq!(r.status, 200, "{}:{tag}", image.repository);
            assert_eq!(
                r.header("docker-content-digest"),
                Some(want.as_str()),
                "{}:{tag}",
                image.repository
            );
        }
        assert!(image.archive()?.is_file(), "{} has no archive", image.name);
    }

    // busybox: an OCI manifest whose config runs sh.
    let manifest = skopeo_inspect(&["--raw"], &BUSYBOX.reference(&host))?;
    assert_eq!(
        manifest["mediaType"].as_str().unwrap_or(OCI_MANIFEST),
        OCI_MANIFEST
    );
    let config = skopeo_inspect(&["--config"], &format!("{host}/library/busybox:1.36"))?;
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["sh"]));
    assert_eq!(config["architecture"], "amd64");

    // layers: at least 4 layers (the unpacker features are asserted by build.sh).
    let manifest = skopeo_inspect(&["--raw"], &LAYERS.reference(&host))?;
    let n = manifest["layers"].as_array().map_or(0, Vec::len);
    assert!(n >= 4, "layers has {n} layers");

    // user: USER 1000:1000.
    let config = skopeo_inspect(&["--config"], &USER.reference(&host))?;
    assert_eq!(config["config"]["User"], "1000:1000");

    // multiarch: an index with linux/amd64 and linux/arm64, each a distinct manifest.
    let index = skopeo_inspect(&["--raw"], &MULTIARCH.reference(&host))?;
    assert_eq!(index["mediaType"], OCI_INDEX);
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .context("index without manifests")?
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap_or("?"),
                m["platform"]["architecture"].as_str().unwrap_or("?")
            )
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    let arm = skopeo_inspect(
        &[
            "--config",
            "--override-arch",
            "arm64",
            "--override-variant",
            "v8",
        ],
        &MULTIARCH.reference(&host),
    )?;
    assert_eq!(arm["architecture"], "arm64");

    // busybox-zstd: every layer zstd.
    let manifest = skopeo_inspect(&["--raw"], &BUSYBOX_ZSTD.reference(&host))?;
    let types: Vec<&str> = manifest["layers"]
        .as_array()
        .context("no layers")?
        .iter()
        .filter_map(|l| l["mediaType"].as_str())
        .collect();
    assert!(
        !types.is_empty()
            && types
                .iter()
                .all(|t| *t == "application/vnd.oci.image.layer.v1.tar+zstd"),
        "{types:?}"
    );

    // large: one layer of at least 200 MiB, and the blob really downloads at that size.
    let manifest = skopeo_inspect(&["--raw"], &LARGE.reference(&host))?;
    let big = manifest["layers"]
        .as_array()
        .context("no layers")?
        .iter()
        .max_by_key(|l| l["size"].as_u64().unwrap_or(0))
        .context("no layers")?;
    assert!(big["size"].as_u64().unwrap_or(0) >= 200 << 20, "{big}");
    let digest = big["digest"].as_str().context("no digest")?;
    let blob = registry.request(
        "HEAD",
        &format!("/v2/{}/blobs/{digest}", LARGE.repository),
        None,
    )?;
    assert_eq!(blob.status, 200);
    assert_eq!(
        blob.header("content-length")
            .and_then(|l| l.parse::<u64>().ok()),
        big["size"].as_u64()
    );

    // pause: the sandbox image under the upstream path, both tags kubelet and containerd use.
    for tag in ["3.6", "3.9"] {
        let config = skopeo_inspect(&["--config"], &format!("{host}/{}:{tag}", PAUSE.repository))?;
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!(["/pause"])
        );
    }

    // The access log counts what was asked.
    let requests = registry.requests()?;
    assert!(
        requests
            .iter()
            .any(|r| r == "GET /v2/library/busybox/manifests/latest 200"),
        "busybox manifest GET not in the access log: {requests:?}"
    );

    registry.stop()?;
    assert!(
        !process_exists(pid),
        "docker-registry pid {pid} still running"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
    Ok(())
}

#[test]
fn push_makes_only_the_named_images_available() -> Result<()> {
    let registry = Registry::start()?;
    registry.push(&["busybox", "pause"])?;
    registry.push(&["busybox"])?; // idempotent
    let busybox = registry.get("/v2/library/busybox/manifests/latest", Some(ACCEPT_ALL))?;
    assert_eq!(busybox.status, 200);
    assert_eq!(busybox.json()?["schemaVersion"], 2);
    assert_eq!(
        registry
            .get("/v2/pause/manifests/3.6", Some(ACCEPT_ALL))?
            .status,
        200
    );
    assert_eq!(
        registry
            .get("/v2/library/layers/manifests/latest", Some(ACCEPT_ALL))?
            .status,
        404
    );
    assert!(registry.push(&["no-such-image"]).is_err());
    Ok(())
}

#[test]
fn deletes_do_not_reach_the_seed_or_other_registries() -> Result<()> {
    let a = Registry::start()?;
    let b = Registry::start()?;
    assert_ne!(a.host(), b.host());
    a.push(&["busybox"])?;
    b.push(&["busybox"])?;
    let digest = BUSYBOX.digest()?;
    let del = a.request(
        "DELETE",
        &format!("/v2/library/busybox/manifests/{digest}"),
        None,
    )?;
    assert_eq!(del.status, 202, "delete is enabled");
    assert_eq!(
        a.get("/v2/library/busybox/manifests/latest", Some(ACCEPT_ALL))?
            .status,
        404
    );
    assert_eq!(
        b.get("/v2/library/busybox/manifests/latest", Some(ACCEPT_ALL))?
            .status,
        200
    );
    let c = Registry::start()?;
    c.push(&["busybox"])?;
    assert_eq!(
        c.get("/v2/library/busybox/manifests/latest", Some(ACCEPT_ALL))?
            .status,
        200
    );
    Ok(())
}

#[test]
fn drop_stops_the_registry_and_removes_its_files() -> Result<()> {
    let (pid, dir) = {
        let registry = Registry::start()?;
        registry.push(&["large"])?;
        assert!(process_exists(registry.pid()));
        (registry.pid(), registry.dir().to_path_buf())
    };
    assert!(
        !process_exists(pid),
        "docker-registry pid {pid} still running after drop"
    );
    assert!(!dir.exists(), "{} left behind after drop", dir.display());
    // The seed keeps what the dropped registry hard-linked.
    assert!(LARGE.layout()?.join("index.json").is_file());
    Ok(())
}

#[test]
fn pushes_a_layout_with_skopeo() -> Result<()> {
    let registry = Registry::start()?;
    registry.push_layout(&USER.layout()?, USER.tag(), "crisp/pushed:v1")?;
    let r = registry.request("HEAD", "/v2/crisp/pushed/manifests/v1", Some(ACCEPT_ALL))?;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-content-digest"),
        Some(USER.digest()?.as_str())
    );
    Ok(())
}
