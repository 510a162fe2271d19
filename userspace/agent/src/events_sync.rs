//! The agent on the event bus: pods of other nodes, with their node, address
//! and mesh identity, learnt from `veil.pods` (Kafka), merged into the
//! inventory the overlay and the mesh use.
//!
//! Every batch is applied (idempotently: [`Applier`]); the on-disk cache of
//! the last known pods is written at most every [`CACHE_PERIOD`], and offsets
//! are committed only once the cache holds what they cover, so a restarted
//! agent starts from its cache and resumes from its committed offsets, and a
//! broker outage leaves it working from what it knew. The bus state shows in
//! readiness ("degraded: event bus: …") and `veilctl status`. Mesh
//! connections are published as flow records on `veil.flows` (who talked to
//! whom, bytes, mode, result).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use prometheus_client::{
    metrics::{counter::Counter, histogram::Histogram},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use veil_events::{
    apply::Applier,
    bus::{BusState, EventBus, EventConsumer, apply_batch_with},
    journal::EmbeddedBus,
    kafka::KafkaBus,
    schema::{Envelope, Event, Topic},
};

use crate::config::EventBusChoice;

use crate::inventory::{Inventory, MacAddress, PodMesh, PodSpec};

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("cannot start the event bus: {0}")]
    Bus(String),
    #[error("cannot use the event state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

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

/// Event-bus metrics: how much is applied and how far behind the publisher.
#[derive(Debug, Clone)]
pub struct EventMetrics {
    /// Events applied (new for their key), all topics.
    pub applied: Counter,
    /// Publication (the broker's timestamp, ms resolution) to applied here.
    pub lag_seconds: Histogram,
}

/// Upper bounds of the lag histogram, in milliseconds.
const LAG_BUCKETS_MS: [f64; 22] = [
    1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0, 125.0, 150.0,
    200.0, 300.0, 500.0, 1000.0, 2000.0, 5000.0,
];

impl Default for EventMetrics {
    fn default() -> Self {
        Self {
            applied: Counter::default(),
            // Fine around the 100 ms goal of the fan-out benchmark.
            lag_seconds: Histogram::new(LAG_BUCKETS_MS.iter().map(|ms| ms / 1000.0)),
        }
    }
}

impl EventMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "veil_events_applied",
            "Control-plane events applied by this agent (duplicates and stale ones excluded)",
            self.applied.clone(),
        );
        registry.register(
            "veil_events_apply_lag_seconds",
            "Time from an event's publication (broker timestamp) to its application here",
            self.lag_seconds.clone(),
        );
    }
}

