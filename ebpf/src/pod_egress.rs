//! TC on the host side of each pod's veth. Its ingress hook sees every packet
//! the pod sends, before the node routes it. For now it counts and passes; the
//! overlay's encapsulation and the mTLS steering land here next.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use veil_common::counters::Hook;

use crate::counters::count_packet;

#[classifier]
pub fn veil_pod_egress(ctx: TcContext) -> i32 {
    // SAFETY: `skb` points at the kernel's `__sk_buff` for the whole run of
    // the program; reading `ifindex` is a plain context load.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    count_packet(&ctx, Hook::PodEgressTc, ifindex, u64::from(ctx.len()));
    TC_ACT_OK
}
