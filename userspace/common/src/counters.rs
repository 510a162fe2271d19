//! Packet and byte counters kept by every Veil program, per interface.
//!
//! The map is per-CPU so programs increment without atomics; the agent sums
//! the per-CPU values when it reports them.

/// Which attachment point counted the packet.
///
/// Stored as a `u32` in [`CounterKey::hook`] so the key has no padding.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// XDP on the node's underlay interface: packets arriving from other nodes.
    UnderlayXdp = 0,
    /// TC ingress on a pod's host-side veth: packets leaving the pod.
    PodEgressTc = 1,
    /// TC ingress on the underlay: decapsulated packets (after GRO) handed to a pod.
    UnderlayDeliverTc = 2,
}

impl Hook {
    /// Decodes the raw value stored in a map key.
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::UnderlayXdp),
            1 => Some(Self::PodEgressTc),
            2 => Some(Self::UnderlayDeliverTc),
            _ => None,
        }
    }
}

/// Key of the interface counter map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CounterKey {
    /// Interface index in the node's network namespace.
    pub ifindex: u32,
    /// A [`Hook`] as `u32`.
    pub hook: u32,
}

/// Value of the interface counter map (one per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCounters {
    pub packets: u64,
    pub bytes: u64,
}

impl PacketCounters {
    /// Adds another CPU's (or another interval's) counts to these.
    pub const fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

/// Maximum number of (interface, hook) pairs counted per node.
pub const MAX_COUNTED_INTERFACES: u32 = 1024;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both types are `#[repr(C)]`, `Copy`, made only of integers, and
    // have no padding, so every bit pattern is a valid value.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::CounterKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::PacketCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_round_trips_through_raw() {
        for hook in [
            Hook::UnderlayXdp,
            Hook::PodEgressTc,
            Hook::UnderlayDeliverTc,
        ] {
            assert_eq!(Hook::from_raw(hook as u32), Some(hook));
        }
        assert_eq!(Hook::from_raw(7), None);
    }

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(core::mem::size_of::<CounterKey>(), 8);
        assert_eq!(core::mem::size_of::<PacketCounters>(), 16);
    }

    #[test]
    fn add_sums_both_fields() {
        let a = PacketCounters {
            packets: 2,
            bytes: 100,
        };
        let b = PacketCounters {
            packets: 3,
            bytes: 50,
        };
        assert_eq!(
            a.add(b),
            PacketCounters {
                packets: 5,
                bytes: 150
            }
        );
    }
}
