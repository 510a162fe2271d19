//! Interception of meshed TCP, without iptables.
//!
//! Runs inside the pod-egress program (TC ingress of the pod's host-side
//! veth), before the overlay decides anything. A TCP packet from a meshed
//! local pod to a meshed pod on another node never leaves the node as
//! plaintext:
//!
//! - a packet of a flow the agent already holds a socket for (the accepted
//!   side of an intercepted connection on the client node, or the agent's
//!   transparent dial to the pod on the server node) is assigned to that
//!   socket with `bpf_sk_assign`;
//! - a new connection (a SYN) is assigned to the agent's transparent
//!   listener on 127.0.0.1:15001; the accepted socket's local address is the
//!   original destination, so the agent needs no map to find it;
//! - every such packet gets [`MESH_MARK`]: a policy routing rule the agent
//!   installs routes marked packets to a `local` route, so the node delivers
//!   them to the socket instead of forwarding them.
//!
//! With no listener (the agent is down) the SYN is dropped and counted:
//! meshed traffic fails closed. Same-node traffic stays plaintext and goes
//! straight to the pod, except from a non-meshed pod to a STRICT one or to
//! a port that allow rules select (`PLAINTEXT_VERDICTS`), which is dropped,
//! and a meshed pod's connection that the allow rules refuse
//! (`SAME_NODE_VERDICTS`), which the agent takes and resets.

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, TC_ACT_OK, bpf_sock_tuple},
    helpers::{bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use veil_common::overlay::{
    DatapathEvent, LocalEndpoint, MESH_MARK, MESH_MODE_DISABLED, MESH_MODE_STRICT,
    OUTBOUND_PROXY_PORT,
};

use crate::{
    headers::{ETH_HLEN, IPPROTO_TCP, IPV4_HLEN, Ipv4Hdr, TCP_FLAG_ACK, TCP_FLAG_SYN, TcpPorts},
    overlay_maps::{
        MESH_PEERS, count_event, local_endpoint, plaintext_denied, port_mode, same_node_denied,
    },
};

/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;
/// Size of the IPv4 part of `struct bpf_sock_tuple`.
const IPV4_TUPLE_LEN: u32 = 12;
/// `BPF_TCP_LISTEN` in `struct bpf_sock`'s `state`.
const TCP_LISTEN: u32 = 10;

/// What the mesh makes of a packet from a local pod: `None` when the mesh
/// has no say (the overlay handles it), else the program's verdict.
#[inline(always)]
pub fn steer(ctx: &TcContext, ip: &Ipv4Hdr) -> Option<Result<i32, DatapathEvent>> {
    if ip.protocol != IPPROTO_TCP {
        return None;
    }
    let source = local_endpoint(&ip.saddr)?;
    let header_len = usize::from(ip.version_ihl & 0x0f) * 4;
    if !(IPV4_HLEN..=60).contains(&header_len) {
        return None;
    }
    let tcp_offset = ETH_HLEN + header_len;
    let (Ok(ports), Ok(flags)) = (
        ctx.load::<TcpPorts>(tcp_offset),
        ctx.load::<u8>(tcp_offset + TCP_FLAGS_OFFSET),
    ) else {
        return None;
    };
    if let Some(destination) = local_endpoint(&ip.daddr) {
        let mode = port_mode(&ip.daddr, ports.dest, destination.mode);
        if let Some(verdict) = same_node(&source, mode, &ip.daddr, ports.dest) {
            return Some(verdict);
        }
        if source.mode == MESH_MODE_DISABLED
            || mode == MESH_MODE_DISABLED
            || !same_node_denied(&ip.saddr, &ip.daddr, ports.dest)
        {
            return None;
        }
        // The allow rules refuse it: the agent takes the connection and
        // resets it, counting why. A packet of a flow the agent does not
        // hold goes on as it is: the way back of an admitted connection is
        // looked up under the other pod's rules.
        return to_agent(
            ctx,
            ip,
            &ports,
            flags,
            DatapathEvent::MeshSameNodeDenied,
            Stray::PassOn,
        );
    }
    if source.mode == MESH_MODE_DISABLED {
        return None;
    }
    let peer_mode = MESH_PEERS.get_ptr(&ip.daddr)?;
    // SAFETY: the pointer comes from a successful lookup and is read at once.
    if port_mode(&ip.daddr, ports.dest, unsafe { *peer_mode }) == MESH_MODE_DISABLED {
        return None;
    }
    to_agent(
        ctx,
        ip,
        &ports,
        flags,
        DatapathEvent::MeshSteered,
        Stray::AnswerLocally,
    )
}

/// What becomes of a segment of a flow the agent holds no socket for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stray {
    /// The node answers it (RST) rather than letting it out in plaintext.
    AnswerLocally,
    /// It goes on to its destination untouched.
    PassOn,
}

