//! The configurations a run compares, and how each is set up on the test bed.
//!
//! Every configuration gets its own pod pair (client on node 1, server on
//! node 2), all set up at once, so measurements interleave without
//! reconfiguring anything between them.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use veil_api::DatapathChoice;
use veil_testbed::{
    Agent, MeshCaFiles, PodMesh, PodRef, Routing, Topology, TopologySpec, netns::NetNs,
    process::ChildGuard,
};

use crate::{
    BenchError, Result,
    echo::{self, Servers},
    machine::Machine,
    stunnel::{self, StunnelPair},
    xdp_pass,
};

/// The agents' inbound mTLS port (the default `[mesh] inbound_port`).
const MESH_INBOUND_PORT: u16 = 15008;
/// iperf3's server port in every server pod.
pub const IPERF_PORT: u16 = 5201;
/// VNI of the kernel VXLAN baseline.
pub const KERNEL_VXLAN_VNI: u32 = 42;
/// VNI of Veil's overlay.
pub const VEIL_VNI: u32 = 4242;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Configuration {
    /// Plain routes between nodes, no overlay, no encryption: the baseline.
    Direct,
    /// Direct routing with a program that passes every frame attached
    /// (native XDP) to each node's underlay.
    DirectXdp,
    /// The kernel's own vxlan device.
    KernelVxlan,
    /// The kernel's vxlan device with that program on the underlay. These
    /// two show what any native XDP program costs a veth underlay, which
    /// Veil's overlay must pay and the plain baselines do not.
    KernelVxlanXdp,
    /// Veil's eBPF overlay.
    VeilOverlay,
    /// Veil's eBPF overlay with `encapsulation = "vxlan-device"`: the
    /// pod-egress program hands a tunnel key to a collect_md vxlan device
    /// instead of writing the outer headers itself.
    VeilOverlayVxlanDevice,
    /// Veil mTLS with the userspace (rustls) relay.
    VeilMtlsUserspace,
    /// Veil mTLS with kernel TLS.
    VeilMtlsKtls,
    /// A stunnel pair doing the same job as Veil's mTLS.
    Stunnel,
}

impl std::str::FromStr for Configuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|c| c.id() == s).ok_or_else(|| {
            format!(
                "unknown configuration {s:?}; choose from: {}",
                Self::ALL.map(Configuration::id).join(", ")
            )
        })
    }
}

/// Whether a configuration can be measured in this run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Availability {
    Ready,
    NotBuiltYet(&'static str),
    Skipped(String),
}

impl Configuration {
    pub const ALL: [Configuration; 9] = [
        Self::Direct,
        Self::DirectXdp,
        Self::KernelVxlan,
        Self::KernelVxlanXdp,
        Self::VeilOverlay,
        Self::VeilOverlayVxlanDevice,
        Self::VeilMtlsUserspace,
        Self::VeilMtlsKtls,
        Self::Stunnel,
    ];

