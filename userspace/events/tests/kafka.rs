//! The Kafka bus against a real Kafka-protocol broker (tansu, see
//! `veil_testbed::kafka`): publish and consume through consumer groups with
//! commits, a broker killed and restarted while publishing goes on,
//! duplicates and out-of-order versions, and garbage on a topic.
//!
//! Every wait is bounded in time; every test compares what was applied with
//! what was published, event by event.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig,
    producer::{BaseProducer, BaseRecord, Producer},
};
use veil_events::{
    apply::Applier,
    bus::{BusState, EventBus, EventConsumer, apply_batch},
    kafka::{KafkaBus, KafkaConsumer, KafkaSettings},
    schema::{Envelope, Event, Topic},
};
use veil_testbed::kafka::{Broker, Storage};

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "veil_events=info,librdkafka=warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

fn settings(broker: &Broker, state: &Path) -> KafkaSettings {
    KafkaSettings {
        brokers: vec![broker.address()],
        partitions: Some(3),
        replication_factor: 1,
        state_dir: state.to_owned(),
        delivery_timeout_ms: 5_000,
        retry_backoff_max_ms: 1_000,
        shutdown_timeout_ms: 2_000,
        ..KafkaSettings::default()
    }
}

/// Event `i`: topics in turn, a key of its own (so "every event applied
/// exactly once" is checkable one by one).
fn event(i: u64) -> Envelope {
    let topic = Topic::ALL[(i % 4) as usize];
    let key = format!("obj-{i}");
    let event = match topic {
        Topic::Pods => Event::PodDeleted {
            namespace: "shop".into(),
            pod: key.clone(),
        },
        Topic::Certificates => Event::CertificateRevoked {
            identity: format!("spiffe://cluster.local/ns/shop/sa/{key}"),
            serial: format!("{i:08x}"),
        },
        Topic::Policy => Event::PolicyChanged {
            name: key.clone(),
            version: i,
        },
        Topic::Flows => Event::Flow {
            source: key.clone(),
            destination: "db".into(),
            bytes: i,
            mode: "mtls".into(),
            result: "ok".into(),
        },
    };
    Envelope::new(topic, key, 1, event)
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a consumer saw, summed over batches.
#[derive(Debug, Default)]
struct Seen {
    /// Every event handed to `apply`, in order.
    applied: Vec<Envelope>,
    delivered: usize,
    stale: usize,
    malformed: usize,
}

/// Applies batches until `done` or `timeout`. Commit errors (a rebalance, a
/// broker restart) are reported and survived: the events were applied, and
/// the applier absorbs their redelivery.
fn consume(
    consumer: &mut KafkaConsumer,
    applier: &mut Applier,
    seen: &mut Seen,
    timeout: Duration,
    done: impl Fn(&Seen) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    while !done(seen) {
        if Instant::now() >= deadline {
            return false;
        }
        let mut applied = Vec::new();
        let result = apply_batch(consumer, applier, 500, Duration::from_millis(500), |e| {
            applied.push(e.clone())
        });
        seen.applied.extend(applied);
        match result {
            Ok(report) => {
                seen.delivered += report.delivered;
                seen.stale += report.stale;
                seen.malformed += report.malformed;
            }
            Err(error) => eprintln!("batch: {error} (continuing)"),
        }
    }
    true
}

/// Keys applied, with how often each was applied.
fn applied_keys(seen: &Seen) -> BTreeMap<(&'static str, String), usize> {
    let mut keys = BTreeMap::new();
    for envelope in &seen.applied {
        *keys
            .entry((envelope.topic.name(), envelope.key.clone()))
            .or_insert(0) += 1;
    }
    keys
}

fn expected_keys(events: &[Envelope]) -> BTreeMap<(&'static str, String), usize> {
    events
        .iter()
        .map(|e| ((e.topic.name(), e.key.clone()), 1))
        .collect()
}

fn connected(bus: &KafkaBus) {
    wait_for("the bus to connect", Duration::from_secs(30), || {
        bus.state() == BusState::Connected
    });
}

#[test]
#[ignore = "needs a Kafka broker (tansu): cargo xtask test runs it"]
fn a_consumer_group_gets_every_event_and_resumes_from_its_commits() {
    init_tracing();
    let broker = Broker::start("Kafka bus: publish and consume", Storage::Memory);
    let state = tempfile::tempdir().unwrap();
    let bus = KafkaBus::connect(&settings(&broker, state.path())).unwrap();
    connected(&bus);

    let first: Vec<Envelope> = (0..40).map(event).collect();
    for envelope in &first {
        bus.publish(envelope).unwrap();
    }
    assert!(
        bus.flush(Duration::from_secs(30)),
        "not acknowledged: {:?}",
        bus.outbox()
    );
    assert_eq!(bus.acknowledged(), 40);

    let group = bus.settings().group_for("node1");
    let mut applier = Applier::default();
    let mut seen = Seen::default();
    {
        let mut consumer = bus.subscribe(&group, &Topic::ALL).unwrap();
        assert!(
            consume(
                &mut consumer,
                &mut applier,
                &mut seen,
                Duration::from_secs(60),
                |s| s.applied.len() >= 40
            ),
            "only {} of 40 events arrived; broker log:\n{}",
            seen.applied.len(),
            broker.log()
        );
        // Nothing more (no duplicates of what this consumer already applied).
        consume(
            &mut consumer,
            &mut applier,
            &mut seen,
            Duration::from_secs(1),
            |_| false,
        );
    } // The consumer closes and leaves the group; its commits stay.
    assert_eq!(applied_keys(&seen), expected_keys(&first));

    // An agent restart: a new consumer in the same group, and a new applier
    // (its state is rebuilt), so any redelivery of a committed event would be
    // applied again and show up below.
    let second: Vec<Envelope> = (40..55).map(event).collect();
    for envelope in &second {
        bus.publish(envelope).unwrap();
    }
    assert!(bus.flush(Duration::from_secs(30)), "{:?}", bus.outbox());
    let mut restarted = bus.subscribe(&group, &Topic::ALL).unwrap();
    let mut fresh = Applier::default();
    let mut after = Seen::default();
    assert!(
        consume(
            &mut restarted,
            &mut fresh,
            &mut after,
            Duration::from_secs(60),
            |s| s.applied.len() >= 15
        ),
        "only {} of 15 new events arrived after the restart",
        after.applied.len()
    );
    consume(
        &mut restarted,
        &mut fresh,
        &mut after,
        Duration::from_secs(2),
        |_| false,
    );
    assert_eq!(
        applied_keys(&after),
        expected_keys(&second),
        "the restarted consumer must resume after its committed offsets"
    );
    assert_eq!(after.delivered, 15, "no committed event delivered again");
    assert_eq!(bus.malformed(), 0);
}

#[test]
#[ignore = "needs a Kafka broker (tansu): cargo xtask test runs it"]
fn events_published_while_the_broker_is_down_arrive_once_it_is_back() {
    init_tracing();
    let mut broker = Broker::start("Kafka bus: broker restart", Storage::Durable);
    let state = tempfile::tempdir().unwrap();
    let mut config = settings(&broker, state.path());
    config.outbox_memory_events = 20; // spill to disk early
    config.delivery_timeout_ms = 3_000;
    let bus = KafkaBus::connect(&config).unwrap();
    connected(&bus);

    let group = "veil-agent-restart";
    let mut consumer = bus.subscribe(group, &Topic::ALL).unwrap();
    let mut applier = Applier::default();
    let mut seen = Seen::default();

    let before: Vec<Envelope> = (0..30).map(event).collect();
    for envelope in &before {
        bus.publish(envelope).unwrap();
    }
    assert!(bus.flush(Duration::from_secs(30)), "{:?}", bus.outbox());
    assert!(consume(
        &mut consumer,
        &mut applier,
        &mut seen,
        Duration::from_secs(60),
        |s| s.applied.len() >= 30
    ));

    broker.kill();
    let during: Vec<Envelope> = (30..90).map(event).collect();
    for envelope in &during {
        bus.publish(envelope)
            .expect("publishing while the broker is down must queue, not fail");
    }
    let outbox = bus.outbox();
    assert_eq!(outbox.pending(), 60, "{outbox:?}");
    assert!(
        outbox.on_disk >= 40,
        "past 20 in memory, events spill to disk: {outbox:?}"
    );
    wait_for(
        "the bus to report itself degraded",
        Duration::from_secs(30),
        || matches!(bus.state(), BusState::Degraded { .. }),
    );
    // Stay down past the delivery timeout: librdkafka gives the in-flight
    // events back as failed, the outbox takes them back and retries them.
    wait_for(
        "failed deliveries to come back to the outbox",
        Duration::from_secs(30),
        || bus.failed_deliveries() > 0,
    );
    let outbox = bus.outbox();
    eprintln!(
        "while down: {}, {} failed deliveries, {outbox:?}",
        bus.state(),
        bus.failed_deliveries()
    );
    assert_eq!(outbox.pending(), 60, "{outbox:?}");

    broker.restart().expect("broker restart");
    let after: Vec<Envelope> = (90..110).map(event).collect();
    for envelope in &after {
        bus.publish(envelope).unwrap();
    }
    assert!(
        bus.flush(Duration::from_secs(120)),
        "not everything acknowledged after the restart: {:?}, state {}",
        bus.outbox(),
        bus.state()
    );
    connected(&bus);
    assert_eq!(
        std::fs::metadata(state.path().join("outbox.jsonl"))
            .unwrap()
            .len(),
        0,
        "the spill file is emptied once its events are acknowledged"
    );

    let all: Vec<Envelope> = (0..110).map(event).collect();
    assert!(
        consume(
            &mut consumer,
            &mut applier,
            &mut seen,
            Duration::from_secs(90),
            |s| s.applied.len() >= 110
        ),
        "only {} of 110 events applied; broker log:\n{}",
        seen.applied.len(),
        broker.log()
    );
    consume(
        &mut consumer,
        &mut applier,
        &mut seen,
        Duration::from_secs(1),
        |_| false,
    );
    assert_eq!(
        applied_keys(&seen),
        expected_keys(&all),
        "every event applied exactly once"
    );
    eprintln!(
        "restart: {} applied, {} duplicate deliveries ignored",
        seen.applied.len(),
        seen.stale
    );

    // The broker kept what it had before the restart: a new group reads all
    // 110 from the beginning (memory storage would have lost the first 30).
    let mut audit = bus.subscribe("veil-audit", &Topic::ALL).unwrap();
    let mut audit_seen = Seen::default();
    assert!(consume(
        &mut audit,
        &mut Applier::default(),
        &mut audit_seen,
        Duration::from_secs(60),
        |s| s.applied.len() >= 110
    ));
    assert_eq!(applied_keys(&audit_seen), expected_keys(&all));
}

#[test]
#[ignore = "needs a Kafka broker (tansu): cargo xtask test runs it"]
fn duplicates_and_older_versions_through_the_broker_apply_once() {
    init_tracing();
    let broker = Broker::start("Kafka bus: duplicates", Storage::Memory);
    let state = tempfile::tempdir().unwrap();
    let bus = KafkaBus::connect(&settings(&broker, state.path())).unwrap();
    connected(&bus);

    let ready = |seq: u64| {
        Envelope::new(
            Topic::Pods,
            "shop/cart-7d9",
            seq,
            Event::PodReady {
                namespace: "shop".into(),
                pod: "cart-7d9".into(),
                node: format!("node{seq}"),
                ip: "198.19.1.4".into(),
                identity: "spiffe://cluster.local/ns/shop/sa/cart".into(),
            },
        )
    };
    // A duplicate, a late older version, a replay of the first.
    for seq in [1, 3, 2, 3, 4, 1] {
        bus.publish(&ready(seq)).unwrap();
    }
    assert!(bus.flush(Duration::from_secs(30)), "{:?}", bus.outbox());

    let mut applier = Applier::default();
    let mut seen = Seen::default();
    let mut consumer = bus.subscribe("veil-agent-dup", &[Topic::Pods]).unwrap();
    assert!(consume(
        &mut consumer,
        &mut applier,
        &mut seen,
        Duration::from_secs(60),
        |s| s.delivered >= 6
    ));
    let seqs: Vec<u64> = seen.applied.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 3, 4], "one key, one partition, in order");
    assert_eq!(seen.stale, 3);

    // A full replay (another group, as after lost offsets) changes nothing.
    let mut replay = bus.subscribe("veil-agent-replay", &[Topic::Pods]).unwrap();
    let mut replayed = Seen::default();
    assert!(consume(
        &mut replay,
        &mut applier,
        &mut replayed,
        Duration::from_secs(60),
        |s| s.delivered >= 6
    ));
    assert!(replayed.applied.is_empty(), "{:?}", replayed.applied);
    assert_eq!(replayed.stale, 6);
}

