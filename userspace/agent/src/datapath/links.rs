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

/// What `ip -j link` says of one interface beyond its index and MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkDetails {
    pub mtu: u32,
    /// Whether an XDP program runs on it.
    pub xdp: bool,
}

/// Every interface's MTU and XDP state in this network namespace, read with
/// one `ip -j link show`; `None` when that cannot be run or read.
pub fn details() -> Option<HashMap<String, LinkDetails>> {
    let stdout = crate::iproute::ip(&["-j", "link", "show"]).ok()?;
    let links: Vec<serde_json::Value> = serde_json::from_slice(&stdout).ok()?;
    Some(
        links
            .iter()
            .filter_map(|link| {
                Some((
                    link.get("ifname")?.as_str()?.to_string(),
                    LinkDetails {
                        mtu: u32::try_from(link.get("mtu")?.as_u64()?).ok()?,
                        xdp: link.get("xdp").is_some(),
                    },
                ))
            })
            .collect(),
    )
}
