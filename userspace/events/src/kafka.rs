//! The Kafka event bus: the same [`EventBus`] as the embedded journal, over a
//! real broker with rdkafka (bundled librdkafka).
//!
//! Why it is built this way:
//!
//! * **Publishing never waits for the broker and never loses an event.**
//!   `publish` puts the event into the [`Outbox`] (memory, then a spill file
//!   under the state directory) and returns; a sender thread hands events to
//!   an idempotent librdkafka producer and removes each from the outbox only
//!   when its delivery report says the broker has it. A failed delivery (the
//!   broker down past `delivery_timeout_ms`) puts it back, and it is retried
//!   with exponential backoff until acknowledged. Only a full outbox makes
//!   `publish` fail, loudly.
//! * **State for readiness.** [`KafkaBus::state`] is `Degraded` with a reason
//!   while the broker is unreachable or deliveries fail, `Connected` once it
//!   answers again.
//! * **Consumers commit after apply.** [`KafkaConsumer`] never auto-commits;
//!   [`crate::bus::apply_batch`] commits a batch once applied. Messages that
//!   do not decode are logged with topic/partition/offset, counted, and
//!   committed with the rest: they never block a partition.
//! * **Topics are configuration** ([`TopicNames`], defaults as in
//!   `deploy/kafka/topics.yaml`) and are created when missing, with the
//!   partition counts and cleanup policies of that file.
//! * The message key is the envelope's key, so one object's events stay in
//!   one partition, in order.

use std::{
    path::PathBuf,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig, ClientContext, Message, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    config::RDKafkaLogLevel,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance},
    error::{KafkaError, RDKafkaErrorCode},
    producer::{
        BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
    },
};
use serde::Deserialize;

use crate::{
    bus::{self, BusState, Delivery, EventBus, EventConsumer, Position},
    outbox::{Outbox, OutboxError, OutboxLimits, OutboxStats},
    schema::{DecodeError, Envelope, Topic, decode},
};

/// How long [`KafkaBus::replay`] waits for more after the watermarks.
pub const REPLAY_QUIET: Duration = Duration::from_millis(500);

/// Kafka topic names per event role.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicNames {
    pub pods: String,
    pub certificates: String,
    pub policy: String,
    pub flows: String,
}

impl Default for TopicNames {
    fn default() -> Self {
        Self {
            pods: "veil.pods".into(),
            certificates: "veil.certificates".into(),
            policy: "veil.policy".into(),
            flows: "veil.flows".into(),
        }
    }
}

impl TopicNames {
    pub fn name(&self, topic: Topic) -> &str {
        match topic {
            Topic::Pods => &self.pods,
            Topic::Certificates => &self.certificates,
            Topic::Policy => &self.policy,
            Topic::Flows => &self.flows,
        }
    }

    /// The role of a Kafka topic name, if it is one of ours.
    pub fn role(&self, name: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|&t| self.name(t) == name)
    }
}

/// Partitions and cleanup policy a topic is created with, as in
/// `deploy/kafka/topics.yaml`.
pub fn topic_defaults(topic: Topic) -> (i32, &'static str) {
    match topic {
        Topic::Pods => (12, "compact"),
        Topic::Certificates => (6, "delete"),
        Topic::Policy => (3, "compact"),
        Topic::Flows => (24, "delete"),
    }
}

