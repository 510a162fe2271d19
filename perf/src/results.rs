//! What a run writes: the JSON document, with every sample kept.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use veil_api::DatapathChoice;

use crate::{
    configs::{Availability, Configuration},
    machine::Machine,
    options::Workload,
    stats::{Comparison, Summary, compare},
};

pub const SCHEMA_VERSION: u32 = 1;

/// Definition of one reported figure.
#[derive(Clone, Copy, Debug)]
pub struct MetricSpec {
    pub id: &'static str,
    pub workload: Workload,
    pub title: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
}

/// Every figure a run can report, in report order.
pub const METRICS: &[MetricSpec] = &[
    MetricSpec {
        id: "throughput-1.gbps",
        workload: Workload::Throughput1,
        title: "Throughput, 1 stream",
        unit: "Gbit/s",
        higher_is_better: true,
    },
    MetricSpec {
        id: "throughput-1.cpu-per-gib",
        workload: Workload::Throughput1,
        title: "CPU cost, whole machine (1 stream)",
        unit: "CPU-s/GiB",
        higher_is_better: false,
    },
    MetricSpec {
        id: "throughput-1.softirq-per-gib",
        workload: Workload::Throughput1,
        title: "Kernel softirq cost (1 stream)",
        unit: "CPU-s/GiB",
        higher_is_better: false,
    },
    MetricSpec {
        id: "throughput-1.proxy-cpu-per-gib",
        workload: Workload::Throughput1,
        title: "Proxy processes' CPU cost (1 stream)",
        unit: "CPU-s/GiB",
        higher_is_better: false,
    },
    MetricSpec {
        id: "throughput-4.gbps",
        workload: Workload::Throughput4,
        title: "Throughput, 4 streams",
        unit: "Gbit/s",
        higher_is_better: true,
    },
    MetricSpec {
        id: "latency-1b.p50",
        workload: Workload::Latency1B,
        title: "1-byte request/response, p50",
        unit: "µs",
        higher_is_better: false,
    },
    MetricSpec {
        id: "latency-1b.p99",
        workload: Workload::Latency1B,
        title: "1-byte request/response, p99",
        unit: "µs",
        higher_is_better: false,
    },
    MetricSpec {
        id: "latency-1b.p999",
        workload: Workload::Latency1B,
        title: "1-byte request/response, p99.9",
        unit: "µs",
        higher_is_better: false,
    },
    MetricSpec {
        id: "latency-1k.p50",
        workload: Workload::Latency1K,
        title: "1 KiB request/response, p50",
        unit: "µs",
        higher_is_better: false,
    },
    MetricSpec {
        id: "latency-1k.p99",
        workload: Workload::Latency1K,
        title: "1 KiB request/response, p99",
        unit: "µs",
        higher_is_better: false,
    },
    MetricSpec {
        id: "latency-1k.p999",
        workload: Workload::Latency1K,
        title: "1 KiB request/response, p99.9",
        unit: "µs",
        higher_is_better: false,
    },
    MetricSpec {
        id: "connections.rate",
        workload: Workload::Connections,
        title: "New connections per second (connect, 1 request, close)",
        unit: "conn/s",
        higher_is_better: true,
    },
    MetricSpec {
        id: "connections.parallel-rate",
        workload: Workload::Connections,
        title: "New connections per second, 8 clients at once",
        unit: "conn/s",
        higher_is_better: true,
    },
    MetricSpec {
        id: "connections.per-proxy-core",
        workload: Workload::Connections,
        title: "New connections per second per core the proxies use (8 clients)",
        unit: "conn/s/core",
        higher_is_better: true,
    },
    MetricSpec {
        id: "proxy-memory.kib-per-1000",
        workload: Workload::ProxyMemory,
        title: "Proxy memory per 1,000 open connections",
        unit: "KiB",
        higher_is_better: false,
    },
    MetricSpec {
        id: "proxy-memory.threads-per-1000",
        workload: Workload::ProxyMemory,
        title: "Proxy threads per 1,000 open connections",
        unit: "threads",
        higher_is_better: false,
    },
    MetricSpec {
        id: "handshake-flood.agent-threads",
        workload: Workload::HandshakeFlood,
        title: "Server agent's threads under a flood of idle unauthenticated connections",
        unit: "threads",
        higher_is_better: false,
    },
    MetricSpec {
        id: "handshake-flood.agent-rss-growth-kib",
        workload: Workload::HandshakeFlood,
        title: "Server agent's memory growth under the flood",
        unit: "KiB",
        higher_is_better: false,
    },
    MetricSpec {
        id: "handshake-flood.real-connection-rate",
        workload: Workload::HandshakeFlood,
        title: "Real clients' new connections per second during the flood",
        unit: "conn/s",
        higher_is_better: true,
    },
    MetricSpec {
        id: "handshake-flood.real-connection-failures",
        workload: Workload::HandshakeFlood,
        title: "Real clients' failed connections during the flood",
        unit: "connections",
        higher_is_better: false,
    },
];