#[test]
#[ignore = "needs a Kafka broker (tansu): cargo xtask test runs it"]
fn garbage_on_a_topic_is_counted_skipped_and_committed() {
    init_tracing();
    let broker = Broker::start("Kafka bus: garbage", Storage::Memory);
    let state = tempfile::tempdir().unwrap();
    let bus = KafkaBus::connect(&settings(&broker, state.path())).unwrap();
    connected(&bus); // topics exist

    let policy = |version: u64| {
        Envelope::new(
            Topic::Policy,
            "default/allow-shop",
            version,
            Event::PolicyChanged {
                name: "allow-shop".into(),
                version,
            },
        )
        .encode()
    };
    let misplaced = event(0).encode(); // a pods event on the policy topic
    let v2 = policy(9).replace(r#""schema":1"#, r#""schema":2"#);
    let (first, last) = (policy(1), policy(2));
    let payloads: [Option<&[u8]>; 6] = [
        Some(first.as_bytes()),
        Some(b"\x00\xff not json"),
        Some(v2.as_bytes()),
        Some(misplaced.as_bytes()),
        None, // a tombstone: not an event, not garbage either
        Some(last.as_bytes()),
    ];
    let raw: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .create()
        .unwrap();
    for payload in payloads {
        let mut record = BaseRecord::<[u8], [u8]>::to("veil.policy").key(b"default/allow-shop");
        record.payload = payload;
        raw.send(record).map_err(|(e, _)| e).unwrap();
    }
    raw.flush(Duration::from_secs(30)).unwrap();

    let group = "veil-agent-garbage";
    let mut applier = Applier::default();
    let mut seen = Seen::default();
    {
        let mut consumer = bus.subscribe(group, &[Topic::Policy]).unwrap();
        assert!(
            consume(
                &mut consumer,
                &mut applier,
                &mut seen,
                Duration::from_secs(60),
                |s| s.applied.len() >= 2
            ),
            "the event after the garbage must still arrive: {seen:?}"
        );
        assert_eq!(consumer.malformed(), 3);
    }
    let versions: Vec<u64> = seen.applied.iter().map(|e| e.seq).collect();
    assert_eq!(versions, [1, 2]);
    assert_eq!(seen.malformed, 3);
    assert_eq!(bus.malformed(), 3);

    // The garbage was committed with the rest: the group does not see it
    // again, only what comes after it.
    bus.publish(&Envelope::new(
        Topic::Policy,
        "default/allow-shop",
        3,
        Event::PolicyChanged {
            name: "allow-shop".into(),
            version: 3,
        },
    ))
    .unwrap();
    assert!(bus.flush(Duration::from_secs(30)), "{:?}", bus.outbox());
    let mut restarted = bus.subscribe(group, &[Topic::Policy]).unwrap();
    let mut again = Seen::default();
    assert!(consume(
        &mut restarted,
        &mut Applier::default(),
        &mut again,
        Duration::from_secs(60),
        |s| !s.applied.is_empty()
    ));
    consume(
        &mut restarted,
        &mut Applier::default(),
        &mut again,
        Duration::from_secs(1),
        |_| false,
    );
    assert_eq!(again.delivered, 1, "{again:?}");
    assert_eq!(again.applied[0].seq, 3);
    assert_eq!(bus.malformed(), 3);
}

#[test]
#[ignore = "needs a Kafka broker (tansu): cargo xtask test runs it"]
fn an_agent_restarted_during_an_outage_sends_what_it_had_queued() {
    init_tracing();
    let mut broker = Broker::start("Kafka bus: outbox across restarts", Storage::Memory);
    broker.kill(); // down from the start
    let state = tempfile::tempdir().unwrap();
    let mut config = settings(&broker, state.path());
    config.outbox_memory_events = 5;
    config.outbox_disk_bytes = 20 * (event(0).encode().len() as u64 + 1);
    let mut accepted = Vec::new();
    {
        let bus = KafkaBus::connect(&config).unwrap();
        let mut refused = None;
        for i in 0..100 {
            match bus.publish(&event(i)) {
                Ok(()) => accepted.push(event(i)),
                Err(error) => {
                    refused = Some(error);
                    break;
                }
            }
        }
        let error = refused
            .expect("a bounded outbox must refuse at some point")
            .to_string();
        assert!(error.contains("outbox is full"), "{error}");
        assert!(
            (20..=30).contains(&accepted.len()),
            "5 in memory, about 20 on disk: {}",
            accepted.len()
        );
        assert!(matches!(bus.state(), BusState::Degraded { .. }));
    } // The agent stops: what was queued goes to the spill file.

    broker.restart().expect("broker start");
    let bus = KafkaBus::connect(&config).unwrap();
    assert!(
        bus.flush(Duration::from_secs(60)),
        "the queued events must be sent after the restart: {:?}, {}",
        bus.outbox(),
        bus.state()
    );
    let mut consumer = bus.subscribe("veil-agent-outbox", &Topic::ALL).unwrap();
    let mut seen = Seen::default();
    assert!(consume(
        &mut consumer,
        &mut Applier::default(),
        &mut seen,
        Duration::from_secs(60),
        |s| s.applied.len() >= accepted.len()
    ));
    consume(
        &mut consumer,
        &mut Applier::default(),
        &mut seen,
        Duration::from_secs(1),
        |_| false,
    );
    assert_eq!(applied_keys(&seen), expected_keys(&accepted));
}

#[test]
#[ignore = "needs a Kafka broker (tansu): cargo xtask test runs it"]
fn replay_reads_a_topic_to_its_current_end_without_a_group() {
    init_tracing();
    let broker = Broker::start("Kafka bus: replay", Storage::Memory);
    let dir = tempfile::tempdir().unwrap();
    let bus = KafkaBus::connect(&settings(&broker, dir.path())).unwrap();
    connected(&bus);
    // Pod events for 30 pods, two versions each, spread over the partitions.
    let mut published = Vec::new();
    for version in 1..=2u64 {
        for pod in 0..30 {
            let envelope = Envelope::new(
                Topic::Pods,
                format!("shop/pod-{pod}"),
                version,
                Event::PodScheduled {
                    namespace: "shop".into(),
                    pod: format!("pod-{pod}"),
                    node: format!("node{version}"),
                    identity: String::new(),
                },
            );
            bus.publish(&envelope).unwrap();
            published.push(envelope);
        }
    }
    assert!(bus.flush(Duration::from_secs(30)), "the broker took them");
    let replayed = bus.replay(Topic::Pods, Duration::from_secs(30)).unwrap();
    let mut latest: BTreeMap<String, u64> = BTreeMap::new();
    for envelope in &replayed {
        let seq = latest.entry(envelope.key.clone()).or_default();
        *seq = (*seq).max(envelope.seq);
    }
    assert_eq!(latest.len(), 30, "every key: {latest:?}");
    assert!(latest.values().all(|&seq| seq == 2), "{latest:?}");
    assert_eq!(replayed.len(), published.len(), "nothing compacted here");
    // No group joined or committed: a second replay sees the same.
    assert_eq!(
        bus.replay(Topic::Pods, Duration::from_secs(30))
            .unwrap()
            .len(),
        replayed.len()
    );
    // A topic with nothing in it replays as nothing, at once.
    assert!(
        bus.replay(Topic::Policy, Duration::from_secs(30))
            .unwrap()
            .is_empty()
    );
}
