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
        for warning in &overlay.warnings {
            found.push(finding(
                Severity::Warning,
                warning.clone(),
                "create the pod's veth or correct its `interface` in the inventory",
            ));
        }
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
            warnings: vec![],
            routes: vec![],
            endpoints: vec![],
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
