//! The first datapath slice: XDP on the underlay and TC on pod veths count real traffic.

use std::time::Duration;

use veil_api::HookKind;
use veil_testbed::{Agent, PodRef, Topology, TopologySpec, require_root, traffic};

const TRANSFER_BYTES: u64 = 2 * 1024 * 1024;

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn counters_move_when_pods_on_two_nodes_talk() {
    require_root("datapath counter test");
    let topology = Topology::build(TopologySpec::new("ctr").nodes(2).pods_per_node(2)).unwrap();
    let agents: Vec<Agent> = (1..=2)
        .map(|n| Agent::start(&topology, n).unwrap())
        .collect();

    // Every program is attached where the config says, and says how.
    for agent in &agents {
        let status = agent.status().unwrap();
        assert_eq!(status.node, format!("node{}", agent.node()));
        let xdp = status
            .programs
            .iter()
            .find(|p| p.hook == HookKind::Xdp)
            .expect("xdp program listed");
        assert_eq!(xdp.interface, "ul0");
        assert_eq!(xdp.mode, "native", "veth supports native XDP");
        let sk_lookup: Vec<(&str, &str)> = status
            .programs
            .iter()
            .filter(|p| p.hook == HookKind::SkLookup)
            .map(|p| (p.name.as_str(), p.interface.as_str()))
            .collect();
        assert_eq!(sk_lookup, [("veil_mesh_time_wait", "netns")]);
        let tc: Vec<(&str, &str)> = status
            .programs
            .iter()
            .filter(|p| p.hook == HookKind::TcIngress)
            .map(|p| (p.name.as_str(), p.interface.as_str()))
            .collect();
        assert_eq!(
            tc,
            [
                ("veil_underlay_deliver", "ul0"),
                ("veil_pod_egress", "vp1"),
                ("veil_pod_egress", "vp2")
            ]
        );
    }

    let client = PodRef::new(1, 1);
    let server = PodRef::new(2, 1);
    traffic::ping(&topology, client, server.ip(), 3).unwrap();
    let report = traffic::tcp_echo(&topology, client, server, 7001, TRANSFER_BYTES).unwrap();
    assert_eq!(report.bytes, TRANSFER_BYTES);

    // Node 1: the client's veth saw the request bytes leave the pod; the
    // underlay saw the echo come back. Node 2: the mirror image.
    let node1 = agents[0].status().unwrap();
    let node2 = agents[1].status().unwrap();
    for (status, veth) in [(&node1, "vp1"), (&node2, "vp1")] {
        let tc = status
            .counters_for(HookKind::TcIngress, veth)
            .unwrap_or_else(|| panic!("no tc counters on {veth} of {}: {status:?}", status.node));
        assert!(tc.bytes >= TRANSFER_BYTES, "{} {veth}: {tc:?}", status.node);
        let xdp = status
            .counters_for(HookKind::Xdp, "ul0")
            .unwrap_or_else(|| panic!("no xdp counters on {}: {status:?}", status.node));
        assert!(xdp.bytes >= TRANSFER_BYTES, "{} ul0: {xdp:?}", status.node);
        // Native XDP on veth sees MTU-sized frames, never GSO super-packets.
        assert!(
            xdp.packets >= TRANSFER_BYTES / u64::from(topology.spec().underlay_mtu),
            "{} ul0: {xdp:?}",
            status.node
        );
    }
    // The idle pod on each node sent nothing.
    assert!(
        node1.counters_for(HookKind::TcIngress, "vp2").is_none(),
        "{node1:?}"
    );

    // The programs' own log lines (aya-log) reach the agent's log.
    for agent in &agents {
        agent
            .wait_for_log(
                "underlay xdp: first packet on ifindex",
                Duration::from_secs(5),
            )
            .unwrap();
        agent
            .wait_for_log(
                "pod egress tc: first packet on ifindex",
                Duration::from_secs(5),
            )
            .unwrap();
    }

    // Prometheus sees what the kernel counted; the agent says it is ready.
    for agent in &agents {
        let xdp_bytes = agent
            .metric("veil_datapath_bytes_total{hook=\"xdp\",interface=\"ul0\"}")
            .unwrap()
            .expect("xdp byte counter exported");
        assert!(xdp_bytes >= TRANSFER_BYTES as f64, "{xdp_bytes}");
        // Attached the way the agent found this kernel attaches TC.
        let status = agent.status().unwrap();
        let tc_mode = status
            .kernel
            .as_ref()
            .and_then(|k| k.chosen("tc-attach"))
            .expect("a tc-attach decision")
            .to_string();
        let attached = agent
            .metric(&format!(
                "veil_datapath_programs_attached{{hook=\"tc-ingress\",interface=\"vp1\",mode=\"{tc_mode}\"}}"
            ))
            .unwrap();
        assert_eq!(attached, Some(1.0), "{tc_mode}");
        assert_eq!(
            agent
                .http_get(veil_api::DEFAULT_READINESS_PORT, veil_api::READINESS_PATH)
                .unwrap(),
            (200, "ready\n".to_string())
        );
    }

    // A healthy node: `veilctl check` finds nothing worse than the host's
    // lack of kernel TLS, and exits 0.
    let (code, report) = agents[0].veilctl_exit(&["check", "-o", "json"]).unwrap();
    assert_eq!(code, 0, "{report}");
    let findings: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(
        findings
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["severity"] == "info"),
        "{report}"
    );

    // The table view shows the same programs.
    let table = agents[0].veilctl(&["status"]).unwrap();
    assert!(table.contains("veil_underlay_ingress"), "{table}");
    assert!(table.contains("veil_pod_egress"), "{table}");
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn agent_stops_cleanly_and_detaches_on_sigterm() {
    require_root("agent shutdown test");
    let topology = Topology::build(TopologySpec::new("stop").nodes(1).pods_per_node(1)).unwrap();
    let mut agent = Agent::start(&topology, 1).unwrap();
    assert!(
        agent.stop(),
        "agent exits 0 on SIGTERM; log:\n{}",
        agent.log()
    );
    let links = topology.node(1).ip(&["link", "show", "ul0"]).unwrap();
    assert!(
        !links.contains("xdp"),
        "xdp still attached after the agent stopped: {links}"
    );
    assert!(
        agent.log().contains("detaching programs"),
        "{}",
        agent.log()
    );
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn a_stale_topology_is_cleaned_before_a_new_one_is_built() {
    require_root("stale test bed test");
    // What a run that died without its teardown leaves: namespaces with our prefix.
    veil_testbed::netns::NetNs::create("veil-stale-n1").unwrap();
    veil_testbed::netns::NetNs::create("veil-stale-ul").unwrap();
    let second = Topology::build(TopologySpec::new("stale").nodes(1)).unwrap();
    traffic::ping(
        &second,
        PodRef::new(1, 1),
        veil_testbed::addressing::node_pod_gateway(1),
        1,
    )
    .unwrap();
    drop(second);
    assert!(veil_testbed::netns::existing_with_prefix("veil-stale-").is_empty());
}
