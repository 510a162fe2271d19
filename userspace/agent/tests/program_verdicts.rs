//! The overlay programs on crafted packets, with `BPF_PROG_TEST_RUN`: the
//! kernel runs the real programs on our bytes and hands back the verdict and
//! the rewritten packet, so every branch — encapsulation, decapsulation and
//! each drop reason — is checked byte for byte without a network.

use std::collections::BTreeSet;

use aya::{
    Ebpf,
    maps::{Array, HashMap, PerCpuArray, lpm_trie::Key, lpm_trie::LpmTrie, xdp::DevMapHash},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use veil_agent::datapath::{
    choices::{Delivery, LoadTimeSettings},
    features::{Feature, KernelFeatures},
};
use veil_common::{
    names,
    overlay::{
        DELIVERY_TAG_MAGIC, DatapathEvent, DeliveryTag, LocalEndpoint, MESH_MODE_PERMISSIVE,
        OverlayConfig, PortKey, RemoteNode, SameNodeKey, VERDICT_ALLOW, VERDICT_DENY,
    },
};

const VNI: u32 = 4242;
const UNDERLAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const HOST_VETH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x01];
const LOCAL_POD: [u8; 4] = [198, 19, 1, 1];
const OTHER_LOCAL_POD: [u8; 4] = [198, 19, 1, 2];
const REMOTE_POD: [u8; 4] = [198, 19, 2, 1];
/// Loopback's index: a device that always exists, as the redirect target.
const LOOPBACK: u32 = 1;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

struct Programs {
    ebpf: Ebpf,
}

/// What this kernel supports, probed as the agent probes it.
fn kernel() -> KernelFeatures {
    KernelFeatures::probe(&BTreeSet::new()).unwrap()
}

/// Every way of delivering decapsulated frames this kernel supports:
/// `lookup` everywhere, `metadata` where XDP may call bpf_xdp_adjust_meta.
fn supported_deliveries() -> Vec<Delivery> {
    let mut deliveries = vec![Delivery::Lookup];
    if kernel().has(Feature::XdpMetadata) {
        deliveries.push(Delivery::Metadata);
    }
    deliveries
}

impl Programs {
    /// The programs as the agent would build them for this kernel.
    fn load() -> Self {
        Self::load_with(LoadTimeSettings::for_kernel(&kernel()))
    }