    pub const fn id(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::DirectXdp => "direct-xdp",
            Self::KernelVxlan => "kernel-vxlan",
            Self::KernelVxlanXdp => "kernel-vxlan-xdp",
            Self::VeilOverlay => "veil-overlay",
            Self::VeilOverlayVxlanDevice => "veil-overlay-vxlan-device",
            Self::VeilMtlsUserspace => "veil-mtls-userspace",
            Self::VeilMtlsKtls => "veil-mtls-ktls",
            Self::Stunnel => "stunnel",
        }
    }

    pub const fn title(self) -> &'static str {
        match self {
            Self::Direct => "direct routing (baseline: no overlay, no encryption)",
            Self::DirectXdp => "direct routing, XDP_PASS program on the underlay",
            Self::KernelVxlan => "kernel vxlan device",
            Self::KernelVxlanXdp => "kernel vxlan device, XDP_PASS program on the underlay",
            Self::VeilOverlay => "Veil eBPF overlay",
            Self::VeilOverlayVxlanDevice => {
                "Veil eBPF overlay, encapsulating through a collect_md vxlan device"
            }
            Self::VeilMtlsUserspace => "Veil mTLS, userspace relay",
            Self::VeilMtlsKtls => "Veil mTLS, kTLS",
            Self::Stunnel => "stunnel pair (TLS 1.3, ECDSA P-256, mutual auth)",
        }
    }

    pub const fn is_baseline(self) -> bool {
        matches!(self, Self::Direct)
    }

    /// True for configurations with proxy processes whose CPU and memory we
    /// account (for Veil's mTLS: the node agents, which carry the proxy).
    pub const fn has_proxy(self) -> bool {
        matches!(
            self,
            Self::Stunnel | Self::VeilMtlsUserspace | Self::VeilMtlsKtls
        )
    }

    /// Runs with Veil's agents (on a test bed of its own, not the baselines').
    pub const fn has_agents(self) -> bool {
        self.is_veil() || matches!(self, Self::VeilOverlayVxlanDevice)
    }

    /// Runs on the test bed with a pass-everything XDP program on the underlay.
    pub const fn has_xdp_underlay(self) -> bool {
        matches!(self, Self::DirectXdp | Self::KernelVxlanXdp)
    }

    /// Runs on the shared Veil test bed (agents with default settings).
    pub const fn is_veil(self) -> bool {
        matches!(
            self,
            Self::VeilOverlay | Self::VeilMtlsUserspace | Self::VeilMtlsKtls
        )
    }

    /// Runs through the agents' mTLS proxy.
    pub const fn is_mesh(self) -> bool {
        matches!(self, Self::VeilMtlsUserspace | Self::VeilMtlsKtls)
    }

    pub fn availability(self, machine: &Machine) -> Availability {
        match self {
            Self::Direct
            | Self::DirectXdp
            | Self::KernelVxlan
            | Self::KernelVxlanXdp
            | Self::VeilOverlay
            | Self::VeilOverlayVxlanDevice
            | Self::Stunnel => Availability::Ready,
            // The agent picks kTLS whenever the kernel has it, so exactly one
            // of the two runs on a given machine.
            Self::VeilMtlsUserspace if machine.ktls_available => Availability::Skipped(
                "the kernel has TLS, so the agent uses kTLS (see veil-mtls-ktls)".into(),
            ),
            Self::VeilMtlsUserspace => Availability::Ready,
            Self::VeilMtlsKtls if !machine.ktls_available => {
                Availability::Skipped("kernel has no TLS ULP".into())
            }
            Self::VeilMtlsKtls => Availability::Ready,
        }
    }
}

/// Where one configuration's client connects, per workload.
#[derive(Clone, Debug)]
pub struct Endpoints {
    /// The client pod's namespace.
    pub client: NetNs,
    pub iperf: SocketAddr,
    pub echo: SocketAddr,
    pub one_shot: SocketAddr,
    pub hold: SocketAddr,
    /// Proxy processes carrying this configuration's traffic.
    pub proxy_pids: Vec<u32>,
    /// The server node's inbound mTLS port (mesh configurations only).
    pub inbound: Option<InboundPort>,
}

/// Where a flood of unauthenticated connections goes, and who takes it.
#[derive(Clone, Debug)]
pub struct InboundPort {
    /// The server node's namespace: the flood comes from the node's own
    /// address, another source than the client node's agent.
    pub flood_from: NetNs,
    pub address: SocketAddr,
    /// The server node's agent.
    pub agent_pid: u32,
}

impl Endpoints {
    /// The client in `client` reaches `server`'s own address on every port
    /// (interception, if any, is transparent).
    fn direct(client: NetNs, server: PodRef, proxy_pids: Vec<u32>) -> Self {
        let at = |port: u16| SocketAddr::from((server.ip(), port));
        Self {
            client,
            iperf: at(IPERF_PORT),
            echo: at(echo::ECHO_PORT),
            one_shot: at(echo::ONE_SHOT_PORT),
            hold: at(echo::HOLD_PORT),
            proxy_pids,
            inbound: None,
        }
    }
}

