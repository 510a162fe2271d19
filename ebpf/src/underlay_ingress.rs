//! XDP on each node's underlay interface: everything that arrives from other
//! nodes passes here first. For now it counts and passes; the overlay's
//! decapsulation lands here next.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use veil_common::counters::Hook;

use crate::counters::count_packet;

#[xdp]
pub fn veil_underlay_ingress(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    count_packet(&ctx, Hook::UnderlayXdp, ctx.ingress_ifindex() as u32, len);
    xdp_action::XDP_PASS
}
