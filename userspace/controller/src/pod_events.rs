//! Pod lifecycle from the API server onto the event bus (`veil.pods`).
//!
//! Each agent watches only the pods of its own node; the pods of other nodes
//! reach it as events, which the leading controller derives from one watch on
//! all pods: `pod-scheduled` (node chosen, no address yet), `pod-ready`
//! (address known) and `pod-deleted` (gone, or finished). Events are keyed
//! `namespace/name` (one partition per pod, so per-pod order holds) and
//! sequenced by the pod's `resourceVersion`, so agents apply each change once
//! however often it is delivered. Only changes an agent cares about are
//! published: a status update that changes neither node, address nor
//! identity publishes nothing.
//!
//! A controller starting (a restart, a new leader) first reads `veil.pods`
//! back — compacted, it holds the last event of every pod — so a pod deleted
//! while no controller ran, which no watch will ever report, is announced
//! deleted after the first list, and unchanged pods are not announced again.

use std::collections::HashMap;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tracing::{info, warn};
use veil_crd::pods::{self, PodMtls};
use veil_events::schema::{Envelope, Event, Topic};

/// Where derived events go (the Kafka bus, or a test's recorder).
pub trait Publish: Send + Sync {
    fn publish(&self, envelope: &Envelope) -> Result<(), String>;
    /// What the pods topic holds already (the latest event of each pod).
    fn recorded_pods(&self) -> Result<Vec<Envelope>, String> {
        Ok(Vec::new())
    }
}

/// How long a starting controller reads `veil.pods` back.
const REPLAY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl Publish for veil_events::kafka::KafkaBus {
    fn publish(&self, envelope: &Envelope) -> Result<(), String> {
        veil_events::bus::EventBus::publish(self, envelope).map_err(|e| e.to_string())
    }

    fn recorded_pods(&self) -> Result<Vec<Envelope>, String> {
        self.replay(Topic::Pods, REPLAY_TIMEOUT)
            .map_err(|e| e.to_string())
    }
}

/// The SPIFFE ID of a meshed pod, or "" for one outside the mesh (an
/// unreadable annotation counts as outside: its node's agent leaves it out).
fn identity(pod: &Pod, trust_domain: &str) -> String {
    match pods::mtls(pod) {
        Ok(PodMtls::Inherit | PodMtls::Mode(_)) => format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            pods::namespace(pod),
            pods::service_account(pod)
        ),
        Ok(PodMtls::Off) | Err(_) => String::new(),
    }
}

/// The event a pod's current state means to agents, `None` while it has no
/// node (nothing to tell) or when it runs in the host's network.
pub fn event_for(pod: &Pod, trust_domain: &str) -> Option<Event> {
    let namespace = pods::namespace(pod).to_string();
    let name = pod.metadata.name.clone().unwrap_or_default();
    if pods::host_network(pod) {
        return None;
    }
    let node = pod.spec.as_ref()?.node_name.clone()?;
    if pods::finished(pod) {
        return Some(Event::PodDeleted {
            namespace,
            pod: name,
        });
    }
    let identity = identity(pod, trust_domain);
    Some(match pods::ipv4(pod) {
        Some(ip) => Event::PodReady {
            namespace,
            pod: name,
            node,
            ip,
            identity,
        },
        None => Event::PodScheduled {
            namespace,
            pod: name,
            node,
            identity,
        },
    })
}

/// What has been published per pod, to publish changes only and to find
/// pods that vanished while the watch was re-listing.
#[derive(Default)]
pub struct Publisher {
    trust_domain: String,
    /// Key → (last sequence, last event).
    published: HashMap<String, (u64, Event)>,
    /// Keys seen since the current re-list began.
    relisting: Option<std::collections::HashSet<String>>,
    pub sent: u64,
}

