//! Programs that do nothing, for the agent's feature probes.
//!
//! Whether this kernel attaches XDP through a bpf_link and TC through tcx
//! is learnt by attaching these to `lo` for a moment: attaching is the only
//! honest test of an attach path, and these cannot disturb traffic while
//! they sit there.

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn veil_probe_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn veil_probe_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}