/// The test beds with every measured configuration set up on them.
///
/// Veil's configurations get a topology of their own: their agents attach
/// XDP to every node's underlay, and the baselines must not pay for that.
pub struct Bed {
    // Field order is drop order: proxies, agents and servers stop before the topologies go.
    stunnel: Option<StunnelPair>,
    _agents: Vec<Agent>,
    servers: Vec<Servers>,
    _iperf_servers: Vec<ChildGuard>,
    endpoints: Vec<(Configuration, Endpoints)>,
    topology: Topology,
    veil_topology: Option<Topology>,
    /// `veil-overlay-vxlan-device`: its agents run with another setting.
    tunnel_topology: Option<Topology>,
    /// `kernel-vxlan-xdp`: XDP on its underlay would slow every other baseline.
    xdp_topology: Option<Topology>,
}

impl Bed {
    /// Builds a 2-node topology with one pod pair per configuration and sets each up.
    pub fn build(configurations: &[Configuration]) -> Result<Self> {
        let (with_agents, others): (Vec<Configuration>, Vec<Configuration>) =
            configurations.iter().partition(|c| c.has_agents());
        let (xdp_underlay, baselines): (Vec<Configuration>, Vec<Configuration>) =
            others.iter().partition(|c| c.has_xdp_underlay());
        let (veil, tunnel): (Vec<Configuration>, Vec<Configuration>) =
            with_agents.iter().partition(|c| c.is_veil());
        let topology = bench_topology("bench", baselines.len())?;
        let veil_topology = if veil.is_empty() {
            None
        } else {
            Some(bench_topology("benchv", veil.len())?)
        };
        let mut bed = Self {
            stunnel: None,
            _agents: Vec::new(),
            servers: Vec::new(),
            _iperf_servers: Vec::new(),
            endpoints: Vec::new(),
            topology,
            veil_topology,
            tunnel_topology: None,
            xdp_topology: None,
        };
        for (index, &configuration) in baselines.iter().enumerate() {
            let client = PodRef::new(1, index + 1);
            let server = PodRef::new(2, index + 1);
            bed.start_servers(Which::Baselines, server)?;
            let endpoints = bed.set_up(configuration, client, server)?;
            bed.endpoints.push((configuration, endpoints));
        }
        if !veil.is_empty() {
            bed.set_up_veil(&veil)?;
        }
        if !tunnel.is_empty() {
            bed.set_up_tunnel_device()?;
        }
        if !xdp_underlay.is_empty() {
            bed.set_up_xdp_underlay(&xdp_underlay)?;
        }
        Ok(bed)
    }

    /// `direct-xdp` and `kernel-vxlan-xdp` on a test bed of their own (one
    /// pod pair each): routed as their plain twins, with a pass-everything
    /// XDP program on each node's underlay.
    fn set_up_xdp_underlay(&mut self, configurations: &[Configuration]) -> Result<()> {
        let topology = bench_topology("benchx", configurations.len())?;
        if configurations.contains(&Configuration::KernelVxlanXdp) {
            topology.install_kernel_vxlan(KERNEL_VXLAN_VNI)?;
        }
        let object = xdp_pass::build(topology.workdir())?;
        for node in 1..=2 {
            xdp_pass::attach(&topology.node(node), "ul0", &object)?;
        }
        self.xdp_topology = Some(topology);
        for (index, &configuration) in configurations.iter().enumerate() {
            let (client, server) = (PodRef::new(1, index + 1), PodRef::new(2, index + 1));
            let topology = self.xdp_topology.as_ref().expect("built above");
            match configuration {
                Configuration::DirectXdp => topology.route_pair_direct(client, server)?,
                _ => topology.route_pair_kernel_vxlan(client, server)?,
            }
            let client_ns = topology.pod(client);
            self.start_servers(Which::XdpUnderlay, server)?;
            self.endpoints.push((
                configuration,
                Endpoints::direct(client_ns, server, Vec::new()),
            ));
        }
        Ok(())
    }

