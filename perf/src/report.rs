//! The Markdown report: machine, configurations, then one section per metric
//! with its plot and a table of medians, ranges and ratios to the baseline.

use std::fmt::Write;

use crate::results::BenchResults;

/// Renders the report; `plot_for(metric_id)` gives the relative path of a
/// metric's SVG when one was drawn.
pub fn render(results: &BenchResults, plot_for: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Veil benchmark — {}\n", results.started_at);
    let _ = writeln!(out, "- Machine: {}", results.machine.one_line());
    let _ = writeln!(
        out,
        "- Run: {} profile, {} repetitions per measurement, interleaved across configurations; \
         finished {}",
        results.profile, results.repetitions, results.finished_at
    );
    let _ = writeln!(
        out,
        "- Every node and pod is a network namespace on this one machine: absolute numbers \
         describe this machine, ratios to the baseline are what carry over.\n"
    );

    if !results.datapath.is_empty() {
        let _ = writeln!(out, "## Veil's datapath on this kernel\n");
        let _ = writeln!(out, "| decision | chosen | why |\n|---|---|---|");
        for choice in &results.datapath {
            let fallback = if choice.fallback { " (fallback)" } else { "" };
            let _ = writeln!(
                out,
                "| {} | `{}`{fallback} | {} |",
                choice.decision, choice.chosen, choice.reason
            );
        }
        out.push('\n');
    }

    let _ = writeln!(out, "## Configurations\n");
    let _ = writeln!(out, "| configuration | status |\n|---|---|");
    for c in &results.configurations {
        let status = match &c.reason {
            Some(reason) => format!("{}: {reason}", c.status),
            None => c.status.clone(),
        };
        let baseline = if c.baseline { " **(baseline)**" } else { "" };
        let _ = writeln!(out, "| `{}` — {}{baseline} | {status} |", c.id, c.title);
    }
    out.push('\n');

    for metric in &results.metrics {
        let direction = if metric.higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        };
        let _ = writeln!(out, "## {} ({}, {direction})\n", metric.title, metric.unit);
        if let Some(plot) = plot_for(&metric.id) {
            let _ = writeln!(out, "![{}]({plot})\n", metric.title);
        }
        let _ = writeln!(
            out,
            "| configuration | median | min – max | spread | × baseline | vs baseline |\n|---|---:|---:|---:|---:|---|"
        );
        for series in &metric.series {
            let Some(summary) = series.summary else {
                let _ = writeln!(out, "| `{}` | no samples | | | | |", series.configuration);
                continue;
            };
            let (ratio, verdict) = match series.vs_baseline {
                Some(c) => (format!("{:.2}×", c.ratio), c.verdict.as_str().to_string()),
                None if results
                    .configurations
                    .iter()
                    .any(|c| c.baseline && c.id == series.configuration) =>
                {
                    ("1.00×".into(), "baseline".into())
                }
                None => ("—".into(), "no baseline figure".into()),
            };
            let _ = writeln!(
                out,
                "| `{}` | {} | {} – {} | {:.0} % | {ratio} | {verdict} |",
                series.configuration,
                number(summary.median),
                number(summary.min),
                number(summary.max),
                summary.spread() * 100.0,
            );
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "Spread is (max − min) / median. A comparison is called inconclusive when the two \
         configurations' min–max ranges overlap."
    );
    out
}

/// Three significant figures, without scientific notation for everyday sizes.
pub fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

#[cfg(test)]
mod tests {
    use veil_api::DatapathChoice;

    use super::*;
    use crate::{
        configs::{Availability, Configuration},
        machine::Machine,
        results::{ConfigurationStatus, Samples},
    };

    fn sample_results() -> BenchResults {
        let mut samples = Samples::default();
        for v in [10.0, 11.0, 12.0] {
            samples.record("throughput-1.gbps", Configuration::Direct, v);
            samples.record("throughput-1.gbps", Configuration::KernelVxlan, v * 0.9);
        }
        BenchResults {
            schema_version: 1,
            started_at: "2026-11-22T20:00:00Z".into(),
            finished_at: "2026-11-22T20:02:00Z".into(),
            profile: "quick".into(),
            repetitions: 3,
            machine: Machine {
                host: "h".into(),
                cores: 2,
                cpu_model: "cpu".into(),
                memory_gib: 24.0,
                kernel: "6.18".into(),
                ktls_available: false,
            },
            datapath: vec![DatapathChoice {
                decision: "delivery".into(),
                chosen: "lookup".into(),
                reason: "this kernel refuses bpf_xdp_adjust_meta in XDP".into(),
                fallback: true,
            }],
            configurations: vec![
                ConfigurationStatus::new(Configuration::Direct, &Availability::Ready),
                ConfigurationStatus::new(Configuration::KernelVxlan, &Availability::Ready),
                ConfigurationStatus::new(
                    Configuration::VeilMtlsKtls,
                    &Availability::Skipped("kernel has no TLS ULP".into()),
                ),
            ],
            metrics: samples.into_metrics(&[Configuration::Direct, Configuration::KernelVxlan]),
        }
    }

    #[test]
    fn report_has_statuses_ratios_and_plots() {
        let text = render(&sample_results(), |id| Some(format!("plots/{id}.svg")));
        assert!(
            text.contains(
                "| delivery | `lookup` (fallback) | this kernel refuses bpf_xdp_adjust_meta in XDP |"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "| `veil-mtls-ktls` — Veil mTLS, kTLS | skipped: kernel has no TLS ULP |"
            ),
            "{text}"
        );
        assert!(
            text.contains("![Throughput, 1 stream](plots/throughput-1.gbps.svg)"),
            "{text}"
        );
        let direct = text
            .lines()
            .find(|l| l.starts_with("| `direct` |"))
            .unwrap();
        assert!(
            direct.contains("1.00×") && direct.contains("baseline"),
            "{direct}"
        );
        let vxlan = text
            .lines()
            .find(|l| l.starts_with("| `kernel-vxlan` |"))
            .unwrap();
        assert!(vxlan.contains("0.90×"), "{vxlan}");
        assert!(vxlan.contains("inconclusive"), "{vxlan}");
    }

    #[test]
    fn numbers_keep_three_significant_figures() {
        assert_eq!(number(1234.4), "1234");
        assert_eq!(number(12.34), "12.3");
        assert_eq!(number(1.234), "1.23");
        assert_eq!(number(0.1234), "0.123");
    }
}
