//! Certificates for server names from an ACME CA (instant-acme).
//!
//! For ingress and external services only: public ACME CAs stopped issuing
//! client-auth certificates in 2026, so mesh identities (which need both TLS
//! roles) always come from the local CA. Challenges: HTTP-01, served by
//! [`Http01Responder`] on the port the CA probes (80 in production), or
//! DNS-01 through a [`Dns01Hook`] that publishes the TXT record (a command
//! for your DNS provider). The private key is made here, on the node; only
//! the CSR goes to the CA.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use axum::{Router, extract::Path as UrlPath, http::StatusCode, routing::get};
use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use tracing::info;

use crate::keys::{KeyError, WorkloadKey};

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME CA at {url}: {source}")]
    Protocol {
        url: String,
        source: instant_acme::Error,
    },
    #[error("the ACME CA offers no {0:?} challenge for {1}")]
    NoChallenge(ChallengeType, String),
    #[error("DNS-01 hook failed for {record}: {reason}")]
    Dns01 { record: String, reason: String },
    #[error("order ended as {0:?} instead of ready: the CA could not validate the challenges")]
    NotReady(OrderStatus),
    #[error("authorization for {0} is {1:?}")]
    Authorization(String, AuthorizationStatus),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot serve HTTP-01 on {address}: {source}")]
    Http01Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Where to get certificates.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The directory URL (e.g. Let's Encrypt's, or a private CA's).
    pub directory_url: String,
    /// PEM root to trust for the CA's own HTTPS (private ACME CAs); the
    /// system roots otherwise.
    pub server_root: Option<PathBuf>,
    /// Contact URIs for the account (`mailto:…`).
    pub contact: Vec<String>,
}

/// Publishes and removes DNS-01 TXT records.
pub trait Dns01Hook: Send + Sync {
    fn present(&self, record: &str, value: &str) -> Result<(), String>;
    fn cleanup(&self, record: &str) -> Result<(), String>;
}

/// A DNS-01 hook that runs `<program> present <record> <value>` and `<program> cleanup <record>`.
#[derive(Debug, Clone)]
pub struct CommandDns01Hook {
    pub program: PathBuf,
}

impl Dns01Hook for CommandDns01Hook {
    fn present(&self, record: &str, value: &str) -> Result<(), String> {
        run_hook(&self.program, &["present", record, value])
    }

    fn cleanup(&self, record: &str) -> Result<(), String> {
        run_hook(&self.program, &["cleanup", record])
    }
}

fn run_hook(program: &PathBuf, args: &[&str]) -> Result<(), String> {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} {} exited with {}: {}",
            program.display(),
            args.first().unwrap_or(&""),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Serves `/.well-known/acme-challenge/<token>` with the key authorizations
/// of the challenges in flight.
#[derive(Clone, Default)]
pub struct Http01Responder {
    tokens: Arc<Mutex<HashMap<String, String>>>,
}