/// The `[events.kafka]` part of the agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// Consumer group; default `veil-agent-<node>` (one group per agent,
    /// since every agent needs every event).
    pub group_id: Option<String>,
    pub topics: TopicNames,
    /// Create missing topics (with the partitions and cleanup policy of
    /// `deploy/kafka/topics.yaml`). Existing topics are left alone.
    pub create_topics: bool,
    /// Partitions for created topics; default per topic as in topics.yaml.
    pub partitions: Option<i32>,
    /// Replication factor for created topics; -1: the broker's default.
    pub replication_factor: i32,
    /// Where the outbox spills (a file `outbox.jsonl`).
    pub state_dir: PathBuf,
    /// Unacknowledged events kept in memory before spilling to disk.
    pub outbox_memory_events: usize,
    /// Bound of the spill file; past it `publish` fails.
    pub outbox_disk_bytes: u64,
    /// How long librdkafka keeps trying one delivery before the outbox takes
    /// the event back to retry it (`message.timeout.ms`).
    pub delivery_timeout_ms: u64,
    /// Longest wait between retries of failed deliveries.
    pub retry_backoff_max_ms: u64,
    /// How long the broker may hold a fetch that finds nothing new
    /// (`fetch.wait.max.ms`). An upper bound on the delivery delay of a
    /// broker that answers only when the wait ends; each idle consumer sends
    /// about 1000 / this fetches per second.
    pub fetch_wait_max_ms: u64,
    /// How long a clean shutdown waits for deliveries before writing what is
    /// left to the spill file.
    pub shutdown_timeout_ms: u64,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: Vec::new(),
            group_id: None,
            topics: TopicNames::default(),
            create_topics: true,
            partitions: None,
            replication_factor: -1,
            state_dir: PathBuf::from("/var/lib/veil/events"),
            outbox_memory_events: 10_000,
            outbox_disk_bytes: 256 << 20,
            delivery_timeout_ms: 30_000,
            retry_backoff_max_ms: 5_000,
            fetch_wait_max_ms: 20,
            shutdown_timeout_ms: 5_000,
        }
    }
}

impl KafkaSettings {
    /// The consumer group of the agent on `node`.
    pub fn group_for(&self, node: &str) -> String {
        self.group_id
            .clone()
            .unwrap_or_else(|| format!("veil-agent-{node}"))
    }

    /// Refuses settings that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), KafkaBusError> {
        let bad = |what: String| Err(KafkaBusError::Settings(what));
        if self.brokers.is_empty() {
            return bad("brokers: name at least one broker (host:port)".into());
        }
        for broker in &self.brokers {
            let ok = broker
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok || broker.contains(',') {
                return bad(format!("brokers: {broker:?} is not host:port"));
            }
        }
        let mut seen = Vec::new();
        for topic in Topic::ALL {
            let name = self.topics.name(topic);
            let valid = (1..=249).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && name != "."
                && name != "..";
            if !valid {
                return bad(format!(
                    "topics.{}: {name:?} is not a Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)",
                    topic.name()
                ));
            }
            if seen.contains(&name) {
                return bad(format!(
                    "topics.{}: {name:?} is used for two roles",
                    topic.name()
                ));
            }
            seen.push(name);
        }
        if self.partitions.is_some_and(|p| p < 1) {
            return bad("partitions: must be at least 1".into());
        }
        if self.replication_factor == 0 || self.replication_factor < -1 {
            return bad("replication_factor: must be -1 (broker default) or at least 1".into());
        }
        if !(1..=10_000).contains(&self.fetch_wait_max_ms) {
            return bad(format!(
                "fetch_wait_max_ms = {} is out of range (1 to 10000)",
                self.fetch_wait_max_ms
            ));
        }
        if self.delivery_timeout_ms == 0 || self.retry_backoff_max_ms == 0 {
            return bad("delivery_timeout_ms and retry_backoff_max_ms must be above 0".into());
        }
        if let Some(group) = &self.group_id
            && group.is_empty()
        {
            return bad("group_id: must not be empty".into());
        }
        Ok(())
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.brokers.join(","))
            .set("client.id", "veil-agent")
            .set("reconnect.backoff.max.ms", "2000")
            .set("topic.metadata.refresh.interval.ms", "10000");
        config
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaBusError {
    #[error("kafka settings: {0}")]
    Settings(String),
    #[error("kafka {what}: {source}")]
    Client {
        what: &'static str,
        source: KafkaError,
    },
    #[error("kafka: creating topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("kafka: starting the sender thread: {0}")]
    Thread(std::io::Error),
    #[error(
        "kafka: reading {topic} back: {reached} of its partitions read to the end within {timeout:?}"
    )]
    ReplayTimeout {
        topic: String,
        reached: String,
        timeout: Duration,
    },
}

fn client(what: &'static str) -> impl FnOnce(KafkaError) -> KafkaBusError {
    move |source| KafkaBusError::Client { what, source }
}

