//! `cargo xtask demo`: Veil on a two-node test bed, end to end, in under a minute.
//!
//! Builds everything, brings up 2 nodes × 2 pods in network namespaces, starts
//! an agent per node, sends plaintext overlay traffic and meshed (mTLS)
//! traffic across nodes, shows a STRICT pod refusing plaintext, shows what
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
use veil_testbed::{
    Agent, MeshCaFiles, PodMesh, PodRef, Routing, Topology, TopologySpec, netns, traffic,
};

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
    let mut topology = Topology::build(spec)?;
    let (a, b, c, d) = (
        PodRef::new(1, 1),
        PodRef::new(2, 1),
        PodRef::new(1, 2),
        PodRef::new(2, 2),
    );
    topology.set_mesh(a, Some(PodMesh::new("shop", "cart", "permissive")));
    topology.set_mesh(b, Some(PodMesh::new("shop", "checkout", "strict")));
    for pod in topology.pods() {
        let mesh = match pod {
            p if p == a => "meshed as shop/cart",
            p if p == b => "meshed as shop/checkout, STRICT",
            _ => "not meshed",
        };
        println!(
            "    pod {pod}: {} (netns {}), {mesh}",
            pod.ip(),
            topology.pod(pod).name()
        );
    }
    check()?;
    step(&format!("Without Veil: ping {a} → {b} across nodes"));
    if traffic::ping(&topology, a, b.ip(), 1).is_ok() {
        bail!("pods reached each other without the overlay: the test bed is wrong");
    }
    println!("    unreachable, as expected: nothing routes between the nodes");
    check()?;

    step(
        "Making the mesh's root CA (openssl, P-256); each agent signs its own workloads' certificates",
    );
    let mesh_section = make_mesh_ca(&topology)?;
    step(&format!(
        "Starting veil-agent on each node (VXLAN overlay, VNI {VNI}, mTLS mesh)"
    ));
    let agents: Vec<Agent> = (1..=2)
        .map(|node| Agent::start_overlay_with(&topology, node, VNI, &mesh_section))
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
        "TCP between pods outside the mesh: {c} sends {} MiB to an echo server in {d}",
        TRANSFER_BYTES >> 20
    ));
    let report = traffic::tcp_echo(&topology, c, d, 7000, TRANSFER_BYTES)?;
    println!(
        "    {} MiB each way in {:.2?} over Veil's eBPF overlay, plaintext, every byte checked",
        report.bytes >> 20,
        report.elapsed
    );
    check()?;

    step(&format!(
        "TCP between meshed pods: {a} sends {} MiB to {b}; eBPF steers it to the agents, which carry it over mTLS",
        TRANSFER_BYTES >> 20
    ));
    let report = traffic::tcp_echo(&topology, a, b, 7001, TRANSFER_BYTES)?;
    println!(
        "    {} MiB each way in {:.2?}, applications unchanged, every byte checked",
        report.bytes >> 20,
        report.elapsed
    );
    for (agent, direction) in [(&agents[0], "outbound"), (&agents[1], "inbound")] {
        for mode in ["ktls", "userspace"] {
            let series = format!(
                "veil_mesh_connections_total{{direction=\"{direction}\",mode=\"{mode}\",result=\"ok\"}}"
            );
            if let Some(count) = agent.metric(&series)? {
                println!(
                    "    node{}: {count} {direction} mTLS connection(s), TLS in {}",
                    agent.node(),
                    if mode == "ktls" {
                        "the kernel (kTLS)"
                    } else {
                        "userspace (rustls; this kernel has no kTLS)"
                    }
                );
            }
        }
    }
    check()?;

    step(&format!(
        "Plaintext from {c} (outside the mesh) to {b} (STRICT): dropped"
    ));
    let strict_port = std::net::SocketAddr::from((b.ip(), 7002));
    let _listener = topology
        .pod(b)
        .run(move || std::net::TcpListener::bind(strict_port))??;
    let attempt = topology
        .pod(c)
        .run(move || std::net::TcpStream::connect_timeout(&strict_port, Duration::from_secs(2)))?;
    if attempt.is_ok() {
        bail!("plaintext reached a STRICT pod");
    }
    println!("    refused: the connection never reached {b}");
    check()?;

    step("veilctl flows on node1: what talked to what, and how");
    print!("{}", agents[0].veilctl(&["flows"])?);
    step(&format!("veilctl mtls {b}: the effective mode and why"));
    print!("{}", agents[1].veilctl(&["mtls", &b.to_string()])?);
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

/// Writes a root CA for the mesh into the test bed's scratch directory and
/// returns the agents' `[mesh]` section. The key is 0600 and goes away with
/// the test bed.
fn make_mesh_ca(topology: &Topology) -> Result<String> {
    let files = MeshCaFiles::in_workdir(topology);
    let mut openssl = std::process::Command::new("openssl");
    openssl
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "30", "-subj", "/CN=Veil demo root CA"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(&files.key)
        .arg("-out")
        .arg(&files.cert)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    shell::run(&mut openssl).context("cannot make the demo CA with openssl")?;
    files
        .restrict_key()
        .context("cannot restrict the demo CA key to 0600")?;
    Ok(files.agent_section("cluster.local"))
}
