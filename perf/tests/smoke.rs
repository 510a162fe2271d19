//! A tiny benchmark run end to end: proves the harness measures and reports
//! every configuration that exists, and marks the rest, on a real test bed.

use std::time::Duration;

use veil_perf::{BenchOptions, Workload, results::BenchResults};

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn tiny_run_writes_json_report_and_plots() {
    veil_testbed::require_root("benchmark harness smoke test");
    let output = tempfile::tempdir().unwrap();
    let mut options = BenchOptions::quick(output.path().to_path_buf());
    options.workloads = vec![
        Workload::Throughput1,
        Workload::Latency1B,
        Workload::Connections,
        Workload::ProxyMemory,
        Workload::HandshakeFlood,
    ];
    options.repetitions = 1;
    options.throughput_duration = Duration::from_millis(500);
    options.short_duration = Duration::from_millis(200);
    options.held_connections = 50;
    options.flood_connections = 200;
    options.progress = false;

    let run = veil_perf::run(&options).unwrap();

    let results: BenchResults =
        serde_json::from_str(&std::fs::read_to_string(&run.json).unwrap()).unwrap();
    let status = |id: &str| {
        results
            .configurations
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.status.clone())
            .unwrap()
    };
    assert_eq!(status("direct"), "measured");
    assert_eq!(status("kernel-vxlan"), "measured");
    assert_eq!(status("stunnel"), "measured");
    assert_eq!(status("veil-overlay"), "measured");
    // The agent picks kTLS whenever the kernel has it: one of the two mTLS
    // configurations runs, the other is skipped with the reason.
    let (mesh, other) = if veil_mtls::ktls::kernel_supports_tls() {
        ("veil-mtls-ktls", "veil-mtls-userspace")
    } else {
        ("veil-mtls-userspace", "veil-mtls-ktls")
    };
    assert_eq!(status(mesh), "measured");
    assert_eq!(status(other), "skipped");

    let metric = |id: &str| results.metrics.iter().find(|m| m.id == id).unwrap();
    for configuration in ["direct", "kernel-vxlan", "veil-overlay", "stunnel", mesh] {
        for id in ["throughput-1.gbps", "latency-1b.p50", "connections.rate"] {
            let series = metric(id)
                .series
                .iter()
                .find(|s| s.configuration == configuration)
                .unwrap_or_else(|| panic!("no {id} for {configuration}"));
            assert!(series.samples[0] > 0.0, "{id} {configuration}: {series:?}");
        }
    }
    // Only configurations with a proxy have proxy memory (for Veil's mTLS
    // the agents are the proxy).
    let memory = metric("proxy-memory.kib-per-1000");
    let mut with_memory: Vec<&str> = memory
        .series
        .iter()
        .map(|s| s.configuration.as_str())
        .collect();
    with_memory.sort_unstable();
    let mut expected = vec!["stunnel", mesh];
    expected.sort_unstable();
    assert_eq!(with_memory, expected);

    // The flood runs on the mesh only, and real clients get through it.
    let flooded = metric("handshake-flood.real-connection-rate");
    assert_eq!(flooded.series.len(), 1, "{flooded:?}");
    assert_eq!(flooded.series[0].configuration, mesh);
    assert!(flooded.series[0].samples[0] > 0.0, "{flooded:?}");
    let threads = metric("handshake-flood.agent-threads");
    assert!(threads.series[0].samples[0] > 0.0, "{threads:?}");

    let report = std::fs::read_to_string(&run.report).unwrap();
    assert!(report.contains("skipped"), "{report}");
    assert!(report.contains("× baseline"), "{report}");
    let plot_dir = run.json.with_extension("");
    let svg = std::fs::read_to_string(plot_dir.join("throughput-1.gbps.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    assert!(svg.contains("stunnel"), "plot labels each configuration");
}