/// librdkafka's own log lines, into tracing.
fn log_librdkafka(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility, "{message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

/// Events in flight at once (handed to librdkafka, not acknowledged).
const MAX_IN_FLIGHT: usize = 10_000;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// How often an idle, degraded bus asks the broker whether it is back.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Inner {
    outbox: Outbox,
    state: BusState,
    /// Failed deliveries wait until then before being sent again.
    retry_at: Option<Instant>,
    backoff: Duration,
    shutdown: bool,
    /// The producer of this generation must be replaced (the broker no
    /// longer accepts its producer id, e.g. after a broker restart).
    replace: Option<u64>,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    changed: Condvar,
    malformed: AtomicU64,
    acked: AtomicU64,
    failed: AtomicU64,
    backoff_max: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every
        // update is a single step); keep going rather than poison the bus.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn degrade(&self, inner: &mut Inner, reason: String) {
        if inner.state == BusState::Connected {
            tracing::warn!(%reason, "event bus degraded: events are kept in the outbox");
        }
        inner.state = BusState::Degraded { reason };
    }

    fn connected(&self, inner: &mut Inner) {
        if inner.state != BusState::Connected {
            tracing::info!(
                pending = inner.outbox.stats().pending(),
                "event bus connected"
            );
            inner.state = BusState::Connected;
        }
        inner.backoff = FIRST_BACKOFF;
    }

    /// A delivery failed: retry after the current backoff, then back off more.
    fn schedule_retry(&self, inner: &mut Inner) {
        let at = Instant::now() + inner.backoff;
        inner.retry_at = Some(inner.retry_at.map_or(at, |t| t.max(at)));
        inner.backoff = (inner.backoff * 2).min(self.backoff_max);
    }
}

/// Receives delivery reports and client errors for the producer.
struct SenderContext {
    shared: Arc<Shared>,
    generation: u64,
}

/// Delivery errors after which the idempotent producer's id is no good: only
/// a new producer (a new producer id) gets events through again.
fn needs_new_producer(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::UnknownProducerId
                | RDKafkaErrorCode::OutOfOrderSequenceNumber
                | RDKafkaErrorCode::InvalidProducerIdMapping
        )
    )
}

impl ClientContext for SenderContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_librdkafka(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka producer");
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            let shared = &self.shared;
            let mut inner = shared.lock();
            shared.degrade(&mut inner, format!("all brokers down ({reason})"));
        }
    }
}

impl ProducerContext for SenderContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: usize) {
        let shared = &self.shared;
        let mut inner = shared.lock();
        match result {
            Ok(_) => {
                if let Err(error) = inner.outbox.ack(ticket as u64) {
                    tracing::error!(%error, "event outbox: cannot forget a delivered event");
                }
                shared.acked.fetch_add(1, Ordering::Relaxed);
                shared.connected(&mut inner);
            }
            Err((error, _)) => {
                inner.outbox.nack(ticket as u64);
                shared.failed.fetch_add(1, Ordering::Relaxed);
                if needs_new_producer(error) {
                    inner.replace = Some(self.generation);
                }
                shared.degrade(&mut inner, format!("delivery failed: {error}"));
                shared.schedule_retry(&mut inner);
            }
        }
        shared.changed.notify_all();
    }
}

/// Log routing for the admin client and consumers.
struct QuietContext;

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_librdkafka(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client");
    }
}

impl ConsumerContext for QuietContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(
                    partitions = tpl.count(),
                    "kafka consumer: partitions assigned"
                )
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(
                    partitions = tpl.count(),
                    "kafka consumer: partitions revoked"
                )
            }
            Rebalance::Error(error) => tracing::warn!(%error, "kafka consumer: rebalance failed"),
        }
    }
}

/// The event bus over Kafka. Dropping it stops the sender after a bounded
/// wait and writes whatever is unacknowledged to the spill file.
#[derive(Debug)]
pub struct KafkaBus {
    settings: KafkaSettings,
    shared: Arc<Shared>,
    sender: Option<JoinHandle<()>>,
}

