//! `veilctl`: look at what a Veil agent is doing.
//!
//! Tables for people, `-o json` for scripts. Exit codes: 0 success, 1 the
//! agent could not be reached or answered an error, 2 bad usage, 3 `check`
//! found problems (warnings or errors), 4 the agent runs no mesh (for the
//! mesh commands).

mod check;
mod client;
mod generate;
mod mesh;
mod render;

use std::{net::SocketAddr, process::ExitCode, time::SystemTime};

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use veil_api::{AgentStatus, MeshStatus};

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
    /// Agent version, attached programs, packet counters, overlay and mesh summary.
    Status,
    /// Find misconfigurations on this node and say how to fix each (exit 3 if any).
    Check,
    /// Meshed pods on this node: identity and mTLS mode.
    Workloads,
    /// Each local workload's certificate: serial, issuer, expiry, next renewal, state.
    Certs,
    /// What talked to what: this node's recent meshed connections, with
    /// direction, TLS mode, result and bytes.
    Flows,
    /// The effective mTLS mode of a pod (or one of its ports) and the
    /// precedence chain (port > workload > namespace > mesh) that produced it.
    Mtls {
        /// Pod name or address, as in the inventory.
        pod: String,
        /// A TCP port of the pod; without it, the workload's mode.
        #[arg(long)]
        port: Option<u16>,
    },
    /// Print the Kubernetes YAML (an MTLSPolicy; JSON with `-o json`) that
    /// sets the mTLS mode of a namespace, a workload or one of its ports;
    /// pipe it to `kubectl apply -f -`.
    Generate {
        /// Namespace of the workloads.
        #[arg(long)]
        namespace: String,
        /// The workload (its service account); without it, the whole namespace.
        #[arg(long)]
        service_account: Option<String>,
        /// One TCP port of the workload.
        #[arg(long)]
        port: Option<u16>,
        /// The mode wanted.
        #[arg(long, value_enum)]
        mode: Mode,
        /// Name of the MTLSPolicy (default from the workload and port).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Strict,
    Permissive,
    Disable,
}

/// Exit code of the mesh commands when the agent runs no mesh.
const NO_MESH: u8 = 4;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = client::AdminClient::new(cli.admin);
    let output = cli.output;
    let result = match cli.command {
        Command::Status => client
            .status()
            .map(|status| emit(output, &status, || render::status(&status))),
        Command::Check => client.status().map(|status| {
            let found = check::findings(&status);
            let code = emit(output, &found, || render::findings(&status.node, &found));
            if code == ExitCode::SUCCESS && found.iter().any(|f| f.severity > check::Severity::Info)
            {
                ExitCode::from(3)
            } else {
                code
            }
        }),
        Command::Workloads => client.status().map(|status| {
            with_mesh(&status, |mesh| {
                emit(output, &mesh.workloads, || {
                    mesh::workloads(&status.node, mesh)
                })
            })
        }),
        Command::Certs => client.status().map(|status| {
            let now = SystemTime::now();
            // ACME certificates (server names) follow the workload ones in
            // the table; in JSON they are in `veilctl status -o json`.
            let acme = (!status.acme.is_empty()).then(|| mesh::acme_certs(&status.acme, now));
            match (&status.mesh, acme) {
                (None, Some(acme)) if output == Output::Table => {
                    print!("{acme}");
                    ExitCode::SUCCESS
                }
                _ => with_mesh(&status, |mesh| {
                    emit(output, &mesh.workloads, || {
                        let mut text = mesh::certs(&status.node, mesh, now);
                        if !status.acme.is_empty() {
                            text.push_str(&mesh::acme_certs(&status.acme, now));
                        }
                        text
                    })
                }),
            }
        }),
        Command::Flows => client
            .flows()
            .map(|flows| emit(output, &flows, || mesh::flows(&flows, SystemTime::now()))),
        Command::Generate {
            namespace,
            service_account,
            port,
            mode,
            name,
        } => {
            let desired = generate::Desired {
                namespace: &namespace,
                service_account: service_account.as_deref(),
                port,
                mode: match mode {
                    Mode::Strict => veil_crd::MTLSMode::Strict,
                    Mode::Permissive => veil_crd::MTLSMode::Permissive,
                    Mode::Disable => veil_crd::MTLSMode::Disable,
                },
                name: name.as_deref(),
            };
            let generated = match output {
                Output::Table => generate::mtls_policy(&desired),
                Output::Json => generate::mtls_policy_json(&desired).map(|json| json + "\n"),
            };
            return match generated {
                Ok(yaml) => {
                    print!("{yaml}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Mtls { pod, port } => client
            .mtls_mode(&pod, port)
            .map(|report| emit(output, &report, || mesh::mode_report(&report))),
    };
    result.unwrap_or_else(|error| {
        eprintln!("error: {error}");
        ExitCode::FAILURE
    })
}

/// Prints `value` as JSON or as the table `render` makes.
fn emit<T: Serialize>(output: Output, value: &T, render: impl FnOnce() -> String) -> ExitCode {
    match output {
        Output::Table => {
            print!("{}", render());
            ExitCode::SUCCESS
        }
        Output::Json => match serde_json::to_string_pretty(value) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: cannot encode the answer as JSON: {error}");
                ExitCode::FAILURE
            }
        },
    }
}

fn with_mesh(status: &AgentStatus, show: impl FnOnce(&MeshStatus) -> ExitCode) -> ExitCode {
    match &status.mesh {
        Some(mesh) => show(mesh),
        None => {
            eprintln!(
                "node {} runs no mesh: add a [mesh] section to the agent's config \
                 (see `veil-agent check-config`)",
                status.node
            );
            ExitCode::from(NO_MESH)
        }
    }
}
