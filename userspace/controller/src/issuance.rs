//! What the controller does with one `ECDSACert`, decided without the API
//! server: wait for a CSR, refuse a bad request with a reason, issue, or
//! leave a current certificate alone until its renewal time.
//!
//! Kept pure (spec, status, clock and where the workload runs in, decision
//! out) so every branch is a unit test; the reconciler only looks the
//! workload up ([`crate::placement`]) when [`LocalIssuer::plan`] says a
//! certificate is to be signed, and carries the result to the API server.

use std::time::{Duration, SystemTime};

use veil_crd::{Condition, ECDSACertSpec, ECDSACertStatus, IssuerKind, csr_sha256};
use veil_identity::{CertificateAuthority, SpiffeId, renewal::RenewalPolicy};

use crate::placement::{self, Placement};

/// Lifetime when the spec asks for none.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Shortest lifetime accepted (renewal must have room to happen).
pub const MIN_DURATION: Duration = Duration::from_secs(10 * 60);
/// Longest lifetime accepted for a workload certificate.
pub const MAX_DURATION: Duration = Duration::from_secs(90 * 24 * 3600);
/// Validity starts this long before now, for clock skew between nodes —
/// the CA's own backdating, which identity revocation counts on.
const CLOCK_SKEW: Duration = veil_identity::revocation::ISSUE_BACKDATE;

/// What to do with an `ECDSACert`.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Nothing to do until `renew_at`.
    UpToDate { renew_at: SystemTime },
    /// A status to write: issued, waiting or refused.
    Write {
        status: ECDSACertStatus,
        /// When to look again (renewal time, or a retry).
        recheck_after: Duration,
    },
}

/// The first half of a decision: done already, or a certificate to sign
/// once the controller knows where the workload runs.
#[derive(Debug)]
pub enum Step {
    Decided(Decision),
    Sign(SignRequest),
}

/// A request that passed every check that needs no API server.
#[derive(Debug)]
pub struct SignRequest {
    identity: SpiffeId,
    node: String,
    csr: String,
    digest: String,
    lifetime: Duration,
    renew_before: Option<Duration>,
}

impl SignRequest {
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The node that holds the key (a valid node name).
    pub fn node(&self) -> &str {
        &self.node
    }
}

/// How long until a refused request is looked at again: a spec only
/// changes when someone edits it (which triggers a reconcile anyway).
const RECHECK_REFUSED: Duration = Duration::from_secs(600);
/// How long until a request whose workload was not on its node is looked at
/// again (the pod may still be scheduled there).
const RECHECK_NOT_ON_NODE: Duration = Duration::from_secs(30);

/// The mesh CA as the controller uses it.
pub struct LocalIssuer {
    pub ca: CertificateAuthority,
    pub renewal: RenewalPolicy,
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

fn parse_time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(text).ok()
}

fn condition(type_: &str, status: bool, reason: &str, message: &str, now: SystemTime) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: rfc3339(now),
    }
}

/// A status saying the certificate is not (yet) issued, keeping any
/// certificate already there (it stays valid until its own expiry).
fn not_issued(
    previous: Option<&ECDSACertStatus>,
    failed: bool,
    reason: &str,
    message: &str,
    now: SystemTime,
) -> ECDSACertStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let still_valid = status
        .not_after
        .as_deref()
        .and_then(parse_time)
        .is_some_and(|not_after| now < not_after);
    status.conditions = vec![
        condition(
            "Ready",
            still_valid,
            if still_valid {
                "PreviousCertificateValid"
            } else {
                reason
            },
            message,
            now,
        ),
        condition("Issuing", !failed, reason, message, now),
        condition("Failed", failed, reason, message, now),
    ];
    status
}

impl LocalIssuer {
    /// Decides at time `now`, given where the workload runs: [`Self::plan`]
    /// then, for a request to sign, [`Self::sign`].
    pub fn decide(
        &self,
        spec: &ECDSACertSpec,
        status: Option<&ECDSACertStatus>,
        now: SystemTime,
        placement: Placement,
    ) -> Decision {
        match self.plan(spec, status, now) {
            Step::Decided(decision) => decision,
            Step::Sign(request) => self.sign(&request, status, now, placement),
        }
    }

