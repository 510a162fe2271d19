//! `veilctl check`: what is wrong on this node, and how to fix it.
//!
//! Each finding names the problem in the operator's terms and the next step.
//! Read from the agent's status, so it sees what the agent and the kernel see.

use serde::Serialize;
use veil_api::{AgentStatus, HookKind, MeshStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub problem: String,
    pub fix: String,
}

fn finding(severity: Severity, problem: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        severity,
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// Every misconfiguration visible in `status`, worst first.
pub fn findings(status: &AgentStatus) -> Vec<Finding> {
    let mut found = Vec::new();
    if let Some(overlay) = &status.overlay {
        if let Some(error) = &overlay.inventory_error {
            found.push(finding(
                Severity::Error,
                format!("the inventory is refused: {error}"),
                format!(
                    "fix {} — the agent keeps using the last good version until then",
                    overlay.inventory
                ),
            ));
        }
        if let Some(error) = &overlay.apply_error {
            found.push(finding(
                Severity::Error,
                format!("the overlay is not fully applied: {error}"),
                "the agent retries and reports not ready until it succeeds; see its log \
                 for the failing attach or map write"
                    .to_string(),
            ));
        }
        for warning in &overlay.warnings {
            found.push(finding(
                Severity::Warning,
                warning.clone(),
                "create the pod's veth or correct its `interface` in the inventory",
            ));
        }
    }
    if let Some(overlay) = &status.overlay {
        mtu_findings(overlay, &mut found);
    }
    for event in status.events.iter().filter(|e| e.drop && e.packets > 0) {
        let (problem, fix) = match event.event.as_str() {
            "drop-wrong-vni" => (
                "VXLAN with another VNI reaches this node",
                "give every agent the same overlay.vni (and keep other VXLAN users off UDP 4789)",
            ),
            "drop-too-big" => (
                "pods send packets that do not fit the underlay once encapsulated",
                "set pod MTUs to the underlay MTU minus 50 (ICMP fragmentation-needed is sent for DF packets)",
            ),
            "drop-unknown-destination" => (
                "other nodes send pods to this node that it does not have",
                "the nodes' inventories disagree: distribute the same inventory to every node",
            ),
            "drop-malformed" | "drop-truncated" => (
                "broken VXLAN arrives on UDP 4789",
                "find the sender on the underlay; fragmented VXLAN means an underlay MTU too small",
            ),
            "drop-inner-not-ipv4" => (
                "pods send non-IPv4 traffic across nodes",
                "only IPv4 is carried today",
            ),
            "drop-encap-failed" => (
                "the kernel refused to grow packets for encapsulation",
                "report this with the kernel version",
            ),
            "drop-plaintext-to-strict" => (
                "clients outside the mesh try plaintext TCP to STRICT pods and are dropped",
                "mesh those clients ([pods.mesh]), or make the port PERMISSIVE ([[policy.ports]]) \
                 while they migrate; `veilctl mtls <pod> --port <p>` shows why a port is STRICT",
            ),
            "drop-plaintext-unauthorized" => (
                "clients without a mesh identity send plaintext TCP to ports that allow rules \
                 select and are dropped",
                "mesh those clients and list their identity or namespace in the rule \
                 ([[policy.allow]]); plaintext proves no identity, so a selected port admits none",
            ),
            "drop-no-proxy" => (
                "meshed connections found no agent listener and were dropped (fail closed)",
                "check that the agent's mesh is running (`veilctl status`, the agent log)",
            ),
            _ => ("packets dropped", "see the agent log"),
        };
        found.push(finding(
            Severity::Warning,
            format!("{problem} ({} packets, {})", event.packets, event.event),
            fix,
        ));
    }
    for program in &status.programs {
        if let Some(why) = &program.detached {
            let fix = if program.hook == HookKind::Xdp {
                "restart the agent (it attaches to the underlay at start); until then \
                 traffic from other nodes is not decapsulated here"
            } else if program.name == veil_common::names::PROG_UNDERLAY_DELIVER {
                "restart the agent (it attaches to the underlay at start); until then \
                 decapsulated traffic from other nodes does not reach its pods"
            } else {
                "the agent re-attaches to a recreated pod veth within a second; if this \
                 stays, check the agent log"
            };
            found.push(finding(
                Severity::Error,
                format!(
                    "{} on {} is detached: {why}",
                    program.name, program.interface
                ),
                fix,
            ));
        }
    }
    for program in status
        .programs
        .iter()
        .filter(|p| p.hook == HookKind::Xdp && p.mode == "generic")
    {
        found.push(finding(
            Severity::Warning,
            format!("XDP runs in generic mode on {}", program.interface),
            "the driver lacks native XDP: expect lower throughput, or use a NIC driver with XDP support",
        ));
    }
    if let Some(bus) = &status.event_bus
        && bus.state != "connected"
    {
        found.push(finding(
            Severity::Warning,
            format!("the event bus is not connected ({})", bus.state),
            "the agent works from its cache of the last known state and queues what it \
             publishes; check the brokers in [events.kafka] and that they are reachable",
        ));
    }
    if let Some(behind) = status.event_bus.as_ref().and_then(|b| b.clock_behind_ms) {
        found.push(finding(
            Severity::Warning,
            format!(
                "this node's clock looks {behind} ms behind the event publishers' (events \
                 arrived before they were sent, by the broker's timestamps)"
            ),
            "run NTP (chrony or systemd-timesyncd) on every node: certificate validity \
             and renewal times depend on clocks that agree",
        ));
    }
    if let Some(mesh) = &status.mesh {
        mesh_findings(mesh, std::time::SystemTime::now(), &mut found);
    }
    if !status.kernel_tls {
        found.push(finding(
            Severity::Info,
            "the kernel has no TLS (kTLS): mTLS records are encrypted in userspace",
            "use a kernel with CONFIG_TLS (y or m) for zero-copy kernel encryption",
        ));
    }
    found.sort_by_key(|f| std::cmp::Reverse(f.severity));
    found
}

/// The underlay's MTU must be what the overlay was told, and pods must
/// leave room for the 50 bytes of VXLAN.
fn mtu_findings(overlay: &veil_api::OverlayStatus, found: &mut Vec<Finding>) {
    let pod_mtu = overlay.underlay_mtu.saturating_sub(VXLAN_OVERHEAD);
    for interface in &overlay.interface_mtus {
        match interface.role.as_str() {
            "underlay" if interface.mtu < overlay.underlay_mtu => found.push(finding(
                Severity::Error,
                format!(
                    "MTU mismatch: the underlay {} has MTU {}, but overlay.underlay_mtu = {}",
                    interface.interface, interface.mtu, overlay.underlay_mtu
                ),
                format!(
                    "encapsulated packets sized for {} do not fit the wire and are lost: set \
                     overlay.underlay_mtu = {} (and pod MTUs to {}), or raise the interface's MTU",
                    overlay.underlay_mtu,
                    interface.mtu,
                    interface.mtu.saturating_sub(VXLAN_OVERHEAD)
                ),
            )),
            "underlay" if interface.mtu > overlay.underlay_mtu => found.push(finding(
                Severity::Info,
                format!(
                    "the underlay {} has MTU {}, more than overlay.underlay_mtu = {}",
                    interface.interface, interface.mtu, overlay.underlay_mtu
                ),
                format!(
                    "set overlay.underlay_mtu = {} to let pods use {} bytes",
                    interface.mtu,
                    interface.mtu.saturating_sub(VXLAN_OVERHEAD)
                ),
            )),
            "pod" if interface.mtu > pod_mtu => found.push(finding(
                Severity::Warning,
                format!(
                    "MTU mismatch: pod veth {} has MTU {}, more than the {pod_mtu} that fit \
                     the underlay once encapsulated",
                    interface.interface, interface.mtu
                ),
                format!(
                    "give pods MTU {pod_mtu} (the CNI's MTU setting): larger packets to other \
                     nodes get ICMP fragmentation-needed (DF) or are dropped"
                ),
            )),
            _ => {}
        }
    }
}

/// VXLAN over IPv4: outer Ethernet, IPv4, UDP and VXLAN headers.
const VXLAN_OVERHEAD: u32 = 50;

/// How close to expiry a certificate must be to be reported.
const EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(3600);

fn mesh_findings(mesh: &MeshStatus, now: std::time::SystemTime, found: &mut Vec<Finding>) {
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    for workload in &mesh.workloads {
        match (&workload.certificate, &workload.certificate_error) {
            (None, error) => found.push(finding(
                Severity::Error,
                format!(
                    "{} ({}) has no certificate{}",
                    workload.pod,
                    workload.identity,
                    error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
                "meshed connections from and to it fail until one is issued: check the mesh CA \
                 files in the agent config and the agent log",
            )),
            (Some(cert), error) if cert.not_after_unix <= now + EXPIRY_WARNING.as_secs() => {
                found.push(finding(
                    Severity::Error,
                    format!(
                        "the certificate of {} expires within the hour{}",
                        workload.identity,
                        error
                            .as_deref()
                            .map(|e| format!("; renewal failing: {e}"))
                            .unwrap_or_default()
                    ),
                    "fix the renewal (CA files, agent log) before it expires",
                ));
            }
            (Some(_), Some(error)) => found.push(finding(
                Severity::Warning,
                format!(
                    "renewing the certificate of {} fails: {error}",
                    workload.identity
                ),
                "the current certificate stays in use until it expires; fix the CA or the agent",
            )),
            (Some(_), None) => {}
        }
    }
    let refused: u64 = mesh
        .connections
        .iter()
        .filter(|c| c.result != "ok")
        .map(|c| c.count)
        .sum();
    if refused > 0 {
        let reasons: Vec<String> = mesh
            .connections
            .iter()
            .filter(|c| c.result != "ok")
            .map(|c| format!("{} {} {}", c.count, c.direction, c.result))
            .collect();
        found.push(finding(
            Severity::Warning,
            format!("meshed connections were refused: {}", reasons.join(", ")),
            "the agent log says why for each (look for \"mesh connection refused\"); \
             `denied` means an allow rule, `tls_refused` a certificate the peer does not trust",
        ));
    }
}

#[cfg(test)]
mod tests {
    use veil_api::{EventCount, OverlayStatus};

    use super::*;

    fn status() -> AgentStatus {
        crate::render::tests::sample(vec![])
    }

    #[test]
    fn a_healthy_node_has_no_findings() {
        assert_eq!(findings(&status()), []);
    }

    #[test]
    fn each_problem_is_found_with_a_fix_worst_first() {
        let mut s = status();
        s.kernel_tls = false;
        s.programs[0].mode = "generic".into();
        s.events = vec![
            EventCount {
                event: "drop-wrong-vni".into(),
                drop: true,
                packets: 3,
            },
            EventCount {
                event: "encapsulated".into(),
                drop: false,
                packets: 100,
            },
            EventCount {
                event: "drop-too-big".into(),
                drop: true,
                packets: 0,
            },
        ];
        s.overlay = Some(OverlayStatus {
            vni: 1,
            underlay_ip: "198.18.0.1".into(),
            underlay_mtu: 1500,
            inventory: "/etc/veil/inventory.toml".into(),
            inventory_error: Some("line 3: bad MAC".into()),
            apply_error: None,
            plans: 1,
            warnings: vec![],
            routes: vec![],
            endpoints: vec![],
            interface_mtus: vec![],
            encapsulation: "tc".into(),
        });
        let found = findings(&s);
        let problems: Vec<&str> = found.iter().map(|f| f.problem.as_str()).collect();
        assert_eq!(found[0].severity, Severity::Error);
        assert!(
            problems[0].contains("inventory is refused: line 3"),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("another VNI") && p.contains("3 packets"))
        );
        assert!(
            !problems.iter().any(|p| p.contains("do not fit")),
            "zero counters are not problems"
        );
        assert!(problems.iter().any(|p| p.contains("generic mode on ul0")));
        assert_eq!(found.last().unwrap().severity, Severity::Info);
        assert!(found.iter().all(|f| !f.fix.is_empty()));
    }

    #[test]
    fn mtu_mismatches_detached_programs_and_clock_skew_are_found() {
        let mut s = status();
        s.overlay = Some(OverlayStatus {
            vni: 1,
            underlay_ip: "198.18.0.1".into(),
            underlay_mtu: 1500,
            inventory: "(none: Kubernetes)".into(),
            inventory_error: None,
            apply_error: None,
            plans: 1,
            warnings: vec![],
            routes: vec![],
            endpoints: vec![],
            interface_mtus: vec![
                veil_api::InterfaceMtu {
                    interface: "ul0".into(),
                    mtu: 1400,
                    role: "underlay".into(),
                },
                veil_api::InterfaceMtu {
                    interface: "vp1".into(),
                    mtu: 1500,
                    role: "pod".into(),
                },
                veil_api::InterfaceMtu {
                    interface: "vp2".into(),
                    mtu: 1450,
                    role: "pod".into(),
                },
            ],
            encapsulation: "tc".into(),
        });
        s.programs[0].detached = Some("interface ul0 was recreated (index 2 → 9)".into());
        s.event_bus = Some(veil_api::EventBusStatus {
            state: "connected".into(),
            kind: "kafka".into(),
            announced_pods: 0,
            clock_behind_ms: Some(4200),
            revoked_serials: 0,
            revoked_identities: 0,
        });
        let found = findings(&s);
        let problem = |needle: &str| {
            found
                .iter()
                .find(|f| f.problem.contains(needle))
                .unwrap_or_else(|| panic!("no finding with {needle:?}: {found:#?}"))
        };
        let underlay = problem("the underlay ul0 has MTU 1400");
        assert_eq!(underlay.severity, Severity::Error);
        assert!(
            underlay.fix.contains("overlay.underlay_mtu = 1400"),
            "{}",
            underlay.fix
        );
        assert!(
            problem("pod veth vp1 has MTU 1500")
                .fix
                .contains("MTU 1450")
        );
        assert!(
            !found.iter().any(|f| f.problem.contains("vp2")),
            "1450 fits"
        );
        let detached = problem("is detached: interface ul0 was recreated");
        assert_eq!(detached.severity, Severity::Error);
        assert!(detached.fix.contains("restart the agent"));
        assert!(problem("4200 ms behind").fix.contains("NTP"));
    }

    #[test]
    fn mesh_problems_are_found() {
        use veil_api::{MeshCertificate, MeshConnectionCount, MeshWorkload};
        let now = std::time::SystemTime::now();
        let now_unix = now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let workload = |pod: &str, cert: Option<u64>, error: Option<&str>| MeshWorkload {
            pod: pod.into(),
            ip: "198.19.1.1".into(),
            identity: format!("spiffe://cluster.local/ns/shop/sa/{pod}"),
            mode: "strict".into(),
            certificate: cert.map(|not_after| MeshCertificate {
                serial: "01".into(),
                issuer: "local CA".into(),
                not_after_unix: not_after,
                renew_at_unix: not_after - 60,
            }),
            certificate_error: error.map(str::to_owned),
        };
        let mesh = MeshStatus {
            trust_domain: "cluster.local".into(),
            workloads: vec![
                workload("healthy", Some(now_unix + 86_400), None),
                workload("expiring", Some(now_unix + 600), Some("CA key unreadable")),
                workload(
                    "failing",
                    Some(now_unix + 86_400),
                    Some("CA key unreadable"),
                ),
                workload("missing", None, Some("bad trust domain")),
            ],
            connections: vec![MeshConnectionCount {
                direction: "inbound".into(),
                mode: "none".into(),
                result: "denied".into(),
                count: 2,
            }],
        };
        let mut found = Vec::new();
        mesh_findings(&mesh, now, &mut found);
        let problems: Vec<&str> = found.iter().map(|f| f.problem.as_str()).collect();
        assert_eq!(found.len(), 4, "{problems:#?}");
        assert!(
            problems.iter().all(|p| !p.contains("healthy")),
            "{problems:#?}"
        );
        assert!(problems[0].contains("expiring") && problems[0].contains("within the hour"));
        assert!(
            problems[1].contains("renewing the certificate of") && problems[1].contains("failing")
        );
        assert!(problems[2].contains("missing") && problems[2].contains("bad trust domain"));
        assert!(problems[3].contains("2 inbound denied"), "{problems:#?}");
    }
}
