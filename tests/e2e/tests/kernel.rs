//! The agent on the kernel it finds.
//!
//! - Every optional kernel feature, switched off with the test-only
//!   `VEIL_TEST_DISABLE_FEATURES`, makes the agent take the fallback it names
//!   (status, metrics, log) and the overlay and the mesh still carry traffic.
//! - A required feature switched off stops the agent with a message that
//!   names it.
//! - mTLS sessions go to kernel TLS exactly where the kernel has the TLS ULP:
//!   the expected mode comes from the kernel, so on a host without kTLS these
//!   tests check userspace, and in the qemu VM on Debian's kernels (`cargo
//!   xtask vm-test`) they check kTLS, with the kernel's own TLS counters as
//!   proof, and a kTLS agent against one forced to userspace both ways.

use std::collections::BTreeSet;

use veil_api::AgentStatus;
use veil_e2e::mesh_bed::{
    CART, CHECKOUT, MIB, MeshBed, OUTSIDER, PAYMENTS, VNI, expected_mode, marker_exchange,
};
use veil_testbed::{Agent, Routing, Topology, TopologySpec, require_root, traffic};

const DISABLE: &str = "VEIL_TEST_DISABLE_FEATURES";

/// Each optional feature, the decision it drives and the fallback taken
/// without it.
const OPTIONAL: [(&str, &str, &str); 6] = [
    ("xdp-native", "xdp-attach", "generic"),
    ("xdp-metadata", "delivery", "lookup"),
    ("redirect-peer", "pod-entry", "veth"),
    ("tcx", "tc-attach", "netlink"),
    ("sk-lookup", "time-wait-takeover", "none"),
    ("tls-ulp", "mtls-records", "userspace"),
];

