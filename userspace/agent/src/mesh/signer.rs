//! Who signs the node's workload CSRs.
//!
//! - [`LocalCaSigner`]: the agent holds the mesh root and signs itself (bare
//!   hosts, the demo, and until a cluster runs the controller).
//! - [`KubernetesSigner`]: the agent writes the CSR into an `ECDSACert`
//!   (`<sa>.<ns>.<node>`, cluster-scoped) with server-side apply and waits
//!   for `veil-controller` to put the chain into its status — the key never
//!   leaves the node, and no node holds the CA key.

use std::time::{Duration, Instant, SystemTime};

use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use veil_crd::{ECDSACert, ECDSACertSpec, csr_sha256};
use veil_identity::{CertificateAuthority, IssuedCertificate, SpiffeId};

/// Signs a CSR for an identity.
pub trait Signer: Send + Sync {
    fn sign(&self, identity: &SpiffeId, csr_pem: &str) -> Result<IssuedCertificate, String>;
    /// Who signs, for `veilctl certs`.
    fn describe(&self) -> String;
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
        Ok(Self {
            client,
            runtime,
            node: node.into(),
            timeout,
        })
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
        Ok(Self {
            client,
            runtime,
            node: node.into(),
            timeout,
        })
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
        let request = ECDSACert::new(
            &name,
            ECDSACertSpec::workload(identity.to_string(), Some(csr_pem.into())),
        );
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&request),
        )
        .await
        .map_err(|e| format!("cannot write ECDSACert {name}: {e}"))?;
        let started = Instant::now();
        loop {
            let current = api
                .get(&name)
                .await
                .map_err(|e| format!("cannot read ECDSACert {name}: {e}"))?;
            if let Some(status) = current.status
                && status.csr_sha256.as_deref() == Some(digest.as_str())
            {
                let condition = |type_: &str| status.conditions.iter().find(|c| c.type_ == type_);
                if let Some(failed) = condition("Failed").filter(|c| c.status == "True") {
                    return Err(format!(
                        "the controller refused ECDSACert {name}: {}: {}",
                        failed.reason, failed.message
                    ));
                }
                if let (Some(chain), Some(serial), Some(not_before), Some(not_after)) = (
                    status.certificate_chain.clone(),
                    status.serial.clone(),
                    status.not_before.as_deref().and_then(parse_time),
                    status.not_after.as_deref().and_then(parse_time),
                ) {
                    return Ok(IssuedCertificate {
                        identity: identity.clone(),
                        chain_pem: chain,
                        serial,
                        not_before,
                        not_after,
                    });
                }
            }
            if started.elapsed() > self.timeout {
                return Err(format!(
                    "ECDSACert {name} not signed within {:?}: is veil-controller running?",
                    self.timeout
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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
}
