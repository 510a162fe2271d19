//! Event fan-out: how long a control-plane event takes from its publication
//! to being applied on every agent, at a fixed publication rate, and what
//! the agents spend on it.
//!
//! One test bed, three nodes (by default), a real Kafka-protocol broker
//! (tansu) on node 1's underlay address, one real `veil-agent` per node
//! consuming `veil.pods` in its own consumer group. A publisher on node 1
//! sends `pod-ready` / `pod-deleted` events for pods of the last node at
//! `rate` events per second for `duration` (paced on a fixed schedule, not
//! as fast as possible), cycling over 1,000 pods. Each agent measures its own
//! lag (broker timestamp of the message → applied, histogram
//! `veil_events_apply_lag_seconds`, millisecond resolution); the benchmark
//! reads the histograms' change over the run and the agents' CPU time from
//! /proc. Percentiles are bucket upper bounds ("≤ 16 ms").

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;
use veil_events::{
    bus::EventBus,
    kafka::{KafkaBus, KafkaSettings},
    schema::{Envelope, Event, Topic},
};
use veil_testbed::{Agent, Routing, Topology, TopologySpec, kafka::Broker, try_wait_for};

use crate::{cpu, machine::Machine};

const VNI: u32 = 6161;
const BROKER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Distinct pods the events cycle over.
const PODS: u64 = 1000;
/// The goal of the control-plane issue: p99 publish → applied on all agents.
pub const GOAL_P99: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    #[error("test bed: {0}")]
    Testbed(#[from] veil_testbed::TestbedError),
    #[error("{0}")]
    Setup(String),
    #[error("the agents did not apply every event: {0}")]
    Incomplete(String),
    #[error("cannot write the results: {0}")]
    Write(#[from] std::io::Error),
}

#[derive(Clone, Debug)]
pub struct FanoutOptions {
    pub agents: usize,
    /// Events per second.
    pub rate: u32,
    pub duration: Duration,
    pub output: PathBuf,
}

impl FanoutOptions {
    pub fn new(output: PathBuf, quick: bool) -> Self {
        Self {
            agents: 3,
            rate: 1000,
            duration: Duration::from_secs(if quick { 10 } else { 30 }),
            output,
        }
    }
}

/// One agent's view of the run.
#[derive(Clone, Debug, Serialize)]
pub struct AgentFanout {
    pub node: usize,
    pub applied: u64,
    pub p50_ms_at_most: f64,
    pub p99_ms_at_most: f64,
    pub max_ms_at_most: f64,
    /// CPU time over the run as a share of one core, in percent.
    pub cpu_percent: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FanoutResults {
    pub machine: String,
    pub started: String,
    pub agents: Vec<AgentFanout>,
    pub events: u64,
    pub rate_wanted: u32,
    pub rate_achieved: f64,
    pub duration_s: f64,
    /// Over all agents: the worst p99 (each event must reach every agent).
    pub p99_all_agents_ms_at_most: f64,
    pub goal_p99_ms: f64,
    pub goal_met: bool,
}

/// A histogram as exposed: cumulative counts per upper bound (seconds).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets(pub BTreeMap<u64, f64>);

impl Buckets {
    /// Reads `<name>_bucket{le="…"} n` lines of a metrics page.
    pub fn parse(page: &str, name: &str) -> Self {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut buckets = BTreeMap::new();
        for line in page.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let Some((bound, count)) = rest.split_once("\"} ") else {
                continue;
            };
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().unwrap_or(f64::NAN)
            };
            if let (false, Ok(count)) = (bound.is_nan(), count.trim().parse::<f64>()) {
                // Keyed in nanoseconds so the map orders them; +Inf last.
                let key = if bound.is_infinite() {
                    u64::MAX
                } else {
                    (bound * 1e9) as u64
                };
                buckets.insert(key, count);
            }
        }
        Self(buckets)
    }

    /// What was observed between `earlier` and `self`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|(bound, count)| (*bound, count - earlier.0.get(bound).unwrap_or(&0.0)))
                .collect(),
        )
    }

    pub fn total(&self) -> f64 {
        self.0.get(&u64::MAX).copied().unwrap_or(0.0)
    }

    /// The smallest bucket bound holding fraction `q` of the observations,
    /// in milliseconds (infinite when only +Inf does).
    pub fn quantile_ms_at_most(&self, q: f64) -> f64 {
        let wanted = q * self.total();
        for (bound, count) in &self.0 {
            if *count >= wanted && self.total() > 0.0 {
                return if *bound == u64::MAX {
                    f64::INFINITY
                } else {
                    *bound as f64 / 1e6
                };
            }
        }
        f64::INFINITY
    }
}

fn applied(agent: &Agent) -> f64 {
    agent
        .metric("veil_events_applied_total")
        .ok()
        .flatten()
        .unwrap_or(0.0)
}

