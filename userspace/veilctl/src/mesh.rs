//! The mesh views: `veilctl workloads`, `veilctl certs`, `veilctl mtls`, and
//! the mesh section of `veilctl status`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use veil_api::{FlowRecord, MeshStatus, MeshWorkload, ModeReport};

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY).set_header(header);
    table
}

fn at(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// "in 15h 59m" or "2m ago", relative to `now`.
fn relative(unix: u64, now: SystemTime) -> String {
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (delta, future) = if unix >= now {
        (unix - now, true)
    } else {
        (now - unix, false)
    };
    let rounded = Duration::from_secs(if delta >= 3600 {
        delta - delta % 60
    } else {
        delta
    });
    let text = humantime::format_duration(rounded).to_string();
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// The certificate state of a workload, as one word and why.
fn certificate_state(workload: &MeshWorkload, now: SystemTime) -> String {
    let now_unix = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    match (&workload.certificate, &workload.certificate_error) {
        (Some(cert), _) if cert.not_after_unix <= now_unix => "expired".into(),
        (Some(_), Some(error)) => format!("renewal failing: {error}"),
        (Some(cert), None) if cert.renew_at_unix <= now_unix => "renewal due".into(),
        (Some(_), None) => "valid".into(),
        (None, Some(error)) => format!("failed: {error}"),
        (None, None) => "issuing".into(),
    }
}

/// `veilctl workloads`: the meshed pods of this node.
pub fn workloads(node: &str, mesh: &MeshStatus) -> String {
    if mesh.workloads.is_empty() {
        return format!("Node {node}: no meshed pods on this node.\n");
    }
    let mut rows = table(&["POD", "ADDRESS", "IDENTITY", "MODE"]);
    for workload in &mesh.workloads {
        rows.add_row([
            workload.pod.clone(),
            workload.ip.clone(),
            workload.identity.clone(),
            workload.mode.to_uppercase(),
        ]);
    }
    format!(
        "Node {node} · trust domain {} · {} meshed pod(s)\n{rows}\n",
        mesh.trust_domain,
        mesh.workloads.len()
    )
}

/// `veilctl certs`: each local workload's certificate.
pub fn certs(node: &str, mesh: &MeshStatus, now: SystemTime) -> String {
    if mesh.workloads.is_empty() {
        return format!("Node {node}: no meshed pods, so no workload certificates.\n");
    }
    let mut rows = table(&[
        "IDENTITY",
        "POD",
        "SERIAL",
        "ISSUER",
        "NOT AFTER",
        "NEXT RENEWAL",
        "STATE",
    ]);
    for workload in &mesh.workloads {
        let (serial, issuer, not_after, renewal) = match &workload.certificate {
            Some(cert) => (
                cert.serial.clone(),
                cert.issuer.clone(),
                format!(
                    "{} ({})",
                    at(cert.not_after_unix),
                    relative(cert.not_after_unix, now)
                ),
                relative(cert.renew_at_unix, now),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        rows.add_row([
            workload.identity.clone(),
            workload.pod.clone(),
            serial,
            issuer,
            not_after,
            renewal,
            certificate_state(workload, now),
        ]);
    }
    format!("Node {node} · trust domain {}\n{rows}\n", mesh.trust_domain)
}

/// The server-name certificates from ACME, for `veilctl certs`.
pub fn acme_certs(certificates: &[veil_api::AcmeCertificateStatus], now: SystemTime) -> String {
    let mut rows = table(&[
        "NAME",
        "DNS NAMES",
        "SERIAL",
        "NOT AFTER",
        "NEXT RENEWAL",
        "DECIDED BY",
        "STATE",
    ]);
    for certificate in certificates {
        let state = match (&certificate.serial, &certificate.last_error) {
            (_, Some(error)) => format!("failing ({}×): {error}", certificate.failures),
            (Some(_), None) => "ok".to_string(),
            (None, None) => "ordering".to_string(),
        };
        rows.add_row([
            certificate.name.clone(),
            certificate.dns_names.join(", "),
            certificate.serial.clone().unwrap_or_else(|| "-".into()),
            certificate.not_after_unix.map_or_else(
                || "-".into(),
                |unix| format!("{} ({})", at(unix), relative(unix, now)),
            ),
            certificate
                .next_renewal_unix
                .map_or_else(|| "-".into(), |unix| relative(unix, now)),
            match certificate.renewal_source.as_deref() {
                Some("ari") => "CA (ARI)".to_string(),
                Some("lifetime") => "2/3 of the lifetime".to_string(),
                Some(other) => other.to_string(),
                None => "-".to_string(),
            },
            state,
        ]);
    }
    format!("Server-name certificates (ACME)\n{rows}\n")
}

/// The mesh section of `veilctl status`.
pub fn status_section(mesh: &MeshStatus, now: SystemTime) -> String {
    let valid = mesh
        .workloads
        .iter()
        .filter(|w| certificate_state(w, now) == "valid")
        .count();
    let mut text = format!(
        "\nMesh · trust domain {} · {} meshed pod(s) · {valid} valid certificate(s)\n",
        mesh.trust_domain,
        mesh.workloads.len()
    );
    if mesh.connections.is_empty() {
        text.push_str("No meshed connections yet.\n");
        return text;
    }
    let mut rows = table(&["DIRECTION", "TLS", "RESULT", "CONNECTIONS"]);
    for count in &mesh.connections {
        rows.add_row([
            count.direction.clone(),
            count.mode.clone(),
            count.result.clone(),
            count.count.to_string(),
        ]);
    }
    text.push_str(&format!("{rows}\n"));
    text
}

/// `veilctl flows`: the node's recent meshed connections, newest last.
pub fn flows(flows: &[FlowRecord], now: SystemTime) -> String {
    if flows.is_empty() {
        return "No meshed connections yet.\n".into();
    }
    let mut rows = table(&[
        "WHEN",
        "DIRECTION",
        "SOURCE",
        "DESTINATION",
        "TLS",
        "RESULT",
        "BYTES OUT/IN",
    ]);
    for flow in flows {
        rows.add_row([
            relative(flow.unix_time, now),
            flow.direction.clone(),
            flow.source.clone(),
            flow.destination.clone(),
            flow.mode.clone(),
            flow.result.clone(),
            format!("{} / {}", flow.bytes_to_peer, flow.bytes_to_pod),
        ]);
    }
    format!("{} meshed connection(s)\n{rows}\n", flows.len())
}

/// `veilctl mtls`: the effective mode and the chain that produced it.
pub fn mode_report(report: &ModeReport) -> String {
    let target = match report.port {
        Some(port) => format!("{} ({}) port {port}", report.pod, report.ip),
        None => format!("{} ({})", report.pod, report.ip),
    };
    let mut text = format!(
        "{target} on {}: {}\n",
        report.node,
        report.mode.to_uppercase()
    );
    if let Some(identity) = &report.identity {
        text.push_str(&format!("identity {identity}\n"));
    }
    let mut rows = table(&["LEVEL", "SETS", ""]);
    for level in &report.chain {
        rows.add_row([
            level.level.clone(),
            level.mode.as_deref().map_or("-".into(), str::to_uppercase),
            if level.decided {
                "← decides".into()
            } else {
                String::new()
            },
        ]);
    }
    text.push_str(&format!(
        "Precedence: port > workload > namespace > mesh; the first level that sets a mode decides.\n{rows}\n"
    ));
    text
}

#[cfg(test)]
mod tests {
    use veil_api::{MeshCertificate, MeshConnectionCount, ModeLevel};

    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    #[test]
    fn acme_certificates_show_serial_expiry_renewal_source_and_failures() {
        let certificate = |name: &str, serial: Option<&str>, error: Option<&str>| {
            veil_api::AcmeCertificateStatus {
                name: name.into(),
                dns_names: vec![format!("{name}.example.com")],
                serial: serial.map(Into::into),
                not_after_unix: serial.map(|_| NOW + 60 * 86_400),
                next_renewal_unix: serial.map(|_| NOW + 30 * 86_400),
                renewal_source: serial.map(|_| "ari".into()),
                last_error: error.map(Into::into),
                failures: u32::from(error.is_some()) * 3,
            }
        };
        let text = acme_certs(
            &[
                certificate("shop", Some("0a1b"), None),
                certificate("api", None, Some("ACME CA unreachable")),
            ],
            now(),
        );
        assert!(
            text.starts_with("Server-name certificates (ACME)"),
            "{text}"
        );
        let shop = text
            .lines()
            .find(|l| l.contains("shop.example.com"))
            .unwrap();
        assert!(
            shop.contains("0a1b") && shop.contains("CA (ARI)") && shop.contains("ok"),
            "{shop}"
        );
        let api = text
            .lines()
            .find(|l| l.contains("api.example.com"))
            .unwrap();
        assert!(api.contains("failing (3×): ACME CA unreachable"), "{api}");
    }

    fn mesh() -> MeshStatus {
        MeshStatus {
            trust_domain: "cluster.local".into(),
            workloads: vec![
                MeshWorkload {
                    pod: "cart-1".into(),
                    ip: "198.19.1.1".into(),
                    identity: "spiffe://cluster.local/ns/shop/sa/cart".into(),
                    mode: "strict".into(),
                    certificate: Some(MeshCertificate {
                        serial: "0abc".into(),
                        issuer: "local CA (cluster.local)".into(),
                        not_after_unix: NOW + 24 * 3600,
                        renew_at_unix: NOW + 16 * 3600,
                    }),
                    certificate_error: None,
                },
                MeshWorkload {
                    pod: "pay-1".into(),
                    ip: "198.19.1.2".into(),
                    identity: "spiffe://cluster.local/ns/shop/sa/pay".into(),
                    mode: "permissive".into(),
                    certificate: Some(MeshCertificate {
                        serial: "0def".into(),
                        issuer: "local CA (cluster.local)".into(),
                        not_after_unix: NOW + 600,
                        renew_at_unix: NOW - 60,
                    }),
                    certificate_error: Some("CA unreachable".into()),
                },
            ],
            connections: vec![MeshConnectionCount {
                direction: "outbound".into(),
                mode: "userspace".into(),
                result: "ok".into(),
                count: 12,
            }],
        }
    }

    #[test]
    fn certs_show_serial_expiry_renewal_and_state() {
        let text = certs("node1", &mesh(), now());
        let cart = text.lines().find(|l| l.contains("sa/cart")).unwrap();
        for cell in ["0abc", "local CA", "in 1day", "in 16h", "valid"] {
            assert!(cart.contains(cell), "{cell} missing: {cart}");
        }
        let pay = text.lines().find(|l| l.contains("sa/pay")).unwrap();
        assert!(pay.contains("renewal failing: CA unreachable"), "{pay}");
        assert!(pay.contains("1m ago"), "{pay}");
    }

    #[test]
    fn workloads_and_status_summarise_the_mesh() {
        let text = workloads("node1", &mesh());
        let cart = text.lines().find(|l| l.contains("cart-1")).unwrap();
        assert!(
            cart.contains("STRICT") && cart.contains("198.19.1.1"),
            "{cart}"
        );
        let section = status_section(&mesh(), now());
        assert!(
            section.contains("2 meshed pod(s) · 1 valid certificate(s)"),
            "{section}"
        );
        let row = section.lines().find(|l| l.contains("outbound")).unwrap();
        assert!(row.contains("userspace") && row.contains("12"), "{row}");
    }

    #[test]
    fn flows_show_who_talked_to_whom_and_how() {
        let text = flows(
            &[FlowRecord {
                unix_time: NOW - 5,
                direction: "outbound".into(),
                source: "cart-1 (198.19.1.1:40000)".into(),
                destination: "checkout-1 (198.19.2.1:8080)".into(),
                mode: "userspace".into(),
                result: "ok".into(),
                bytes_to_peer: 1024,
                bytes_to_pod: 2048,
            }],
            now(),
        );
        let row = text.lines().find(|l| l.contains("cart-1")).unwrap();
        for cell in [
            "5s ago",
            "outbound",
            "checkout-1",
            "userspace",
            "ok",
            "1024 / 2048",
        ] {
            assert!(row.contains(cell), "{cell} missing: {row}");
        }
        assert_eq!(flows(&[], now()), "No meshed connections yet.\n");
    }

    #[test]
    fn the_mode_report_marks_the_deciding_level() {
        let report = ModeReport {
            pod: "checkout-1".into(),
            ip: "198.19.2.1".into(),
            node: "node2".into(),
            identity: Some("spiffe://cluster.local/ns/shop/sa/checkout".into()),
            port: Some(8080),
            mode: "strict".into(),
            chain: vec![
                ModeLevel {
                    level: "port".into(),
                    mode: None,
                    decided: false,
                },
                ModeLevel {
                    level: "workload".into(),
                    mode: None,
                    decided: false,
                },
                ModeLevel {
                    level: "namespace".into(),
                    mode: Some("strict".into()),
                    decided: true,
                },
                ModeLevel {
                    level: "mesh".into(),
                    mode: Some("permissive".into()),
                    decided: false,
                },
            ],
        };
        let text = mode_report(&report);
        assert!(
            text.starts_with("checkout-1 (198.19.2.1) port 8080 on node2: STRICT"),
            "{text}"
        );
        let namespace = text.lines().find(|l| l.contains("│ namespace")).unwrap();
        assert!(
            namespace.contains("STRICT") && namespace.contains("← decides"),
            "{namespace}"
        );
        let mesh_row = text.lines().find(|l| l.contains("│ mesh")).unwrap();
        assert!(!mesh_row.contains("decides"), "{mesh_row}");
    }
}
