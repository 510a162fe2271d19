//! What the bus has taught this agent: the pods of other nodes (merged into
//! the inventory), the revocations, the bus state, and evidence of this
//! node's clock running behind — with the on-disk cache a restarted agent
//! starts from.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::RwLock,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use veil_events::{
    bus::BusState,
    schema::{Envelope, Event},
};

use super::EventMetrics;
use crate::inventory::{Inventory, MacAddress, PodMesh, PodSpec};

/// A pod another node announced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnouncedPod {
    pub namespace: String,
    pub pod: String,
    pub node: String,
    pub ip: Ipv4Addr,
    /// SPIFFE ID; the pod is meshed when it parses.
    pub identity: String,
}

/// What the bus has taught this agent, shared with the overlay sync.
#[derive(Debug, Default)]
pub struct EventState {
    /// By event key (namespace/pod).
    pods: RwLock<BTreeMap<String, AnnouncedPod>>,
    pub(super) bus: RwLock<Option<BusState>>,
    /// `kafka` or `embedded`, once started.
    pub kind: std::sync::OnceLock<&'static str>,
    /// Told after each batch that changed something, so the overlay sync
    /// runs at once instead of at its next tick.
    pub changed: tokio::sync::Notify,
    pub metrics: EventMetrics,
    /// Certificates revoked (`veil.certificates`).
    pub revocations: crate::revocations::Revocations,
    /// The most an event seemed to arrive before its publication, and when.
    early: std::sync::Mutex<Option<(Duration, std::time::Instant)>>,
}

/// How long an early arrival is remembered for `clock_behind_ms`.
const CLOCK_EVIDENCE_WINDOW: Duration = Duration::from_secs(300);
/// Early arrivals below this are noise (millisecond timestamps, scheduling).
const CLOCK_TOLERANCE: Duration = Duration::from_millis(50);

impl EventState {
    /// Adds the announced pods of other nodes to `inventory`: a pod the file
    /// already lists (by name or address) wins, so a node's own view of its
    /// pods is never overridden from afar.
    pub fn merge_into(&self, inventory: &mut Inventory, this_node: &str) {
        let pods = self.pods.read().unwrap_or_else(|p| p.into_inner());
        for announced in pods.values() {
            let name = format!("{}/{}", announced.namespace, announced.pod);
            if announced.node == this_node
                || inventory.node(&announced.node).is_none()
                || inventory
                    .pods
                    .iter()
                    .any(|p| p.ip == announced.ip || p.name == name)
                || !inventory
                    .nodes
                    .iter()
                    .any(|n| n.pod_cidr.contains(announced.ip))
            {
                continue;
            }
            let mesh = announced
                .identity
                .parse::<veil_identity::SpiffeId>()
                .ok()
                .map(|id| PodMesh {
                    namespace: id.namespace().into(),
                    service_account: id.service_account().into(),
                    mode: None,
                });
            inventory.pods.push(PodSpec {
                name,
                node: announced.node.clone(),
                ip: announced.ip,
                // Only the pod's own node needs these; it knows them locally.
                mac: MacAddress([0; 6]),
                interface: String::new(),
                mesh,
            });
        }
    }

    /// Records when an event was published by the broker's clock, to notice
    /// that this node's clock is behind (events "from the future").
    pub(super) fn note_publication(&self, published: std::time::SystemTime) {
        let now = std::time::SystemTime::now();
        match now.duration_since(published) {
            Ok(lag) => self.metrics.lag_seconds.observe(lag.as_secs_f64()),
            Err(early) => {
                let early = early.duration();
                let mut slot = self.early.lock().unwrap_or_else(|p| p.into_inner());
                let keep = slot.is_some_and(|(worst, at)| {
                    worst >= early && at.elapsed() < CLOCK_EVIDENCE_WINDOW
                });
                if !keep {
                    *slot = Some((early, std::time::Instant::now()));
                }
            }
        }
    }

    /// How far behind the publishers' clocks this node's seems, when it
    /// seemed so by more than the tolerance in the last minutes.
    pub fn clock_behind_ms(&self) -> Option<u64> {
        let slot = self.early.lock().unwrap_or_else(|p| p.into_inner());
        slot.filter(|(early, at)| *early > CLOCK_TOLERANCE && at.elapsed() < CLOCK_EVIDENCE_WINDOW)
            .map(|(early, _)| early.as_millis() as u64)
    }

    /// The bus's state, when the agent has a bus.
    pub fn bus_state(&self) -> Option<BusState> {
        self.bus.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn announced_pods(&self) -> usize {
        self.pods.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub(super) fn apply(&self, envelope: &Envelope) {
        let mut pods = self.pods.write().unwrap_or_else(|p| p.into_inner());
        match &envelope.event {
            Event::PodReady {
                namespace,
                pod,
                node,
                ip,
                identity,
            } => match ip.parse() {
                Ok(ip) => {
                    pods.insert(
                        envelope.key.clone(),
                        AnnouncedPod {
                            namespace: namespace.clone(),
                            pod: pod.clone(),
                            node: node.clone(),
                            ip,
                            identity: identity.clone(),
                        },
                    );
                }
                Err(_) => {
                    warn!(key = %envelope.key, %ip, "pod-ready event with a bad address; ignored")
                }
            },
            Event::PodDeleted { .. } => {
                pods.remove(&envelope.key);
            }
            Event::CertificateRevoked { identity, serial } => {
                drop(pods);
                self.revocations.revoke(serial, identity);
            }
            Event::IdentityRevoked {
                identity,
                revoked_before,
            } => {
                drop(pods);
                match humantime::parse_rfc3339(revoked_before) {
                    Ok(instant) => {
                        let before = instant
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        self.revocations.revoke_identity(identity, before);
                    }
                    Err(error) => {
                        warn!(key = %envelope.key, %error, revoked_before, "identity-revoked event with a bad instant; ignored")
                    }
                }
            }
            // Scheduled pods have no address yet; other topics are not ours.
            _ => {}
        }
    }

    pub(super) fn load_cache(&self, path: &Path) {
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        match serde_json::from_str::<BTreeMap<String, AnnouncedPod>>(&text) {
            Ok(cached) => {
                info!(pods = cached.len(), cache = %path.display(), "announced pods loaded from the cache");
                *self.pods.write().unwrap_or_else(|p| p.into_inner()) = cached;
            }
            Err(error) => {
                warn!(%error, cache = %path.display(), "event cache unreadable; starting empty")
            }
        }
    }

    /// Writes the cache atomically (0600).
    pub(super) fn save_cache(&self, path: &Path) -> std::io::Result<()> {
        let text = {
            let pods = self.pods.read().unwrap_or_else(|p| p.into_inner());
            serde_json::to_string(&*pods).map_err(std::io::Error::other)?
        };
        write_synced(path, &text)?;
        write_synced(&revocations_path(path), &self.revocations.to_json()?)
    }
}

/// The revocation cache next to the pods cache.
pub(super) fn revocations_path(pods_cache: &Path) -> PathBuf {
    pods_cache.with_file_name("revoked-serials.json")
}

/// Replaces `path` with `text` atomically, synced, mode 0600.
fn write_synced(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    {
        let partial = path.with_extension("json.partial");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&partial, path)
    }
}
