//! Load-time constants: how the agent tailors the programs to the kernel.
//!
//! The programs read these from `.rodata`; the agent writes them before the
//! object is loaded (aya's `EbpfLoader::override_global`), after probing the
//! running kernel. The kernel freezes `.rodata`, so the verifier sees each
//! value as a constant and never walks the branch it rules out: a helper the
//! kernel lacks can sit in the object without the object being refused.

/// Global: how decapsulated frames reach their pod ([`DELIVERY_METADATA`] or
/// [`DELIVERY_LOOKUP`]), a `u32`.
pub const GLOBAL_DELIVERY: &str = "VEIL_DELIVERY";
/// Global: whether TC may hand a packet straight into a pod's namespace with
/// `bpf_redirect_peer` (1) or must send it through the pod's veth pair with
/// `bpf_redirect` (0), a `u32`.
pub const GLOBAL_REDIRECT_PEER: &str = "VEIL_REDIRECT_PEER";

/// XDP tags each decapsulated frame in its metadata area
/// (`bpf_xdp_adjust_meta`); TC on the underlay delivers what carries a tag.
pub const DELIVERY_METADATA: u32 = 0;
/// XDP decapsulates without a tag; TC on the underlay finds the pod by the
/// inner destination (address and MAC) in the local endpoints. For kernels
/// that refuse `bpf_xdp_adjust_meta` in XDP.
pub const DELIVERY_LOOKUP: u32 = 1;
