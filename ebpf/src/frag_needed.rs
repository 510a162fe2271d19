//! ICMP "fragmentation needed" for packets that cannot cross the overlay.
//!
//! A pod whose MTU is set right (the underlay's minus 50) never sends such a
//! packet; one that is misconfigured, or that forwards for others, does. A
//! packet with DF set is turned, in place, into the ICMP error a router would
//! send (type 3, code 4, carrying the largest size that fits) and bounced back
//! out of the pod's veth, so path-MTU discovery converges instead of the
//! packet vanishing.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use veil_common::overlay::OverlayConfig;

use crate::headers::{ETH_HLEN, ETH_P_IPV4, EthHdr, IPV4_HLEN, Ipv4Hdr, ipv4_checksum};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// The "don't fragment" flag of `frag_off`.
const IP_DF: u16 = 0x4000;
/// Bytes of the offending datagram's payload quoted back (RFC 792: 64 bits).
const QUOTED_PAYLOAD: usize = 8;

#[repr(C)]
#[derive(Clone, Copy)]
struct FragNeeded {
    eth: EthHdr,
    ip: Ipv4Hdr,
    icmp_type: u8,
    icmp_code: u8,
    icmp_check: u16,
    unused: u16,
    next_hop_mtu: u16,
    quoted_ip: Ipv4Hdr,
    quoted_payload: [u8; QUOTED_PAYLOAD],
}

const REPLY_LEN: usize = core::mem::size_of::<FragNeeded>();

/// Whether the too-big packet asked not to be fragmented.
pub fn wants_frag_needed(ip: &Ipv4Hdr) -> bool {
    u16::from_be(ip.frag_off) & IP_DF != 0 && ip.version_ihl == 0x45
}

/// Rewrites the packet into an ICMP "fragmentation needed" for its sender and
/// sends it back out of the interface it came from.
pub fn reply(
    ctx: &TcContext,
    eth: &EthHdr,
    ip: &Ipv4Hdr,
    config: &OverlayConfig,
    ifindex: u32,
    mtu: u16,
) -> i32 {
    let Ok(quoted_payload) = ctx.load::<[u8; QUOTED_PAYLOAD]>(ETH_HLEN + IPV4_HLEN) else {
        return TC_ACT_SHOT as i32;
    };
    let mut reply = FragNeeded {
        eth: EthHdr {
            dst: eth.src,
            src: eth.dst,
            ether_type: ETH_P_IPV4.to_be(),
        },
        ip: Ipv4Hdr {
            version_ihl: 0x45,
            tos: 0xc0,
            tot_len: ((REPLY_LEN - ETH_HLEN) as u16).to_be(),
            id: 0,
            frag_off: 0,
            ttl: 64,
            protocol: IPPROTO_ICMP,
            check: 0,
            saddr: config.underlay_ip,
            daddr: ip.saddr,
        },
        icmp_type: ICMP_DEST_UNREACH,
        icmp_code: ICMP_FRAG_NEEDED,
        icmp_check: 0,
        unused: 0,
        next_hop_mtu: mtu.to_be(),
        quoted_ip: *ip,
        quoted_payload,
    };
    reply.ip.check = ipv4_checksum(&reply.ip);
    reply.icmp_check = icmp_checksum(&reply);
    // SAFETY: the helpers only touch the skb the program was given.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, REPLY_LEN as u32, 0) } != 0 {
        return TC_ACT_SHOT as i32;
    }
    if ctx.store(0, &reply, 0).is_err() {
        return TC_ACT_SHOT as i32;
    }
    // SAFETY: redirecting to an interface index is always memory-safe.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

fn icmp_checksum(reply: &FragNeeded) -> u16 {
    // SAFETY: `FragNeeded` is plain bytes and integers without padding; the
    // ICMP part starts right after the two headers and is ICMP_LEN long.
    let bytes: &[u8; REPLY_LEN] =
        unsafe { &*(reply as *const FragNeeded as *const [u8; REPLY_LEN]) };
    let mut sum: u32 = 0;
    let mut i = ETH_HLEN + IPV4_HLEN;
    while i + 1 < REPLY_LEN {
        sum += u32::from(u16::from_ne_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
