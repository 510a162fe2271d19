//! Veil's Kubernetes objects against a real kube-apiserver (and etcd) on
//! loopback: the `ECDSACert` CRD, the deploy manifests, the RBAC they grant
//! and the admission policy that binds each agent to its own node (with a
//! real pod-bound service account token). No cluster, no kubelet: what the
//! API server itself validates, admits, stores and authorizes.
//!
//! The binaries come from `cargo xtask kube-binaries` (`cargo xtask test`
//! builds them). Each test is `#[ignore]`d with what it needs, so a plain
//! `cargo test` lists it as ignored; `cargo xtask test` runs them all, and a
//! test run without the binaries fails saying how to build them. Every test
//! starts its own API server, one at a time.
//!
//! The deploy manifests are rendered by the xtask binary itself
//! (`xtask deploy --dry-run`, found like the other workspace binaries through
//! `VEIL_BIN_DIR` or the target directory), so the test applies exactly what
//! `cargo xtask deploy` would, not a re-implementation of its renderer.

use std::{path::Path, process::Command, time::Duration};

use k8s_openapi::{
    api::{
        authorization::v1::{
            ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
        },
        core::v1::{Namespace, Node, Pod, Secret},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use veil_crd::{ECDSACert, ECDSACertSpec, ECDSACertStatus, IssuerKind, IssuerRef};
use veil_kubebed::objects::{describe, documents};

/// One API server at a time: each needs a few hundred MB and a core while it starts.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bound on every wait for the API server to act (CRD establishment).
const WAIT: Duration = Duration::from_secs(30);

/// The field manager of `cargo xtask deploy` is `veil-xtask`; the tests use their own.
const FIELD_MANAGER: &str = "veil";

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .expect("tests/e2e is two levels below the repository root")
}

/// Server-side applies `object` as the tests' field manager.
async fn apply(client: &Client, object: &Value, dry_run: bool) -> Result<Value, kube::Error> {
    veil_kubebed::objects::apply(client, object, FIELD_MANAGER, dry_run).await
}

/// Installs deploy/crds/ecdsacert.yaml and waits until it is Established.
async fn install_ecdsacert_crd(client: &Client) {
    veil_kubebed::objects::install_crd(
        client,
        &repo_root().join("deploy/crds/ecdsacert.yaml"),
        FIELD_MANAGER,
        WAIT,
    )
    .await;
}

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd: cargo xtask test runs it"]
async fn the_ecdsacert_crd_is_served_with_its_printer_columns() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let kube = veil_kubebed::start_for_test("the ECDSACert CRD test").await;
    let client = kube.client().await.expect("an admin client");
    install_ecdsacert_crd(&client).await;

    let certs: Api<ECDSACert> = Api::all(client.clone());
    let identity = "spiffe://cluster.local/ns/shop/sa/checkout";
    let mut cert = ECDSACert::new(
        "checkout-node1",
        ECDSACertSpec {
            identity: Some(identity.into()),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            csr: Some("-----BEGIN CERTIFICATE REQUEST-----\n…\n".into()),
            node_name: Some("node1".into()),
            issuer_ref: IssuerRef {
                kind: IssuerKind::LocalCA,
                name: "mesh-root".into(),
            },
            duration: Some("24h".into()),
            renew_before: None,
            secret_name: None,
        },
    );
    let created = certs
        .create(&PostParams::default(), &cert)
        .await
        .expect("the API server stores an ECDSACert");
    let read = certs.get("checkout-node1").await.expect("it reads back");
    assert_eq!(read.spec, cert.spec, "the spec survives the round trip");
    assert_eq!(read.uid(), created.uid());

    // Only the status subresource changes the status (the controller's path).
    cert.status = Some(ECDSACertStatus {
        conditions: vec![veil_crd::Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "Issued".into(),
            message: "signed by the mesh CA".into(),
            last_transition_time: "2026-01-01T00:00:00Z".into(),
        }],
        serial: Some("0a1b".into()),
        not_after: Some("2026-01-02T00:00:00Z".into()),
        ..ECDSACertStatus::default()
    });
    certs
        .patch_status(
            "checkout-node1",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": cert.status })),
        )
        .await
        .expect("the status subresource takes a status");

    // What `kubectl get ecdsacerts` shows: the server-side Table.
    let request = http::Request::get("/apis/veil.dev/v1alpha1/ecdsacerts")
        .header(
            http::header::ACCEPT,
            "application/json;as=Table;v=v1;g=meta.k8s.io",
        )
        .body(Vec::new())
        .unwrap();
    let table: Value = client.request(request).await.expect("a Table answer");
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .expect("columnDefinitions")
        .iter()
        .map(|column| column["name"].as_str().unwrap())
        .collect();
    for expected in [
        "Name",
        "Identity",
        "Issuer",
        "Ready",
        "Serial",
        "Not After",
        "Next Renewal",
        "Age",
    ] {
        assert!(
            columns.contains(&expected),
            "column {expected} missing: {columns:?}"
        );
    }
    let rows = table["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{table}");
    let cell = |name: &str| {
        let index = columns.iter().position(|column| *column == name).unwrap();
        rows[0]["cells"][index].clone()
    };
    assert_eq!(cell("Name"), json!("checkout-node1"));
    assert_eq!(cell("Identity"), json!(identity));
    assert_eq!(cell("Issuer"), json!("LocalCA"));
    assert_eq!(cell("Ready"), json!("True"));
    assert_eq!(cell("Serial"), json!("0a1b"));
}