/// Hands a packet to the agent: to the socket it holds for the flow, or a
/// new connection (a SYN) to its transparent listener, counted as
/// `new_connection`. `None`: a stray the kernel handles as usual.
#[inline(always)]
fn to_agent(
    ctx: &TcContext,
    ip: &Ipv4Hdr,
    ports: &TcpPorts,
    flags: u8,
    new_connection: DatapathEvent,
    stray: Stray,
) -> Option<Result<i32, DatapathEvent>> {
    let mut tuple = ipv4_tuple(ip, ports.source, ports.dest);
    if let Some(state) = assign(ctx, &mut tuple) {
        // The lookup finds the agent's listener itself for a new connection
        // to a remote pod (through `veil_mesh_time_wait`, see `mesh_time_wait`).
        let event = if state == TCP_LISTEN {
            new_connection
        } else {
            DatapathEvent::MeshFlow
        };
        return Some(Ok(deliver_locally(ctx, event)));
    }
    if flags & TCP_FLAG_SYN != 0 && flags & TCP_FLAG_ACK == 0 {
        let mut listener = bpf_sock_tuple {
            __bindgen_anon_1: aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1 {
                ipv4: aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                    saddr: u32::from_ne_bytes(ip.saddr),
                    daddr: u32::from_ne_bytes([127, 0, 0, 1]),
                    sport: ports.source,
                    dport: OUTBOUND_PROXY_PORT.to_be(),
                },
            },
        };
        if assign(ctx, &mut listener).is_none() {
            return Some(Err(DatapathEvent::DropNoProxy));
        }
        return Some(Ok(deliver_locally(ctx, new_connection)));
    }
    match stray {
        Stray::AnswerLocally => Some(Ok(deliver_locally(ctx, DatapathEvent::MeshFlow))),
        Stray::PassOn => None,
    }
}

/// Same-node pod to pod: plaintext is fine inside the mesh, but a STRICT pod
/// (or STRICT port) takes no plaintext from a pod outside it, nor does a
/// port that allow rules select (such a pod proves no identity).
#[inline(always)]
fn same_node(
    source: &LocalEndpoint,
    destination_mode: u32,
    destination: &[u8; 4],
    port_be: u16,
) -> Option<Result<i32, DatapathEvent>> {
    if source.mode != MESH_MODE_DISABLED {
        return None;
    }
    if destination_mode == MESH_MODE_STRICT {
        return Some(Err(DatapathEvent::DropPlaintextToStrict));
    }
    // Only meshed pods' open ports have verdicts: skip the lookup for the rest.
    if destination_mode != MESH_MODE_DISABLED && plaintext_denied(destination, port_be) {
        return Some(Err(DatapathEvent::DropPlaintextUnauthorized));
    }
    None
}

#[inline(always)]
fn ipv4_tuple(ip: &Ipv4Hdr, source_port: u16, destination_port: u16) -> bpf_sock_tuple {
    bpf_sock_tuple {
        __bindgen_anon_1: aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1 {
            ipv4: aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: u32::from_ne_bytes(ip.saddr),
                daddr: u32::from_ne_bytes(ip.daddr),
                sport: source_port,
                dport: destination_port,
            },
        },
    }
}

/// Looks up the TCP socket for `tuple` in this namespace and assigns the
/// packet to it. The socket's state when the packet now belongs to it.
#[inline(always)]
fn assign(ctx: &TcContext, tuple: &mut bpf_sock_tuple) -> Option<u32> {
    // SAFETY: the tuple lives on the stack for the call and its IPv4 part is
    // `IPV4_TUPLE_LEN` bytes; the returned socket reference is released below
    // on every path, as the verifier demands.
    unsafe {
        let socket = bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut _,
            tuple,
            IPV4_TUPLE_LEN,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if socket.is_null() {
            return None;
        }
        let state = (*socket).state;
        let assigned = bpf_sk_assign(ctx.skb.skb as *mut _, socket as *mut _, 0);
        bpf_sk_release(socket as *mut _);
        (assigned == 0).then_some(state)
    }
}

#[inline(always)]
fn deliver_locally(ctx: &TcContext, event: DatapathEvent) -> i32 {
    ctx.set_mark(MESH_MARK);
    count_event(event);
    TC_ACT_OK as i32
}
