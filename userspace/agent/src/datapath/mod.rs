//! The eBPF datapath: load the embedded object, attach its programs, keep its maps.
//!
//! [`Datapath`] owns the loaded object; dropping it detaches every program
//! (attachments are bpf_links tied to our file descriptors, so a crashed agent
//! leaves nothing attached behind either).

mod attach;
pub mod choices;
pub mod features;
pub mod links;
mod logs;
pub mod overlay;
pub mod tunnel;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aya::{
    Ebpf,
    maps::{Map, MapData, MapError, PerCpuHashMap, SockMap},
    programs::{ProgramError, SchedClassifier, SkLookup, Xdp, tc::SchedClassifierLinkId},
};
use tracing::{info, warn};
use veil_api::{AttachedProgram, HookKind, InterfaceCounters};
use veil_common::{
    counters::{CounterKey, Hook, PacketCounters},
    names,
};

use self::{
    choices::LoadTimeSettings,
    features::{Feature, KernelFeatures},
    overlay::OverlayMaps,
};
use crate::config::{DatapathConfig, XdpAttachMode};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at compile time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("VEIL_EBPF_OBJECT"));

/// The embedded eBPF object (for tests that load programs by themselves).
pub fn ebpf_object() -> &'static [u8] {
    EBPF_OBJECT
}