    /// Loads the embedded object built with `settings` and fills the maps
    /// as node 1 of a 2-node overlay.
    fn load_with(settings: LoadTimeSettings) -> Self {
        let mut ebpf = settings.load(veil_agent::datapath::ebpf_object()).unwrap();
        let program: &mut Xdp = ebpf
            .program_mut(names::PROG_UNDERLAY_INGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        program.load().unwrap();
        for name in [names::PROG_POD_EGRESS, names::PROG_UNDERLAY_DELIVER] {
            let program: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            program.load().unwrap();
        }

        let mut config: Array<_, OverlayConfig> = ebpf
            .map_mut(names::MAP_OVERLAY_CONFIG)
            .unwrap()
            .try_into()
            .unwrap();
        config
            .set(
                0,
                OverlayConfig {
                    vni: VNI,
                    underlay_ifindex: LOOPBACK,
                    underlay_mtu: 1500,
                    underlay_ip: [198, 18, 0, 1],
                    underlay_mac: UNDERLAY_MAC,
                    _pad: [0; 2],
                    tunnel_ifindex: 0,
                },
                0,
            )
            .unwrap();
        let mut routes: LpmTrie<_, [u8; 4], RemoteNode> = ebpf
            .map_mut(names::MAP_NODE_ROUTES)
            .unwrap()
            .try_into()
            .unwrap();
        routes
            .insert(
                &Key::new(24, [198, 19, 2, 0]),
                RemoteNode {
                    underlay_ip: [198, 18, 0, 2],
                    mac: PEER_MAC,
                    _pad: [0; 2],
                },
                0,
            )
            .unwrap();
        let mut endpoints: HashMap<_, [u8; 4], LocalEndpoint> = ebpf
            .map_mut(names::MAP_LOCAL_ENDPOINTS)
            .unwrap()
            .try_into()
            .unwrap();
        for pod in [LOCAL_POD, OTHER_LOCAL_POD] {
            endpoints
                .insert(
                    pod,
                    LocalEndpoint {
                        ifindex: LOOPBACK,
                        pod_mac: POD_MAC,
                        host_mac: HOST_VETH_MAC,
                        identity: 0,
                        mode: 0,
                    },
                    0,
                )
                .unwrap();
        }
        let mut devices: DevMapHash<_> = ebpf
            .map_mut(names::MAP_POD_DEVICES)
            .unwrap()
            .try_into()
            .unwrap();
        devices.insert(LOOPBACK, LOOPBACK, None, 0).unwrap();
        Self { ebpf }
    }

    /// Meshes both local pods (PERMISSIVE) and gives the same-node table
    /// `verdicts`.
    fn mesh_local_pods(&mut self, verdicts: &[(SameNodeKey, u32)]) {
        for pod in [LOCAL_POD, OTHER_LOCAL_POD] {
            self.mesh(pod);
        }
        let mut table: HashMap<_, SameNodeKey, u32> = self
            .ebpf
            .map_mut(names::MAP_SAME_NODE_VERDICTS)
            .unwrap()
            .try_into()
            .unwrap();
        for (key, verdict) in verdicts {
            table.insert(key, verdict, 0).unwrap();
        }
    }

    /// Makes the local pod at `pod` meshed (PERMISSIVE).
    fn mesh(&mut self, pod: [u8; 4]) {
        let mut endpoints: HashMap<_, [u8; 4], LocalEndpoint> = self
            .ebpf
            .map_mut(names::MAP_LOCAL_ENDPOINTS)
            .unwrap()
            .try_into()
            .unwrap();
        let mut endpoint = endpoints.get(&pod, 0).unwrap();
        endpoint.mode = MESH_MODE_PERMISSIVE;
        endpoints.insert(pod, endpoint, 0).unwrap();
    }

    /// Gives the plaintext table `verdicts`, keyed by (pod, port).
    fn refuse_plaintext(&mut self, verdicts: &[([u8; 4], u16, u32)]) {
        let mut table: HashMap<_, PortKey, u32> = self
            .ebpf
            .map_mut(names::MAP_PLAINTEXT_VERDICTS)
            .unwrap()
            .try_into()
            .unwrap();
        for &(ip, port, verdict) in verdicts {
            let key = PortKey {
                ip,
                port_be: port.to_be(),
                _pad: 0,
            };
            table.insert(key, verdict, 0).unwrap();
        }
    }

    fn event(&self, event: DatapathEvent) -> u64 {
        let events: PerCpuArray<_, u64> = self
            .ebpf
            .map(names::MAP_DATAPATH_EVENTS)
            .unwrap()
            .try_into()
            .unwrap();
        events.get(&(event as u32), 0).unwrap().iter().sum()
    }

    /// Runs `program` on `packet`; returns the verdict, the packet after it,
    /// and the one event the run counted (if any).
    fn run(&self, program: &str, packet: &[u8]) -> (u32, Vec<u8>, Option<DatapathEvent>) {
        let before: Vec<u64> = DatapathEvent::ALL.iter().map(|&e| self.event(e)).collect();
        let mut out = vec![0u8; packet.len() + 256];
        let options = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let result = match self.ebpf.program(program).unwrap() {
            aya::programs::Program::Xdp(p) => p.test_run(options),
            aya::programs::Program::SchedClassifier(p) => p.test_run(options),
            _ => unreachable!(),
        }
        .unwrap();
        out.truncate(result.data_size_out as usize);
        let counted: Vec<DatapathEvent> = DatapathEvent::ALL
            .iter()
            .zip(before)
            .filter(|&(&e, b)| self.event(e) > b)
            .map(|(&e, _)| e)
            .collect();
        assert!(counted.len() <= 1, "one packet counted under {counted:?}");
        (result.return_value, out, counted.first().copied())
    }
}

/// Fails the test unless it runs as root (loading and test-running programs needs it).
fn root() {
    veil_testbed::require_root("BPF_PROG_TEST_RUN program tests");
}

/// An Ethernet + IPv4 + UDP frame with `payload_len` bytes of payload.
fn ipv4_udp_frame(src: [u8; 4], dst: [u8; 4], dport: u16, payload_len: usize) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&HOST_VETH_MAC);
    frame.extend_from_slice(&POD_MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload_len) as u16;
    let mut ip = vec![0x45, 0x10];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let check = checksum(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&40000u16.to_be_bytes());
    frame.extend_from_slice(&dport.to_be_bytes());
    frame.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend((0..payload_len).map(|i| i as u8));
    frame
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// An Ethernet + IPv4 + TCP frame (no payload) from port 40000 with `flags`.
fn ipv4_tcp_frame(src: [u8; 4], dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let mut frame = ipv4_udp_frame(src, dst, dport, 12);
    frame[14 + 9] = 6; // TCP
    frame[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let check = checksum(&frame[14..34]);
    frame[14 + 10..14 + 12].copy_from_slice(&check.to_be_bytes());
    let tcp = &mut frame[34..];
    tcp[4..12].fill(0); // sequence and acknowledgement numbers
    tcp[12] = 5 << 4; // 20-byte header
    tcp[13] = flags;
    tcp[14..20].copy_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    frame
}

fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A VXLAN frame from the peer node carrying `inner`.
fn vxlan_frame(flags: u8, vni: u32, inner: &[u8]) -> Vec<u8> {
    let [_, a, b, c] = vni.to_be_bytes();
    let mut payload = vec![flags, 0, 0, 0, a, b, c, 0];
    payload.extend_from_slice(inner);
    let mut frame = ipv4_udp_frame([198, 18, 0, 2], [198, 18, 0, 1], 4789, payload.len());
    let start = frame.len() - payload.len();
    frame[start..].copy_from_slice(&payload);
    frame[0..6].copy_from_slice(&UNDERLAY_MAC);
    frame[6..12].copy_from_slice(&PEER_MAC);
    frame
}

#[test]
#[ignore = "needs root (eBPF, BPF_PROG_TEST_RUN): cargo xtask test runs it"]
fn egress_encapsulates_traffic_for_remote_pods() {
    root();
    let programs = Programs::load();
    let inner = ipv4_udp_frame(LOCAL_POD, REMOTE_POD, 5000, 100);
    let (verdict, out, event) = programs.run(names::PROG_POD_EGRESS, &inner);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(event, Some(DatapathEvent::Encapsulated));
    assert_eq!(out.len(), inner.len() + 50);
    // Outer Ethernet: to the peer node's MAC, from ours.
    assert_eq!(out[0..6], PEER_MAC);
    assert_eq!(out[6..12], UNDERLAY_MAC);
    assert_eq!(out[12..14], [0x08, 0x00]);
    // Outer IPv4: node to node, UDP, right length, valid checksum, inner TOS kept.
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(ip[1], 0x10, "TOS copied from the inner packet");
    assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, out.len() - 14);
    assert_eq!(ip[9], 17);
    assert_eq!(ip[12..16], [198, 18, 0, 1]);
    assert_eq!(ip[16..20], [198, 18, 0, 2]);
    assert_eq!(checksum(ip), 0, "outer IPv4 checksum is valid");
    // UDP to 4789 from a flow-hashed port in 49152-65535.
    let udp = &out[34..42];
    assert!(u16::from_be_bytes([udp[0], udp[1]]) >= 49152);
    assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 4789);
    assert_eq!(
        u16::from_be_bytes([udp[4], udp[5]]) as usize,
        out.len() - 34
    );
    // VXLAN with the I flag and our VNI, then the original frame untouched.
    assert_eq!(out[42..50], [0x08, 0, 0, 0, 0, 0x10, 0x92, 0]);
    assert_eq!(out[50..], inner[..]);
}

