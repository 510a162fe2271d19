//! Keeping the overlay maps in step with the inventory, live.
//!
//! Every half second the agent re-reads the inventory, plans the maps and
//! applies the difference (usually nothing). Programs are never reloaded, so
//! established flows to pods that did not change are untouched. A refused
//! inventory is reported once and the last good state stays in force.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing::{info, warn};
use veil_api::{OverlayEndpoint, OverlayRoute, OverlayStatus};

use crate::{
    datapath::{
        Datapath, links,
        overlay::{self, OverlaySettings},
    },
    inventory::{Inventory, MacAddress},
};

/// How often the inventory is re-read.
pub const SYNC_PERIOD: Duration = Duration::from_millis(500);

/// A generation counter that threads wait on for the next change.
#[derive(Debug, Default)]
pub struct Changes {
    generation: Mutex<u64>,
    changed: std::sync::Condvar,
}

impl Changes {
    pub fn bump(&self) {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.changed.notify_all();
    }

    /// Waits until the generation differs from `seen`, at most `timeout`;
    /// returns the generation now.
    pub fn wait_past(&self, seen: u64, timeout: Duration) -> u64 {
        let generation = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        let (generation, _) = self
            .changed
            .wait_timeout_while(generation, timeout, |now| *now == seen)
            .unwrap_or_else(|p| p.into_inner());
        *generation
    }
}

/// What the last sync found, for the admin API.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    pub inventory_error: Option<String>,
    pub warnings: Vec<String>,
}

pub struct OverlaySync {
    pub settings: OverlaySettings,
    /// The inventory file, when there is one (else only Kubernetes and the bus).
    pub inventory: Option<PathBuf>,
    pub report: Mutex<SyncReport>,
    /// The last inventory accepted, for the mesh (who is meshed, and as whom).
    pub latest: std::sync::RwLock<Option<Arc<Inventory>>>,
    /// Bumped each time `latest` is replaced, for threads that act on it.
    pub inventory_changes: Changes,
    /// Pods of other nodes learnt from the event bus, when there is one.
    pub events: Option<Arc<crate::events_sync::EventState>>,
    /// This node's pods and the cluster's nodes from the API server, when watched.
    pub kubernetes: Option<Arc<crate::kubernetes::KubeState>>,
}

