//! The agent's admin API, as data.
//!
//! The agent serves these types as JSON on its localhost admin port (15000);
//! `veilctl` and the tests read them. Keeping them in their own small crate
//! lets clients depend on the API without pulling in the datapath.

use serde::{Deserialize, Serialize};

/// Conventional admin port (localhost only), as in other meshes.
pub const DEFAULT_ADMIN_PORT: u16 = 15000;
/// Conventional Prometheus metrics port.
pub const DEFAULT_METRICS_PORT: u16 = 15020;
/// Conventional readiness port.
pub const DEFAULT_READINESS_PORT: u16 = 15021;
/// Inbound mTLS port that peer agents dial (the HBONE port in Istio ambient).
pub const DEFAULT_INBOUND_MTLS_PORT: u16 = 15008;
/// Path of the Prometheus exposition.
pub const METRICS_PATH: &str = "/metrics";
/// Path of the readiness probe: 200 "ready", or 503 with the reasons.
pub const READINESS_PATH: &str = "/healthz/ready";
/// Path of the status document.
pub const STATUS_PATH: &str = "/status";
/// Path of the effective-mode query: `?pod=<name or address>&port=<n>`.
pub const MTLS_MODE_PATH: &str = "/mtls";
/// Path of the recent meshed connections (oldest first).
pub const FLOWS_PATH: &str = "/flows";

/// One meshed connection: who talked to whom, how, and what came of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// When it ended (or was refused), seconds since the Unix epoch.
    pub unix_time: u64,
    /// `outbound` (a local pod's connection) or `inbound` (to a local pod).
    pub direction: String,
    /// Pod name and address when known, else the address.
    pub source: String,
    pub destination: String,
    /// `ktls`, `userspace`, or `none` for refused connections.
    pub mode: String,
    /// `ok`, or why the connection was refused.
    pub result: String,
    pub bytes_to_peer: u64,
    pub bytes_to_pod: u64,
}

/// Everything `veilctl status` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Agent version (the crate version).
    pub version: String,
    /// Name of the node this agent serves.
    pub node: String,
    /// Programs the agent has attached.
    pub programs: Vec<AttachedProgram>,
    /// Packet counters per program and interface.
    pub counters: Vec<InterfaceCounters>,
    /// What the programs did with packets (forwarded, passed, dropped by reason).
    #[serde(default)]
    pub events: Vec<EventCount>,
    /// The overlay's state, when the agent runs one.
    #[serde(default)]
    pub overlay: Option<OverlayStatus>,
    /// Whether the node's kernel can do TLS (kTLS); without it mTLS runs in userspace.
    #[serde(default)]
    pub kernel_tls: bool,
    /// What the agent found the kernel supports, and what it chose for it.
    #[serde(default)]
    pub kernel: Option<KernelStatus>,
    /// The mTLS mesh, when the agent runs one.
    #[serde(default)]
    pub mesh: Option<MeshStatus>,
    /// The control-plane event bus, when the agent has one.
    #[serde(default)]
    pub event_bus: Option<EventBusStatus>,
    /// Server-name certificates from an ACME CA (`[acme]`), by name.
    #[serde(default)]
    pub acme: Vec<AcmeCertificateStatus>,
}

/// The kernel as the agent probed it at start, and the datapath it built
/// for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelStatus {
    /// `uname -r` (for the record: the agent decides from probes, not versions).
    pub release: String,
    pub features: Vec<KernelFeature>,
    pub choices: Vec<DatapathChoice>,
}

/// One thing the datapath uses that kernels may lack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFeature {
    /// Short name, e.g. `xdp-metadata`.
    pub name: String,
    pub description: String,
    pub available: bool,
    /// Without it the agent does not start.
    pub required: bool,
    /// Switched off for a test (`VEIL_TEST_DISABLE_FEATURES`).
    #[serde(default)]
    pub forced_off: bool,
    /// The oldest upstream kernel that has it.
    pub oldest_kernel: String,
    /// What the agent does without it (`None` for a required feature).
    #[serde(default)]
    pub fallback: Option<String>,
}

/// One decision the agent took for this kernel, e.g. how decapsulated
/// packets reach their pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathChoice {
    /// What was decided, e.g. `delivery`.
    pub decision: String,
    /// What was chosen, e.g. `lookup`.
    pub chosen: String,
    /// Why, e.g. "this kernel refuses bpf_xdp_adjust_meta in XDP".
    pub reason: String,
    /// True when this is a fallback from the preferred way.
    #[serde(default)]
    pub fallback: bool,
}