/// `xtask deploy --dry-run <args>`'s output, from the xtask binary of this
/// build; panics (failing the test) when it is not built.
fn rendered_deploy_manifests(args: &[&str]) -> String {
    let xtask = veil_testbed::binaries::locate("xtask").unwrap_or_else(|error| {
        panic!("rendering the deploy manifests needs the xtask binary: {error}")
    });
    let output = Command::new(&xtask)
        .args(["deploy", "--dry-run"])
        .args(args)
        .output()
        .expect("the xtask binary runs");
    assert!(
        output.status.success(),
        "{} deploy --dry-run failed:\n{}",
        xtask.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 manifests")
}

/// Applies every object of the stream for real, in order; returns them.
async fn apply_all(client: &Client, stream: &str) -> Vec<Value> {
    let objects = documents(stream);
    for object in &objects {
        if let Err(error) = apply(client, object, false).await {
            panic!("applying {} failed: {error}", describe(object));
        }
    }
    objects
}

#[tokio::test]
#[ignore = "needs kube-apiserver, etcd and the xtask binary: cargo xtask test runs it"]
async fn every_deploy_manifest_is_accepted_by_the_api_server() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let stream = rendered_deploy_manifests(&["--secret-writing"]);
    let kube = veil_kubebed::start_for_test("the deploy manifests test").await;
    let client = kube.client().await.expect("an admin client");
    let objects = documents(&stream);
    assert!(objects.len() >= 10, "too few documents:\n{stream}");

    // Dry run (dryRun=All: validated, defaulted and admitted, nothing
    // stored), in the order `cargo xtask deploy` applies them. Namespaced
    // objects need their namespace to exist even in a dry run, and a dry run
    // of the Namespace does not create it: create it for real after its own
    // dry run, as a server-side `kubectl apply --dry-run=server` of the whole
    // stream would fail on a cluster without it.
    let mut refused = Vec::new();
    for object in &objects {
        match apply(&client, object, true).await {
            Ok(answer) => {
                assert_eq!(answer["kind"], object["kind"], "{}", describe(object));
                assert!(
                    answer["metadata"]["creationTimestamp"].is_string(),
                    "{}: the dry run was not admitted as a create: {answer}",
                    describe(object)
                );
            }
            Err(error) => refused.push(format!("{}: {error}", describe(object))),
        }
        if object["kind"] == "Namespace" {
            apply(&client, object, false)
                .await
                .expect("the namespace is created");
        }
    }
    assert!(
        refused.is_empty(),
        "the API server refused:\n{}",
        refused.join("\n")
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = namespaces.get("veil-system").await.unwrap();
    assert_eq!(
        namespace.labels().get("pod-security.kubernetes.io/enforce"),
        Some(&"privileged".to_owned())
    );
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(
        crds.get_opt("ecdsacerts.veil.dev").await.unwrap().is_none(),
        "a dry run stores nothing"
    );

    // For real, then again: server-side apply converges (nothing changes the
    // second time), which is what makes re-running `cargo xtask deploy` safe.
    let mut first = Vec::new();
    for object in &objects {
        let answer = apply(&client, object, false)
            .await
            .unwrap_or_else(|error| panic!("applying {}: {error}", describe(object)));
        first.push(answer);
    }
    for (object, before) in objects.iter().zip(&first) {
        let again = apply(&client, object, false)
            .await
            .unwrap_or_else(|error| panic!("re-applying {}: {error}", describe(object)));
        // The API server's own controllers write a CRD's status meanwhile
        // (Established), so for CRDs only the spec's generation must hold.
        let field = if object["kind"] == "CustomResourceDefinition" {
            "generation"
        } else {
            "resourceVersion"
        };
        assert_eq!(
            again["metadata"][field],
            before["metadata"][field],
            "{} changed ({field}) when applied a second time",
            describe(object)
        );
    }
}

/// Whether the client's own user may `verb` the `resource` (SelfSubjectAccessReview).
async fn can_i(
    client: &Client,
    verb: &str,
    group: &str,
    resource: &str,
    subresource: Option<&str>,
    namespace: Option<&str>,
) -> bool {
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource: subresource.map(Into::into),
                namespace: namespace.map(Into::into),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    reviews
        .create(&PostParams::default(), &review)
        .await
        .expect("a SelfSubjectAccessReview is answered")
        .status
        .expect("with a status")
        .allowed
}

fn is_forbidden(result: Result<impl Sized, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(response)) if response.code == 403)
}

