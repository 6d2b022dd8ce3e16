//! `crispd`: parse the command line and config, set up logging, run the ordered start-up.

use clap::Parser;
use crisp_cri::config::{Cli, Command, Config, ConfigAction, Flags};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Config { action }) = &cli.command {
        return config_command(action, &cli.flags);
    }
    // Phase "parse config": the only phase whose failure stops crispd before it logs.
    let cfg = match Config::load(&cli.flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("crispd: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // RUST_LOG, when set, wins over the config: handy for one-off debugging. A malformed one
    // stops crispd rather than being ignored for the config's level.
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) => match tracing_subscriber::EnvFilter::try_new(&v) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("crispd: RUST_LOG={v:?}: {e}");
                return std::process::ExitCode::from(2);
            }
        },
        Err(_) => tracing_subscriber::EnvFilter::new(level_filter(&cfg.log_level)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    tracing::info!(
        phase = "parse config",
        version = env!("CARGO_PKG_VERSION"),
        root = %cfg.root.display(),
        state = %cfg.state.display(),
        listen = %cfg.listen.display(),
        runtime = cfg.runtime.as_str(),
        cgroup_driver = cfg.cgroup_driver.as_str(),
        "crispd starting"
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crispd: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(crisp_cri::startup::run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("crispd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `crispd config default|check`: no daemon, no logging set-up.
fn config_command(action: &ConfigAction, flags: &Flags) -> std::process::ExitCode {
    match action {
        ConfigAction::Default => {
            print!("{}", Config::default().to_toml());
            std::process::ExitCode::SUCCESS
        }
        ConfigAction::Check => match Config::check(flags) {
            Ok(what) => {
                println!("{what}");
                std::process::ExitCode::SUCCESS
            }
            Err(problems) => {
                for p in &problems {
                    eprintln!("crispd: {p}");
                }
                eprintln!("crispd: {} problem(s) in the configuration", problems.len());
                std::process::ExitCode::FAILURE
            }
        },
    }
}

/// The config's `log_level`. A bare `debug` or `trace` is about crispd: the HTTP/2 and gRPC
/// crates under it stay at `info` (at debug, h2 logs every frame of every CRI call, ~80 MB
/// a minute under kubelet-like polling). A filter naming targets is taken as written.
fn level_filter(level: &str) -> String {
    match level.trim() {
        l @ ("debug" | "trace") => {
            format!("{l},h2=info,hyper=info,hyper_util=info,tower=info,tonic=info")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::level_filter;

    #[test]
    fn debug_is_crispds_debug_and_a_filter_is_kept() {
        let f = level_filter("debug");
        assert!(f.starts_with("debug,") && f.contains("h2=info"), "{f}");
        assert_eq!(level_filter("info"), "info");
        assert_eq!(level_filter("h2=debug,info"), "h2=debug,info");
    }
}
