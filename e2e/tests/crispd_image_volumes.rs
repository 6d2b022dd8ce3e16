//! Image volumes (KEP-4639) end to end through CRI with runc: a `Mount` whose `image` names a
//! pulled image is that image, read-only, at `container_path`.
//!
//! The volume image is built by the test: two layers (so the view is an overlay, the second
//! layer replacing a file of the first), a directory and file owned by 1234:1234, a
//! sub-directory, a symlink staying inside, and symlinks leading out (relative and absolute).
//!
//! - A container in a plain pod with two volumes (the whole image, and `data/sub` by
//!   `image_sub_path`) reads the files, sees the image's owners (0:0 and 1234:1234), and a
//!   write to either fails with EROFS ("Read-only file system").
//! - A container in a user-namespaced pod sees the same owners through the idmapped view (an
//!   unmapped one would show 65534), through a sub-path reached by a symlink inside the image.
//! - RemoveImage of the mounted image is FailedPrecondition naming the container.
//! - Bad sub-paths (`../x`, `/data`, a symlink leading out, an absolute symlink, a file, a
//!   missing path) are InvalidArgument naming `mounts[1].image_sub_path` and the value, and
//!   leave no container and no mount.
//! - crispd killed with -9 and restarted keeps the volumes of recorded containers and
//!   releases those of a container whose record is gone (deleted offline from crisp.db, as a
//!   crash inside CreateContainer leaves it); removing the pods unmounts the rest (mountinfo
//!   shows nothing under the volumes dir), and then RemoveImage succeeds.

use anyhow::{Context, Result, bail, ensure};
use crisp_e2e::cri::{self, container_config, expect_code, image_spec};
use crisp_e2e::harness::{RuntimeKind, TestEnv};
use crisp_e2e::leaks;
use crisp_e2e::oci_build::{ArtifactBuilder, Entry, ImageBuilder};
use crisp_e2e::registry::Registry;
use crisp_proto::cri::v1 as api;

const BUSYBOX: &str = "docker.io/library/busybox:latest";
const VOLIMG: &str = "docker.io/library/volimg:v1";
const OWNER: u64 = 1234;

fn volume_image(dir: &std::path::Path) -> Result<()> {
    let d = |path, uid, gid| Entry::Dir {
        path,
        uid,
        gid,
        mode: 0o755,
    };
    let f = |path, content, uid, gid| Entry::File {
        path,
        content,
        uid,
        gid,
        mode: 0o644,
    };
    ImageBuilder::empty()
        .layer(&[
            d("data", 0, 0),
            f("data/hello.txt", "hello from layer one\n", 0, 0),
            d("data/owned", OWNER, OWNER),
            f("data/owned/mine.txt", "mine\n", OWNER, OWNER),
            f("data/file.txt", "a file\n", 0, 0),
            Entry::Symlink {
                path: "data/inside",
                target: "owned",
            },
            Entry::Symlink {
                path: "data/escape",
                target: "../../../../../../etc",
            },
            Entry::Symlink {
                path: "data/abs",
                target: "/etc",
            },
        ])?
        .layer(&[
            d("data/sub", 0, 0),
            f("data/sub/inner.txt", "inner\n", 0, 0),
            f("data/hello.txt", "hello from layer two\n", 0, 0),
        ])?
        .write(dir, "v1")
}

fn image_mount(path: &str, sub: &str) -> api::Mount {
    api::Mount {
        container_path: path.into(),
        image: Some(image_spec(VOLIMG)),
        image_sub_path: sub.into(),
        readonly: true,
        ..Default::default()
    }
}

/// `stat -c %u:%g` of `path` in the container.
async fn owner(env: &TestEnv, id: &str, path: &str) -> Result<String> {
    Ok(env
        .cri()
        .exec_ok(id, &["stat", "-c", "%u:%g", path])
        .await?
        .trim()
        .to_string())
}

/// A write to `path` must fail with EROFS.
async fn write_fails_erofs(env: &TestEnv, id: &str, path: &str) -> Result<()> {
    let r = env
        .cri()
        .exec_sync(id, &["sh", "-c", &format!("echo x > {path}")], 30)
        .await?;
    let err = String::from_utf8_lossy(&r.stderr);
    ensure!(
        r.exit_code != 0 && err.contains("Read-only file system"),
        "writing {path} in {id}: exit {} stderr {err:?}, want EROFS",
        r.exit_code
    );
    Ok(())
}

