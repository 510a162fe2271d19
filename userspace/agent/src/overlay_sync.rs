//! Keeping the overlay maps in step with the inventory, live.
//!
//! Every half second, and at once when the API server or the bus taught
//! something, the agent assembles what it knows (inventory file, API server,
//! bus) and this node's links. Only when that differs from what it last
//! applied, or the last apply failed, does it validate, plan and apply the
//! difference: a steady cluster costs one file read and a comparison, and
//! wakes nobody. The apply writes state before attachment: pods going away
//! are detached first, then the maps are written, then new pods' veths get
//! the program, so a pod is never steered by a program whose maps do not
//! know it yet. Programs are never reloaded, so established flows to pods
//! that did not change are untouched. A refused inventory is reported once
//! and the last good state stays in force; a failed apply makes the agent
//! not ready and is retried at the next tick.

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
    /// Why the last apply did not complete (attach or map write); retried.
    pub apply_error: Option<String>,
    /// Times the overlay was planned and applied since the agent started.
    pub plans: u64,
}

/// Everything a plan depends on: when it is unchanged, so is the plan.
#[derive(Clone, Debug, PartialEq)]
struct PlanInputs {
    inventory: Inventory,
    links: links::LinkTable,
    kubernetes_problems: Vec<String>,
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
    /// What the last sync acted on: applied completely, or refused. Inputs
    /// equal to it need nothing done.
    considered: Mutex<Option<PlanInputs>>,
}

impl OverlaySync {
    pub fn new(
        settings: OverlaySettings,
        inventory: Option<PathBuf>,
        events: Option<Arc<crate::events_sync::EventState>>,
        kubernetes: Option<Arc<crate::kubernetes::KubeState>>,
    ) -> Self {
        Self {
            settings,
            inventory,
            report: Mutex::default(),
            latest: std::sync::RwLock::default(),
            inventory_changes: Changes::default(),
            events,
            kubernetes,
            considered: Mutex::default(),
        }
    }

    /// The file, the API server's and the bus's views, merged, and this
    /// node's links: what a plan is made from.
    fn gather(&self) -> Result<PlanInputs, String> {
        let mut inventory = match &self.inventory {
            Some(path) => Inventory::load(path).map_err(|e| e.to_string())?,
            None => Inventory::default(),
        };
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
        Ok(PlanInputs {
            inventory,
            links: links::current(),
            kubernetes_problems: self
                .kubernetes
                .as_ref()
                .map(|kubernetes| kubernetes.problems())
                .unwrap_or_default(),
        })
    }

    /// Gathers what the agent knows and, when it changed since the last
    /// complete apply (or that apply failed), plans and applies it. Errors
    /// go into the report.
    pub fn sync_once(&self, datapath: &Mutex<Datapath>) {
        let inputs = match self.gather() {
            Ok(inputs) => inputs,
            Err(error) => {
                self.refuse(error);
                *self.considered.lock().unwrap_or_else(|p| p.into_inner()) = None;
                return;
            }
        };
        if self
            .considered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            == Some(&inputs)
        {
            return;
        }
        let planned = (|| -> Result<overlay::OverlayPlan, String> {
            inputs.inventory.validate()?;
            let mut plan = overlay::plan(&inputs.inventory, &self.settings, &inputs.links)?;
            plan.warnings
                .extend(inputs.kubernetes_problems.iter().cloned());
            Ok(plan)
        })();
        let plan = match planned {
            Ok(plan) => plan,
            Err(error) => {
                self.refuse(error);
                // The same inputs would be refused the same way: not again.
                *self.considered.lock().unwrap_or_else(|p| p.into_inner()) = Some(inputs);
                return;
            }
        };
        let mut report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        report.plans += 1;
        let changed_inventory = self
            .latest
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            != Some(&inputs.inventory);
        if changed_inventory {
            *self.latest.write().unwrap_or_else(|p| p.into_inner()) =
                Some(Arc::new(inputs.inventory.clone()));
            self.inventory_changes.bump();
        }
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
        let applied = self.apply(datapath, &plan);
        let mut report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        match applied {
            Ok(()) => {
                if report.apply_error.take().is_some() {
                    info!("overlay applied again");
                }
                *self.considered.lock().unwrap_or_else(|p| p.into_inner()) = Some(inputs);
            }
            Err(error) => {
                if report.apply_error.as_ref() != Some(&error) {
                    warn!(%error, "overlay not fully applied; retrying");
                }
                report.apply_error = Some(error);
                // Not recorded as applied: the next tick plans and tries again.
                *self.considered.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
        }
    }

    /// Reports a refused inventory (once per distinct reason); the last good
    /// state stays in force.
    fn refuse(&self, error: String) {
        let mut report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        if report.inventory_error.as_ref() != Some(&error) {
            warn!(%error, "inventory refused; keeping the last good overlay state");
            report.inventory_error = Some(error);
        }
    }

    /// Detach pods that went away, write the maps, then attach new pods.
    fn apply(&self, datapath: &Mutex<Datapath>, plan: &overlay::OverlayPlan) -> Result<(), String> {
        let mut datapath = datapath.lock().unwrap_or_else(|p| p.into_inner());
        let staying: std::collections::BTreeSet<String> = datapath
            .pod_interfaces()
            .filter(|name| plan.local_interfaces.contains(*name))
            .cloned()
            .collect();
        datapath
            .sync_pod_interfaces(&staying)
            .map_err(|error| format!("cannot detach the pod egress program: {error}"))?;
        let stats = datapath
            .overlay_mut()
            .apply(plan)
            .map_err(|error| format!("cannot update the overlay maps: {error}"))?;
        if stats.written + stats.removed > 0 {
            info!(
                written = stats.written,
                removed = stats.removed,
                routes = plan.routes.len(),
                endpoints = plan.endpoints.len(),
                "overlay maps updated"
            );
        }
        datapath
            .sync_pod_interfaces(&plan.local_interfaces)
            .map_err(|error| format!("cannot attach the pod egress program: {error}"))
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
        if let Some(error) = &report.apply_error {
            problems.push(format!("overlay not fully applied (retrying): {error}"));
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
            apply_error: report.apply_error,
            plans: report.plans,
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
