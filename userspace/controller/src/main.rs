//! `veil-controller`: the cluster controller binary.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use tracing::{error, info};
use veil_controller::{
    issuance::{DEFAULT_DURATION, LocalIssuer},
    lease::LeaseLock,
    pod_events, policy_events,
    reconcile::{self, Context},
};
use veil_identity::{CertificateAuthority, renewal::RenewalPolicy};

/// Veil's cluster controller: signs ECDSACert CSRs with the mesh's local CA.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Revoke a workload certificate: publishes `certificate-revoked` on the
    /// certificates topic; every agent refuses the serial from then on, and
    /// the agent holding it re-keys and gets a new certificate.
    Revoke(RevokeArgs),
    /// Reconcile ECDSACerts until SIGINT or SIGTERM (needs a kubeconfig or in-cluster credentials).
    Run(RunArgs),
}

/// `veil-controller revoke`.
#[derive(Args)]
struct RevokeArgs {
    /// The certificate's serial (hex, as `veilctl certs` and
    /// `kubectl get ecdsacerts` show it). Without it, every certificate of
    /// `--identity` issued until now is revoked (a compromised workload):
    /// its holders re-key at once.
    #[arg(long)]
    serial: Option<String>,
    /// The SPIFFE ID the certificate was issued to.
    #[arg(long)]
    identity: String,
    /// Kafka bootstrap brokers (`host:port`, comma-separated).
    #[arg(
        long,
        env = "VEIL_KAFKA_BROKERS",
        value_delimiter = ',',
        required = true
    )]
    kafka_brokers: Vec<String>,
    /// Where an undelivered event would spill (it is delivered before exit).
    #[arg(long, default_value = "/tmp/veil-controller-revoke")]
    events_state_dir: PathBuf,
}

/// `veil-controller run`.
#[derive(Args)]
struct RunArgs {
    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "VEIL_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Root CA certificate (PEM).
    #[arg(long, env = "VEIL_CA_CERT", default_value = "/etc/veil/ca/tls.crt")]
    ca_cert: PathBuf,
    /// Root CA key (PEM).
    #[arg(long, env = "VEIL_CA_KEY", default_value = "/etc/veil/ca/tls.key")]
    ca_key: PathBuf,
    /// Lease used for leader election.
    #[arg(long, env = "VEIL_LEASE_NAME", default_value = "veil-controller")]
    lease_name: String,
    /// Namespace of the lease.
    #[arg(long, env = "VEIL_LEASE_NAMESPACE", default_value = "veil-system")]
    lease_namespace: String,
    /// This replica's name (the pod name in Kubernetes).
    #[arg(long, env = "POD_NAME")]
    holder: Option<String>,
    /// Kafka bootstrap brokers (`host:port`, comma-separated): publish pod
    /// lifecycle events on the pods topic for the agents. Without it the
    /// agents learn only their own node's pods.
    #[arg(long, env = "VEIL_KAFKA_BROKERS", value_delimiter = ',')]
    kafka_brokers: Vec<String>,
    /// Where unacknowledged events spill while the broker is away.
    #[arg(
        long,
        env = "VEIL_EVENTS_STATE_DIR",
        default_value = "/var/lib/veil-controller/events"
    )]
    events_state_dir: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VEIL_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let Cli { command } = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Revoke(args) => tokio::task::spawn_blocking(move || {
            revoke(
                args.serial.as_deref(),
                &args.identity,
                args.kafka_brokers,
                args.events_state_dir,
            )
        })
        .await
        .context("the revocation thread failed")?,
        Command::Run(args) => serve(args).await,
    }
}

