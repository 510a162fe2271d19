//! Transparent mTLS between meshed pods on different nodes.
//!
//! The pod-egress eBPF program steers a meshed pod's outbound TCP to this
//! agent ([`outbound`], :15001); the agent carries it over mutual TLS to the
//! destination node's agent ([`inbound`], :15008), which delivers it to the
//! destination pod with the client pod's address as source. Certificates
//! come from [`workloads`]; who is who from [`directory`]. After the
//! handshake, the session moves into the kernel (kTLS + splice) where the
//! kernel has TLS, else stays in rustls; the choice is per connection and
//! visible in the metrics' `mode` label. Running sessions are checked again
//! when the inventory changes or a revocation arrives ([`live`]).

pub mod answers;
pub mod client_configs;
pub mod directory;
pub mod flows;
pub mod handshake_slots;
pub mod inbound;
pub mod live;
pub mod metrics;
pub mod names;
pub mod outbound;
pub mod refusal;
pub mod routing;
pub mod signer;
pub mod sockets;
pub mod status;
pub mod workloads;

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{Arc, Once},
    time::Instant,
};

use rustls::{ServerConfig, pki_types::CertificateDer, pki_types::pem::PemObject};
use tracing::{debug, info, warn};
use veil_common::overlay::OUTBOUND_PROXY_PORT;
use veil_identity::{CertificateAuthority, SpiffeId, verify::LeafFacts};
use veil_mtls::{
    Preface, TlsSettings,
    session::{KernelTls, Mode, Session},
    verifier::TrustState,
};

