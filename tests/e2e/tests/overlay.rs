//! Veil's eBPF VXLAN overlay on a real test bed: no kernel routes between
//! nodes, only the agents' programs and maps carry pod traffic.

use std::time::{Duration, Instant};

use veil_api::{AgentStatus, HookKind};
use veil_testbed::{Agent, PodRef, Routing, Topology, TopologySpec, require_root, traffic};

const VNI: u32 = 7777;
const TEN_MIB: u64 = 10 * 1024 * 1024;

fn overlay_topology(name: &str) -> Topology {
    Topology::build(
        TopologySpec::new(name)
            .nodes(2)
            .pods_per_node(2)
            .routing(Routing::None),
    )
    .unwrap()
}

fn start_agents(topology: &Topology) -> Vec<Agent> {
    (1..=2)
        .map(|node| Agent::start_overlay(topology, node, VNI).unwrap())
        .collect()
}

fn drops(status: &AgentStatus) -> Vec<(String, u64)> {
    status
        .events
        .iter()
        .filter(|e| e.drop && e.packets > 0)
        .map(|e| (e.event.clone(), e.packets))
        .collect()
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn icmp_tcp_and_udp_cross_nodes_and_stay_local_within_a_node() {
    require_root("overlay traffic test");
    let topology = overlay_topology("ovl");
    let (a, b, c) = (PodRef::new(1, 1), PodRef::new(2, 1), PodRef::new(1, 2));

    // Without agents nothing routes between nodes: the overlay is what carries it.
    assert!(traffic::ping(&topology, a, b.ip(), 1).is_err());

    let agents = start_agents(&topology);
    if let Err(e) = traffic::ping(&topology, a, b.ip(), 3) {
        for agent in &agents {
            eprintln!("{}", agent.veilctl(&["status", "-o", "json"]).unwrap());
            eprintln!("{}", agent.log());
        }
        panic!("{e}");
    }
    traffic::ping(&topology, a, c.ip(), 3).unwrap();
    for (from, to, port) in [(a, b, 7101), (b, a, 7102), (a, c, 7103)] {
        let report = traffic::tcp_echo(&topology, from, to, port, TEN_MIB).unwrap();
        assert_eq!(report.bytes, TEN_MIB, "{from} → {to}");
    }
    assert_eq!(
        traffic::udp_echo(&topology, a, b, 7201, 50, 1200).unwrap(),
        50
    );
    assert_eq!(
        traffic::udp_echo(&topology, a, c, 7202, 50, 1200).unwrap(),
        50
    );

    let node1 = agents[0].status().unwrap();
    let node2 = agents[1].status().unwrap();
    for status in [&node1, &node2] {
        assert!(status.event("encapsulated") > 0, "{status:#?}");
        assert!(status.event("decapsulated") > 0, "{status:#?}");
        assert_eq!(drops(status), [], "no drops on {}", status.node);
        let overlay = status.overlay.as_ref().unwrap();
        assert_eq!(overlay.vni, VNI);
        assert_eq!(overlay.routes.len(), 1, "{overlay:#?}");
        assert_eq!(overlay.endpoints.len(), 2, "{overlay:#?}");
    }
    assert!(
        node1.event("same-node") > 0,
        "a → c stayed on node 1: {node1:#?}"
    );
    // XDP decapsulates frame by frame; the underlay's GRO then merges each
    // flow before TC hands it to the pod, so far fewer packets are delivered
    // than were decapsulated (without GRO they would be equal).
    for status in [&node1, &node2] {
        let decapsulated = status.event("decapsulated");
        let delivered = status
            .counters_for(HookKind::TcIngress, "ul0")
            .map_or(0, |c| c.packets);
        eprintln!(
            "{}: {decapsulated} frames decapsulated, {delivered} packets delivered",
            status.node
        );
        assert!(delivered > 0, "{status:#?}");
        assert!(
            delivered * 2 < decapsulated,
            "GRO merged nothing on {}: {delivered} delivered of {decapsulated}",
            status.node
        );
    }
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn the_collect_md_vxlan_device_encapsulation_carries_the_same_traffic() {
    require_root("overlay traffic test (vxlan-device encapsulation)");
    let topology = overlay_topology("ovlmd");
    let (a, b) = (PodRef::new(1, 1), PodRef::new(2, 1));
    let mut agents: Vec<Agent> = (1..=2)
        .map(|node| {
            Agent::start_overlay_with(
                &topology,
                node,
                VNI,
                // Lands in [overlay], the last table of the generated config.
                "encapsulation = \"vxlan-device\"\n",
            )
            .unwrap()
        })
        .collect();
    let device = |node: usize| {
        topology
            .node(node)
            .ip(&["-d", "-j", "link", "show", "dev", "veil_vxlan"])
    };
    let details = device(1).unwrap();
    assert!(details.contains("\"external\":true"), "{details}");

    traffic::ping(&topology, a, b.ip(), 3).unwrap();
    for (from, to, port) in [(a, b, 7301), (b, a, 7302)] {
        let report = traffic::tcp_echo(&topology, from, to, port, TEN_MIB).unwrap();
        assert_eq!(report.bytes, TEN_MIB, "{from} → {to}");
    }
    for agent in &agents {
        let status = agent.status().unwrap();
        assert!(status.event("encapsulated") > 0, "{status:#?}");
        assert!(status.event("decapsulated") > 0, "{status:#?}");
        assert_eq!(drops(&status), [], "no drops on {}", status.node);
        assert_eq!(status.overlay.unwrap().encapsulation, "vxlan-device");
    }
    // The device went through the kernel's vxlan driver: its tx counters moved.
    let json: serde_json::Value = serde_json::from_str(
        &topology
            .node(1)
            .ip(&["-s", "-j", "link", "show", "dev", "veil_vxlan"])
            .unwrap(),
    )
    .unwrap();
    let sent = json[0]["stats64"]["tx"]["packets"].as_u64().unwrap();
    assert!(sent > 0, "nothing went through veil_vxlan: {json}");

    // The agent owns the device: it is gone once the agent stops.
    assert!(agents[0].stop(), "agent 1 stopped cleanly");
    assert!(device(1).is_err(), "veil_vxlan left behind on node 1");
}

/// Packets the pod's eth0 has received.
fn pod_rx_packets(topology: &Topology, pod: PodRef) -> u64 {
    let json = topology
        .pod(pod)
        .ip(&["-s", "-j", "link", "show", "dev", "eth0"])
        .unwrap();
    let links: serde_json::Value = serde_json::from_str(&json).unwrap();
    links[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
}

/// A VXLAN payload: header with `flags` and `vni`, then `inner` (an Ethernet frame).
fn vxlan_payload(flags: u8, vni: u32, inner: &[u8]) -> Vec<u8> {
    let [_, a, b, c] = vni.to_be_bytes();
    let mut payload = vec![flags, 0, 0, 0, a, b, c, 0];
    payload.extend_from_slice(inner);
    payload
}

/// An inner Ethernet frame carrying a UDP datagram to `dst:9` (discard).
fn inner_udp_frame(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0xbb, 0x02, 0, 0, 0, 0, 0xaa, 0x08, 0x00];
    let payload = b"veil-malformed-test";
    let total = 20 + 8 + payload.len();
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0,
        0,
        64,
        17,
        0,
        0,
    ];
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let check = !(sum as u16);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    frame.extend_from_slice(&ip);
    let udp_len = (8 + payload.len()) as u16;
    frame.extend_from_slice(&[0x30, 0x39, 0, 9]);
    frame.extend_from_slice(&udp_len.to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    frame
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn malformed_vxlan_is_dropped_and_counted_by_reason_and_never_reaches_a_pod() {
    require_root("overlay malformed-packet test");
    let topology = overlay_topology("bad");
    let agents = start_agents(&topology);
    let target = PodRef::new(2, 1);
    let node2 = &agents[1];
    let (src, dst) = (PodRef::new(1, 1).ip().octets(), target.ip().octets());
    let good_inner = inner_udp_frame(src, dst);
    let arp_inner = {
        let mut frame = good_inner[..12].to_vec();
        frame.extend_from_slice(&[0x08, 0x06]);
        frame.extend_from_slice(&[0u8; 28]);
        frame
    };
    // Crafted on the underlay: node 1 sends raw VXLAN payloads to node 2's port 4789.
    let sender = topology
        .node(1)
        .run(|| std::net::UdpSocket::bind("198.18.0.1:0"))
        .unwrap()
        .unwrap();
    let send = |payload: &[u8]| {
        sender.send_to(payload, "198.18.0.2:4789").unwrap();
        std::thread::sleep(Duration::from_millis(100));
    };

    let cases: [(&str, Vec<u8>); 6] = [
        ("drop-wrong-vni", vxlan_payload(0x08, VNI + 1, &good_inner)),
        ("drop-malformed", vxlan_payload(0x00, VNI, &good_inner)),
        (
            "drop-truncated",
            vxlan_payload(0x08, VNI, &good_inner[..10]),
        ),
        ("drop-inner-not-ipv4", vxlan_payload(0x08, VNI, &arp_inner)),
        (
            "drop-unknown-destination",
            vxlan_payload(0x08, VNI, &inner_udp_frame(src, [198, 19, 2, 99])),
        ),
        // Larger than the underlay MTU: the kernel fragments it, and the first
        // fragment (the one with the VXLAN port) must not be decapsulated.
        ("drop-malformed", vxlan_payload(0x08, VNI, &[0u8; 3000])),
    ];
    let pod_rx_before = pod_rx_packets(&topology, target);
    for (reason, payload) in &cases {
        let before = node2.status().unwrap();
        send(payload);
        let after = node2.status().unwrap();
        assert_eq!(
            after.event(reason) - before.event(reason),
            1,
            "{reason}: {:#?}",
            after.events
        );
        assert_eq!(
            after.event("decapsulated"),
            before.event("decapsulated"),
            "{reason}"
        );
    }
    assert_eq!(
        pod_rx_packets(&topology, target),
        pod_rx_before,
        "a pod saw a bad frame"
    );

    // The same frame with the right VNI does reach the pod: the checks above
    // failed for their reasons, not because nothing gets through.
    let before = node2.status().unwrap();
    send(&vxlan_payload(0x08, VNI, &good_inner));
    let after = node2.status().unwrap();
    assert_eq!(
        after.event("decapsulated") - before.event("decapsulated"),
        1
    );
    // (It may also receive an ARP reply while answering with an ICMP error.)
    assert!(pod_rx_packets(&topology, target) > pod_rx_before);
    assert_eq!(node2.status().unwrap().event("drop-wrong-vni"), 1);
    // The same counts reach Prometheus, by reason.
    assert_eq!(
        node2
            .metric("veil_datapath_drops_total{reason=\"wrong-vni\"}")
            .unwrap(),
        Some(1.0)
    );
    assert_eq!(
        node2
            .metric("veil_datapath_drops_total{reason=\"malformed\"}")
            .unwrap(),
        Some(2.0)
    );
}

#[test]
#[ignore = "needs root (network namespaces, eBPF) and tcpdump: cargo xtask test runs it"]
fn a_capture_on_the_underlay_shows_our_vni_and_flow_hashed_source_ports() {
    require_root("overlay capture test");
    veil_testbed::require_program("tcpdump", "overlay capture test");
    let topology = overlay_topology("cap");
    let _agents = start_agents(&topology);
    let capture_file = topology.workdir().join("underlay.pcap");
    let mut tcpdump = topology.node(1).command("tcpdump");
    tcpdump
        // -Z root: Debian's tcpdump would drop to its own user and fail to write.
        .args([
            "-n",
            "-i",
            "ul0",
            "-c",
            "200",
            "-U",
            "--immediate-mode",
            "-Z",
            "root",
            "-w",
        ])
        .arg(&capture_file)
        .args(["udp", "port", "4789"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(topology.workdir().join("tcpdump.log")).unwrap());
    let mut capture =
        veil_testbed::process::ChildGuard::spawn("tcpdump on node 1", tcpdump).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for port in 7301..7309 {
        traffic::tcp_echo(&topology, PodRef::new(1, 1), PodRef::new(2, 1), port, 4096).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    capture.stop();

    let text = std::process::Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(&capture_file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}{}",
        String::from_utf8_lossy(&text.stdout),
        String::from_utf8_lossy(&text.stderr),
        std::fs::read_to_string(topology.workdir().join("tcpdump.log")).unwrap_or_default()
    );
    let mut source_ports = std::collections::BTreeSet::new();
    let mut frames = 0;
    for line in text
        .lines()
        .filter(|l| l.contains("198.18.0.1.") && l.contains("> 198.18.0.2.4789"))
    {
        frames += 1;
        assert!(line.contains(&format!("vni {VNI}")), "{line}");
        let port: u16 = line
            .split("198.18.0.1.")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no source port in {line}"));
        assert!(
            port >= 49152,
            "source port {port} outside 49152-65535: {line}"
        );
        source_ports.insert(port);
    }
    assert!(frames >= 16, "only {frames} VXLAN frames captured:\n{text}");
    assert!(
        source_ports.len() >= 4,
        "8 flows should spread over several source ports, got {source_ports:?}"
    );
}

/// How many times the agent planned and applied its overlay so far.
fn plans(agent: &Agent) -> u64 {
    agent
        .status()
        .unwrap()
        .overlay
        .expect("an overlay agent reports its overlay")
        .plans
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn a_steady_inventory_is_planned_once_and_only_a_real_change_plans_again() {
    require_root("overlay steady-state test");
    let mut topology = overlay_topology("calm");
    let agents = start_agents(&topology);
    let started: Vec<u64> = agents.iter().map(plans).collect();
    assert!(
        started.iter().all(|&p| p >= 1),
        "an agent reports no plan applied after start: {started:?}"
    );

    // A minute of a steady inventory, with a rewrite of the file that
    // changes nothing it says: nothing is planned again.
    let text = std::fs::read_to_string(topology.inventory_path()).unwrap();
    std::thread::sleep(Duration::from_secs(30));
    topology
        .write_inventory_text(&format!("# rewritten, same content\n{text}"))
        .unwrap();
    std::thread::sleep(Duration::from_secs(30));
    let steady: Vec<u64> = agents.iter().map(plans).collect();
    assert_eq!(
        steady, started,
        "the agents planned again while nothing changed for 60 s"
    );
    assert_eq!(
        agents[0].metric("veil_overlay_plans_total").unwrap(),
        Some(started[0] as f64),
        "the metric and the status disagree"
    );

    // A real change (a pod moves) is planned at once on both nodes.
    topology.move_pod(PodRef::new(2, 2), 1).unwrap();
    topology.write_inventory().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now: Vec<u64> = agents.iter().map(plans).collect();
        if now.iter().zip(&started).all(|(now, before)| now > before) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a moved pod was not planned within 5 s: {started:?} → {now:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn moving_a_pod_updates_the_maps_live_and_leaves_other_flows_alone() {
    require_root("overlay live-update test");
    let mut topology = overlay_topology("mov");
    let agents = start_agents(&topology);
    let (a, b, moving) = (PodRef::new(1, 1), PodRef::new(2, 1), PodRef::new(2, 2));
    let programs_before: Vec<_> = agents
        .iter()
        .map(|a| a.status().unwrap().programs)
        .collect();

    // An established flow a ↔ b, kept open across the move.
    let listener = topology
        .pod(b)
        .run(move || std::net::TcpListener::bind((b.ip(), 7401)))
        .unwrap()
        .unwrap();
    let mut client = topology
        .pod(a)
        .run(move || std::net::TcpStream::connect((b.ip(), 7401)))
        .unwrap()
        .unwrap();
    let (mut server, _) = listener.accept().unwrap();
    let exchange = |client: &mut std::net::TcpStream, server: &mut std::net::TcpStream| {
        use std::io::{Read, Write};
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).unwrap();
        server.write_all(&buf).unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    };
    exchange(&mut client, &mut server);
    traffic::ping(&topology, b, moving.ip(), 1).unwrap();

    topology.move_pod(moving, 1).unwrap();
    topology.write_inventory().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let node1 = agents[0].status().unwrap();
        let node2 = agents[1].status().unwrap();
        let local_on_1 = node1
            .overlay
            .as_ref()
            .is_some_and(|o| o.endpoints.iter().any(|e| e.ip == moving.ip().to_string()));
        let routed_from_2 = node2.overlay.as_ref().is_some_and(|o| {
            o.routes
                .iter()
                .any(|r| r.cidr == format!("{}/32", moving.ip()))
        });
        if local_on_1 && routed_from_2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "maps not updated in 5 s:\n{node1:#?}\n{node2:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its old neighbour now reaches it across the nodes; a node-1 pod reaches it locally.
    traffic::ping(&topology, b, moving.ip(), 2).unwrap();
    traffic::ping(&topology, a, moving.ip(), 2).unwrap();
    traffic::tcp_echo(&topology, b, moving, 7402, 1024 * 1024).unwrap();
    // The established flow never noticed, and no program was reloaded or re-attached.
    exchange(&mut client, &mut server);
    for (agent, before) in agents.iter().zip(&programs_before) {
        let after = agent.status().unwrap().programs;
        for program in before {
            if program.interface != "vp2" {
                assert!(after.contains(program), "{program:?} changed: {after:?}");
            }
        }
    }
    let node1 = agents[0].status().unwrap();
    assert!(
        node1.programs.iter().any(|p| p.interface == "v2p2"),
        "{node1:#?}"
    );
    assert!(
        !agents[1]
            .status()
            .unwrap()
            .programs
            .iter()
            .any(|p| p.interface == "vp2")
    );

    // A broken inventory is refused with its line; the last good state stays
    // in force, and readiness and metrics say so.
    topology
        .write_inventory_text("[[nodes]]\nname = \"node1\"\nunderlay_ip = \"not-an-ip\"\n")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let error = loop {
        let status = agents[0].status().unwrap();
        if let Some(error) = status.overlay.and_then(|o| o.inventory_error) {
            break error;
        }
        assert!(Instant::now() < deadline, "broken inventory not reported");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(error.contains("line 3"), "{error}");
    assert!(
        agents[0]
            .veilctl(&["status"])
            .unwrap()
            .contains("inventory refused")
    );
    let (code, body) = agents[0]
        .http_get(veil_api::DEFAULT_READINESS_PORT, veil_api::READINESS_PATH)
        .unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("inventory refused"), "{body}");
    assert_eq!(
        agents[0].metric("veil_overlay_inventory_valid").unwrap(),
        Some(0.0)
    );
    let (code, report) = agents[0].veilctl_exit(&["check"]).unwrap();
    assert_eq!(code, 3, "check exits 3 when it finds problems:\n{report}");
    assert!(report.contains("inventory is refused"), "{report}");
    traffic::ping(&topology, b, moving.ip(), 1).unwrap();
    exchange(&mut client, &mut server);
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn a_too_big_packet_gets_fragmentation_needed_so_path_mtu_discovery_works() {
    require_root("overlay path-MTU test");
    let topology = overlay_topology("pmtu");
    let _agents = start_agents(&topology);
    let (a, b) = (PodRef::new(1, 1), PodRef::new(2, 1));
    // Misconfigure the client pod's link as if it sat on the underlay directly
    // (both ends: a veth drops frames larger than its receiving end's MTU).
    topology
        .pod(a)
        .ip(&["link", "set", "eth0", "mtu", "1500"])
        .unwrap();
    topology
        .node(1)
        .ip(&["link", "set", "vp1", "mtu", "1500"])
        .unwrap();
    let ping = |size: &str| {
        let output = topology
            .pod(a)
            .command("ping")
            .args(["-n", "-c", "1", "-W", "2", "-M", "do", "-s", size])
            .arg(b.ip().to_string())
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    };
    let first = ping("1472");
    assert!(
        first.contains("Frag needed and DF set (mtu = 1450)"),
        "{first}"
    );
    // The sender learnt the path MTU: it now refuses locally, and what fits gets through.
    let second = ping("1472");
    assert!(
        second.contains("mtu=1450") || second.contains("mtu = 1450"),
        "{second}"
    );
    let fits = ping("1422");
    assert!(fits.contains("1 received"), "{fits}");
    // `veilctl check` names the misconfigured pod veth and the MTU to use.
    let (code, report) = _agents[0].veilctl_exit(&["check"]).unwrap();
    assert_eq!(code, 3, "{report}");
    assert!(
        report.contains("MTU mismatch: pod veth vp1 has MTU 1500") && report.contains("MTU 1450"),
        "{report}"
    );
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn veilctl_check_finds_an_underlay_mtu_mismatch_and_a_detached_xdp_program() {
    require_root("veilctl check test");
    let topology = overlay_topology("chk");
    let agents = start_agents(&topology);
    let (code, report) = agents[0].veilctl_exit(&["check"]).unwrap();
    assert!(
        !report.contains("MTU mismatch"),
        "a fresh bed is consistent:\n{report}"
    );
    let _ = code;

    // The underlay shrinks under the agent's feet.
    topology
        .node(1)
        .ip(&["link", "set", "ul0", "mtu", "1400"])
        .unwrap();
    let (code, report) = agents[0].veilctl_exit(&["check"]).unwrap();
    assert_eq!(code, 3, "{report}");
    assert!(
        report.contains(
            "MTU mismatch: the underlay ul0 has MTU 1400, but overlay.underlay_mtu = 1500"
        ) && report.contains("overlay.underlay_mtu = 1400"),
        "{report}"
    );

    // Node 2's underlay is deleted and made again: the XDP program went with
    // the old interface.
    topology.node(2).ip(&["link", "del", "ul0"]).unwrap();
    topology
        .node(2)
        .ip(&[
            "link", "add", "ul0", "type", "veth", "peer", "name", "ul0-peer",
        ])
        .unwrap();
    let (code, report) = agents[1].veilctl_exit(&["check"]).unwrap();
    assert_eq!(code, 3, "{report}");
    assert!(
        report.contains("veil_underlay_ingress on ul0 is detached: interface ul0 was recreated")
            && report.contains("restart the agent"),
        "{report}"
    );
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn a_pod_veth_recreated_under_the_same_name_gets_the_program_again() {
    require_root("recreated veth test");
    let mut topology = overlay_topology("reveth");
    let agents = start_agents(&topology);
    let (a, b) = (PodRef::new(1, 1), PodRef::new(2, 1));
    traffic::ping(&topology, a, b.ip(), 1).unwrap();
    let before = agents[0]
        .status()
        .unwrap()
        .programs
        .into_iter()
        .find(|p| p.interface == "vp1")
        .unwrap()
        .ifindex;
    // Away and back before the agent's next sync: same name, new interface
    // (as when a pod's sandbox is recreated); the inventory never changed.
    topology.move_pod(a, 2).unwrap();
    topology.move_pod(a, 1).unwrap();
    // The pod's new eth0 has a new MAC, which the inventory must say (on
    // Kubernetes the agent learns it from the neighbour table).
    topology.write_inventory().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // (Absent for a moment if a sync ran while vp1 did not exist.)
        let program = agents[0]
            .status()
            .unwrap()
            .programs
            .into_iter()
            .find(|p| p.interface == "vp1");
        if let Some(program) = program.filter(|p| p.ifindex != before) {
            assert_eq!(program.detached, None, "{program:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the program was not attached to the new vp1"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Once the maps carry the new pod MAC (from the rewritten inventory),
    // traffic across nodes proves the program runs: only it encapsulates.
    let mac = veil_testbed::inventory::link_mac(&topology.pod(a), "eth0").unwrap();
    while !agents[0]
        .status()
        .unwrap()
        .overlay
        .unwrap()
        .endpoints
        .iter()
        .any(|e| e.ip == a.ip().to_string() && e.pod_mac == mac)
    {
        assert!(
            Instant::now() < deadline,
            "the new pod MAC never reached the maps"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    traffic::ping(&topology, a, b.ip(), 3).unwrap();
}
