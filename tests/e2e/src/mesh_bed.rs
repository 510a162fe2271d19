//! The mesh test bed: two nodes × two pods with agents running the overlay
//! and the mesh, shared by the suites that need meshed pods.
//!
//! | pod  | node | mesh                      |
//! |------|------|---------------------------|
//! | n1p1 | 1    | shop/cart, permissive     |
//! | n1p2 | 1    | not meshed                |
//! | n2p1 | 2    | shop/checkout, STRICT     |
//! | n2p2 | 2    | shop/payments, permissive |

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::Duration,
};

use veil_identity::CertificateAuthority;
use veil_testbed::{
    Agent, MeshCaFiles, PodMesh, PodRef, Routing, Topology, TopologySpec, kafka::Broker,
};

pub const VNI: u32 = 7878;
pub const BROKER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 0, 1);
pub const TRUST_DOMAIN: &str = "cluster.local";
pub const MIB: u64 = 1024 * 1024;
pub const MARKER: &[u8] = b"VEIL-PLAINTEXT-MARKER-7d1f";

pub const CART: PodRef = PodRef::new(1, 1);
pub const OUTSIDER: PodRef = PodRef::new(1, 2);
pub const CHECKOUT: PodRef = PodRef::new(2, 1);
pub const PAYMENTS: PodRef = PodRef::new(2, 2);

pub struct MeshBed {
    pub topology: Topology,
    pub agents: Vec<Agent>,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
}

impl MeshBed {
    pub fn start(name: &str) -> Self {
        Self::start_with_policy(name, "")
    }

    pub fn start_with_policy(name: &str, policy: &str) -> Self {
        Self::start_with(name, policy, "")
    }

    /// `policy` goes into the inventory, `mesh_extra` into the agents' `[mesh]`.
    pub fn start_with(name: &str, policy: &str, mesh_extra: &str) -> Self {
        Self::start_custom(name, policy, |_, _| mesh_extra.to_string())
    }

    /// Like [`Self::start`], with a broker in node 1's namespace and both
    /// agents on it (`[events.kafka]`).
    pub fn start_on_bus(name: &str) -> (Self, Broker) {
        let mut broker = None;
        let bed = Self::start_custom(name, "", |topology, node| {
            broker
                .get_or_insert_with(|| {
                    Broker::start_in("mesh on the event bus", &topology.node(1), BROKER_IP)
                })
                .agent_section(topology, node)
        });
        (bed, broker.expect("the agents were started"))
    }

    /// `extra(topology, node)` is appended to each agent's config.
    pub fn start_custom(
        name: &str,
        policy: &str,
        extra: impl FnMut(&Topology, usize) -> String,
    ) -> Self {
        Self::start_custom_env(name, policy, extra, &[])
    }

    /// Like [`Self::start_custom`], with `env` set for both agents.
    pub fn start_custom_env(
        name: &str,
        policy: &str,
        mut extra: impl FnMut(&Topology, usize) -> String,
        env: &[(&str, &str)],
    ) -> Self {
        let mut topology = Topology::build(
            TopologySpec::new(name)
                .nodes(2)
                .pods_per_node(2)
                .routing(Routing::None),
        )
        .unwrap();
        topology.set_mesh(CART, Some(PodMesh::new("shop", "cart", "permissive")));
        topology.set_mesh(CHECKOUT, Some(PodMesh::new("shop", "checkout", "strict")));
        topology.set_mesh(
            PAYMENTS,
            Some(PodMesh::new("shop", "payments", "permissive")),
        );
        topology.set_inventory_extra(policy);
        let (cert, key) = CertificateAuthority::new_root_pem(TRUST_DOMAIN).unwrap();
        let files = MeshCaFiles::write(&topology, &cert, &key).unwrap();
        let agents = (1..=2)
            .map(|node| {
                let config = format!(
                    "{}{}",
                    files.agent_section(TRUST_DOMAIN),
                    extra(&topology, node)
                );
                Agent::start_overlay_with_env(&topology, node, VNI, &config, env).unwrap()
            })
            .collect();
        let (ca_cert, ca_key) = (files.cert, files.key);
        Self {
            topology,
            agents,
            ca_cert,
            ca_key,
        }
    }

    pub fn dump(&self) -> String {
        self.agents
            .iter()
            .map(|a| format!("--- agent {} ---\n{}", a.node(), a.log()))
            .collect()
    }

    pub fn metric(&self, node: usize, series: &str) -> f64 {
        self.agents[node - 1]
            .metric(series)
            .unwrap()
            .unwrap_or_default()
    }
}