/// The plain pod's container: the whole image at /img and `data/sub` at /sub.
async fn plain(env: &TestEnv) -> Result<(String, String, api::PodSandboxConfig)> {
    let cfg = env.pod_config("imgvol")?;
    let pod = env.cri().run_pod(&cfg).await?;
    let mut cc = container_config("main", BUSYBOX, &["sleep", "3600"]);
    cc.mounts = vec![image_mount("/img", ""), image_mount("/sub", "data/sub")];
    let c = env.cri().run_container(&pod, &cc, &cfg).await?;
    let cat = |p: &'static str| {
        let c = c.clone();
        async move { env.cri().exec_ok(&c, &["cat", p]).await }
    };
    ensure!(cat("/img/data/hello.txt").await? == "hello from layer two\n");
    ensure!(cat("/img/data/owned/mine.txt").await? == "mine\n");
    ensure!(cat("/sub/inner.txt").await? == "inner\n");
    let ls = env.cri().exec_ok(&c, &["ls", "/sub"]).await?;
    ensure!(
        ls.trim() == "inner.txt",
        "/sub lists {ls:?}: not just data/sub"
    );
    ensure!(owner(env, &c, "/img/data").await? == "0:0");
    ensure!(owner(env, &c, "/img/data/owned/mine.txt").await? == format!("{OWNER}:{OWNER}"));
    write_fails_erofs(env, &c, "/img/data/new.txt").await?;
    write_fails_erofs(env, &c, "/img/data/hello.txt").await?;
    write_fails_erofs(env, &c, "/sub/inner.txt").await?;
    Ok((pod, c, cfg))
}

/// The user-namespaced pod's container: `data/inside` (a symlink to `owned`) at /vol, the
/// whole image at /img; owners as in the image, through the idmapped view.
async fn userns(env: &TestEnv) -> Result<(String, String)> {
    let cfg = env.userns_pod_config("imgvol-userns")?;
    let pod = env.cri().run_pod(&cfg).await?;
    let mut cc = container_config("main", BUSYBOX, &["sleep", "3600"]);
    cc.mounts = vec![image_mount("/vol", "data/inside"), image_mount("/img", "")];
    let c = env.cri().run_container(&pod, &cc, &cfg).await?;
    ensure!(env.cri().exec_ok(&c, &["cat", "/vol/mine.txt"]).await? == "mine\n");
    let want = format!("{OWNER}:{OWNER}");
    ensure!(
        owner(env, &c, "/vol").await? == want,
        "/vol owner in the userns pod"
    );
    ensure!(owner(env, &c, "/vol/mine.txt").await? == want);
    let root = owner(env, &c, "/img/data").await?;
    ensure!(
        root == "0:0",
        "/img/data in the userns pod is owned by {root}, want 0:0 (65534 = not idmapped)"
    );
    write_fails_erofs(env, &c, "/vol/mine.txt").await?;
    Ok((pod, c))
}

async fn bad_sub_paths(env: &TestEnv, pod: &str, cfg: &api::PodSandboxConfig) -> Result<()> {
    let before = env.cri().list_containers(None).await?.len();
    let mounts_before = leaks::mounts_under(&env.state.join("image-volumes")).len();
    for sub in [
        "../x",
        "/data",
        "data/escape",
        "data/abs",
        "data/file.txt",
        "data/missing",
    ] {
        let mut cc = container_config(&format!("bad-{}", cri::random_hex(4)), BUSYBOX, &["true"]);
        cc.mounts = vec![image_mount("/img", ""), image_mount("/bad", sub)];
        let r = env
            .cri()
            .runtime()
            .create_container(cri::req::create_container(pod, &cc, cfg))
            .await;
        expect_code(
            &format!("sub-path {sub:?}"),
            r,
            tonic::Code::InvalidArgument,
            &["mounts[1].image_sub_path", sub],
        )?;
    }
    let after = env.cri().list_containers(None).await?.len();
    ensure!(
        after == before,
        "refused creates left containers: {before} → {after}"
    );
    let left = leaks::mounts_under(&env.state.join("image-volumes"));
    ensure!(
        left.len() == mounts_before,
        "refused creates left mounts: {left:?}"
    );
    Ok(())
}

/// Deletes container `key` from crisp.db's `containers` table (crispd must be down: redb locks
/// the file), as a crash inside CreateContainer before its record was written would leave it.
fn delete_container_record(db: &std::path::Path, key: &str) -> Result<()> {
    const TABLE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("containers");
    let db =
        redb::Database::open(db).with_context(|| format!("opening {} offline", db.display()))?;
    let txn = db.begin_write()?;
    let existed = txn
        .open_table(TABLE)
        .context("crisp.db has no `containers` table")?
        .remove(key)?
        .is_some();
    txn.commit()?;
    ensure!(existed, "crisp.db has no container record {key:?}");
    Ok(())
}

