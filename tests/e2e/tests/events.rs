//! The agents on a real Kafka-protocol broker (tansu, in node 1's namespace
//! on the underlay so both agents reach it): a pod announced on `veil.pods`
//! reaches the other agents' maps within a second, and its deletion removes
//! it; the bus state shows in `veilctl status` and readiness; a restarted
//! agent starts from its cache while the broker is gone.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use veil_events::{
    bus::EventBus,
    kafka::{KafkaBus, KafkaSettings},
    schema::{Envelope, Event, Topic},
};
use veil_testbed::{
    Agent, PodRef, Routing, Topology, TopologySpec, kafka::Broker, require_root, wait_for,
};

const VNI: u32 = 7979;
const BROKER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// The route node 1's agent has for `ip`/32, if any: the node's underlay IP.
fn host_route(agent: &Agent, ip: Ipv4Addr) -> Option<String> {
    let status = agent.status().ok()?;
    status
        .overlay?
        .routes
        .into_iter()
        .find(|r| r.cidr == format!("{ip}/32"))
        .map(|r| r.node_ip)
}

#[test]
#[ignore = "needs root (network namespaces, eBPF) and a Kafka broker (tansu): cargo xtask test runs it"]
fn pods_announced_on_kafka_reach_other_agents_within_a_second() {
    require_root("event bus test");
    let mut topology = Topology::build(
        TopologySpec::new("evbus")
            .nodes(2)
            .pods_per_node(2)
            .routing(Routing::None),
    )
    .unwrap();
    // n1p2's address is in node 1's CIDR, but the file does not list it: the
    // bus will say it runs on node 2 (as a moved or newly scheduled pod).
    let announced = PodRef::new(1, 2);
    topology.hide_from_inventory(announced);
    let mut broker = Broker::start_in("event bus test", &topology.node(1), BROKER_IP);
    let mut agents: Vec<Agent> = (1..=2)
        .map(|node| {
            Agent::start_overlay_with(&topology, node, VNI, &broker.agent_section(&topology, node))
                .unwrap()
        })
        .collect();

    // A publisher, as the controller would be, on the underlay too.
    let settings = KafkaSettings {
        brokers: vec![broker.address()],
        state_dir: topology.workdir().join("publisher"),
        ..KafkaSettings::default()
    };
    let bus = topology
        .node(1)
        .run(move || KafkaBus::connect(&settings))
        .unwrap()
        .unwrap();
    let key = "shop/web-7";
    let ready = Event::PodReady {
        namespace: "shop".into(),
        pod: "web-7".into(),
        node: "node2".into(),
        ip: announced.ip().to_string(),
        identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
    };
    // Consumers joining their groups take a few seconds on tansu; wait
    // until both agents report a connected bus before timing anything.
    wait_for(
        "both agents connected to the bus",
        Duration::from_secs(30),
        || agents.iter().all(Agent::bus_connected),
    );
    // Warm-up event, so the consumer groups have joined and are polling.
    bus.publish(&Envelope::new(
        Topic::Pods,
        "warm/up",
        1,
        Event::PodDeleted {
            namespace: "warm".into(),
            pod: "up".into(),
        },
    ))
    .unwrap();
    std::thread::sleep(Duration::from_secs(8));

    bus.publish(&Envelope::new(Topic::Pods, key, 1, ready.clone()))
        .unwrap();
    let took = wait_for(
        "the announced pod on node 1",
        Duration::from_secs(10),
        || host_route(&agents[0], announced.ip()).as_deref() == Some("198.18.0.2"),
    );
    eprintln!("pod-ready → node 1's route: {took:?}");
    assert!(
        took <= Duration::from_secs(1),
        "took {took:?} (goal: within 1 s)"
    );
    // A duplicate and an older version change nothing.
    bus.publish(&Envelope::new(Topic::Pods, key, 1, ready.clone()))
        .unwrap();
    let status = agents[0].veilctl(&["status"]).unwrap();
    assert!(
        status.contains("Event bus · connected · 1 pod(s) of other nodes learnt from it"),
        "{status}"
    );

    // Deleted → gone.
    let deleted = Event::PodDeleted {
        namespace: "shop".into(),
        pod: "web-7".into(),
    };
    bus.publish(&Envelope::new(Topic::Pods, key, 2, deleted))
        .unwrap();
    let took = wait_for("the route removed", Duration::from_secs(10), || {
        host_route(&agents[0], announced.ip()).is_none()
    });
    eprintln!("pod-deleted → route gone: {took:?}");
    assert!(took <= Duration::from_secs(1), "took {took:?}");

    // Announced again, then the broker goes away and node 1's agent restarts:
    // it starts from its cache, degraded but ready.
    bus.publish(&Envelope::new(Topic::Pods, key, 3, ready))
        .unwrap();
    wait_for("the pod announced again", Duration::from_secs(5), || {
        host_route(&agents[0], announced.ip()).is_some()
    });
    drop(bus);
    broker.kill();
    agents[0].stop();
    agents[0] =
        Agent::start_overlay_with(&topology, 1, VNI, &broker.agent_section(&topology, 1)).unwrap();
    // The broker is gone: the route can only come from the cache (its
    // first overlay sync may finish just after the agent answers).
    wait_for(
        "a restarted agent to start from its cache of announced pods",
        Duration::from_secs(2),
        || host_route(&agents[0], announced.ip()).as_deref() == Some("198.18.0.2"),
    );
    wait_for("readiness says degraded", Duration::from_secs(20), || {
        agents[0]
            .http_get(veil_api::DEFAULT_READINESS_PORT, veil_api::READINESS_PATH)
            .is_ok_and(|(code, body)| code == 200 && body.contains("degraded: event bus"))
    });
}