impl KafkaBus {
    /// Validates `settings`, opens the outbox and starts the sender. Does not
    /// wait for the broker: until it answers the bus is `Degraded` and events
    /// wait in the outbox.
    pub fn connect(settings: &KafkaSettings) -> Result<Self, KafkaBusError> {
        settings.validate()?;
        let outbox = Outbox::open(
            &settings.state_dir,
            OutboxLimits {
                memory_events: settings.outbox_memory_events,
                disk_bytes: settings.outbox_disk_bytes,
            },
        )?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                outbox,
                state: BusState::Degraded {
                    reason: "not connected yet".into(),
                },
                retry_at: None,
                backoff: FIRST_BACKOFF,
                shutdown: false,
                replace: None,
            }),
            changed: Condvar::new(),
            malformed: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            backoff_max: Duration::from_millis(settings.retry_backoff_max_ms),
        });
        let sender = {
            let shared = Arc::clone(&shared);
            let settings = settings.clone();
            std::thread::Builder::new()
                .name("veil-events-sender".into())
                .spawn(move || Sender { shared, settings }.run())
                .map_err(KafkaBusError::Thread)?
        };
        Ok(Self {
            settings: settings.clone(),
            shared,
            sender: Some(sender),
        })
    }

    pub fn settings(&self) -> &KafkaSettings {
        &self.settings
    }

    /// What the outbox holds (events not yet acknowledged by the broker).
    pub fn outbox(&self) -> OutboxStats {
        self.shared.lock().outbox.stats()
    }

    /// Events the broker has acknowledged since start.
    pub fn acknowledged(&self) -> u64 {
        self.shared.acked.load(Ordering::Relaxed)
    }

    /// Deliveries that failed and were put back to retry since start.
    pub fn failed_deliveries(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Reads `topic` from its beginning to its end as of now without
    /// joining a consumer group or committing anything: on a compacted
    /// topic, the latest event of every key — the state the topic records.
    /// The end is each partition's high watermark and then nothing new for
    /// [`REPLAY_QUIET`] (tansu 0.6 reports a high watermark that counts
    /// record batches, not records, so the watermark alone ends too early).
    /// Malformed messages are logged, counted and skipped, as in a consumer.
    pub fn replay(&self, topic: Topic, timeout: Duration) -> Result<Vec<Envelope>, KafkaBusError> {
        let deadline = Instant::now() + timeout;
        let name = self.settings.topics.name(topic).to_string();
        let consumer: BaseConsumer<QuietContext> = self
            .settings
            .client_config()
            // librdkafka wants a group even for assigned partitions; nothing
            // is ever committed under it.
            .set("group.id", "veil-replay")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "50")
            .create_with_context(QuietContext)
            .map_err(client("replay consumer"))?;
        let metadata = consumer
            .fetch_metadata(Some(&name), timeout)
            .map_err(client("replay metadata"))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == name)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut ends = std::collections::HashMap::new();
        let mut assignment = TopicPartitionList::new();
        for partition in partitions {
            let left = deadline.saturating_duration_since(Instant::now());
            let (low, high) = consumer
                .fetch_watermarks(&name, partition, left)
                .map_err(client("replay watermarks"))?;
            if high > low {
                ends.insert(partition, high);
            }
            // Every partition: a watermark is only a lower bound here.
            assignment
                .add_partition_offset(&name, partition, Offset::Beginning)
                .map_err(client("replay assignment"))?;
        }
        let total = ends.len();
        if assignment.count() == 0 {
            return Ok(Vec::new());
        }
        consumer
            .assign(&assignment)
            .map_err(client("replay assign"))?;
        let mut events = Vec::new();
        let mut malformed = 0;
        // Until every partition reached its watermark, then until quiet.
        let mut quiet_since: Option<Instant> = None;
        while quiet_since.is_none_or(|since| since.elapsed() < REPLAY_QUIET) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(KafkaBusError::ReplayTimeout {
                    topic: name,
                    reached: format!("{} of {total}", total - ends.len()),
                    timeout,
                });
            }
            match consumer.poll(left.min(Duration::from_millis(100))) {
                Some(Ok(message)) => {
                    if ends.is_empty() {
                        quiet_since = Some(Instant::now());
                    }
                    let partition = message.partition();
                    if ends
                        .get(&partition)
                        .is_some_and(|&end| message.offset() + 1 >= end)
                    {
                        ends.remove(&partition);
                    }
                    if let Some(delivery) = KafkaConsumer::delivery(
                        &self.settings.topics,
                        &self.shared,
                        &mut malformed,
                        &message,
                    ) && let Ok(envelope) = delivery.event
                    {
                        events.push(envelope);
                    }
                }
                Some(Err(error)) => tracing::warn!(%error, topic = %name, "replay"),
                None => {}
            }
            if ends.is_empty() && quiet_since.is_none() {
                quiet_since = Some(Instant::now());
            }
        }
        Ok(events)
    }

    /// Waits up to `timeout` until the broker has acknowledged everything
    /// published so far; true if it has.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut inner = self.shared.lock();
        loop {
            if inner.outbox.stats().pending() == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            inner = self
                .shared
                .changed
                .wait_timeout(inner, (deadline - now).min(Duration::from_millis(200)))
                .map(|(guard, _)| guard)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

impl Drop for KafkaBus {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        if let Some(sender) = self.sender.take()
            && sender.join().is_err()
        {
            tracing::error!("event bus sender thread panicked");
        }
    }
}