fn kernel_of(status: &AgentStatus) -> &veil_api::KernelStatus {
    status
        .kernel
        .as_ref()
        .unwrap_or_else(|| panic!("the agent reports no kernel: {status:#?}"))
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn each_optional_feature_switched_off_takes_its_named_fallback_and_traffic_still_flows() {
    require_root("kernel feature fallback test");
    for (index, (feature, decision, fallback)) in OPTIONAL.into_iter().enumerate() {
        let bed = MeshBed::start_custom_env(
            &format!("kf{index}"),
            "",
            |_, _| String::new(),
            &[(DISABLE, feature)],
        );
        for agent in &bed.agents {
            let status = agent.status().unwrap();
            let kernel = kernel_of(&status);
            if index == 0 {
                // The cases here are every optional feature the agent has.
                let optional: BTreeSet<&str> = kernel
                    .features
                    .iter()
                    .filter(|f| !f.required)
                    .map(|f| f.name.as_str())
                    .collect();
                assert_eq!(
                    optional,
                    OPTIONAL.iter().map(|(f, _, _)| *f).collect(),
                    "a new optional feature needs its case here"
                );
            }
            let probed = kernel
                .features
                .iter()
                .find(|f| f.name == feature)
                .unwrap_or_else(|| panic!("{feature} not reported: {kernel:#?}"));
            assert!(
                !probed.available && probed.forced_off && probed.fallback.is_some(),
                "{probed:?}"
            );
            let choice = kernel
                .choices
                .iter()
                .find(|c| c.decision == decision)
                .unwrap_or_else(|| panic!("no {decision} decision: {kernel:#?}"));
            assert_eq!(choice.chosen, fallback, "{choice:?}");
            assert!(
                choice.fallback && choice.reason.contains("switched off"),
                "{choice:?}"
            );
            let series = format!(
                r#"veil_datapath_choice{{decision="{decision}",chosen="{fallback}",fallback="true"}}"#
            );
            assert_eq!(agent.metric(&series).unwrap(), Some(1.0), "{series}");
            let table = agent.veilctl(&["status"]).unwrap();
            assert!(
                table.contains(&format!("{feature} (switched off)"))
                    && table.contains(&format!("{fallback} (fallback)")),
                "{table}"
            );
            assert!(
                agent.log().contains("datapath fallback")
                    && agent.log().contains(&format!("decision={decision}")),
                "the fallback must be logged:\n{}",
                agent.log()
            );
        }
        // The overlay: plaintext TCP and UDP between nodes, outside the mesh.
        let topology = &bed.topology;
        let report = traffic::tcp_echo(topology, OUTSIDER, PAYMENTS, 7601, MIB)
            .unwrap_or_else(|e| panic!("{feature} off: {e}\n{}", bed.dump()));
        assert_eq!(report.bytes, MIB);
        assert_eq!(
            traffic::udp_echo(topology, OUTSIDER, PAYMENTS, 7602, 20, 1000).unwrap(),
            20,
            "{feature} off"
        );
        // The mesh: a meshed connection across nodes.
        marker_exchange(topology, CART, CHECKOUT, 7603);
        let mode = if feature == "tls-ulp" {
            "userspace"
        } else {
            expected_mode()
        };
        let series = format!(
            r#"veil_mesh_connections_total{{direction="outbound",mode="{mode}",result="ok"}}"#
        );
        assert_eq!(bed.metric(1, &series), 1.0, "{feature} off: {series}");
    }
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn a_required_feature_switched_off_stops_the_agent_with_its_name() {
    require_root("kernel feature refusal test");
    let topology = Topology::build(
        TopologySpec::new("kfreq")
            .nodes(1)
            .pods_per_node(1)
            .routing(Routing::None),
    )
    .unwrap();
    let error =
        match Agent::start_overlay_with_env(&topology, 1, VNI, "", &[(DISABLE, "sk-assign")]) {
            Ok(_) => panic!("the agent started without bpf_sk_assign"),
            Err(error) => error.to_string(),
        };
    assert!(
        error.contains("switches off sk-assign, which the datapath cannot do without"),
        "{error}"
    );
    let error = match Agent::start_overlay_with_env(&topology, 1, VNI, "", &[(DISABLE, "bogus")]) {
        Ok(_) => panic!("the agent started with an unknown feature switched off"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("names `bogus`, which is no feature the agent probes"),
        "{error}"
    );
}

/// `TlsTxSw` and `TlsRxSw` of node `node`'s network namespace: sessions the
/// kernel's TLS took on (zero where it has none).
fn kernel_tls_sessions(bed: &MeshBed, node: usize) -> (u64, u64) {
    let stat = bed
        .topology
        .node(node)
        .run(|| std::fs::read_to_string("/proc/thread-self/net/tls_stat").unwrap_or_default())
        .unwrap();
    let counter = |name: &str| {
        stat.lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next() == Some(name)).then(|| fields.next()?.parse().ok())?
            })
            .unwrap_or(0)
    };
    (counter("TlsTxSw"), counter("TlsRxSw"))
}