/// What the bus has taught this agent, shared with the overlay sync.
#[derive(Debug, Default)]
pub struct EventState {
    /// By event key (namespace/pod).
    pods: RwLock<BTreeMap<String, AnnouncedPod>>,
    bus: RwLock<Option<BusState>>,
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

/// How often, at most, the cache of announced pods is written (and the
/// offsets it covers committed).
const CACHE_PERIOD: Duration = Duration::from_millis(100);

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
    fn note_publication(&self, published: std::time::SystemTime) {
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

    fn apply(&self, envelope: &Envelope) {
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

    fn load_cache(&self, path: &Path) {
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
    fn save_cache(&self, path: &Path) -> std::io::Result<()> {
        let text = {
            let pods = self.pods.read().unwrap_or_else(|p| p.into_inner());
            serde_json::to_string(&*pods).map_err(std::io::Error::other)?
        };
        write_synced(path, &text)?;
        write_synced(&revocations_path(path), &self.revocations.to_json()?)
    }
}

/// The revocation cache next to the pods cache.
fn create_state_dir(path: &Path) -> Result<(), EventsError> {
    std::fs::create_dir_all(path).map_err(|source| EventsError::StateDir {
        path: path.to_path_buf(),
        source,
    })
}

fn revocations_path(pods_cache: &Path) -> PathBuf {
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

/// Publishing through whichever bus runs.
trait Publisher: Send + Sync {
    fn publish(&self, envelope: &Envelope) -> Result<(), String>;
}

impl<B> Publisher for B
where
    B: EventBus + Send + Sync,
    B::Error: std::fmt::Display,
{
    fn publish(&self, envelope: &Envelope) -> Result<(), String> {
        EventBus::publish(self, envelope).map_err(|e| e.to_string())
    }
}

/// The running bus; dropping it flushes what is unsent (Kafka: to its
/// outbox file) and ends the consumer thread.
pub struct Events {
    pub state: Arc<EventState>,
    bus: Arc<dyn Publisher>,
}

impl Events {
    /// Starts the chosen bus (Kafka: without waiting for the broker), loads
    /// the cache and starts the consumer thread.
    pub fn start(choice: &EventBusChoice<'_>, node_name: &str) -> Result<Self, EventsError> {
        match choice {
            EventBusChoice::Kafka(settings) => {
                create_state_dir(&settings.state_dir)?;
                let bus =
                    KafkaBus::connect(settings).map_err(|e| EventsError::Bus(e.to_string()))?;
                let events = Self::start_on(
                    bus,
                    "kafka",
                    &settings.state_dir,
                    &settings.group_for(node_name),
                )?;
                info!(brokers = ?settings.brokers, "event bus started (Kafka)");
                Ok(events)
            }
            EventBusChoice::Embedded(dir) => {
                create_state_dir(dir)?;
                let bus = EmbeddedBus::open(&dir.join("journal"))
                    .map_err(|e| EventsError::Bus(e.to_string()))?;
                let events = Self::start_on(bus, "embedded", dir, "veil-agent")?;
                info!(
                    journal = %dir.join("journal").display(),
                    "no Kafka brokers configured: embedded event bus started (a local journal; \
                     other nodes' pods come only from the inventory or the API server)"
                );
                Ok(events)
            }
        }
    }

    fn start_on<B>(
        bus: B,
        kind: &'static str,
        state_dir: &Path,
        group: &str,
    ) -> Result<Self, EventsError>
    where
        B: EventBus + Send + Sync + 'static,
        B::Error: std::fmt::Display,
        B::Consumer: Send + 'static,
        <B::Consumer as EventConsumer>::Error: std::fmt::Display,
    {
        let bus = Arc::new(bus);
        let state = Arc::new(EventState::default());
        let _ = state.kind.set(kind);
        let cache = state_dir.join("announced-pods.json");
        state.load_cache(&cache);
        state.revocations.load(&revocations_path(&cache));
        let mut consumer = bus
            .subscribe(group, &[Topic::Pods, Topic::Certificates])
            .map_err(|e| EventsError::Bus(e.to_string()))?;
        let (thread_state, weak_bus) = (Arc::clone(&state), Arc::downgrade(&bus));
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                let mut applier = Applier::default();
                let mut pending = Vec::new();
                let (mut dirty, mut saved_at) = (false, std::time::Instant::now());
                // Ends when the agent drops the bus (which flushes its outbox).
                while let Some(bus) = weak_bus.upgrade() {
                    *thread_state.bus.write().unwrap_or_else(|p| p.into_inner()) =
                        Some(bus.state());
                    drop(bus);
                    // The cache is written at most every CACHE_PERIOD (an
                    // fsync per batch would hold the consumer back), and
                    // offsets are committed only once the cache holds what
                    // they cover: a crash never commits an event the cache
                    // does not hold; what was applied but not yet committed
                    // comes again and is applied again, harmlessly.
                    let result = apply_batch_with(
                        &mut consumer,
                        &mut applier,
                        1024,
                        Duration::from_millis(200),
                        &mut pending,
                        |envelope, published| {
                            thread_state.apply(envelope);
                            thread_state.metrics.applied.inc();
                            if let Some(published) = published {
                                thread_state.note_publication(published);
                            }
                        },
                        |applied| {
                            dirty |= applied;
                            if !dirty {
                                return true;
                            }
                            if saved_at.elapsed() < CACHE_PERIOD {
                                return false;
                            }
                            saved_at = std::time::Instant::now();
                            match thread_state.save_cache(&cache) {
                                Ok(()) => {
                                    dirty = false;
                                    true
                                }
                                Err(error) => {
                                    warn!(%error, "cannot write the event cache; not committing");
                                    false
                                }
                            }
                        },
                    );
                    match result {
                        Ok(report) if report.applied > 0 => {
                            thread_state.changed.notify_one();
                            info!(
                                applied = report.applied,
                                pods = thread_state.announced_pods(),
                                "pod events applied"
                            );
                        }
                        Ok(_) => {}
                        Err(error) => {
                            warn!(%error, "event consumer error; retrying");
                            std::thread::sleep(Duration::from_millis(500));
                        }
                    }
                }
            })
            .map_err(|e| EventsError::Bus(e.to_string()))?;
        Ok(Self { state, bus })
    }

    /// A hook for the workload store (sequenced like [`Self::flow_sink`]):
    /// each certificate issued here becomes
    /// `certificate-issued` (first) or `certificate-rotated` (renewal or
    /// re-key) on `veil.certificates`, keyed `<node>/<identity>`.
    pub fn certificate_hook(&self, node_name: &str) -> crate::mesh::workloads::IssueHook {
        let bus = Arc::clone(&self.bus);
        let node = node_name.to_string();
        let sequence = MicrosSequence::default();
        Box::new(move |workload, previous| {
            let seq = sequence.next();
            let identity = workload.identity.to_string();
            let event = match previous {
                None => Event::CertificateIssued {
                    identity: identity.clone(),
                    serial: workload.serial.clone(),
                    not_after: humantime::format_rfc3339_seconds(workload.not_after).to_string(),
                },
                Some(previous) => Event::CertificateRotated {
                    identity: identity.clone(),
                    serial: workload.serial.clone(),
                    previous_serial: previous.to_string(),
                },
            };
            let key = format!("{node}/{identity}");
            if let Err(error) = bus.publish(&Envelope::new(Topic::Certificates, key, seq, event)) {
                warn!(%error, "certificate event not published");
            }
        })
    }

    /// A sink for the mesh's flow records: each becomes a `flow` event on
    /// `veil.flows`, keyed by this node (its flows stay in order) and
    /// sequenced by microseconds since the epoch (strictly increasing, also
    /// across restarts). Publishing never blocks on the broker (outbox).
    pub fn flow_sink(&self, node_name: &str) -> crate::mesh::flows::FlowSink {
        let bus = Arc::clone(&self.bus);
        let key = node_name.to_string();
        let sequence = MicrosSequence::default();
        Box::new(move |record: &veil_api::FlowRecord| {
            let seq = sequence.next();
            let event = Event::Flow {
                source: record.source.clone(),
                destination: record.destination.clone(),
                bytes: record.bytes_to_peer + record.bytes_to_pod,
                mode: record.mode.clone(),
                result: record.result.clone(),
            };
            if let Err(error) = bus.publish(&Envelope::new(Topic::Flows, key.clone(), seq, event)) {
                warn!(%error, "flow record not published");
            }
        })
    }
}

/// Event sequences for what this agent publishes: microseconds since the
/// epoch, strictly increasing (also across restarts, clock permitting).
#[derive(Default)]
struct MicrosSequence(std::sync::atomic::AtomicU64);

impl MicrosSequence {
    fn next(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        let next = |previous: u64| now.max(previous + 1);
        self.0
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |previous| Some(next(previous)),
            )
            .map_or(now, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_sequences_only_grow_even_within_one_microsecond() {
        let sequence = MicrosSequence::default();
        let values: Vec<u64> = (0..1000).map(|_| sequence.next()).collect();
        assert!(values.windows(2).all(|w| w[0] < w[1]));
        assert!(
            values[0] > 1_700_000_000_000_000,
            "microseconds since the epoch"
        );
    }
}