/// An event whose broker timestamp lies seconds in this node's future (as
/// when this node's clock is behind the publisher's) makes `veilctl check`
/// report the clock, with the fix.
#[test]
#[ignore = "needs root (network namespaces, eBPF) and a Kafka broker (tansu): cargo xtask test runs it"]
fn veilctl_check_reports_a_clock_behind_the_publishers() {
    use rdkafka::{
        ClientConfig,
        producer::{BaseProducer, BaseRecord, Producer},
    };
    require_root("clock skew check test");
    let topology = Topology::build(
        TopologySpec::new("evclock")
            .nodes(1)
            .pods_per_node(1)
            .routing(Routing::None),
    )
    .unwrap();
    let broker = Broker::start_in("clock skew check test", &topology.node(1), BROKER_IP);
    let agent =
        Agent::start_overlay_with(&topology, 1, VNI, &broker.agent_section(&topology, 1)).unwrap();
    wait_for("the agent on the bus", Duration::from_secs(30), || {
        agent.bus_connected()
    });
    let address = broker.address();
    let (code, before) = agent.veilctl_exit(&["check"]).unwrap();
    assert!(!before.contains("clock"), "{code}: {before}");
    // A publisher whose clock runs 5 s ahead of this node's, until the agent
    // (its consumer group joining takes a few seconds) has seen one.
    let started = Instant::now();
    let mut seq = 0;
    while agent
        .status()
        .ok()
        .and_then(|s| s.event_bus)
        .and_then(|b| b.clock_behind_ms)
        .is_none()
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no early event noticed"
        );
        seq += 1;
        let future_ms = (std::time::SystemTime::now() + Duration::from_secs(5))
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let payload = Envelope::new(
            Topic::Pods,
            "clock/test",
            seq,
            Event::PodDeleted {
                namespace: "clock".into(),
                pod: "test".into(),
            },
        )
        .encode();
        let address = address.clone();
        topology
            .node(1)
            .run(move || {
                let producer: BaseProducer = ClientConfig::new()
                    .set("bootstrap.servers", &address)
                    .create()
                    .unwrap();
                producer
                    .send(
                        BaseRecord::to("veil.pods")
                            .key("clock/test")
                            .payload(&payload)
                            .timestamp(future_ms),
                    )
                    .map_err(|(e, _)| e)
                    .unwrap();
                producer.flush(Duration::from_secs(10)).unwrap();
            })
            .unwrap();
        std::thread::sleep(Duration::from_secs(1));
    }
    let behind = agent
        .status()
        .unwrap()
        .event_bus
        .unwrap()
        .clock_behind_ms
        .unwrap();
    assert!((2_000..=6_000).contains(&behind), "{behind} ms");
    let (code, report) = agent.veilctl_exit(&["check"]).unwrap();
    assert_eq!(code, 3, "{report}");
    assert!(
        report.contains("clock looks")
            && report.contains("behind the event publishers")
            && report.contains("NTP"),
        "{report}"
    );
}
