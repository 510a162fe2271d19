//! mTLS modes and authorization, as the inventory's `[policy]` states them.
//!
//! **Modes** are set at four levels; the most specific one that says
//! something wins: port > workload > namespace > mesh (default PERMISSIVE).
//! A workload is a namespace + service account (what a SPIFFE ID names);
//! its level is the `mode` of its pods' `[pods.mesh]` tables. Two settings
//! at the same level for the same thing that disagree are a conflict: the
//! inventory is refused with both entries named, never resolved silently.
//!
//! **Authorization** is by allow rules per destination workload (optionally
//! per port): sources by SPIFFE ID or by namespace. Until a rule selects a
//! workload (and port) everything is allowed; from then on only what a
//! selecting rule allows. Checked by the destination's agent after the mTLS
//! handshake, on the identity the client proved; between meshed pods of one
//! node, and for plaintext (which proves no identity, so a selected port
//! admits none), by the datapath from tables the agent computes with the
//! same [`Policy::authorize`] (`datapath::overlay`).
//!
//! ```toml
//! [policy]
//! mode = "permissive"                      # mesh-wide
//! [[policy.namespaces]]
//! namespace = "shop"
//! mode = "strict"
//! [[policy.ports]]
//! namespace = "shop"
//! service_account = "checkout"
//! port = 9090
//! mode = "permissive"
//! [[policy.allow]]
//! namespace = "shop"
//! service_account = "checkout"
//! port = 8080                              # optional: every port if absent
//! from_identities = ["spiffe://cluster.local/ns/shop/sa/cart"]
//! from_namespaces = ["frontend"]
//! ```

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::inventory::{MeshMode, PodSpec};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Mesh-wide mode; PERMISSIVE when absent.
    #[serde(default)]
    pub mode: Option<MeshMode>,
    #[serde(default)]
    pub namespaces: Vec<NamespaceMode>,
    #[serde(default)]
    pub ports: Vec<PortMode>,
    #[serde(default)]
    pub allow: Vec<AllowRule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceMode {
    pub namespace: String,
    pub mode: MeshMode,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortMode {
    pub namespace: String,
    pub service_account: String,
    pub port: u16,
    pub mode: MeshMode,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    pub namespace: String,
    pub service_account: String,
    /// Only this port of the workload; every port when absent.
    #[serde(default)]
    pub port: Option<u16>,
    /// SPIFFE IDs allowed (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`).
    #[serde(default)]
    pub from_identities: Vec<String>,
    /// Namespaces whose every workload is allowed.
    #[serde(default)]
    pub from_namespaces: Vec<String>,
}

/// A workload: namespace and service account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Workload<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
}

/// One level of the precedence chain and what it says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainStep {
    /// `port`, `workload`, `namespace` or `mesh`.
    pub level: String,
    /// What this level sets; `None` when it says nothing.
    pub mode: Option<MeshMode>,
}

/// The effective mode and how it came about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeDecision {
    pub mode: MeshMode,
    /// Most specific level first; the first step with a mode decided.
    pub chain: Vec<ChainStep>,
}

impl Policy {
    /// The mode of `workload` (of `port` when given), with the chain.
    pub fn effective_mode(
        &self,
        workload: Workload<'_>,
        workload_mode: Option<MeshMode>,
        port: Option<u16>,
    ) -> ModeDecision {
        let mut chain = Vec::new();
        if let Some(port) = port {
            chain.push(ChainStep {
                level: "port".into(),
                mode: self.port_mode(workload, port),
            });
        }
        chain.push(ChainStep {
            level: "workload".into(),
            mode: workload_mode,
        });
        chain.push(ChainStep {
            level: "namespace".into(),
            mode: self
                .namespaces
                .iter()
                .find(|n| n.namespace == workload.namespace)
                .map(|n| n.mode),
        });
        chain.push(ChainStep {
            level: "mesh".into(),
            mode: Some(self.mode.unwrap_or_default()),
        });
        let mode = chain.iter().find_map(|step| step.mode).unwrap_or_default();
        ModeDecision { mode, chain }
    }

    fn port_mode(&self, workload: Workload<'_>, port: u16) -> Option<MeshMode> {
        self.ports
            .iter()
            .find(|p| {
                p.namespace == workload.namespace
                    && p.service_account == workload.service_account
                    && p.port == port
            })
            .map(|p| p.mode)
    }

