//! The kube-rs controller loop for `ECDSACert`.
//!
//! Each reconcile asks [`crate::issuance`] what to do — looking up where the
//! workload runs ([`crate::placement`]) only when a certificate is to be
//! signed — and carries the answer to the API server as a status patch,
//! requeueing at the renewal time. A
//! status is written only when it says something new (conditions keep their
//! transition times), so the controller's own writes do not loop. A
//! finalizer removes the optional `kubernetes.io/tls` Secret when the object
//! goes — only on objects that name one: the others have nothing to clean
//! up, and skipping the finalizer saves a write (and a reconcile) per
//! certificate, which is what limits issuance bursts on the API server.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::{
        controller::{Action, Controller},
        finalizer::{Event, finalizer},
        watcher,
    },
};
use tracing::{info, warn};
use veil_crd::{ECDSACert, ECDSACertStatus};
use veil_identity::SpiffeId;

use crate::{
    issuance::{Decision, LocalIssuer, Step},
    placement,
};

/// The finalizer Veil puts on every `ECDSACert` it manages.
pub const FINALIZER: &str = "veil.dev/ecdsacert-cleanup";
/// Field manager name for the controller's writes.
const MANAGER: &str = "veil-controller";

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("API server: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

pub struct Context {
    pub client: Client,
    pub issuer: LocalIssuer,
}

/// Runs the controller until `shutdown` completes.
pub async fn run(context: Context, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let api: Api<ECDSACert> = Api::all(context.client.clone());
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, Arc::new(context))
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "reconcile failed");
            }
        })
        .await;
}

async fn reconcile(cert: Arc<ECDSACert>, context: Arc<Context>) -> Result<Action, ReconcileError> {
    let api: Api<ECDSACert> = Api::all(context.client.clone());
    if !needs_finalizer(&cert) {
        if cert.metadata.deletion_timestamp.is_some() {
            return Ok(Action::await_change());
        }
        return apply(&api, &cert, &context).await;
    }
    finalizer(&api, FINALIZER, cert, |event| async {
        match event {
            Event::Apply(cert) => apply(&api, &cert, &context).await,
            Event::Cleanup(cert) => cleanup(&cert, &context).await,
        }
    })
    .await
    .map_err(|error| ReconcileError::Finalizer(error.to_string()))
}

/// Whether deleting `cert` needs cleanup: it names a Secret, or carries our
/// finalizer already (which then must be taken off through the finalizer).
fn needs_finalizer(cert: &ECDSACert) -> bool {
    cert.spec.secret_name.is_some() || cert.finalizers().iter().any(|f| f == FINALIZER)
}

fn error_policy(cert: Arc<ECDSACert>, error: &ReconcileError, _: Arc<Context>) -> Action {
    warn!(name = %cert.name_any(), %error, "will retry in 30 s");
    Action::requeue(Duration::from_secs(30))
}

async fn apply(
    api: &Api<ECDSACert>,
    cert: &ECDSACert,
    context: &Context,
) -> Result<Action, ReconcileError> {
    let now = SystemTime::now();
    let decision = match context.issuer.plan(&cert.spec, cert.status.as_ref(), now) {
        Step::Decided(decision) => decision,
        Step::Sign(request) => {
            let placement =
                placement::find(&context.client, request.node(), request.identity()).await?;
            context
                .issuer
                .sign(&request, cert.status.as_ref(), SystemTime::now(), placement)
        }
    };
    match decision {
        Decision::UpToDate { renew_at } => Ok(Action::requeue(
            renew_at
                .duration_since(now)
                .unwrap_or_default()
                .max(Duration::from_secs(1)),
        )),
        Decision::Write {
            mut status,
            recheck_after,
        } => {
            keep_transition_times(&mut status, cert.status.as_ref());
            if cert.status.as_ref() != Some(&status) {
                let ready = status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Ready")
                    .map(|c| format!("{} ({}: {})", c.status, c.reason, c.message))
                    .unwrap_or_default();
                info!(name = %cert.name_any(), serial = ?status.serial, ready, "status updated");
                let patch = serde_json::json!({ "status": status });
                api.patch_status(
                    &cert.name_any(),
                    &PatchParams::apply(MANAGER),
                    &Patch::Merge(&patch),
                )
                .await?;
            }
            Ok(Action::requeue(recheck_after.max(Duration::from_secs(1))))
        }
    }
}

