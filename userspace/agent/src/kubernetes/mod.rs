//! Kubernetes as the agent's source of nodes and of its own pods.
//!
//! With `[kubernetes]` the agent watches (kube-rs watchers with reflector
//! stores, reconnecting with backoff) the pods scheduled on its node (field
//! selector `spec.nodeName`) and every Node object, and feeds what it learns
//! into the same inventory the file and the event bus feed: nodes give pod
//! CIDRs and underlay addresses ([`objects::node_spec`]), pods give local
//! endpoints, their veth and MAC found in the kernel ([`neighbours`]), and
//! their mesh membership from the `veil.dev/mtls` annotation. Pods of other
//! nodes come from the event bus, where `veil-controller` publishes them.
//!
//! At start the agent writes its underlay address and MAC into its own Node
//! object, where the other agents read them. Everything that cannot be used
//! (a Node without a CIDR, a pod whose veth is not up yet, a misspelt mode)
//! is reported in `veilctl status` and retried, never guessed.

pub mod neighbours;
pub mod objects;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, reflector, watcher},
};
use tracing::{info, warn};

use crate::inventory::{Inventory, MacAddress, PodSpec};
use objects::{PolicyEntry, UNDERLAY_IP_ANNOTATION, UNDERLAY_MAC_ANNOTATION, WatchedPod};
use veil_crd::MTLSPolicy;

/// How often pods that could not be resolved (veth or MAC) are tried again.
const RETRY_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("cannot load the kubeconfig {path}: {reason}")]
    Kubeconfig { path: PathBuf, reason: String },
    #[error(
        "cannot find Kubernetes credentials (no in-cluster service account, no KUBECONFIG): \
         {0}; set [kubernetes] kubeconfig"
    )]
    NoCredentials(String),
    #[error("cannot make a Kubernetes client: {0}")]
    Client(String),
    #[error("cannot start the Kubernetes watcher thread: {0}")]
    Thread(std::io::Error),
}

/// The client configuration: `kubeconfig` when given, else in-cluster, else `KUBECONFIG`.
pub async fn client_config(kubeconfig: Option<&Path>) -> Result<kube::Config, KubernetesError> {
    match kubeconfig {
        Some(path) => {
            let error = |reason: String| KubernetesError::Kubeconfig {
                path: path.to_owned(),
                reason,
            };
            let file =
                kube::config::Kubeconfig::read_from(path).map_err(|e| error(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| error(e.to_string()))
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubernetesError::NoCredentials(e.to_string())),
    }
}

/// A local pod with its wiring found.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LocalPod {
    pod: WatchedPod,
    interface: String,
    mac: MacAddress,
}

/// What the API server has taught this agent, shared with the overlay sync.
#[derive(Debug, Default)]
pub struct KubeState {
    nodes: RwLock<BTreeMap<String, crate::inventory::NodeSpec>>,
    pods: RwLock<BTreeMap<String, LocalPod>>,
    /// `MTLSPolicy` objects, by `namespace/name`.
    policies: RwLock<BTreeMap<String, PolicyEntry>>,
    /// Why something is left out, by object (`node/x`, `pod/ns/name`, `api`).
    problems: RwLock<BTreeMap<String, String>>,
    /// Told after each change, so the overlay sync runs at once instead of
    /// at its next tick (a new pod's certificate waits for that sync).
    pub changed: tokio::sync::Notify,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

impl KubeState {
    /// Adds the API server's nodes and this node's pods to `inventory`;
    /// what the file lists (by name, or by address for pods) wins.
    pub fn merge_into(&self, inventory: &mut Inventory, this_node: &str) {
        for node in read(&self.nodes).values() {
            if inventory.node(&node.name).is_none() {
                inventory.nodes.push(node.clone());
            }
        }
        for local in read(&self.pods).values() {
            if inventory
                .pods
                .iter()
                .any(|p| p.ip == local.pod.ip || p.name == local.pod.name)
            {
                continue;
            }
            inventory.pods.push(PodSpec {
                name: local.pod.name.clone(),
                node: this_node.to_string(),
                ip: local.pod.ip,
                mac: local.mac,
                interface: local.interface.clone(),
                mesh: local.pod.mesh.clone(),
            });
        }
    }

    /// Applies the `MTLSPolicy` objects: namespace and port modes join the
    /// inventory's policy (where a disagreement with the file or another
    /// object is a conflict the inventory check refuses), workload modes go
    /// to the workload's pods that set none themselves. Call after every
    /// other source is merged, so the bus's pods get them too.
    pub fn apply_policies(&self, inventory: &mut Inventory) {
        for entry in read(&self.policies).values() {
            match entry {
                PolicyEntry::Namespace(namespace) => {
                    inventory.policy.namespaces.push(namespace.clone())
                }
                PolicyEntry::Port(port) => inventory.policy.ports.push(port.clone()),
                PolicyEntry::Workload {
                    namespace,
                    service_account,
                    mode,
                } => {
                    for mesh in inventory.pods.iter_mut().filter_map(|p| p.mesh.as_mut()) {
                        if mesh.mode.is_none()
                            && &mesh.namespace == namespace
                            && &mesh.service_account == service_account
                        {
                            mesh.mode = Some(*mode);
                        }
                    }
                }
            }
        }
    }

