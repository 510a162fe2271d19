//! The node's `ECDSACert`s as the API server has them, from one watch.
//!
//! A certificate request waits for `veil-controller` to answer in the
//! object's status. With a watch of its own per request, a burst of new pods
//! costs the API server a list and a watch per certificate; instead the
//! signer labels its objects `veil.dev/node=<node>` and keeps one reflector
//! on that label, and each waiting request looks into its store whenever the
//! watch delivers something.

use std::sync::Arc;

use futures::StreamExt;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, reflector::ObjectRef, watcher},
};
use tokio::sync::Notify;
use tracing::warn;
use veil_crd::ECDSACert;

pub use veil_crd::NODE_LABEL;

pub struct Answers {
    store: reflector::Store<ECDSACert>,
    changed: Arc<Notify>,
}

impl Answers {
    /// Starts the watch of `node`'s objects as a task on `runtime`.
    pub fn start(runtime: &tokio::runtime::Handle, client: Client, node: &str) -> Self {
        let (store, writer) = reflector::store();
        let changed = Arc::new(Notify::new());
        let notify = Arc::clone(&changed);
        let api: Api<ECDSACert> = Api::all(client);
        let config = watcher::Config::default().labels(&format!("{NODE_LABEL}={node}"));
        runtime.spawn(async move {
            let mut events = std::pin::pin!(watcher(api, config).default_backoff().reflect(writer));
            while let Some(event) = events.next().await {
                if let Err(error) = event {
                    warn!(%error, "ECDSACert watch failed; retrying");
                }
                notify.notify_waiters();
            }
        });
        Self { store, changed }
    }

    /// Waits until `answer` finds what it wants in object `name`, or until
    /// `deadline` (`None` then).
    pub async fn wait_for<T>(
        &self,
        name: &str,
        deadline: tokio::time::Instant,
        answer: impl Fn(&ECDSACert) -> Option<T>,
    ) -> Option<T> {
        let key = ObjectRef::new(name);
        loop {
            // Registered before looking, so a change in between still wakes us.
            let notified = self.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if let Some(found) = self.store.get(&key).and_then(|object| answer(&object)) {
                return Some(found);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

/// Whether `node` can be a label value (63 characters of `[A-Za-z0-9._-]`,
/// alphanumeric at both ends); a node whose name cannot falls back to a
/// watch per request.
pub fn usable_as_label(node: &str) -> bool {
    let bytes = node.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_that_are_label_values() {
        assert!(usable_as_label("node1"));
        assert!(usable_as_label("ip-10-0-0-1.ec2.internal"));
        assert!(!usable_as_label(""));
        assert!(!usable_as_label("-node"));
        assert!(!usable_as_label(&"n".repeat(64)));
    }
}