impl EventBus for KafkaBus {
    type Error = KafkaBusError;
    type Consumer = KafkaConsumer;

    fn publish(&self, envelope: &Envelope) -> Result<(), KafkaBusError> {
        let mut inner = self.shared.lock();
        inner.outbox.push(envelope.clone())?;
        drop(inner);
        self.shared.changed.notify_all();
        Ok(())
    }

    fn subscribe(&self, group: &str, topics: &[Topic]) -> Result<KafkaConsumer, KafkaBusError> {
        if group.is_empty() {
            return Err(KafkaBusError::Settings(
                "consumer group must not be empty".into(),
            ));
        }
        let consumer: BaseConsumer<QuietContext> = self
            .settings
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set(
                "fetch.wait.max.ms",
                self.settings.fetch_wait_max_ms.to_string(),
            )
            .create_with_context(QuietContext)
            .map_err(client("consumer"))?;
        let names: Vec<&str> = topics
            .iter()
            .map(|&t| self.settings.topics.name(t))
            .collect();
        consumer.subscribe(&names).map_err(client("subscribe"))?;
        Ok(KafkaConsumer {
            consumer,
            names: self.settings.topics.clone(),
            shared: Arc::clone(&self.shared),
            malformed: 0,
        })
    }

    fn state(&self) -> BusState {
        self.shared.lock().state.clone()
    }

    fn malformed(&self) -> u64 {
        self.shared.malformed.load(Ordering::Relaxed)
    }
}

/// The sender thread: outbox → producer, topics created first.
struct Sender {
    shared: Arc<Shared>,
    settings: KafkaSettings,
}

