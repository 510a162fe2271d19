//! `veil-agent`: the node agent binary.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tracing::error;
use veil_agent::{
    config::AgentConfig,
    logging::{self, LogFormat},
};

/// Veil node agent: attaches the eBPF datapath and serves the admin API.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        value_enum,
        default_value_t,
        global = true,
        env = "VEIL_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM.
    Run {
        /// Agent configuration file (TOML).
        #[arg(
            long,
            short,
            default_value = "/etc/veil/agent.toml",
            env = "VEIL_CONFIG"
        )]
        config: PathBuf,
    },
    /// Check a configuration file and exit.
    CheckConfig {
        #[arg(long, short, default_value = "/etc/veil/agent.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match cli.command {
        Command::CheckConfig { config } => match AgentConfig::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let config = match AgentConfig::load(&config) {
                Ok(config) => config,
                Err(err) => {
                    error!("{err}");
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(err) => {
                    error!("cannot start the async runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(veil_agent::run(config, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    error!("{err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        error!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
}
