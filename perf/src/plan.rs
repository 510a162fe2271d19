//! The order of measurements: interleaved, so drift hits every configuration alike.

use crate::{configs::Configuration, options::Workload};

/// One measurement of one workload on one configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub workload: Workload,
    pub repetition: u32,
    pub configuration: Configuration,
}

/// Whether `workload` means anything for `configuration`.
pub fn applies(workload: Workload, configuration: Configuration) -> bool {
    match workload {
        Workload::ProxyMemory => configuration.has_proxy(),
        Workload::HandshakeFlood => configuration.is_mesh(),
        _ => true,
    }
}

/// For each workload, repetition by repetition, every configuration in turn (A B C A B C …).
pub fn interleaved(
    workloads: &[Workload],
    configurations: &[Configuration],
    repetitions: u32,
) -> Vec<Step> {
    let mut steps = Vec::new();
    for &workload in workloads {
        for repetition in 0..repetitions {
            for &configuration in configurations {
                if applies(workload, configuration) {
                    steps.push(Step {
                        workload,
                        repetition,
                        configuration,
                    });
                }
            }
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_alternate_within_each_workload() {
        let configurations = [Configuration::Direct, Configuration::KernelVxlan];
        let steps = interleaved(&[Workload::Throughput1], &configurations, 2);
        let order: Vec<_> = steps
            .iter()
            .map(|s| (s.repetition, s.configuration))
            .collect();
        assert_eq!(
            order,
            [
                (0, Configuration::Direct),
                (0, Configuration::KernelVxlan),
                (1, Configuration::Direct),
                (1, Configuration::KernelVxlan),
            ]
        );
    }

    #[test]
    fn proxy_memory_only_runs_where_there_is_a_proxy() {
        let steps = interleaved(
            &[Workload::ProxyMemory],
            &[Configuration::Direct, Configuration::Stunnel],
            3,
        );
        assert_eq!(steps.len(), 3);
        assert!(
            steps
                .iter()
                .all(|s| s.configuration == Configuration::Stunnel)
        );
    }
}
