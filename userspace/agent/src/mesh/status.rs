//! What the admin API shows of the mesh: the node's workloads and their
//! certificates, connection counts, and the effective mode of a pod's port
//! with the precedence chain that produced it.

use std::time::{SystemTime, UNIX_EPOCH};

use veil_api::{MeshCertificate, MeshStatus, MeshWorkload, ModeLevel, ModeReport};

use super::MeshState;
use crate::inventory::MeshMode;

fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl MeshState {
    /// The mesh as `veilctl status` and `veilctl certs` show it. Reads only
    /// certificates already held; issuing is the renewal loop's job.
    pub fn status(&self) -> MeshStatus {
        let directory = &self.directory;
        let held = directory.store.all();
        let mut workloads = Vec::new();
        if let Ok(inventory) = directory.inventory() {
            for pod in inventory
                .pods
                .iter()
                .filter(|p| p.node == directory.node_name)
            {
                let Some((mesh, mode)) = inventory.meshed(pod) else {
                    continue;
                };
                let identity = directory.store.identity_of(mesh);
                let (identity, certificate, certificate_error) = match identity {
                    Ok(identity) => {
                        let certificate =
                            held.iter()
                                .find(|w| w.identity == identity)
                                .map(|w| MeshCertificate {
                                    serial: w.serial.clone(),
                                    issuer: directory.store.issuer_name(),
                                    not_after_unix: unix(w.not_after),
                                    renew_at_unix: unix(w.renew_at),
                                });
                        let error = certificate
                            .is_none()
                            .then(|| directory.store.last_error(&identity))
                            .flatten();
                        (identity.to_string(), certificate, error)
                    }
                    Err(error) => (String::new(), None, Some(error.to_string())),
                };
                workloads.push(MeshWorkload {
                    pod: pod.name.clone(),
                    ip: pod.ip.to_string(),
                    identity,
                    mode: mode.as_str().into(),
                    certificate,
                    certificate_error,
                });
            }
        }
        MeshStatus {
            trust_domain: directory.store.trust_domain().into(),
            workloads,
            connections: self.metrics.summary(),
        }
    }

    /// The effective mode of `pod` (a name or an address), of `port` when given.
    pub fn mode_report(&self, pod: &str, port: Option<u16>) -> Result<ModeReport, String> {
        let inventory = self
            .directory
            .inventory()
            .map_err(|refusal| refusal.to_string())?;
        let spec = inventory
            .pods
            .iter()
            .find(|p| p.name == pod || p.ip.to_string() == pod)
            .ok_or_else(|| {
                format!("no pod {pod:?} in the inventory (give a pod name or address)")
            })?;
        let base = ModeReport {
            pod: spec.name.clone(),
            ip: spec.ip.to_string(),
            node: spec.node.clone(),
            identity: None,
            port,
            mode: MeshMode::Disable.as_str().into(),
            chain: Vec::new(),
        };
        let Some(mesh) = &spec.mesh else {
            return Ok(ModeReport {
                chain: vec![ModeLevel {
                    level: "workload".into(),
                    mode: Some("disable".into()),
                    decided: true,
                }],
                ..base
            });
        };
        let decision = inventory
            .policy
            .effective_mode(mesh.workload(), mesh.mode, port);
        let decided_at = decision.chain.iter().position(|s| s.mode.is_some());
        Ok(ModeReport {
            identity: self
                .directory
                .store
                .identity_of(mesh)
                .ok()
                .map(|id| id.to_string()),
            mode: decision.mode.as_str().into(),
            chain: decision
                .chain
                .iter()
                .enumerate()
                .map(|(i, step)| ModeLevel {
                    level: step.level.clone(),
                    mode: step.mode.map(|m| m.as_str().to_string()),
                    decided: Some(i) == decided_at,
                })
                .collect(),
            ..base
        })
    }
}