impl Sender {
    fn run(self) {
        let mut producer = None;
        let mut generation = 0;
        let mut topics_ready = !self.settings.create_topics;
        let mut last_probe: Option<Instant> = None;
        loop {
            if self.shared.lock().shutdown {
                break;
            }
            let Some(current) = producer.as_ref() else {
                generation += 1;
                match self.producer(generation) {
                    Ok(p) => producer = Some(p),
                    Err(error) => {
                        tracing::error!(%error, "kafka producer");
                        self.fail_and_wait(format!("{error}"));
                    }
                }
                continue;
            };
            let replace = self.shared.lock().replace.take();
            if replace == Some(generation) {
                tracing::warn!(
                    "kafka: the broker refuses this producer's id; starting a new producer"
                );
                if let Some(old) = producer.take() {
                    Self::abandon(old);
                }
                continue;
            }
            if let Some((code, reason)) = current.client().fatal_error() {
                tracing::error!(%code, reason, "kafka producer hit a fatal error: starting a new one");
                if let Some(old) = producer.take() {
                    Self::abandon(old);
                }
                continue;
            }
            if !topics_ready {
                match self.ensure_topics() {
                    Ok(()) => {
                        topics_ready = true;
                        let mut inner = self.shared.lock();
                        self.shared.connected(&mut inner);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "kafka: topics not ready");
                        self.fail_and_wait(format!("{error}"));
                    }
                }
                continue;
            }
            match self.next_batch(&mut last_probe) {
                Batch::Shutdown => break,
                Batch::Probe => {
                    let answer = current
                        .client()
                        .fetch_metadata(None, Duration::from_secs(2));
                    let mut inner = self.shared.lock();
                    match answer {
                        Ok(_) => self.shared.connected(&mut inner),
                        Err(error) => self
                            .shared
                            .degrade(&mut inner, format!("broker unreachable: {error}")),
                    }
                }
                Batch::Send(batch) => self.send(current, batch),
            }
        }
        if let Some(producer) = producer {
            self.shutdown(producer);
        } else if let Err(error) = self.shared.lock().outbox.persist() {
            tracing::error!(%error, "event outbox: could not save unsent events");
        }
    }

    fn producer(&self, generation: u64) -> Result<ThreadedProducer<SenderContext>, KafkaBusError> {
        self.settings
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                self.settings.delivery_timeout_ms.to_string(),
            )
            .create_with_context(SenderContext {
                shared: Arc::clone(&self.shared),
                generation,
            })
            .map_err(client("producer"))
    }

    /// Drops a broken producer; its undelivered events get failure reports
    /// (purged), which put them back into the outbox.
    fn abandon(producer: ThreadedProducer<SenderContext>) {
        producer.purge(PurgeConfig::default().queue().inflight());
        let _ = producer.flush(Duration::from_secs(1));
    }

    fn fail_and_wait(&self, reason: String) {
        let mut inner = self.shared.lock();
        self.shared.degrade(&mut inner, reason);
        let wait = inner.backoff;
        inner.backoff = (inner.backoff * 2).min(self.shared.backoff_max);
        if !inner.shutdown {
            drop(
                self.shared
                    .changed
                    .wait_timeout(inner, wait)
                    .unwrap_or_else(|e| e.into_inner()),
            );
        }
    }

    fn ensure_topics(&self) -> Result<(), KafkaBusError> {
        let admin: AdminClient<QuietContext> = self
            .settings
            .client_config()
            .create_with_context(QuietContext)
            .map_err(client("admin client"))?;
        let specs: Vec<(Topic, i32, &str)> = Topic::ALL
            .into_iter()
            .map(|t| {
                let (partitions, cleanup) = topic_defaults(t);
                (t, self.settings.partitions.unwrap_or(partitions), cleanup)
            })
            .collect();
        let new: Vec<NewTopic<'_>> = specs
            .iter()
            .map(|&(t, partitions, cleanup)| {
                NewTopic::new(
                    self.settings.topics.name(t),
                    partitions,
                    TopicReplication::Fixed(self.settings.replication_factor),
                )
                .set("cleanup.policy", cleanup)
            })
            .collect();
        let options = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(5)))
            .request_timeout(Some(Duration::from_secs(5)));
        let results = futures_executor::block_on(admin.create_topics(&new, &options))
            .map_err(client("create topics"))?;
        for result in results {
            match result {
                Ok(topic) => tracing::info!(topic, "kafka: created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(KafkaBusError::CreateTopic { topic, code }),
            }
        }
        Ok(())
    }

    fn next_batch(&self, last_probe: &mut Option<Instant>) -> Batch {
        let mut inner = self.shared.lock();
        loop {
            if inner.shutdown {
                return Batch::Shutdown;
            }
            let now = Instant::now();
            let wait = match inner.retry_at {
                Some(at) if at > now => at - now,
                _ => {
                    inner.retry_at = None;
                    let room = MAX_IN_FLIGHT.saturating_sub(inner.outbox.stats().in_flight);
                    match inner.outbox.take(room) {
                        Ok(batch) if !batch.is_empty() => return Batch::Send(batch),
                        Ok(_) => {}
                        Err(error) => {
                            tracing::error!(%error, "event outbox: cannot read spilled events");
                            self.shared.degrade(&mut inner, format!("{error}"));
                            self.shared.schedule_retry(&mut inner);
                        }
                    }
                    PROBE_INTERVAL
                }
            };
            let idle = inner.outbox.stats().in_flight == 0;
            let degraded = inner.state != BusState::Connected;
            if degraded && idle && last_probe.is_none_or(|t| now - t >= PROBE_INTERVAL) {
                *last_probe = Some(now);
                return Batch::Probe;
            }
            inner = self
                .shared
                .changed
                .wait_timeout(inner, wait.min(PROBE_INTERVAL))
                .map(|(guard, _)| guard)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    fn send(&self, producer: &ThreadedProducer<SenderContext>, batch: Vec<(u64, Envelope)>) {
        let mut failed = Vec::new();
        for (ticket, envelope) in batch {
            if !failed.is_empty() {
                failed.push(ticket);
                continue;
            }
            let payload = envelope.encode();
            let record = BaseRecord::with_opaque_to(
                self.settings.topics.name(envelope.topic),
                ticket as usize,
            )
            .key(envelope.key.as_bytes())
            .payload(payload.as_bytes());
            if let Err((error, _)) = producer.send(record) {
                tracing::warn!(%error, "kafka producer refused an event; retrying later");
                failed.push(ticket);
            }
        }
        if !failed.is_empty() {
            let mut inner = self.shared.lock();
            for ticket in failed {
                inner.outbox.nack(ticket);
                self.shared.failed.fetch_add(1, Ordering::Relaxed);
            }
            self.shared.schedule_retry(&mut inner);
        }
    }

    fn shutdown(&self, producer: ThreadedProducer<SenderContext>) {
        let timeout = Duration::from_millis(self.settings.shutdown_timeout_ms);
        if let Err(error) = producer.flush(timeout) {
            tracing::warn!(%error, "kafka: not every event was delivered before shutdown");
        }
        Self::abandon(producer);
        match self.shared.lock().outbox.persist() {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                events = n,
                "event outbox: unsent events saved; they are sent at the next start"
            ),
            Err(error) => tracing::error!(%error, "event outbox: could not save unsent events"),
        }
    }
}