impl OverlaySync {
    /// Reads the inventory once and applies it. Errors go into the report.
    pub fn sync_once(&self, datapath: &Mutex<Datapath>) {
        let file = match &self.inventory {
            Some(path) => Inventory::load(path).map_err(|e| e.to_string()),
            None => Ok(Inventory::default()),
        };
        let result = file.and_then(|mut inventory| {
            // The file first, then the API server (nodes, this node's pods),
            // then the bus (other nodes' pods, which need the nodes).
            if let Some(kubernetes) = &self.kubernetes {
                kubernetes.merge_into(&mut inventory, &self.settings.node_name);
            }
            if let Some(events) = &self.events {
                events.merge_into(&mut inventory, &self.settings.node_name);
            }
            if let Some(kubernetes) = &self.kubernetes {
                kubernetes.apply_policies(&mut inventory);
            }
            inventory.validate()?;
            let mut plan = overlay::plan(&inventory, &self.settings, &links::current())?;
            if let Some(kubernetes) = &self.kubernetes {
                plan.warnings.extend(kubernetes.problems());
            }
            Ok((plan, inventory))
        });
        let mut report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        let plan = match result {
            Ok((plan, inventory)) => {
                *self.latest.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(inventory));
                self.inventory_changes.bump();
                plan
            }
            Err(error) => {
                if report.inventory_error.as_ref() != Some(&error) {
                    warn!(%error, "inventory refused; keeping the last good overlay state");
                    report.inventory_error = Some(error);
                }
                return;
            }
        };
        if report.inventory_error.take().is_some() {
            info!("inventory accepted again");
        }
        if report.warnings != plan.warnings {
            for warning in &plan.warnings {
                warn!("{warning}");
            }
            report.warnings = plan.warnings.clone();
        }
        drop(report);
        let mut datapath = datapath.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(error) = datapath.sync_pod_interfaces(&plan.local_interfaces) {
            warn!(%error, "cannot attach the pod egress program");
        }
        match datapath.overlay_mut().apply(&plan) {
            Ok(stats) if stats.written + stats.removed > 0 => info!(
                written = stats.written,
                removed = stats.removed,
                routes = plan.routes.len(),
                endpoints = plan.endpoints.len(),
                "overlay maps updated"
            ),
            Ok(_) => {}
            Err(error) => warn!(%error, "cannot update the overlay maps"),
        }
    }

    /// Syncs forever, every [`SYNC_PERIOD`] and at once when the API server
    /// or the event bus taught something new.
    pub async fn run(self: Arc<Self>, datapath: Arc<Mutex<Datapath>>) {
        let mut ticker = tokio::time::interval(SYNC_PERIOD);
        loop {
            let kubernetes_changed = async {
                match &self.kubernetes {
                    Some(kubernetes) => kubernetes.changed.notified().await,
                    None => std::future::pending().await,
                }
            };
            let events_changed = async {
                match &self.events {
                    Some(events) => events.changed.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = ticker.tick() => {}
                () = kubernetes_changed => {}
                () = events_changed => {}
            }
            let sync = Arc::clone(&self);
            let datapath = Arc::clone(&datapath);
            // Map syscalls block; keep them off the async workers.
            let _ = tokio::task::spawn_blocking(move || sync.sync_once(&datapath)).await;
        }
    }

    /// Why the overlay is not ready: a refused inventory, or no configuration
    /// applied yet. Reads only the sync report and the config entry.
    pub fn readiness_problems(&self, datapath: &Datapath) -> Vec<String> {
        let mut problems = Vec::new();
        let report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(error) = &report.inventory_error {
            problems.push(format!("inventory refused: {error}"));
        }
        let configured = datapath
            .overlay()
            .config()
            .is_ok_and(|config| config.underlay_ifindex != 0);
        if !configured {
            problems.push("overlay not configured yet".into());
        }
        problems
    }

    /// The overlay as the admin API shows it.
    /// MTUs of the underlay and of the pod veths the datapath serves, from
    /// `details` ([`links::details`]).
    pub fn interface_mtus(
        &self,
        datapath: &Datapath,
        details: &std::collections::HashMap<String, links::LinkDetails>,
    ) -> Vec<veil_api::InterfaceMtu> {
        std::iter::once((self.settings.underlay_interface.clone(), "underlay"))
            .chain(
                datapath
                    .programs()
                    .into_iter()
                    .filter(|p| p.name == veil_common::names::PROG_POD_EGRESS)
                    .map(|p| (p.interface, "pod")),
            )
            .filter_map(|(interface, role)| {
                details.get(&interface).map(|link| veil_api::InterfaceMtu {
                    interface,
                    mtu: link.mtu,
                    role: role.into(),
                })
            })
            .collect()
    }

    pub fn status(&self, datapath: &Datapath) -> OverlayStatus {
        let report = self
            .report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let maps = datapath.overlay();
        let config = maps.config().unwrap_or_default();
        OverlayStatus {
            vni: self.settings.vni,
            underlay_ip: std::net::Ipv4Addr::from(config.underlay_ip).to_string(),
            underlay_mtu: self.settings.underlay_mtu,
            inventory: self
                .inventory
                .as_ref()
                .map_or_else(|| "(none: Kubernetes)".into(), |p| p.display().to_string()),
            inventory_error: report.inventory_error,
            warnings: report.warnings,
            routes: maps
                .routes()
                .unwrap_or_default()
                .into_iter()
                .map(|(network, len, node)| OverlayRoute {
                    cidr: format!("{network}/{len}"),
                    node_ip: std::net::Ipv4Addr::from(node.underlay_ip).to_string(),
                    node_mac: MacAddress(node.mac).to_string(),
                })
                .collect(),
            endpoints: maps
                .endpoints()
                .unwrap_or_default()
                .into_iter()
                .map(|(ip, endpoint)| OverlayEndpoint {
                    ip: ip.to_string(),
                    ifindex: endpoint.ifindex,
                    pod_mac: MacAddress(endpoint.pod_mac).to_string(),
                })
                .collect(),
            // Filled by the admin API, which reads the links once per request.
            interface_mtus: Vec::new(),
            encapsulation: if self.settings.tunnel_ifindex == 0 {
                "tc".into()
            } else {
                "vxlan-device".into()
            },
        }
    }
}