#[test]
#[ignore = "needs root (eBPF, BPF_PROG_TEST_RUN): cargo xtask test runs it"]
fn egress_leaves_local_unknown_and_non_ipv4_traffic_to_the_kernel() {
    root();
    let programs = Programs::load();
    let same_node = ipv4_udp_frame(LOCAL_POD, OTHER_LOCAL_POD, 5000, 64);
    assert_eq!(
        programs.run(names::PROG_POD_EGRESS, &same_node),
        (TC_ACT_OK, same_node.clone(), Some(DatapathEvent::SameNode))
    );
    let nowhere = ipv4_udp_frame(LOCAL_POD, [198, 19, 9, 9], 5000, 64);
    assert_eq!(
        programs.run(names::PROG_POD_EGRESS, &nowhere),
        (
            TC_ACT_OK,
            nowhere.clone(),
            Some(DatapathEvent::NoOverlayRoute)
        )
    );
    let mut arp = same_node[..14].to_vec();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    assert_eq!(
        programs.run(names::PROG_POD_EGRESS, &arp),
        (TC_ACT_OK, arp.clone(), None)
    );
}

#[test]
#[ignore = "needs root (eBPF, BPF_PROG_TEST_RUN): cargo xtask test runs it"]
fn egress_hands_same_node_connections_the_allow_rules_refuse_to_the_agent() {
    root();
    // No agent here: a refused connection's SYN finds no listener and is
    // dropped (fails closed), never delivered to the pod.
    std::net::TcpListener::bind("127.0.0.1:15001")
        .expect("nothing may listen on 127.0.0.1:15001 while this test runs");
    let mut programs = Programs::load();
    let key = |port: u16| SameNodeKey {
        source: LOCAL_POD,
        destination: OTHER_LOCAL_POD,
        port_be: port.to_be(),
        _pad: 0,
    };
    programs.mesh_local_pods(&[(key(0), VERDICT_DENY), (key(8080), VERDICT_ALLOW)]);
    let syn = |port| ipv4_tcp_frame(LOCAL_POD, OTHER_LOCAL_POD, port, TCP_SYN);
    let (verdict, _, event) = programs.run(names::PROG_POD_EGRESS, &syn(7000));
    assert_eq!(
        (verdict, event),
        (TC_ACT_SHOT, Some(DatapathEvent::DropNoProxy)),
        "refused on every port but 8080"
    );
    let allowed = syn(8080);
    assert_eq!(
        programs.run(names::PROG_POD_EGRESS, &allowed),
        (TC_ACT_OK, allowed.clone(), Some(DatapathEvent::SameNode)),
        "the port's own verdict wins"
    );
    // The way back of a connection the other pod opened is looked up under
    // this pod's rules: a segment the agent holds no socket for goes on.
    let ack = ipv4_tcp_frame(LOCAL_POD, OTHER_LOCAL_POD, 7000, TCP_ACK);
    assert_eq!(
        programs.run(names::PROG_POD_EGRESS, &ack),
        (TC_ACT_OK, ack.clone(), Some(DatapathEvent::SameNode))
    );
    let reverse = ipv4_tcp_frame(OTHER_LOCAL_POD, LOCAL_POD, 7000, TCP_SYN);
    assert_eq!(
        programs.run(names::PROG_POD_EGRESS, &reverse),
        (TC_ACT_OK, reverse.clone(), Some(DatapathEvent::SameNode)),
        "no verdict for the other direction: allowed"
    );
}

