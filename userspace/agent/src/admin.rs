//! The localhost admin API (port 15000): what `veilctl` reads.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::StatusCode,
    routing::get,
};
use tokio::net::TcpListener;
use veil_api::{AgentStatus, EventCount, FLOWS_PATH, MTLS_MODE_PATH, ModeReport, STATUS_PATH};

use crate::{datapath::Datapath, overlay_sync::OverlaySync};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on {address} for the admin API (is another agent running?): {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin API stopped: {0}")]
    Serve(std::io::Error),
}

/// What the handlers read.
pub struct AdminState {
    pub node_name: String,
    pub datapath: Arc<Mutex<Datapath>>,
    pub overlay: Option<Arc<OverlaySync>>,
    pub mesh: Option<Arc<crate::mesh::MeshState>>,
    pub events: Option<Arc<crate::events_sync::EventState>>,
    /// The ACME renewer's state, with `[acme]`.
    pub acme: Option<Arc<veil_identity::acme::RenewerState>>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AdminState({})", self.node_name)
    }
}

impl AdminState {
    /// What works in a degraded way (the agent stays ready): the event bus
    /// while the broker is unreachable.
    pub fn degradations(&self) -> Vec<String> {
        self.events
            .as_ref()
            .and_then(|events| events.bus_state())
            .filter(|state| !matches!(state, veil_events::bus::BusState::Connected))
            .map(|state| state.to_string())
            .into_iter()
            .collect()
    }

    /// Why the agent is not ready; empty when it is.
    pub fn readiness_problems(&self) -> Vec<String> {
        match &self.overlay {
            Some(overlay) => {
                let datapath = self.datapath.lock().unwrap_or_else(|p| p.into_inner());
                overlay.readiness_problems(&datapath)
            }
            None => Vec::new(),
        }
    }
}

/// Binds the admin listener; serving starts with [`serve`].
pub async fn bind(address: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| AdminError::Bind { address, source })
}

/// Serves the admin API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let app = Router::new()
        .route(STATUS_PATH, get(status))
        .route(MTLS_MODE_PATH, get(mtls_mode))
        .route(FLOWS_PATH, get(flows))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(AdminError::Serve)
}

/// One ACME certificate as the admin API shows it.
fn acme_status(
    certificate: &veil_identity::acme::CertificateStatus,
) -> veil_api::AcmeCertificateStatus {
    let unix = |time: std::time::SystemTime| {
        time.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    veil_api::AcmeCertificateStatus {
        name: certificate.name.clone(),
        dns_names: certificate.dns_names.clone(),
        serial: certificate.serial.clone(),
        not_after_unix: certificate.not_after.map(unix),
        next_renewal_unix: certificate.next_renewal.map(unix),
        renewal_source: certificate.source.map(|s| s.as_str().to_string()),
        last_error: certificate.last_error.clone(),
        failures: certificate.failures,
    }
}

async fn status(
    State(state): State<Arc<AdminState>>,
) -> Result<Json<AgentStatus>, (StatusCode, String)> {
    let internal = |error: String| (StatusCode::INTERNAL_SERVER_ERROR, error);
    let datapath = state.datapath.lock().unwrap_or_else(|p| p.into_inner());
    let counters = datapath.counters().map_err(|e| internal(e.to_string()))?;
    let events = datapath
        .overlay()
        .events()
        .map_err(|e| internal(e.to_string()))?
        .into_iter()
        .map(|(event, packets)| EventCount {
            event: event.name().into(),
            drop: event.is_drop(),
            packets,
        })
        .collect();
    // One read of the interfaces serves both the program check and the MTUs.
    let links = crate::datapath::links::details();
    let overlay = state.overlay.as_ref().map(|overlay| {
        let mut status = overlay.status(&datapath);
        if let Some(links) = &links {
            status.interface_mtus = overlay.interface_mtus(&datapath, links);
        }
        status
    });
    let acme = state
        .acme
        .as_ref()
        .map(|acme| acme.snapshot().iter().map(acme_status).collect())
        .unwrap_or_default();
    Ok(Json(AgentStatus {
        acme,
        version: env!("CARGO_PKG_VERSION").into(),
        node: state.node_name.clone(),
        programs: datapath.programs_checked(links.as_ref()),
        counters,
        events,
        overlay,
        kernel_tls: datapath
            .kernel_status()
            .features
            .iter()
            .any(|f| f.name == "tls-ulp" && f.available),
        kernel: Some(datapath.kernel_status()),
        mesh: state.mesh.as_ref().map(|m| m.status()),
        event_bus: state
            .events
            .as_ref()
            .map(|events| veil_api::EventBusStatus {
                state: events
                    .bus_state()
                    .map_or_else(|| "starting".into(), |s| s.to_string()),
                kind: events.kind.get().copied().unwrap_or_default().to_string(),
                announced_pods: events.announced_pods(),
                clock_behind_ms: events.clock_behind_ms(),
                revoked_serials: events.revocations.serial_count(),
                revoked_identities: events.revocations.identity_count(),
            }),
    }))
}

async fn flows(
    State(state): State<Arc<AdminState>>,
) -> Result<Json<Vec<veil_api::FlowRecord>>, (StatusCode, String)> {
    let mesh = state.mesh.as_ref().ok_or((
        StatusCode::NOT_FOUND,
        "this agent runs no mesh: add a [mesh] section to its config".to_string(),
    ))?;
    Ok(Json(mesh.flows.snapshot()))
}

#[derive(Debug, serde::Deserialize)]
struct ModeQuery {
    pod: String,
    port: Option<u16>,
}

async fn mtls_mode(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<ModeQuery>,
) -> Result<Json<ModeReport>, (StatusCode, String)> {
    let mesh = state.mesh.as_ref().ok_or((
        StatusCode::NOT_FOUND,
        "this agent runs no mesh: add a [mesh] section to its config".to_string(),
    ))?;
    mesh.mode_report(&query.pod, query.port)
        .map(Json)
        .map_err(|error| (StatusCode::NOT_FOUND, error))
}
