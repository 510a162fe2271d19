//! Transparent mTLS on a real test bed: meshed pods on different nodes talk
//! through their agents (eBPF steering → :15001 → mTLS → :15008 → pod), the
//! applications unchanged, on [`veil_e2e::mesh_bed`]'s two nodes × two pods.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use rustls::{ClientConnection, pki_types::ServerName};
use veil_agent::mesh::names::sni_for;
use veil_e2e::mesh_bed::{
    CART, CHECKOUT, HeldConnection, MARKER, MIB, MeshBed, OUTSIDER, PAYMENTS, TRUST_DOMAIN,
    expected_mode, expected_mode_log, listen_in, marker_exchange,
};
use veil_identity::{CertificateAuthority, SpiffeId, WorkloadKey, ca::DEFAULT_LEAF_LIFETIME};
use veil_mtls::{
    Preface, TlsSettings, WorkloadCredentials, handshake,
    verifier::{ExpectedPeer, TrustState},
};
use veil_testbed::{
    Agent, PodMesh, PodRef, Topology, process::ChildGuard, require_root, traffic, try_wait_for,
    wait_for,
};

/// A connection from `source` (a fixed port, SO_REUSEADDR) to
/// `destination`, made in the calling thread's namespace.
fn connect_from(source: SocketAddr, destination: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, sockopt};
    let v4 = |address: SocketAddr| match address {
        SocketAddr::V4(v4) => SockaddrIn::from(v4),
        SocketAddr::V6(_) => panic!("the test bed is IPv4"),
    };
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::bind(fd.as_raw_fd(), &v4(source))?;
    socket::connect(fd.as_raw_fd(), &v4(destination))?;
    Ok(TcpStream::from(fd))
}

/// `TCPSynRetrans` of the calling thread's network namespace.
fn syn_retransmissions() -> u64 {
    let netstat = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap();
    let mut tcp_ext = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (tcp_ext.next().unwrap(), tcp_ext.next().unwrap());
    let index = names
        .split_whitespace()
        .position(|name| name == "TCPSynRetrans")
        .expect("TCPSynRetrans in /proc/net/netstat");
    values
        .split_whitespace()
        .nth(index)
        .unwrap()
        .parse()
        .unwrap()
}

/// The server closes first, so the client's agent is the side left with the
/// connection's TIME_WAIT. A new connection from the same source port (a
/// busy client reuses ports within the minute TIME_WAIT lasts) must reach
/// the agent's listener at once: handed to the TIME_WAIT, the SYN would be
/// answered for the old connection and the client would retry a second later.
fn reconnect_from_the_same_port_after_the_server_closed_first(bed: &MeshBed, port: u16) {
    let topology = &bed.topology;
    let server_addr = SocketAddr::from((CHECKOUT.ip(), port));
    let source = SocketAddr::from((CART.ip(), 47000 + port % 1000));
    let listener = listen_in(topology, CHECKOUT, server_addr);
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).unwrap();
            stream.write_all(&byte).unwrap();
            // Dropped here: the server closes first.
        }
    });
    let exchange = move || -> std::io::Result<u64> {
        let before = syn_retransmissions();
        let mut stream = connect_from(source, server_addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"x")?;
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed)?;
        assert_eq!(echoed, b"x");
        Ok(syn_retransmissions() - before)
    };
    let first = topology.pod(CART).run(exchange).unwrap().unwrap();
    let node1 = topology.node(1);
    let source_text = source.to_string();
    wait_for(
        "the client agent's TIME_WAIT for the first connection",
        Duration::from_secs(5),
        || {
            let output = node1
                .command("ss")
                .args(["-tanH", "state", "time-wait"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&output.stdout).contains(&source_text)
        },
    );
    let second = topology.pod(CART).run(exchange).unwrap().unwrap();
    server.join().unwrap();
    assert_eq!(first, 0, "the first connection needed a SYN retransmission");
    assert_eq!(
        second,
        0,
        "a new connection from {source} was answered from the old one's TIME_WAIT \
         (SYN retransmitted)\n{}",
        bed.dump()
    );
}