use self::{
    directory::{Directory, SniResolver},
    metrics::{ByteLabels, Direction, DirectionLabels, MeshMetrics},
    workloads::WorkloadStore,
};
use crate::{
    config::{MeshIssuer, MeshSection},
    overlay_sync::OverlaySync,
    revocations::Revoked,
};

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the CA key {path} is readable by group or others (mode {mode:o}): run `chmod 600 {path}`"
    )]
    KeyPermissions { path: String, mode: u32 },
    #[error("cannot load the mesh CA: {0}")]
    Ca(String),
    #[error("invalid TLS settings: {0}")]
    Tls(#[from] veil_mtls::settings::SettingsError),
    #[error("cannot install the mesh's policy routing: {0}")]
    Routing(#[from] routing::RoutingError),
    #[error(transparent)]
    Socket(#[from] sockets::SocketError),
    #[error("cannot duplicate the outbound listener's descriptor for the datapath: {0}")]
    ListenerHandle(std::io::Error),
    #[error("cannot listen on {address} for peer agents: {source}")]
    Inbound {
        address: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("cannot start the mesh's {what} threads: {source}")]
    Threads {
        what: &'static str,
        source: std::io::Error,
    },
}

/// What every connection handler shares.
pub struct MeshState {
    pub directory: Arc<Directory>,
    pub settings: TlsSettings,
    pub trust: Arc<TrustState>,
    pub server_config: Arc<ServerConfig>,
    pub inbound_port: u16,
    pub metrics: MeshMetrics,
    pub flows: flows::FlowLog,
    /// Outbound rustls configurations, per source certificate and destination.
    pub client_configs: client_configs::ClientConfigs,
    /// The sessions being relayed, checked again when what allowed them changes.
    pub live: live::LiveSessions,
    /// Whether sessions go to kernel TLS when the kernel has it.
    pub kernel_tls: KernelTls,
    /// Caps and deadline of inbound connections until they authenticate.
    pub handshake_slots: Arc<handshake_slots::HandshakeSlots>,
}

/// Who is at the other end of a session, as its handshake proved.
#[derive(Debug)]
pub struct Peer {
    /// The certificate the other agent presented (the peer workload's).
    pub certificate: LeafFacts,
    /// The other agent's underlay address.
    pub node: Ipv4Addr,
}

/// The running mesh; dropping it removes its policy routing.
pub struct Mesh {
    pub state: Arc<MeshState>,
    /// The threads connections run on (see [`connection_pool`]).
    pool: Option<tokio::runtime::Runtime>,
    /// A second handle on the outbound listener, for the datapath's
    /// `sk_lookup` program (see [`crate::datapath::Datapath::set_mesh_listener`]).
    outbound_listener: Option<TcpListener>,
}

impl Mesh {
    /// The transparent listener intercepted connections arrive on.
    pub fn outbound_listener(&self) -> Option<&TcpListener> {
        self.outbound_listener.as_ref()
    }

    /// Loads the CA, installs the routing, opens both listeners and starts
    /// accepting. Fails (and the agent with it) rather than run half a mesh.
    pub fn start(
        section: &MeshSection,
        node_name: &str,
        kubeconfig: Option<std::path::PathBuf>,
        overlay: Arc<OverlaySync>,
        kernel_tls: KernelTls,
    ) -> Result<Self, MeshError> {
        let settings = TlsSettings::default();
        let store = Arc::new(match section.issuer {
            MeshIssuer::LocalCa => WorkloadStore::new(load_ca(section)?, settings.clone()),
            MeshIssuer::Kubernetes => {
                kubernetes_store(section, node_name, kubeconfig, settings.clone())?
            }
        });
        let trust = Arc::new(TrustState::default());
        *trust.roots.write().unwrap_or_else(|p| p.into_inner()) = store
            .trust_bundle()
            .iter()
            .filter_map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).ok())
            .collect();
        let trust_domain = store.trust_domain().to_string();
        let directory = Arc::new(Directory {
            node_name: node_name.into(),
            overlay,
            store,
        });
        let server_config = settings.server_config_with_resolver(
            Arc::new(SniResolver(Arc::clone(&directory))),
            Arc::clone(&trust),
            &trust_domain,
        )?;
        let metrics = MeshMetrics::default();
        let handshake_slots = handshake_slots::HandshakeSlots::start(
            section.handshake_limits(),
            metrics.handshakes_in_progress.clone(),
        )
        .map_err(|source| MeshError::Threads {
            what: "handshake deadline",
            source,
        })?;
        let state = Arc::new(MeshState {
            directory,
            settings,
            trust,
            server_config: Arc::new(server_config),
            inbound_port: section.inbound_port,
            metrics,
            flows: flows::FlowLog::default(),
            client_configs: client_configs::ClientConfigs::default(),
            live: live::LiveSessions::default(),
            kernel_tls,
            handshake_slots,
        });

        routing::install()?;
        let pool = connection_pool().map_err(|source| MeshError::Threads {
            what: "connection",
            source,
        })?;
        let (out_threads, in_threads) = (pool.handle().clone(), pool.handle().clone());
        let mut mesh = Self {
            state: Arc::clone(&state),
            pool: Some(pool),
            outbound_listener: None,
        };
        let outbound_address = SocketAddrV4::new(Ipv4Addr::LOCALHOST, OUTBOUND_PROXY_PORT);
        let outbound = sockets::transparent_listener(outbound_address)?;
        mesh.outbound_listener = Some(outbound.try_clone().map_err(MeshError::ListenerHandle)?);
        let inbound_address = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, section.inbound_port);
        let inbound = TcpListener::bind(inbound_address).map_err(|source| MeshError::Inbound {
            address: inbound_address,
            source,
        })?;
        let out_state = Arc::clone(&state);
        spawn_named("mesh-outbound", "outbound accept", move || {
            outbound::serve(outbound, out_state, &out_threads)
        })?;
        let sessions_state = Arc::clone(&state);
        spawn_named("mesh-sessions", "session check", move || {
            recheck_sessions_on_inventory_changes(&sessions_state)
        })?;
        let renewal_state = Arc::clone(&state);
        spawn_named("mesh-certs", "certificate", move || {
            keep_certificates_fresh(&renewal_state)
        })?;
        spawn_named("mesh-inbound", "inbound accept", move || {
            inbound::serve(inbound, state, &in_threads)
        })?;
        info!(
            trust_domain,
            outbound = %outbound_address,
            inbound = %inbound_address,
            "mesh ready"
        );
        Ok(mesh)
    }
}