pub fn metric_spec(id: &str) -> Option<&'static MetricSpec> {
    METRICS.iter().find(|m| m.id == id)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchResults {
    pub schema_version: u32,
    pub started_at: String,
    pub finished_at: String,
    /// "quick" or "full".
    pub profile: String,
    pub repetitions: u32,
    pub machine: Machine,
    /// What Veil's agents chose on this kernel (e.g. `delivery = lookup`),
    /// so a reader knows which datapath the Veil figures measured.
    #[serde(default)]
    pub datapath: Vec<DatapathChoice>,
    pub configurations: Vec<ConfigurationStatus>,
    pub metrics: Vec<Metric>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigurationStatus {
    pub id: String,
    pub title: String,
    pub baseline: bool,
    /// "measured", "not built yet" or "skipped".
    pub status: String,
    pub reason: Option<String>,
}

impl ConfigurationStatus {
    pub fn new(configuration: Configuration, availability: &Availability) -> Self {
        let (status, reason) = match availability {
            Availability::Ready => ("measured", None),
            Availability::NotBuiltYet(why) => ("not built yet", Some(why.to_string())),
            Availability::Skipped(why) => ("skipped", Some(why.clone())),
        };
        Self {
            id: configuration.id().into(),
            title: configuration.title().into(),
            baseline: configuration.is_baseline(),
            status: status.into(),
            reason,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub id: String,
    pub workload: String,
    pub title: String,
    pub unit: String,
    pub higher_is_better: bool,
    pub series: Vec<Series>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub configuration: String,
    pub samples: Vec<f64>,
    pub summary: Option<Summary>,
    /// Against the baseline's series of the same metric; absent for the baseline itself.
    pub vs_baseline: Option<Comparison>,
}

/// Samples as they come in: metric id → configuration id → samples.
#[derive(Default)]
pub struct Samples(BTreeMap<&'static str, BTreeMap<&'static str, Vec<f64>>>);

impl Samples {
    pub fn record(&mut self, metric: &'static str, configuration: Configuration, value: f64) {
        debug_assert!(metric_spec(metric).is_some(), "unknown metric {metric}");
        self.0
            .entry(metric)
            .or_default()
            .entry(configuration.id())
            .or_default()
            .push(value);
    }

    /// Summaries and comparisons for every metric that got samples, in report order.
    pub fn into_metrics(self, configurations: &[Configuration]) -> Vec<Metric> {
        let baseline = Configuration::Direct.id();
        METRICS
            .iter()
            .filter_map(|spec| {
                let by_configuration = self.0.get(spec.id)?;
                let baseline_summary = by_configuration
                    .get(baseline)
                    .and_then(|samples| Summary::of(samples));
                let series = configurations
                    .iter()
                    .filter_map(|c| {
                        let samples = by_configuration.get(c.id())?.clone();
                        let summary = Summary::of(&samples);
                        let vs_baseline = match (summary, baseline_summary) {
                            (Some(s), Some(b)) if !c.is_baseline() => {
                                compare(&s, &b, spec.higher_is_better)
                            }
                            _ => None,
                        };
                        Some(Series {
                            configuration: c.id().into(),
                            samples,
                            summary,
                            vs_baseline,
                        })
                    })
                    .collect();
                Some(Metric {
                    id: spec.id.into(),
                    workload: spec.workload.id().into(),
                    title: spec.title.into(),
                    unit: spec.unit.into(),
                    higher_is_better: spec.higher_is_better,
                    series,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Verdict;

    #[test]
    fn metrics_get_summaries_and_ratios_to_the_baseline() {
        let mut samples = Samples::default();
        for v in [10.0, 11.0, 12.0] {
            samples.record("throughput-1.gbps", Configuration::Direct, v);
            samples.record("throughput-1.gbps", Configuration::Stunnel, v / 4.0);
        }
        let metrics = samples.into_metrics(&[Configuration::Direct, Configuration::Stunnel]);
        assert_eq!(metrics.len(), 1);
        let metric = &metrics[0];
        assert_eq!(metric.unit, "Gbit/s");
        let [direct, stunnel] = &metric.series[..] else {
            panic!("{metric:?}")
        };
        assert!(direct.vs_baseline.is_none());
        assert_eq!(direct.summary.unwrap().median, 11.0);
        let vs = stunnel.vs_baseline.unwrap();
        assert!((vs.ratio - 0.25).abs() < 1e-12);
        assert_eq!(vs.verdict, Verdict::Worse);
    }

    #[test]
    fn every_metric_id_is_unique_and_named_after_its_workload() {
        for (i, a) in METRICS.iter().enumerate() {
            assert!(a.id.starts_with(a.workload.id()), "{}", a.id);
            assert!(METRICS[i + 1..].iter().all(|b| b.id != a.id), "{}", a.id);
        }
    }
}