#[tokio::test]
#[ignore = "needs kube-apiserver, etcd and the xtask binary: cargo xtask test runs it"]
async fn the_service_accounts_get_exactly_what_the_rbac_manifests_grant() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let stream = rendered_deploy_manifests(&[]);
    let kube = veil_kubebed::start_for_test("the RBAC test").await;
    let admin = kube.client().await.expect("an admin client");
    apply_all(&admin, &stream).await;
    install_ecdsacert_crd(&admin).await;

    let agent = kube
        .client_as_service_account("veil-system", "veil-agent")
        .await
        .expect("a client acting as the agent");
    let pods: Api<Pod> = Api::all(agent.clone());
    pods.list(&Default::default())
        .await
        .expect("the agent lists pods in every namespace");
    let nodes: Api<Node> = Api::all(agent.clone());
    nodes
        .list(&Default::default())
        .await
        .expect("the agent lists nodes");
    let agent_certs: Api<ECDSACert> = Api::all(agent.clone());
    agent_certs
        .list(&Default::default())
        .await
        .expect("the agent lists ECDSACerts");
    let secrets: Api<Secret> = Api::namespaced(agent.clone(), "veil-system");
    assert!(
        is_forbidden(secrets.list(&Default::default()).await),
        "the agent must not list Secrets"
    );
    assert!(
        is_forbidden(secrets.get("anything").await),
        "the agent must not read a Secret"
    );
    assert!(!can_i(&agent, "get", "", "secrets", None, None).await);
    assert!(
        !can_i(
            &agent,
            "update",
            "veil.dev",
            "ecdsacerts",
            Some("status"),
            None
        )
        .await
    );
    assert!(can_i(&agent, "create", "veil.dev", "ecdsacerts", None, None).await);
    assert!(can_i(&agent, "watch", "", "pods", None, None).await);
    assert!(!can_i(&agent, "delete", "", "pods", None, None).await);
    // Its own Node's underlay annotations; nodes cannot be made or removed.
    assert!(can_i(&agent, "patch", "", "nodes", None, None).await);
    assert!(!can_i(&agent, "delete", "", "nodes", None, None).await);
    assert!(!can_i(&agent, "create", "", "nodes", None, None).await);

    let controller = kube
        .client_as_service_account("veil-system", "veil-controller")
        .await
        .expect("a client acting as the controller");
    assert!(
        can_i(
            &controller,
            "update",
            "veil.dev",
            "ecdsacerts",
            Some("status"),
            None
        )
        .await
    );
    assert!(can_i(&controller, "create", "", "events", None, None).await);
    assert!(!can_i(&controller, "get", "", "secrets", None, None).await);
    assert!(!can_i(&controller, "create", "", "secrets", None, None).await);
    // Leader election only in Veil's own namespace.
    assert!(
        can_i(
            &controller,
            "update",
            "coordination.k8s.io",
            "leases",
            None,
            Some("veil-system")
        )
        .await
    );
    assert!(
        !can_i(
            &controller,
            "update",
            "coordination.k8s.io",
            "leases",
            None,
            Some("default")
        )
        .await
    );
    let secrets: Api<Secret> = Api::all(controller.clone());
    assert!(
        is_forbidden(secrets.list(&Default::default()).await),
        "the controller must not list Secrets without --secret-writing"
    );

    // With --secret-writing: the agent (which holds the keys) may write
    // Secrets and the controller (whose finalizer cleans up) delete them;
    // neither may read one.
    let opted_in = rendered_deploy_manifests(&["--secret-writing"]);
    apply_all(&admin, &opted_in).await;
    // The agent's rendered configuration turns it on (and parses).
    for (manifests, writes) in [(&stream, false), (&opted_in, true)] {
        let config_map = documents(manifests)
            .into_iter()
            .find(|o| o["kind"] == "ConfigMap" && o["data"]["agent.toml"].is_string())
            .expect("the agent's ConfigMap");
        let text = config_map["data"]["agent.toml"].as_str().unwrap();
        let config = veil_agent::config::AgentConfig::parse(text, Path::new("agent.toml")).unwrap();
        assert_eq!(config.mesh.unwrap().write_tls_secrets, writes, "{text}");
    }
    for verb in ["create", "patch"] {
        assert!(
            can_i(&agent, verb, "", "secrets", None, Some("shop")).await,
            "agent {verb}"
        );
        assert!(
            !can_i(&controller, verb, "", "secrets", None, Some("shop")).await,
            "controller {verb}"
        );
    }
    assert!(can_i(&controller, "delete", "", "secrets", None, Some("shop")).await);
    assert!(!can_i(&agent, "delete", "", "secrets", None, Some("shop")).await);
    for verb in ["get", "list", "watch"] {
        assert!(
            !can_i(&agent, verb, "", "secrets", None, Some("shop")).await,
            "agent {verb}"
        );
        assert!(
            !can_i(&controller, verb, "", "secrets", None, Some("shop")).await,
            "controller {verb}"
        );
    }

    // A ServiceAccount the manifests do not mention gets nothing.
    let stranger = kube
        .client_as_service_account("veil-system", "default")
        .await
        .unwrap();
    let stranger_pods: Api<Pod> = Api::all(stranger);
    assert!(is_forbidden(stranger_pods.list(&Default::default()).await));
}

