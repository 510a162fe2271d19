//! Who signs the node's workload CSRs.
//!
//! - [`LocalCaSigner`]: the agent holds the mesh root and signs itself (bare
//!   hosts, the demo, and until a cluster runs the controller).
//! - [`KubernetesSigner`]: the agent writes the CSR into an `ECDSACert`
//!   (`<sa>.<ns>.<node>`, cluster-scoped) with server-side apply and waits
//!   for `veil-controller` to put the chain into its status — the key never
//!   leaves the node, and no node holds the CA key. Only when asked
//!   (`[mesh] write_tls_secrets`) does it also write the certificate and key
//!   into a `kubernetes.io/tls` Secret, for workloads that read files.

use std::time::{Duration, SystemTime};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams},
};
use veil_crd::{ECDSACert, ECDSACertSpec, ECDSACertStatus, csr_sha256};
use veil_identity::{CertificateAuthority, IssuedCertificate, SpiffeId, WorkloadKey};

use super::answers;

/// Signs a CSR for an identity.
pub trait Signer: Send + Sync {
    fn sign(&self, identity: &SpiffeId, csr_pem: &str) -> Result<IssuedCertificate, String>;
    /// Who signs, for `veilctl certs`.
    fn describe(&self) -> String;
    /// Told of each certificate once it is in use, with its key: where the
    /// user asked for a `kubernetes.io/tls` Secret, it is written here.
    fn issued(
        &self,
        _identity: &SpiffeId,
        _issued: &IssuedCertificate,
        _key: &WorkloadKey,
    ) -> Result<(), String> {
        Ok(())
    }
}

pub struct LocalCaSigner(pub CertificateAuthority);

impl Signer for LocalCaSigner {
    fn sign(&self, identity: &SpiffeId, csr_pem: &str) -> Result<IssuedCertificate, String> {
        self.0.sign(csr_pem, identity).map_err(|e| e.to_string())
    }

    fn describe(&self) -> String {
        format!("local CA ({})", self.0.trust_domain())
    }
}

/// Field manager of the agent's writes.
const MANAGER: &str = "veil-agent";

pub struct KubernetesSigner {
    client: Client,
    runtime: tokio::runtime::Runtime,
    node: String,
    /// How long to wait for the controller.
    timeout: Duration,
    /// Write each certificate and key into a `kubernetes.io/tls` Secret.
    tls_secrets: bool,
    /// The mesh roots (PEM), for the Secret's `ca.crt`.
    trust_bundle: Vec<String>,
    /// This node's `ECDSACert`s from one watch (`None` when the node's name
    /// cannot be a label value: then a watch per request).
    answers: Option<answers::Answers>,
}

fn signer_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kube-signer")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the signer's runtime: {e}"))
}

impl KubernetesSigner {
    fn new(
        client: Client,
        runtime: tokio::runtime::Runtime,
        node: &str,
        timeout: Duration,
    ) -> Self {
        let answers = answers::usable_as_label(node)
            .then(|| answers::Answers::start(runtime.handle(), client.clone(), node));
        Self {
            client,
            runtime,
            node: node.into(),
            timeout,
            tls_secrets: false,
            trust_bundle: Vec::new(),
            answers,
        }
    }

    /// A signer talking to the API server `config` names. The client is made
    /// on the signer's own runtime, where its connection tasks then live.
    /// Call from a plain thread, not an async task.
    pub fn from_config(
        config: kube::Config,
        node: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let runtime = signer_runtime()?;
        let client = runtime
            .block_on(async { Client::try_from(config) })
            .map_err(|e| format!("cannot make a Kubernetes client: {e}"))?;
        Ok(Self::new(client, runtime, node, timeout))
    }

    /// A signer with the client from `kubeconfig`, else the environment
    /// (in-cluster service account, or `KUBECONFIG`). Call from a plain
    /// thread, not an async task.
    pub fn from_kubeconfig(
        kubeconfig: Option<&std::path::Path>,
        node: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let runtime = signer_runtime()?;
        let client = runtime
            .block_on(async {
                let config = crate::kubernetes::client_config(kubeconfig)
                    .await
                    .map_err(|e| e.to_string())?;
                Client::try_from(config).map_err(|e| e.to_string())
            })
            .map_err(|e| format!("cannot reach the Kubernetes API: {e}"))?;
        Ok(Self::new(client, runtime, node, timeout))
    }

    /// Also write a `kubernetes.io/tls` Secret per certificate (`tls.crt`,
    /// `tls.key`, `ca.crt` = `trust_bundle`) in the workload's namespace.
    pub fn with_tls_secrets(mut self, trust_bundle: Vec<String>) -> Self {
        self.tls_secrets = true;
        self.trust_bundle = trust_bundle;
        self
    }

    /// The Secret written for `identity` on this node, when asked for.
    pub fn secret_name(&self, identity: &SpiffeId) -> String {
        format!("veil-tls.{}.{}", identity.service_account(), self.node).to_lowercase()
    }

    /// The `ECDSACert` name for `identity` on this node (a DNS subdomain).
    pub fn object_name(&self, identity: &SpiffeId) -> String {
        format!(
            "{}.{}.{}",
            identity.service_account(),
            identity.namespace(),
            self.node
        )
        .to_lowercase()
    }

