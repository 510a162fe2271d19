//! Tables for people.

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use veil_api::{AgentStatus, HookKind};

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
            // A program on the namespace has no interface index.
            if program.hook == HookKind::SkLookup {
                "-".to_string()
            } else {
                program.ifindex.to_string()
            },
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
    let mut text = format!(
        "Node {} · veil-agent {} · kernel TLS {}\n\nPrograms\n{programs}\n\nCounters\n{counters}\n",
        status.node,
        status.version,
        if status.kernel_tls {
            "available"
        } else {
            "not available (userspace TLS)"
        }
    );
    if let Some(kernel) = &status.kernel {
        text.push_str(&kernel_section(kernel));
    }
    if !status.events.is_empty() {
        let mut events = Table::new();
        events
            .load_preset(UTF8_BORDERS_ONLY)
            .set_header(["EVENT", "KIND", "PACKETS"]);
        for event in &status.events {
            let kind = if event.drop { "drop" } else { "forward" };
            events.add_row([event.event.clone(), kind.into(), event.packets.to_string()]);
        }
        text.push_str(&format!("\nDatapath events\n{events}\n"));
    }
    if let Some(overlay) = &status.overlay {
        text.push_str(&overlay_section(overlay));
    }
    if let Some(bus) = &status.event_bus {
        if bus.kind == "embedded" {
            text.push_str(&format!(
                "\nEvent bus (embedded journal, no broker) · {}",
                bus.state
            ));
        } else {
            text.push_str(&format!(
                "\nEvent bus · {} · {} pod(s) of other nodes learnt from it",
                bus.state, bus.announced_pods
            ));
        }
        if bus.revoked_serials > 0 {
            text.push_str(&format!(
                " · {} revoked certificate(s) refused",
                bus.revoked_serials
            ));
        }
        if bus.revoked_identities > 0 {
            text.push_str(&format!(
                " · {} revoked identit{} (certificates issued before refused)",
                bus.revoked_identities,
                if bus.revoked_identities == 1 {
                    "y"
                } else {
                    "ies"
                }
            ));
        }
        text.push('\n');
    }
    if let Some(mesh) = &status.mesh {
        text.push_str(&crate::mesh::status_section(
            mesh,
            std::time::SystemTime::now(),
        ));
    }
    text
}

/// `veilctl check` as text.
pub fn findings(node: &str, found: &[crate::check::Finding]) -> String {
    if found.is_empty() {
        return format!("Node {node}: no problems found.\n");
    }
    let mut table = Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_header(["SEVERITY", "PROBLEM", "FIX"]);
    for finding in found {
        table.add_row([
            format!("{:?}", finding.severity).to_lowercase(),
            finding.problem.clone(),
            finding.fix.clone(),
        ]);
    }
    format!("Node {node}: {} finding(s)\n{table}\n", found.len())
}