/// Reconciles (as the leader) until SIGINT or SIGTERM.
async fn serve(
    RunArgs {
        trust_domain,
        ca_cert,
        ca_key,
        lease_name,
        lease_namespace,
        holder,
        kafka_brokers,
        events_state_dir,
    }: RunArgs,
) -> Result<()> {
    let cert = std::fs::read_to_string(&ca_cert)
        .with_context(|| format!("cannot read the CA certificate {}", ca_cert.display()))?;
    let key = zeroize::Zeroizing::new(
        std::fs::read_to_string(&ca_key)
            .with_context(|| format!("cannot read the CA key {}", ca_key.display()))?,
    );
    let ca = CertificateAuthority::import(&trust_domain, &cert, &key, DEFAULT_DURATION)
        .context("cannot load the mesh CA")?;
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the API server (no kubeconfig or in-cluster credentials)")?;
    let holder = holder.unwrap_or_else(|| {
        format!(
            "veil-controller-{}",
            nix_free_hostname().unwrap_or_else(|| std::process::id().to_string())
        )
    });
    let lock = LeaseLock::new(client.clone(), &lease_namespace, &lease_name, &holder);
    info!(holder, lease = %lease_name, "waiting for leadership");
    lock.acquire().await.context("cannot take the lease")?;
    info!(holder, "leading: reconciling ECDSACerts");
    let bus = if kafka_brokers.is_empty() {
        info!("no Kafka brokers configured: pod lifecycle events are not published");
        None
    } else {
        let settings = veil_events::kafka::KafkaSettings {
            brokers: kafka_brokers,
            state_dir: events_state_dir,
            ..Default::default()
        };
        Some(
            veil_events::kafka::KafkaBus::connect(&settings)
                .context("cannot start the Kafka event bus")?,
        )
    };
    let pods = {
        let client = client.clone();
        let trust_domain = trust_domain.clone();
        async move {
            match &bus {
                Some(bus) => {
                    tokio::join!(
                        pod_events::run(client.clone(), bus, &trust_domain),
                        policy_events::run(client, bus)
                    );
                }
                None => std::future::pending().await,
            }
        }
    };
    let context = Context {
        client,
        issuer: LocalIssuer {
            ca,
            renewal: RenewalPolicy::default(),
        },
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    tokio::select! {
        () = reconcile::run(context, shutdown) => Ok(()),
        () = pods => anyhow::bail!("the pod watch ended"),
        reason = lock.hold() => anyhow::bail!("lost leadership ({reason}); exiting so a restart rejoins the election"),
    }
}

/// How long `revoke` waits for the broker to take the event.
const REVOKE_DELIVERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn revoke(
    serial: Option<&str>,
    identity: &str,
    brokers: Vec<String>,
    state_dir: PathBuf,
) -> Result<()> {
    use veil_events::{
        bus::EventBus,
        kafka::{KafkaBus, KafkaSettings},
        schema::{Envelope, Event, Topic},
    };
    identity
        .parse::<veil_identity::SpiffeId>()
        .with_context(|| format!("--identity {identity:?} is not a SPIFFE ID"))?;
    let (event, done) = match serial {
        Some(serial) => {
            let serial = serial.trim().to_ascii_lowercase();
            anyhow::ensure!(
                !serial.is_empty() && serial.chars().all(|c| c.is_ascii_hexdigit()),
                "--serial {serial:?} is not a hexadecimal certificate serial"
            );
            // One key per serial: a revocation is never undone, so any
            // sequence works.
            let event = Envelope::new(
                Topic::Certificates,
                format!("revoked/{serial}"),
                1,
                Event::CertificateRevoked {
                    identity: identity.to_string(),
                    serial: serial.clone(),
                },
            );
            (event, format!("revoked {serial} ({identity})"))
        }
        None => {
            let before =
                veil_identity::revocation::revocation_instant(std::time::SystemTime::now());
            let instant = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(before),
            )
            .to_string();
            // One key per identity, sequenced by the instant: a later
            // revocation of the same identity supersedes an earlier one.
            let event = Envelope::new(
                Topic::Certificates,
                format!("revoked-identity/{identity}"),
                before,
                Event::IdentityRevoked {
                    identity: identity.to_string(),
                    revoked_before: instant.clone(),
                },
            );
            (
                event,
                format!("revoked every certificate of {identity} issued before {instant}"),
            )
        }
    };
    let settings = KafkaSettings {
        brokers,
        state_dir,
        ..Default::default()
    };
    let bus = KafkaBus::connect(&settings).context("cannot start the Kafka event bus")?;
    bus.publish(&event)
        .context("cannot publish the revocation")?;
    anyhow::ensure!(
        bus.flush(REVOKE_DELIVERY_TIMEOUT),
        "the broker did not take the revocation within {REVOKE_DELIVERY_TIMEOUT:?}; it is kept in \
         {} and not yet delivered — check the brokers and run the command again",
        settings.state_dir.display()
    );
    info!(?serial, identity, "revocation published");
    println!("{done}");
    Ok(())
}

fn nix_free_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}
