//! The agent on the event bus: pods of other nodes, with their node, address
//! and mesh identity, learnt from `veil.pods` — through Kafka
//! (`[events.kafka]`), else the embedded journal — merged into the
//! inventory the overlay and the mesh use; revocations from
//! `veil.certificates`.
//!
//! This module starts the bus and runs the consumer thread: every batch is
//! applied (idempotently: [`Applier`]); the on-disk cache of the last known
//! pods is written at most every `CACHE_PERIOD`, and offsets are committed
//! only once the cache holds what they cover, so a restarted agent starts
//! from its cache and resumes from its committed offsets, and a broker
//! outage leaves it working from what it knew. `state` is what was learnt
//! (and the cache), `metrics` what Prometheus sees, `publishing` what
//! the agent itself publishes (certificate events, flow records). The bus
//! state shows in readiness ("degraded: event bus: …") and `veilctl status`.

mod metrics;
mod publishing;
mod state;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tracing::{info, warn};
use veil_events::{
    apply::Applier,
    bus::{EventBus, EventConsumer, apply_batch_with},
    journal::EmbeddedBus,
    kafka::KafkaBus,
    schema::Topic,
};

pub use self::{
    metrics::EventMetrics,
    state::{AnnouncedPod, EventState},
};
use self::{publishing::Publisher, state::revocations_path};
use crate::config::EventBusChoice;

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

/// How often, at most, the cache of announced pods is written (and the
/// offsets it covers committed).
const CACHE_PERIOD: Duration = Duration::from_millis(100);

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
}

fn create_state_dir(path: &Path) -> Result<(), EventsError> {
    std::fs::create_dir_all(path).map_err(|source| EventsError::StateDir {
        path: path.to_path_buf(),
        source,
    })
}
