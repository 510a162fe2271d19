//! A tiny benchmark run end to end: proves the harness measures and reports
//! every configuration that exists, and marks the rest, on a real test bed.

use std::time::Duration;

use veil_perf::{BenchOptions, Workload, results::BenchResults};

#[test]
fn tiny_run_writes_json_report_and_plots() {
    if !veil_testbed::require_root("benchmark harness smoke test") {
        return;
    }
    let output = tempfile::tempdir().unwrap();
    let mut options = BenchOptions::quick(output.path().to_path_buf());
    options.workloads = vec![
        Workload::Throughput1,
        Workload::Latency1B,
        Workload::Connections,
        Workload::ProxyMemory,
    ];
    options.repetitions = 1;
    options.throughput_duration = Duration::from_millis(500);
    options.short_duration = Duration::from_millis(200);
    options.held_connections = 50;
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
    assert_eq!(status("veil-mtls-userspace"), "not built yet");

    let metric = |id: &str| results.metrics.iter().find(|m| m.id == id).unwrap();
    for configuration in ["direct", "kernel-vxlan", "veil-overlay", "stunnel"] {
        for id in ["throughput-1.gbps", "latency-1b.p50", "connections.rate"] {
            let series = metric(id)
                .series
                .iter()
                .find(|s| s.configuration == configuration)
                .unwrap_or_else(|| panic!("no {id} for {configuration}"));
            assert!(series.samples[0] > 0.0, "{id} {configuration}: {series:?}");
        }
    }
    // Only the proxy has proxy memory; its connections cost it something.
    let memory = metric("proxy-memory.kib-per-1000");
    assert_eq!(memory.series.len(), 1);
    assert_eq!(memory.series[0].configuration, "stunnel");

    let report = std::fs::read_to_string(&run.report).unwrap();
    assert!(report.contains("not built yet"), "{report}");
    assert!(report.contains("× baseline"), "{report}");
    let plot_dir = run.json.with_extension("");
    let svg = std::fs::read_to_string(plot_dir.join("throughput-1.gbps.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    assert!(svg.contains("stunnel"), "plot labels each configuration");
}