/// The kernel's probed features and what the datapath chose for them.
fn kernel_section(kernel: &veil_api::KernelStatus) -> String {
    let lacking: Vec<&veil_api::KernelFeature> =
        kernel.features.iter().filter(|f| !f.available).collect();
    let mut text = format!(
        "\nKernel {} · {} features probed, {}\n",
        kernel.release,
        kernel.features.len(),
        if lacking.is_empty() {
            "all available".to_string()
        } else {
            format!(
                "lacking: {}",
                lacking
                    .iter()
                    .map(|f| if f.forced_off {
                        format!("{} (switched off)", f.name)
                    } else {
                        f.name.clone()
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    let mut choices = Table::new();
    choices
        .load_preset(UTF8_BORDERS_ONLY)
        .set_header(["DATAPATH", "CHOSEN", "WHY"]);
    for choice in &kernel.choices {
        let chosen = if choice.fallback {
            format!("{} (fallback)", choice.chosen)
        } else {
            choice.chosen.clone()
        };
        choices.add_row([choice.decision.clone(), chosen, choice.reason.clone()]);
    }
    text.push_str(&format!("{choices}\n"));
    text
}

fn overlay_section(overlay: &veil_api::OverlayStatus) -> String {
    let encapsulation = if overlay.encapsulation.is_empty() {
        String::new()
    } else {
        format!(" · encapsulation {}", overlay.encapsulation)
    };
    let mut text = format!(
        "\nOverlay · VNI {}{encapsulation} · underlay {} (MTU {}, pods {}) · inventory {}\n",
        overlay.vni,
        overlay.underlay_ip,
        overlay.underlay_mtu,
        overlay.underlay_mtu.saturating_sub(50),
        overlay.inventory
    );
    if let Some(error) = &overlay.inventory_error {
        text.push_str(&format!(
            "  ! inventory refused, last good state in force: {error}\n"
        ));
    }
    if let Some(error) = &overlay.apply_error {
        text.push_str(&format!("  ! not fully applied, retrying: {error}\n"));
    }
    for warning in &overlay.warnings {
        text.push_str(&format!("  ! {warning}\n"));
    }
    let mut routes = Table::new();
    routes
        .load_preset(UTF8_BORDERS_ONLY)
        .set_header(["REMOTE PODS", "NODE", "NODE MAC"]);
    for route in &overlay.routes {
        routes.add_row([
            route.cidr.clone(),
            route.node_ip.clone(),
            route.node_mac.clone(),
        ]);
    }
    let mut endpoints = Table::new();
    endpoints
        .load_preset(UTF8_BORDERS_ONLY)
        .set_header(["LOCAL POD", "IFINDEX", "POD MAC"]);
    for endpoint in &overlay.endpoints {
        endpoints.add_row([
            endpoint.ip.clone(),
            endpoint.ifindex.to_string(),
            endpoint.pod_mac.clone(),
        ]);
    }
    text.push_str(&format!("{routes}\n{endpoints}\n"));
    text
}

#[cfg(test)]
pub(crate) mod tests {
    use veil_api::{AttachedProgram, HookKind, InterfaceCounters};

    use super::*;

    /// A healthy node with the XDP program attached (shared by `check`'s tests).
    pub(crate) fn sample(counters: Vec<InterfaceCounters>) -> AgentStatus {
        AgentStatus {
            version: "0.1.0".into(),
            node: "node1".into(),
            programs: vec![AttachedProgram {
                name: "veil_underlay_ingress".into(),
                hook: HookKind::Xdp,
                interface: "ul0".into(),
                ifindex: 2,
                mode: "native".into(),
                detached: None,
            }],
            counters,
            events: Vec::new(),
            overlay: None,
            kernel_tls: true,
            kernel: None,
            mesh: None,
            event_bus: None,
            acme: Vec::new(),
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
        assert!(
            text.starts_with("Node node1 · veil-agent 0.1.0 · kernel TLS available"),
            "{text}"
        );
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
    fn events_and_overlay_are_shown_when_present() {
        let mut agent = sample(vec![]);
        agent.events = vec![veil_api::EventCount {
            event: "drop-wrong-vni".into(),
            drop: true,
            packets: 7,
        }];
        agent.overlay = Some(veil_api::OverlayStatus {
            vni: 4242,
            underlay_ip: "198.18.0.1".into(),
            underlay_mtu: 1500,
            inventory: "/etc/veil/inventory.toml".into(),
            inventory_error: Some("line 3: bad MAC".into()),
            apply_error: None,
            plans: 1,
            warnings: vec![],
            routes: vec![veil_api::OverlayRoute {
                cidr: "198.19.2.0/24".into(),
                node_ip: "198.18.0.2".into(),
                node_mac: "02:00:00:00:00:02".into(),
            }],
            endpoints: vec![],
            interface_mtus: vec![],
            encapsulation: "tc".into(),
        });
        let text = status(&agent);
        let drop_row = text.lines().find(|l| l.contains("drop-wrong-vni")).unwrap();
        assert!(
            drop_row.contains("drop") && drop_row.contains('7'),
            "{drop_row}"
        );
        assert!(
            text.contains(
                "Overlay · VNI 4242 · encapsulation tc · underlay 198.18.0.1 (MTU 1500, pods 1450)"
            ),
            "{text}"
        );
        assert!(
            text.contains("inventory refused, last good state in force: line 3: bad MAC"),
            "{text}"
        );
        let route = text.lines().find(|l| l.contains("198.19.2.0/24")).unwrap();
        assert!(route.contains("198.18.0.2"), "{route}");
    }

    #[test]
    fn the_kernel_section_names_what_is_lacking_and_each_choice() {
        let mut agent = sample(vec![]);
        agent.kernel = Some(veil_api::KernelStatus {
            release: "6.18.44-fc-v1300".into(),
            features: vec![
                veil_api::KernelFeature {
                    name: "xdp-metadata".into(),
                    description: "bpf_xdp_adjust_meta in XDP".into(),
                    available: false,
                    required: false,
                    forced_off: false,
                    oldest_kernel: "4.15".into(),
                    fallback: Some("lookup delivery".into()),
                },
                veil_api::KernelFeature {
                    name: "tcx".into(),
                    description: "tcx".into(),
                    available: false,
                    required: false,
                    forced_off: true,
                    oldest_kernel: "6.6".into(),
                    fallback: Some("netlink".into()),
                },
            ],
            choices: vec![veil_api::DatapathChoice {
                decision: "delivery".into(),
                chosen: "lookup".into(),
                reason: "the kernel lacks bpf_xdp_adjust_meta in XDP".into(),
                fallback: true,
            }],
        });
        let text = status(&agent);
        assert!(
            text.contains(
                "Kernel 6.18.44-fc-v1300 · 2 features probed, lacking: xdp-metadata, tcx (switched off)"
            ),
            "{text}"
        );
        let row = text.lines().find(|l| l.contains("delivery")).unwrap();
        assert!(
            row.contains("lookup (fallback)") && row.contains("lacks bpf_xdp_adjust_meta"),
            "{row}"
        );
    }

    #[test]
    fn empty_counters_say_so() {
        let text = status(&sample(vec![]));
        assert!(text.contains("No packets seen yet."), "{text}");
    }
}
