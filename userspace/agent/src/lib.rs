//! Veil's node agent.
//!
//! One agent runs on each node. It loads the eBPF datapath embedded in its
//! binary, attaches XDP to the node's underlay interface and TC to each pod's
//! host-side veth, keeps the overlay maps in step with the inventory, and
//! serves a localhost admin API that `veilctl` reads. Later slices add the
//! mTLS proxy and the control plane; each lives in its own module here.

pub mod acme_sync;
pub mod admin;
pub mod config;
pub mod datapath;
pub mod events_sync;
pub mod inventory;
pub mod iproute;
pub mod kubernetes;
pub mod logging;
pub mod mesh;
pub mod overlay_sync;
pub mod policy;
pub mod revocations;
pub mod telemetry;

use std::sync::{Arc, Mutex};

use tracing::info;

use crate::{
    admin::AdminState,
    config::AgentConfig,
    datapath::{Datapath, overlay::OverlaySettings},
    overlay_sync::OverlaySync,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Datapath(#[from] datapath::DatapathError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error("cannot start the mesh: {0}")]
    Mesh(#[from] mesh::MeshError),
    #[error(transparent)]
    Events(#[from] events_sync::EventsError),
    #[error(transparent)]
    Kubernetes(#[from] kubernetes::KubernetesError),
    #[error(transparent)]
    Acme(#[from] acme_sync::AcmeSyncError),
    #[error(transparent)]
    Tunnel(#[from] datapath::tunnel::TunnelError),
}

/// Runs the agent until `shutdown` completes, then detaches everything.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let disabled =
        datapath::features::disabled_by_environment().map_err(datapath::DatapathError::from)?;
    if !disabled.is_empty() {
        tracing::warn!(
            features = %disabled.iter().map(|f| f.name()).collect::<Vec<_>>().join(","),
            "{} switches features off: for tests only",
            datapath::features::DISABLE_FEATURES_ENV
        );
    }
    let kernel = datapath::features::KernelFeatures::probe(&disabled)
        .map_err(datapath::DatapathError::from)?;
    let mesh_kernel_tls = config
        .mesh
        .as_ref()
        .map(|mesh| mesh.kernel_tls == config::KernelTlsMode::Auto);
    let datapath = Datapath::start(&config.datapath, kernel, mesh_kernel_tls)?;
    let kernel_tls = match datapath.kernel_tls() {
        Some(true) => veil_mtls::session::KernelTls::Auto,
        _ => veil_mtls::session::KernelTls::Off,
    };
    let datapath = Arc::new(Mutex::new(datapath));
    let events = match config.event_bus() {
        Some(choice) => Some(events_sync::Events::start(&choice, &config.node_name)?),
        None => None,
    };
    let kubernetes = match &config.kubernetes {
        Some(section) => {
            let (section, node, underlay) = (
                section.clone(),
                config.node_name.clone(),
                config.datapath.underlay_interface.clone(),
            );
            // The watchers run their own runtime; build it off the async workers.
            Some(
                tokio::task::spawn_blocking(move || {
                    kubernetes::Kubernetes::start(
                        section.kubeconfig.as_deref(),
                        section.annotate_node,
                        &node,
                        &underlay,
                    )
                })
                .await
                .map_err(|e| {
                    kubernetes::KubernetesError::Thread(std::io::Error::other(e.to_string()))
                })??,
            )
        }
        None => None,
    };
    // Server-name certificates from an ACME CA; runs on its own thread and
    // runtime, built off the async workers.
    let acme = match config.acme.clone() {
        Some(section) => Some(
            tokio::task::spawn_blocking(move || acme_sync::Acme::start(&section))
                .await
                .map_err(|e| {
                    acme_sync::AcmeSyncError::Thread(std::io::Error::other(e.to_string()))
                })??,
        ),
        None => None,
    };
    // Lives until the agent exits, then deletes the device.
    let tunnel = match &config.overlay {
        Some(section) if section.encapsulation == config::Encapsulation::VxlanDevice => Some(
            datapath::tunnel::TunnelDevice::create(section.underlay_mtu)?,
        ),
        _ => None,
    };
    let overlay = config.overlay.as_ref().map(|section| {
        Arc::new(OverlaySync::new(
            OverlaySettings {
                node_name: config.node_name.clone(),
                vni: section.vni,
                underlay_interface: config.datapath.underlay_interface.clone(),
                underlay_mtu: section.underlay_mtu,
                tunnel_ifindex: tunnel.as_ref().map_or(0, |t| t.ifindex()),
                trust_domain: config.mesh.as_ref().map(|m| m.trust_domain.clone()),
            },
            section.inventory.clone(),
            events.as_ref().map(|e| Arc::clone(&e.state)),
            kubernetes.as_ref().map(|k| Arc::clone(&k.state)),
        ))
    });
    if let Some(overlay) = &overlay {
        // Apply once before reporting ready, then keep in step.
        let (sync, dp) = (Arc::clone(overlay), Arc::clone(&datapath));
        let _ = tokio::task::spawn_blocking(move || sync.sync_once(&dp)).await;
        tokio::spawn(Arc::clone(overlay).run(Arc::clone(&datapath)));
    }
    // The mesh needs the inventory (who is meshed, as whom), synced above.
    let mesh = match (&config.mesh, &overlay) {
        (Some(section), Some(overlay)) => Some(mesh::Mesh::start(
            section,
            &config.node_name,
            config
                .kubernetes
                .as_ref()
                .and_then(|k| k.kubeconfig.clone()),
            Arc::clone(overlay),
            kernel_tls,
        )?),
        _ => None,
    };
    if let Some(listener) = mesh.as_ref().and_then(mesh::Mesh::outbound_listener) {
        datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_mesh_listener(listener)?;
    }
    // What the mesh carried goes on the bus as flow records.
    // Revocations from the bus go to the mesh's verifiers and certificates.
    if let (Some(mesh), Some(events)) = (&mesh, &events) {
        mesh.state
            .flows
            .publish_to(events.flow_sink(&config.node_name));
        mesh.state
            .directory
            .store
            .on_issue(events.certificate_hook(&config.node_name));
        let state = Arc::clone(&mesh.state);
        events
            .state
            .revocations
            .on_revocation(Box::new(move |revoked| mesh::revoke(&state, revoked)));
    }
    let listener = admin::bind(config.admin_listen).await?;
    let metrics = telemetry::bind("metrics", config.metrics_listen).await?;
    let readiness = telemetry::bind("readiness", config.readiness_listen).await?;
    info!(
        node = %config.node_name,
        admin = %config.admin_listen,
        overlay = overlay.is_some(),
        mesh = mesh.is_some(),
        "agent ready"
    );
    let state = Arc::new(AdminState {
        node_name: config.node_name,
        datapath,
        overlay,
        mesh: mesh.as_ref().map(|m| Arc::clone(&m.state)),
        events: events.as_ref().map(|e| Arc::clone(&e.state)),
        acme: acme.as_ref().map(|a| Arc::clone(&a.state)),
    });
    telemetry::spawn(metrics, readiness, Arc::clone(&state));
    admin::serve(listener, Arc::clone(&state), shutdown).await?;
    info!("agent stopping: detaching programs");
    drop(mesh);
    // Flushes unsent events to the outbox file for the next start.
    drop(events);
    Ok(())
}