/// Starts one of the mesh's long-lived threads; `what` names it in the error.
fn spawn_named(
    name: &str,
    what: &'static str,
    work: impl FnOnce() + Send + 'static,
) -> Result<(), MeshError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(work)
        .map(drop)
        .map_err(|source| MeshError::Threads { what, source })
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Sessions this agent stops carrying end in a reset at both ends,
        // never in an end of stream that could pass for a finished transfer.
        let stopped = self
            .state
            .live
            .reset_unless(|_| Err(refusal::Refusal::AgentStopping));
        if !stopped.is_empty() {
            info!(
                sessions = stopped.len(),
                "agent stopping: running mesh sessions reset at both ends"
            );
        }
        routing::remove();
        // Open connections keep their threads; the agent does not wait for them.
        if let Some(pool) = self.pool.take() {
            pool.shutdown_background();
        }
    }
}

/// Most threads the connection pool runs at once: two per open connection.
/// Far above what a node's connections need, so it never queues a relay
/// (the kernel's thread limit comes first); it only bounds a runaway.
const MAX_CONNECTION_THREADS: usize = 32 * 1024;
/// How long an idle connection thread waits for the next connection.
const IDLE_THREAD_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(30);

/// The blocking thread pool every mesh connection runs on: each connection
/// (handshake, then one relay direction) and its second relay direction
/// (see `veil_mtls::workers`) take an idle thread instead of creating one.
/// Thread start and exit per connection were about a sixth of the proxy's
/// CPU when connections are short.
fn connection_pool() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .thread_name("mesh-conn")
        .max_blocking_threads(MAX_CONNECTION_THREADS)
        .thread_keep_alive(IDLE_THREAD_KEEP_ALIVE)
        .build()
}