enum Batch {
    Shutdown,
    Probe,
    Send(Vec<(u64, Envelope)>),
}

/// Reads Kafka topics for one consumer group; commits only when told.
pub struct KafkaConsumer {
    consumer: BaseConsumer<QuietContext>,
    names: TopicNames,
    shared: Arc<Shared>,
    malformed: u64,
}

impl std::fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("topics", &self.names)
            .field("malformed", &self.malformed)
            .finish_non_exhaustive()
    }
}

impl KafkaConsumer {
    /// One message as a delivery; `None` for a tombstone.
    fn delivery(
        names: &TopicNames,
        shared: &Shared,
        malformed: &mut u64,
        message: &rdkafka::message::BorrowedMessage<'_>,
    ) -> Option<Delivery> {
        let offset = u64::try_from(message.offset()).unwrap_or(0);
        let position = Position {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset,
            next: offset + 1,
        };
        let Some(payload) = message.payload() else {
            // A tombstone ends a key's history on a compacted topic; nothing to apply.
            tracing::debug!(%position, "skipping a tombstone");
            return None;
        };
        let event = decode(payload).and_then(|envelope| match names.role(&position.topic) {
            Some(role) if role == envelope.topic => Ok(envelope),
            _ => Err(DecodeError::Malformed(format!(
                "a {} event on topic {}",
                envelope.topic.name(),
                position.topic
            ))),
        });
        if let Err(error) = &event {
            bus::log_malformed(&position, error);
            *malformed += 1;
            shared.malformed.fetch_add(1, Ordering::Relaxed);
        }
        let published = message.timestamp().to_millis().and_then(|ms| {
            u64::try_from(ms)
                .ok()
                .map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms))
        });
        Some(Delivery {
            position,
            event,
            published,
        })
    }
}

