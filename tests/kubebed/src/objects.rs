//! Putting YAML manifests into the test API server, as `kubectl apply
//! --server-side` would: every document, typed through discovery.

use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams},
    core::{GroupVersionKind, TypeMeta},
    discovery::{self, Scope},
};
use serde::Deserialize;
use serde_json::Value;

/// Every YAML document of `text`, as JSON values (empty documents dropped).
///
/// # Panics
/// On a document that is not YAML: the tests' own manifests are wrong then.
pub fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|document| Value::deserialize(document).expect("every document is YAML"))
        .filter(|value| !value.is_null())
        .collect()
}

/// `Kind namespace/name`, for messages.
pub fn describe(object: &Value) -> String {
    format!(
        "{} {}/{}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["namespace"].as_str().unwrap_or("-"),
        object["metadata"]["name"].as_str().unwrap_or("?"),
    )
}

/// Server-side applies `object` as `field_manager` and returns what the API
/// server answered.
///
/// # Panics
/// When `object` lacks `apiVersion`, `kind`, `metadata.name`, or a
/// namespaced object lacks `metadata.namespace`.
pub async fn apply(
    client: &Client,
    object: &Value,
    field_manager: &str,
    dry_run: bool,
) -> Result<Value, kube::Error> {
    let types: TypeMeta = serde_json::from_value(object.clone()).expect("apiVersion and kind");
    let gvk = GroupVersionKind::try_from(&types).expect("a valid apiVersion");
    let (resource, capabilities) = discovery::pinned_kind(client, &gvk).await?;
    let name = object["metadata"]["name"].as_str().expect("metadata.name");
    let api: Api<DynamicObject> = match capabilities.scope {
        Scope::Cluster => Api::all_with(client.clone(), &resource),
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            object["metadata"]["namespace"]
                .as_str()
                .expect("namespaced objects name their namespace"),
            &resource,
        ),
    };
    let mut params = PatchParams::apply(field_manager);
    if dry_run {
        params = params.dry_run();
    }
    let applied = api.patch(name, &params, &Patch::Apply(object)).await?;
    Ok(serde_json::to_value(applied).expect("an object serializes"))
}

/// The agent DaemonSet's pod on `node` in `namespace`, named
/// `veil-agent-<node>`, as the scheduler leaves it: an object only (no
/// kubelet runs it), for tokens bound to it (see
/// [`crate::KubeApi::client_as_pod`]), which name its node.
pub fn agent_pod(namespace: &str, node: &str) -> Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("veil-agent-{node}"), "namespace": namespace},
        "spec": {
            "nodeName": node,
            "serviceAccountName": "veil-agent",
            "hostNetwork": true,
            "containers": [{"name": "agent", "image": "registry.invalid/veil:1"}]
        }
    })
}

/// Applies the CustomResourceDefinition in `path`, waits until it is
/// Established and its resource answers lists (right after Established the
/// API server answers 429 "storage is (re)initializing" for a moment).
///
/// # Panics
/// When the file is not one CRD, the API server refuses it, or it is not
/// servable within `wait`: the test cannot go on then.
pub async fn install_crd(
    client: &Client,
    path: &std::path::Path,
    field_manager: &str,
    wait: std::time::Duration,
) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::runtime::{conditions, wait::await_condition};

    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{} is not readable: {e}", path.display()));
    let [crd] = documents(&text)
        .try_into()
        .unwrap_or_else(|_| panic!("{} holds more than one document", path.display()));
    let applied = apply(client, &crd, field_manager, false)
        .await
        .unwrap_or_else(|e| panic!("the API server refuses {}: {e}", describe(&crd)));
    let name = applied["metadata"]["name"].as_str().expect("a CRD name");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    tokio::time::timeout(
        wait,
        await_condition(crds, name, conditions::is_crd_established()),
    )
    .await
    .unwrap_or_else(|_| panic!("CRD {name} is not Established within {wait:?}"))
    .expect("watching the CRD works");
    let (group, version, plural) = (
        applied["spec"]["group"].as_str().expect("spec.group"),
        applied["spec"]["versions"][0]["name"]
            .as_str()
            .expect("spec.versions"),
        applied["spec"]["names"]["plural"]
            .as_str()
            .expect("spec.names.plural"),
    );
    let list = format!("/apis/{group}/{version}/{plural}?limit=1");
    let started = std::time::Instant::now();
    loop {
        let request = http::Request::get(&list)
            .body(Vec::new())
            .expect("a valid request");
        match client.request_text(request).await {
            Ok(_) => return,
            Err(kube::Error::Api(response)) if response.code == 429 && started.elapsed() < wait => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(error) => panic!("listing {plural} after the CRD is Established: {error}"),
        }
    }
}
