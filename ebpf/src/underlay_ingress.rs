//! XDP on each node's underlay interface: everything that arrives from other
//! nodes passes here first.
//!
//! VXLAN on our port is ours: it is checked (outer headers, VNI, inner
//! headers, a local destination) and decapsulated in place, then passed on
//! to GRO; TC ingress on the underlay delivers the merged packets
//! ([`crate::delivery`], which also says how TC knows them). With
//! `metadata` delivery, where the driver has no metadata room, the frame is
//! redirected into the pod's veth through a device map instead. Anything
//! that fails a check is dropped and counted by reason — never forwarded.
//! Traffic that is not VXLAN on our port passes untouched, except, with
//! `lookup` delivery, a frame dressed as one we decapsulated.

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_xdp_adjust_head, macros::xdp, programs::XdpContext,
};
use veil_common::{
    counters::Hook,
    overlay::{DatapathEvent, MESH_MODE_DISABLED, MESH_MODE_STRICT, VXLAN_PORT},
};

use crate::{
    counters::count_packet,
    delivery,
    headers::{
        ENCAP_ROOM, ETH_HLEN, ETH_P_IPV4, EthHdr, IP_MF_AND_OFFSET, IPPROTO_TCP, IPPROTO_UDP,
        IPV4_HLEN, Ipv4Hdr, TcpPorts, UDP_HLEN, UdpHdr, VXLAN_FLAG_VNI, VXLAN_HLEN, VxlanHdr,
    },
    load_time,
    overlay_maps::{
        POD_DEVICES, count_event, local_endpoint, overlay_config, plaintext_denied, port_mode,
    },
};

/// Offsets of the headers inside an overlay frame.
const OUTER_IP: usize = ETH_HLEN;
const OUTER_UDP: usize = OUTER_IP + IPV4_HLEN;
const VXLAN: usize = OUTER_UDP + UDP_HLEN;
const INNER_ETH: usize = VXLAN + VXLAN_HLEN;
const INNER_IP: usize = INNER_ETH + ETH_HLEN;

#[xdp]
pub fn veil_underlay_ingress(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    count_packet(&ctx, Hook::UnderlayXdp, ctx.ingress_ifindex() as u32, len);
    match try_underlay_ingress(&ctx) {
        Ok(action) => action,
        Err(event) => {
            count_event(event);
            xdp_action::XDP_DROP
        }
    }
}

/// A pointer to a `T` at `offset`, if the frame is long enough to hold it.
#[inline(always)]
fn header<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data() + offset;
    (start + core::mem::size_of::<T>() <= ctx.data_end()).then_some(start as *mut T)
}

