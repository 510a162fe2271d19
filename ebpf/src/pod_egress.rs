//! TC on the host side of each pod's veth: its ingress hook sees every packet
//! the pod sends, before the node routes it.
//!
//! IPv4 to a pod on another node is VXLAN-encapsulated here and redirected
//! out of the underlay: `bpf_skb_adjust_room` with the ENCAP flags inserts
//! room for outer IPv4 + UDP + VXLAN + inner Ethernet after the MAC header and
//! tells the kernel where the inner headers are, so GSO super-packets stay
//! whole until the underlay device (or the kernel, in software) segments them.
//! Pod-to-pod on the same node, non-IPv4 and unknown destinations are left to
//! the kernel untouched. Meshed TCP is steered to the agent first
//! ([`crate::mesh_steering`]).

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_tunnel_key,
    },
    helpers::{bpf_get_hash_recalc, bpf_redirect, bpf_skb_set_tunnel_key},
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use veil_common::{
    counters::Hook,
    overlay::{DatapathEvent, OverlayConfig, SOURCE_PORT_BASE, SOURCE_PORT_MASK, VXLAN_PORT},
};

use crate::{
    counters::count_packet,
    frag_needed,
    headers::{
        ENCAP_ROOM, ETH_HLEN, ETH_P_IPV4, EncapHeaders, EthHdr, IPPROTO_UDP, IPV4_HLEN, Ipv4Hdr,
        UdpHdr, VxlanHdr, ipv4_checksum,
    },
    mesh_steering,
    overlay_maps::{NODE_ROUTES, count_event, local_endpoint, overlay_config},
};

/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner L2 header's length, in the top byte.
const ENCAP_L2_ETH_LEN: u64 = (ETH_HLEN as u64) << 56;

#[classifier]
pub fn veil_pod_egress(ctx: TcContext) -> i32 {
    // SAFETY: `skb` points at the kernel's `__sk_buff` for the whole run of
    // the program; reading `ifindex` is a plain context load.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    count_packet(&ctx, Hook::PodEgressTc, ifindex, u64::from(ctx.len()));
    match try_pod_egress(&ctx) {
        Ok(action) => action,
        Err(event) => {
            count_event(event);
            TC_ACT_SHOT as i32
        }
    }
}

fn try_pod_egress(ctx: &TcContext) -> Result<i32, DatapathEvent> {
    let pass = TC_ACT_OK as i32;
    let Ok(eth) = ctx.load::<EthHdr>(0) else {
        return Ok(pass);
    };
    if eth.ether_type != ETH_P_IPV4.to_be() {
        return Ok(pass);
    }
    let Ok(ip) = ctx.load::<Ipv4Hdr>(ETH_HLEN) else {
        return Ok(pass);
    };
    if let Some(verdict) = mesh_steering::steer(ctx, &ip) {
        return verdict;
    }
    if local_endpoint(&ip.daddr).is_some() {
        count_event(DatapathEvent::SameNode);
        return Ok(pass);
    }
    let (Some(node), Some(config)) = (NODE_ROUTES.get(Key::new(32, ip.daddr)), overlay_config())
    else {
        count_event(DatapathEvent::NoOverlayRoute);
        return Ok(pass);
    };

    // A GSO super-packet is segmented to the pod MTU later; anything else
    // must fit the underlay once encapsulated.
    // SAFETY: plain context loads from the kernel's `__sk_buff`.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let inner_l3_len = ctx.len().saturating_sub(ETH_HLEN as u32);
    // The outer IPv4 packet is the inner one plus everything encapsulation inserts.
    if gso_size == 0 && inner_l3_len + ENCAP_ROOM as u32 > config.underlay_mtu {
        count_event(DatapathEvent::DropTooBig);
        if frag_needed::wants_frag_needed(&ip) {
            let fits = config.underlay_mtu.saturating_sub(ENCAP_ROOM as u32) as u16;
            // SAFETY: plain context load from the kernel's `__sk_buff`.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            return Ok(frag_needed::reply(ctx, &eth, &ip, config, ifindex, fits));
        }
        return Ok(TC_ACT_SHOT as i32);
    }

    if config.tunnel_ifindex != 0 {
        return tunnel_device(ctx, &ip, node.underlay_ip, config);
    }

    // SAFETY: the helper only reads the skb the program was given.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let source_port = SOURCE_PORT_BASE | (hash as u16 & SOURCE_PORT_MASK);

    let flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
        | ENCAP_L2_ETH_LEN;
    ctx.adjust_room(ENCAP_ROOM as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| DatapathEvent::DropEncapFailed)?;

    let outer_l3_len = ctx.len() - ETH_HLEN as u32;
    let mut outer_ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: ip.tos,
        tot_len: (outer_l3_len as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: 64,
        protocol: IPPROTO_UDP,
        check: 0,
        saddr: config.underlay_ip,
        daddr: node.underlay_ip,
    };
    outer_ip.check = ipv4_checksum(&outer_ip);
    let headers = EncapHeaders {
        ip: outer_ip,
        udp: UdpHdr {
            source: source_port.to_be(),
            dest: VXLAN_PORT.to_be(),
            len: ((outer_l3_len - IPV4_HLEN as u32) as u16).to_be(),
            // A zero UDP checksum is allowed for VXLAN over IPv4 (RFC 7348).
            check: 0,
        },
        vxlan: VxlanHdr::new(config.vni),
        inner_eth: eth,
    };
    let outer_eth = EthHdr {
        dst: node.mac,
        src: config.underlay_mac,
        ether_type: ETH_P_IPV4.to_be(),
    };
    ctx.store(0, &outer_eth, 0)
        .and_then(|()| ctx.store(ETH_HLEN, &headers, 0))
        .map_err(|_| DatapathEvent::DropEncapFailed)?;
    count_event(DatapathEvent::Encapsulated);
    // SAFETY: redirecting to an interface index is always memory-safe; a
    // wrong index only makes the kernel drop the packet.
    Ok(unsafe { bpf_redirect(config.underlay_ifindex, 0) } as i32)
}

/// `encapsulation = "vxlan-device"`: the tunnel key (VNI, peer node, TOS)
/// goes with the packet to the collect_md vxlan device, which builds the
/// outer headers and routes them out of the underlay.
fn tunnel_device(
    ctx: &TcContext,
    ip: &Ipv4Hdr,
    peer: [u8; 4],
    config: &OverlayConfig,
) -> Result<i32, DatapathEvent> {
    // SAFETY: all-zero is a valid `bpf_tunnel_key` (plain integers).
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = config.vni;
    // The helper takes the address in host byte order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(peer);
    key.tunnel_tos = ip.tos;
    key.tunnel_ttl = 64;
    // SAFETY: the helper reads `size_of::<bpf_tunnel_key>()` bytes of `key`.
    let set = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if set != 0 {
        return Err(DatapathEvent::DropEncapFailed);
    }
    count_event(DatapathEvent::Encapsulated);
    // SAFETY: redirecting to an interface index is always memory-safe; a
    // wrong index only makes the kernel drop the packet.
    Ok(unsafe { bpf_redirect(config.tunnel_ifindex, 0) } as i32)
}
