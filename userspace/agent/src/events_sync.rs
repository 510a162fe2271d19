//! The agent on the event bus: pods of other nodes, with their node, address
//! and mesh identity, learnt from `veil.pods` (Kafka), merged into the
//! inventory the overlay and the mesh use.
//!
//! Every batch is applied (idempotently: [`Applier`]), written to an on-disk
//! cache of the last known pods, and only then committed, so a restarted
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

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use veil_events::{
    apply::Applier,
    bus::{BusState, EventBus, apply_batch},
    kafka::{KafkaBus, KafkaSettings},
    schema::{Envelope, Event, Topic},
};

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

/// What the bus has taught this agent, shared with the overlay sync.
#[derive(Debug, Default)]
pub struct EventState {
    /// By event key (namespace/pod).
    pods: RwLock<BTreeMap<String, AnnouncedPod>>,
    bus: RwLock<Option<BusState>>,
}

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
        use std::os::unix::fs::OpenOptionsExt;
        let text = {
            let pods = self.pods.read().unwrap_or_else(|p| p.into_inner());
            serde_json::to_string(&*pods).map_err(std::io::Error::other)?
        };
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

/// The running bus; dropping it flushes what is unsent to its outbox file.
pub struct Events {
    pub state: Arc<EventState>,
    bus: Arc<KafkaBus>,
}

impl Events {
    /// Connects (without waiting for the broker), loads the cache and starts
    /// the consumer thread.
    pub fn start(settings: &KafkaSettings, node_name: &str) -> Result<Self, EventsError> {
        std::fs::create_dir_all(&settings.state_dir).map_err(|source| EventsError::StateDir {
            path: settings.state_dir.clone(),
            source,
        })?;
        let bus =
            Arc::new(KafkaBus::connect(settings).map_err(|e| EventsError::Bus(e.to_string()))?);
        let state = Arc::new(EventState::default());
        let cache = settings.state_dir.join("announced-pods.json");
        state.load_cache(&cache);
        let group = settings.group_for(node_name);
        let mut consumer = bus
            .subscribe(&group, &[Topic::Pods])
            .map_err(|e| EventsError::Bus(e.to_string()))?;
        let (thread_state, weak_bus) = (Arc::clone(&state), Arc::downgrade(&bus));
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                let mut applier = Applier::default();
                // Ends when the agent drops the bus (which flushes its outbox).
                while let Some(bus) = weak_bus.upgrade() {
                    *thread_state.bus.write().unwrap_or_else(|p| p.into_inner()) =
                        Some(bus.state());
                    drop(bus);
                    // The cache is written after each applied event, before
                    // the batch is committed: a crash never commits an event
                    // the cache does not hold.
                    let result = apply_batch(
                        &mut consumer,
                        &mut applier,
                        256,
                        Duration::from_millis(200),
                        |envelope| {
                            thread_state.apply(envelope);
                            if let Err(error) = thread_state.save_cache(&cache) {
                                warn!(%error, "cannot write the event cache");
                            }
                        },
                    );
                    match result {
                        Ok(report) if report.applied > 0 => {
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
        info!(group, brokers = ?settings.brokers, "event bus started");
        Ok(Self { state, bus })
    }

    /// Publishes a flow record (what the mesh carried); never blocks on the broker.
    pub fn publish_flow(&self, key: String, seq: u64, event: Event) {
        if let Err(error) = self
            .bus
            .publish(&Envelope::new(Topic::Flows, key, seq, event))
        {
            warn!(%error, "flow record not published");
        }
    }
}
