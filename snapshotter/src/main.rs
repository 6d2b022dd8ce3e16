//! `crisp-snapshotter`: crisp's overlay snapshotter served as containerd's snapshots gRPC API
//! on a unix socket, for use as a containerd proxy plugin:
//!
//! ```toml
//! [proxy_plugins.crisp]
//!   type = "snapshot"
//!   address = "/run/crisp/snapshotter.sock"
//!   capabilities = ["remap-ids"]   # containerd passes uid/gid mapping labels to Prepare
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use crisp_snapshotter::mount::IdmapMode;
use crisp_snapshotter::service::Service;
use crisp_snapshotter::{Config, Snapshotter};

/// Overlay snapshotter with safe idmapped layer mounts, serving containerd's snapshots API
/// (containerd.services.snapshots.v1.Snapshots) on a unix socket.
#[derive(Debug, Parser)]
#[command(name = "crisp-snapshotter", version)]
struct Args {
    /// Root directory: metadata.redb, snapshots/, tmp-mounts/.
    #[arg(
        long,
        env = "CRISP_SNAPSHOTTER_ROOT",
        default_value = "/var/lib/crisp/snapshotter"
    )]
    root: PathBuf,
    /// Unix socket to listen on (a stale socket file is replaced).
    #[arg(
        long,
        env = "CRISP_SNAPSHOTTER_ADDRESS",
        default_value = "/run/crisp/snapshotter.sock"
    )]
    address: PathBuf,
    /// How idmapped lower layers are mounted: auto (probe), fd, or temp-mount.
    #[arg(long, env = "CRISP_IDMAP_MODE", default_value = "auto")]
    idmap_mode: IdmapMode,
    /// Run Cleanup (remove orphaned directories) at start-up.
    #[arg(long)]
    cleanup: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let sn = Snapshotter::open(
        &args.root,
        Config {
            idmap_mode: args.idmap_mode,
        },
    )
    .with_context(|| format!("opening snapshotter at --root {}", args.root.display()))?;
    if args.cleanup
        && let Err(e) = sn.cleanup()
    {
        tracing::warn!(error = %e, "start-up cleanup");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(Arc::new(sn), args.address))
}

async fn serve(sn: Arc<Snapshotter>, address: PathBuf) -> anyhow::Result<()> {
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(&address) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale socket {}", address.display()));
        }
    }
    let listener = tokio::net::UnixListener::bind(&address)
        .with_context(|| format!("binding --address {}", address.display()))?;
    tracing::info!(address = %address.display(), "serving containerd.services.snapshots.v1.Snapshots");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down");
    };
    tonic::transport::Server::builder()
        .add_service(Service::new(sn).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serving gRPC")?;
    let _ = std::fs::remove_file(&address);
    Ok(())
}
