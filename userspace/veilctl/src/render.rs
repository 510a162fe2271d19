//! Tables for people.

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use veil_api::AgentStatus;

/// `veilctl status` as text: a header line, the programs, the counters.
pub fn status(status: &AgentStatus) -> String {
    let mut programs = Table::new();
    programs.load_preset(UTF8_BORDERS_ONLY).set_header([
        "PROGRAM",
        "HOOK",
        "INTERFACE",
        "IFINDEX",
        "MODE",
    ]);
    for program in &status.programs {
        programs.add_row([
            program.name.clone(),
            program.hook.to_string(),
            program.interface.clone(),
            program.ifindex.to_string(),
            program.mode.clone(),
        ]);
    }
    let mut counters = Table::new();
    counters
        .load_preset(UTF8_BORDERS_ONLY)
        .set_header(["HOOK", "INTERFACE", "PACKETS", "BYTES"]);
    for counter in &status.counters {
        counters.add_row([
            counter.hook.to_string(),
            counter.interface.clone(),
            counter.packets.to_string(),
            counter.bytes.to_string(),
        ]);
    }
    let counters = if status.counters.is_empty() {
        "No packets seen yet.".to_string()
    } else {
        counters.to_string()
    };
    format!(
        "Node {} · veil-agent {}\n\nPrograms\n{programs}\n\nCounters\n{counters}\n",
        status.node, status.version
    )
}

#[cfg(test)]
mod tests {
    use veil_api::{AttachedProgram, HookKind, InterfaceCounters};

    use super::*;

    fn sample(counters: Vec<InterfaceCounters>) -> AgentStatus {
        AgentStatus {
            version: "0.1.0".into(),
            node: "node1".into(),
            programs: vec![AttachedProgram {
                name: "veil_underlay_ingress".into(),
                hook: HookKind::Xdp,
                interface: "ul0".into(),
                ifindex: 2,
                mode: "native".into(),
            }],
            counters,
            events: Vec::new(),
            overlay: None,
        }
    }

    #[test]
    fn table_shows_programs_and_counters() {
        let text = status(&sample(vec![InterfaceCounters {
            hook: HookKind::Xdp,
            interface: "ul0".into(),
            ifindex: 2,
            packets: 42,
            bytes: 4200,
        }]));
        assert!(text.starts_with("Node node1 · veil-agent 0.1.0"), "{text}");
        let program_row = text
            .lines()
            .find(|l| l.contains("veil_underlay_ingress"))
            .unwrap();
        for cell in ["xdp", "ul0", "native"] {
            assert!(program_row.contains(cell), "{program_row}");
        }
        let counter_row = text.lines().find(|l| l.contains("4200")).unwrap();
        assert!(counter_row.contains("42"), "{counter_row}");
    }

    #[test]
    fn empty_counters_say_so() {
        let text = status(&sample(vec![]));
        assert!(text.contains("No packets seen yet."), "{text}");
    }
}
