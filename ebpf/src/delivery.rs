//! Delivery of decapsulated frames: XDP tags them, TC hands them to the pod.
//!
//! XDP on the underlay sees MTU-sized frames one at a time. Redirecting each
//! one into a pod veth costs a frame-to-skb conversion and a NAPI pass per
//! frame on the pod side, and GRO only merges after that. Instead XDP strips
//! the outer headers, writes the pod's veth into the frame's metadata and
//! passes it: the underlay's GRO then merges the inner TCP flow into
//! super-packets, and TC ingress on the underlay (`veil_underlay_deliver`)
//! sends each merged packet straight into the pod's namespace with
//! `bpf_redirect_peer`, without the node's routing or a veth queue.
//!
//! The metadata area exists only for frames our XDP program passed, so a
//! packet from the wire can never carry a tag.

use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::{bpf_redirect_peer, bpf_xdp_adjust_meta},
    macros::classifier,
    programs::{TcContext, XdpContext},
};
use veil_common::{
    counters::Hook,
    overlay::{DELIVERY_TAG_MAGIC, DeliveryTag},
};

use crate::counters::count_packet;

const TAG_LEN: usize = core::mem::size_of::<DeliveryTag>();

/// Writes a delivery tag for `ifindex` in front of the frame. False if the
/// driver has no metadata room (the caller then redirects the frame itself).
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
    // SAFETY: plain context loads from the kernel's `__sk_buff`.
    let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta, (*ctx.skb.skb).data) };
    let (meta, data) = (meta as usize, data as usize);
    if meta + TAG_LEN > data {
        return TC_ACT_OK as i32;
    }
    // SAFETY: the bounds check above keeps the read inside the metadata area.
    let tag = unsafe { *(meta as *const DeliveryTag) };
    if tag.magic != DELIVERY_TAG_MAGIC {
        return TC_ACT_OK as i32;
    }
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
    unsafe { bpf_redirect_peer(tag.ifindex, 0) as i32 }
}