impl Publisher {
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            ..Self::default()
        }
    }

    fn send(&mut self, bus: &dyn Publish, key: String, version: u64, event: Event) {
        let seq = match self.published.get(&key) {
            Some((_, last)) if *last == event => return,
            // Strictly after what agents have applied for this pod.
            Some((last_seq, _)) => version.max(last_seq + 1),
            None => version.max(1),
        };
        let envelope = Envelope::new(Topic::Pods, key.clone(), seq, event.clone());
        match bus.publish(&envelope) {
            Ok(()) => {
                self.sent += 1;
                // Deleted pods are kept too: a re-created pod of the same
                // name must sequence after its deletion.
                self.published.insert(key, (seq, event));
            }
            Err(error) => {
                warn!(%key, %error, "pod event not published; it is retried at the next change or re-list")
            }
        }
    }

    /// Takes what the topic already records (read back at start) as
    /// published: later changes sequence after it, and pods it shows alive
    /// that the first list does not have are announced deleted.
    pub fn seed(&mut self, recorded: Vec<Envelope>) {
        for envelope in recorded {
            if envelope.topic != Topic::Pods {
                continue;
            }
            let newer = self
                .published
                .get(&envelope.key)
                .is_none_or(|(seq, _)| envelope.seq > *seq);
            if newer {
                self.published
                    .insert(envelope.key, (envelope.seq, envelope.event));
            }
        }
    }

    /// Applies one watch event.
    pub fn observe(&mut self, bus: &dyn Publish, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => self.relisting = Some(Default::default()),
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                let key = pods::key(&pod);
                if let Some(seen) = &mut self.relisting {
                    seen.insert(key.clone());
                }
                if let Some(event) = event_for(&pod, &self.trust_domain) {
                    self.send(bus, key, pods::resource_version(&pod.metadata), event);
                }
            }
            watcher::Event::Delete(pod) => {
                let (namespace, name) = (
                    pods::namespace(&pod).to_string(),
                    pod.metadata.name.clone().unwrap_or_default(),
                );
                self.send(
                    bus,
                    pods::key(&pod),
                    pods::resource_version(&pod.metadata),
                    Event::PodDeleted {
                        namespace,
                        pod: name,
                    },
                );
            }
            watcher::Event::InitDone => {
                let Some(seen) = self.relisting.take() else {
                    return;
                };
                let vanished: Vec<(String, u64)> = self
                    .published
                    .iter()
                    .filter(|(key, (_, event))| {
                        !seen.contains(key.as_str()) && !matches!(event, Event::PodDeleted { .. })
                    })
                    .map(|(key, (seq, _))| (key.clone(), *seq))
                    .collect();
                for (key, seq) in vanished {
                    let (namespace, name) = key.split_once('/').unwrap_or(("default", &key));
                    let event = Event::PodDeleted {
                        namespace: namespace.into(),
                        pod: name.into(),
                    };
                    self.send(bus, key.clone(), seq + 1, event);
                }
            }
        }
    }
}

/// Publishes pod lifecycle events until the watch ends (it retries with
/// backoff on its own, so in practice until the controller stops).
pub async fn run(client: Client, bus: &dyn Publish, trust_domain: &str) {
    let mut publisher = Publisher::new(trust_domain);
    match bus.recorded_pods() {
        Ok(recorded) => {
            info!(
                events = recorded.len(),
                "pod events read back from the topic"
            );
            publisher.seed(recorded);
        }
        Err(error) => warn!(
            %error,
            "cannot read the pods topic back: pods deleted while no controller ran stay \
             announced until they are re-created and deleted"
        ),
    }
    let mut events = std::pin::pin!(
        watcher(Api::<Pod>::all(client), watcher::Config::default()).default_backoff()
    );
    info!("publishing pod lifecycle events");
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => publisher.observe(bus, event),
            Err(error) => warn!(%error, "pod watch failed; retrying"),
        }
    }
}

/// What the publishers' tests publish into.
#[cfg(test)]
pub(crate) mod recorder {
    use std::sync::Mutex;

    use super::{Envelope, Publish};

    /// Keeps every envelope published.
    #[derive(Default)]
    pub struct Recorder(Mutex<Vec<Envelope>>);

    impl Publish for Recorder {
        fn publish(&self, envelope: &Envelope) -> Result<(), String> {
            self.0.lock().unwrap().push(envelope.clone());
            Ok(())
        }
    }

    impl Recorder {
        /// What was published since the last call.
        pub fn take(&self) -> Vec<Envelope> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }
}

#[cfg(test)]
mod tests {
    use veil_crd::pods::MTLS_ANNOTATION;

    use super::*;

    use super::recorder::Recorder;

