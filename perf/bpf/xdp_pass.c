// SPDX-License-Identifier: GPL-2.0
//
// The underlay program of the `direct-xdp` and `kernel-vxlan-xdp` baselines: every frame passes
// untouched. It exists to measure what attaching any native XDP program to
// a veth underlay costs (the peer loses GSO, every frame is copied into a
// page-pool buffer), so Veil's overlay can also be compared with the kernel
// vxlan device under the same condition. No headers: XDP_PASS is 2.

__attribute__((section("xdp"), used)) int xdp_pass(void *ctx)
{
	(void)ctx;
	return 2;
}

char _license[] __attribute__((section("license"), used)) = "GPL";
