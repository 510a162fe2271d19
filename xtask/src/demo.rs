//! `cargo xtask demo`: Veil on a two-node test bed, end to end, in under a minute.
//!
//! Builds everything, brings up 2 nodes × 2 pods in network namespaces, starts
//! an agent per node, sends traffic across nodes and within a node, shows what
//! each agent's `veilctl status` reports, then tears everything down. It ends
//! by itself; Ctrl-C ends it early, and teardown still runs.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use veil_testbed::{Agent, PodRef, Routing, Topology, TopologySpec, netns, traffic};

use crate::{
    ebpf, paths,
    shell::{self, step},
};

const TOPOLOGY_NAME: &str = "demo";
const TRANSFER_BYTES: u64 = 16 * 1024 * 1024;
const VNI: u32 = 4242;

pub fn run() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "the demo creates network namespaces and loads eBPF programs: run it as root \
             (e.g. `sudo -E cargo xtask demo`)"
        );
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = Arc::clone(&interrupted);
        ctrlc::set_handler(move || {
            eprintln!("\ninterrupted: finishing the current step, then tearing down");
            interrupted.store(true, Ordering::SeqCst);
        })
        .context("cannot install the Ctrl-C handler")?;
    }

    let object = ebpf::build()?;
    step("Building veil-agent and veilctl");
    shell::run(
        shell::cargo()
            .current_dir(paths::repo_root())
            .env("VEIL_EBPF_OBJECT", &object)
            .args(["build", "--quiet", "-p", "veil-agent", "-p", "veilctl"]),
    )?;

    let result = show(&interrupted);
    step("Tearing down");
    let left = netns::existing_with_prefix(&format!("veil-{TOPOLOGY_NAME}-"));
    if left.is_empty() {
        println!("    every namespace, link and agent of the demo is gone");
    } else {
        bail!("teardown left namespaces behind: {}", left.join(", "));
    }
    result
}

fn show(interrupted: &AtomicBool) -> Result<()> {
    let check = || {
        if interrupted.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        Ok(())
    };
    let spec = TopologySpec::new(TOPOLOGY_NAME)
        .nodes(2)
        .pods_per_node(2)
        .routing(Routing::None);
    step(&format!(
        "Building a test bed: {} nodes × {} pods, underlay MTU {}, pod MTU {}, no routes between nodes",
        spec.nodes,
        spec.pods_per_node,
        spec.underlay_mtu,
        spec.pod_mtu()
    ));
    let topology = Topology::build(spec)?;
    for pod in topology.pods() {
        println!(
            "    pod {pod}: {} (netns {})",
            pod.ip(),
            topology.pod(pod).name()
        );
    }
    check()?;

    let (a, b, c) = (PodRef::new(1, 1), PodRef::new(2, 1), PodRef::new(1, 2));
    step(&format!("Without Veil: ping {a} → {b} across nodes"));
    if traffic::ping(&topology, a, b.ip(), 1).is_ok() {
        bail!("pods reached each other without the overlay: the test bed is wrong");
    }
    println!("    unreachable, as expected: nothing routes between the nodes");
    check()?;

    step(&format!(
        "Starting veil-agent on each node (VXLAN overlay, VNI {VNI})"
    ));
    let agents: Vec<Agent> = (1..=2)
        .map(|node| Agent::start_overlay(&topology, node, VNI))
        .collect::<Result<_, _>>()?;
    for agent in &agents {
        println!("    node{}: ready", agent.node());
    }
    check()?;

    step(&format!(
        "ping {a} → {b} (across nodes) and {a} → {c} (same node)"
    ));
    traffic::ping(&topology, a, b.ip(), 3)?;
    traffic::ping(&topology, a, c.ip(), 3)?;
    println!("    all replies received");
    check()?;

    step(&format!(
        "TCP: {a} sends {} MiB to an echo server in {b}, checks every byte",
        TRANSFER_BYTES >> 20
    ));
    let report = traffic::tcp_echo(&topology, a, b, 7000, TRANSFER_BYTES)?;
    println!(
        "    {} MiB each way in {:.2?} over Veil's eBPF overlay (no encryption yet)",
        report.bytes >> 20,
        report.elapsed
    );
    check()?;

    // Let aya-log's ring buffer drain into the agents' logs.
    std::thread::sleep(Duration::from_millis(300));
    for agent in &agents {
        step(&format!("veilctl status on node{}", agent.node()));
        print!("{}", agent.veilctl(&["status"])?);
        let ebpf_lines: Vec<String> = agent
            .log()
            .lines()
            .filter(|l| l.contains("first packet"))
            .map(|l| format!("    {l}"))
            .collect();
        println!(
            "eBPF log lines in the agent's log:\n{}",
            ebpf_lines.join("\n")
        );
    }
    Ok(())
}