/// Polls `name` until `check` accepts its status, bounded by [`WAIT`].
async fn wait_for_status(
    certs: &Api<ECDSACert>,
    name: &str,
    check: impl Fn(&ECDSACertStatus) -> bool,
) -> ECDSACert {
    let started = std::time::Instant::now();
    loop {
        if let Ok(cert) = certs.get(name).await
            && cert.status.as_ref().is_some_and(&check)
        {
            return cert;
        }
        assert!(
            started.elapsed() < WAIT,
            "{name}: status not reached within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn condition<'a>(status: &'a ECDSACertStatus, type_: &str) -> Option<&'a veil_crd::Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// A meshed pod of `service_account` in `namespace`, scheduled on `node` as
/// the scheduler would leave it (no kubelet runs here): what entitles that
/// node's agent to the identity. Makes the namespace and service account too.
async fn schedule_meshed_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    service_account: &str,
    node: &str,
) {
    let objects = [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": service_account, "namespace": namespace}}),
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace,
                         "annotations": {"veil.dev/mtls": "enabled"}},
            "spec": {
                "nodeName": node,
                "serviceAccountName": service_account,
                "automountServiceAccountToken": false,
                "containers": [{"name": "app", "image": "registry.invalid/app:1"}]
            }
        }),
    ];
    for object in &objects {
        apply(client, object, false)
            .await
            .unwrap_or_else(|error| panic!("{}: {error}", describe(object)));
    }
}