/// Captures every frame on node 1's underlay while `work` runs; returns the
/// capture as text with ASCII payloads.
fn capture_underlay(topology: &Topology, work: impl FnOnce()) -> String {
    let file = topology.workdir().join("mesh-underlay.pcap");
    let mut tcpdump = topology.node(1).command("tcpdump");
    tcpdump
        .args([
            "-n",
            "-i",
            "ul0",
            "-U",
            "--immediate-mode",
            "-Z",
            "root",
            "-w",
        ])
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut capture = ChildGuard::spawn("tcpdump on node 1", tcpdump).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    work();
    std::thread::sleep(Duration::from_millis(300));
    capture.stop();
    let output = std::process::Command::new("tcpdump")
        .args(["-nn", "-A", "-r"])
        .arg(&file)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
#[ignore = "needs root (network namespaces, eBPF) and tcpdump: cargo xtask test runs it"]
fn meshed_tcp_crosses_nodes_encrypted_byte_exact_with_the_real_client_address() {
    require_root("mesh traffic test");
    veil_testbed::require_program("tcpdump", "mesh traffic test");
    let bed = MeshBed::start("mesh");
    let topology = &bed.topology;

    // On the wire: only TLS to :15008, never the application's bytes.
    let mut seen_by_server = None;
    let capture = capture_underlay(topology, || {
        seen_by_server = Some(marker_exchange(topology, CART, CHECKOUT, 7401));
    });
    let seen_by_server = seen_by_server.unwrap();
    assert_eq!(
        seen_by_server.ip(),
        CART.ip(),
        "the server app must see the client pod's own address"
    );
    assert!(
        capture.contains("198.18.0.2.15008"),
        "no mTLS to :15008 in the capture:\n{capture}\n{}",
        bed.dump()
    );
    let marker = String::from_utf8_lossy(MARKER);
    assert!(
        !capture.contains(marker.as_ref()),
        "the marker crossed the underlay in plaintext"
    );
    assert!(
        !capture.contains("4789"),
        "meshed TCP must not ride the plaintext overlay:\n{capture}"
    );

    // Byte-exact both ways, small and large, in both directions across nodes.
    for (from, to, port, bytes) in [
        (CART, CHECKOUT, 7402, 1),
        (CART, PAYMENTS, 7403, 64 * 1024),
        (PAYMENTS, CART, 7404, 10 * MIB),
        (CART, CHECKOUT, 7405, 100 * MIB),
    ] {
        let report = traffic::tcp_echo(topology, from, to, port, bytes)
            .unwrap_or_else(|e| panic!("{from} → {to}: {e}\n{}", bed.dump()));
        assert_eq!(report.bytes, bytes);
    }

    reconnect_from_the_same_port_after_the_server_closed_first(&bed, 7406);

    // Many connections at once.
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16u16)
            .map(|i| {
                scope.spawn(move || {
                    traffic::tcp_echo(topology, CART, CHECKOUT, 7500 + i, 256 * 1024)
                })
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.join().unwrap().unwrap().bytes, 256 * 1024);
        }
    });

    // The mode the kernel allows: kTLS where it has the TLS ULP.
    let mode = expected_mode();
    let outbound_ok = bed.metric(
        1,
        &format!(
            r#"veil_mesh_connections_total{{direction="outbound",mode="{mode}",result="ok"}}"#
        ),
    );
    let inbound_ok = bed.metric(
        2,
        &format!(r#"veil_mesh_connections_total{{direction="inbound",mode="{mode}",result="ok"}}"#),
    );
    assert!(
        outbound_ok >= 20.0,
        "outbound ok = {outbound_ok}\n{}",
        bed.dump()
    );
    assert!(
        inbound_ok >= 19.0,
        "inbound ok = {inbound_ok}\n{}",
        bed.dump()
    );
    // Cart dialled checkout many times: after the first full handshakes,
    // connections resume from session tickets, on both ends. (Sixteen at
    // once find one ticket between them; each handshake leaves one.)
    for (node, direction) in [(1, "outbound"), (2, "inbound")] {
        let series = |kind: &str| {
            format!(r#"veil_mesh_handshakes_total{{direction="{direction}",kind="{kind}"}}"#)
        };
        let (full, resumed) = (
            bed.metric(node, &series("full")),
            bed.metric(node, &series("resumed")),
        );
        assert!(
            full >= 1.0 && resumed >= 2.0 && full + resumed >= 19.0,
            "node {node} {direction}: {full} full, {resumed} resumed\n{}",
            bed.dump()
        );
    }
    let node1 = bed.agents[0].status().unwrap();
    assert!(node1.event("mesh-steered") >= 20, "{node1:#?}");
    assert_eq!(node1.event("drop-no-proxy"), 0, "{node1:#?}");
    assert!(
        bed.agents[0].log().contains(expected_mode_log()),
        "the mode must be logged once:\n{}",
        bed.dump()
    );

    // veilctl shows it: workloads and certificates (table and JSON), the mesh in status.
    let workloads: serde_json::Value =
        serde_json::from_str(&bed.agents[1].veilctl(&["workloads", "-o", "json"]).unwrap())
            .unwrap();
    let identities: Vec<(&str, &str)> = workloads
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["identity"].as_str().unwrap(), w["mode"].as_str().unwrap()))
        .collect();
    assert!(
        identities.contains(&("spiffe://cluster.local/ns/shop/sa/checkout", "strict"))
            && identities.contains(&("spiffe://cluster.local/ns/shop/sa/payments", "permissive")),
        "{identities:?}"
    );
    let certs = bed.agents[0].veilctl(&["certs"]).unwrap();
    let cart = certs
        .lines()
        .find(|l| l.contains("spiffe://cluster.local/ns/shop/sa/cart"))
        .unwrap_or_else(|| panic!("{certs}"));
    assert!(
        cart.contains("valid") && cart.contains("local CA"),
        "{cart}"
    );
    // Certificate expiry for alerting, in Prometheus.
    let series = "veil_mesh_certificate_expiry_timestamp_seconds{identity=\"spiffe://cluster.local/ns/shop/sa/cart\"}";
    wait_for_metric(&bed, 1, series, 1.0);
    let expiry = bed.metric(1, series);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        expiry > now + 3600.0 && expiry < now + 25.0 * 3600.0,
        "expiry {expiry}, now {now}"
    );
    let status = bed.agents[0].veilctl(&["status"]).unwrap();
    assert!(
        status.contains(
            "Mesh · trust domain cluster.local · 1 meshed pod(s) · 1 valid certificate(s)"
        ),
        "{status}"
    );
    // veilctl flows: what talked to what, with bytes.
    let flows: serde_json::Value =
        serde_json::from_str(&bed.agents[0].veilctl(&["flows", "-o", "json"]).unwrap()).unwrap();
    let big = flows
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["bytes_to_peer"].as_u64() == Some(100 * MIB))
        .unwrap_or_else(|| panic!("no 100 MiB flow in {flows:#}"));
    assert_eq!(big["direction"], "outbound");
    assert_eq!(big["result"], "ok");
    assert_eq!(big["mode"], mode);
    assert!(
        big["source"].as_str().unwrap().starts_with("n1p1 ("),
        "{big}"
    );
    assert!(
        big["destination"].as_str().unwrap().starts_with("n2p1 ("),
        "{big}"
    );
    let (code, _) = bed.agents[0]
        .veilctl_exit(&["mtls", "no-such-pod"])
        .unwrap();
    assert_eq!(code, 1, "an unknown pod is an error");
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn strict_pods_refuse_plaintext_and_agents_refuse_bad_peers() {
    require_root("mesh refusal test");
    let bed = MeshBed::start_with_policy("meshno", POLICY);
    let topology = &bed.topology;

    // Plaintext from outside the mesh: fine to a PERMISSIVE pod, dropped at a STRICT one.
    traffic::tcp_echo(topology, OUTSIDER, PAYMENTS, 7601, 4096).unwrap();
    let strict = SocketAddr::from((CHECKOUT.ip(), 7602));
    let _listener = listen_in(topology, CHECKOUT, strict);
    let attempt = topology
        .pod(OUTSIDER)
        .run(move || TcpStream::connect_timeout(&strict, Duration::from_secs(2)))
        .unwrap();
    assert!(attempt.is_err(), "plaintext reached a STRICT pod");
    let node2 = bed.agents[1].status().unwrap();
    assert!(node2.event("drop-plaintext-to-strict") > 0, "{node2:#?}");
    // A port-level PERMISSIVE overrides the STRICT workload on that port.
    traffic::tcp_echo(topology, OUTSIDER, CHECKOUT, 7603, 4096).unwrap();
    // A PERMISSIVE port that an allow rule selects admits only the sources
    // it names, and plaintext names none: dropped; cart, named, gets in
    // through mTLS.
    let selected = SocketAddr::from((PAYMENTS.ip(), 7850));
    let selected_listener = listen_in(topology, PAYMENTS, selected);
    let attempt = topology
        .pod(OUTSIDER)
        .run(move || TcpStream::connect_timeout(&selected, Duration::from_secs(2)))
        .unwrap();
    assert!(
        attempt.is_err(),
        "plaintext reached a port an allow rule selects"
    );
    let node2 = bed.agents[1].status().unwrap();
    assert!(node2.event("drop-plaintext-unauthorized") > 0, "{node2:#?}");
    drop(selected_listener);
    traffic::tcp_echo(topology, CART, PAYMENTS, 7850, 4096)
        .unwrap_or_else(|e| panic!("cart is named by the rule: {e}\n{}", bed.dump()));

    // Authorization: only payments may reach checkout:7800; cart is reset.
    traffic::tcp_echo(topology, PAYMENTS, CHECKOUT, 7800, 4096)
        .map(drop)
        .unwrap_or_else(|e| panic!("same node, meshed: {e}"));
    let denied_before = bed.metric(2, &refused_series("denied"));
    expect_refused(topology, CART, CHECKOUT, 7800);
    wait_for_metric(&bed, 2, &refused_series("denied"), denied_before + 1.0);
    assert!(
        bed.agents[1]
            .log()
            .contains("is not allowed to shop/checkout port 7800"),
        "{}",
        bed.dump()
    );
    let flows = bed.agents[1].veilctl(&["flows"]).unwrap();
    assert!(
        flows
            .lines()
            .any(|l| l.contains("inbound") && l.contains("denied")),
        "{flows}"
    );
    // Other ports of checkout are not selected by the rule: allowed.
    traffic::tcp_echo(topology, CART, CHECKOUT, 7801, 4096).unwrap();

    // veilctl explains the modes with their precedence chain…
    let report: serde_json::Value = serde_json::from_str(
        &bed.agents[1]
            .veilctl(&["mtls", "n2p1", "--port", "7603", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(report["mode"], "permissive", "{report:#}");
    assert_eq!(report["chain"][0]["level"], "port", "{report:#}");
    assert_eq!(report["chain"][0]["decided"], true, "{report:#}");
    let text = bed.agents[1]
        .veilctl(&["mtls", &CHECKOUT.ip().to_string(), "--port", "7800"])
        .unwrap();
    assert!(text.contains("port 7800 on node2: STRICT"), "{text}");
    let workload_row = text.lines().find(|l| l.contains("│ workload")).unwrap();
    assert!(workload_row.contains("← decides"), "{text}");
    // …and `check` reports the dropped plaintext clients and the denials.
    let (code, check) = bed.agents[1].veilctl_exit(&["check"]).unwrap();
    assert_eq!(code, 3, "{check}");
    assert!(check.contains("plaintext TCP to STRICT pods"), "{check}");
    assert!(check.contains("ports that allow rules select"), "{check}");
    assert!(check.contains("inbound denied"), "{check}");

    // Peers that are not what they claim, straight at node 2's :15008.
    let peer = NODE2_INBOUND;
    let other_ca = CertificateAuthority::generate(TRUST_DOMAIN, DEFAULT_LEAF_LIFETIME).unwrap();
    let cert = std::fs::read_to_string(&bed.ca_cert).unwrap();
    let key = std::fs::read_to_string(&bed.ca_key).unwrap();
    let our_ca =
        CertificateAuthority::import(TRUST_DOMAIN, &cert, &key, DEFAULT_LEAF_LIFETIME).unwrap();
    let cases = [
        // Unknown CA: the server refuses the client certificate.
        ("unknown CA", &other_ca, false, "cart", CART, "tls_refused"),
        // Our CA, the right identity and address, but expired.
        ("expired", &our_ca, true, "cart", CART, "tls_refused"),
        // A valid identity claiming another identity's pod address.
        (
            "stolen address",
            &our_ca,
            false,
            "payments",
            CART,
            "source_mismatch",
        ),
    ];
    // Control: the same client with an honest identity and address gets through.
    let echo_addr = SocketAddr::from((CHECKOUT.ip(), 7700));
    let echo = listen_in(topology, CHECKOUT, echo_addr);
    let echo_server = std::thread::spawn(move || {
        let (mut stream, peer) = echo.accept().unwrap();
        let mut buffer = [0u8; 4];
        stream.read_exact(&mut buffer).unwrap();
        stream.write_all(&buffer).unwrap();
        peer
    });
    rogue_client(topology, &our_ca, false, &our_ca, "cart", CART, peer)
        .unwrap_or_else(|e| panic!("an honest peer was refused: {e}\n{}", bed.dump()));
    assert_eq!(echo_server.join().unwrap().ip(), CART.ip());

    for (what, ca, expired, service_account, claimed_source, reason) in cases {
        let before = bed.metric(2, &refused_series(reason));
        let outcome = rogue_client(
            topology,
            ca,
            expired,
            &our_ca,
            service_account,
            claimed_source,
            peer,
        );
        assert!(outcome.is_err(), "{what}: the rogue peer got through");
        wait_for_metric(&bed, 2, &refused_series(reason), before + 1.0);
    }
    let log = bed.agents[1].log();
    for reason in ["Expired", "source address 198.19.1.1:40000 does not belong"] {
        assert!(log.contains(reason), "no {reason:?} in the log:\n{log}");
    }
    // Plaintext to :15008 is not a TLS handshake: refused at its first bytes.
    let before = bed.metric(2, &refused_series("not_tls"));
    let answer = topology
        .node(1)
        .run(move || {
            let mut stream = TcpStream::connect_timeout(&peer, Duration::from_secs(2))?;
            stream.write_all(b"GET / HTTP/1.1\r\n\r\n")?;
            let mut buffer = [0u8; 64];
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.read(&mut buffer)
        })
        .unwrap();
    assert!(
        matches!(answer, Ok(0) | Err(_)),
        "plaintext on :15008 got an answer: {answer:?}"
    );
    wait_for_metric(&bed, 2, &refused_series("not_tls"), before + 1.0);
    let log = bed.agents[1].log();
    assert!(log.contains("not a TLS record"), "{log}");
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn running_sessions_are_reset_when_a_rule_or_a_pod_identity_stops_allowing_them() {
    require_root("mesh live session test");
    let mut bed = MeshBed::start("meshlive");
    // Two sessions cart → checkout while no rule selects checkout.
    let doomed = HeldConnection::open(&bed.topology, CART, CHECKOUT, 7810);
    let mut spared = HeldConnection::open(&bed.topology, CART, CHECKOUT, 7811);
    // A rule now admits only payments on checkout:7810: node 2 resets the
    // running cart session on that port, both pods see a reset, and the
    // session on 7811 (no rule selects it) goes on.
    bed.topology.set_inventory_extra(
        r#"
[policy]
[[policy.allow]]
namespace = "shop"
service_account = "checkout"
port = 7810
from_identities = ["spiffe://cluster.local/ns/shop/sa/payments"]
"#,
    );
    bed.topology.write_inventory().unwrap();
    doomed
        .both_ends_reset(Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the denied session was not reset: {e}\n{}", bed.dump()));
    assert_eq!(bed.metric(2, &reset_series("inbound", "denied")), 1.0);
    spared
        .round_trip()
        .unwrap_or_else(|e| panic!("a session no rule selects was cut: {e}\n{}", bed.dump()));
    let log = bed.agents[1].log();
    assert!(
        log.contains("mesh session reset: denied by policy")
            && log.contains("is not allowed to shop/checkout port 7810"),
        "{log}"
    );
    let flows = bed.agents[1].veilctl(&["flows"]).unwrap();
    assert!(
        flows
            .lines()
            .any(|l| l.contains("inbound") && l.contains("reset: denied")),
        "{flows}"
    );
    // New connections meet the same rule.
    expect_refused(&bed.topology, CART, CHECKOUT, 7810);
    HeldConnection::open(&bed.topology, CART, CHECKOUT, 7813);

    // checkout's pod becomes another workload: node 1's session to it went
    // to the old identity's agent, so node 1 resets it.
    bed.topology.set_mesh(
        CHECKOUT,
        Some(PodMesh::new("shop", "checkout-v2", "strict")),
    );
    bed.topology.write_inventory().unwrap();
    spared
        .both_ends_reset(Duration::from_secs(5))
        .unwrap_or_else(|e| {
            panic!(
                "a session to a changed pod was not reset: {e}\n{}",
                bed.dump()
            )
        });
    assert_eq!(
        bed.metric(1, &reset_series("outbound", "destination_changed")),
        1.0,
        "{}",
        bed.dump()
    );
    assert!(
        bed.agents[0]
            .log()
            .contains("is now spiffe://cluster.local/ns/shop/sa/checkout-v2"),
        "{}",
        bed.dump()
    );
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn a_peer_agent_that_dies_mid_stream_resets_the_pod_instead_of_ending_its_stream() {
    require_root("mesh truncation test");
    let mut bed = MeshBed::start("meshcut");
    let mut held = HeldConnection::open(&bed.topology, CART, CHECKOUT, 7820);
    // Node 2's agent dies: its kernel ends the session's TCP stream with a
    // FIN and no close_notify in it — what a FIN forged on the path looks
    // like too. Cart must not take that for the server's end of stream.
    // (Checkout's own socket was the dead agent's: it ends as the kernel
    // closed it, which no agent can help.)
    bed.agents[1].kill();
    let cart = held.client_end(Duration::from_secs(5));
    assert!(
        matches!(&cart, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "cart saw {cart:?}, not a reset, when its peer agent died mid-stream\n{}",
        bed.dump()
    );
    assert_eq!(
        bed.metric(1, &reset_series("outbound", "truncated")),
        1.0,
        "{}",
        bed.dump()
    );
    let log = bed.agents[0].log();
    assert!(
        log.contains("mesh session reset: the peer agent's TLS stream ended without close_notify"),
        "{log}"
    );
    let flows = bed.agents[0].veilctl(&["flows"]).unwrap();
    assert!(
        flows
            .lines()
            .any(|l| l.contains("outbound") && l.contains("reset: truncated")),
        "{flows}"
    );
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn an_agent_that_stops_resets_its_running_sessions_at_both_ends() {
    require_root("mesh agent stop test");
    let mut bed = MeshBed::start("meshstop");
    let held = HeldConnection::open(&bed.topology, CART, CHECKOUT, 7822);
    assert!(
        bed.agents[0].stop(),
        "node 1's agent exits cleanly\n{}",
        bed.dump()
    );
    held.both_ends_reset(Duration::from_secs(5))
        .unwrap_or_else(|e| {
            panic!(
                "a session through a stopped agent did not end in resets: {e}\n{}",
                bed.dump()
            )
        });
    assert!(
        bed.agents[0]
            .log()
            .contains("agent stopping: running mesh sessions reset at both ends"),
        "{}",
        bed.dump()
    );
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn connections_between_pods_of_one_node_meet_the_allow_rules_too() {
    require_root("mesh same-node authorization test");
    // reports:7840 admits only payments. Cart and reports share node 1, so
    // their connections never reach a handshake: the datapath must apply
    // the rules itself.
    let mut bed = MeshBed::start_with_policy(
        "meshsame",
        r#"
[policy]
[[policy.allow]]
namespace = "shop"
service_account = "reports"
port = 7840
from_identities = ["spiffe://cluster.local/ns/shop/sa/payments"]
"#,
    );
    bed.topology.set_mesh(
        OUTSIDER,
        Some(PodMesh::new("shop", "reports", "permissive")),
    );
    bed.topology.write_inventory().unwrap();
    let topology = &bed.topology;
    wait_for("node 1 to mesh reports", Duration::from_secs(10), || {
        bed.agents[0]
            .veilctl(&["workloads"])
            .is_ok_and(|w| w.contains("sa/reports"))
    });
    let events = |bed: &MeshBed| -> std::collections::HashMap<String, u64> {
        bed.agents[0]
            .status()
            .unwrap()
            .events
            .into_iter()
            .map(|e| (e.event, e.packets))
            .collect()
    };

    expect_refused(topology, CART, OUTSIDER, 7840);
    wait_for_metric(
        &bed,
        1,
        r#"veil_mesh_connections_total{direction="outbound",mode="none",result="denied"}"#,
        1.0,
    );
    let log = bed.agents[0].log();
    assert!(
        log.contains("outbound mesh connection refused: denied by policy")
            && log.contains("is not allowed to shop/reports port 7840"),
        "{log}"
    );
    let flows = bed.agents[0].veilctl(&["flows"]).unwrap();
    assert!(
        flows
            .lines()
            .any(|l| l.contains("outbound") && l.contains("denied")),
        "{flows}"
    );
    assert!(
        events(&bed)["mesh-same-node-denied"] >= 1,
        "{:?}",
        events(&bed)
    );

    // A port no rule names: plaintext, straight to the pod, the real
    // client address kept; the agent takes no part.
    let before = events(&bed);
    let seen = marker_exchange(topology, CART, OUTSIDER, 7841);
    assert_eq!(seen.ip(), CART.ip());
    let after = events(&bed);
    assert_eq!(
        after["mesh-same-node-denied"], before["mesh-same-node-denied"],
        "an admitted same-node connection went to the agent"
    );
    assert!(after["same-node"] > before["same-node"]);
    // payments on node 2 is admitted on 7840, through mTLS.
    marker_exchange(topology, PAYMENTS, OUTSIDER, 7840);
}

/// `from` connects to `to`'s `port` (a server listens there) and must get
/// no byte back: the connection is reset or closed.
fn expect_refused(topology: &Topology, from: PodRef, to: PodRef, port: u16) {
    let address = SocketAddr::from((to.ip(), port));
    let _listener = listen_in(topology, to, address);
    let outcome = topology
        .pod(from)
        .run(move || -> std::io::Result<usize> {
            let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(b"hello")?;
            let mut buffer = [0u8; 16];
            stream.read(&mut buffer)
        })
        .unwrap();
    match outcome {
        Ok(0) => {}
        Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {}
        other => panic!("{from} → {to}:{port} was not refused: {other:?}"),
    }
}

/// The policy of the refusal test: a PERMISSIVE port on the STRICT
/// checkout, an allow rule on checkout:7800 for payments only, and one on
/// the PERMISSIVE payments:7850 for cart only.
const POLICY: &str = r#"
[policy]
[[policy.ports]]
namespace = "shop"
service_account = "checkout"
port = 7603
mode = "permissive"
[[policy.allow]]
namespace = "shop"
service_account = "checkout"
port = 7800
from_identities = ["spiffe://cluster.local/ns/shop/sa/payments"]
[[policy.allow]]
namespace = "shop"
service_account = "payments"
port = 7850
from_identities = ["spiffe://cluster.local/ns/shop/sa/cart"]
"#;

fn reset_series(direction: &str, reason: &str) -> String {
    format!(r#"veil_mesh_sessions_reset_total{{direction="{direction}",reason="{reason}"}}"#)
}

fn refused_series(reason: &str) -> String {
    format!(r#"veil_mesh_connections_total{{direction="inbound",mode="none",result="{reason}"}}"#)
}

fn wait_for_metric(bed: &MeshBed, node: usize, series: &str, at_least: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let value = bed.metric(node, series);
        if value >= at_least {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} = {value}, expected ≥ {at_least}\n{}",
            bed.dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A client configuration as `service_account` of shop, with a certificate
/// from `ca` (valid yesterday only when `expired`), trusting `trust`'s roots
/// and accepting only checkout as the server.
fn client_config_for_checkout(
    ca: &CertificateAuthority,
    expired: bool,
    trust: &CertificateAuthority,
    service_account: &str,
) -> rustls::ClientConfig {
    client_config_and_serial(ca, expired, trust, service_account).0
}

/// [`client_config_for_checkout`], with the serial of the client's certificate.
fn client_config_and_serial(
    ca: &CertificateAuthority,
    expired: bool,
    trust: &CertificateAuthority,
    service_account: &str,
) -> (rustls::ClientConfig, String) {
    let id = SpiffeId::new(TRUST_DOMAIN, "shop", service_account).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr_pem(&id).unwrap();
    let issued = if expired {
        let now = std::time::SystemTime::now();
        let day = Duration::from_secs(86_400);
        ca.sign_valid(&csr, &id, now - 2 * day, now - day).unwrap()
    } else {
        ca.sign(&csr, &id).unwrap()
    };
    let credentials = WorkloadCredentials::new(&issued, &key).unwrap();
    let checkout = SpiffeId::new(TRUST_DOMAIN, "shop", "checkout").unwrap();
    let config = TlsSettings::default()
        .client_config(
            &credentials,
            Arc::new(trust_of(trust)),
            ExpectedPeer::Identity(checkout),
        )
        .unwrap();
    (config, issued.serial)
}

/// A verifier's trust state with `ca`'s roots and nothing revoked.
fn trust_of(ca: &CertificateAuthority) -> TrustState {
    let state = TrustState::default();
    *state.roots.write().unwrap() = ca
        .trust_bundle()
        .iter()
        .map(|pem| {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
        })
        .collect();
    state
}

/// The SNI a client agent sends for checkout (the agent's own naming).
#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn unauthenticated_connections_get_a_total_deadline_and_a_cap_per_source_while_real_peers_connect()
{
    require_root("mesh handshake admission test");
    let deadline = Duration::from_secs(2);
    let bed = MeshBed::start_with(
        "meshslot",
        "",
        "handshake_timeout = \"2s\"\nmax_handshakes = 64\nmax_handshakes_per_source = 4\n",
    );
    let topology = &bed.topology;
    // The slow clients come from node 2's own address, so node 1's agent,
    // the real peer below, is another source.
    let try_open = || {
        topology
            .node(2)
            .run(|| TcpStream::connect_timeout(&NODE2_INBOUND, Duration::from_secs(2)))
            .unwrap()
    };
    let open = || try_open().expect("connect to node 2's :15008");
    // A TLS handshake record header, then its body a byte every 300 ms: each
    // read gets a byte long before any per-read timeout, so only a deadline
    // on the whole handshake can end it.
    let opened = std::time::Instant::now();
    let dribblers: Vec<std::thread::JoinHandle<Duration>> = (0..4)
        .map(|_| {
            let mut stream = open();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let _ = stream.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]);
                while started.elapsed() < Duration::from_secs(12) {
                    std::thread::sleep(Duration::from_millis(300));
                    if stream.write_all(&[0x01]).is_err() {
                        break;
                    }
                    // A reset or an end of stream from the agent ends it too.
                    stream.set_nonblocking(true).unwrap();
                    let mut byte = [0u8; 1];
                    match stream.read(&mut byte) {
                        Ok(0) => break,
                        Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => break,
                        _ => {}
                    }
                    stream.set_nonblocking(false).unwrap();
                }
                started.elapsed()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // A fifth from the same source gets no slot: reset at once, unread.
    let before = bed.metric(2, &refused_series("source_handshake_slots_full"));
    // (On loopback the reset can beat connect's own completion check.)
    let answer = try_open().and_then(|mut fifth| {
        fifth.set_read_timeout(Some(Duration::from_secs(1)))?;
        fifth.read(&mut [0u8; 16])
    });
    assert!(
        matches!(answer, Ok(0))
            || answer
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "a connection over the per-source cap was not refused at once: {answer:?}"
    );
    wait_for_metric(
        &bed,
        2,
        &refused_series("source_handshake_slots_full"),
        before + 1.0,
    );

    // Meanwhile a real peer agent still connects: meshed TCP node 1 → node 2.
    marker_exchange(topology, CART, CHECKOUT, 7451);

    let held: Vec<Duration> = dribblers.into_iter().map(|d| d.join().unwrap()).collect();
    for lasted in &held {
        assert!(
            *lasted <= deadline + Duration::from_millis(1500),
            "a dribbling client held its handshake for {lasted:?}, past the {deadline:?} deadline: {held:?}\n{}",
            bed.dump()
        );
    }
    wait_for_metric(&bed, 2, &refused_series("handshake_deadline"), 4.0);
    assert!(opened.elapsed() < Duration::from_secs(10));
    assert_eq!(
        bed.metric(2, "veil_mesh_handshakes_in_progress"),
        0.0,
        "{}",
        bed.dump()
    );

    // Their slots are back: the same source is admitted again (held open,
    // not reset).
    let mut again = open();
    again
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let answer = again.read(&mut [0u8; 16]);
    assert!(
        answer.as_ref().is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
        "a new connection after the slow ones ended was not admitted: {answer:?}"
    );
}

fn checkout_server_name() -> ServerName<'static> {
    ServerName::try_from(sni_for(CHECKOUT.ip())).unwrap()
}

/// Node 2's inbound listener, as node 1 dials it.
const NODE2_INBOUND: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 2)),
    15008,
);

/// An mTLS session to the agent at `peer` as a client of checkout with
/// `config` trusting `trust`'s roots, handshake and `preface` done (call
/// inside a namespace). Clones of a configuration share its session
/// tickets, so later dials resume, as agents do.
fn dial_checkout(
    peer: SocketAddr,
    config: rustls::ClientConfig,
    trust: &TrustState,
    preface: &Preface,
) -> Result<(rustls::Connection, TcpStream), String> {
    let mut tcp =
        TcpStream::connect_timeout(&peer, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let connection = ClientConnection::new(Arc::new(config), checkout_server_name()).unwrap();
    let checkout = ExpectedPeer::Identity(SpiffeId::new(TRUST_DOMAIN, "shop", "checkout").unwrap());
    let connection = handshake::client(connection, &mut tcp, preface, trust, &checkout)
        .map_err(|e| e.to_string())?;
    Ok((connection, tcp))
}

/// A TLS client in node 1's namespace presenting `service_account`'s
/// certificate from `ca`, claiming `claimed_source` in the preface; true
/// when the server accepted the session and relayed an echo.
fn rogue_client(
    topology: &Topology,
    ca: &CertificateAuthority,
    expired: bool,
    trust: &CertificateAuthority,
    service_account: &str,
    claimed_source: PodRef,
    peer: SocketAddr,
) -> Result<(), String> {
    let config = client_config_for_checkout(ca, expired, trust, service_account);
    let trust = trust_of(trust);
    let preface = Preface {
        original_destination: std::net::SocketAddrV4::new(CHECKOUT.ip(), 7700),
        source: std::net::SocketAddrV4::new(claimed_source.ip(), 40000),
    };
    topology
        .node(1)
        .run(move || -> Result<(), String> {
            let (mut connection, mut tcp) = dial_checkout(peer, config, &trust, &preface)?;
            // Accepted sessions carry bytes; refused ones end without any.
            connection.writer().write_all(b"ping").unwrap();
            while connection.wants_write() {
                connection.write_tls(&mut tcp).map_err(|e| e.to_string())?;
            }
            // Only decrypted application data counts as getting through.
            loop {
                match connection.read_tls(&mut tcp) {
                    Ok(0) => return Err("closed".into()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
                connection
                    .process_new_packets()
                    .map_err(|e| e.to_string())?;
                let mut plaintext = [0u8; 64];
                match connection.reader().read(&mut plaintext) {
                    Ok(n) if n > 0 => return Ok(()),
                    Ok(_) => return Err("closed".into()),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .unwrap()
}

/// The serial `veilctl certs -o json` shows for `identity` on `node`.
fn serial_on(bed: &MeshBed, node: usize, identity: &str) -> Option<String> {
    let json = bed.agents[node - 1]
        .veilctl(&["certs", "-o", "json"])
        .ok()?;
    let workloads: serde_json::Value = serde_json::from_str(&json).ok()?;
    workloads
        .as_array()?
        .iter()
        .find(|w| w["identity"] == identity)?["certificate"]["serial"]
        .as_str()
        .map(str::to_owned)
}

/// The serial of the certificate node 2's agent presents for checkout to a
/// new connection (an honest client: cart's identity from our CA).
fn presented_serial(topology: &Topology, ca: &CertificateAuthority) -> String {
    let config = client_config_for_checkout(ca, false, ca, "cart");
    let trust = trust_of(ca);
    let preface = Preface {
        original_destination: std::net::SocketAddrV4::new(CHECKOUT.ip(), 7999),
        source: std::net::SocketAddrV4::new(CART.ip(), 40001),
    };
    topology
        .node(1)
        .run(move || {
            let (connection, _tcp) =
                dial_checkout(NODE2_INBOUND, config, &trust, &preface).unwrap();
            let leaf = connection.peer_certificates().unwrap()[0].clone();
            let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
            parsed
                .tbs_certificate
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
        .unwrap()
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn certificates_rotate_under_a_live_connection_and_new_connections_get_the_new_one() {
    require_root("mesh rotation test");
    // 30 s certificates: renewed after 20 s.
    let bed = MeshBed::start_with("meshrot", "", "certificate_lifetime = \"30s\"\n");
    let topology = &bed.topology;
    let checkout = "spiffe://cluster.local/ns/shop/sa/checkout";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let first = loop {
        if let Some(serial) = serial_on(&bed, 2, checkout) {
            break serial;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no certificate\n{}",
            bed.dump()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let cert = std::fs::read_to_string(&bed.ca_cert).unwrap();
    let key = std::fs::read_to_string(&bed.ca_key).unwrap();
    let ca =
        CertificateAuthority::import(TRUST_DOMAIN, &cert, &key, DEFAULT_LEAF_LIFETIME).unwrap();
    assert_eq!(presented_serial(topology, &ca), first);

    // A connection that stays open across the rotation, exchanging all along.
    let address = SocketAddr::from((CHECKOUT.ip(), 7900));
    let listener = listen_in(topology, CHECKOUT, address);
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buffer = [0u8; 1024];
        let mut echoed = 0u64;
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => return echoed,
                Ok(n) => {
                    stream.write_all(&buffer[..n]).unwrap();
                    echoed += n as u64;
                }
                Err(e) => panic!("server side of the live connection: {e}"),
            }
        }
    });
    let mut client = topology
        .pod(CART)
        .run(move || TcpStream::connect_timeout(&address, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut rotated_at = None;
    let mut exchanges = 0u64;
    // Bounded: at most 45 s, and 3 s past the rotation.
    while started.elapsed() < Duration::from_secs(45)
        && rotated_at.is_none_or(|at: std::time::Instant| at.elapsed() < Duration::from_secs(3))
    {
        let message = [exchanges as u8; 1024];
        client.write_all(&message).unwrap();
        let mut back = [0u8; 1024];
        client.read_exact(&mut back).unwrap_or_else(|e| {
            panic!(
                "the live connection broke after {exchanges} exchanges: {e}\n{}",
                bed.dump()
            )
        });
        assert_eq!(back, message);
        exchanges += 1;
        if rotated_at.is_none() && serial_on(&bed, 2, checkout).is_some_and(|s| s != first) {
            rotated_at = Some(std::time::Instant::now());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        rotated_at.is_some(),
        "no rotation within 45 s\n{}",
        bed.dump()
    );
    drop(client);
    assert_eq!(server.join().unwrap(), exchanges * 1024);
    let second = serial_on(&bed, 2, checkout).unwrap();
    assert_ne!(second, first);
    assert_eq!(
        presented_serial(topology, &ca),
        second,
        "new connections must get the new certificate"
    );
    assert!(
        bed.agents[1].log().contains("renewed=true"),
        "{}",
        bed.dump()
    );
}

/// Runs `openssl s_client` in node 1's namespace against node 2's :15008,
/// asking for checkout by SNI; `client` is (certificate chain, key) files.
fn openssl_to_inbound(
    topology: &Topology,
    root: &std::path::Path,
    client: Option<(&std::path::Path, &std::path::Path)>,
) -> String {
    let mut command = topology.node(1).command("openssl");
    command
        .args([
            "s_client",
            "-connect",
            "198.18.0.2:15008",
            "-tls1_3",
            "-brief",
        ])
        .args(["-servername", &sni_for(CHECKOUT.ip())])
        .arg("-CAfile")
        .arg(root)
        .arg("-verify_return_error");
    if let Some((chain, key)) = client {
        command
            .arg("-cert")
            .arg(chain)
            .arg("-cert_chain")
            .arg(chain)
            .arg("-key")
            .arg(key);
    }
    let output = command
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
#[ignore = "needs root (network namespaces, eBPF) and openssl: cargo xtask test runs it"]
fn openssl_with_a_workload_certificate_completes_the_handshake_and_without_one_is_refused() {
    require_root("mesh interop test");
    veil_testbed::require_program("openssl", "mesh interop test");
    let bed = MeshBed::start("meshssl");
    let topology = &bed.topology;
    let cert = std::fs::read_to_string(&bed.ca_cert).unwrap();
    let key = std::fs::read_to_string(&bed.ca_key).unwrap();
    let ca =
        CertificateAuthority::import(TRUST_DOMAIN, &cert, &key, DEFAULT_LEAF_LIFETIME).unwrap();
    let id = SpiffeId::new(TRUST_DOMAIN, "shop", "cart").unwrap();
    let workload_key = WorkloadKey::generate().unwrap();
    let issued = ca.sign(&workload_key.csr_pem(&id).unwrap(), &id).unwrap();
    let chain = topology.workdir().join("cart-chain.pem");
    let key_file = topology.workdir().join("cart.key");
    std::fs::write(&chain, &issued.chain_pem).unwrap();
    workload_key.save(&key_file).unwrap();

    let accepted = openssl_to_inbound(topology, &bed.ca_cert, Some((&chain, &key_file)));
    assert!(
        accepted.contains("Protocol version: TLSv1.3") && accepted.contains("Verification: OK"),
        "openssl with a workload certificate must complete the handshake:\n{accepted}\n{}",
        bed.dump()
    );
    // `Verification: OK` against the mesh root: the agent presented a
    // workload certificate of our CA (openssl does not check SPIFFE IDs).

    // In TLS 1.3 the client finishes before the server has checked its
    // certificate, so openssl may print success before the alert arrives:
    // the refusal is read on the server side.
    let before = bed.metric(2, &refused_series("tls_refused"));
    let _ = openssl_to_inbound(topology, &bed.ca_cert, None);
    wait_for_metric(&bed, 2, &refused_series("tls_refused"), before + 1.0);
    assert!(
        bed.agents[1].log().contains("NoCertificatesPresented")
            || bed.agents[1].log().contains("certificate"),
        "{}",
        bed.dump()
    );
}

/// Whether node 2's agent completes an mTLS handshake with `config` (from
/// node 1's namespace).
fn handshake_with(
    topology: &Topology,
    config: rustls::ClientConfig,
    trust: &CertificateAuthority,
) -> Result<(), String> {
    let trust = trust_of(trust);
    let preface = Preface {
        original_destination: std::net::SocketAddrV4::new(CHECKOUT.ip(), 7999),
        source: std::net::SocketAddrV4::new(CART.ip(), 40002),
    };
    topology
        .node(1)
        .run(move || -> Result<(), String> {
            let (mut connection, mut tcp) = dial_checkout(NODE2_INBOUND, config, &trust, &preface)?;
            // In TLS 1.3 the server judges the client's certificate after the
            // client is done: a refusal arrives as an alert, an acceptance
            // as anything else (here the end of the stream, since nothing
            // listens behind the destination port).
            loop {
                match connection.read_tls(&mut tcp) {
                    Ok(0) => return Ok(()),
                    Ok(_) => {
                        connection
                            .process_new_packets()
                            .map_err(|e| e.to_string())?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .unwrap()
}

#[test]
#[ignore = "needs root (network namespaces, eBPF) and a Kafka broker (tansu): cargo xtask test runs it"]
fn certificates_and_identities_revoked_on_the_bus_are_refused_everywhere_and_their_owners_rekey() {
    require_root("revocation test");
    let (bed, broker) = MeshBed::start_on_bus("mrevoke");
    wait_for("agents on the bus", Duration::from_secs(30), || {
        bed.agents.iter().all(Agent::bus_connected)
    });
    let ca = CertificateAuthority::import(
        TRUST_DOMAIN,
        &std::fs::read_to_string(&bed.ca_cert).unwrap(),
        &std::fs::read_to_string(&bed.ca_key).unwrap(),
        DEFAULT_LEAF_LIFETIME,
    )
    .unwrap();
    let cart = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/cart");
    let checkout = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/checkout");
    // A client certificate of cart's, accepted now.
    let (config, client_serial) = client_config_and_serial(&ca, false, &ca, "cart");
    handshake_with(&bed.topology, config.clone(), &ca).expect("accepted before it is revoked");
    let checkout_serial = presented_serial(&bed.topology, &ca);
    assert_eq!(
        serial_on(&bed, 2, &checkout).as_deref(),
        Some(checkout_serial.as_str())
    );

    // Revoked with the controller's command, published on node 1.
    let controller = veil_testbed::binaries::locate("veil-controller").unwrap();
    let revoke = |serial: Option<&str>, identity: &str| {
        let mut command = bed.topology.node(1).command(&controller);
        command.args(["revoke", "--identity", identity]);
        if let Some(serial) = serial {
            command.args(["--serial", serial]);
        }
        let output = command
            .arg("--kafka-brokers")
            .arg(broker.address())
            .arg("--events-state-dir")
            .arg(
                bed.topology
                    .workdir()
                    .join(format!("revoke-{}", serial.unwrap_or("all"))),
            )
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    // A pod connection running over a session with checkout's certificate.
    let running = HeldConnection::open(&bed.topology, CART, CHECKOUT, 7299);
    let started = std::time::Instant::now();
    revoke(Some(&client_serial), &cart);
    revoke(Some(&checkout_serial), &checkout);

    // Node 2 refuses the revoked client certificate, and re-keys its own.
    // Both within 30 s of publishing.
    let left = || Duration::from_secs(30).saturating_sub(started.elapsed());
    try_wait_for("the revoked certificate refused", left(), || {
        handshake_with(&bed.topology, config.clone(), &ca).is_err()
    })
    .unwrap_or_else(|error| panic!("{error}\n{}", bed.dump()));
    eprintln!(
        "revoke published → refused on node 2: {:?}",
        started.elapsed()
    );
    let refused = handshake_with(&bed.topology, config, &ca).unwrap_err();
    assert!(
        refused.contains("CertificateRevoked") || refused.contains("alert"),
        "{refused}"
    );
    try_wait_for("checkout re-keyed", left(), || {
        serial_on(&bed, 2, &checkout).is_some_and(|s| s != checkout_serial)
    })
    .unwrap_or_else(|error| panic!("{error}\n{}", bed.dump()));
    eprintln!(
        "revoke published → checkout re-keyed on node 2: {:?}",
        started.elapsed()
    );
    assert!(
        bed.agents[1]
            .log()
            .contains("our own certificate was revoked; re-keying")
    );
    assert!(bed.agents[1].log().contains("revoked"), "{}", bed.dump());
    // The running session's peer certificate is revoked: node 1 resets it.
    running.both_ends_reset(left()).unwrap_or_else(|e| {
        panic!(
            "a session over a revoked certificate ran on: {e}\n{}",
            bed.dump()
        )
    });
    assert_eq!(bed.metric(1, &reset_series("outbound", "revoked")), 1.0);
    // New connections get the new certificate; both agents know both serials.
    let presented = presented_serial(&bed.topology, &ca);
    assert_ne!(presented, checkout_serial);
    for agent in &bed.agents {
        wait_for(
            &format!("both revocations on node {}", agent.node()),
            Duration::from_secs(10),
            || agent.status().unwrap().event_bus.unwrap().revoked_serials >= 2,
        );
    }
    let status = bed.agents[0].veilctl(&["status"]).unwrap();
    assert!(
        status.contains("2 revoked certificate(s) refused"),
        "{status}"
    );
    // Meshed traffic goes on with the new certificate.
    traffic::tcp_echo(&bed.topology, CART, CHECKOUT, 7300, 64 * 1024).unwrap();

    // A compromised identity: every certificate of cart issued until now is
    // revoked — one the test holds (never seen by any agent) and node 1's own.
    let (held, _) = client_config_and_serial(&ca, false, &ca, "cart");
    handshake_with(&bed.topology, held.clone(), &ca)
        .expect("accepted before the identity is revoked");
    let cart_serial = serial_on(&bed, 1, &cart).expect("node 1 holds cart's certificate");
    let running = HeldConnection::open(&bed.topology, CART, CHECKOUT, 7302);
    let started = std::time::Instant::now();
    let printed = revoke(None, &cart);
    assert!(
        printed.contains(&format!(
            "revoked every certificate of {cart} issued before"
        )),
        "{printed}"
    );
    try_wait_for("cart's certificates refused", left(), || {
        handshake_with(&bed.topology, held.clone(), &ca).is_err()
    })
    .unwrap_or_else(|error| panic!("{error}\n{}", bed.dump()));
    try_wait_for("cart re-keyed on node 1", left(), || {
        serial_on(&bed, 1, &cart).is_some_and(|s| s != cart_serial)
    })
    .unwrap_or_else(|error| panic!("{error}\n{}", bed.dump()));
    eprintln!(
        "identity revoke published → refused on node 2 and re-keyed on node 1: {:?}",
        started.elapsed()
    );
    // Node 2 resets the session that cart's revoked certificate set up.
    running.both_ends_reset(left()).unwrap_or_else(|e| {
        panic!(
            "a session of a revoked identity ran on: {e}\n{}",
            bed.dump()
        )
    });
    assert_eq!(bed.metric(2, &reset_series("inbound", "revoked")), 1.0);
    // Certificates signed after the instant are accepted: one the test
    // makes now, and node 1's new one, which carries meshed traffic.
    let (after, _) = client_config_and_serial(&ca, false, &ca, "cart");
    handshake_with(&bed.topology, after, &ca).expect("a certificate issued after the instant");
    traffic::tcp_echo(&bed.topology, CART, CHECKOUT, 7301, 64 * 1024).unwrap();
    for agent in &bed.agents {
        wait_for(
            &format!("the identity revocation on node {}", agent.node()),
            Duration::from_secs(10),
            || {
                agent
                    .status()
                    .unwrap()
                    .event_bus
                    .unwrap()
                    .revoked_identities
                    == 1
            },
        );
    }
    let status = bed.agents[1].veilctl(&["status"]).unwrap();
    assert!(
        status.contains("1 revoked identity (certificates issued before refused)"),
        "{status}"
    );
}

#[test]
#[ignore = "needs root (network namespaces, eBPF): cargo xtask test runs it"]
fn veilctl_check_finds_certificates_close_to_expiry() {
    require_root("certificate expiry check test");
    // Ten-minute certificates: every one is always within the hour of expiry.
    let bed = MeshBed::start_with("mexpiry", "", "certificate_lifetime = \"10m\"\n");
    let cart = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/cart");
    try_wait_for("cart's certificate", Duration::from_secs(10), || {
        serial_on(&bed, 1, &cart).is_some()
    })
    .unwrap_or_else(|error| panic!("{error}\n{}", bed.dump()));
    let (code, report) = bed.agents[0].veilctl_exit(&["check"]).unwrap();
    assert_eq!(code, 3, "{report}");
    assert!(report.contains("expires within the hour"), "{report}");
    assert!(report.contains("fix the renewal"), "{report}");
}