    /// `veil-overlay-vxlan-device` on a test bed of its own: agents with
    /// `encapsulation = "vxlan-device"`, one pod pair.
    fn set_up_tunnel_device(&mut self) -> Result<()> {
        let configuration = Configuration::VeilOverlayVxlanDevice;
        self.tunnel_topology = Some(bench_topology("benchm", 1)?);
        let (client, server) = (PodRef::new(1, 1), PodRef::new(2, 1));
        self.start_servers(Which::TunnelDevice, server)?;
        let topology = self.tunnel_topology.as_ref().expect("built above");
        for node in 1..=2 {
            // Lands in [overlay], the last table of the generated config.
            self._agents.push(Agent::start_overlay_with(
                topology,
                node,
                VEIL_VNI,
                "encapsulation = \"vxlan-device\"\n",
            )?);
        }
        self.endpoints.push((
            configuration,
            Endpoints::direct(topology.pod(client), server, Vec::new()),
        ));
        Ok(())
    }

    /// Veil's configurations on their own test bed: one pod pair each, the
    /// mesh ones meshed (PERMISSIVE), agents with the overlay and, when a
    /// mesh configuration is measured, the mesh. Clients connect straight to
    /// the server pod: interception is transparent.
    fn set_up_veil(&mut self, veil: &[Configuration]) -> Result<()> {
        let mut mesh_section = String::new();
        {
            let topology = self.veil_topology.as_mut().expect("built before set-up");
            for (index, configuration) in veil.iter().enumerate() {
                if configuration.is_mesh() {
                    for (pod, account) in [
                        (PodRef::new(1, index + 1), "client"),
                        (PodRef::new(2, index + 1), "server"),
                    ] {
                        topology.set_mesh(pod, Some(PodMesh::new("bench", account, "permissive")));
                    }
                }
            }
            if veil.iter().any(|c| c.is_mesh()) {
                mesh_section = write_mesh_ca(topology)?;
            }
        }
        for index in 0..veil.len() {
            self.start_servers(Which::Veil, PodRef::new(2, index + 1))?;
        }
        let topology = self.veil_topology.as_ref().expect("built before set-up");
        for node in 1..=2 {
            self._agents.push(Agent::start_overlay_with(
                topology,
                node,
                VEIL_VNI,
                &mesh_section,
            )?);
        }
        let agent_pids: Vec<u32> = self._agents.iter().map(Agent::pid).collect();
        for (index, &configuration) in veil.iter().enumerate() {
            let (client, server) = (PodRef::new(1, index + 1), PodRef::new(2, index + 1));
            let proxy_pids = if configuration.is_mesh() {
                agent_pids.clone()
            } else {
                Vec::new()
            };
            let mut endpoints = Endpoints::direct(topology.pod(client), server, proxy_pids);
            if configuration.is_mesh() {
                endpoints.inbound = Some(InboundPort {
                    flood_from: topology.node(server.node),
                    address: SocketAddr::from((
                        veil_testbed::addressing::node_underlay_ip(server.node),
                        MESH_INBOUND_PORT,
                    )),
                    agent_pid: agent_pids[server.node - 1],
                });
            }
            self.endpoints.push((configuration, endpoints));
        }
        Ok(())
    }

    pub fn endpoints(&self, configuration: Configuration) -> &Endpoints {
        &self
            .endpoints
            .iter()
            .find(|(c, _)| *c == configuration)
            .unwrap_or_else(|| panic!("{} was not set up", configuration.id()))
            .1
    }

    /// What the first agent chose for its datapath on this kernel (delivery,
    /// attach paths, TLS), so a report says which paths it measured. Empty
    /// when no agent runs.
    pub fn datapath_choices(&self) -> Result<Vec<DatapathChoice>> {
        let Some(agent) = self._agents.first() else {
            return Ok(Vec::new());
        };
        let status = agent.status()?;
        Ok(status
            .kernel
            .map(|kernel| kernel.choices)
            .unwrap_or_default())
    }

    /// Lets go of every connection the hold servers keep.
    pub fn release_held_connections(&self) {
        for servers in &self.servers {
            servers.release_held();
        }
    }