    /// Everything that needs no API server: refusals, waiting for the CSR,
    /// a certificate that is current; else a request to sign.
    pub fn plan(
        &self,
        spec: &ECDSACertSpec,
        status: Option<&ECDSACertStatus>,
        now: SystemTime,
    ) -> Step {
        let refuse = |reason: &str, message: String| {
            Step::Decided(Decision::Write {
                status: not_issued(status, true, reason, &message, now),
                recheck_after: RECHECK_REFUSED,
            })
        };
        if spec.issuer_ref.kind != IssuerKind::LocalCA {
            return refuse(
                "IssuerNotServed",
                "this controller signs with the local CA only; ACME certificates are \
                 ordered by the node agent's ACME client (issuerRef.kind: LocalCA for workload identities)"
                    .into(),
            );
        }
        let Some(identity) = spec.identity.as_deref() else {
            return refuse(
                "MissingIdentity",
                "spec.identity must be a SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)"
                    .into(),
            );
        };
        let identity: SpiffeId = match identity.parse() {
            Ok(id) => id,
            Err(error) => return refuse("InvalidIdentity", format!("spec.identity: {error}")),
        };
        let node = match spec.node_name.as_deref() {
            None => {
                return refuse(
                    "NodeNotNamed",
                    "spec.nodeName must name the node whose agent holds the key: a workload \
                     identity is signed only for a node that runs a meshed pod of its service \
                     account (the node agents set it)"
                        .into(),
                );
            }
            Some(node) if !placement::valid_node_name(node) => {
                return refuse(
                    "InvalidNodeName",
                    format!("spec.nodeName {node:?} is not a Kubernetes node name"),
                );
            }
            Some(node) => node.to_owned(),
        };
        let lifetime = match spec.duration.as_deref().map(humantime::parse_duration) {
            None => DEFAULT_DURATION,
            Some(Ok(d)) if (MIN_DURATION..=MAX_DURATION).contains(&d) => d,
            Some(Ok(d)) => {
                return refuse(
                    "InvalidDuration",
                    format!(
                        "spec.duration {} is outside {} to {}",
                        humantime::format_duration(d),
                        humantime::format_duration(MIN_DURATION),
                        humantime::format_duration(MAX_DURATION)
                    ),
                );
            }
            Some(Err(error)) => {
                return refuse(
                    "InvalidDuration",
                    format!("spec.duration: {error} (e.g. 24h)"),
                );
            }
        };
        let renew_before = match spec.renew_before.as_deref().map(humantime::parse_duration) {
            None => None,
            Some(Ok(d)) if d < lifetime => Some(d),
            Some(Ok(_)) => {
                return refuse(
                    "InvalidRenewBefore",
                    "spec.renewBefore must be shorter than the lifetime".into(),
                );
            }
            Some(Err(error)) => {
                return refuse("InvalidRenewBefore", format!("spec.renewBefore: {error}"));
            }
        };
        let Some(csr) = spec.csr.as_deref() else {
            return Step::Decided(Decision::Write {
                status: not_issued(
                    status,
                    false,
                    "WaitingForCSR",
                    "waiting for the node agent that holds the key to write spec.csr",
                    now,
                ),
                recheck_after: Duration::from_secs(300),
            });
        };
        let digest = csr_sha256(csr);
        if let Some(current) = status
            && current.csr_sha256.as_deref() == Some(digest.as_str())
            && let Some(renew_at) = current.next_renewal.as_deref().and_then(parse_time)
            && now < renew_at
        {
            return Step::Decided(Decision::UpToDate { renew_at });
        }
        Step::Sign(SignRequest {
            identity,
            node,
            csr: csr.to_owned(),
            digest,
            lifetime,
            renew_before,
        })
    }