    fn pod(name: &str, version: u64, node: Option<&str>, ip: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": version.to_string(),
                         "annotations": {MTLS_ANNOTATION: "strict"}},
            "spec": {"nodeName": node, "serviceAccountName": "cart", "containers": []},
            "status": {"podIP": ip}
        }))
        .unwrap()
    }

    #[test]
    fn a_pod_is_announced_when_scheduled_ready_and_deleted_in_order() {
        let (bus, mut publisher) = (Recorder::default(), Publisher::new("cluster.local"));
        publisher.observe(&bus, watcher::Event::Apply(pod("a", 10, None, None)));
        publisher.observe(
            &bus,
            watcher::Event::Apply(pod("a", 11, Some("node2"), None)),
        );
        publisher.observe(
            &bus,
            watcher::Event::Apply(pod("a", 12, Some("node2"), Some("198.19.2.9"))),
        );
        // A status change that tells agents nothing new publishes nothing.
        publisher.observe(
            &bus,
            watcher::Event::Apply(pod("a", 13, Some("node2"), Some("198.19.2.9"))),
        );
        publisher.observe(
            &bus,
            watcher::Event::Delete(pod("a", 13, Some("node2"), Some("198.19.2.9"))),
        );
        let sent = bus.take();
        let types: Vec<_> = sent
            .iter()
            .map(|e| match &e.event {
                Event::PodScheduled { .. } => "scheduled",
                Event::PodReady { .. } => "ready",
                Event::PodDeleted { .. } => "deleted",
                _ => "other",
            })
            .collect();
        assert_eq!(types, ["scheduled", "ready", "deleted"]);
        assert!(
            sent.windows(2).all(|w| w[0].seq < w[1].seq),
            "sequences increase"
        );
        assert!(
            sent.iter()
                .all(|e| e.key == "shop/a" && e.topic == Topic::Pods)
        );
        let Event::PodReady { identity, ip, .. } = &sent[1].event else {
            unreachable!()
        };
        assert_eq!(identity, "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(ip, "198.19.2.9");
    }

    /// A re-list of the watch that finds pod a alone; what it published.
    fn relist_finding_only_a(publisher: &mut Publisher, bus: &Recorder) -> Vec<Envelope> {
        publisher.observe(bus, watcher::Event::Init);
        publisher.observe(
            bus,
            watcher::Event::InitApply(pod("a", 5, Some("n"), Some("198.19.1.1"))),
        );
        publisher.observe(bus, watcher::Event::InitDone);
        bus.take()
    }

    #[test]
    fn a_starting_controller_announces_pods_deleted_while_none_ran_and_nothing_else() {
        // The topic, read back: a alive (as now), b alive (deleted since),
        // c already deleted.
        let bus = Recorder::default();
        let mut earlier = Publisher::new("cluster.local");
        for p in [
            pod("a", 5, Some("n"), Some("198.19.1.1")),
            pod("b", 6, Some("n"), Some("198.19.1.2")),
            pod("c", 7, Some("n"), Some("198.19.1.3")),
        ] {
            earlier.observe(&bus, watcher::Event::Apply(p));
        }
        earlier.observe(&bus, watcher::Event::Delete(pod("c", 8, Some("n"), None)));
        let recorded = bus.take();

        let mut publisher = Publisher::new("cluster.local");
        publisher.seed(recorded);
        let sent = relist_finding_only_a(&mut publisher, &bus);
        assert_eq!(sent.len(), 1, "only b: {sent:?}");
        assert_eq!(sent[0].key, "shop/b");
        assert!(matches!(sent[0].event, Event::PodDeleted { .. }));
        assert!(sent[0].seq > 6, "after what agents applied");
    }

    #[test]
    fn pods_gone_during_a_relist_are_announced_deleted() {
        let (bus, mut publisher) = (Recorder::default(), Publisher::new("cluster.local"));
        publisher.observe(
            &bus,
            watcher::Event::Apply(pod("a", 5, Some("n"), Some("198.19.1.1"))),
        );
        publisher.observe(
            &bus,
            watcher::Event::Apply(pod("b", 6, Some("n"), Some("198.19.1.2"))),
        );
        bus.take();
        let sent = relist_finding_only_a(&mut publisher, &bus);
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].key, "shop/b");
        assert!(matches!(sent[0].event, Event::PodDeleted { .. }));
        assert!(sent[0].seq > 6);
    }

    #[test]
    fn unmeshed_and_host_network_pods() {
        let mut plain = pod("p", 1, Some("n"), Some("198.19.1.3"));
        plain.metadata.annotations = None;
        let Some(Event::PodReady { identity, .. }) = event_for(&plain, "td") else {
            panic!("an unmeshed pod is still announced (the overlay routes it)")
        };
        assert_eq!(identity, "");
        let mut host = plain.clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(event_for(&host, "td"), None);
    }
}
