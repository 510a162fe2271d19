//! Delivery of decapsulated frames: XDP strips them, TC hands them to the pod.
//!
//! XDP on the underlay sees MTU-sized frames one at a time. Redirecting each
//! one into a pod veth costs a frame-to-skb conversion and a NAPI pass per
//! frame on the pod side, and GRO only merges after that. Instead XDP strips
//! the outer headers and passes the frame: the underlay's GRO then merges the
//! inner TCP flow into super-packets, and TC ingress on the underlay
//! (`veil_underlay_deliver`) sends each merged packet straight into the pod's
//! namespace with `bpf_redirect_peer`, without the node's routing or a veth
//! queue.
//!
//! TC learns which frames XDP decapsulated, and for which pod, in one of two
//! ways, chosen by the agent at load time for the running kernel
//! ([`crate::load_time`]):
//!
//! - **metadata**: XDP writes the pod's veth into the frame's metadata area
//!   (`bpf_xdp_adjust_meta`). The area exists only for frames our XDP
//!   program passed, so a packet from the wire can never carry a tag.
//! - **lookup**, for kernels that refuse `bpf_xdp_adjust_meta` in XDP: TC
//!   looks the inner destination up in the local endpoints and delivers a
//!   frame whose destination MAC is that pod's, which is how XDP rewrote it.
//!   XDP drops any frame from the wire that looks like that
//!   (`drop-forged-delivery`), so again only our decapsulation delivers. It
//!   costs TC one hash lookup per (merged) IPv4 packet on the underlay.
//!
//! Kernels without `bpf_redirect_peer` get `bpf_redirect` to the pod's
//! host-side veth instead: the packet then crosses the veth pair (one more
//! queue and softirq pass) rather than landing in the pod's namespace.

use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::{bpf_redirect, bpf_redirect_peer, bpf_xdp_adjust_meta},
    macros::classifier,
    programs::{TcContext, XdpContext},
};
use veil_common::{
    counters::Hook,
    overlay::{DELIVERY_TAG_MAGIC, DeliveryTag},
};

use crate::{
    counters::count_packet,
    headers::{ETH_HLEN, ETH_P_IPV4, EthHdr},
    load_time,
    overlay_maps::local_endpoint,
};

const TAG_LEN: usize = core::mem::size_of::<DeliveryTag>();
/// Offset of the IPv4 destination address in an Ethernet frame.
const IPV4_DESTINATION: usize = ETH_HLEN + 16;

/// Writes a delivery tag for `ifindex` in front of the frame. False if the
/// driver has no metadata room (the caller then redirects the frame itself).
/// Only called under [`load_time::delivers_by_metadata`].
#[inline(always)]
pub fn tag(ctx: &XdpContext, ifindex: u32) -> bool {
    // SAFETY: the helper checks the new metadata start against the frame's headroom.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(TAG_LEN as i32)) } != 0 {
        return false;
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    if meta + TAG_LEN > data {
        return false;
    }
    // SAFETY: the bounds check above keeps the write inside the metadata area.
    unsafe {
        *(meta as *mut DeliveryTag) = DeliveryTag {
            magic: DELIVERY_TAG_MAGIC,
            ifindex,
        };
    }
    true
}

#[classifier]
pub fn veil_underlay_deliver(ctx: TcContext) -> i32 {
    let pod = if load_time::delivers_by_metadata() {
        tagged_pod(&ctx)
    } else {
        addressed_pod(&ctx)
    };
    let Some(ifindex) = pod else {
        return TC_ACT_OK as i32;
    };
    // SAFETY: plain context load from the kernel's `__sk_buff`.
    let underlay = unsafe { (*ctx.skb.skb).ifindex };
    count_packet(
        &ctx,
        Hook::UnderlayDeliverTc,
        underlay,
        u64::from(ctx.len()),
    );
    // SAFETY: redirecting to an interface index is always memory-safe; a
    // wrong index only makes the kernel drop the packet.
    unsafe {
        if load_time::redirects_to_peer() {
            bpf_redirect_peer(ifindex, 0) as i32
        } else {
            bpf_redirect(ifindex, 0) as i32
        }
    }
}

/// The pod veth XDP named in the packet's metadata, if it carries a tag.
#[inline(always)]
fn tagged_pod(ctx: &TcContext) -> Option<u32> {
    // SAFETY: plain context loads from the kernel's `__sk_buff`.
    let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta, (*ctx.skb.skb).data) };
    let (meta, data) = (meta as usize, data as usize);
    if meta + TAG_LEN > data {
        return None;
    }
    // SAFETY: the bounds check above keeps the read inside the metadata area.
    let tag = unsafe { *(meta as *const DeliveryTag) };
    (tag.magic == DELIVERY_TAG_MAGIC).then_some(tag.ifindex)
}

/// The pod veth of a local pod the packet is addressed to, MAC and IP, as
/// XDP leaves a frame it decapsulated.
#[inline(always)]
fn addressed_pod(ctx: &TcContext) -> Option<u32> {
    let eth = ctx.load::<EthHdr>(0).ok()?;
    if eth.ether_type != ETH_P_IPV4.to_be() {
        return None;
    }
    let destination = ctx.load::<[u8; 4]>(IPV4_DESTINATION).ok()?;
    let endpoint = local_endpoint(&destination)?;
    (endpoint.pod_mac == eth.dst).then_some(endpoint.ifindex)
}

/// Whether a frame that is not ours looks like one XDP decapsulated for a
/// local pod (see the module docs): `lookup` delivery would hand it over.
#[inline(always)]
pub fn looks_decapsulated(eth: &EthHdr, destination: &[u8; 4]) -> bool {
    eth.ether_type == ETH_P_IPV4.to_be()
        && local_endpoint(destination).is_some_and(|endpoint| endpoint.pod_mac == eth.dst)
}
