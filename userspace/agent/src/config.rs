//! The agent's configuration file.
//!
//! A bare host (and the demo) describes its node in TOML; later the same
//! settings come from Kubernetes. Unknown keys are refused rather than
//! ignored, so a typo never silently falls back to a default, and every error
//! names the file, the line and what to change.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_INTERFACE_NAME: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// How XDP is attached to the underlay interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpAttachMode {
    /// Native (driver) mode, falling back to generic when the driver lacks it.
    #[default]
    Auto,
    /// Native (driver) mode only: fail if the driver cannot run XDP.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Name of this node, as shown by `veilctl status`.
    pub node_name: String,
    /// Admin API address; must be a loopback address.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Prometheus metrics (`/metrics`); all interfaces by default, for scrapers.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// Readiness (`/healthz/ready`), for kubelet probes and `veilctl`.
    #[serde(default = "default_readiness_listen")]
    pub readiness_listen: SocketAddr,
    /// What the agent keeps across restarts: the embedded event journal and
    /// the event caches (`<state_dir>/events`).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    pub datapath: DatapathConfig,
    /// The VXLAN overlay; without this section the agent only counts packets.
    #[serde(default)]
    pub overlay: Option<OverlaySection>,
    /// Transparent mTLS between meshed pods; needs `[overlay]` (the inventory
    /// says which pods are meshed and who they are).
    #[serde(default)]
    pub mesh: Option<MeshSection>,
    /// The control-plane event bus: a Kafka-protocol broker with
    /// `[events.kafka]`, else (with `[overlay]`) the embedded bus, a journal
    /// under `<state_dir>/events`.
    #[serde(default)]
    pub events: Option<EventsSection>,
    /// Kubernetes as a source: this node's pods and every Node object.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSection>,
    /// Server-name certificates (ingress, external services) from an ACME CA.
    #[serde(default)]
    pub acme: Option<AcmeSection>,
}

/// Certificates for server names from an ACME CA, obtained and renewed by
/// the agent (`acme_sync`). Never for mesh identities: those come from the
/// mesh CA.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeSection {
    /// The CA's directory URL (https).
    pub directory_url: toml::Spanned<String>,
    /// PEM root for the CA's own HTTPS (private CAs); the system roots otherwise.
    #[serde(default)]
    pub server_root: Option<PathBuf>,
    /// Account contacts (`mailto:…`).
    #[serde(default)]
    pub contact: Vec<toml::Spanned<String>>,
    /// `<store>/<name>/tls.key` (0600) and `tls.crt`, and the ACME account.
    #[serde(default = "default_acme_store")]
    pub store: PathBuf,
    /// Serve HTTP-01 here (the CA connects to port 80 of each name) …
    #[serde(default)]
    pub http01_listen: Option<SocketAddr>,
    /// … or publish DNS-01 TXT records with `<hook> present|cleanup <record> [<value>]`.
    #[serde(default)]
    pub dns01_hook: Option<PathBuf>,
    #[serde(default, rename = "certificate")]
    pub certificates: Vec<AcmeCertificateSection>,
}

/// One `[[acme.certificate]]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeCertificateSection {
    /// Its directory under `store`.
    pub name: toml::Spanned<String>,
    pub dns_names: Vec<toml::Spanned<String>>,
}

fn default_acme_store() -> PathBuf {
    PathBuf::from("/var/lib/veil/acme")
}

