//! The peer we compare with: a stunnel pair (TLS 1.3, ECDSA P-256, mutual
//! authentication) between the two nodes, one service per benchmark port.
//!
//! A client pod connects to its node's stunnel (on the node's pod gateway
//! address), which opens TLS to the other node's stunnel over the underlay,
//! which connects to the server pod. That is the job Veil's mTLS does, with a
//! userspace proxy at both ends.

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    PKCS_ECDSA_P256_SHA256,
};
use veil_testbed::{Topology, addressing, process::ChildGuard};

use crate::{BenchError, Result, io_error};

const CONFIGURATION: &str = "stunnel";

/// One forwarded port.
#[derive(Clone, Copy, Debug)]
pub struct Service {
    pub name: &'static str,
    /// Port the client node's stunnel accepts plaintext on.
    pub client_port: u16,
    /// Port the server node's stunnel accepts TLS on.
    pub server_port: u16,
    /// Where the server node's stunnel connects to.
    pub backend: SocketAddr,
}

pub struct StunnelPair {
    client: ChildGuard,
    server: ChildGuard,
    client_address: Ipv4Addr,
}

impl StunnelPair {
    /// Starts stunnel on `client_node` and `server_node` for `services`.
    pub fn start(
        topology: &Topology,
        client_node: usize,
        server_node: usize,
        services: &[Service],
    ) -> Result<Self> {
        let dir = topology.workdir().join("stunnel");
        std::fs::create_dir_all(&dir).map_err(io_error("cannot create the stunnel directory"))?;
        write_certificates(&dir)?;
        let client_address = addressing::node_pod_gateway(client_node);
        let server_address = addressing::node_underlay_ip(server_node);

        let client_conf = config(
            &dir,
            "client",
            true,
            services.iter().map(|s| {
                (
                    s.name,
                    SocketAddr::from((client_address, s.client_port)),
                    SocketAddr::from((server_address, s.server_port)),
                )
            }),
        );
        let server_conf = config(
            &dir,
            "server",
            false,
            services.iter().map(|s| {
                (
                    s.name,
                    SocketAddr::from((server_address, s.server_port)),
                    s.backend,
                )
            }),
        );
        let server = spawn(topology, server_node, &dir, "server", &server_conf)?;
        let client = spawn(topology, client_node, &dir, "client", &client_conf)?;
        let pair = Self {
            client,
            server,
            client_address,
        };
        for service in services {
            pair.wait_listening(topology, client_node, service.client_port)?;
        }
        Ok(pair)
    }

    /// Process ids of both proxies (for CPU and memory accounting).
    pub fn pids(&self) -> Vec<u32> {
        vec![self.client.pid(), self.server.pid()]
    }

    /// Where a client pod connects for the service on `port`.
    pub fn client_endpoint(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.client_address, port))
    }

    fn wait_listening(&self, topology: &Topology, node: usize, port: u16) -> Result<()> {
        let address = self.client_endpoint(port);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reachable = topology.node(node).run(move || {
                std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok()
            })?;
            if reachable {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Configuration {
                    configuration: CONFIGURATION,
                    problem: format!("stunnel did not listen on {address} within 10 s"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn spawn(
    topology: &Topology,
    node: usize,
    dir: &Path,
    role: &str,
    conf: &str,
) -> Result<ChildGuard> {
    let conf_path = dir.join(format!("{role}.conf"));
    std::fs::write(&conf_path, conf).map_err(io_error("cannot write the stunnel config"))?;
    let log = std::fs::File::create(dir.join(format!("{role}.log")))
        .map_err(io_error("cannot create the stunnel log"))?;
    let mut command = topology.node(node).command("stunnel4");
    command
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    Ok(ChildGuard::spawn(
        &format!("stunnel {role} on node {node}"),
        command,
    )?)
}

/// A stunnel configuration: TLS 1.3 only, P-256, both sides verify the chain.
fn config(
    dir: &Path,
    role: &str,
    client: bool,
    services: impl Iterator<Item = (&'static str, SocketAddr, SocketAddr)>,
) -> String {
    let path = |name: &str| dir.join(name).display().to_string();
    let mut text = format!(
        "foreground = yes\npid =\ndebug = warning\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n\
         cert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\n\
         sslVersionMin = TLSv1.3\ncurves = prime256v1\n",
        path(&format!("{role}.crt")),
        path(&format!("{role}.key")),
        path("ca.crt"),
    );
    for (name, accept, connect) in services {
        text.push_str(&format!(
            "\n[{name}]\nclient = {}\naccept = {accept}\nconnect = {connect}\n",
            if client { "yes" } else { "no" }
        ));
    }
    text
}

/// A throwaway CA and one P-256 leaf per side, keys written 0600.
fn write_certificates(dir: &Path) -> Result<()> {
    let certificate_error = |e: rcgen::Error| BenchError::Configuration {
        configuration: CONFIGURATION,
        problem: format!("cannot make certificates: {e}"),
    };
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(certificate_error)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(certificate_error)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "veil-bench stunnel CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).map_err(certificate_error)?;
    write_file(&dir.join("ca.crt"), &ca_cert.pem(), 0o644)?;
    let issuer = Issuer::new(ca_params, ca_key);
    for (role, usage) in [
        ("client", ExtendedKeyUsagePurpose::ClientAuth),
        ("server", ExtendedKeyUsagePurpose::ServerAuth),
    ] {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(certificate_error)?;
        let mut params = CertificateParams::new(vec![format!("{role}.bench.veil.test")])
            .map_err(certificate_error)?;
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).map_err(certificate_error)?;
        write_file(&dir.join(format!("{role}.crt")), &cert.pem(), 0o644)?;
        write_file(
            &dir.join(format!("{role}.key")),
            &key.serialize_pem(),
            0o600,
        )?;
    }
    Ok(())
}

fn write_file(path: &PathBuf, contents: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io_error(format!("cannot create {}", path.display())))?;
    file.write_all(contents.as_bytes())
        .map_err(io_error(format!("cannot write {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_tls13_mutual_and_lists_each_service() {
        let text = config(
            Path::new("/d"),
            "client",
            true,
            [(
                "echo",
                "198.19.1.254:15102".parse().unwrap(),
                "198.18.0.2:15202".parse().unwrap(),
            )]
            .into_iter(),
        );
        for line in [
            "sslVersionMin = TLSv1.3",
            "verifyChain = yes",
            "curves = prime256v1",
            "cert = /d/client.crt",
            "[echo]",
            "client = yes",
            "accept = 198.19.1.254:15102",
            "connect = 198.18.0.2:15202",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn private_keys_are_written_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        write_certificates(dir.path()).unwrap();
        for role in ["client", "server"] {
            let mode = std::fs::metadata(dir.path().join(format!("{role}.key")))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{role}.key");
        }
    }
}