    async fn request(
        &self,
        identity: &SpiffeId,
        csr_pem: &str,
    ) -> Result<IssuedCertificate, String> {
        let api: Api<ECDSACert> = Api::all(self.client.clone());
        let name = self.object_name(identity);
        let digest = csr_sha256(csr_pem);
        let mut spec =
            ECDSACertSpec::workload(identity.to_string(), &self.node, Some(csr_pem.into()));
        // Named in the request so the controller's finalizer removes it.
        spec.secret_name = self.tls_secrets.then(|| self.secret_name(identity));
        let mut request = ECDSACert::new(&name, spec);
        if self.answers.is_some() {
            request.metadata.labels = Some(
                [(answers::NODE_LABEL.to_string(), self.node.clone())]
                    .into_iter()
                    .collect(),
            );
        }
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&request),
        )
        .await
        .map_err(|e| format!("cannot write ECDSACert {name}: {e}"))?;
        // Wait (no polling) until the controller answers this CSR: a chain,
        // or a refusal.
        let answer = |status: &ECDSACertStatus| -> Option<Result<IssuedCertificate, String>> {
            if status.csr_sha256.as_deref() != Some(digest.as_str()) {
                return None;
            }
            let condition = |type_: &str| status.conditions.iter().find(|c| c.type_ == type_);
            if let Some(failed) = condition("Failed").filter(|c| c.status == "True") {
                return Some(Err(format!(
                    "the controller refused ECDSACert {name}: {}: {}",
                    failed.reason, failed.message
                )));
            }
            let (Some(chain), Some(serial), Some(not_before), Some(not_after)) = (
                status.certificate_chain.clone(),
                status.serial.clone(),
                status.not_before.as_deref().and_then(parse_time),
                status.not_after.as_deref().and_then(parse_time),
            ) else {
                return None;
            };
            Some(Ok(IssuedCertificate {
                identity: identity.clone(),
                chain_pem: chain,
                serial,
                not_before,
                not_after,
            }))
        };
        let not_signed = || {
            format!(
                "ECDSACert {name} not signed within {:?}: is veil-controller running?",
                self.timeout
            )
        };
        if let Some(answers) = &self.answers {
            let deadline = tokio::time::Instant::now() + self.timeout;
            return answers
                .wait_for(&name, deadline, |cert| {
                    cert.status.as_ref().and_then(answer)
                })
                .await
                .unwrap_or_else(|| Err(not_signed()));
        }
        let answered = |cert: Option<&ECDSACert>| {
            cert.and_then(|c| c.status.as_ref())
                .is_some_and(|status| answer(status).is_some())
        };
        let current = tokio::time::timeout(
            self.timeout,
            kube::runtime::wait::await_condition(api, &name, answered),
        )
        .await
        .map_err(|_| not_signed())?
        .map_err(|e| format!("cannot watch ECDSACert {name}: {e}"))?
        .ok_or_else(|| format!("ECDSACert {name} was deleted before it was signed"))?;
        current
            .status
            .as_ref()
            .and_then(answer)
            .unwrap_or_else(|| Err(format!("ECDSACert {name} has no answer for this CSR")))
    }

    /// Writes (server-side apply) the Secret with `issued`'s chain and key.
    async fn write_secret(
        &self,
        identity: &SpiffeId,
        issued: &IssuedCertificate,
        key: &WorkloadKey,
    ) -> Result<(), String> {
        let name = self.secret_name(identity);
        let namespace = identity.namespace();
        let key_pem = key.pkcs8_pem().map_err(|e| e.to_string())?;
        let data = [
            ("tls.crt", issued.chain_pem.as_bytes().to_vec()),
            ("tls.key", key_pem.as_bytes().to_vec()),
            ("ca.crt", self.trust_bundle.concat().into_bytes()),
        ]
        .into_iter()
        .map(|(field, bytes)| (field.to_string(), ByteString(bytes)))
        .collect();
        let mut secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.to_string()),
                labels: Some(
                    [
                        ("app.kubernetes.io/managed-by", "veil-agent"),
                        ("veil.dev/node", self.node.as_str()),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ),
                annotations: Some(
                    [
                        ("veil.dev/identity", identity.to_string()),
                        ("veil.dev/serial", issued.serial.clone()),
                        ("veil.dev/ecdsacert", self.object_name(identity)),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Secret::default()
        };
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let written = secrets
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await;
        // The copies of the key in the request are wiped, as the key is.
        for value in secret.data.iter_mut().flat_map(|data| data.values_mut()) {
            zeroize::Zeroize::zeroize(&mut value.0);
        }
        written.map_err(|e| format!("cannot write Secret {namespace}/{name}: {e}"))?;
        tracing::info!(secret = %name, namespace, serial = %issued.serial, "kubernetes.io/tls Secret written");
        Ok(())
    }
}

fn parse_time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(text).ok()
}

impl Signer for KubernetesSigner {
    fn sign(&self, identity: &SpiffeId, csr_pem: &str) -> Result<IssuedCertificate, String> {
        self.runtime.block_on(self.request(identity, csr_pem))
    }

    fn describe(&self) -> String {
        "veil-controller (ECDSACert)".into()
    }

    fn issued(
        &self,
        identity: &SpiffeId,
        issued: &IssuedCertificate,
        key: &WorkloadKey,
    ) -> Result<(), String> {
        if !self.tls_secrets {
            return Ok(());
        }
        self.runtime
            .block_on(self.write_secret(identity, issued, key))
    }
}