/// `from` sends [`MARKER`] to `to`, which echoes it; returns the client
/// address the server application saw.
/// The mTLS mode agents pick on this kernel when nothing forces one:
/// `ktls` where it has the TLS ULP, else `userspace`.
pub fn expected_mode() -> &'static str {
    if veil_mtls::ktls::kernel_supports_tls() {
        "ktls"
    } else {
        "userspace"
    }
}

/// What an agent logs once for [`expected_mode`].
pub fn expected_mode_log() -> &'static str {
    if veil_mtls::ktls::kernel_supports_tls() {
        "mTLS sessions run in kernel TLS (kTLS + splice)"
    } else {
        "mTLS sessions run in rustls, in userspace"
    }
}

pub fn marker_exchange(topology: &Topology, from: PodRef, to: PodRef, port: u16) -> SocketAddr {
    let server_addr = SocketAddr::from((to.ip(), port));
    let listener = listen_in(topology, to, server_addr);
    let server = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buffer = vec![0u8; MARKER.len()];
        stream.read_exact(&mut buffer).unwrap();
        stream.write_all(&buffer).unwrap();
        peer
    });
    let mut client = topology
        .pod(from)
        .run(move || TcpStream::connect_timeout(&server_addr, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(MARKER).unwrap();
    let mut echoed = vec![0u8; MARKER.len()];
    client.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, MARKER);
    server.join().unwrap()
}

/// A listener on `address` inside `pod`'s network namespace.
pub fn listen_in(topology: &Topology, pod: PodRef, address: SocketAddr) -> TcpListener {
    topology
        .pod(pod)
        .run(move || TcpListener::bind(address))
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot listen on {address} in {pod}: {e}"))
}

/// A meshed connection held open: a client in one pod, an echo server in
/// another, both ends kept to see how the connection ends.
pub struct HeldConnection {
    pub client: TcpStream,
    /// How the server side ended: `Ok` at a clean end of stream.
    pub server: std::thread::JoinHandle<std::io::Result<()>>,
}

impl HeldConnection {
    /// Connects `from` to an echo server on `to`'s `port` and checks one
    /// round trip.
    pub fn open(topology: &Topology, from: PodRef, to: PodRef, port: u16) -> Self {
        let address = SocketAddr::from((to.ip(), port));
        let listener = listen_in(topology, to, address);
        let client = topology
            .pod(from)
            .run(move || TcpStream::connect_timeout(&address, Duration::from_secs(5)))
            .unwrap()
            .unwrap_or_else(|e| panic!("{from} → {address}: {e}"));
        let (mut accepted, _) = listener.accept().unwrap();
        let server = std::thread::spawn(move || {
            accepted.set_read_timeout(Some(Duration::from_secs(60)))?;
            let mut buffer = [0u8; 4096];
            loop {
                match accepted.read(&mut buffer)? {
                    0 => return Ok(()),
                    n => accepted.write_all(&buffer[..n])?,
                }
            }
        });
        let mut held = Self { client, server };
        held.round_trip()
            .unwrap_or_else(|e| panic!("{from} → {address}: no echo: {e}"));
        held
    }

    pub fn round_trip(&mut self) -> std::io::Result<()> {
        self.client.set_read_timeout(Some(Duration::from_secs(5)))?;
        self.client.write_all(b"ping")?;
        let mut echoed = [0u8; 4];
        self.client.read_exact(&mut echoed)?;
        assert_eq!(&echoed, b"ping");
        Ok(())
    }

    /// How the client application's stream ends within `within`: `Ok` at
    /// a clean end of stream, else the error (a reset, or a timeout).
    pub fn client_end(&mut self, within: Duration) -> std::io::Result<()> {
        let _ = self.client.set_read_timeout(Some(within));
        let mut buffer = [0u8; 64];
        loop {
            match self.client.read(&mut buffer) {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether both the client and the server application saw a reset
    /// (not a clean end of stream) within `within`; says what each saw.
    pub fn both_ends_reset(mut self, within: Duration) -> Result<(), String> {
        let client = self.client_end(within);
        let server = self.server.join().expect("the echo server panicked");
        match (&client, &server) {
            (Err(c), Err(s))
                if c.kind() == std::io::ErrorKind::ConnectionReset
                    && s.kind() == std::io::ErrorKind::ConnectionReset =>
            {
                Ok(())
            }
            _ => Err(format!("client: {client:?}, server: {server:?}")),
        }
    }
}
