//! Who is who: meshed pods, their nodes and identities, from the inventory
//! the overlay keeps current, and the certificates to present for them.

use std::{net::Ipv4Addr, sync::Arc};

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tracing::warn;
use veil_identity::SpiffeId;

use super::{names::pod_ip_from_sni, refusal::Refusal, workloads::WorkloadStore};
use crate::{inventory::Inventory, overlay_sync::OverlaySync, policy::Workload};

/// A meshed pod as the mesh needs it.
#[derive(Clone, Debug)]
pub struct MeshedPod {
    pub name: String,
    pub node: String,
    pub node_underlay_ip: Ipv4Addr,
    pub identity: SpiffeId,
}

pub struct Directory {
    pub node_name: String,
    pub overlay: Arc<OverlaySync>,
    pub store: Arc<WorkloadStore>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Directory({})", self.node_name)
    }
}

impl Directory {
    pub fn inventory(&self) -> Result<Arc<Inventory>, Refusal> {
        self.overlay
            .latest
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(Refusal::NoInventory)
    }

    /// The meshed pod at `ip`, wherever it runs.
    pub fn meshed_pod(&self, ip: Ipv4Addr) -> Result<Option<MeshedPod>, Refusal> {
        let inventory = self.inventory()?;
        let Some(pod) = inventory.pod_by_ip(ip) else {
            return Ok(None);
        };
        let Some((mesh, _)) = inventory.meshed(pod) else {
            return Ok(None);
        };
        let Some(node) = inventory.node(&pod.node) else {
            return Ok(None);
        };
        let identity = self
            .store
            .identity_of(mesh)
            .map_err(|e| Refusal::Certificate(e.to_string()))?;
        Ok(Some(MeshedPod {
            name: pod.name.clone(),
            node: pod.node.clone(),
            node_underlay_ip: node.underlay_ip,
            identity,
        }))
    }

    /// Whether `source` may connect to `destination`'s `port` (allow rules).
    pub fn authorize(
        &self,
        destination: &MeshedPod,
        port: u16,
        source: &SpiffeId,
    ) -> Result<(), Refusal> {
        let inventory = self.inventory()?;
        let workload = Workload {
            namespace: destination.identity.namespace(),
            service_account: destination.identity.service_account(),
        };
        inventory
            .policy
            .authorize(workload, port, &source.to_string(), source.namespace())
            .map_err(Refusal::Denied)
    }

    /// The meshed pod at `ip` if it runs on this node.
    pub fn local_meshed_pod(&self, ip: Ipv4Addr) -> Result<Option<MeshedPod>, Refusal> {
        Ok(self
            .meshed_pod(ip)?
            .filter(|pod| pod.node == self.node_name))
    }
}

/// Picks the destination workload's certificate by SNI on the inbound port.
#[derive(Debug)]
pub struct SniResolver(pub Arc<Directory>);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let ip = pod_ip_from_sni(hello.server_name()?)?;
        let pod = self.0.local_meshed_pod(ip).ok()??;
        match self.0.store.get(&pod.identity) {
            Ok(workload) => Some(Arc::clone(&workload.certified)),
            Err(error) => {
                warn!(%error, pod = %pod.name, "no certificate to present");
                None
            }
        }
    }
}
