//! The mesh's Prometheus metrics: connections by direction, mode and result,
//! running sessions reset and why, handshakes full or resumed, bytes relayed, handshake latency, open
//! connections, and when each workload certificate expires.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use veil_api::MeshConnectionCount;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// A local pod's connection to a pod on another node.
    Outbound,
    /// A peer agent's connection to a local pod.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub direction: Direction,
    /// `ktls`, `userspace`, or `none` for connections refused before a session.
    pub mode: &'static str,
    /// `ok`, or why the connection was refused.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResetLabels {
    pub direction: Direction,
    /// Why the running session was reset: no longer allowed (`denied`,
    /// `revoked`, …), its stream cut (`truncated`) or its key worn out
    /// (`record_limit`).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    /// The workload's SPIFFE ID.
    pub identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: Direction,
    /// `full` (certificates exchanged and verified) or `resumed` (a session
    /// ticket; see `veil_mtls::resumption`).
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByteLabels {
    pub direction: Direction,
    /// `to_peer`: from the local pod into TLS; `to_pod`: out of TLS to the local pod.
    pub flow: &'static str,
}

/// Handshake latency buckets: 0.5 ms to ~1 s.
fn handshake_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 12,
    ))
}

/// Direction, TLS mode and result of a connection.
type CountKey = (&'static str, &'static str, &'static str);

#[derive(Clone, Debug)]
pub struct MeshMetrics {
    pub connections: Family<ConnectionLabels, Counter>,
    /// The same counts, readable for the admin API.
    counts: Arc<Mutex<BTreeMap<CountKey, u64>>>,
    pub open: Family<DirectionLabels, Gauge>,
    /// Running sessions reset because what allowed them changed.
    pub sessions_reset: Family<ResetLabels, Counter>,
    pub handshakes: Family<HandshakeLabels, Counter>,
    pub bytes: Family<ByteLabels, Counter>,
    pub handshake_seconds: Family<DirectionLabels, Histogram>,
    /// Unix time at which each workload certificate held here expires.
    pub certificate_expiry: Family<IdentityLabels, Gauge>,
    /// Inbound connections in handshake now (see `handshake_slots`).
    pub handshakes_in_progress: Gauge,
}

impl Default for MeshMetrics {
    fn default() -> Self {
        Self {
            connections: Family::default(),
            counts: Arc::default(),
            open: Family::default(),
            sessions_reset: Family::default(),
            handshakes: Family::default(),
            bytes: Family::default(),
            handshake_seconds: Family::new_with_constructor(handshake_histogram),
            certificate_expiry: Family::default(),
            handshakes_in_progress: Gauge::default(),
        }
    }
}

impl MeshMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "veil_mesh_connections",
            "Meshed TCP connections by direction, TLS mode and result",
            self.connections.clone(),
        );
        registry.register(
            "veil_mesh_open_connections",
            "Meshed TCP connections being relayed now",
            self.open.clone(),
        );
        registry.register(
            "veil_mesh_sessions_reset",
            "Running meshed sessions reset because what allowed them changed: a rule, \
             a pod's identity or place, a revoked certificate",
            self.sessions_reset.clone(),
        );
        registry.register(
            "veil_mesh_handshakes",
            "Completed mTLS handshakes by direction, full or resumed from a session ticket",
            self.handshakes.clone(),
        );
        registry.register(
            "veil_mesh_relayed_bytes",
            "Application bytes relayed between pods and mTLS sessions",
            self.bytes.clone(),
        );
        registry.register(
            "veil_mesh_handshake_seconds",
            "Time from accepting a connection to an established mTLS session",
            self.handshake_seconds.clone(),
        );
        registry.register(
            "veil_mesh_handshakes_in_progress",
            "Inbound connections not yet authenticated: in handshake, holding a slot \
             (refusals for want of one count in veil_mesh_connections)",
            self.handshakes_in_progress.clone(),
        );
        registry.register(
            "veil_mesh_certificate_expiry_timestamp_seconds",
            "When each workload certificate held on this node expires (Unix time); \
             alert on it minus time() below the renewal margin",
            self.certificate_expiry.clone(),
        );
    }

    /// Counts a completed handshake, full or resumed.
    pub fn handshake(&self, direction: Direction, connection: &rustls::Connection) {
        let kind = match connection.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => "resumed",
            _ => "full",
        };
        self.handshakes
            .get_or_create(&HandshakeLabels { direction, kind })
            .inc();
    }

    pub fn connection(&self, direction: Direction, mode: &'static str, result: &'static str) {
        self.connections
            .get_or_create(&ConnectionLabels {
                direction,
                mode,
                result,
            })
            .inc();
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *counts
            .entry((direction.as_str(), mode, result))
            .or_default() += 1;
    }

    /// Connection counts by direction, mode and result.
    pub fn summary(&self) -> Vec<MeshConnectionCount> {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts
            .iter()
            .map(|(&(direction, mode, result), &count)| MeshConnectionCount {
                direction: direction.into(),
                mode: mode.into(),
                result: result.into(),
                count,
            })
            .collect()
    }
}