    fn start_servers(&mut self, which: Which, server: PodRef) -> Result<()> {
        let topology = match which {
            Which::Baselines => &self.topology,
            Which::Veil => self.veil_topology.as_ref().expect("built before servers"),
            Which::TunnelDevice => self.tunnel_topology.as_ref().expect("built before servers"),
            Which::XdpUnderlay => self.xdp_topology.as_ref().expect("built before servers"),
        };
        let ns = topology.pod(server);
        self.servers.push(Servers::start(&ns, server.ip())?);
        let mut iperf = ns.command("iperf3");
        iperf
            .args([
                "-s",
                "-B",
                &server.ip().to_string(),
                "-p",
                &IPERF_PORT.to_string(),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        self._iperf_servers.push(ChildGuard::spawn(
            &format!("iperf3 server in {server}"),
            iperf,
        )?);
        Ok(())
    }

    fn set_up(
        &mut self,
        configuration: Configuration,
        client: PodRef,
        server: PodRef,
    ) -> Result<Endpoints> {
        let direct = |port: u16| SocketAddr::from((server.ip(), port));
        let client_ns = self.topology.pod(client);
        let plain = |proxy_pids| Endpoints::direct(client_ns.clone(), server, proxy_pids);
        match configuration {
            Configuration::Direct => {
                self.topology.route_pair_direct(client, server)?;
                Ok(plain(Vec::new()))
            }
            Configuration::KernelVxlan => {
                self.topology.install_kernel_vxlan(KERNEL_VXLAN_VNI)?;
                self.topology.route_pair_kernel_vxlan(client, server)?;
                Ok(plain(Vec::new()))
            }
            Configuration::Stunnel => {
                let services: Vec<stunnel::Service> = [
                    ("iperf", IPERF_PORT),
                    ("echo", echo::ECHO_PORT),
                    ("oneshot", echo::ONE_SHOT_PORT),
                    ("hold", echo::HOLD_PORT),
                ]
                .into_iter()
                .enumerate()
                .map(|(i, (name, port))| stunnel::Service {
                    name,
                    client_port: 15101 + i as u16,
                    server_port: 15201 + i as u16,
                    backend: direct(port),
                })
                .collect();
                let pair = StunnelPair::start(&self.topology, client.node, server.node, &services)?;
                let endpoints = Endpoints {
                    client: client_ns.clone(),
                    iperf: pair.client_endpoint(services[0].client_port),
                    echo: pair.client_endpoint(services[1].client_port),
                    one_shot: pair.client_endpoint(services[2].client_port),
                    hold: pair.client_endpoint(services[3].client_port),
                    proxy_pids: pair.pids(),
                    inbound: None,
                };
                self.stunnel = Some(pair);
                Ok(endpoints)
            }
            other => Err(BenchError::Configuration {
                configuration: other.id(),
                problem: "cannot be set up: it is not built yet".into(),
            }),
        }
    }
}

enum Which {
    Baselines,
    Veil,
    TunnelDevice,
    XdpUnderlay,
}

/// A root CA for the mesh in the test bed's scratch directory (key 0600);
/// returns the agents' `[mesh]` section.
fn write_mesh_ca(topology: &Topology) -> Result<String> {
    let failed = |problem: String| BenchError::Configuration {
        configuration: Configuration::VeilMtlsUserspace.id(),
        problem,
    };
    let (cert, key) = veil_identity::CertificateAuthority::new_root_pem("cluster.local")
        .map_err(|e| failed(format!("cannot make the mesh CA: {e}")))?;
    let files = MeshCaFiles::write(topology, &cert, &key)
        .map_err(|e| failed(format!("cannot write the mesh CA: {e}")))?;
    Ok(files.agent_section("cluster.local"))
}

/// Two nodes with `pairs` pods each, nothing routed between them yet.
fn bench_topology(name: &str, pairs: usize) -> Result<Topology> {
    let topology = Topology::build(
        TopologySpec::new(name)
            .nodes(2)
            .pods_per_node(pairs.max(1))
            .routing(Routing::None),
    )?;
    for pod in topology.pods() {
        let ns = topology.pod(pod);
        // Connection-rate runs open tens of thousands of connections.
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    }
    for node in 1..=2 {
        topology.node(node).sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    }
    Ok(topology)
}
