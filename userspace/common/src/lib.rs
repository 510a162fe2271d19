//! Types shared between Veil's eBPF programs and the userspace agent.
//!
//! Everything here is `#![no_std]` and `#[repr(C)]` because the same bytes are
//! read by the kernel-side programs (built for `bpfel-unknown-none`) and by the
//! agent through aya's map API. Changing a layout here changes the ABI between
//! the two halves: both are always built from the same commit and the agent
//! embeds the object, so there is no version skew to handle at runtime.
#![no_std]

pub mod counters;
pub mod load_time;
pub mod names;
pub mod overlay;