fn read_file(what: &'static str, path: &Path) -> Result<String, MeshError> {
    std::fs::read_to_string(path).map_err(|source| MeshError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// With `issuer = "kubernetes"`: only the root's certificate on the node;
/// `veil-controller` signs through `ECDSACert`s.
fn kubernetes_store(
    section: &MeshSection,
    node_name: &str,
    kubeconfig: Option<std::path::PathBuf>,
    settings: TlsSettings,
) -> Result<WorkloadStore, MeshError> {
    let root = read_file("CA certificate", &section.ca_cert)?;
    let node = node_name.to_string();
    let tls_secrets = section.write_tls_secrets.then(|| vec![root.clone()]);
    // The signer runs its own runtime; build it off the async workers.
    let signer = std::thread::spawn(move || {
        let signer = signer::KubernetesSigner::from_kubeconfig(
            kubeconfig.as_deref(),
            &node,
            KUBERNETES_SIGNING_TIMEOUT,
        )?;
        Ok(match tls_secrets {
            Some(bundle) => signer.with_tls_secrets(bundle),
            None => signer,
        })
    })
    .join()
    .map_err(|_| MeshError::Ca("the Kubernetes signer panicked while starting".into()))?
    .map_err(MeshError::Ca)?;
    Ok(WorkloadStore::with_signer(
        Box::new(signer),
        section.trust_domain.clone(),
        vec![root],
        settings,
    ))
}

/// Applies a revocation: verifiers refuse it from now on, and when it
/// covers one of this node's own certificates, that key is dropped and a
/// new certificate issued (on its own thread: signing may wait for the
/// controller, and after an identity revocation for its instant to pass).
pub fn revoke(state: &Arc<MeshState>, revoked: &Revoked) {
    let mut list = state
        .trust
        .revoked
        .write()
        .unwrap_or_else(|p| p.into_inner());
    let ours = match revoked {
        Revoked::Serial { serial, identity } => {
            list.revoke_serial(serial);
            drop(list);
            let ours = state.directory.store.forget_serial(serial);
            if ours.is_none() {
                debug!(serial, identity, "revoked serial is not one of ours");
            }
            ours
        }
        Revoked::Identity { identity, before } => {
            list.revoke_identity(identity, *before);
            drop(list);
            let instant = std::time::UNIX_EPOCH + std::time::Duration::from_secs(*before);
            identity
                .parse::<SpiffeId>()
                .ok()
                .filter(|id| state.directory.store.forget_issued_before(id, instant))
        }
    };
    state.reset_disallowed_sessions();
    let Some(identity) = ours else { return };
    warn!(%identity, ?revoked, "our own certificate was revoked; re-keying");
    let state = Arc::clone(state);
    let spawned = std::thread::Builder::new()
        .name("mesh-rekey".into())
        .spawn(move || {
            if let Err(error) = state.directory.store.get(&identity) {
                warn!(%identity, %error, "re-issuing after revocation failed; retried in the background");
            }
        });
    if let Err(error) = spawned {
        warn!(%error, "cannot start re-keying; the background renewal will do it");
    }
}

/// How long the agent waits for `veil-controller` to sign a CSR.
const KUBERNETES_SIGNING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn load_ca(section: &MeshSection) -> Result<CertificateAuthority, MeshError> {
    let Some(ca_key) = &section.ca_key else {
        return Err(MeshError::Ca(
            "mesh.ca_key is not set (needed with issuer = \"local-ca\")".into(),
        ));
    };
    let metadata = std::fs::metadata(ca_key).map_err(|source| MeshError::Read {
        what: "CA key",
        path: ca_key.display().to_string(),
        source,
    })?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(MeshError::KeyPermissions {
            path: ca_key.display().to_string(),
            mode,
        });
    }
    let cert = read_file("CA certificate", &section.ca_cert)?;
    let key = zeroize::Zeroizing::new(read_file("CA key", ca_key)?);
    CertificateAuthority::import(
        &section.trust_domain,
        &cert,
        &key,
        section.certificate_lifetime(),
    )
    .map_err(|e| MeshError::Ca(e.to_string()))
}

/// How often the node's workload certificates are checked (issued for new
/// workloads, renewed at 2/3 of their lifetime): a check of certificates
/// already held costs a lock and a comparison each.
const CERTIFICATE_CHECK_PERIOD: std::time::Duration = std::time::Duration::from_millis(250);
/// Certificates issued at once (each may wait a round trip to the controller).
const ISSUE_PARALLELISM: usize = 32;

/// Issues certificates for new local workloads and renews them ahead of
/// expiry, so connections never wait for a signature and a failing renewal
/// is retried (and visible in `veilctl certs`) while the old one still works.
fn keep_certificates_fresh(state: &MeshState) {
    let mut seen = 0;
    loop {
        let directory = &state.directory;
        if let Ok(inventory) = directory.inventory() {
            let mut identities = std::collections::BTreeSet::new();
            for pod in inventory
                .pods
                .iter()
                .filter(|p| p.node == directory.node_name)
            {
                let Some((mesh, _)) = inventory.meshed(pod) else {
                    continue;
                };
                match directory.store.identity_of(mesh) {
                    Ok(identity) => {
                        identities.insert(identity);
                    }
                    Err(error) => warn!(pod = %pod.name, %error, "no workload identity"),
                }
            }
            let identities: Vec<SpiffeId> = identities.into_iter().collect();
            for (identity, error) in directory.store.ensure_all(&identities, ISSUE_PARALLELISM) {
                warn!(%identity, %error, "cannot issue the workload certificate");
            }
        }
        for workload in directory.store.all() {
            let expiry = workload
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            state
                .metrics
                .certificate_expiry
                .get_or_create(&metrics::IdentityLabels {
                    identity: workload.identity.to_string(),
                })
                .set(i64::try_from(expiry).unwrap_or(i64::MAX));
        }
        // At once when the inventory changes (a new pod), else periodically.
        seen = state
            .directory
            .overlay
            .inventory_changes
            .wait_past(seen, CERTIFICATE_CHECK_PERIOD);
    }
}

/// How long the session checker sleeps when nothing tells it of a change.
const SESSION_CHECK_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Checks the running sessions again each time the inventory (pods, their
/// identities, the policy) really changes; the overlay sync re-reads it
/// every half second, usually to find it the same.
fn recheck_sessions_on_inventory_changes(state: &MeshState) {
    let mut seen = 0;
    let mut checked: Option<Arc<crate::inventory::Inventory>> = None;
    loop {
        seen = state
            .directory
            .overlay
            .inventory_changes
            .wait_past(seen, SESSION_CHECK_IDLE);
        let Ok(inventory) = state.directory.inventory() else {
            continue;
        };
        if checked
            .as_ref()
            .is_some_and(|old| Arc::ptr_eq(old, &inventory) || **old == *inventory)
        {
            continue;
        }
        checked = Some(inventory);
        state.reset_disallowed_sessions();
    }
}

/// Accepts connections forever, each on a thread of the connection pool.
fn accept_loop(
    listener: TcpListener,
    name: &'static str,
    threads: &tokio::runtime::Handle,
    handler: impl Fn(TcpStream) + Send + Sync + 'static,
) {
    let handler = Arc::new(handler);
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let handler = Arc::clone(&handler);
                drop(threads.spawn_blocking(move || handler(stream)));
            }
            Err(error) => accept_failed(name, &error),
        }
    }
}