    /// Signs `request` at time `now` if its workload runs on its node.
    pub fn sign(
        &self,
        request: &SignRequest,
        status: Option<&ECDSACertStatus>,
        now: SystemTime,
        placement: Placement,
    ) -> Decision {
        let refuse = |reason: &str, message: String, recheck_after| Decision::Write {
            status: not_issued(status, true, reason, &message, now),
            recheck_after,
        };
        if placement == Placement::NotOnNode {
            return refuse(
                "WorkloadNotOnNode",
                format!(
                    "no meshed pod of service account {} in namespace {} is scheduled on node {}: \
                     a workload identity is signed only for a node that runs it (pods need the \
                     {} annotation)",
                    request.identity.service_account(),
                    request.identity.namespace(),
                    request.node,
                    veil_crd::pods::MTLS_ANNOTATION,
                ),
                RECHECK_NOT_ON_NODE,
            );
        }
        let not_before = now - CLOCK_SKEW;
        let not_after = now + request.lifetime;
        let issued =
            match self
                .ca
                .sign_valid(&request.csr, &request.identity, not_before, not_after)
            {
                Ok(issued) => issued,
                Err(error) => {
                    return refuse("SigningRefused", error.to_string(), RECHECK_REFUSED);
                }
            };
        let renew_at = match request.renew_before {
            Some(before) => issued.not_after - before,
            // From now, not from the back-dated `not_before`.
            None => self.renewal.renew_at(now, issued.not_after),
        };
        let message = format!(
            "issued serial {} by the local CA for node {}",
            issued.serial, request.node
        );
        Decision::Write {
            status: ECDSACertStatus {
                conditions: vec![
                    condition("Ready", true, "Issued", &message, now),
                    condition("Issuing", false, "Issued", &message, now),
                    condition("Failed", false, "Issued", &message, now),
                ],
                certificate_chain: Some(issued.chain_pem),
                serial: Some(issued.serial),
                not_before: Some(rfc3339(issued.not_before)),
                not_after: Some(rfc3339(issued.not_after)),
                next_renewal: Some(rfc3339(renew_at)),
                csr_sha256: Some(request.digest.clone()),
            },
            recheck_after: renew_at.duration_since(now).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use veil_identity::WorkloadKey;

    use super::*;

    const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";

    fn issuer() -> LocalIssuer {
        LocalIssuer {
            ca: CertificateAuthority::generate("cluster.local", DEFAULT_DURATION).unwrap(),
            renewal: RenewalPolicy::default(),
        }
    }

    fn spec(csr: Option<String>) -> ECDSACertSpec {
        ECDSACertSpec::workload(CART, "node1", csr)
    }

    fn csr_for(identity: &str) -> String {
        WorkloadKey::generate()
            .unwrap()
            .csr_pem(&identity.parse().unwrap())
            .unwrap()
    }

    fn written(decision: Decision) -> (ECDSACertStatus, Duration) {
        match decision {
            Decision::Write {
                status,
                recheck_after,
            } => (status, recheck_after),
            other => panic!("expected a status to write, got {other:?}"),
        }
    }

    fn condition_of<'a>(status: &'a ECDSACertStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn without_a_csr_it_waits_for_the_agent() {
        let (status, _) =
            written(issuer().decide(&spec(None), None, SystemTime::now(), Placement::OnNode));
        assert_eq!(condition_of(&status, "Ready").status, "False");
        let issuing = condition_of(&status, "Issuing");
        assert_eq!(
            (issuing.status.as_str(), issuing.reason.as_str()),
            ("True", "WaitingForCSR")
        );
    }

    #[test]
    fn a_csr_is_issued_once_and_again_after_renewal_time_or_a_new_key() {
        let issuer = issuer();
        let now = SystemTime::now();
        let spec = spec(Some(csr_for(CART)));
        let (status, recheck) = written(issuer.decide(&spec, None, now, Placement::OnNode));
        assert_eq!(condition_of(&status, "Ready").status, "True");
        assert!(
            status
                .certificate_chain
                .as_deref()
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
        // Renewal at 2/3 of 24 h, give or take the skew allowance.
        let hours = recheck.as_secs_f64() / 3600.0;
        assert!((15.9..16.1).contains(&hours), "{hours}");
        assert!(matches!(
            issuer.decide(
                &spec,
                Some(&status),
                now + Duration::from_secs(3600),
                Placement::OnNode
            ),
            Decision::UpToDate { .. }
        ));
        let (renewed, _) = written(issuer.decide(
            &spec,
            Some(&status),
            now + Duration::from_secs(17 * 3600),
            Placement::OnNode,
        ));
        assert_ne!(renewed.serial, status.serial);
        let rekeyed = ECDSACertSpec {
            csr: Some(csr_for(CART)),
            ..spec
        };
        let (rekeyed_status, _) =
            written(issuer.decide(&rekeyed, Some(&status), now, Placement::OnNode));
        assert_ne!(rekeyed_status.serial, status.serial);
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason_keeping_a_valid_certificate() {
        let issuer = issuer();
        let now = SystemTime::now();
        let (good, _) =
            written(issuer.decide(&spec(Some(csr_for(CART))), None, now, Placement::OnNode));
        // A CSR for another identity than the spec names.
        let stolen = spec(Some(csr_for("spiffe://cluster.local/ns/shop/sa/admin")));
        let (status, _) = written(issuer.decide(&stolen, Some(&good), now, Placement::OnNode));
        let failed = condition_of(&status, "Failed");
        assert_eq!(
            (failed.status.as_str(), failed.reason.as_str()),
            ("True", "SigningRefused")
        );
        let ready = condition_of(&status, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "PreviousCertificateValid")
        );
        assert_eq!(status.serial, good.serial);

        let mut other_domain = spec(Some(csr_for("spiffe://evil.example/ns/shop/sa/cart")));
        other_domain.identity = Some("spiffe://evil.example/ns/shop/sa/cart".into());
        let (status, _) = written(issuer.decide(&other_domain, None, now, Placement::OnNode));
        assert_eq!(condition_of(&status, "Failed").reason, "SigningRefused");

        let mut short = spec(Some(csr_for(CART)));
        short.duration = Some("1m".into());
        let (status, _) = written(issuer.decide(&short, None, now, Placement::OnNode));
        assert_eq!(condition_of(&status, "Failed").reason, "InvalidDuration");
        assert_eq!(condition_of(&status, "Ready").status, "False");

        let mut acme = spec(None);
        acme.issuer_ref.kind = IssuerKind::ACME;
        let (status, _) = written(issuer.decide(&acme, None, now, Placement::OnNode));
        assert_eq!(condition_of(&status, "Failed").reason, "IssuerNotServed");
    }

    #[test]
    fn a_node_gets_an_identity_only_while_it_runs_the_workload() {
        let issuer = issuer();
        let now = SystemTime::now();
        let spec = spec(Some(csr_for(CART)));
        let (refused, recheck) = written(issuer.decide(&spec, None, now, Placement::NotOnNode));
        let failed = condition_of(&refused, "Failed");
        assert_eq!(
            (failed.status.as_str(), failed.reason.as_str()),
            ("True", "WorkloadNotOnNode")
        );
        assert!(
            failed.message.contains("cart") && failed.message.contains("node1"),
            "{}",
            failed.message
        );
        assert!(refused.certificate_chain.is_none());
        assert_eq!(recheck, RECHECK_NOT_ON_NODE, "the pod may still arrive");

        // Renewal checks again: a node whose pod left keeps what it has
        // until expiry, and gets no new certificate.
        let (issued, _) = written(issuer.decide(&spec, None, now, Placement::OnNode));
        let later = now + Duration::from_secs(17 * 3600);
        let (not_renewed, _) =
            written(issuer.decide(&spec, Some(&issued), later, Placement::NotOnNode));
        assert_eq!(
            condition_of(&not_renewed, "Failed").reason,
            "WorkloadNotOnNode"
        );
        assert_eq!(not_renewed.serial, issued.serial);

        // The workload is looked up only when something is to be signed.
        assert!(matches!(
            issuer.plan(&spec, Some(&issued), now + Duration::from_secs(60)),
            Step::Decided(Decision::UpToDate { .. })
        ));
        match issuer.plan(&spec, None, now) {
            Step::Sign(request) => {
                assert_eq!(request.node(), "node1");
                assert_eq!(request.identity().to_string(), CART);
            }
            other => panic!("expected a request to sign, got {other:?}"),
        }
    }

    #[test]
    fn a_request_must_name_a_valid_node() {
        let issuer = issuer();
        let now = SystemTime::now();
        let mut unnamed = spec(Some(csr_for(CART)));
        unnamed.node_name = None;
        let (status, _) = written(issuer.decide(&unnamed, None, now, Placement::OnNode));
        assert_eq!(condition_of(&status, "Failed").reason, "NodeNotNamed");
        let mut widened = spec(Some(csr_for(CART)));
        widened.node_name = Some("node1,metadata.name=x".into());
        let (status, _) = written(issuer.decide(&widened, None, now, Placement::OnNode));
        assert_eq!(condition_of(&status, "Failed").reason, "InvalidNodeName");
    }

    #[test]
    fn renew_before_sets_the_renewal_time() {
        let mut spec = spec(Some(csr_for(CART)));
        spec.renew_before = Some("1h".into());
        let (status, recheck) =
            written(issuer().decide(&spec, None, SystemTime::now(), Placement::OnNode));
        assert!(status.next_renewal.is_some());
        let hours = recheck.as_secs_f64() / 3600.0;
        assert!((22.9..23.1).contains(&hours), "{hours}");
    }
}