impl EventConsumer for KafkaConsumer {
    type Error = KafkaBusError;

    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivery>, KafkaBusError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < max {
            let wait = if out.is_empty() {
                deadline.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            match self.consumer.poll(wait) {
                Some(Ok(message)) => {
                    if let Some(delivery) =
                        Self::delivery(&self.names, &self.shared, &mut self.malformed, &message)
                    {
                        out.push(delivery);
                    }
                }
                Some(Err(error)) => {
                    if let Some((code, reason)) = self.consumer.client().fatal_error() {
                        tracing::error!(%code, reason, "kafka consumer");
                        return Err(KafkaBusError::Client {
                            what: "consumer (fatal)",
                            source: KafkaError::MessageConsumptionFatal(code),
                        });
                    }
                    tracing::warn!(%error, "kafka consumer");
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                None => {
                    if !out.is_empty() || Instant::now() >= deadline {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    fn commit(&mut self, positions: &[Position]) -> Result<(), KafkaBusError> {
        let positions = bus::furthest(positions);
        if positions.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for position in &positions {
            let next = i64::try_from(position.next).unwrap_or(i64::MAX);
            list.add_partition_offset(&position.topic, position.partition, Offset::Offset(next))
                .map_err(client("commit"))?;
        }
        self.consumer
            .commit(&list, CommitMode::Sync)
            .map_err(client("commit"))
    }

    fn malformed(&self) -> u64 {
        self.malformed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default_to_the_deployed_topics_and_refuse_unknown_keys() {
        let settings: KafkaSettings = toml_like(r#"{"brokers": ["kafka-0.kafka:9092"]}"#);
        assert_eq!(settings.topics.name(Topic::Pods), "veil.pods");
        assert_eq!(settings.topics.role("veil.flows"), Some(Topic::Flows));
        assert_eq!(settings.group_for("node1"), "veil-agent-node1");
        settings.validate().unwrap();

        let error = serde_json::from_str::<KafkaSettings>(r#"{"brokers":[],"brokerz":1}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `brokerz`"), "{error}");
        let error = serde_json::from_str::<KafkaSettings>(r#"{"topics":{"pod":"x"}}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `pod`"), "{error}");
    }

    fn toml_like(json: &str) -> KafkaSettings {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn settings_that_cannot_work_are_refused_by_key() {
        let cases = [
            (r#"{}"#, "brokers: name at least one"),
            (r#"{"brokers":["kafka"]}"#, "is not host:port"),
            (
                r#"{"brokers":["k:9092"],"topics":{"pods":"veil pods"}}"#,
                "topics.pods",
            ),
            (
                r#"{"brokers":["k:9092"],"topics":{"flows":"veil.pods"}}"#,
                "used for two roles",
            ),
            (
                r#"{"brokers":["k:9092"],"replication_factor":0}"#,
                "replication_factor",
            ),
            (r#"{"brokers":["k:9092"],"partitions":0}"#, "partitions"),
        ];
        for (json, expected) in cases {
            let error = toml_like(json).validate().unwrap_err().to_string();
            assert!(error.contains(expected), "{json}: {error}");
        }
    }

    /// The defaults must match what deploy/kafka/topics.yaml declares.
    #[test]
    fn defaults_match_the_deployed_topics_file() {
        let yaml = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/kafka/topics.yaml"
        ));
        let mut declared = Vec::new();
        let mut name = None;
        for line in yaml.lines().map(str::trim) {
            if let Some(n) = line.strip_prefix("- name: ") {
                name = Some(n.to_owned());
            } else if let Some(p) = line.strip_prefix("partitions: ") {
                declared.push((name.take().unwrap(), p.parse::<i32>().unwrap()));
            } else if let Some(policy) = line.strip_prefix("cleanup.policy: ") {
                declared
                    .last_mut()
                    .unwrap()
                    .0
                    .push_str(&format!(" {policy}"));
            }
        }
        let names = TopicNames::default();
        let ours: Vec<(String, i32)> = Topic::ALL
            .into_iter()
            .map(|t| {
                let (partitions, cleanup) = topic_defaults(t);
                (format!("{} {cleanup}", names.name(t)), partitions)
            })
            .collect();
        assert_eq!(declared, ours);
    }
}