impl KernelStatus {
    /// What was chosen for `decision`, if it was decided.
    pub fn chosen(&self, decision: &str) -> Option<&str> {
        self.choices
            .iter()
            .find(|c| c.decision == decision)
            .map(|c| c.chosen.as_str())
    }
}

/// One ACME certificate the agent keeps renewed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeCertificateStatus {
    pub name: String,
    pub dns_names: Vec<String>,
    /// The certificate in service, if any.
    pub serial: Option<String>,
    pub not_after_unix: Option<u64>,
    pub next_renewal_unix: Option<u64>,
    /// What the renewal time was decided from: `ari` or `lifetime`.
    pub renewal_source: Option<String>,
    /// The last failure, until the next success.
    pub last_error: Option<String>,
    pub failures: u32,
}

/// The event bus as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBusStatus {
    /// `connected`, or `degraded: event bus: <reason>` (the agent keeps
    /// working from its cache; events it publishes wait in the outbox).
    pub state: String,
    /// `kafka`, or `embedded` (no broker configured: a local journal).
    #[serde(default)]
    pub kind: String,
    /// Pods of other nodes learnt from the bus.
    pub announced_pods: usize,
    /// How far events from other nodes seemed to arrive *before* they were
    /// published (broker timestamp later than this node's clock), at most,
    /// over the last minutes: this node's clock is behind by about that much
    /// (or the publisher's is ahead). `None` when nothing looked early.
    #[serde(default)]
    pub clock_behind_ms: Option<u64>,
    /// Certificate serials revoked on the bus (refused by this node).
    #[serde(default)]
    pub revoked_serials: usize,
    /// Identities revoked on the bus (their certificates issued before the
    /// revocation are refused).
    #[serde(default)]
    pub revoked_identities: usize,
}

/// The mesh on this node: its workloads' certificates and what its
/// connections did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshStatus {
    pub trust_domain: String,
    /// Meshed pods on this node.
    pub workloads: Vec<MeshWorkload>,
    /// Connections so far, by direction, TLS mode and result.
    pub connections: Vec<MeshConnectionCount>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshWorkload {
    pub pod: String,
    pub ip: String,
    /// SPIFFE ID.
    pub identity: String,
    /// Effective workload-level mode: strict, permissive or disable.
    pub mode: String,
    pub certificate: Option<MeshCertificate>,
    /// Why there is no certificate, when there is none.
    #[serde(default)]
    pub certificate_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshCertificate {
    /// Serial number, lowercase hex.
    pub serial: String,
    pub issuer: String,
    /// Seconds since the Unix epoch.
    pub not_after_unix: u64,
    /// When the agent replaces it (seconds since the Unix epoch).
    pub renew_at_unix: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshConnectionCount {
    pub direction: String,
    pub mode: String,
    pub result: String,
    pub count: u64,
}

/// The answer to `veilctl mtls`: the effective mode and how it came about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeReport {
    pub pod: String,
    pub ip: String,
    pub node: String,
    /// SPIFFE ID, when the pod is in the mesh.
    pub identity: Option<String>,
    pub port: Option<u16>,
    /// strict, permissive or disable.
    pub mode: String,
    /// Most specific level first: port, workload, namespace, mesh.
    pub chain: Vec<ModeLevel>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeLevel {
    pub level: String,
    /// What this level sets; `None` when it says nothing.
    pub mode: Option<String>,
    /// True for the level whose setting decided.
    pub decided: bool,
}

/// Packets counted under one datapath event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventCount {
    pub event: String,
    /// True for drop reasons.
    pub drop: bool,
    pub packets: u64,
}

/// The overlay as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayStatus {
    pub vni: u32,
    pub underlay_ip: String,
    pub underlay_mtu: u32,
    /// The inventory file the maps come from.
    pub inventory: String,
    /// Why the last read of the inventory was refused (the previous state stays in force).
    pub inventory_error: Option<String>,
    /// Local pods left out (e.g. their veth does not exist yet).
    pub warnings: Vec<String>,
    /// Why the last apply (attach or map write) did not complete; the agent
    /// is not ready and retries.
    #[serde(default)]
    pub apply_error: Option<String>,
    /// Times the agent planned and applied the overlay since it started:
    /// flat while nothing changes.
    #[serde(default)]
    pub plans: u64,
    pub routes: Vec<OverlayRoute>,
    pub endpoints: Vec<OverlayEndpoint>,
    /// MTUs of the underlay interface and the local pods' veths as the
    /// kernel has them now (to compare with `underlay_mtu`).
    #[serde(default)]
    pub interface_mtus: Vec<InterfaceMtu>,
    /// Who writes the outer headers: `tc` (the pod-egress program) or
    /// `vxlan-device` (a collect_md vxlan device). Empty from older agents.
    #[serde(default)]
    pub encapsulation: String,
}