/// The mode of the last flow `node` recorded between `from` and `to`.
fn flow_mode(bed: &MeshBed, node: usize, direction: &str, bytes: u64) -> String {
    let flows: serde_json::Value = serde_json::from_str(
        &bed.agents[node - 1]
            .veilctl(&["flows", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    flows
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|f| f["direction"] == direction && f["bytes_to_peer"].as_u64() == Some(bytes))
        .unwrap_or_else(|| panic!("no {direction} flow of {bytes} bytes on node {node}: {flows:#}"))
        ["mode"]
        .as_str()
        .unwrap()
        .to_string()
}

fn mtls_records(agent: &Agent) -> veil_api::DatapathChoice {
    let status = agent.status().unwrap();
    kernel_of(&status)
        .choices
        .iter()
        .find(|c| c.decision == "mtls-records")
        .cloned()
        .unwrap_or_else(|| panic!("no mtls-records decision: {status:#?}"))
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn meshed_sessions_go_to_kernel_tls_exactly_where_the_kernel_has_it() {
    require_root("kernel TLS test");
    let bed = MeshBed::start("ktls");
    let kernel_tls = veil_mtls::ktls::kernel_supports_tls();
    let before = [kernel_tls_sessions(&bed, 1), kernel_tls_sessions(&bed, 2)];
    // 16 MiB each way, byte for byte, each side half-closing.
    let bytes = 16 * MIB;
    let report = traffic::tcp_echo(&bed.topology, CART, CHECKOUT, 7701, bytes)
        .unwrap_or_else(|e| panic!("{e}\n{}", bed.dump()));
    assert_eq!(report.bytes, bytes);
    let after = [kernel_tls_sessions(&bed, 1), kernel_tls_sessions(&bed, 2)];
    for node in [1, 2] {
        let (direction, peer_bytes) = if node == 1 {
            ("outbound", bytes)
        } else {
            ("inbound", bytes)
        };
        assert_eq!(
            flow_mode(&bed, node, direction, peer_bytes),
            expected_mode(),
            "node {node}"
        );
        let series = format!(
            r#"veil_mesh_connections_total{{direction="{direction}",mode="{}",result="ok"}}"#,
            expected_mode()
        );
        assert_eq!(bed.metric(node, &series), 1.0, "node {node}: {series}");
        assert_eq!(mtls_records(&bed.agents[node - 1]).chosen, expected_mode());
        let (tx, rx) = (
            after[node - 1].0 - before[node - 1].0,
            after[node - 1].1 - before[node - 1].1,
        );
        if kernel_tls {
            // The kernel did the record layer on both ends of the session.
            assert!(
                tx >= 1 && rx >= 1,
                "node {node}: TlsTxSw +{tx}, TlsRxSw +{rx}"
            );
        } else {
            assert_eq!((tx, rx), (0, 0), "node {node} has no kernel TLS");
        }
    }
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn a_kernel_tls_agent_and_one_forced_to_userspace_carry_sessions_both_ways() {
    require_root("mixed kernel/userspace TLS test");
    // Node 2's agent keeps every session in rustls whatever the kernel has.
    let bed = MeshBed::start_custom("ktlsmix", "", |_, node| {
        if node == 2 {
            "kernel_tls = \"off\"\n".into()
        } else {
            String::new()
        }
    });
    let choice = mtls_records(&bed.agents[1]);
    assert_eq!(choice.chosen, "userspace");
    if veil_mtls::ktls::kernel_supports_tls() {
        assert!(choice.reason.contains("kernel_tls = \"off\""), "{choice:?}");
    }
    assert_eq!(mtls_records(&bed.agents[0]).chosen, expected_mode());
    let before = [kernel_tls_sessions(&bed, 1), kernel_tls_sessions(&bed, 2)];
    let bytes = 4 * MIB;
    // Node 1 → node 2, then node 2 → node 1.
    traffic::tcp_echo(&bed.topology, CART, CHECKOUT, 7711, bytes)
        .unwrap_or_else(|e| panic!("kernel → userspace: {e}\n{}", bed.dump()));
    traffic::tcp_echo(&bed.topology, PAYMENTS, CART, 7712, bytes + 1)
        .unwrap_or_else(|e| panic!("userspace → kernel: {e}\n{}", bed.dump()));
    assert_eq!(flow_mode(&bed, 1, "outbound", bytes), expected_mode());
    assert_eq!(flow_mode(&bed, 2, "inbound", bytes), "userspace");
    assert_eq!(flow_mode(&bed, 2, "outbound", bytes + 1), "userspace");
    assert_eq!(flow_mode(&bed, 1, "inbound", bytes + 1), expected_mode());
    let after = [kernel_tls_sessions(&bed, 1), kernel_tls_sessions(&bed, 2)];
    assert_eq!(after[1], before[1], "node 2 is forced to userspace");
    if veil_mtls::ktls::kernel_supports_tls() {
        assert!(
            after[0].0 >= before[0].0 + 2 && after[0].1 >= before[0].1 + 2,
            "node 1 took both sessions into the kernel: {before:?} → {after:?}"
        );
    }
}
