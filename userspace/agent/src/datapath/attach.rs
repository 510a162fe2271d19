//! Attaching programs to interfaces, choosing the best mode the kernel offers.

use aya::{
    programs::{
        SchedClassifier, TcAttachType, TcError, Xdp, XdpMode,
        tc::{self, SchedClassifierLinkId},
    },
    util::KernelVersion,
};
use tracing::{info, warn};
use veil_api::{AttachedProgram, HookKind};

use super::DatapathError;
use crate::config::XdpAttachMode;

/// Attaches `program` to `interface`: native mode when asked or possible, else generic.
pub fn xdp(
    program: &mut Xdp,
    name: &'static str,
    interface: &str,
    mode: XdpAttachMode,
) -> Result<AttachedProgram, DatapathError> {
    let ifindex = ifindex(interface)?;
    let attempts: &[(XdpMode, &str)] = match mode {
        XdpAttachMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
        XdpAttachMode::Native => &[(XdpMode::Driver, "native")],
        XdpAttachMode::Generic => &[(XdpMode::Skb, "generic")],
    };
    let mut last_error = String::new();
    for (xdp_mode, label) in attempts {
        match program.attach_to_if_index(ifindex, *xdp_mode) {
            Ok(_) => {
                info!(program = name, interface, mode = label, "attached xdp");
                return Ok(AttachedProgram {
                    name: name.into(),
                    hook: HookKind::Xdp,
                    interface: interface.into(),
                    ifindex,
                    mode: (*label).into(),
                    detached: None,
                });
            }
            Err(error) => {
                warn!(program = name, interface, mode = label, %error, "xdp attach failed");
                last_error = format!("{label} mode: {error}");
            }
        }
    }
    Err(DatapathError::Attach {
        program: name,
        interface: interface.into(),
        reason: last_error,
    })
}

/// Attaches `program` to the ingress of `interface` (tcx on 6.6+, clsact before).
pub fn tc_ingress(
    program: &mut SchedClassifier,
    name: &'static str,
    interface: &str,
) -> Result<(SchedClassifierLinkId, AttachedProgram), DatapathError> {
    let ifindex = ifindex(interface)?;
    let uses_tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if !uses_tcx {
        // Older kernels attach through the clsact qdisc; it may already exist.
        match tc::qdisc_add_clsact(interface) {
            Ok(()) | Err(TcError::AlreadyAttached) => {}
            Err(error) => {
                return Err(DatapathError::Attach {
                    program: name,
                    interface: interface.into(),
                    reason: format!("cannot add the clsact qdisc: {error}"),
                });
            }
        }
    }
    let link = program
        .attach(interface, TcAttachType::Ingress)
        .map_err(|error| DatapathError::Attach {
            program: name,
            interface: interface.into(),
            reason: error.to_string(),
        })?;
    let mode = if uses_tcx { "tcx" } else { "netlink" };
    info!(program = name, interface, mode, "attached tc ingress");
    Ok((
        link,
        AttachedProgram {
            name: name.into(),
            hook: HookKind::TcIngress,
            interface: interface.into(),
            ifindex,
            mode: mode.into(),
            detached: None,
        },
    ))
}

fn ifindex(interface: &str) -> Result<u32, DatapathError> {
    nix::net::if_::if_nametoindex(interface).map_err(|_| DatapathError::UnknownInterface {
        interface: interface.into(),
    })
}