async fn scenario(env: &mut TestEnv) -> Result<()> {
    env.cri().pull(BUSYBOX, None).await?;
    let image_id = env.cri().pull(VOLIMG, None).await?;
    let (pod_a, ctr_a, cfg_a) = plain(env).await?;
    let (pod_b, _ctr_b) = userns(env).await?;
    let vols = env.state.join("image-volumes");
    ensure!(
        leaks::mounts_under(&vols).len() == 4,
        "want 4 image volume mounts, mountinfo has {:?}",
        leaks::mounts_under(&vols)
    );

    let r = env
        .cri()
        .image()
        .remove_image(api::RemoveImageRequest {
            image: Some(image_spec(VOLIMG)),
        })
        .await;
    expect_code(
        "RemoveImage of a mounted image",
        r,
        tonic::Code::FailedPrecondition,
        &[&ctr_a],
    )?;
    bad_sub_paths(env, &pod_a, &cfg_a).await?;

    // A crash: the record carries the volumes across it. A container whose record the crash
    // lost (as if crispd died inside CreateContainer) has its volume released by the
    // start-up sweep.
    let mut lost = container_config("lost", BUSYBOX, &["true"]);
    lost.mounts = vec![image_mount("/img", "data/sub")];
    let lost = env.cri().create_container(&pod_a, &lost, &cfg_a).await?;
    let lost_dir = vols.join(&lost);
    ensure!(
        leaks::mounts_under(&lost_dir).len() == 1,
        "the lost container's volume is not mounted: {:?}",
        leaks::mounts_under(&vols)
    );
    env.kill_daemon()?;
    delete_container_record(&env.crispd_db(), &lost)?;
    env.restart_daemon().await?;
    ensure!(
        leaks::mounts_under(&lost_dir).is_empty() && !lost_dir.exists(),
        "start-up left the recordless container's volume: mounts {:?}, dir exists {}",
        leaks::mounts_under(&lost_dir),
        lost_dir.exists()
    );
    ensure!(
        leaks::mounts_under(&vols).len() == 4,
        "the recorded volumes did not survive the restart: {:?}",
        leaks::mounts_under(&vols)
    );
    ensure!(
        env.cri()
            .exec_ok(&ctr_a, &["cat", "/sub/inner.txt"])
            .await?
            == "inner\n",
        "volume gone after restart"
    );
    let r = env
        .cri()
        .image()
        .remove_image(api::RemoveImageRequest {
            image: Some(image_spec(&image_id)),
        })
        .await;
    expect_code(
        "RemoveImage by id after restart",
        r,
        tonic::Code::FailedPrecondition,
        &[&ctr_a],
    )?;

    env.cri().stop_and_remove_pod(&pod_a).await?;
    env.cri().stop_and_remove_pod(&pod_b).await?;
    let left: Vec<_> = leaks::mounts()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(&vols))
        .collect();
    ensure!(left.is_empty(), "mounts left after the pods: {left:?}");
    let dirs: Vec<_> = std::fs::read_dir(&vols)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    ensure!(dirs.is_empty(), "volume dirs left: {dirs:?}");
    env.cri()
        .remove_image(VOLIMG)
        .await
        .context("RemoveImage once no container mounts it")?;
    if env.cri().image_status(VOLIMG).await?.is_some() {
        bail!("{VOLIMG} still listed after RemoveImage");
    }
    Ok(())
}