impl AcmeSection {
    /// Checks what serde cannot; `text` is the file, for line numbers.
    fn validate(&self, text: &str) -> Result<(), String> {
        let line = |value: &toml::Spanned<String>| {
            let end = value.span().start.min(text.len());
            1 + text.as_bytes()[..end]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
        };
        let url = &self.directory_url;
        if !url.get_ref().starts_with("https://") {
            return Err(format!(
                "line {}: acme.directory_url = {:?} is not an https:// URL (ACME runs over HTTPS)",
                line(url),
                url.get_ref()
            ));
        }
        if let Some(contact) = self
            .contact
            .iter()
            .find(|c| !c.get_ref().starts_with("mailto:"))
        {
            return Err(format!(
                "line {}: acme.contact {:?} is not a mailto: URI",
                line(contact),
                contact.get_ref()
            ));
        }
        if self.http01_listen.is_some() == self.dns01_hook.is_some() {
            return Err(
                "[acme] needs exactly one challenge: http01_listen (HTTP-01, e.g. \
                        \"0.0.0.0:80\") or dns01_hook (DNS-01, a command)"
                    .into(),
            );
        }
        if self.certificates.is_empty() {
            return Err(
                "[acme] lists no certificate: add [[acme.certificate]] with name and \
                        dns_names"
                    .into(),
            );
        }
        let mut names = HashSet::new();
        for certificate in &self.certificates {
            let name = &certificate.name;
            if !veil_identity::acme::store::valid_name(name.get_ref()) {
                return Err(format!(
                    "line {}: acme.certificate name {:?} cannot be a directory name: use 1 to 64 \
                     letters, digits, '-', '_' or '.'",
                    line(name),
                    name.get_ref()
                ));
            }
            if !names.insert(name.get_ref()) {
                return Err(format!(
                    "line {}: acme.certificate name {:?} is used twice",
                    line(name),
                    name.get_ref()
                ));
            }
            if certificate.dns_names.is_empty() {
                return Err(format!(
                    "line {}: acme.certificate {:?} has no dns_names",
                    line(name),
                    name.get_ref()
                ));
            }
            for dns_name in &certificate.dns_names {
                let value = dns_name.get_ref();
                if !is_dns_name(value) {
                    return Err(format!(
                        "line {}: {value:?} in acme.certificate {:?} is not a DNS name",
                        line(dns_name),
                        name.get_ref()
                    ));
                }
                if value.starts_with("*.") && self.dns01_hook.is_none() {
                    return Err(format!(
                        "line {}: {value:?} is a wildcard: ACME validates wildcards with DNS-01 \
                         only; set dns01_hook instead of http01_listen",
                        line(dns_name)
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Lowercase LDH labels (1-63 characters, no leading or trailing '-'),
/// dot-separated, 253 characters at most; a leading `*.` for wildcards.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// Where the agent learns its pods and the cluster's nodes from the API
/// server (watches, not polling). Works together with the inventory file
/// (the file wins for what it lists) and the event bus (other nodes' pods).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSection {
    /// A kubeconfig file; default: the in-cluster service account, then `KUBECONFIG`.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Write this node's underlay address and MAC into its Node object
    /// (annotations `veil.dev/underlay-ip`, `veil.dev/underlay-mac`), where
    /// the other agents read them.
    #[serde(default = "default_true")]
    pub annotate_node: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSection {
    /// A Kafka-protocol broker (brokers, topics, consumer group, outbox);
    /// without it, the embedded bus.
    #[serde(default)]
    pub kafka: Option<veil_events::kafka::KafkaSettings>,
}

/// Which event bus the agent runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventBusChoice<'a> {
    Kafka(&'a veil_events::kafka::KafkaSettings),
    /// No broker configured: the in-process bus, journal in this directory.
    Embedded(PathBuf),
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/veil")
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSection {
    /// SPIFFE trust domain of the mesh.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Root CA certificate (PEM). Until the `ECDSACert` controller signs
    /// CSRs, each agent signs its own workloads' certificates with this root
    /// (the workload keys are made on the node and never leave it).
    pub ca_cert: PathBuf,
    /// Root CA private key (PEM); must not be readable by group or others.
    /// Needed with `issuer = "local-ca"` only.
    #[serde(default)]
    pub ca_key: Option<PathBuf>,
    /// Who signs the workloads' CSRs: `local-ca` (this agent, with `ca_key`)
    /// or `kubernetes` (the agent writes `ECDSACert`s and `veil-controller`
    /// signs; no node holds the CA key).
    #[serde(default)]
    pub issuer: MeshIssuer,
    /// Lifetime of workload certificates (e.g. `24h`, `90m`); renewed at 2/3 of it.
    #[serde(default = "default_certificate_lifetime")]
    pub certificate_lifetime: String,
    /// Port of the inbound mTLS listener that peer agents dial.
    #[serde(default = "default_inbound_port")]
    pub inbound_port: u16,
    /// Also write each workload certificate and its key into a
    /// `kubernetes.io/tls` Secret (`veil-tls.<sa>.<node>` in the workload's
    /// namespace), for workloads that read certificates from files. Off by
    /// default: it puts private keys into the API server. Needs
    /// `issuer = "kubernetes"` and the RBAC of
    /// `deploy/kubernetes/optional/secret-writing.yaml`.
    #[serde(default)]
    pub write_tls_secrets: bool,
    /// `auto`: hand each session's record encryption to the kernel (kTLS)
    /// when the kernel has the TLS ULP, else keep it in userspace; `off`:
    /// always userspace (to rule kTLS out when troubleshooting, or to test
    /// a mixed pair).
    #[serde(default)]
    pub kernel_tls: KernelTlsMode,
    /// Longest a peer may take on the inbound port from connecting to a
    /// checked preface (e.g. `10s`); past it the connection is closed.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: String,
    /// Most inbound connections in handshake at once; more are reset
    /// without being read.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// Most inbound connections in handshake at once from one address.
    #[serde(default = "default_max_handshakes_per_source")]
    pub max_handshakes_per_source: usize,
}

fn default_handshake_timeout() -> String {
    "10s".into()
}

/// Far above what a node's peers need at once (a handshake takes
/// milliseconds), low enough that a flood cannot take every thread.
fn default_max_handshakes() -> usize {
    2048
}

/// A quarter of the total: one source, even a busy peer agent opening a
/// burst of connections, cannot take every slot.
fn default_max_handshakes_per_source() -> usize {
    512
}

/// Shortest and longest `mesh.handshake_timeout` accepted.
const HANDSHAKE_TIMEOUT_RANGE: std::ops::RangeInclusive<std::time::Duration> =
    std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(120);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelTlsMode {
    #[default]
    Auto,
    Off,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MeshIssuer {
    #[default]
    LocalCa,
    Kubernetes,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

fn default_certificate_lifetime() -> String {
    "24h".into()
}

/// Shortest workload certificate lifetime accepted (tests use short ones).
const MIN_CERTIFICATE_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest workload certificate lifetime accepted.
const MAX_CERTIFICATE_LIFETIME: std::time::Duration =
    std::time::Duration::from_secs(365 * 24 * 3600);

/// Refuses `value` of `key` unless it is a duration within `range`
/// (`range_text` says it to the user; `example` is a valid value).
fn check_duration(
    key: &str,
    value: &str,
    range: std::ops::RangeInclusive<std::time::Duration>,
    range_text: &str,
    example: &str,
) -> Result<(), String> {
    match humantime::parse_duration(value) {
        Ok(duration) if range.contains(&duration) => Ok(()),
        Ok(_) => Err(format!("{key} = {value:?} is out of range ({range_text})")),
        Err(error) => Err(format!(
            "{key} = {value:?} is not a duration ({error}); write e.g. \"{example}\""
        )),
    }
}

impl MeshSection {
    /// Caps and deadline of unauthenticated inbound connections (validated
    /// when the config loads).
    pub fn handshake_limits(&self) -> crate::mesh::handshake_slots::HandshakeLimits {
        crate::mesh::handshake_slots::HandshakeLimits {
            deadline: humantime::parse_duration(&self.handshake_timeout)
                .unwrap_or(std::time::Duration::from_secs(10)),
            max_total: self.max_handshakes,
            max_per_source: self.max_handshakes_per_source,
        }
    }

    /// The workload certificate lifetime (validated when the config loads).
    pub fn certificate_lifetime(&self) -> std::time::Duration {
        humantime::parse_duration(&self.certificate_lifetime)
            .unwrap_or(std::time::Duration::from_secs(24 * 3600))
    }
}

fn default_inbound_port() -> u16 {
    veil_api::DEFAULT_INBOUND_MTLS_PORT
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlaySection {
    /// VXLAN network identifier (1 to 16777215).
    #[serde(default = "default_vni")]
    pub vni: u32,
    /// MTU of the underlay; pods must use 50 bytes less.
    #[serde(default = "default_underlay_mtu")]
    pub underlay_mtu: u32,
    /// The inventory file (nodes and pods), re-read when it changes.
    /// Optional with `[kubernetes]`, which then supplies nodes and pods.
    #[serde(default)]
    pub inventory: Option<PathBuf>,
    /// Who builds the outer headers of pod traffic to other nodes: the
    /// pod-egress program itself (`"tc"`, the default), or a collect_md
    /// vxlan device the agent creates and the program hands the tunnel key
    /// to (`"vxlan-device"`). Both carry the same bytes on the wire;
    /// ARCHITECTURE.md has the measurements.
    #[serde(default)]
    pub encapsulation: Encapsulation,
}

/// See [`OverlaySection::encapsulation`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encapsulation {
    #[default]
    Tc,
    VxlanDevice,
}

fn default_vni() -> u32 {
    4242
}

fn default_underlay_mtu() -> u32 {
    1500
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatapathConfig {
    /// The interface that joins this node to the other nodes.
    pub underlay_interface: String,
    /// Host-side veth of each local pod.
    #[serde(default)]
    pub pod_interfaces: Vec<String>,
    #[serde(default)]
    pub xdp_mode: XdpAttachMode,
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], veil_api::DEFAULT_ADMIN_PORT))
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], veil_api::DEFAULT_METRICS_PORT))
}

fn default_readiness_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], veil_api::DEFAULT_READINESS_PORT))
}

impl AgentConfig {
    /// The event bus to run: Kafka when `[events.kafka]` names brokers,
    /// else the embedded bus for an agent with an overlay (the bus feeds
    /// the overlay's inventory), else none.
    pub fn event_bus(&self) -> Option<EventBusChoice<'_>> {
        self.overlay.as_ref()?;
        Some(match self.events.as_ref().and_then(|e| e.kafka.as_ref()) {
            Some(kafka) => EventBusChoice::Kafka(kafka),
            None => EventBusChoice::Embedded(self.state_dir.join("events")),
        })
    }

    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text`; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: error.to_string(),
        })?;
        config.validate().map_err(|reason| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        if let Some(acme) = &config.acme {
            acme.validate(text).map_err(|reason| ConfigError::Invalid {
                path: path.to_owned(),
                reason,
            })?;
        }
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.node_name.trim().is_empty() {
            return Err("node_name is empty: give this node a name".into());
        }
        if !self.admin_listen.ip().is_loopback() {
            return Err(format!(
                "admin_listen = \"{}\" is not a loopback address: the admin API is \
                 localhost-only, use 127.0.0.1:{}",
                self.admin_listen,
                veil_api::DEFAULT_ADMIN_PORT
            ));
        }
        if let Some(overlay) = &self.overlay {
            if !(1..=0x00ff_ffff).contains(&overlay.vni) {
                return Err(format!(
                    "overlay.vni = {} is out of range: a VNI is 1 to 16777215",
                    overlay.vni
                ));
            }
            if !(626..=9000).contains(&overlay.underlay_mtu) {
                return Err(format!(
                    "overlay.underlay_mtu = {} is out of range (626 to 9000)",
                    overlay.underlay_mtu
                ));
            }
        }
        if let Some(overlay) = &self.overlay
            && overlay.inventory.is_none()
            && self.kubernetes.is_none()
        {
            return Err(
                "overlay.inventory is missing: name an inventory file, or add a \
                        [kubernetes] section so nodes and pods come from the API server"
                    .into(),
            );
        }
        if self.kubernetes.is_some() && self.overlay.is_none() {
            return Err(
                "[kubernetes] needs [overlay]: the pods and nodes it learns \
                        are what the overlay is built from; add an [overlay] section"
                    .into(),
            );
        }
        if let Some(events) = &self.events {
            if self.overlay.is_none() {
                return Err(
                    "[events] needs [overlay]: pods learnt from the bus join the \
                            overlay's inventory"
                        .into(),
                );
            }
            if let Some(kafka) = &events.kafka {
                kafka.validate().map_err(|e| format!("events.kafka: {e}"))?;
            }
        }
        if let Some(mesh) = &self.mesh {
            if self.overlay.is_none() {
                return Err("[mesh] needs [overlay]: the inventory says which pods are \
                            meshed and which identity each has; add an [overlay] section"
                    .into());
            }
            check_duration(
                "mesh.certificate_lifetime",
                &mesh.certificate_lifetime,
                MIN_CERTIFICATE_LIFETIME..=MAX_CERTIFICATE_LIFETIME,
                "30s to 365d",
                "24h",
            )?;
            check_duration(
                "mesh.handshake_timeout",
                &mesh.handshake_timeout,
                HANDSHAKE_TIMEOUT_RANGE,
                "1s to 120s",
                "10s",
            )?;
            if mesh.max_handshakes == 0
                || mesh.max_handshakes_per_source == 0
                || mesh.max_handshakes_per_source > mesh.max_handshakes
            {
                return Err(format!(
                    "mesh.max_handshakes = {} and mesh.max_handshakes_per_source = {} must be \
                     at least 1, the second no more than the first",
                    mesh.max_handshakes, mesh.max_handshakes_per_source
                ));
            }
            if mesh.issuer == MeshIssuer::LocalCa && mesh.ca_key.is_none() {
                return Err("mesh.ca_key is missing: with issuer = \"local-ca\" the agent signs \
                            its workloads' CSRs and needs the CA key (or set issuer = \"kubernetes\")"
                    .into());
            }
            if mesh.write_tls_secrets && mesh.issuer != MeshIssuer::Kubernetes {
                return Err(
                    "mesh.write_tls_secrets = true needs issuer = \"kubernetes\": the \
                            Secrets go to the API server the controller signs through"
                        .into(),
                );
            }
            if mesh.trust_domain.is_empty() || mesh.trust_domain.contains(['/', ' ']) {
                return Err(format!(
                    "mesh.trust_domain = {:?} is not a trust domain name (like cluster.local)",
                    mesh.trust_domain
                ));
            }
        }
        let datapath = &self.datapath;
        let mut seen = HashSet::new();
        for name in std::iter::once(&datapath.underlay_interface).chain(&datapath.pod_interfaces) {
            if name.is_empty() || name.len() > MAX_INTERFACE_NAME || name.contains(['/', ' ']) {
                return Err(format!(
                    "interface name {name:?} is not a valid Linux interface name \
                     (1 to {MAX_INTERFACE_NAME} characters, no '/' or spaces)"
                ));
            }
            if !seen.insert(name) {
                return Err(format!(
                    "interface {name:?} is listed twice: an interface is either the \
                     underlay or one pod's veth"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(text, Path::new("agent.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config =
            parse("node_name = \"n1\"\n[datapath]\nunderlay_interface = \"ul0\"\n").unwrap();
        assert_eq!(config.admin_listen, default_admin_listen());
        assert_eq!(config.datapath.xdp_mode, XdpAttachMode::Auto);
        assert!(config.datapath.pod_interfaces.is_empty());
    }

    #[test]
    fn unknown_key_is_refused_with_its_line() {
        let error = parse(
            "node_name = \"n1\"\n[datapath]\nunderlay_interface = \"ul0\"\nxdp_mod = \"native\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("agent.toml"), "{error}");
        assert!(error.contains("line 4"), "{error}");
        assert!(error.contains("xdp_mod"), "{error}");
    }

    #[test]
    fn mesh_section_needs_the_overlay_and_a_sane_lifetime() {
        let base = "node_name = \"n1\"\n[datapath]\nunderlay_interface = \"ul0\"\n";
        let overlay = "[overlay]\ninventory = \"i.toml\"\n";
        let mesh = "[mesh]\nca_cert = \"ca.pem\"\nca_key = \"ca.key\"\n";
        let config = parse(&format!("{base}{overlay}{mesh}")).unwrap();
        let section = config.mesh.unwrap();
        assert_eq!(section.trust_domain, "cluster.local");
        assert_eq!(section.inbound_port, 15008);
        assert_eq!(section.certificate_lifetime().as_secs(), 24 * 3600);
        let error = parse(&format!("{base}{mesh}")).unwrap_err().to_string();
        assert!(error.contains("[mesh] needs [overlay]"), "{error}");
        let kubernetes = "[mesh]\nca_cert = \"ca.pem\"\nissuer = \"kubernetes\"\n";
        let config = parse(&format!("{base}{overlay}{kubernetes}")).unwrap();
        assert_eq!(config.mesh.unwrap().issuer, MeshIssuer::Kubernetes);
        let error = parse(&format!("{base}{overlay}[mesh]\nca_cert = \"ca.pem\"\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("mesh.ca_key is missing"), "{error}");
        let error = parse(&format!(
            "{base}{overlay}{mesh}certificate_lifetime = \"5s\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(error.contains("out of range"), "{error}");
        let error = parse(&format!(
            "{base}{overlay}{mesh}certificate_lifetime = \"soon\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(error.contains("not a duration"), "{error}");
        // Secrets only where the controller signs (off unless asked for).
        assert!(
            !parse(&format!("{base}{overlay}{mesh}"))
                .unwrap()
                .mesh
                .unwrap()
                .write_tls_secrets
        );
        let error = parse(&format!("{base}{overlay}{mesh}write_tls_secrets = true\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("needs issuer = \"kubernetes\""), "{error}");
        let config = parse(&format!(
            "{base}{overlay}{kubernetes}write_tls_secrets = true\n"
        ))
        .unwrap();
        assert!(config.mesh.unwrap().write_tls_secrets);
    }

    #[test]
    fn handshake_limits_have_defaults_and_are_checked() {
        let base = "node_name = \"n1\"\n[datapath]\nunderlay_interface = \"ul0\"\n\
                    [overlay]\ninventory = \"i.toml\"\n\
                    [mesh]\nca_cert = \"ca.pem\"\nca_key = \"ca.key\"\n";
        let limits = parse(base).unwrap().mesh.unwrap().handshake_limits();
        assert_eq!(limits.deadline.as_secs(), 10);
        assert_eq!((limits.max_total, limits.max_per_source), (2048, 512));
        let limits = parse(&format!(
            "{base}handshake_timeout = \"3s\"\nmax_handshakes = 8\nmax_handshakes_per_source = 2\n"
        ))
        .unwrap()
        .mesh
        .unwrap()
        .handshake_limits();
        assert_eq!(limits.deadline.as_secs(), 3);
        assert_eq!((limits.max_total, limits.max_per_source), (8, 2));
        let error = |extra: &str| parse(&format!("{base}{extra}")).unwrap_err().to_string();
        let refused = error("handshake_timeout = \"0s\"\n");
        assert!(
            refused.contains("mesh.handshake_timeout") && refused.contains("1s to 120s"),
            "{refused}"
        );
        let refused = error("handshake_timeout = \"later\"\n");
        assert!(refused.contains("not a duration"), "{refused}");
        let refused = error("max_handshakes = 4\nmax_handshakes_per_source = 8\n");
        assert!(refused.contains("no more than the first"), "{refused}");
        let refused = error("max_handshakes = 0\n");
        assert!(refused.contains("at least 1"), "{refused}");
    }

    #[test]
    fn overlay_section_has_defaults_and_limits() {
        let base = "node_name = \"n1\"\n[datapath]\nunderlay_interface = \"ul0\"\n[overlay]\n";
        let config = parse(&format!("{base}inventory = \"/etc/veil/inventory.toml\"\n")).unwrap();
        let overlay = config.overlay.unwrap();
        assert_eq!((overlay.vni, overlay.underlay_mtu), (4242, 1500));
        assert_eq!(overlay.encapsulation, Encapsulation::Tc);
        let config = parse(&format!(
            "{base}inventory = \"i\"\nencapsulation = \"vxlan-device\"\n"
        ))
        .unwrap();
        assert_eq!(
            config.overlay.unwrap().encapsulation,
            Encapsulation::VxlanDevice
        );
        let error = parse(&format!(
            "{base}inventory = \"i\"\nencapsulation = \"gre\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(error.contains("encapsulation"), "{error}");
        let error = parse(&format!("{base}inventory = \"i\"\nvni = 16777216\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("overlay.vni"), "{error}");
        let error = parse(base).unwrap_err().to_string();
        assert!(error.contains("inventory"), "{error}");
    }

    #[test]
    fn kubernetes_can_replace_the_inventory_file_but_needs_the_overlay() {
        let base = "node_name = \"n1\"\n[datapath]\nunderlay_interface = \"ul0\"\n";
        let config = parse(&format!(
            "{base}[overlay]\n[kubernetes]\nkubeconfig = \"/etc/veil/kubeconfig\"\n"
        ))
        .unwrap();
        let kubernetes = config.kubernetes.unwrap();
        assert!(
            kubernetes.annotate_node,
            "annotating the Node is the default"
        );
        assert_eq!(config.overlay.unwrap().inventory, None);
        let error = parse(&format!("{base}[kubernetes]\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("[kubernetes] needs [overlay]"), "{error}");
        let error = parse(&format!("{base}[overlay]\n[kubernetes]\nwatch = true\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field"), "{error}");
    }

    #[test]
    fn acme_section_is_checked_with_line_numbers() {
        let base = "node_name = \"n1\"\n[datapath]\nunderlay_interface = \"ul0\"\n";
        let acme = "[acme]\ndirectory_url = \"https://ca.example/dir\"\n\
                    contact = [\"mailto:ops@example.com\"]\nhttp01_listen = \"0.0.0.0:80\"\n";
        let certificate = "[[acme.certificate]]\nname = \"shop-ingress\"\n\
                           dns_names = [\"shop.example.com\", \"www.shop.example.com\"]\n";
        let config = parse(&format!("{base}{acme}{certificate}")).unwrap();
        let section = config.acme.unwrap();
        assert_eq!(section.store, PathBuf::from("/var/lib/veil/acme"));
        assert_eq!(section.certificates[0].name.get_ref(), "shop-ingress");
        assert_eq!(section.certificates[0].dns_names.len(), 2);
        assert!(parse(base).unwrap().acme.is_none(), "optional");

        let error = |text: String| parse(&text).unwrap_err().to_string();
        let e = error(format!("{base}{acme}"));
        assert!(e.contains("lists no certificate"), "{e}");
        let e = error(format!(
            "{base}{acme}dns01_hook = \"/bin/hook\"\n{certificate}"
        ));
        assert!(e.contains("exactly one challenge"), "{e}");
        let e = error(format!(
            "{base}{}{certificate}",
            acme.replace("https://ca", "http://ca")
        ));
        assert!(e.contains("line 5: acme.directory_url"), "{e}");
        let e = error(format!(
            "{base}{}{certificate}",
            acme.replace("mailto:", "")
        ));
        assert!(e.contains("line 6") && e.contains("mailto"), "{e}");
        let e = error(format!(
            "{base}{acme}{}",
            certificate.replace("shop.example.com\"", "shop example\"")
        ));
        assert!(e.contains("line 10") && e.contains("not a DNS name"), "{e}");
        let e = error(format!(
            "{base}{acme}{}",
            certificate.replace("shop-ingress", "../etc")
        ));
        assert!(e.contains("line 9") && e.contains("directory name"), "{e}");
        let e = error(format!("{base}{acme}{certificate}{certificate}"));
        assert!(e.contains("line 12") && e.contains("used twice"), "{e}");
        let e = error(format!(
            "{base}{acme}{}",
            certificate.replace("\"shop.example.com\"", "\"*.example.com\"")
        ));
        assert!(e.contains("wildcard"), "{e}");
        let e = error(format!("{base}{acme}{certificate}profile = \"x\"\n"));
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn non_loopback_admin_is_refused() {
        let error = parse(
            "node_name = \"n1\"\nadmin_listen = \"0.0.0.0:15000\"\n[datapath]\nunderlay_interface = \"ul0\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("not a loopback address"), "{error}");
    }

    #[test]
    fn duplicate_and_bad_interfaces_are_refused() {
        let duplicate = parse(
            "node_name = \"n1\"\n[datapath]\nunderlay_interface = \"ul0\"\npod_interfaces = [\"ul0\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(duplicate.contains("listed twice"), "{duplicate}");
        let too_long = parse(
            "node_name = \"n1\"\n[datapath]\nunderlay_interface = \"a-very-long-interface-name\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            too_long.contains("not a valid Linux interface name"),
            "{too_long}"
        );
    }
}