impl Http01Responder {
    /// Starts serving on `address`; returns the address actually bound.
    pub async fn serve(&self, address: SocketAddr) -> Result<SocketAddr, AcmeError> {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| AcmeError::Http01Bind { address, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| AcmeError::Http01Bind { address, source })?;
        let tokens = Arc::clone(&self.tokens);
        let app = Router::new().route(
            "/.well-known/acme-challenge/{token}",
            get(move |UrlPath(token): UrlPath<String>| {
                let answer = tokens.lock().ok().and_then(|t| t.get(&token).cloned());
                async move { answer.ok_or(StatusCode::NOT_FOUND) }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(bound)
    }

    fn insert(&self, token: &str, key_authorization: &str) {
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(token.into(), key_authorization.into());
        }
    }

    fn remove(&self, token: &str) {
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.remove(token);
        }
    }
}

/// How to prove control of the names.
pub enum ChallengeMethod<'a> {
    Http01(&'a Http01Responder),
    Dns01(&'a dyn Dns01Hook),
}

/// A certificate chain from the ACME CA and its key (which never left this node).
#[derive(Debug)]
pub struct AcmeCertificate {
    pub names: Vec<String>,
    pub chain_pem: String,
    pub key: WorkloadKey,
}

/// Registers an account, orders `names`, answers the challenges, finalizes
/// with a P-256 CSR made here, and returns the chain.
pub async fn obtain(
    settings: &AcmeSettings,
    names: &[String],
    method: ChallengeMethod<'_>,
) -> Result<AcmeCertificate, AcmeError> {
    let url = settings.directory_url.clone();
    let protocol = |source| AcmeError::Protocol {
        url: url.clone(),
        source,
    };
    let builder = match &settings.server_root {
        Some(root) => Account::builder_with_root(root),
        None => Account::builder(),
    }
    .map_err(protocol)?;
    let contact: Vec<&str> = settings.contact.iter().map(String::as_str).collect();
    let (account, _credentials) = builder
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            settings.directory_url.clone(),
            None,
        )
        .await
        .map_err(protocol)?;
    let identifiers: Vec<Identifier> = names.iter().cloned().map(Identifier::Dns).collect();
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(protocol)?;

    let mut published = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization.map_err(protocol)?;
        match authorization.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            other => {
                return Err(AcmeError::Authorization(
                    format!("{:?}", authorization.identifier()),
                    other,
                ));
            }
        }
        let kind = match method {
            ChallengeMethod::Http01(_) => ChallengeType::Http01,
            ChallengeMethod::Dns01(_) => ChallengeType::Dns01,
        };
        let name = format!("{:?}", authorization.identifier());
        let mut challenge = authorization
            .challenge(kind.clone())
            .ok_or_else(|| AcmeError::NoChallenge(kind, name.clone()))?;
        let key_authorization = challenge.key_authorization();
        match method {
            ChallengeMethod::Http01(responder) => {
                responder.insert(&challenge.token, key_authorization.as_str());
                published.push(challenge.token.clone());
            }
            ChallengeMethod::Dns01(hook) => {
                let record = format!("_acme-challenge.{}", challenge.identifier());
                hook.present(&record, &key_authorization.dns_value())
                    .map_err(|reason| AcmeError::Dns01 {
                        record: record.clone(),
                        reason,
                    })?;
                published.push(record);
            }
        }
        challenge.set_ready().await.map_err(protocol)?;
    }

    let status = order
        .poll_ready(&RetryPolicy::default())
        .await
        .map_err(protocol)?;
    for item in &published {
        match method {
            ChallengeMethod::Http01(responder) => responder.remove(item),
            ChallengeMethod::Dns01(hook) => {
                let _ = hook.cleanup(item);
            }
        }
    }
    if status != OrderStatus::Ready {
        return Err(AcmeError::NotReady(status));
    }
    let key = WorkloadKey::generate()?;
    order
        .finalize_csr(&key.csr_der_for_names(names)?)
        .await
        .map_err(protocol)?;
    let chain_pem = order
        .poll_certificate(&RetryPolicy::default())
        .await
        .map_err(protocol)?;
    info!(names = ?names, "ACME certificate issued");
    Ok(AcmeCertificate {
        names: names.to_vec(),
        chain_pem,
        key,
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// GET `path` with a bare HTTP/1.1 request, as an ACME CA's validator would.
    fn http_get(address: SocketAddr, path: &str) -> String {
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_http01_responder_serves_only_tokens_in_flight() {
        let responder = Http01Responder::default();
        let address = responder
            .serve("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        responder.insert("tok3n", "tok3n.thumbprint");
        let get = |path: &'static str| tokio::task::spawn_blocking(move || http_get(address, path));
        let found = get("/.well-known/acme-challenge/tok3n").await.unwrap();
        assert!(found.starts_with("HTTP/1.1 200"), "{found}");
        assert!(found.ends_with("tok3n.thumbprint"), "{found}");
        let unknown = get("/.well-known/acme-challenge/other").await.unwrap();
        assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
        responder.remove("tok3n");
        let gone = get("/.well-known/acme-challenge/tok3n").await.unwrap();
        assert!(gone.starts_with("HTTP/1.1 404"), "{gone}");
    }
}