    /// Ports of `workload` with a port-level mode.
    pub fn port_modes<'a>(
        &'a self,
        workload: Workload<'a>,
    ) -> impl Iterator<Item = (u16, MeshMode)> + 'a {
        self.ports
            .iter()
            .filter(move |p| {
                p.namespace == workload.namespace && p.service_account == workload.service_account
            })
            .map(|p| (p.port, p.mode))
    }

    /// The ports that allow rules for `destination` name; `None` when no
    /// rule selects it at all (everything is allowed), an empty set when
    /// its rules cover every port.
    pub fn ports_with_allow_rules(
        &self,
        destination: Workload<'_>,
    ) -> Option<std::collections::BTreeSet<u16>> {
        let selecting: Vec<&AllowRule> = self.allow_rules_for(destination).collect();
        (!selecting.is_empty()).then(|| selecting.iter().filter_map(|rule| rule.port).collect())
    }

    /// The allow rules that select `destination`, on any port.
    fn allow_rules_for<'a>(
        &'a self,
        destination: Workload<'a>,
    ) -> impl Iterator<Item = &'a AllowRule> + 'a {
        self.allow.iter().filter(move |rule| {
            rule.namespace == destination.namespace
                && rule.service_account == destination.service_account
        })
    }

    /// Whether `source` (a SPIFFE ID, whose namespace is `source_namespace`)
    /// may connect to `destination` on `port`.
    pub fn authorize(
        &self,
        destination: Workload<'_>,
        port: u16,
        source: &str,
        source_namespace: &str,
    ) -> Result<(), String> {
        let selecting: Vec<&AllowRule> = self
            .allow_rules_for(destination)
            .filter(|rule| rule.port.is_none_or(|p| p == port))
            .collect();
        if selecting.is_empty() {
            return Ok(());
        }
        let allowed = selecting.iter().any(|rule| {
            rule.from_identities.iter().any(|id| id == source)
                || rule.from_namespaces.iter().any(|ns| ns == source_namespace)
        });
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "{source} is not allowed to {}/{} port {port}: {} allow rule(s) select that \
                 workload and none lists the source",
                destination.namespace,
                destination.service_account,
                selecting.len()
            ))
        }
    }

    /// Conflicting settings, each naming the entries involved.
    pub fn conflicts(&self, pods: &[PodSpec]) -> Vec<String> {
        let mut conflicts = Vec::new();
        let mut namespaces: HashMap<&str, (usize, MeshMode)> = HashMap::new();
        for (i, entry) in self.namespaces.iter().enumerate() {
            match namespaces.get(entry.namespace.as_str()) {
                Some(&(j, mode)) if mode != entry.mode => conflicts.push(format!(
                    "policy.namespaces[{j}] and [{i}] set namespace {:?} to {} and {}",
                    entry.namespace,
                    mode.as_str(),
                    entry.mode.as_str()
                )),
                Some(_) => {}
                None => {
                    namespaces.insert(&entry.namespace, (i, entry.mode));
                }
            }
        }
        let mut ports: HashMap<(&str, &str, u16), (usize, MeshMode)> = HashMap::new();
        for (i, entry) in self.ports.iter().enumerate() {
            let key = (
                entry.namespace.as_str(),
                entry.service_account.as_str(),
                entry.port,
            );
            match ports.get(&key) {
                Some(&(j, mode)) if mode != entry.mode => conflicts.push(format!(
                    "policy.ports[{j}] and [{i}] set {}/{} port {} to {} and {}",
                    entry.namespace,
                    entry.service_account,
                    entry.port,
                    mode.as_str(),
                    entry.mode.as_str()
                )),
                Some(_) => {}
                None => {
                    ports.insert(key, (i, entry.mode));
                }
            }
        }
        let mut workloads: HashMap<(&str, &str), (&str, Option<MeshMode>)> = HashMap::new();
        for pod in pods {
            let Some(mesh) = &pod.mesh else { continue };
            let key = (mesh.namespace.as_str(), mesh.service_account.as_str());
            match workloads.get(&key) {
                Some(&(other, mode)) if mode != mesh.mode => conflicts.push(format!(
                    "pods {other:?} and {:?} are both workload {}/{} but set different modes \
                     ({} and {})",
                    pod.name,
                    mesh.namespace,
                    mesh.service_account,
                    mode.map_or("none", MeshMode::as_str),
                    mesh.mode.map_or("none", MeshMode::as_str)
                )),
                Some(_) => {}
                None => {
                    workloads.insert(key, (&pod.name, mesh.mode));
                }
            }
        }
        for (i, rule) in self.allow.iter().enumerate() {
            if rule.from_identities.is_empty() && rule.from_namespaces.is_empty() {
                conflicts.push(format!(
                    "policy.allow[{i}] selects {}/{} but allows nobody: add from_identities or \
                     from_namespaces (an empty rule would deny everything silently)",
                    rule.namespace, rule.service_account
                ));
            }
        }
        conflicts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECKOUT: Workload<'static> = Workload {
        namespace: "shop",
        service_account: "checkout",
    };

    fn policy() -> Policy {
        toml::from_str(
            r#"
mode = "permissive"
[[namespaces]]
namespace = "shop"
mode = "strict"
[[ports]]
namespace = "shop"
service_account = "checkout"
port = 9090
mode = "permissive"
[[allow]]
namespace = "shop"
service_account = "checkout"
port = 8080
from_identities = ["spiffe://cluster.local/ns/shop/sa/cart"]
from_namespaces = ["frontend"]
"#,
        )
        .unwrap()
    }

    fn levels(decision: &ModeDecision) -> Vec<(&str, Option<MeshMode>)> {
        decision
            .chain
            .iter()
            .map(|s| (s.level.as_str(), s.mode))
            .collect()
    }

    #[test]
    fn the_most_specific_level_wins_and_the_chain_shows_every_level() {
        let policy = policy();
        let port = policy.effective_mode(CHECKOUT, None, Some(9090));
        assert_eq!(port.mode, MeshMode::Permissive);
        assert_eq!(
            levels(&port),
            [
                ("port", Some(MeshMode::Permissive)),
                ("workload", None),
                ("namespace", Some(MeshMode::Strict)),
                ("mesh", Some(MeshMode::Permissive)),
            ]
        );
        assert_eq!(
            policy.effective_mode(CHECKOUT, None, Some(8080)).mode,
            MeshMode::Strict,
            "namespace beats mesh"
        );
        assert_eq!(
            policy
                .effective_mode(CHECKOUT, Some(MeshMode::Disable), Some(8080))
                .mode,
            MeshMode::Disable,
            "workload beats namespace"
        );
        let other = Workload {
            namespace: "ops",
            service_account: "x",
        };
        assert_eq!(
            Policy::default().effective_mode(other, None, None).mode,
            MeshMode::Permissive,
            "the default is permissive"
        );
    }

    #[test]
    fn allow_rules_apply_only_once_they_select_the_workload_and_port() {
        let policy = policy();
        let cart = "spiffe://cluster.local/ns/shop/sa/cart";
        let intruder = "spiffe://cluster.local/ns/shop/sa/intruder";
        assert!(policy.authorize(CHECKOUT, 8080, cart, "shop").is_ok());
        assert!(
            policy
                .authorize(
                    CHECKOUT,
                    8080,
                    "spiffe://cluster.local/ns/frontend/sa/web",
                    "frontend"
                )
                .is_ok()
        );
        let denied = policy
            .authorize(CHECKOUT, 8080, intruder, "shop")
            .unwrap_err();
        assert!(
            denied.contains("intruder") && denied.contains("8080"),
            "{denied}"
        );
        assert!(
            policy.authorize(CHECKOUT, 9999, intruder, "shop").is_ok(),
            "no rule selects port 9999: default allow"
        );
    }

    #[test]
    fn disagreeing_settings_are_reported_with_both_entries() {
        let mut policy = policy();
        policy.namespaces.push(NamespaceMode {
            namespace: "shop".into(),
            mode: MeshMode::Permissive,
        });
        policy.ports.push(PortMode {
            namespace: "shop".into(),
            service_account: "checkout".into(),
            port: 9090,
            mode: MeshMode::Strict,
        });
        policy.allow.push(AllowRule {
            namespace: "shop".into(),
            service_account: "checkout".into(),
            port: None,
            from_identities: vec![],
            from_namespaces: vec![],
        });
        let conflicts = policy.conflicts(&[]);
        assert_eq!(conflicts.len(), 3, "{conflicts:#?}");
        assert!(
            conflicts[0].contains("policy.namespaces[0] and [1]"),
            "{conflicts:#?}"
        );
        assert!(
            conflicts[1].contains("policy.ports[0] and [1]"),
            "{conflicts:#?}"
        );
        assert!(conflicts[2].contains("allows nobody"), "{conflicts:#?}");
        assert!(self::policy().conflicts(&[]).is_empty());
    }
}