#[test]
#[ignore = "needs root (eBPF, BPF_PROG_TEST_RUN): cargo xtask test runs it"]
fn egress_answers_a_too_big_df_packet_with_fragmentation_needed() {
    root();
    let programs = Programs::load();
    // 1,472 bytes of IPv4 fit a 1,500-byte link, but not once 50 bytes of VXLAN are added.
    let big = ipv4_udp_frame(LOCAL_POD, REMOTE_POD, 5000, 1472 - 28);
    let (verdict, icmp, event) = programs.run(names::PROG_POD_EGRESS, &big);
    assert_eq!(
        (verdict, event),
        (TC_ACT_REDIRECT, Some(DatapathEvent::DropTooBig))
    );
    assert_eq!(
        icmp.len(),
        14 + 20 + 8 + 28,
        "ICMP error quoting header + 8 bytes"
    );
    assert_eq!(icmp[0..6], POD_MAC, "back to the sender");
    assert_eq!(icmp[6..12], HOST_VETH_MAC);
    let ip = &icmp[14..34];
    assert_eq!(
        (ip[9], &ip[16..20]),
        (1, &LOCAL_POD[..]),
        "ICMP to the sender"
    );
    assert_eq!(checksum(ip), 0, "IPv4 checksum valid");
    assert_eq!(
        icmp[34..36],
        [3, 4],
        "destination unreachable, fragmentation needed"
    );
    assert_eq!(
        u16::from_be_bytes([icmp[40], icmp[41]]),
        1450,
        "next-hop MTU"
    );
    assert_eq!(checksum(&icmp[34..]), 0, "ICMP checksum valid");
    assert_eq!(
        icmp[42..70],
        big[14..42],
        "quotes the offending header and 8 bytes"
    );

    // Without DF the packet is dropped (and counted) instead.
    let mut no_df = big.clone();
    no_df[20] = 0;
    no_df[24..26].copy_from_slice(&[0, 0]);
    let check = checksum(&no_df[14..34]);
    no_df[24..26].copy_from_slice(&check.to_be_bytes());
    let (verdict, _, event) = programs.run(names::PROG_POD_EGRESS, &no_df);
    assert_eq!(
        (verdict, event),
        (TC_ACT_SHOT, Some(DatapathEvent::DropTooBig))
    );

    let fits = ipv4_udp_frame(LOCAL_POD, REMOTE_POD, 5000, 1450 - 28);
    assert_eq!(
        programs.run(names::PROG_POD_EGRESS, &fits).0,
        TC_ACT_REDIRECT
    );
}

