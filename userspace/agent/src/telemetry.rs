//! Prometheus metrics (:15020) and readiness (:15021).
//!
//! Metrics are read from the eBPF maps at scrape time (a collector, not
//! copies kept in step), so a scrape always shows what the kernel counted.
//! Names follow Prometheus conventions: `veil_` prefix, `_total` counters,
//! base units, low-cardinality labels (hook, interface, reason, action).

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::net::TcpListener;
use veil_api::{METRICS_PATH, READINESS_PATH};

use crate::admin::AdminState;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} for {what}: {source}")]
pub struct TelemetryError {
    what: &'static str,
    address: SocketAddr,
    source: std::io::Error,
}

/// Binds a telemetry listener.
pub async fn bind(what: &'static str, address: SocketAddr) -> Result<TcpListener, TelemetryError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| TelemetryError {
            what,
            address,
            source,
        })
}

/// Serves `/metrics` on `metrics` and `/healthz/ready` on `readiness` until the agent stops.
pub fn spawn(metrics: TcpListener, readiness: TcpListener, state: Arc<AdminState>) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DatapathCollector {
        state: Arc::clone(&state),
    }));
    if let Some(events) = &state.events {
        events.metrics.register(&mut registry);
    }
    if let Some(mesh) = &state.mesh {
        mesh.metrics.register(&mut registry);
    }
    let registry = Arc::new(registry);
    let metrics_app = Router::new()
        .route(METRICS_PATH, get(scrape))
        .with_state(registry);
    let readiness_app = Router::new()
        .route(READINESS_PATH, get(ready))
        .with_state(state);
    tokio::spawn(async move {
        let _ = axum::serve(metrics, metrics_app).await;
    });
    tokio::spawn(async move {
        let _ = axum::serve(readiness, readiness_app).await;
    });
}

async fn scrape(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "cannot encode metrics\n".to_string(),
        ),
    }
}

async fn ready(State(state): State<Arc<AdminState>>) -> (StatusCode, String) {
    let problems = state.readiness_problems();
    let degraded = state.degradations();
    if problems.is_empty() && !degraded.is_empty() {
        (StatusCode::OK, format!("ready, {}\n", degraded.join("; ")))
    } else if problems.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
    }
}

/// Reads the datapath's maps on each scrape.
#[derive(Debug)]
struct DatapathCollector {
    state: Arc<AdminState>,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let datapath = self
            .state
            .datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner());

        let info = ConstGauge::new(1i64);
        let labels = [
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("node", self.state.node_name.clone()),
        ];
        let mut metric = encoder.encode_descriptor(
            "veil_agent_info",
            "Agent version and node.",
            None,
            info.metric_type(),
        )?;
        info.encode(metric.encode_family(&labels)?)?;

        let kernel = datapath.kernel_status();
        encode_family(
            &mut encoder,
            "veil_kernel_feature",
            "1 when the node's kernel has a BPF or TLS feature the datapath uses (probed at start), else 0.",
            kernel
                .features
                .iter()
                .map(|f| {
                    let labels = vec![
                        ("feature", f.name.clone()),
                        ("required", f.required.to_string()),
                    ];
                    (labels, ConstGauge::new(i64::from(f.available)))
                })
                .collect(),
        )?;
        encode_family(
            &mut encoder,
            "veil_datapath_choice",
            "What the datapath chose for this kernel (1 per decision); fallback=\"true\" when not the preferred way.",
            kernel
                .choices
                .iter()
                .map(|c| {
                    let labels = vec![
                        ("decision", c.decision.clone()),
                        ("chosen", c.chosen.clone()),
                        ("fallback", c.fallback.to_string()),
                    ];
                    (labels, ConstGauge::new(1))
                })
                .collect(),
        )?;

        let programs: Vec<Labelled<ConstGauge<i64>>> = datapath
            .programs()
            .into_iter()
            .map(|p| {
                let labels = vec![
                    ("hook", p.hook.to_string()),
                    ("interface", p.interface),
                    ("mode", p.mode),
                ];
                (labels, ConstGauge::new(1))
            })
            .collect();
        encode_family(
            &mut encoder,
            "veil_datapath_programs_attached",
            "eBPF programs attached, by hook and mode.",
            programs,
        )?;

        if let Ok(counters) = datapath.counters() {
            let labels = |c: &veil_api::InterfaceCounters| {
                vec![
                    ("hook", c.hook.to_string()),
                    ("interface", c.interface.clone()),
                ]
            };
            encode_family(
                &mut encoder,
                "veil_datapath_packets",
                "Packets seen by the eBPF programs, by hook and interface.",
                counters
                    .iter()
                    .map(|c| (labels(c), ConstCounter::new(c.packets)))
                    .collect(),
            )?;
            encode_family(
                &mut encoder,
                "veil_datapath_bytes",
                "Bytes seen by the eBPF programs, by hook and interface.",
                counters
                    .iter()
                    .map(|c| (labels(c), ConstCounter::new(c.bytes)))
                    .collect(),
            )?;
        }

        if let Ok(events) = datapath.overlay().events() {
            let (drops, handled): (Vec<_>, Vec<_>) = events.iter().partition(|(e, _)| e.is_drop());
            encode_family(
                &mut encoder,
                "veil_datapath_drops",
                "Packets dropped by the eBPF programs, by reason.",
                drops
                    .iter()
                    .map(|(e, n)| {
                        let reason = e.name().trim_start_matches("drop-").to_string();
                        (vec![("reason", reason)], ConstCounter::new(*n))
                    })
                    .collect(),
            )?;
            encode_family(
                &mut encoder,
                "veil_datapath_handled",
                "Packets the eBPF programs forwarded or passed on, by action.",
                handled
                    .iter()
                    .map(|(e, n)| {
                        (
                            vec![("action", e.name().to_string())],
                            ConstCounter::new(*n),
                        )
                    })
                    .collect(),
            )?;
        }

        if let Some(overlay) = &self.state.overlay {
            let status = overlay.status(&datapath);
            for (name, help, value) in [
                (
                    "veil_overlay_routes",
                    "Remote pod CIDRs and moved pods in the overlay's route map.",
                    status.routes.len() as i64,
                ),
                (
                    "veil_overlay_endpoints",
                    "Local pods in the overlay's endpoint map.",
                    status.endpoints.len() as i64,
                ),
                (
                    "veil_overlay_inventory_valid",
                    "1 when the last inventory read was accepted, 0 when it was refused.",
                    i64::from(status.inventory_error.is_none()),
                ),
                (
                    "veil_overlay_applied",
                    "1 when the last plan was applied completely, 0 while an attach or map \
                     write fails (retried; the agent is not ready meanwhile).",
                    i64::from(status.apply_error.is_none()),
                ),
            ] {
                let gauge = ConstGauge::new(value);
                let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
                gauge.encode(metric)?;
            }
            let plans = ConstCounter::new(status.plans);
            let metric = encoder.encode_descriptor(
                "veil_overlay_plans",
                "Times the agent planned and applied the overlay; flat while nothing changes",
                None,
                plans.metric_type(),
            )?;
            plans.encode(metric)?;
        }
        Ok(())
    }
}

/// One series of a metric family: its labels and its value.
type Labelled<M> = (Vec<(&'static str, String)>, M);

/// Writes one metric family (descriptor, then one line per label set).
fn encode_family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: Vec<Labelled<M>>,
) -> Result<(), std::fmt::Error> {
    let Some(metric_type) = series.first().map(|(_, m)| m.metric_type()) else {
        return Ok(());
    };
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, metric) in &series {
        metric.encode(family.encode_family(labels)?)?;
    }
    Ok(())
}
