//! The eBPF datapath: load the embedded object, attach its programs, read its maps.
//!
//! [`Datapath`] owns the loaded object; dropping it detaches every program
//! (attachments are bpf_links tied to our file descriptors, so a crashed agent
//! leaves nothing attached behind either).

mod attach;
mod logs;

use std::collections::HashMap;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuHashMap},
    programs::{ProgramError, SchedClassifier, Xdp},
};
use veil_api::{AttachedProgram, HookKind, InterfaceCounters};
use veil_common::{
    counters::{CounterKey, Hook, PacketCounters},
    names,
};

use crate::config::DatapathConfig;

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at compile time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("VEIL_EBPF_OBJECT"));

const PERMISSION_HINT: &str = "the agent needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot load the eBPF object ({PERMISSION_HINT}): {0}")]
    Load(#[from] aya::EbpfError),
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
    #[error("cannot read map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cannot start reading eBPF logs: {0}")]
    Logs(#[from] aya_log::Error),
    #[error("cannot watch the eBPF log ring buffer: {0}")]
    LogWatch(std::io::Error),
}

/// The loaded and attached datapath of one node.
pub struct Datapath {
    /// Owns the programs and their links; dropping it detaches them.
    _ebpf: Ebpf,
    counters: PerCpuHashMap<MapData, CounterKey, PacketCounters>,
    programs: Vec<AttachedProgram>,
    interface_names: HashMap<u32, String>,
}

impl Datapath {
    /// Loads the embedded object and attaches XDP to the underlay and TC to each pod veth.
    ///
    /// Must run inside a tokio runtime: the programs' log records are
    /// forwarded to the agent's log by a background task.
    pub fn start(config: &DatapathConfig) -> Result<Self, DatapathError> {
        let mut ebpf = EbpfLoader::new().load(EBPF_OBJECT)?;
        logs::forward_to_agent_log(&mut ebpf)?;

        let mut programs = Vec::new();
        let mut interface_names = HashMap::new();

        let xdp: &mut Xdp = program_mut(&mut ebpf, names::PROG_UNDERLAY_INGRESS)?
            .try_into()
            .map_err(refused(names::PROG_UNDERLAY_INGRESS))?;
        xdp.load().map_err(refused(names::PROG_UNDERLAY_INGRESS))?;
        let attached = attach::xdp(
            xdp,
            names::PROG_UNDERLAY_INGRESS,
            &config.underlay_interface,
            config.xdp_mode,
        )?;
        interface_names.insert(attached.ifindex, attached.interface.clone());
        programs.push(attached);

        let tc: &mut SchedClassifier = program_mut(&mut ebpf, names::PROG_POD_EGRESS)?
            .try_into()
            .map_err(refused(names::PROG_POD_EGRESS))?;
        tc.load().map_err(refused(names::PROG_POD_EGRESS))?;
        for interface in &config.pod_interfaces {
            let attached = attach::tc_ingress(tc, names::PROG_POD_EGRESS, interface)?;
            interface_names.insert(attached.ifindex, attached.interface.clone());
            programs.push(attached);
        }

        let counters =
            ebpf.take_map(names::MAP_INTERFACE_COUNTERS)
                .ok_or(DatapathError::Missing {
                    kind: "map",
                    name: names::MAP_INTERFACE_COUNTERS,
                })?;
        let counters = PerCpuHashMap::try_from(counters).map_err(|source| DatapathError::Map {
            map: names::MAP_INTERFACE_COUNTERS,
            source,
        })?;

        Ok(Self {
            _ebpf: ebpf,
            counters,
            programs,
            interface_names,
        })
    }

    /// The programs attached, in attach order.
    pub fn programs(&self) -> &[AttachedProgram] {
        &self.programs
    }

    /// Packets and bytes per (hook, interface), summed over all CPUs.
    pub fn counters(&self) -> Result<Vec<InterfaceCounters>, DatapathError> {
        let mut report = Vec::new();
        for entry in self.counters.iter() {
            let (key, per_cpu) = entry.map_err(|source| DatapathError::Map {
                map: names::MAP_INTERFACE_COUNTERS,
                source,
            })?;
            let Some(hook) = Hook::from_raw(key.hook) else {
                continue;
            };
            let total = per_cpu
                .iter()
                .fold(PacketCounters::default(), |sum, cpu| sum.add(*cpu));
            report.push(InterfaceCounters {
                hook: hook_kind(hook),
                interface: self
                    .interface_names
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

fn hook_kind(hook: Hook) -> HookKind {
    match hook {
        Hook::UnderlayXdp => HookKind::Xdp,
        Hook::PodEgressTc => HookKind::TcIngress,
    }
}

fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program, DatapathError> {
    ebpf.program_mut(name).ok_or(DatapathError::Missing {
        kind: "program",
        name,
    })
}

fn refused(program: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { program, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_object_has_every_program_map_and_btf() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("embedded object parses");
        for program in [names::PROG_UNDERLAY_INGRESS, names::PROG_POD_EGRESS] {
            assert!(
                object.programs.contains_key(program),
                "missing program {program}"
            );
        }
        assert!(object.maps.contains_key(names::MAP_INTERFACE_COUNTERS));
        assert!(object.btf.is_some(), "object carries no BTF");
        assert!(
            object.btf_ext.is_some(),
            "object carries no BTF.ext (line info)"
        );
    }
}
