//! What the event bus does on this node, for Prometheus: events applied,
//! and how long each took from its publication to being applied here.

use prometheus_client::{
    metrics::{counter::Counter, histogram::Histogram},
    registry::Registry,
};

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