#[test]
#[ignore = "needs root (eBPF, BPF_PROG_TEST_RUN): cargo xtask test runs it"]
fn ingress_decapsulates_into_the_local_pod() {
    root();
    let inner = ipv4_udp_frame(REMOTE_POD, LOCAL_POD, 5000, 100);
    for delivery in supported_deliveries() {
        let programs = Programs::load_with(LoadTimeSettings {
            delivery,
            redirect_peer: kernel().has(Feature::RedirectPeer),
        });
        let (verdict, out, event) = programs.run(
            names::PROG_UNDERLAY_INGRESS,
            &vxlan_frame(0x08, VNI, &inner),
        );
        // Passed on to GRO for TC to deliver it.
        assert_eq!(verdict, XDP_PASS, "{delivery:?}");
        assert_eq!(event, Some(DatapathEvent::Decapsulated), "{delivery:?}");
        let frame = match delivery {
            Delivery::Metadata => {
                // Tagged with the pod's veth.
                let tag_len = std::mem::size_of::<DeliveryTag>();
                assert_eq!(
                    out.len(),
                    tag_len + inner.len(),
                    "tag, then the inner frame"
                );
                let (tag, frame) = out.split_at(tag_len);
                assert_eq!(tag[0..4], DELIVERY_TAG_MAGIC.to_ne_bytes());
                assert_eq!(tag[4..8], LOOPBACK.to_ne_bytes(), "the pod's veth");
                frame.to_vec()
            }
            Delivery::Lookup => {
                assert_eq!(out.len(), inner.len(), "no tag: the inner frame alone");
                // TC finds the pod by the MAC and address XDP left.
                let (verdict, _, _) = programs.run(names::PROG_UNDERLAY_DELIVER, &out);
                assert_eq!(verdict, TC_ACT_REDIRECT, "TC delivers it to its pod");
                out
            }
        };
        assert_eq!(frame[0..6], POD_MAC, "inner destination is the pod");
        assert_eq!(
            frame[6..12],
            HOST_VETH_MAC,
            "inner source is the node's veth"
        );
        assert_eq!(frame[12..], inner[12..]);
    }
}

#[test]
#[ignore = "needs root (eBPF, BPF_PROG_TEST_RUN): cargo xtask test runs it"]
fn the_probes_agree_with_the_verifier() {
    root();
    // What the probes say a kernel lacks must be what its verifier refuses
    // in our own programs, and what they say it has must load: otherwise the
    // agent would pick a variant the kernel refuses, or a fallback for nothing.
    let kernel = kernel();
    let load = |settings: LoadTimeSettings, program: &str| {
        let mut ebpf = settings.load(veil_agent::datapath::ebpf_object()).unwrap();
        match ebpf.program_mut(program).unwrap() {
            aya::programs::Program::Xdp(p) => p.load().map_err(|e| format!("{e:?}")),
            aya::programs::Program::SchedClassifier(p) => p.load().map_err(|e| format!("{e:?}")),
            _ => unreachable!(),
        }
    };
    let metadata = load(
        LoadTimeSettings {
            delivery: Delivery::Metadata,
            redirect_peer: false,
        },
        names::PROG_UNDERLAY_INGRESS,
    );
    assert_eq!(
        metadata.is_ok(),
        kernel.has(Feature::XdpMetadata),
        "metadata delivery: {metadata:?}"
    );
    let peer = load(
        LoadTimeSettings {
            delivery: Delivery::Lookup,
            redirect_peer: true,
        },
        names::PROG_UNDERLAY_DELIVER,
    );
    assert_eq!(
        peer.is_ok(),
        kernel.has(Feature::RedirectPeer),
        "redirect peer: {peer:?}"
    );
    // The fallbacks load everywhere.
    for program in [names::PROG_UNDERLAY_INGRESS, names::PROG_UNDERLAY_DELIVER] {
        load(
            LoadTimeSettings {
                delivery: Delivery::Lookup,
                redirect_peer: false,
            },
            program,
        )
        .unwrap();
    }
}