/// `veil-controller`'s reconciler, in this process, signing with a new mesh CA.
struct Controller {
    root_pem: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Controller {
    fn start(client: &Client) -> Self {
        use veil_controller::{
            issuance::{DEFAULT_DURATION, LocalIssuer},
            reconcile::{self, Context},
        };
        use veil_identity::{CertificateAuthority, renewal::RenewalPolicy};

        let ca = CertificateAuthority::generate("cluster.local", DEFAULT_DURATION).unwrap();
        let root_pem = ca.root_pem().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(reconcile::run(
            Context {
                client: client.clone(),
                issuer: LocalIssuer {
                    ca,
                    renewal: RenewalPolicy::default(),
                },
            },
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            root_pem,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd: cargo xtask test runs it"]
async fn the_controller_signs_an_agents_csr_and_refuses_a_foreign_one() {
    use veil_controller::lease::LeaseLock;
    use veil_identity::{SpiffeId, WorkloadKey};

    let _serial = ONE_AT_A_TIME.lock().await;
    let kube = veil_kubebed::start_for_test("the ECDSACert controller test").await;
    let client = kube.client().await.expect("an admin client");
    install_ecdsacert_crd(&client).await;

    // Leader election: of two replicas, one holds the lease.
    let first = LeaseLock::new(client.clone(), "default", "veil-controller", "replica-a");
    let second = LeaseLock::new(client.clone(), "default", "veil-controller", "replica-b");
    assert!(
        first.try_acquire().await.expect("lease API"),
        "the first replica leads"
    );
    assert!(
        !second.try_acquire().await.expect("lease API"),
        "only one leader"
    );
    assert!(
        first.try_acquire().await.expect("lease API"),
        "the leader renews"
    );

    let controller = Controller::start(&client);
    let root = controller.root_pem.clone();
    // node1 runs cart and admin.
    schedule_meshed_pod(&client, "shop", "cart-1", "cart", "node1").await;
    schedule_meshed_pod(&client, "shop", "admin-1", "admin", "node1").await;

    // What a node agent does: a key that stays home, a CSR in the spec.
    let identity: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
    let key = WorkloadKey::generate().unwrap();
    let request = |name: &str, identity: &str, csr: String| {
        ECDSACert::new(name, ECDSACertSpec::workload(identity, "node1", Some(csr)))
    };
    let certs: Api<ECDSACert> = Api::all(client.clone());
    certs
        .create(
            &PostParams::default(),
            &request(
                "cart.node1",
                &identity.to_string(),
                key.csr_pem(&identity).unwrap(),
            ),
        )
        .await
        .expect("an agent may write its CSR");
    let issued = wait_for_status(&certs, "cart.node1", |s| {
        condition(s, "Ready").is_some_and(|c| c.status == "True")
    })
    .await;
    let status = issued.status.clone().unwrap();
    let chain = status
        .certificate_chain
        .expect("the chain is in the status");
    use rustls::pki_types::pem::PemObject;
    let leaf = rustls::pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
        .next()
        .expect("a leaf")
        .expect("PEM");
    assert_eq!(
        veil_identity::verify::spiffe_id_of(&leaf).unwrap(),
        identity,
        "the certificate carries the requested identity"
    );
    assert!(
        chain.len() > root.len() / 2 && !chain.contains(&root),
        "leaf + intermediate, no root"
    );
    assert!(status.next_renewal.is_some() && status.serial.is_some());
    assert!(
        issued.finalizers().is_empty(),
        "no Secret to clean up, so no finalizer (a write less per certificate): {:?}",
        issued.finalizers()
    );

    // A CSR for another identity than the spec names is refused, with the reason.
    let other: SpiffeId = "spiffe://cluster.local/ns/shop/sa/admin".parse().unwrap();
    certs
        .create(
            &PostParams::default(),
            &request(
                "admin.node1",
                &other.to_string(),
                key.csr_pem(&identity).unwrap(),
            ),
        )
        .await
        .unwrap();
    let refused = wait_for_status(&certs, "admin.node1", |s| {
        condition(s, "Failed").is_some_and(|c| c.status == "True")
    })
    .await;
    let refused = refused.status.unwrap();
    assert_eq!(
        condition(&refused, "Failed").unwrap().reason,
        "SigningRefused"
    );
    assert_eq!(condition(&refused, "Ready").unwrap().status, "False");
    assert!(refused.certificate_chain.is_none());

    // Deleting goes through the finalizer and the object is gone.
    certs
        .delete("cart.node1", &Default::default())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    while certs.get_opt("cart.node1").await.unwrap().is_some() {
        assert!(started.elapsed() < WAIT, "the finalizer never let go");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    controller.stop().await;
}

#[tokio::test]
#[ignore = "needs kube-apiserver, etcd and the xtask binary: cargo xtask test runs it"]
async fn the_agent_gets_its_workload_certificates_from_the_controller() {
    use veil_agent::mesh::{signer::KubernetesSigner, workloads::WorkloadStore};
    use veil_identity::SpiffeId;

    let _serial = ONE_AT_A_TIME.lock().await;
    let stream = rendered_deploy_manifests(&[]);
    let kube = veil_kubebed::start_for_test("the agent's Kubernetes issuer test").await;
    let client = kube.client().await.expect("an admin client");
    // The agent acts with its pod's token, under the deployed RBAC and
    // admission policy.
    let config = deploy_with_agent_on_node1(&kube, &client, &stream).await;
    let controller = Controller::start(&client);
    let root = controller.root_pem.clone();

    // The agent's side runs on plain threads (as in the agent); its signer
    // has its own runtime, made and dropped off this test's async runtime.
    schedule_meshed_pod(&client, "shop", "cart-1", "cart", "node1").await;
    let identity: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
    let wanted = identity.clone();
    let (serial, issuer, object) = tokio::task::spawn_blocking(move || {
        let signer =
            KubernetesSigner::from_config(config, "node1", Duration::from_secs(30)).unwrap();
        let object = signer.object_name(&wanted);
        let store = WorkloadStore::with_signer(
            Box::new(signer),
            "cluster.local".into(),
            vec![root],
            veil_mtls::TlsSettings::default(),
        );
        let workload = store
            .get(&wanted)
            .expect("the controller signs the agent's CSR");
        let again = store.get(&wanted).unwrap();
        assert_eq!(again.serial, workload.serial, "held until renewal time");
        // The chain verifies against the mesh root with the right identity.
        let leaf = &workload.credentials.chain[0];
        assert_eq!(veil_identity::verify::spiffe_id_of(leaf).unwrap(), wanted);
        (workload.serial.clone(), store.issuer_name(), object)
    })
    .await
    .unwrap();
    assert_eq!(object, "cart.shop.node1");
    assert!(issuer.contains("veil-controller"), "{issuer}");
    let certs: Api<ECDSACert> = Api::all(client.clone());
    let stored = certs
        .get(&object)
        .await
        .expect("the agent wrote its ECDSACert");
    assert_eq!(
        stored.spec.identity.as_deref(),
        Some(identity.to_string().as_str())
    );
    assert_eq!(
        stored.labels().get("veil.dev/node").map(String::as_str),
        Some("node1"),
        "labelled for the node's one watch on its ECDSACerts"
    );
    assert!(
        stored
            .spec
            .csr
            .as_deref()
            .is_some_and(|c| c.contains("CERTIFICATE REQUEST")),
        "only the CSR travels"
    );
    assert!(
        !serde_json::to_string(&stored)
            .unwrap()
            .contains("PRIVATE KEY"),
        "no key material in the API server"
    );
    assert_eq!(
        stored.status.unwrap().serial.as_deref(),
        Some(serial.as_str())
    );
    controller.stop().await;
}

#[tokio::test]
#[ignore = "needs kube-apiserver and etcd: cargo xtask test runs it"]
async fn a_tls_secret_is_written_only_when_asked_and_goes_with_its_ecdsacert() {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    use veil_agent::mesh::{signer::KubernetesSigner, workloads::WorkloadStore};
    use veil_identity::SpiffeId;

    let _serial = ONE_AT_A_TIME.lock().await;
    let kube = veil_kubebed::start_for_test("the agent's Secret-writing test").await;
    let client = kube.client().await.expect("an admin client");
    install_ecdsacert_crd(&client).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap(),
        )
        .await
        .expect("namespace shop");
    let controller = Controller::start(&client);
    let root = controller.root_pem.clone();
    schedule_meshed_pod(&client, "shop", "cart-1", "cart", "node1").await;
    schedule_meshed_pod(&client, "shop", "checkout-1", "checkout", "node1").await;

    // cart's store writes Secrets (opted in); checkout's does not (default).
    let config = kube.config();
    let cart: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
    let checkout: SpiffeId = "spiffe://cluster.local/ns/shop/sa/checkout"
        .parse()
        .unwrap();
    let (wanted, other) = (cart.clone(), checkout.clone());
    let (serial, chain, secret_name) = tokio::task::spawn_blocking(move || {
        let store = |tls_secrets: bool| {
            let signer =
                KubernetesSigner::from_config(config.clone(), "node1", Duration::from_secs(30))
                    .unwrap();
            let signer = if tls_secrets {
                signer.with_tls_secrets(vec![root.clone()])
            } else {
                signer
            };
            let name = signer.secret_name(&wanted);
            (
                WorkloadStore::with_signer(
                    Box::new(signer),
                    "cluster.local".into(),
                    vec![root.clone()],
                    veil_mtls::TlsSettings::default(),
                ),
                name,
            )
        };
        let (writing, secret_name) = store(true);
        let workload = writing.get(&wanted).expect("cart signed");
        let (plain, _) = store(false);
        plain.get(&other).expect("checkout signed");
        (
            workload.serial.clone(),
            workload.credentials.chain.clone(),
            secret_name,
        )
    })
    .await
    .unwrap();
    assert_eq!(secret_name, "veil-tls.cart.node1");

    let secrets: Api<Secret> = Api::namespaced(client.clone(), "shop");
    let secret = secrets.get(&secret_name).await.expect("cart's Secret");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(
        secret.annotations().get("veil.dev/serial"),
        Some(&serial),
        "the Secret holds the certificate in use"
    );
    let data = secret.data.clone().unwrap();
    let field = |name: &str| String::from_utf8(data[name].0.clone()).unwrap();
    let written_chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(field("tls.crt").as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    assert_eq!(written_chain, chain, "tls.crt is the chain in use");
    let key = PrivateKeyDer::from_pem_slice(field("tls.key").as_bytes()).expect("a PEM key");
    rustls::sign::CertifiedKey::from_der(
        written_chain,
        key,
        &rustls::crypto::ring::default_provider(),
    )
    .expect("tls.key belongs to tls.crt");
    assert_eq!(field("ca.crt"), controller.root_pem);
    // Only the identity that asked has one, and its ECDSACert names it.
    let ours = secrets
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/managed-by=veil-agent"))
        .await
        .unwrap();
    assert_eq!(
        ours.items.iter().map(|s| s.name_any()).collect::<Vec<_>>(),
        std::slice::from_ref(&secret_name)
    );
    let certs: Api<ECDSACert> = Api::all(client.clone());
    let object = certs.get("cart.shop.node1").await.unwrap();
    assert_eq!(
        object.spec.secret_name.as_deref(),
        Some(secret_name.as_str())
    );
    assert!(
        object
            .finalizers()
            .iter()
            .any(|f| f == veil_controller::reconcile::FINALIZER),
        "the controller owns the Secret's cleanup: {:?}",
        object.finalizers()
    );
    assert!(
        certs
            .get("checkout.shop.node1")
            .await
            .unwrap()
            .spec
            .secret_name
            .is_none()
    );

    // Deleting the ECDSACert removes the Secret (the controller's finalizer).
    certs
        .delete("cart.shop.node1", &Default::default())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    while secrets.get_opt(&secret_name).await.unwrap().is_some() {
        assert!(
            started.elapsed() < WAIT,
            "the Secret outlived its ECDSACert"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("ECDSACert deleted → Secret gone: {:?}", started.elapsed());
    controller.stop().await;
}

/// Deploys the rendered manifests (CRDs, RBAC, the admission policy), two
/// Nodes and the agent DaemonSet's pod on node1 (no kubelet runs it: its
/// token is bound to the object, which names the node), and waits (bounded)
/// until the policy is in force — it takes effect a moment after it is
/// stored. Returns the client configuration of node1's agent: a real
/// pod-bound service account token.
async fn deploy_with_agent_on_node1(
    kube: &veil_kubebed::KubeApi,
    admin: &Client,
    manifests: &str,
) -> kube::Config {
    apply_all(admin, manifests).await;
    install_ecdsacert_crd(admin).await;
    for node in ["node1", "node2"] {
        let object = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}});
        apply(admin, &object, false).await.expect("a node");
    }
    let agent_pod = veil_kubebed::objects::agent_pod("veil-system", "node1");
    apply(admin, &agent_pod, false)
        .await
        .expect("the agent's pod");
    let config = kube
        .config_as_pod("veil-system", "veil-agent-node1")
        .await
        .expect("a token bound to the agent's pod");
    // In force once a dry run of a request for node2 is refused.
    let certs: Api<ECDSACert> = Api::all(Client::try_from(config.clone()).unwrap());
    let foreign = ECDSACert::new(
        "probe.shop.node2",
        ECDSACertSpec::workload("spiffe://cluster.local/ns/shop/sa/probe", "node2", None),
    );
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let started = std::time::Instant::now();
    loop {
        match certs.create(&dry_run, &foreign).await {
            Err(error) if policy_refusal(&error).is_some() => return config,
            Ok(_) => {}
            Err(error) => panic!("unexpected answer to the agent's dry run: {error}"),
        }
        assert!(
            started.elapsed() < WAIT,
            "the admission policy took no effect within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The message of a refusal by Veil's admission policy, `None` for any
/// other error.
fn policy_refusal(error: &kube::Error) -> Option<&str> {
    match error {
        kube::Error::Api(response)
            if response.code == 403 && response.message.contains("veil-agent-own-node") =>
        {
            Some(&response.message)
        }
        _ => None,
    }
}

/// What the API server answered a request the admission policy should
/// refuse: its message, or a panic naming what happened instead.
fn refused_by_policy<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>) -> String {
    let message = result.as_ref().err().and_then(policy_refusal);
    match message {
        Some(message) => message.to_owned(),
        None => panic!("{what}: expected a refusal by veil-agent-own-node, got {result:?}"),
    }
}

#[tokio::test]
#[ignore = "needs kube-apiserver, etcd and the xtask binary: cargo xtask test runs it"]
async fn an_agent_acts_only_for_its_own_node_and_gets_only_the_identities_scheduled_there() {
    use veil_identity::{SpiffeId, WorkloadKey};

    let _serial = ONE_AT_A_TIME.lock().await;
    let stream = rendered_deploy_manifests(&[]);
    let kube = veil_kubebed::start_for_test("the agent's own-node test").await;
    let admin = kube.client().await.expect("an admin client");
    let agent = Client::try_from(deploy_with_agent_on_node1(&kube, &admin, &stream).await)
        .expect("a client with the agent's token");
    // cart runs on node1, checkout on node2.
    schedule_meshed_pod(&admin, "shop", "cart-1", "cart", "node1").await;
    schedule_meshed_pod(&admin, "shop", "checkout-1", "checkout", "node2").await;
    let controller = Controller::start(&admin);

    let key = WorkloadKey::generate().unwrap();
    let request = |service_account: &str, name: &str, node: &str| {
        let identity: SpiffeId = format!("spiffe://cluster.local/ns/shop/sa/{service_account}")
            .parse()
            .unwrap();
        let mut cert = ECDSACert::new(
            name,
            ECDSACertSpec::workload(
                identity.to_string(),
                node,
                Some(key.csr_pem(&identity).unwrap()),
            ),
        );
        cert.metadata.labels = Some([(veil_crd::NODE_LABEL.to_owned(), node.to_owned())].into());
        cert
    };
    let certs: Api<ECDSACert> = Api::all(agent.clone());
    let create = PostParams::default();
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let message = refused_by_policy(
        "another node's request",
        certs
            .create(
                &dry_run,
                &request("checkout", "checkout.shop.node2", "node2"),
            )
            .await,
    );
    assert!(
        message.contains("may only write ECDSACerts named <service account>.<namespace>.node1"),
        "{message}"
    );

    // Its own node's request, for a workload running there: admitted and signed.
    certs
        .create(&create, &request("cart", "cart.shop.node1", "node1"))
        .await
        .expect("the agent writes its own node's request");
    let signed = wait_for_status(&Api::all(admin.clone()), "cart.shop.node1", |s| {
        condition(s, "Ready").is_some_and(|c| c.status == "True")
    })
    .await;
    assert!(signed.status.unwrap().certificate_chain.is_some());

    // Its own node's name, another node in the spec: refused.
    let message = refused_by_policy(
        "spec.nodeName of another node",
        certs
            .create(
                &create,
                &request("checkout", "checkout.shop.node1", "node2"),
            )
            .await,
    );
    assert!(message.contains("spec.nodeName: node1"), "{message}");

    // Asking for a workload of another node under its own name: admitted,
    // but the controller refuses to sign (checkout runs on node2).
    certs
        .create(
            &create,
            &request("checkout", "checkout.shop.node1", "node1"),
        )
        .await
        .expect("admitted: the request names the agent's own node");
    let refused = wait_for_status(&Api::all(admin.clone()), "checkout.shop.node1", |s| {
        condition(s, "Failed").is_some_and(|c| c.status == "True")
    })
    .await
    .status
    .unwrap();
    let failed = condition(&refused, "Failed").unwrap();
    assert_eq!(failed.reason, "WorkloadNotOnNode", "{}", failed.message);
    assert!(
        failed.message.contains("checkout") && failed.message.contains("node1"),
        "{}",
        failed.message
    );
    assert!(refused.certificate_chain.is_none());

    // node2's own request, made by its agent (here the admin): node1's agent
    // may neither change nor delete it.
    Api::<ECDSACert>::all(admin.clone())
        .create(
            &create,
            &request("checkout", "checkout.shop.node2", "node2"),
        )
        .await
        .expect("the admin writes node2's request");
    let relabel = json!({"spec": {"nodeName": "node1"}});
    refused_by_policy(
        "changing node2's request",
        certs
            .patch(
                "checkout.shop.node2",
                &PatchParams::default(),
                &Patch::Merge(&relabel),
            )
            .await,
    );
    refused_by_policy(
        "deleting node2's request",
        certs
            .delete("checkout.shop.node2", &Default::default())
            .await,
    );
    // Its own it may delete (a pod that left the node).
    certs
        .delete("checkout.shop.node1", &Default::default())
        .await
        .expect("the agent deletes its own node's request");

    // Credentials that name no node (the service account impersonated, not
    // a pod's token) are refused outright.
    let unbound = kube
        .client_as_service_account("veil-system", "veil-agent")
        .await
        .unwrap();
    let message = refused_by_policy(
        "a token without a node",
        Api::<ECDSACert>::all(unbound)
            .create(&dry_run, &request("cart", "cart.shop.node1", "node1"))
            .await,
    );
    assert!(message.contains("name no node"), "{message}");

    // Nodes: Veil's annotations on its own Node, nothing else.
    let nodes: Api<Node> = Api::all(agent.clone());
    let annotate = |key: &str| json!({"metadata": {"annotations": {key: "198.18.0.1"}}});
    nodes
        .patch(
            "node1",
            &PatchParams::default(),
            &Patch::Merge(&annotate("veil.dev/underlay-ip")),
        )
        .await
        .expect("the agent announces its underlay address on its own Node");
    let message = refused_by_policy(
        "another node's annotation",
        nodes
            .patch(
                "node2",
                &PatchParams::default(),
                &Patch::Merge(&annotate("veil.dev/underlay-ip")),
            )
            .await,
    );
    assert!(message.contains("its own Node, not node2"), "{message}");
    refused_by_policy(
        "a foreign annotation on its own Node",
        nodes
            .patch(
                "node1",
                &PatchParams::default(),
                &Patch::Merge(&annotate("example.com/owner")),
            )
            .await,
    );
    refused_by_policy(
        "a label on its own Node",
        nodes
            .patch(
                "node1",
                &PatchParams::default(),
                &Patch::Merge(&json!({"metadata": {"labels": {"role": "ingress"}}})),
            )
            .await,
    );
    refused_by_policy(
        "its own Node's spec",
        nodes
            .patch(
                "node1",
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"unschedulable": true}})),
            )
            .await,
    );
    controller.stop().await;
}