/// An interface's MTU on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceMtu {
    pub interface: String,
    pub mtu: u32,
    /// `underlay` or `pod`.
    pub role: String,
}

/// A pod CIDR (or moved pod) and the node that owns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayRoute {
    pub cidr: String,
    pub node_ip: String,
    pub node_mac: String,
}

/// A pod on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayEndpoint {
    pub ip: String,
    pub ifindex: u32,
    pub pod_mac: String,
}

/// Where a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookKind {
    /// XDP on the underlay interface.
    Xdp,
    /// TC ingress (tcx or clsact) on a pod's host-side veth.
    TcIngress,
    /// `sk_lookup` on the node's network namespace (no interface).
    SkLookup,
}

impl std::fmt::Display for HookKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Xdp => "xdp",
            Self::TcIngress => "tc-ingress",
            Self::SkLookup => "sk-lookup",
        })
    }
}

/// One program attached to one interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedProgram {
    pub name: String,
    pub hook: HookKind,
    pub interface: String,
    pub ifindex: u32,
    /// How it is attached: `native`/`generic` for XDP, `tcx`/`netlink` for TC.
    pub mode: String,
    /// Why the program no longer runs where it was attached (the interface
    /// was deleted or recreated, or someone else's program replaced it);
    /// `None` while it is in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached: Option<String>,
}

/// Packets and bytes one program has seen on one interface, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceCounters {
    pub hook: HookKind,
    pub interface: String,
    pub ifindex: u32,
    pub packets: u64,
    pub bytes: u64,
}

impl AgentStatus {
    /// Packets counted under the event called `event` (0 if unknown).
    pub fn event(&self, event: &str) -> u64 {
        self.events
            .iter()
            .find(|e| e.event == event)
            .map_or(0, |e| e.packets)
    }

    /// Counters of `hook` on the interface called `interface`, if any packet was seen.
    pub fn counters_for(&self, hook: HookKind, interface: &str) -> Option<&InterfaceCounters> {
        self.counters
            .iter()
            .find(|c| c.hook == hook && c.interface == interface)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_through_json() {
        let status = AgentStatus {
            version: "0.1.0".into(),
            node: "node1".into(),
            programs: vec![AttachedProgram {
                name: "veil_underlay_ingress".into(),
                hook: HookKind::Xdp,
                interface: "ul0".into(),
                ifindex: 2,
                mode: "native".into(),
                detached: None,
            }],
            counters: vec![InterfaceCounters {
                hook: HookKind::TcIngress,
                interface: "vp1".into(),
                ifindex: 3,
                packets: 10,
                bytes: 1000,
            }],
            events: vec![EventCount {
                event: "drop-wrong-vni".into(),
                drop: true,
                packets: 3,
            }],
            overlay: None,
            kernel_tls: false,
            kernel: Some(KernelStatus {
                release: "6.1.0".into(),
                features: vec![KernelFeature {
                    name: "xdp-metadata".into(),
                    description: "bpf_xdp_adjust_meta in XDP".into(),
                    available: false,
                    required: false,
                    forced_off: false,
                    oldest_kernel: "4.15".into(),
                    fallback: Some("lookup delivery".into()),
                }],
                choices: vec![DatapathChoice {
                    decision: "delivery".into(),
                    chosen: "lookup".into(),
                    reason: "no metadata".into(),
                    fallback: true,
                }],
            }),
            mesh: None,
            event_bus: None,
            acme: vec![AcmeCertificateStatus {
                name: "shop-ingress".into(),
                dns_names: vec!["shop.example.com".into()],
                serial: Some("0a".into()),
                not_after_unix: Some(1_800_000_000),
                next_renewal_unix: Some(1_790_000_000),
                renewal_source: Some("ari".into()),
                last_error: None,
                failures: 0,
            }],
        };
        let json = serde_json::to_string(&status).unwrap();
        assert!(json.contains("\"hook\":\"tc-ingress\""), "{json}");
        let back: AgentStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(back, status);
        assert_eq!(
            back.counters_for(HookKind::TcIngress, "vp1")
                .map(|c| c.bytes),
            Some(1000)
        );
        assert!(back.counters_for(HookKind::Xdp, "vp1").is_none());
        assert_eq!(back.kernel.unwrap().chosen("delivery"), Some("lookup"));
    }
}