    /// What is left out and why, for `veilctl status`.
    pub fn problems(&self) -> Vec<String> {
        read(&self.problems)
            .iter()
            .map(|(what, why)| format!("kubernetes {what}: {why}"))
            .collect()
    }

    pub fn node_count(&self) -> usize {
        read(&self.nodes).len()
    }

    pub fn pod_count(&self) -> usize {
        read(&self.pods).len()
    }

    fn set_problem(&self, what: String, why: Option<String>) {
        let mut problems = write(&self.problems);
        match why {
            Some(why) => {
                if problems.get(&what) != Some(&why) {
                    warn!(%what, %why, "left out");
                    problems.insert(what, why);
                }
            }
            None => {
                problems.remove(&what);
            }
        }
    }

    /// Drops the problems of objects of a kind (`prefix`) that are gone:
    /// every key under `prefix` not in `seen`.
    fn forget_problems_except(&self, prefix: &str, seen: &[String]) {
        write(&self.problems).retain(|k, _| !k.starts_with(prefix) || seen.contains(k));
    }

    fn replace_policies(&self, policies: &[Arc<MTLSPolicy>]) {
        let mut entries = BTreeMap::new();
        let mut seen = Vec::new();
        for policy in policies {
            let name = format!(
                "{}/{}",
                policy.metadata.namespace.as_deref().unwrap_or("default"),
                policy.metadata.name.as_deref().unwrap_or_default()
            );
            let key = format!("mtlspolicy/{name}");
            match objects::policy_entry(policy) {
                Ok(entry) => {
                    self.set_problem(key.clone(), None);
                    entries.insert(name, entry);
                }
                Err(why) => self.set_problem(key.clone(), Some(why)),
            }
            seen.push(key);
        }
        self.forget_problems_except("mtlspolicy/", &seen);
        let mut current = write(&self.policies);
        if *current != entries {
            info!(
                policies = entries.len(),
                "mTLS policies from the API server"
            );
            *current = entries;
        }
    }

    fn replace_nodes(&self, nodes: &[Arc<Node>]) {
        let mut specs = BTreeMap::new();
        let mut seen = Vec::new();
        for node in nodes {
            let name = node.metadata.name.clone().unwrap_or_default();
            let key = format!("node/{name}");
            match objects::node_spec(node) {
                Ok(spec) => {
                    self.set_problem(key.clone(), None);
                    specs.insert(name, spec);
                }
                Err(why) => self.set_problem(key.clone(), Some(why)),
            }
            seen.push(key);
        }
        self.forget_problems_except("node/", &seen);
        let mut current = write(&self.nodes);
        if *current != specs {
            info!(nodes = specs.len(), "nodes from the API server");
            *current = specs;
        }
    }

    /// Rebuilds this node's pods from the store, resolving wiring only for
    /// pods that are new, recreated (new UID) or changed address (blocking:
    /// runs `ip`).
    fn replace_pods(&self, pods: &[Arc<Pod>], this_node: &str) {
        let known = read(&self.pods).clone();
        let mut next = BTreeMap::new();
        let mut seen = Vec::new();
        for pod in pods {
            let watched = match objects::watched_pod(pod, this_node) {
                Ok(Some(watched)) => watched,
                Ok(None) => continue,
                Err(why) => {
                    let key = format!(
                        "pod/{}/{}",
                        pod.metadata.namespace.as_deref().unwrap_or("default"),
                        pod.metadata.name.as_deref().unwrap_or_default()
                    );
                    self.set_problem(key.clone(), Some(why));
                    seen.push(key);
                    continue;
                }
            };
            let key = format!("pod/{}", watched.name);
            seen.push(key.clone());
            let wiring = match known.get(&watched.name) {
                Some(local) if local.pod.ip == watched.ip && local.pod.uid == watched.uid => {
                    Ok((local.interface.clone(), local.mac))
                }
                _ => neighbours::resolve(watched.ip),
            };
            match wiring {
                Ok((interface, mac)) => {
                    self.set_problem(key, None);
                    next.insert(
                        watched.name.clone(),
                        LocalPod {
                            pod: watched,
                            interface,
                            mac,
                        },
                    );
                }
                Err(error) => self.set_problem(key, Some(error.to_string())),
            }
        }
        self.forget_problems_except("pod/", &seen);
        let mut current = write(&self.pods);
        if *current != next {
            info!(pods = next.len(), "this node's pods from the API server");
            *current = next;
        }
    }
}

/// The running watchers; they stop with the agent process.
pub struct Kubernetes {
    pub state: Arc<KubeState>,
}

/// This node's underlay address and MAC, for its Node annotations.
fn underlay_identity(interface: &str) -> Option<(Ipv4Addr, MacAddress)> {
    let link = crate::datapath::links::current().get(interface).copied()?;
    let ip = nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        (a.interface_name == interface)
            .then(|| a.address?.as_sockaddr_in().map(|s| s.ip()))
            .flatten()
    })?;
    Some((ip, MacAddress(link.mac)))
}

