//! The inventory file Veil's agents read, written from the topology as it is.
//!
//! It lists every node (underlay address and MAC, pod CIDR) and every pod
//! (where it runs now, its address, MAC and host-side veth), in the agent's
//! inventory format. All agents of a topology share the one file, as they
//! would share a cluster's view.

use std::{fmt::Write, path::PathBuf};

use crate::{PodRef, Result, TestbedError, Topology, addressing, io_error, netns::NetNs};

/// MAC address of `device` inside `ns`.
pub fn link_mac(ns: &NetNs, device: &str) -> Result<String> {
    let json = ns.ip(&["-j", "link", "show", "dev", device])?;
    let links: serde_json::Value = serde_json::from_str(&json).map_err(|e| {
        TestbedError::Invalid(format!(
            "`ip -j link show {device}` printed unreadable JSON: {e}"
        ))
    })?;
    links[0]["address"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| TestbedError::Invalid(format!("{device} in {} has no MAC", ns.name())))
}

impl Topology {
    /// Where [`Self::write_inventory`] writes.
    pub fn inventory_path(&self) -> PathBuf {
        self.workdir().join("inventory.toml")
    }

    /// The inventory of the topology as it is now (moved pods included).
    pub fn inventory(&self) -> Result<String> {
        let mut text = String::from("# Written by veil-testbed.\n");
        for node in 1..=self.spec().nodes {
            let _ = write!(
                text,
                "\n[[nodes]]\nname = \"node{node}\"\nunderlay_ip = \"{}\"\nunderlay_mac = \"{}\"\npod_cidr = \"{}\"\n",
                addressing::node_underlay_ip(node),
                link_mac(&self.node(node), "ul0")?,
                addressing::node_pod_cidr(node),
            );
        }
        for pod in self.pods().into_iter().filter(|&p| !self.is_hidden(p)) {
            let _ = write!(
                text,
                "\n[[pods]]\nname = \"{pod}\"\nnode = \"node{}\"\nip = \"{}\"\nmac = \"{}\"\ninterface = \"{}\"\n",
                self.location(pod),
                pod.ip(),
                link_mac(&self.pod(pod), "eth0")?,
                self.host_veth(pod),
            );
            if let Some(mesh) = self.mesh_of(pod) {
                let _ = write!(
                    text,
                    "\n[pods.mesh]\nnamespace = \"{}\"\nservice_account = \"{}\"\nmode = \"{}\"\n",
                    mesh.namespace, mesh.service_account, mesh.mode
                );
            }
        }
        text.push_str(self.inventory_extra());
        Ok(text)
    }

    /// Writes the inventory atomically (agents never read half a file).
    pub fn write_inventory(&self) -> Result<PathBuf> {
        let path = self.inventory_path();
        let partial = path.with_extension("toml.partial");
        std::fs::write(&partial, self.inventory()?)
            .map_err(io_error(format!("cannot write {}", partial.display())))?;
        std::fs::rename(&partial, &path)
            .map_err(io_error(format!("cannot write {}", path.display())))?;
        Ok(path)
    }

    /// Writes `text` as the inventory (for tests that break it on purpose).
    pub fn write_inventory_text(&self, text: &str) -> Result<()> {
        let path = self.inventory_path();
        let partial = path.with_extension("toml.partial");
        std::fs::write(&partial, text)
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(io_error(format!("cannot write {}", path.display())))
    }

    /// The node `pod` runs on now.
    pub fn location(&self, pod: PodRef) -> usize {
        self.moved_to(pod).unwrap_or(pod.node)
    }
}