#[test]
#[ignore = "needs root (eBPF, BPF_PROG_TEST_RUN): cargo xtask test runs it"]
fn plaintext_to_a_port_allow_rules_select_is_dropped_from_the_overlay_and_the_node() {
    root();
    let mut programs = Programs::load();
    // The agent writes plaintext verdicts for meshed pods only.
    programs.mesh(LOCAL_POD);
    programs.refuse_plaintext(&[
        (LOCAL_POD, 0, VERDICT_DENY),
        (LOCAL_POD, 8080, VERDICT_ALLOW),
    ]);
    let overlay = |port| {
        vxlan_frame(
            0x08,
            VNI,
            &ipv4_tcp_frame(REMOTE_POD, LOCAL_POD, port, TCP_SYN),
        )
    };
    let (verdict, _, event) = programs.run(names::PROG_UNDERLAY_INGRESS, &overlay(7000));
    assert_eq!(
        (verdict, event),
        (XDP_DROP, Some(DatapathEvent::DropPlaintextUnauthorized))
    );
    let (verdict, _, event) = programs.run(names::PROG_UNDERLAY_INGRESS, &overlay(8080));
    assert_eq!(
        (verdict, event),
        (XDP_PASS, Some(DatapathEvent::Decapsulated)),
        "the port's own verdict wins"
    );
    // From a pod of this node that is not meshed.
    let local = |port| ipv4_tcp_frame(OTHER_LOCAL_POD, LOCAL_POD, port, TCP_SYN);
    let (verdict, _, event) = programs.run(names::PROG_POD_EGRESS, &local(7000));
    assert_eq!(
        (verdict, event),
        (TC_ACT_SHOT, Some(DatapathEvent::DropPlaintextUnauthorized))
    );
    let allowed = local(8080);
    assert_eq!(
        programs.run(names::PROG_POD_EGRESS, &allowed),
        (TC_ACT_OK, allowed.clone(), Some(DatapathEvent::SameNode))
    );
}

#[test]
#[ignore = "needs root (eBPF, BPF_PROG_TEST_RUN): cargo xtask test runs it"]
fn underlay_delivery_leaves_untagged_packets_to_the_kernel() {
    root();
    for delivery in supported_deliveries() {
        let programs = Programs::load_with(LoadTimeSettings {
            delivery,
            redirect_peer: kernel().has(Feature::RedirectPeer),
        });
        // A plain packet from the wire for a local pod, addressed to the
        // node (not to the pod's MAC) and without a tag: only frames our XDP
        // program decapsulated are delivered past the node's stack.
        let plain = ipv4_udp_frame(REMOTE_POD, LOCAL_POD, 5000, 100);
        let (verdict, out, event) = programs.run(names::PROG_UNDERLAY_DELIVER, &plain);
        assert_eq!((verdict, event), (TC_ACT_OK, None), "{delivery:?}");
        assert_eq!(out, plain);
    }
}

#[test]
#[ignore = "needs root (eBPF, BPF_PROG_TEST_RUN): cargo xtask test runs it"]
fn lookup_delivery_drops_a_frame_from_the_wire_dressed_as_a_decapsulated_one() {
    root();
    let programs = Programs::load_with(LoadTimeSettings {
        delivery: Delivery::Lookup,
        redirect_peer: false,
    });
    // Addressed, MAC and IP, to a local pod, as XDP leaves what it
    // decapsulated: TC would hand it to the pod, so XDP must not pass it.
    let mut forged = ipv4_udp_frame(REMOTE_POD, LOCAL_POD, 5000, 100);
    forged[0..6].copy_from_slice(&POD_MAC);
    forged[6..12].copy_from_slice(&PEER_MAC);
    let (verdict, _, event) = programs.run(names::PROG_UNDERLAY_INGRESS, &forged);
    assert_eq!(
        (verdict, event),
        (XDP_DROP, Some(DatapathEvent::DropForgedDelivery))
    );
    // The same addresses to the node's own MAC are the kernel's business.
    let mut routed = forged.clone();
    routed[0..6].copy_from_slice(&UNDERLAY_MAC);
    assert_eq!(
        programs.run(names::PROG_UNDERLAY_INGRESS, &routed),
        (XDP_PASS, routed.clone(), Some(DatapathEvent::NotOverlay))
    );
}

