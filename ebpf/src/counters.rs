//! Per-interface packet counters, shared by every program.

use aya_ebpf::{EbpfContext, macros::map, maps::PerCpuHashMap};
use aya_log_ebpf::info;
use veil_common::counters::{CounterKey, Hook, MAX_COUNTED_INTERFACES, PacketCounters};

#[map(name = "INTERFACE_COUNTERS")]
static INTERFACE_COUNTERS: PerCpuHashMap<CounterKey, PacketCounters> =
    PerCpuHashMap::with_max_entries(MAX_COUNTED_INTERFACES, 0);

/// `BPF_NOEXIST`: only the first CPU to see an interface creates its entry.
const BPF_NOEXIST: u64 = 1;

/// Counts one packet of `len` bytes seen by `hook` on `ifindex`.
///
/// The first packet on an interface is logged (through aya-log, into the
/// agent's log) so an operator sees each program start seeing traffic without
/// a per-packet logging cost.
#[inline(always)]
pub fn count_packet<C: EbpfContext>(ctx: &C, hook: Hook, ifindex: u32, len: u64) {
    let key = CounterKey {
        ifindex,
        hook: hook as u32,
    };
    if let Some(counters) = INTERFACE_COUNTERS.get_ptr_mut(&key) {
        // SAFETY: the pointer comes from a successful lookup of a per-CPU
        // value; only this CPU writes it while this program runs.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += len;
        }
        return;
    }
    let first = PacketCounters {
        packets: 1,
        bytes: len,
    };
    if INTERFACE_COUNTERS.insert(&key, &first, BPF_NOEXIST).is_ok() {
        match hook {
            Hook::UnderlayXdp => info!(ctx, "underlay xdp: first packet on ifindex {}", ifindex),
            Hook::PodEgressTc => info!(ctx, "pod egress tc: first packet on ifindex {}", ifindex),
            Hook::UnderlayDeliverTc => {
                info!(
                    ctx,
                    "underlay delivery tc: first packet on ifindex {}", ifindex
                )
            }
        }
    }
}
