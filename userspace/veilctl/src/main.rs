//! `veilctl`: look at what a Veil agent is doing.
//!
//! Tables for people, `-o json` for scripts. Exit codes: 0 success, 1 the
//! agent could not be reached or answered an error, 2 bad usage, 3 `check`
//! found problems (warnings or errors).

mod check;
mod client;
mod render;

use std::{net::SocketAddr, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(version, about = "Inspect a Veil node agent")]
struct Cli {
    /// The agent's admin API (localhost only).
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:15000",
        env = "VEIL_ADMIN"
    )]
    admin: SocketAddr,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Agent version, attached programs and their packet counters.
    Status,
    /// Find misconfigurations on this node and say how to fix each (exit 3 if any).
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = client::AdminClient::new(cli.admin);
    match cli.command {
        Command::Status => match client.status() {
            Ok(status) => {
                match cli.output {
                    Output::Table => print!("{}", render::status(&status)),
                    Output::Json => match serde_json::to_string_pretty(&status) {
                        Ok(json) => println!("{json}"),
                        Err(err) => {
                            eprintln!("error: cannot encode status as JSON: {err}");
                            return ExitCode::FAILURE;
                        }
                    },
                }
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Check => match client.status() {
            Ok(status) => {
                let found = check::findings(&status);
                match cli.output {
                    Output::Table => print!("{}", render::findings(&status.node, &found)),
                    Output::Json => match serde_json::to_string_pretty(&found) {
                        Ok(json) => println!("{json}"),
                        Err(err) => {
                            eprintln!("error: cannot encode findings as JSON: {err}");
                            return ExitCode::FAILURE;
                        }
                    },
                }
                if found.iter().any(|f| f.severity > check::Severity::Info) {
                    ExitCode::from(3)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        },
    }
}
