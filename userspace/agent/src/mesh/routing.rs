//! The policy routing that delivers steered packets to the agent's sockets.
//!
//! The pod-egress program marks intercepted packets with [`MESH_MARK`] and
//! assigns them to a socket, but their destination is another pod's address:
//! without help the node would forward them. One rule and one route make
//! marked packets local, as TPROXY setups do:
//!
//! ```text
//! ip rule add fwmark 0x5e11/0xffff lookup 15001 pref 90
//! ip route replace local 0.0.0.0/0 dev lo table 15001
//! ```
//!
//! Both are installed at start (replacing leftovers of a crashed agent) and
//! removed at stop. No iptables is involved.

use tracing::warn;
use veil_common::overlay::MESH_MARK;

use crate::iproute::{IpError, ip};

/// Routing table of the `local` route for marked packets.
pub const MESH_TABLE: u32 = 15001;
/// Priority of the rule (before the main table at 32766).
pub const MESH_RULE_PRIORITY: u32 = 90;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot install the mesh's policy routing (the agent needs CAP_NET_ADMIN): {0}")]
    Ip(#[from] IpError),
}

fn rule_args(verb: &'static str) -> Vec<String> {
    vec![
        "rule".into(),
        verb.into(),
        "fwmark".into(),
        format!("{MESH_MARK:#x}/0xffff"),
        "lookup".into(),
        MESH_TABLE.to_string(),
        "pref".into(),
        MESH_RULE_PRIORITY.to_string(),
    ]
}

/// Installs the rule and the route; a leftover of an earlier run is replaced.
pub fn install() -> Result<(), RoutingError> {
    remove_rules();
    let table = MESH_TABLE.to_string();
    ip(&[
        "route",
        "replace",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        &table,
    ])?;
    let args = rule_args("add");
    ip(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(())
}

/// Removes what [`install`] added.
pub fn remove() {
    remove_rules();
    let table = MESH_TABLE.to_string();
    if let Err(error) = ip(&["route", "flush", "table", &table]) {
        warn!(%error, "cannot remove the mesh routing table");
    }
}

fn remove_rules() {
    let args = rule_args("del");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Deleting until it fails removes duplicates too; bounded for safety.
    for _ in 0..16 {
        if ip(&args).is_err() {
            break;
        }
    }
}
