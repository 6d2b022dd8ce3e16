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
    // RUST_LOG, when set, wins over the config: handy for one-off debugging.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(&cfg.log_level));
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
