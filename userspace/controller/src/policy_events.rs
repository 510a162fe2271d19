//! mTLS policy changes from the API server onto the event bus (`veil.policy`).
//!
//! Agents take `MTLSPolicy` objects from their own watch of the API server
//! (every agent needs their content, and a watch delivers it within a
//! second); the bus carries the *change log*: one `policy-changed` event per
//! change (name `namespace/name`, version = the object's `resourceVersion`,
//! strictly increasing per policy, a deletion after its last version), for
//! audit trails and consumers outside the cluster.

use std::collections::HashMap;

use futures::StreamExt;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tracing::{info, warn};
use veil_crd::{MTLSPolicy, pods};
use veil_events::schema::{Envelope, Event, Topic};

use crate::pod_events::Publish;

fn name_of(policy: &MTLSPolicy) -> String {
    format!(
        "{}/{}",
        policy.metadata.namespace.as_deref().unwrap_or("default"),
        policy.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The last version published per policy.
#[derive(Default)]
pub struct PolicyPublisher {
    published: HashMap<String, u64>,
}

impl PolicyPublisher {
    fn send(&mut self, bus: &dyn Publish, name: String, version: u64) {
        let last = self.published.get(&name).copied();
        if last == Some(version) {
            return; // the same version again (a re-list)
        }
        let version = last.map_or(version.max(1), |last| version.max(last + 1));
        let envelope = Envelope::new(
            Topic::Policy,
            format!("mtlspolicy/{name}"),
            version,
            Event::PolicyChanged {
                name: name.clone(),
                version,
            },
        );
        match bus.publish(&envelope) {
            Ok(()) => {
                self.published.insert(name, version);
            }
            Err(error) => warn!(%name, %error, "policy change not published"),
        }
    }

    pub fn observe(&mut self, bus: &dyn Publish, event: watcher::Event<MTLSPolicy>) {
        match event {
            watcher::Event::InitApply(policy) | watcher::Event::Apply(policy) => {
                self.send(
                    bus,
                    name_of(&policy),
                    pods::resource_version(&policy.metadata),
                );
            }
            watcher::Event::Delete(policy) => {
                let name = name_of(&policy);
                let after = self
                    .published
                    .get(&name)
                    .map_or(pods::resource_version(&policy.metadata), |v| v + 1);
                self.send(
                    bus,
                    name,
                    after.max(pods::resource_version(&policy.metadata) + 1),
                );
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }
}

/// Publishes policy changes until the watch ends.
pub async fn run(client: Client, bus: &dyn Publish) {
    let mut publisher = PolicyPublisher::default();
    let mut events = std::pin::pin!(
        watcher(Api::<MTLSPolicy>::all(client), watcher::Config::default()).default_backoff()
    );
    info!("publishing mTLS policy changes");
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => publisher.observe(bus, event),
            Err(error) => {
                warn!(%error, "MTLSPolicy watch failed (is the CRD installed?); retrying")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::pod_events::recorder::Recorder;

    fn policy(version: u64) -> MTLSPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "veil.dev/v1alpha1", "kind": "MTLSPolicy",
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": version.to_string()},
            "spec": {"serviceAccount": "web", "mode": "STRICT"}
        }))
        .unwrap()
    }

    #[test]
    fn each_change_is_published_once_in_order_with_the_deletion_last() {
        let (bus, mut publisher) = (Recorder::default(), PolicyPublisher::default());
        publisher.observe(&bus, watcher::Event::Apply(policy(7)));
        publisher.observe(&bus, watcher::Event::InitApply(policy(7)));
        publisher.observe(&bus, watcher::Event::Apply(policy(9)));
        publisher.observe(&bus, watcher::Event::Delete(policy(9)));
        let sent = bus.take();
        let versions: Vec<u64> = sent.iter().map(|e| e.seq).collect();
        assert_eq!(versions, [7, 9, 10], "{sent:?}");
        assert!(
            sent.iter()
                .all(|e| e.topic == Topic::Policy && e.key == "mtlspolicy/shop/web")
        );
    }
}