fn lag_buckets(agent: &Agent) -> Buckets {
    agent
        .http_get(veil_api::DEFAULT_METRICS_PORT, veil_api::METRICS_PATH)
        .map(|(_, page)| Buckets::parse(&page, "veil_events_apply_lag_seconds"))
        .unwrap_or_default()
}

/// The `i`-th event: pods of the last node become ready, then are deleted,
/// in turn; sequences grow with `i`, so every event is new for its key.
fn event(i: u64, node: usize) -> Envelope {
    let pod = i % PODS;
    let key = format!("fanout/pod-{pod}");
    let event = if (i / PODS).is_multiple_of(2) {
        Event::PodReady {
            namespace: "fanout".into(),
            pod: format!("pod-{pod}"),
            node: format!("node{node}"),
            ip: Ipv4Addr::new(198, 19, node as u8, (pod % 250 + 1) as u8).to_string(),
            identity: String::new(),
        }
    } else {
        Event::PodDeleted {
            namespace: "fanout".into(),
            pod: format!("pod-{pod}"),
        }
    };
    Envelope::new(Topic::Pods, key, i + 1, event)
}

/// Runs the benchmark and writes `<time>-fanout.json` and `.md` into the output directory.
pub fn run(options: &FanoutOptions) -> Result<(FanoutResults, PathBuf), FanoutError> {
    let started_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    eprintln!(
        "fan-out: {} agents, {} events/s for {:?}",
        options.agents, options.rate, options.duration
    );
    let topology = Topology::build(
        TopologySpec::new("fanout")
            .nodes(options.agents)
            .pods_per_node(1)
            .routing(Routing::None),
    )?;
    let broker = Broker::try_start_in(&topology.node(1), BROKER_IP).map_err(|reason| {
        FanoutError::Setup(format!(
            "no Kafka-protocol broker (tansu): {reason}; run `cargo xtask setup`"
        ))
    })?;
    let agents: Vec<Agent> = (1..=options.agents)
        .map(|node| {
            Agent::start_overlay_with(&topology, node, VNI, &broker.agent_section(&topology, node))
        })
        .collect::<Result<_, _>>()?;
    let settings = KafkaSettings {
        brokers: vec![broker.address()],
        state_dir: topology.workdir().join("publisher"),
        ..KafkaSettings::default()
    };
    let bus = topology
        .node(1)
        .run(move || KafkaBus::connect(&settings))?
        .map_err(|e| FanoutError::Setup(format!("publisher: {e}")))?;

    eprintln!("fan-out: waiting for every agent to join its consumer group");
    try_wait_for("agents on the bus", Duration::from_secs(60), || {
        agents.iter().all(Agent::bus_connected)
    })
    .map_err(FanoutError::Setup)?;
    // Warm-up until every agent applies events (groups joined, polling).
    let mut warm = 0u64;
    let last_node = options.agents;
    try_wait_for("agents applying events", Duration::from_secs(60), || {
        let envelope = Envelope::new(
            Topic::Pods,
            "fanout/warm-up",
            warm + 1,
            Event::PodDeleted {
                namespace: "fanout".into(),
                pod: "warm-up".into(),
            },
        );
        warm += 1;
        let _ = bus.publish(&envelope);
        std::thread::sleep(Duration::from_millis(200));
        agents.iter().all(|a| applied(a) >= 1.0)
    })
    .map_err(FanoutError::Setup)?;
    std::thread::sleep(Duration::from_secs(1));

    let before: Vec<(f64, Buckets, f64)> = agents
        .iter()
        .map(|a| (applied(a), lag_buckets(a), cpu::process_cpu_s(a.pid())))
        .collect();
    let total = u64::from(options.rate) * options.duration.as_secs();
    let interval = Duration::from_secs_f64(1.0 / f64::from(options.rate));
    eprintln!("fan-out: publishing {total} events");
    let publish_started = Instant::now();
    for i in 0..total {
        let due = publish_started + interval.mul_f64(i as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        bus.publish(&event(i, last_node))
            .map_err(|e| FanoutError::Setup(format!("publish: {e}")))?;
    }
    let publishing = publish_started.elapsed();
    let all_applied = |agents: &[Agent]| {
        agents
            .iter()
            .zip(&before)
            .all(|(a, (base, _, _))| applied(a) - base >= total as f64)
    };
    let drained = Instant::now();
    while !all_applied(&agents) && drained.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let measured = publish_started.elapsed();
    let mut results = Vec::new();
    for (agent, (base, buckets, cpu_before)) in agents.iter().zip(&before) {
        let delta = lag_buckets(agent).since(buckets);
        results.push(AgentFanout {
            node: agent.node(),
            applied: (applied(agent) - base) as u64,
            p50_ms_at_most: delta.quantile_ms_at_most(0.50),
            p99_ms_at_most: delta.quantile_ms_at_most(0.99),
            max_ms_at_most: delta.quantile_ms_at_most(1.0),
            cpu_percent: 100.0 * (cpu::process_cpu_s(agent.pid()) - cpu_before)
                / measured.as_secs_f64(),
        });
    }
    if let Some(short) = results.iter().find(|r| r.applied < total) {
        return Err(FanoutError::Incomplete(format!(
            "node {} applied {} of {total} events within 60 s of the last publication",
            short.node, short.applied
        )));
    }
    let worst = results.iter().map(|r| r.p99_ms_at_most).fold(0.0, f64::max);
    let results = FanoutResults {
        machine: Machine::describe().one_line(),
        started: started_at,
        agents: results,
        events: total,
        rate_wanted: options.rate,
        rate_achieved: total as f64 / publishing.as_secs_f64(),
        duration_s: publishing.as_secs_f64(),
        p99_all_agents_ms_at_most: worst,
        goal_p99_ms: GOAL_P99.as_secs_f64() * 1e3,
        goal_met: worst <= GOAL_P99.as_secs_f64() * 1e3,
    };
    drop(bus);
    let path = write(&options.output, &results)?;
    Ok((results, path))
}

/// The Markdown report of a run.
pub fn markdown(results: &FanoutResults) -> String {
    let mut out = format!(
        "# Event fan-out, {}\n\nMachine: {}\n\n{} `veil.pods` events published at {:.0}/s \
         (wanted {}/s) for {:.1} s to {} agents, each in its own consumer group, through one \
         tansu broker on the test bed's underlay. Lag = broker timestamp → applied in the \
         agent (millisecond resolution; percentiles are histogram bucket bounds).\n\n\
         | node | events applied | p50 | p99 | max | agent CPU (% of one core) |\n|---|---|---|---|---|---|\n",
        results.started,
        results.machine,
        results.events,
        results.rate_achieved,
        results.rate_wanted,
        results.duration_s,
        results.agents.len()
    );
    for agent in &results.agents {
        out.push_str(&format!(
            "| node{} | {} | ≤ {} ms | ≤ {} ms | ≤ {} ms | {:.1} |\n",
            agent.node,
            agent.applied,
            agent.p50_ms_at_most,
            agent.p99_ms_at_most,
            agent.max_ms_at_most,
            agent.cpu_percent
        ));
    }
    out.push_str(&format!(
        "\np99 over all agents: ≤ {} ms; goal ≤ {} ms: **{}**.\n",
        results.p99_all_agents_ms_at_most,
        results.goal_p99_ms,
        if results.goal_met { "met" } else { "not met" }
    ));
    out
}

fn write(dir: &Path, results: &FanoutResults) -> Result<PathBuf, FanoutError> {
    Ok(crate::output::write_report(
        dir,
        &results.started,
        "fanout",
        results,
        &markdown(results),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# TYPE veil_events_apply_lag_seconds histogram\n\
        veil_events_apply_lag_seconds_sum 1.5\n\
        veil_events_apply_lag_seconds_count 100\n\
        veil_events_apply_lag_seconds_bucket{le=\"0.001\"} 10\n\
        veil_events_apply_lag_seconds_bucket{le=\"0.002\"} 60\n\
        veil_events_apply_lag_seconds_bucket{le=\"0.004\"} 98\n\
        veil_events_apply_lag_seconds_bucket{le=\"0.008\"} 99\n\
        veil_events_apply_lag_seconds_bucket{le=\"+Inf\"} 100\n";

    #[test]
    fn quantiles_are_bucket_bounds_of_the_change() {
        let now = Buckets::parse(PAGE, "veil_events_apply_lag_seconds");
        assert_eq!(now.total(), 100.0);
        assert_eq!(now.quantile_ms_at_most(0.5), 2.0);
        assert_eq!(now.quantile_ms_at_most(0.99), 8.0);
        assert!(now.quantile_ms_at_most(1.0).is_infinite());
        let earlier = Buckets::parse(
            &PAGE
                .replace("} 60", "} 55")
                .replace("} 98", "} 88")
                .replace("} 99", "} 89")
                .replace("} 100", "} 90"),
            "veil_events_apply_lag_seconds",
        );
        let delta = now.since(&earlier);
        assert_eq!(delta.total(), 10.0);
        assert_eq!(delta.quantile_ms_at_most(0.5), 2.0);
        assert_eq!(delta.quantile_ms_at_most(1.0), 4.0);
    }

    #[test]
    fn events_alternate_ready_and_deleted_with_growing_sequences() {
        let first = event(0, 3);
        let again = event(PODS, 3);
        assert_eq!(first.key, again.key);
        assert!(again.seq > first.seq);
        assert!(matches!(first.event, Event::PodReady { .. }));
        assert!(matches!(again.event, Event::PodDeleted { .. }));
    }
}
