//! Veil's eBPF programs, one module per concern.
//!
//! Each program is a thin entry point that maps `try_*` → action, so the logic
//! reads as ordinary Rust with `?` (the shape of aya's template). The agent
//! embeds the object this crate builds and attaches the programs; map layouts
//! come from `veil-common` so both halves agree on them.
#![no_std]
#![no_main]

mod counters;
mod delivery;
mod frag_needed;
mod headers;
mod load_time;
mod mesh_steering;
mod mesh_time_wait;
mod overlay_maps;
mod pod_egress;
mod probes;
mod underlay_ingress;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic, so this is never executed.
    loop {}
}

/// The programs are dual-licensed so the kernel lets them call GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