/// Logs a failed accept and backs off: out of descriptors or memory, an
/// accept loop must not spin.
fn accept_failed(listener: &'static str, error: &std::io::Error) {
    warn!(%error, listener, "accept failed");
    std::thread::sleep(std::time::Duration::from_millis(50));
}

impl MeshState {
    /// Whether a running session is still allowed: its peer's certificate
    /// not revoked since, and the inventory's pods and rules admitting it as
    /// they did at its handshake.
    fn still_allowed(&self, session: &live::LiveSession) -> Result<(), refusal::Refusal> {
        {
            let revoked = self.trust.revoked.read().unwrap_or_else(|p| p.into_inner());
            session
                .peer
                .check(&revoked)
                .map_err(|rejection| refusal::Refusal::Revoked(rejection.to_string()))?;
        }
        let (directory, identity) = (&self.directory, &session.peer.identity);
        match session.direction {
            Direction::Inbound => inbound::allowed(
                directory,
                session.source,
                session.destination,
                identity,
                session.peer_node,
            ),
            Direction::Outbound => outbound::still_allowed(
                directory,
                session.source,
                session.destination,
                identity,
                session.peer_node,
            ),
        }
    }

    /// Resets the running sessions no longer allowed (see [`live`]).
    pub fn reset_disallowed_sessions(&self) {
        for (session, refusal) in self.live.reset_unless(|s| self.still_allowed(s)) {
            self.count_reset(&session, &refusal);
        }
    }

    fn count_reset(&self, session: &live::LiveSession, refusal: &refusal::Refusal) {
        warn!(
            direction = session.direction.as_str(),
            source = %session.source,
            destination = %session.destination,
            peer = %session.peer.identity,
            reason = refusal.label(),
            "mesh session reset: {refusal}"
        );
        self.metrics
            .sessions_reset
            .get_or_create(&metrics::ResetLabels {
                direction: session.direction,
                reason: refusal.label(),
            })
            .inc();
    }