impl Kubernetes {
    /// Starts the watchers on their own thread and runtime (where the
    /// client's connection tasks live). Returns at once; the first results
    /// arrive within the first list's round trip.
    pub fn start(
        kubeconfig: Option<&Path>,
        annotate_node: bool,
        node_name: &str,
        underlay_interface: &str,
    ) -> Result<Self, KubernetesError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kube-watch")
            .enable_all()
            .build()
            .map_err(KubernetesError::Thread)?;
        let client = runtime.block_on(async {
            let config = client_config(kubeconfig).await?;
            Client::try_from(config).map_err(|e| KubernetesError::Client(e.to_string()))
        })?;
        let state = Arc::new(KubeState::default());
        let (thread_state, node, underlay) = (
            Arc::clone(&state),
            node_name.to_string(),
            underlay_interface.to_string(),
        );
        std::thread::Builder::new()
            .name("kubernetes".into())
            .spawn(move || {
                runtime.block_on(watch(client, thread_state, node, underlay, annotate_node));
            })
            .map_err(KubernetesError::Thread)?;
        info!(
            node = node_name,
            "watching this node's pods and the cluster's nodes"
        );
        Ok(Self { state })
    }
}

/// Writes the annotations until the API server takes them (the Node may not
/// exist yet when the agent starts before its kubelet registers it).
async fn annotate(client: Client, state: Arc<KubeState>, node: String, underlay: String) {
    let nodes: Api<Node> = Api::all(client);
    let mut backoff = Duration::from_millis(500);
    loop {
        let result = match underlay_identity(&underlay) {
            None => Err(format!(
                "underlay interface {underlay} has no IPv4 address or MAC"
            )),
            Some((ip, mac)) => {
                let patch = serde_json::json!({"metadata": {"annotations": {
                    UNDERLAY_IP_ANNOTATION: ip.to_string(),
                    UNDERLAY_MAC_ANNOTATION: mac.to_string(),
                }}});
                nodes
                    .patch(&node, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| info!(%node, %ip, %mac, "underlay written into the Node object"))
                    .map_err(|e| format!("cannot annotate Node {node} (does node_name match the Kubernetes node name?): {e}"))
            }
        };
        match result {
            Ok(()) => {
                state.set_problem("node annotation".into(), None);
                return;
            }
            Err(why) => state.set_problem("node annotation".into(), Some(why)),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn watch(
    client: Client,
    state: Arc<KubeState>,
    node: String,
    underlay: String,
    annotate_node: bool,
) {
    if annotate_node {
        tokio::spawn(annotate(
            client.clone(),
            Arc::clone(&state),
            node.clone(),
            underlay,
        ));
    }
    let (node_store, node_writer) = reflector::store::<Node>();
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let mut nodes = std::pin::pin!(
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .reflect(node_writer)
    );
    let on_this_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut pods = std::pin::pin!(
        watcher(Api::<Pod>::all(client.clone()), on_this_node)
            .default_backoff()
            .reflect(pod_writer)
    );
    let (policy_store, policy_writer) = reflector::store::<MTLSPolicy>();
    let mut policies = std::pin::pin!(
        watcher(Api::<MTLSPolicy>::all(client), watcher::Config::default())
            .default_backoff()
            .reflect(policy_writer)
    );
    let mut retry = tokio::time::interval(RETRY_PERIOD);
    loop {
        tokio::select! {
            event = nodes.next() => match event {
                Some(Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_))) => {
                    state.set_problem("api nodes".into(), None);
                    state.replace_nodes(&node_store.state());
                    state.changed.notify_one();
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => state.set_problem("api nodes".into(), Some(format!("watch failed, retrying: {error}"))),
                None => return,
            },
            event = pods.next() => match event {
                Some(Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_))) => {
                    state.set_problem("api pods".into(), None);
                    let (changed, store, node) = (Arc::clone(&state), pod_store.clone(), node.clone());
                    let _ = tokio::task::spawn_blocking(move || changed.replace_pods(&store.state(), &node)).await;
                    state.changed.notify_one();
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => state.set_problem("api pods".into(), Some(format!("watch failed, retrying: {error}"))),
                None => return,
            },
            event = policies.next() => match event {
                Some(Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_))) => {
                    state.set_problem("api mtlspolicies".into(), None);
                    state.replace_policies(&policy_store.state());
                    state.changed.notify_one();
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => state.set_problem(
                    "api mtlspolicies".into(),
                    Some(format!("watch failed, retrying (is the MTLSPolicy CRD installed?): {error}")),
                ),
                None => return,
            },
            _ = retry.tick() => {
                // Pods whose veth or MAC was not there yet.
                if read(&state.problems).keys().any(|k| k.starts_with("pod/")) {
                    let (state, store, node) = (Arc::clone(&state), pod_store.clone(), node.clone());
                    let _ = tokio::task::spawn_blocking(move || state.replace_pods(&store.state(), &node)).await;
                }
            }
        }
    }
}
