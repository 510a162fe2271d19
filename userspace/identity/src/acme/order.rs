//! One ACME order: new order (optionally replacing an earlier certificate),
//! challenges answered, finalized with a P-256 CSR made here, chain fetched.

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use tracing::info;

use super::{AcmeError, AcmeSettings, CertificateInfo, ChallengeMethod};
use crate::keys::WorkloadKey;

/// A certificate chain from the ACME CA and its key (which never left this node).
#[derive(Debug)]
pub struct AcmeCertificate {
    pub names: Vec<String>,
    pub chain_pem: String,
    pub key: WorkloadKey,
    /// What the leaf says (validity, serial, ARI identifier).
    pub info: CertificateInfo,
}

/// Registers a new account, orders `names`, answers the challenges,
/// finalizes with a P-256 CSR made here, and returns the chain. One-off: the
/// [`super::AcmeRenewer`] keeps its account instead.
pub async fn obtain(
    settings: &AcmeSettings,
    names: &[String],
    method: ChallengeMethod<'_>,
) -> Result<AcmeCertificate, AcmeError> {
    let (account, _credentials) = create_account(settings).await?;
    order_certificate(&account, &settings.directory_url, names, method, None).await
}

/// A fresh account at the CA, and its credentials (to store).
pub(crate) async fn create_account(
    settings: &AcmeSettings,
) -> Result<(Account, instant_acme::AccountCredentials), AcmeError> {
    let protocol = protocol_error(&settings.directory_url);
    let contact: Vec<&str> = settings.contact.iter().map(String::as_str).collect();
    account_builder(settings)?
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
        .map_err(protocol)
}

/// An account builder trusting `server_root` (private CAs) or the system roots.
pub(crate) fn account_builder(
    settings: &AcmeSettings,
) -> Result<instant_acme::AccountBuilder, AcmeError> {
    match &settings.server_root {
        Some(root) => Account::builder_with_root(root),
        None => Account::builder(),
    }
    .map_err(protocol_error(&settings.directory_url))
}

pub(crate) fn protocol_error(url: &str) -> impl Fn(instant_acme::Error) -> AcmeError + '_ {
    move |source| AcmeError::Protocol {
        url: url.to_owned(),
        source,
    }
}

/// Orders `names` on `account`; with `replaces`, the order says which
/// certificate it renews (RFC 9773 §5), which the CA reflects back and
/// instant-acme checks.
pub async fn order_certificate(
    account: &Account,
    directory_url: &str,
    names: &[String],
    method: ChallengeMethod<'_>,
    replaces: Option<CertificateIdentifier<'static>>,
) -> Result<AcmeCertificate, AcmeError> {
    let protocol = protocol_error(directory_url);
    let identifiers: Vec<Identifier> = names.iter().cloned().map(Identifier::Dns).collect();
    let mut new_order = NewOrder::new(&identifiers);
    let replacing = replaces.as_ref().map(ToString::to_string);
    if let Some(replaces) = replaces {
        new_order = new_order.replaces(replaces);
    }
    let mut order = account.new_order(&new_order).await.map_err(&protocol)?;

    let mut published = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization.map_err(&protocol)?;
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
        challenge.set_ready().await.map_err(&protocol)?;
    }

    let status = order.poll_ready(&RetryPolicy::default()).await;
    for item in &published {
        match method {
            ChallengeMethod::Http01(responder) => responder.remove(item),
            ChallengeMethod::Dns01(hook) => {
                let _ = hook.cleanup(item);
            }
        }
    }
    let status = status.map_err(&protocol)?;
    if status != OrderStatus::Ready {
        return Err(AcmeError::NotReady(status));
    }
    let key = WorkloadKey::generate()?;
    order
        .finalize_csr(&key.csr_der_for_names(names)?)
        .await
        .map_err(&protocol)?;
    let chain_pem = order
        .poll_certificate(&RetryPolicy::default())
        .await
        .map_err(&protocol)?;
    let info = CertificateInfo::from_chain_pem(&chain_pem).map_err(AcmeError::Chain)?;
    if info.public_key_der != key.public_key_der()? {
        return Err(AcmeError::Chain(
            "the leaf does not carry the key of our CSR".into(),
        ));
    }
    info!(
        names = ?names,
        serial = %info.serial,
        replaces = replacing.as_deref().unwrap_or("-"),
        "ACME certificate issued"
    );
    Ok(AcmeCertificate {
        names: names.to_vec(),
        chain_pem,
        key,
        info,
    })
}
