//! What to run, and for how long.

use std::{
    path::PathBuf,
    str::FromStr,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

/// One kind of measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    /// Bulk TCP throughput, one stream (iperf3), and its CPU cost per GiB.
    Throughput1,
    /// Bulk TCP throughput, four parallel streams (iperf3).
    Throughput4,
    /// 1-byte request/response on one connection: latency percentiles.
    Latency1B,
    /// 1 KiB request/response on one connection: latency percentiles.
    Latency1K,
    /// New connections per second: connect, one request, close.
    Connections,
    /// Memory the proxies hold per 1,000 open connections.
    ProxyMemory,
    /// Idle unauthenticated connections flooding a node's inbound mTLS
    /// port, and real clients connecting meanwhile (mesh configurations).
    HandshakeFlood,
}

impl Workload {
    pub const ALL: [Workload; 7] = [
        Self::Throughput1,
        Self::Throughput4,
        Self::Latency1B,
        Self::Latency1K,
        Self::Connections,
        Self::ProxyMemory,
        Self::HandshakeFlood,
    ];

    /// The name used on the command line and in results.
    pub const fn id(self) -> &'static str {
        match self {
            Self::Throughput1 => "throughput-1",
            Self::Throughput4 => "throughput-4",
            Self::Latency1B => "latency-1b",
            Self::Latency1K => "latency-1k",
            Self::Connections => "connections",
            Self::ProxyMemory => "proxy-memory",
            Self::HandshakeFlood => "handshake-flood",
        }
    }
}

impl FromStr for Workload {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|w| w.id() == s).ok_or_else(|| {
            format!(
                "unknown scenario {s:?}; choose from: {}",
                Self::ALL.map(Workload::id).join(", ")
            )
        })
    }
}

/// Options of one benchmark run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub workloads: Vec<Workload>,
    /// Configurations to measure; empty means all. The baseline (`direct`)
    /// is always measured, since every ratio is against it.
    pub configurations: Vec<crate::configs::Configuration>,
    /// Times each (workload, configuration) pair is measured.
    pub repetitions: u32,
    /// Length of one throughput measurement.
    pub throughput_duration: Duration,
    /// Length of one latency or connection-rate measurement.
    pub short_duration: Duration,
    /// Connections opened for the proxy-memory measurement.
    pub held_connections: u32,
    /// Idle connections opened to the inbound port for handshake-flood.
    pub flood_connections: u32,
    /// Where results go (`perf/results` by default).
    pub output_dir: PathBuf,
    /// Short tag recorded with the results ("quick" or "full").
    pub profile: &'static str,
    /// Draw a progress bar (off in tests).
    pub progress: bool,
    /// Set (e.g. by a Ctrl-C handler) to stop after the current measurement.
    pub interrupted: Arc<AtomicBool>,
}

impl BenchOptions {
    /// The full run: 5 repetitions, 5-second throughput runs.
    pub fn full(output_dir: PathBuf) -> Self {
        Self {
            workloads: Workload::ALL.to_vec(),
            configurations: Vec::new(),
            repetitions: 5,
            throughput_duration: Duration::from_secs(5),
            short_duration: Duration::from_secs(3),
            held_connections: 1000,
            flood_connections: 10_000,
            output_dir,
            profile: "full",
            progress: true,
            interrupted: Arc::new(AtomicBool::new(false)),
        }
    }

    /// `--quick`: 3 repetitions of shorter runs; under 3 minutes on 2 cores.
    pub fn quick(output_dir: PathBuf) -> Self {
        Self {
            repetitions: 3,
            throughput_duration: Duration::from_secs(2),
            short_duration: Duration::from_millis(1500),
            profile: "quick",
            ..Self::full(output_dir)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_workload_parses_back_from_its_id() {
        for workload in Workload::ALL {
            assert_eq!(workload.id().parse::<Workload>(), Ok(workload));
        }
        let error = "bulk".parse::<Workload>().unwrap_err();
        assert!(error.contains("throughput-1"), "{error}");
    }

    #[test]
    fn quick_is_shorter_than_full() {
        let full = BenchOptions::full("out".into());
        let quick = BenchOptions::quick("out".into());
        assert!(quick.repetitions < full.repetitions);
        assert!(quick.throughput_duration < full.throughput_duration);
        assert_eq!(quick.workloads, full.workloads);
    }
}
