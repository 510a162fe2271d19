//! The agent's load-time choices for this kernel (see
//! `veil_common::load_time`), read from `.rodata`.
//!
//! Each is a constant to the verifier, so the branch a value rules out is
//! never verified: its helpers may be ones this kernel refuses.

use aya_ebpf::Global;
use veil_common::load_time::{DELIVERY_LOOKUP, DELIVERY_METADATA};

/// `veil_common::load_time::GLOBAL_DELIVERY`.
#[unsafe(no_mangle)]
static VEIL_DELIVERY: Global<u32> = Global::new(DELIVERY_METADATA);

/// `veil_common::load_time::GLOBAL_REDIRECT_PEER`.
#[unsafe(no_mangle)]
static VEIL_REDIRECT_PEER: Global<u32> = Global::new(1);

/// XDP tags decapsulated frames in their metadata for TC to deliver.
#[inline(always)]
pub fn delivers_by_metadata() -> bool {
    VEIL_DELIVERY.load() == DELIVERY_METADATA
}

/// TC finds the pod of a decapsulated frame by its inner destination.
#[inline(always)]
pub fn delivers_by_lookup() -> bool {
    VEIL_DELIVERY.load() == DELIVERY_LOOKUP
}

/// `bpf_redirect_peer` may be used to enter a pod's namespace.
#[inline(always)]
pub fn redirects_to_peer() -> bool {
    VEIL_REDIRECT_PEER.load() != 0
}
