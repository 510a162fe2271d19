//! This node's interfaces as the datapath needs them: index and MAC by name.
//!
//! Read with getifaddrs(3) in the agent's own network namespace (sysfs may
//! belong to another namespace when the agent is started with `nsenter`).

use std::collections::HashMap;

/// Index and MAC of one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// Interfaces by name.
pub type LinkTable = HashMap<String, Link>;

/// Every interface with a link-layer address in this network namespace.
pub fn current() -> LinkTable {
    let mut table = LinkTable::new();
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return table;
    };
    for address in addresses {
        let Some(link) = address.address.as_ref().and_then(|a| a.as_link_addr()) else {
            continue;
        };
        let (Some(mac), ifindex) = (link.addr(), link.ifindex()) else {
            continue;
        };
        table.insert(
            address.interface_name,
            Link {
                ifindex: ifindex as u32,
                mac,
            },
        );
    }
    table
}

/// Whether `interface` runs an XDP program, as `ip -d link` reports it.
/// `true` when that cannot be told (no `ip`, unexpected output): only a
/// definite "no" is reported as a detached program.
pub fn has_xdp(interface: &str) -> bool {
    let Ok(output) = std::process::Command::new("ip")
        .args(["-j", "link", "show", "dev", interface])
        .output()
    else {
        return true;
    };
    if !output.status.success() {
        return true;
    }
    match serde_json::from_slice::<Vec<serde_json::Value>>(&output.stdout) {
        Ok(links) => links.iter().any(|link| link.get("xdp").is_some()),
        Err(_) => true,
    }
}

/// Every interface's MTU in this network namespace (from `ip -j link`;
/// empty when it cannot be read).
pub fn mtus() -> HashMap<String, u32> {
    let Ok(output) = std::process::Command::new("ip")
        .args(["-j", "link", "show"])
        .output()
    else {
        return HashMap::new();
    };
    serde_json::from_slice::<Vec<serde_json::Value>>(&output.stdout)
        .unwrap_or_default()
        .iter()
        .filter_map(|link| {
            Some((
                link.get("ifname")?.as_str()?.to_string(),
                u32::try_from(link.get("mtu")?.as_u64()?).ok()?,
            ))
        })
        .collect()
}
