//! Attaching programs to interfaces, the way the probes found the kernel
//! attaches them ([`super::features`]).

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType, TcError, Xdp, XdpMode,
    tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
};
use tracing::{info, warn};
use veil_api::{AttachedProgram, HookKind};

use super::DatapathError;
use crate::config::XdpAttachMode;

/// Attaches `program` to `interface`: native mode when asked or possible
/// (`native_allowed` false: a test switched it off), else generic.
pub fn xdp(
    program: &mut Xdp,
    name: &'static str,
    interface: &str,
    mode: XdpAttachMode,
    native_allowed: bool,
) -> Result<AttachedProgram, DatapathError> {
    let ifindex = ifindex(interface)?;
    let attempts: &[(XdpMode, &str)] = match (mode, native_allowed) {
        (XdpAttachMode::Auto, true) => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
        (XdpAttachMode::Native, true) => &[(XdpMode::Driver, "native")],
        (XdpAttachMode::Generic, _) | (XdpAttachMode::Auto, false) => &[(XdpMode::Skb, "generic")],
        (XdpAttachMode::Native, false) => &[],
    };
    let mut last_error = String::from("native mode is switched off and xdp_mode = \"native\"");
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

/// Attaches `program` to the ingress of `interface`: through tcx when the
/// kernel has it, else through netlink and the clsact qdisc.
pub fn tc_ingress(
    program: &mut SchedClassifier,
    name: &'static str,
    interface: &str,
    uses_tcx: bool,
) -> Result<(SchedClassifierLinkId, AttachedProgram), DatapathError> {
    let ifindex = ifindex(interface)?;
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
    let options = if uses_tcx {
        TcAttachOptions::TcxOrder(LinkOrder::default())
    } else {
        TcAttachOptions::Netlink(NlOptions::default())
    };
    let link = program
        .attach_with_options(interface, TcAttachType::Ingress, options)
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