    /// Relays a pod's connection through an established session, with
    /// metrics, registered in [`live`] while it runs.
    fn relay(
        &self,
        direction: Direction,
        session: Session,
        pod: TcpStream,
        started: Instant,
        preface: &Preface,
        peer: Peer,
    ) {
        let mode = session.mode();
        let abort = match session.abort_handle(&pod) {
            Ok(abort) => abort,
            Err(error) => {
                warn!(?direction, %error, "cannot relay: no descriptor for the session's abort handle");
                self.metrics
                    .connection(direction, mode.as_str(), "io_error");
                sockets::reset(pod);
                return;
            }
        };
        let registered = self.live.register(live::LiveSession::new(
            direction,
            preface.source,
            preface.original_destination,
            peer.node,
            peer.certificate,
            abort,
        ));
        // A change that landed between the handshake's checks and now.
        if let Err(refusal) = self.still_allowed(&registered.session)
            && registered.session.reset(&refusal)
        {
            self.count_reset(&registered.session, &refusal);
        }
        log_mode_once(mode);
        self.metrics
            .handshake_seconds
            .get_or_create(&DirectionLabels { direction })
            .observe(started.elapsed().as_secs_f64());
        self.metrics.connection(direction, mode.as_str(), "ok");
        let open = self
            .metrics
            .open
            .get_or_create(&DirectionLabels { direction })
            .clone();
        open.inc();
        let result = session.relay_abortable(pod, registered.session.abort_handle());
        open.dec();
        let reset = registered.session.reset_because().cloned();
        drop(registered);
        let (to_peer, to_pod) = result
            .as_ref()
            .map_or((0, 0), |stats| (stats.a_to_b, stats.b_to_a));
        let relay_reset = result.as_ref().err().and_then(relay_reset_reason);
        self.flows.record(flows::Flow {
            direction,
            source: Some(preface.source.into()),
            destination: Some(preface.original_destination.into()),
            mode: mode.as_str(),
            result: match (&reset, relay_reset, &result) {
                (Some(reset), _, _) => format!("reset: {}", reset.label).into(),
                (None, Some(reason), _) => format!("reset: {reason}").into(),
                (None, None, Ok(_)) => "ok".into(),
                (None, None, Err(_)) => "ended_with_error".into(),
            },
            bytes_to_peer: to_peer,
            bytes_to_pod: to_pod,
            directory: &self.directory,
        });
        match (result, relay_reset) {
            (Ok(stats), _) => {
                self.metrics
                    .bytes
                    .get_or_create(&ByteLabels {
                        direction,
                        flow: "to_peer",
                    })
                    .inc_by(stats.a_to_b);
                self.metrics
                    .bytes
                    .get_or_create(&ByteLabels {
                        direction,
                        flow: "to_pod",
                    })
                    .inc_by(stats.b_to_a);
                debug!(
                    ?direction,
                    source = %preface.source,
                    destination = %preface.original_destination,
                    mode = mode.as_str(),
                    to_peer = stats.a_to_b,
                    to_pod = stats.b_to_a,
                    "mesh connection closed"
                );
            }
            (Err(error), Some(reason)) => {
                warn!(
                    direction = direction.as_str(),
                    source = %preface.source,
                    destination = %preface.original_destination,
                    reason,
                    "mesh session reset: {error}"
                );
                self.metrics
                    .sessions_reset
                    .get_or_create(&metrics::ResetLabels { direction, reason })
                    .inc();
            }
            (Err(error), None) => debug!(
                ?direction,
                source = %preface.source,
                destination = %preface.original_destination,
                %error,
                "mesh connection ended with an error"
            ),
        }
    }
}

/// Why a relay reset both of its ends itself, if it did: a stream cut
/// without close_notify, or a sending key at its record limit.
fn relay_reset_reason(error: &std::io::Error) -> Option<&'static str> {
    let inner = error.get_ref()?;
    if inner.is::<veil_mtls::relay::Truncated>() {
        Some("truncated")
    } else if inner.is::<veil_mtls::limits::RecordLimitReached>() {
        Some("record_limit")
    } else {
        None
    }
}

/// Says once which TLS implementation carries the sessions.
fn log_mode_once(mode: Mode) {
    static KERNEL: Once = Once::new();
    static USERSPACE: Once = Once::new();
    match mode {
        Mode::Kernel => {
            KERNEL.call_once(|| info!("mTLS sessions run in kernel TLS (kTLS + splice)"))
        }
        Mode::Userspace => USERSPACE.call_once(|| {
            info!(
                "mTLS sessions run in rustls, in userspace (why: the mtls-records choice in veilctl status)"
            )
        }),
    }
}