fn try_underlay_ingress(ctx: &XdpContext) -> Result<u32, DatapathEvent> {
    let pass = xdp_action::XDP_PASS;
    // Not ours unless it is IPv4/UDP to the VXLAN port: leave it to the kernel.
    let (Some(eth), Some(ip)) = (header::<EthHdr>(ctx, 0), header::<Ipv4Hdr>(ctx, OUTER_IP)) else {
        count_event(DatapathEvent::NotOverlay);
        return Ok(pass);
    };
    // SAFETY: `header` checked that both headers lie inside the frame.
    let (eth, ip) = unsafe { (*eth, *ip) };
    if eth.ether_type != ETH_P_IPV4.to_be()
        || ip.protocol != IPPROTO_UDP
        || ip.version_ihl >> 4 != 4
    {
        return not_overlay(&eth, &ip);
    }
    let header_len = usize::from(ip.version_ihl & 0x0f) * 4;
    let Some(udp) = header::<UdpHdr>(ctx, OUTER_IP + header_len.min(60)) else {
        return not_overlay(&eth, &ip);
    };
    // SAFETY: bounds checked by `header`.
    if unsafe { (*udp).dest } != VXLAN_PORT.to_be() {
        return not_overlay(&eth, &ip);
    }

    // From here on the frame claims to be ours: every defect is a drop.
    let Some(config) = overlay_config() else {
        return Err(DatapathEvent::DropWrongVni);
    };
    if header_len != IPV4_HLEN || u16::from_be(ip.frag_off) & IP_MF_AND_OFFSET != 0 {
        // We never send IP options or fragments; nobody else should either.
        return Err(DatapathEvent::DropMalformed);
    }
    let frame_len = ctx.data_end() - ctx.data();
    if usize::from(u16::from_be(ip.tot_len)) + ETH_HLEN > frame_len {
        return Err(DatapathEvent::DropTruncated);
    }
    let Some(vxlan) = header::<VxlanHdr>(ctx, VXLAN) else {
        return Err(DatapathEvent::DropTruncated);
    };
    // SAFETY: bounds checked by `header`.
    let vxlan = unsafe { *vxlan };
    if vxlan.flags[0] & VXLAN_FLAG_VNI == 0 {
        return Err(DatapathEvent::DropMalformed);
    }
    if vxlan.vni() != config.vni {
        return Err(DatapathEvent::DropWrongVni);
    }
    let (Some(inner_eth), Some(inner_ip)) = (
        header::<EthHdr>(ctx, INNER_ETH),
        header::<Ipv4Hdr>(ctx, INNER_IP),
    ) else {
        return Err(DatapathEvent::DropTruncated);
    };
    // SAFETY: bounds checked by `header`.
    let (inner_type, inner_ip) = unsafe { ((*inner_eth).ether_type, *inner_ip) };
    if inner_type != ETH_P_IPV4.to_be() {
        return Err(DatapathEvent::DropInnerNotIpv4);
    }
    if inner_ip.version_ihl >> 4 != 4 || inner_ip.version_ihl & 0x0f < 5 {
        return Err(DatapathEvent::DropMalformed);
    }
    let Some(endpoint) = local_endpoint(&inner_ip.daddr) else {
        return Err(DatapathEvent::DropUnknownDestination);
    };
    // Meshed traffic reaches a pod through the agents (:15008 on the
    // underlay), never as overlay TCP: this is plaintext from outside the mesh.
    if inner_ip.protocol == IPPROTO_TCP {
        let inner_header_len = usize::from(inner_ip.version_ihl & 0x0f) * 4;
        let Some(ports) = header::<TcpPorts>(ctx, INNER_IP + inner_header_len.min(60)) else {
            return Err(DatapathEvent::DropTruncated);
        };
        // SAFETY: bounds checked by `header`.
        let destination_port = unsafe { (*ports).dest };
        if port_mode(&inner_ip.daddr, destination_port, endpoint.mode) == MESH_MODE_STRICT {
            return Err(DatapathEvent::DropPlaintextToStrict);
        }
        // Only meshed pods have verdicts: skip the lookup for the others.
        if endpoint.mode != MESH_MODE_DISABLED
            && plaintext_denied(&inner_ip.daddr, destination_port)
        {
            return Err(DatapathEvent::DropPlaintextUnauthorized);
        }
    }

    // The inner frame now goes from this node's veth to the pod.
    // SAFETY: bounds checked by `header` above; nothing has moved the data since.
    unsafe {
        (*inner_eth).dst = endpoint.pod_mac;
        (*inner_eth).src = endpoint.host_mac;
    }
    // SAFETY: the helper checks the new start against the frame itself.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, ENCAP_ROOM as i32) } != 0 {
        return Err(DatapathEvent::DropMalformed);
    }
    count_event(DatapathEvent::Decapsulated);
    // GRO on the underlay merges the inner flow, then TC delivers it: by
    // its tag, or (`lookup`) by the pod MAC and address just written.
    if !load_time::delivers_by_metadata() || delivery::tag(ctx, endpoint.ifindex) {
        return Ok(pass);
    }
    POD_DEVICES
        .redirect(endpoint.ifindex, 0)
        .map_err(|_| DatapathEvent::DropUnknownDestination)
}

/// A frame that is not VXLAN on our port: the kernel's, untouched. With
/// `lookup` delivery, one addressed like a frame we decapsulated would be
/// handed to the pod by TC without the node's routing: it is dropped.
#[inline(always)]
fn not_overlay(eth: &EthHdr, ip: &Ipv4Hdr) -> Result<u32, DatapathEvent> {
    if load_time::delivers_by_lookup() && delivery::looks_decapsulated(eth, &ip.daddr) {
        return Err(DatapathEvent::DropForgedDelivery);
    }
    count_event(DatapathEvent::NotOverlay);
    Ok(xdp_action::XDP_PASS)
}