const PERMISSION_HINT: &str = "the agent needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot load the eBPF object ({PERMISSION_HINT}): {0}")]
    Load(#[from] aya::EbpfError),
    #[error(transparent)]
    Kernel(#[from] features::FeatureError),
    #[error(
        "the eBPF object has no {kind} named {name}: agent and object are out of step, rebuild with `cargo xtask build-ebpf`"
    )]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("program {program} was refused by the kernel ({PERMISSION_HINT}): {source}")]
    Program {
        program: &'static str,
        source: ProgramError,
    },
    #[error(
        "interface {interface} does not exist in this network namespace: check the agent config"
    )]
    UnknownInterface { interface: String },
    #[error("cannot attach {program} to {interface}: {reason}")]
    Attach {
        program: &'static str,
        interface: String,
        reason: String,
    },
    #[error("cannot use map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("cannot update the overlay maps: {0}")]
    Overlay(#[from] overlay::OverlayMapError),
    #[error("cannot open this network namespace to attach {program}: {source}")]
    Namespace {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("cannot start reading eBPF logs: {0}")]
    Logs(#[from] aya_log::Error),
    #[error("cannot watch the eBPF log ring buffer: {0}")]
    LogWatch(std::io::Error),
}

/// What `veilctl status` shows as the interface of a program attached to
/// the node's network namespace rather than to an interface.
pub const NAMESPACE_INTERFACE: &str = "netns";

/// The loaded and attached datapath of one node.
pub struct Datapath {
    /// Owns the programs and their links; dropping it detaches them.
    ebpf: Ebpf,
    counters: PerCpuHashMap<MapData, CounterKey, PacketCounters>,
    overlay: OverlayMaps,
    /// The mesh's listener, for the `sk_lookup` program (see
    /// [`Datapath::set_mesh_listener`]).
    mesh_listener: SockMap<MapData>,
    xdp: AttachedProgram,
    /// TC ingress on the underlay, delivering what XDP decapsulated.
    deliver: AttachedProgram,
    /// `sk_lookup` on the node's namespace, for the mesh's TIME_WAIT case
    /// (`None` on kernels without sk_lookup).
    time_wait: Option<AttachedProgram>,
    /// What the kernel supports, as probed at start.
    kernel: KernelFeatures,
    /// What the datapath chose for it, with reasons.
    choices: Vec<veil_api::DatapathChoice>,
    /// Whether the mesh hands sessions to kernel TLS (`None`: no mesh).
    kernel_tls: Option<bool>,
    /// TC attaches through tcx (else netlink).
    uses_tcx: bool,
    /// Pod veths with the pod-egress program, by name.
    pod_programs: BTreeMap<String, (SchedClassifierLinkId, AttachedProgram)>,
    /// Pod veths from the agent config: attached for the agent's whole life.
    static_pod_interfaces: BTreeSet<String>,
}

impl Datapath {
    /// Loads the embedded object, built for `kernel` (probed with
    /// [`features::KernelFeatures::probe`]), and attaches XDP to the
    /// underlay and TC to each configured pod veth.
    ///
    /// `mesh_kernel_tls`: `None` without a mesh, else whether the config
    /// lets the mesh use kernel TLS (`kernel_tls = "auto"`).
    ///
    /// Must run inside a tokio runtime: the programs' log records are
    /// forwarded to the agent's log by a background task.
    pub fn start(
        config: &DatapathConfig,
        mut kernel: KernelFeatures,
        mesh_kernel_tls: Option<bool>,
    ) -> Result<Self, DatapathError> {
        // A clear refusal before the verifier would give a less clear one.
        kernel.require_all()?;
        let settings = LoadTimeSettings::for_kernel(&kernel);
        let mut ebpf = settings.load(EBPF_OBJECT)?;
        let (xdp_link, tcx) = features::probe_attach_paths(&mut ebpf)?;
        kernel.record(Feature::XdpLink, xdp_link);
        kernel.record(Feature::Tcx, tcx);
        kernel.require_all()?;
        let tcx = kernel.has(Feature::Tcx);
        logs::forward_to_agent_log(&mut ebpf)?;

        let xdp: &mut Xdp = program_mut(&mut ebpf, names::PROG_UNDERLAY_INGRESS)?
            .try_into()
            .map_err(refused(names::PROG_UNDERLAY_INGRESS))?;
        xdp.load().map_err(refused(names::PROG_UNDERLAY_INGRESS))?;
        let native_allowed = !kernel.switched_off(Feature::NativeXdp);
        let xdp = attach::xdp(
            xdp,
            names::PROG_UNDERLAY_INGRESS,
            &config.underlay_interface,
            config.xdp_mode,
            native_allowed,
        )?;
        let xdp_reason = match (config.xdp_mode, xdp.mode.as_str()) {
            (XdpAttachMode::Generic, _) => "xdp_mode = \"generic\" in the agent config".to_string(),
            (_, "native") => {
                kernel.record(Feature::NativeXdp, true);
                format!("{}'s driver runs XDP", config.underlay_interface)
            }
            _ if !native_allowed => {
                kernel.record(Feature::NativeXdp, false);
                format!(
                    "xdp-native switched off by {}",
                    features::DISABLE_FEATURES_ENV
                )
            }
            _ => {
                kernel.record(Feature::NativeXdp, false);
                format!("{}'s driver refused native XDP", config.underlay_interface)
            }
        };

        let deliver: &mut SchedClassifier = program_mut(&mut ebpf, names::PROG_UNDERLAY_DELIVER)?
            .try_into()
            .map_err(refused(names::PROG_UNDERLAY_DELIVER))?;
        deliver
            .load()
            .map_err(refused(names::PROG_UNDERLAY_DELIVER))?;
        // The link lives as long as the program inside `ebpf`.
        let (_, deliver) = attach::tc_ingress(
            deliver,
            names::PROG_UNDERLAY_DELIVER,
            &config.underlay_interface,
            tcx,
        )?;

        let tc: &mut SchedClassifier = program_mut(&mut ebpf, names::PROG_POD_EGRESS)?
            .try_into()
            .map_err(refused(names::PROG_POD_EGRESS))?;
        tc.load().map_err(refused(names::PROG_POD_EGRESS))?;

        let time_wait = if kernel.has(Feature::SkLookup) {
            Some(attach_time_wait(&mut ebpf)?)
        } else {
            None
        };
        let mesh_listener = SockMap::try_from(take_map(&mut ebpf, names::MAP_MESH_LISTENER)?)
            .map_err(map_error(names::MAP_MESH_LISTENER))?;

        let counters = PerCpuHashMap::try_from(take_map(&mut ebpf, names::MAP_INTERFACE_COUNTERS)?)
            .map_err(map_error(names::MAP_INTERFACE_COUNTERS))?;
        let overlay = OverlayMaps {
            config: take_map(&mut ebpf, names::MAP_OVERLAY_CONFIG)?
                .try_into()
                .map_err(map_error(names::MAP_OVERLAY_CONFIG))?,
            routes: take_map(&mut ebpf, names::MAP_NODE_ROUTES)?
                .try_into()
                .map_err(map_error(names::MAP_NODE_ROUTES))?,
            endpoints: take_map(&mut ebpf, names::MAP_LOCAL_ENDPOINTS)?
                .try_into()
                .map_err(map_error(names::MAP_LOCAL_ENDPOINTS))?,
            devices: take_map(&mut ebpf, names::MAP_POD_DEVICES)?
                .try_into()
                .map_err(map_error(names::MAP_POD_DEVICES))?,
            mesh_peers: take_map(&mut ebpf, names::MAP_MESH_PEERS)?
                .try_into()
                .map_err(map_error(names::MAP_MESH_PEERS))?,
            port_modes: take_map(&mut ebpf, names::MAP_PORT_MODES)?
                .try_into()
                .map_err(map_error(names::MAP_PORT_MODES))?,
            same_node_verdicts: take_map(&mut ebpf, names::MAP_SAME_NODE_VERDICTS)?
                .try_into()
                .map_err(map_error(names::MAP_SAME_NODE_VERDICTS))?,
            plaintext_verdicts: take_map(&mut ebpf, names::MAP_PLAINTEXT_VERDICTS)?
                .try_into()
                .map_err(map_error(names::MAP_PLAINTEXT_VERDICTS))?,
            events: take_map(&mut ebpf, names::MAP_DATAPATH_EVENTS)?
                .try_into()
                .map_err(map_error(names::MAP_DATAPATH_EVENTS))?,
        };

        let static_pod_interfaces: BTreeSet<String> =
            config.pod_interfaces.iter().cloned().collect();
        let kernel_tls = mesh_kernel_tls.map(|allowed| allowed && kernel.has(Feature::TlsUlp));
        let choices = choices::report(
            &kernel,
            &settings,
            &xdp.mode,
            &xdp_reason,
            kernel_tls,
            mesh_kernel_tls == Some(false),
        );
        log_kernel(&kernel, &choices);
        let mut datapath = Self {
            ebpf,
            kernel,
            choices,
            kernel_tls,
            uses_tcx: tcx,
            counters,
            overlay,
            mesh_listener,
            xdp,
            deliver,
            time_wait,
            pod_programs: BTreeMap::new(),
            static_pod_interfaces: static_pod_interfaces.clone(),
        };
        datapath.sync_pod_interfaces(&static_pod_interfaces)?;
        Ok(datapath)
    }

    /// What the kernel supports and what the datapath chose for it.
    pub fn kernel_status(&self) -> veil_api::KernelStatus {
        veil_api::KernelStatus {
            release: self.kernel.release.clone(),
            features: self
                .kernel
                .probes
                .iter()
                .map(|probe| veil_api::KernelFeature {
                    name: probe.feature.name().into(),
                    description: probe.feature.description().into(),
                    available: probe.available,
                    required: probe.feature.required(),
                    forced_off: probe.forced_off,
                    oldest_kernel: probe.feature.oldest_kernel().into(),
                    fallback: probe.feature.fallback().map(Into::into),
                })
                .collect(),
            choices: self.choices.clone(),
        }
    }

    /// Whether the mesh hands its sessions to kernel TLS: the config lets
    /// it and the kernel has the TLS ULP (`None` without a mesh).
    pub fn kernel_tls(&self) -> Option<bool> {
        self.kernel_tls
    }

    /// Lets the `sk_lookup` program hand a new meshed SYN that met an old
    /// connection's TIME_WAIT to `listener`, the mesh's transparent
    /// outbound listener.
    pub fn set_mesh_listener(
        &mut self,
        listener: &impl std::os::fd::AsRawFd,
    ) -> Result<(), DatapathError> {
        self.mesh_listener
            .set(0, listener, 0)
            .map_err(map_error(names::MAP_MESH_LISTENER))
    }

    /// The veths the pod-egress program is attached to now.
    pub fn pod_interfaces(&self) -> impl Iterator<Item = &String> {
        self.pod_programs.keys()
    }

    /// Attaches the pod-egress program to `wanted` (plus the configured veths)
    /// and detaches it from veths no longer wanted.
    pub fn sync_pod_interfaces(&mut self, wanted: &BTreeSet<String>) -> Result<(), DatapathError> {
        let wanted: BTreeSet<String> = wanted.union(&self.static_pod_interfaces).cloned().collect();
        let tc: &mut SchedClassifier = program_mut(&mut self.ebpf, names::PROG_POD_EGRESS)?
            .try_into()
            .map_err(refused(names::PROG_POD_EGRESS))?;
        let stale: Vec<String> = self
            .pod_programs
            .keys()
            .filter(|name| !wanted.contains(*name))
            .cloned()
            .collect();
        for interface in stale {
            if let Some((link, _)) = self.pod_programs.remove(&interface) {
                // The veth may already be gone with its link; either way it is detached.
                let _ = tc.detach(link);
                info!(interface, "detached pod egress program");
            }
        }
        let links = links::current();
        for interface in wanted {
            // A veth deleted and made again under the same name (a pod
            // restarted, or moved back) took our program with it: attach anew.
            if let Some((_, attached)) = self.pod_programs.get(&interface)
                && links
                    .get(&interface)
                    .is_some_and(|link| link.ifindex != attached.ifindex)
                && let Some((link, _)) = self.pod_programs.remove(&interface)
            {
                let _ = tc.detach(link);
                info!(
                    interface,
                    "pod veth was recreated; attaching the pod egress program again"
                );
            }
            if let std::collections::btree_map::Entry::Vacant(slot) =
                self.pod_programs.entry(interface)
            {
                let attached =
                    attach::tc_ingress(tc, names::PROG_POD_EGRESS, slot.key(), self.uses_tcx)?;
                slot.insert(attached);
            }
        }
        Ok(())
    }

    /// The overlay maps, to apply an inventory or read the event counters.
    pub fn overlay(&self) -> &OverlayMaps {
        &self.overlay
    }

    pub fn overlay_mut(&mut self) -> &mut OverlayMaps {
        &mut self.overlay
    }

    /// The programs attached: the underlay's (XDP, then TC) first, the
    /// namespace's `sk_lookup`, then pod veths by name.
    pub fn programs(&self) -> Vec<AttachedProgram> {
        [self.xdp.clone(), self.deliver.clone()]
            .into_iter()
            .chain(self.time_wait.clone())
            .chain(self.pod_programs.values().map(|(_, p)| p.clone()))
            .collect()
    }

    /// [`Self::programs`], each checked against the kernel now: the
    /// interface still exists with the index it had when the program was
    /// attached, and (XDP) it still runs an XDP program, by `details`
    /// ([`links::details`]; without them that last check is skipped: only a
    /// definite "no" counts as detached).
    pub fn programs_checked(
        &self,
        details: Option<&HashMap<String, links::LinkDetails>>,
    ) -> Vec<AttachedProgram> {
        let links = links::current();
        let mut programs = self.programs();
        // An sk_lookup link is held by the namespace and the agent, not by
        // an interface that could go away under it.
        for program in programs.iter_mut().filter(|p| p.hook != HookKind::SkLookup) {
            program.detached = match links.get(&program.interface) {
                None => Some(format!("interface {} is gone", program.interface)),
                Some(link) if link.ifindex != program.ifindex => Some(format!(
                    "interface {} was recreated (index {} → {}); the program went with the old one",
                    program.interface, program.ifindex, link.ifindex
                )),
                Some(_)
                    if program.hook == HookKind::Xdp
                        && details
                            .and_then(|d| d.get(&program.interface))
                            .is_some_and(|d| !d.xdp) =>
                {
                    Some(format!(
                        "no XDP program runs on {} any more",
                        program.interface
                    ))
                }
                Some(_) => None,
            };
        }
        programs
    }

    /// Packets and bytes per (hook, interface), summed over all CPUs.
    pub fn counters(&self) -> Result<Vec<InterfaceCounters>, DatapathError> {
        let names: HashMap<u32, String> = self
            .programs()
            .into_iter()
            .filter(|p| p.hook != HookKind::SkLookup)
            .map(|p| (p.ifindex, p.interface))
            .collect();
        let mut report = Vec::new();
        for entry in self.counters.iter() {
            let (key, per_cpu) = entry.map_err(map_error(names::MAP_INTERFACE_COUNTERS))?;
            let Some(hook) = Hook::from_raw(key.hook) else {
                continue;
            };
            let total = per_cpu
                .iter()
                .fold(PacketCounters::default(), |sum, cpu| sum.add(*cpu));
            report.push(InterfaceCounters {
                hook: hook_kind(hook),
                interface: names
                    .get(&key.ifindex)
                    .cloned()
                    .unwrap_or_else(|| format!("ifindex {}", key.ifindex)),
                ifindex: key.ifindex,
                packets: total.packets,
                bytes: total.bytes,
            });
        }
        report.sort_by_key(|c| (c.hook as u8, c.ifindex));
        Ok(report)
    }
}

/// Loads the `sk_lookup` program and attaches it to this network namespace.
fn attach_time_wait(ebpf: &mut Ebpf) -> Result<AttachedProgram, DatapathError> {
    // Answers only listener lookups for meshed remote pods' addresses, and
    // only once the mesh has put its listener in the map.
    let time_wait: &mut SkLookup = program_mut(ebpf, names::PROG_MESH_TIME_WAIT)?
        .try_into()
        .map_err(refused(names::PROG_MESH_TIME_WAIT))?;
    time_wait
        .load()
        .map_err(refused(names::PROG_MESH_TIME_WAIT))?;
    let namespace =
        std::fs::File::open("/proc/self/ns/net").map_err(|source| DatapathError::Namespace {
            program: names::PROG_MESH_TIME_WAIT,
            source,
        })?;
    // The link lives as long as the program inside `ebpf`.
    time_wait
        .attach(&namespace)
        .map_err(refused(names::PROG_MESH_TIME_WAIT))?;
    Ok(AttachedProgram {
        name: names::PROG_MESH_TIME_WAIT.into(),
        hook: HookKind::SkLookup,
        interface: NAMESPACE_INTERFACE.into(),
        ifindex: 0,
        mode: "link".into(),
        detached: None,
    })
}

/// The start-up log's account of the kernel: one line for what it lacks,
/// one per decision taken for it.
fn log_kernel(kernel: &KernelFeatures, choices: &[veil_api::DatapathChoice]) {
    let lacking: Vec<&str> = kernel
        .probes
        .iter()
        .filter(|p| !p.available)
        .map(|p| p.feature.name())
        .collect();
    info!(
        release = %kernel.release,
        probed = kernel.probes.len(),
        lacking = %lacking.join(","),
        "kernel features probed"
    );
    for choice in choices {
        if choice.fallback {
            warn!(
                decision = %choice.decision,
                chosen = %choice.chosen,
                reason = %choice.reason,
                "datapath fallback"
            );
        } else {
            info!(
                decision = %choice.decision,
                chosen = %choice.chosen,
                reason = %choice.reason,
                "datapath choice"
            );
        }
    }
}

fn hook_kind(hook: Hook) -> HookKind {
    match hook {
        Hook::UnderlayXdp => HookKind::Xdp,
        Hook::PodEgressTc | Hook::UnderlayDeliverTc => HookKind::TcIngress,
    }
}

pub(crate) fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program, DatapathError> {
    ebpf.program_mut(name).ok_or(DatapathError::Missing {
        kind: "program",
        name,
    })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, DatapathError> {
    ebpf.take_map(name)
        .ok_or(DatapathError::Missing { kind: "map", name })
}

pub(crate) fn refused(program: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { program, source }
}

fn map_error(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_object_has_every_program_map_and_btf() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("embedded object parses");
        for program in [
            names::PROG_UNDERLAY_INGRESS,
            names::PROG_UNDERLAY_DELIVER,
            names::PROG_POD_EGRESS,
        ] {
            assert!(
                object.programs.contains_key(program),
                "missing program {program}"
            );
        }
        for map in [
            names::MAP_INTERFACE_COUNTERS,
            names::MAP_OVERLAY_CONFIG,
            names::MAP_NODE_ROUTES,
            names::MAP_LOCAL_ENDPOINTS,
            names::MAP_POD_DEVICES,
            names::MAP_MESH_PEERS,
            names::MAP_PORT_MODES,
            names::MAP_SAME_NODE_VERDICTS,
            names::MAP_PLAINTEXT_VERDICTS,
            names::MAP_DATAPATH_EVENTS,
        ] {
            assert!(object.maps.contains_key(map), "missing map {map}");
        }
        assert!(object.btf.is_some(), "object carries no BTF");
        assert!(
            object.btf_ext.is_some(),
            "object carries no BTF.ext (line info)"
        );
    }
}
