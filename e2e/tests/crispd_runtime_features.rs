//! Status's runtime handler features are what the handlers' OCI runtimes really support, and
//! what is advertised works.
//!
//! - Each handler ("" = the default, here runc, and the named `runc` and `crun`) advertises
//!   user namespaces and recursive read-only mounts exactly when its runtime's own `features`
//!   document lists the `user` namespace and the `rro` mount option (the test reads it
//!   independently; a runtime without a `features` command advertises neither).
//!   RuntimeFeatures.supplemental_groups_policy is on (`status_shapes` proves the policy).
//! - Recursive read-only, advertised for runc, holds under runc: a host directory with a
//!   tmpfs mounted below it, bound `readonly` + `recursive_read_only`, refuses a write into the
//!   tmpfs with EROFS, while the same directory bound only `readonly` leaves the tmpfs
//!   writable (what "recursive" adds). User namespaces under runc are proven by
//!   `crispd_userns`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use crisp_e2e::cri::container_config;
use crisp_e2e::harness::{RuntimeKind, TestEnv};
use crisp_e2e::registry::Registry;
use crisp_proto::cri::v1 as api;

const BUSYBOX: &str = "docker.io/library/busybox:latest";

/// (user namespaces, rro) as `<binary> features` reports them.
fn reported(binary: &str) -> (bool, bool) {
    let Ok(out) = std::process::Command::new(binary).arg("features").output() else {
        return (false, false);
    };
    if !out.status.success() {
        return (false, false);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let has = |l: &serde_json::Value, x: &str| {
        l.as_array()
            .is_some_and(|a| a.iter().any(|i| i.as_str() == Some(x)))
    };
    (
        has(&v["linux"]["namespaces"], "user"),
        has(&v["mountOptions"], "rro"),
    )
}

/// A tmpfs the test mounts (and always unmounts) below its own temp directory.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Result<Self> {
        std::fs::create_dir_all(at)?;
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .with_context(|| format!("mounting a tmpfs at {}", at.display()))?;
        Ok(Self(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

async fn handlers(env: &TestEnv) -> Result<()> {
    let st = env
        .cri()
        .runtime()
        .status(api::StatusRequest { verbose: false })
        .await?
        .into_inner();
    for (name, binary) in [("", "runc"), ("runc", "runc"), ("crun", "crun")] {
        let h = st
            .runtime_handlers
            .iter()
            .find(|h| h.name == name)
            .with_context(|| format!("Status lacks handler {name:?}: {:?}", st.runtime_handlers))?;
        let f = h.features.context("handler without features")?;
        let (userns, rro) = reported(binary);
        ensure!(
            f.user_namespaces == userns && f.recursive_read_only_mounts == rro,
            "handler {name:?}: advertises userns {} rro {}, `{binary} features` says {userns} {rro}",
            f.user_namespaces,
            f.recursive_read_only_mounts
        );
    }
    ensure!(
        reported("runc") == (true, true),
        "this host's runc should report user namespaces and rro (runc ≥ 1.1)"
    );
    ensure!(
        st.features.is_some_and(|f| f.supplemental_groups_policy),
        "RuntimeFeatures.supplemental_groups_policy off"
    );
    Ok(())
}

async fn rro(env: &TestEnv, host: &Path) -> Result<()> {
    let c = env.cri();
    c.pull(BUSYBOX, None).await?;
    let cfg = env.pod_config("rro")?;
    let pod = c.run_pod(&cfg).await?;
    let mut cc = container_config("main", BUSYBOX, &["sleep", "3600"]);
    let bind = |path: &str, recursive: bool| api::Mount {
        container_path: path.into(),
        host_path: host.display().to_string(),
        readonly: true,
        recursive_read_only: recursive,
        ..Default::default()
    };
    cc.mounts = vec![bind("/rro", true), bind("/ro", false)];
    let id = c.run_container(&pod, &cc, &cfg).await?;
    let write = |p: &'static str| {
        let id = id.clone();
        async move {
            c.exec_sync(&id, &["sh", "-c", &format!("echo x > {p}")], 30)
                .await
        }
    };
    let r = write("/rro/sub/x").await?;
    let err = String::from_utf8_lossy(&r.stderr);
    ensure!(
        r.exit_code != 0 && err.contains("Read-only file system"),
        "write below a recursive read-only mount: exit {} {err:?}, want EROFS",
        r.exit_code
    );
    let r = write("/ro/sub/y").await?;
    ensure!(
        r.exit_code == 0,
        "a plain read-only bind should leave its submount writable: {:?}",
        String::from_utf8_lossy(&r.stderr)
    );
    let r = write("/ro/top").await?;
    ensure!(r.exit_code != 0, "the read-only bind itself was writable");
    c.stop_and_remove_pod(&pod).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crispd_handler_features_match_the_runtime_and_rro_holds() -> Result<()> {
    let registry = Registry::start()?;
    registry.push(&["busybox"])?;
    let tmp = tempfile::tempdir()?;
    let host = tmp.path().join("host");
    let sub = Tmpfs::mount(&host.join("sub"))?;
    let env = TestEnv::start(RuntimeKind::Crispd, &registry.host()).await?;
    let outcome = async {
        handlers(&env).await?;
        rro(&env, &host).await
    }
    .await;
    let res = env.finish("crispd", outcome).await;
    drop(sub);
    res
}