#[test]
#[ignore = "needs root (eBPF, BPF_PROG_TEST_RUN): cargo xtask test runs it"]
fn ingress_drops_each_defect_under_its_own_reason() {
    root();
    let programs = Programs::load();
    let good_inner = ipv4_udp_frame(REMOTE_POD, LOCAL_POD, 5000, 32);
    let good = vxlan_frame(0x08, VNI, &good_inner);

    let mut arp_inner = good_inner[..14].to_vec();
    arp_inner[12..14].copy_from_slice(&[0x08, 0x06]);
    arp_inner.extend_from_slice(&[0u8; 28]);
    let mut fragment = good.clone();
    fragment[20] = 0x20; // MF
    fragment[24..26].copy_from_slice(&[0, 0]);
    let fragment_check = checksum(&fragment[14..34]);
    fragment[24..26].copy_from_slice(&fragment_check.to_be_bytes());
    let mut lying_length = good.clone();
    lying_length[16..18].copy_from_slice(&2000u16.to_be_bytes());
    let mut inner_bad_version = good_inner.clone();
    inner_bad_version[14] = 0x65;
    let mut with_options = good[..34].to_vec();
    with_options[14] = 0x46;
    with_options.extend_from_slice(&[1, 1, 1, 0]); // four bytes of NOP options
    with_options.extend_from_slice(&good[34..]);

    let cases: Vec<(&str, Vec<u8>, DatapathEvent)> = vec![
        (
            "wrong VNI",
            vxlan_frame(0x08, VNI + 1, &good_inner),
            DatapathEvent::DropWrongVni,
        ),
        (
            "no I flag",
            vxlan_frame(0x00, VNI, &good_inner),
            DatapathEvent::DropMalformed,
        ),
        (
            "VXLAN header only",
            vxlan_frame(0x08, VNI, &[]),
            DatapathEvent::DropTruncated,
        ),
        (
            "inner frame cut short",
            vxlan_frame(0x08, VNI, &good_inner[..20]),
            DatapathEvent::DropTruncated,
        ),
        (
            "outer length beyond the frame",
            lying_length,
            DatapathEvent::DropTruncated,
        ),
        (
            "inner ARP",
            vxlan_frame(0x08, VNI, &arp_inner),
            DatapathEvent::DropInnerNotIpv4,
        ),
        (
            "inner not IPv4 version",
            vxlan_frame(0x08, VNI, &inner_bad_version),
            DatapathEvent::DropMalformed,
        ),
        ("outer fragment", fragment, DatapathEvent::DropMalformed),
        (
            "outer IP options",
            with_options,
            DatapathEvent::DropMalformed,
        ),
        (
            "unknown destination",
            vxlan_frame(
                0x08,
                VNI,
                &ipv4_udp_frame(REMOTE_POD, [198, 19, 1, 99], 5000, 32),
            ),
            DatapathEvent::DropUnknownDestination,
        ),
    ];
    for (case, frame, reason) in cases {
        let (verdict, _, event) = programs.run(names::PROG_UNDERLAY_INGRESS, &frame);
        assert_eq!((verdict, event), (XDP_DROP, Some(reason)), "{case}");
    }
}

#[test]
#[ignore = "needs root (eBPF, BPF_PROG_TEST_RUN): cargo xtask test runs it"]
fn ingress_passes_everything_that_is_not_vxlan_untouched() {
    root();
    let programs = Programs::load();
    let dns = ipv4_udp_frame([198, 18, 0, 2], [198, 18, 0, 1], 53, 40);
    assert_eq!(
        programs.run(names::PROG_UNDERLAY_INGRESS, &dns),
        (XDP_PASS, dns.clone(), Some(DatapathEvent::NotOverlay))
    );
    let mut arp = dns[..14].to_vec();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    assert_eq!(
        programs.run(names::PROG_UNDERLAY_INGRESS, &arp),
        (XDP_PASS, arp.clone(), Some(DatapathEvent::NotOverlay))
    );
}