/// A condition whose status did not change keeps its transition time, so a
/// rewrite of the same state is recognised as no change.
fn keep_transition_times(status: &mut ECDSACertStatus, previous: Option<&ECDSACertStatus>) {
    let Some(previous) = previous else { return };
    for condition in &mut status.conditions {
        if let Some(old) = previous.conditions.iter().find(|c| {
            c.type_ == condition.type_
                && c.status == condition.status
                && c.reason == condition.reason
                && c.message == condition.message
        }) {
            condition.last_transition_time = old.last_transition_time.clone();
        }
    }
}

/// Removes the optional Secret (in the identity's namespace).
async fn cleanup(cert: &ECDSACert, context: &Context) -> Result<Action, ReconcileError> {
    let (Some(secret), Some(identity)) = (&cert.spec.secret_name, &cert.spec.identity) else {
        return Ok(Action::await_change());
    };
    let Ok(identity) = identity.parse::<SpiffeId>() else {
        return Ok(Action::await_change());
    };
    let secrets: Api<Secret> = Api::namespaced(context.client.clone(), identity.namespace());
    match secrets.delete(secret, &DeleteParams::default()).await {
        Ok(_) => info!(secret, namespace = identity.namespace(), "secret removed"),
        Err(kube::Error::Api(response)) if response.code == 404 => {}
        Err(error) => return Err(error.into()),
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    //! The reconciler against kube-rs's mock API server (tower-test): what
    //! it sends, not just what it decides.

    use http::{Request, Response};
    use kube::client::Body;
    use veil_crd::ECDSACertSpec;
    use veil_identity::{CertificateAuthority, WorkloadKey, renewal::RenewalPolicy};

    use super::*;
    use crate::issuance::DEFAULT_DURATION;

    const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";

    fn cert(csr: Option<String>) -> ECDSACert {
        let mut cert = ECDSACert::new(
            "shop.cart.node1",
            ECDSACertSpec::workload(CART, "node1", csr),
        );
        cert.metadata.resource_version = Some("1".into());
        cert
    }

    fn context(client: Client) -> Context {
        Context {
            client,
            issuer: LocalIssuer {
                ca: CertificateAuthority::generate("cluster.local", DEFAULT_DURATION).unwrap(),
                renewal: RenewalPolicy::default(),
            },
        }
    }

    /// The pods the mock API server lists in `shop` on node1.
    fn cart_pod_on_node1() -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": "cart-1", "namespace": "shop",
                         "annotations": {"veil.dev/mtls": "enabled"}},
            "spec": {"nodeName": "node1", "serviceAccountName": "cart", "containers": []}
        })
    }

    /// Runs `apply` against a mock API server that answers a list of the
    /// pods in `shop` on node1 with `pods` and the status patch; returns the
    /// patch body it received and the pod list's query, if there was one.
    async fn apply_and_capture(
        cert: ECDSACert,
        pods: Vec<serde_json::Value>,
    ) -> (Action, Option<serde_json::Value>, Option<String>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let context = context(client.clone());
        let api: Api<ECDSACert> = Api::all(client);
        let server = tokio::spawn(async move {
            let mut pod_query = None;
            loop {
                let (request, send) = handle.next_request().await?;
                if request.method() == http::Method::GET {
                    assert_eq!(request.uri().path(), "/api/v1/namespaces/shop/pods");
                    pod_query = request.uri().query().map(str::to_owned);
                    let list = serde_json::json!({
                        "apiVersion": "v1", "kind": "PodList",
                        "metadata": {"resourceVersion": "7"}, "items": pods,
                    });
                    send.send_response(
                        Response::builder()
                            .body(Body::from(serde_json::to_vec(&list).unwrap()))
                            .unwrap(),
                    );
                    continue;
                }
                assert_eq!(request.method(), http::Method::PATCH);
                assert_eq!(
                    request.uri().path(),
                    "/apis/veil.dev/v1alpha1/ecdsacerts/shop.cart.node1/status"
                );
                let body = request.into_body().collect_bytes().await.unwrap();
                let patch: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let mut answer = serde_json::to_value(cert_for_answer()).unwrap();
                answer["status"] = patch["status"].clone();
                send.send_response(
                    Response::builder()
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
                return Some((patch, pod_query));
            }
        });
        let action = apply(&api, &cert, &context).await.unwrap();
        // No request at all is fine too (nothing to write): drop the handle.
        let captured = tokio::time::timeout(Duration::from_millis(200), server)
            .await
            .ok()
            .and_then(|joined| joined.unwrap());
        let (patch, pod_query) = captured.unzip();
        (action, patch, pod_query.flatten())
    }

    fn cert_for_answer() -> ECDSACert {
        cert(None)
    }

    #[tokio::test]
    async fn a_csr_becomes_a_status_patch_with_the_chain_and_a_requeue_at_renewal() {
        let csr = WorkloadKey::generate()
            .unwrap()
            .csr_pem(&CART.parse().unwrap())
            .unwrap();
        let (action, patch, pod_query) =
            apply_and_capture(cert(Some(csr)), vec![cart_pod_on_node1()]).await;
        let patch = patch.expect("the status was not written");
        let query = pod_query.expect("the pods were looked up");
        assert!(
            query
                .split('&')
                .any(|pair| pair.starts_with("fieldSelector=spec.nodeName%3Dnode1%2C")),
            "the pods on the request's node, selected by the API server: {query}"
        );
        let status = &patch["status"];
        assert!(
            status["certificateChain"]
                .as_str()
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
        assert!(status["serial"].as_str().is_some_and(|s| !s.is_empty()));
        let ready = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "True");
        // Requeued at the renewal time (2/3 of 24 h), not immediately.
        // `Action` exposes its delay only through Debug: `Some(57599.9…s)`.
        let debug = format!("{action:?}");
        let seconds: f64 = debug
            .split("Some(")
            .nth(1)
            .and_then(|rest| rest.split('s').next())
            .and_then(|number| number.parse().ok())
            .unwrap_or_else(|| panic!("no requeue delay in {debug}"));
        assert!((57_000.0..58_000.0).contains(&seconds), "{debug}");
    }

    #[tokio::test]
    async fn an_unchanged_status_is_not_written_again() {
        let mut waiting = cert(None);
        let (_, patch, pod_query) = apply_and_capture(waiting.clone(), Vec::new()).await;
        assert!(
            pod_query.is_none(),
            "no pod lookup while there is nothing to sign"
        );
        let status: ECDSACertStatus =
            serde_json::from_value(patch.expect("first write")["status"].clone()).unwrap();
        waiting.status = Some(status);
        let (_, again, _) = apply_and_capture(waiting, Vec::new()).await;
        assert!(
            again.is_none(),
            "the same state was written twice: {again:?}"
        );
    }

    #[tokio::test]
    async fn a_csr_from_a_node_without_the_workload_is_refused() {
        let csr = WorkloadKey::generate()
            .unwrap()
            .csr_pem(&CART.parse().unwrap())
            .unwrap();
        let mut elsewhere = cart_pod_on_node1();
        elsewhere["spec"]["serviceAccountName"] = "admin".into();
        let (_, patch, pod_query) = apply_and_capture(cert(Some(csr)), vec![elsewhere]).await;
        assert!(pod_query.is_some(), "the pods were looked up");
        let status: ECDSACertStatus =
            serde_json::from_value(patch.expect("a refusal is written")["status"].clone()).unwrap();
        assert!(status.certificate_chain.is_none());
        let failed = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Failed")
            .unwrap();
        assert_eq!(
            (failed.status.as_str(), failed.reason.as_str()),
            ("True", "WorkloadNotOnNode")
        );
    }
}
