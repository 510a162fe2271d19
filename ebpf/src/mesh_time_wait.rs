//! A new meshed connection that meets the TIME_WAIT of an old one.
//!
//! When a server closes first, the client node's agent closes the pod-facing
//! socket first too, so that node keeps the connection's TIME_WAIT for a
//! minute. A busy client pod reuses source ports within that minute, and its
//! new SYN carries the same addresses and ports. The pod-egress program
//! finds the TIME_WAIT and assigns the SYN to it. The kernel accepts a new
//! SYN on a TIME_WAIT only if a listener is found for the original
//! destination (a remote pod's address and port), and on this node none is:
//! the agent listens on 127.0.0.1:15001. Without this program the kernel
//! answers for the old connection and the client retries a second later.
//!
//! Giving the SYN straight to the agent's listener does not work either: the
//! kernel refuses to queue a connection request beside a TIME_WAIT with the
//! same addresses. So this `sk_lookup` program answers the kernel's listener
//! lookup instead: for TCP to a meshed pod on another node (the only way
//! such an address reaches a local listener lookup is this one), it selects
//! the agent's transparent listener, which the agent puts in
//! `MESH_LISTENER`. The kernel then retires the TIME_WAIT and hands the SYN
//! to the listener, as it would for a listener of its own.

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    macros::{map, sk_lookup},
    maps::SockMap,
    programs::SkLookupContext,
};
use veil_common::overlay::MESH_MODE_DISABLED;

use crate::{
    headers::IPPROTO_TCP,
    overlay_maps::{MESH_PEERS, port_mode},
};

/// Index 0: the agent's transparent outbound listener (127.0.0.1:15001).
#[map(name = "MESH_LISTENER")]
static MESH_LISTENER: SockMap = SockMap::with_max_entries(1, 0);

#[sk_lookup]
pub fn veil_mesh_time_wait(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands the program a valid `bpf_sk_lookup`; the
    // fields are read once.
    let (protocol, local_ip4, local_port) = unsafe {
        let lookup = &*ctx.lookup;
        (lookup.protocol, lookup.local_ip4, lookup.local_port)
    };
    if protocol != u32::from(IPPROTO_TCP) {
        return SK_PASS;
    }
    // `local_ip4` is in network order, so its bytes in memory are the
    // address as the maps key it.
    let destination = local_ip4.to_ne_bytes();
    let Some(peer_mode) = MESH_PEERS.get_ptr(&destination) else {
        return SK_PASS;
    };
    // SAFETY: the pointer comes from a successful lookup and is read at once.
    let port_be = (local_port as u16).to_be();
    if port_mode(&destination, port_be, unsafe { *peer_mode }) == MESH_MODE_DISABLED {
        return SK_PASS;
    }
    // Without a listener in the map (no mesh) the lookup goes on as usual.
    let _ = MESH_LISTENER.redirect_sk_lookup(&ctx, 0, 0);
    SK_PASS
}