/// crispd with user namespaces on (ids from subuid/subgid files in the returned tempdir,
/// which must outlive the env), pulling through `registry`.
async fn userns_crispd(registry: &Registry) -> Result<(tempfile::TempDir, TestEnv)> {
    let ids = tempfile::tempdir()?;
    let (subuid, subgid) = (ids.path().join("subuid"), ids.path().join("subgid"));
    std::fs::write(&subuid, "crisp:3000000:131072\n")?;
    std::fs::write(&subgid, "crisp:5000000:131072\n")?;
    let env = TestEnv::builder(RuntimeKind::Crispd)
        .mirror(registry.host())
        .crispd_config(format!(
            "[userns]\nuser = \"crisp\"\nsubuid_file = \"{}\"\nsubgid_file = \"{}\"\n",
            subuid.display(),
            subgid.display()
        ))
        .start()
        .await?;
    Ok((ids, env))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crispd_image_volumes_read_only_idmapped_sub_paths_and_release() -> Result<()> {
    let registry = Registry::start()?;
    registry.push(&["busybox"])?;
    let layout = tempfile::tempdir()?;
    volume_image(layout.path())?;
    registry.push_layout(layout.path(), "v1", "library/volimg:v1")?;
    let (_ids, mut env) = userns_crispd(&registry).await?;
    let outcome = scenario(&mut env).await;
    env.finish("crispd", outcome).await
}

const ARTIFACT: &str = "docker.io/library/artvol:v1";

/// The artifact the artifact test mounts: a file at the top and two under `config/` (titles
/// with a directory, as `oras push config/app.yaml` makes them).
fn artifact() -> ArtifactBuilder {
    ArtifactBuilder::new()
        .file("hello.txt", b"hello from an artifact\n")
        .file("config/app.yaml", b"key: value\n")
        .file("config/extra.json", b"{\"n\": 1}\n")
}

fn artifact_mount(path: &str, sub: &str) -> api::Mount {
    api::Mount {
        image: Some(image_spec(ARTIFACT)),
        ..image_mount(path, sub)
    }
}

/// ListImages and ImageStatus show the artifact under its tag and repo digest, id = manifest.
async fn artifact_listed(env: &TestEnv, manifest: &str) -> Result<()> {
    let listed = env
        .cri()
        .image()
        .list_images(api::ListImagesRequest::default())
        .await?
        .into_inner()
        .images;
    ensure!(
        listed.iter().any(|i| i.id == manifest),
        "ListImages has no image with id {manifest}: {listed:?}"
    );
    let st = env
        .cri()
        .image_status(ARTIFACT)
        .await?
        .context("ImageStatus of the pulled artifact is empty")?;
    let digest_ref = format!("docker.io/library/artvol@{manifest}");
    ensure!(
        st.id == manifest
            && st.repo_tags == [ARTIFACT]
            && st.repo_digests == [digest_ref.clone()]
            && st.size > 0,
        "ImageStatus of the artifact: {st:?}, want id {manifest}, tag {ARTIFACT}, digest {digest_ref}"
    );
    Ok(())
}

/// A plain pod's container with the artifact at /art and its `config` directory at /cfg.
async fn artifact_plain(env: &TestEnv) -> Result<(String, String, api::PodSandboxConfig)> {
    let cfg = env.pod_config("artvol")?;
    let pod = env.cri().run_pod(&cfg).await?;
    let mut cc = container_config("main", BUSYBOX, &["sleep", "3600"]);
    cc.mounts = vec![artifact_mount("/art", ""), artifact_mount("/cfg", "config")];
    let c = env.cri().run_container(&pod, &cc, &cfg).await?;
    for (path, want) in [
        ("/art/hello.txt", "hello from an artifact\n"),
        ("/art/config/app.yaml", "key: value\n"),
        ("/cfg/app.yaml", "key: value\n"),
        ("/cfg/extra.json", "{\"n\": 1}\n"),
    ] {
        let got = env.cri().exec_ok(&c, &["cat", path]).await?;
        ensure!(got == want, "{path} reads {got:?}, want {want:?}");
    }
    let ls = env.cri().exec_ok(&c, &["ls", "/art", "/cfg"]).await?;
    ensure!(
        ls == "/art:\nconfig\nhello.txt\n\n/cfg:\napp.yaml\nextra.json\n",
        "the volumes list {ls:?}: want exactly the artifact's files"
    );
    ensure!(owner(env, &c, "/art/hello.txt").await? == "0:0");
    write_fails_erofs(env, &c, "/art/hello.txt").await?;
    write_fails_erofs(env, &c, "/art/new.txt").await?;
    write_fails_erofs(env, &c, "/cfg/app.yaml").await?;
    Ok((pod, c, cfg))
}

/// A user-namespaced pod sees the files owned by root through the idmapped view (an
/// unmapped one would show 65534).
async fn artifact_userns(env: &TestEnv) -> Result<String> {
    let cfg = env.userns_pod_config("artvol-userns")?;
    let pod = env.cri().run_pod(&cfg).await?;
    let mut cc = container_config("main", BUSYBOX, &["sleep", "3600"]);
    cc.mounts = vec![artifact_mount("/art", "")];
    let c = env.cri().run_container(&pod, &cc, &cfg).await?;
    let got = env
        .cri()
        .exec_ok(&c, &["cat", "/art/config/app.yaml"])
        .await?;
    ensure!(got == "key: value\n", "/art/config/app.yaml reads {got:?}");
    for p in ["/art/hello.txt", "/art/config"] {
        let o = owner(env, &c, p).await?;
        ensure!(
            o == "0:0",
            "{p} in the userns pod is owned by {o}, want 0:0 (65534 = not idmapped)"
        );
    }
    write_fails_erofs(env, &c, "/art/hello.txt").await?;
    Ok(pod)
}

/// What must be refused: the artifact as a container's image, sub-paths that leave it or
/// name a file, and RemoveImage while `ctr` mounts it.
async fn artifact_refusals(
    env: &TestEnv,
    pod: &str,
    cfg: &api::PodSandboxConfig,
    ctr: &str,
) -> Result<()> {
    let cc = container_config("as-image", ARTIFACT, &["true"]);
    let r = env
        .cri()
        .runtime()
        .create_container(cri::req::create_container(pod, &cc, cfg))
        .await;
    expect_code(
        "an artifact as a container image",
        r,
        tonic::Code::InvalidArgument,
        &["OCI artifact", ARTIFACT],
    )?;
    for sub in ["../x", "hello.txt", "missing"] {
        let mut cc = container_config(&format!("bad-{}", cri::random_hex(4)), BUSYBOX, &["true"]);
        cc.mounts = vec![artifact_mount("/art", ""), artifact_mount("/bad", sub)];
        let r = env
            .cri()
            .runtime()
            .create_container(cri::req::create_container(pod, &cc, cfg))
            .await;
        expect_code(
            &format!("artifact sub-path {sub:?}"),
            r,
            tonic::Code::InvalidArgument,
            &["mounts[1].image_sub_path", sub],
        )?;
    }
    let r = env
        .cri()
        .image()
        .remove_image(api::RemoveImageRequest {
            image: Some(image_spec(ARTIFACT)),
        })
        .await;
    expect_code(
        "RemoveImage of a mounted artifact",
        r,
        tonic::Code::FailedPrecondition,
        &[ctr],
    )?;
    Ok(())
}

async fn artifact_scenario(env: &mut TestEnv, manifest: &str) -> Result<()> {
    env.cri().pull(BUSYBOX, None).await?;
    let id = env.cri().pull(ARTIFACT, None).await?;
    ensure!(
        id == manifest,
        "PullImage of the artifact returned {id}, want its manifest digest {manifest}"
    );
    artifact_listed(env, manifest).await?;
    // A restart (kill -9) keeps it: start-up's GC must not take its files' snapshot.
    env.kill_daemon()?;
    env.restart_daemon().await?;
    artifact_listed(env, manifest)
        .await
        .context("after crispd was killed and restarted")?;
    let (pod_a, ctr_a, cfg_a) = artifact_plain(env).await?;
    let pod_b = artifact_userns(env).await?;
    let vols = env.state.join("image-volumes");
    ensure!(
        leaks::mounts_under(&vols).len() == 3,
        "want 3 artifact volume mounts, mountinfo has {:?}",
        leaks::mounts_under(&vols)
    );
    artifact_refusals(env, &pod_a, &cfg_a, &ctr_a).await?;
    ensure!(
        leaks::mounts_under(&vols).len() == 3,
        "refused creates left mounts: {:?}",
        leaks::mounts_under(&vols)
    );
    env.cri().stop_and_remove_pod(&pod_a).await?;
    env.cri().stop_and_remove_pod(&pod_b).await?;
    let left = leaks::mounts_under(&vols);
    ensure!(left.is_empty(), "mounts left after the pods: {left:?}");
    env.cri()
        .remove_image(ARTIFACT)
        .await
        .context("RemoveImage of the artifact once no container mounts it")?;
    if let Some(i) = env.cri().image_status(ARTIFACT).await? {
        bail!("{ARTIFACT} still listed after RemoveImage: {i:?}");
    }
    Ok(())
}

/// OCI artifacts as image volumes: pushed to a real registry (docker-registry 2.8 accepts
/// the image-spec 1.1 form: an image manifest with `artifactType` and the empty config),
/// pulled through CRI, kept across a crispd kill -9 and restart, mounted read-only as a
/// directory of their files (a sub-path selects a directory of titles), owned by root in a user-namespaced pod too, refused as a
/// container image and by RemoveImage while mounted, removable once the pods are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crispd_artifact_volumes_files_read_only_idmapped_and_release() -> Result<()> {
    let registry = Registry::start()?;
    registry.push(&["busybox"])?;
    let layout = tempfile::tempdir()?;
    let manifest = artifact().write(layout.path(), "v1")?;
    registry.push_layout(layout.path(), "v1", "library/artvol:v1")?;
    let (_ids, mut env) = userns_crispd(&registry).await?;
    let outcome = artifact_scenario(&mut env, &manifest).await;
    env.finish("crispd", outcome).await
}
