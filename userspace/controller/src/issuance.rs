//! What the controller does with one `ECDSACert`, decided without the API
//! server: wait for a CSR, refuse a bad request with a reason, issue, or
//! leave a current certificate alone until its renewal time.
//!
//! Kept pure (spec, status and clock in, decision out) so every branch is a
//! unit test; the reconciler only carries the result to the API server.

use std::time::{Duration, SystemTime};

use veil_crd::{Condition, ECDSACertSpec, ECDSACertStatus, IssuerKind, csr_sha256};
use veil_identity::{CertificateAuthority, SpiffeId, renewal::RenewalPolicy};

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
    /// Decides, and for an issue signs, at time `now`.
    pub fn decide(
        &self,
        spec: &ECDSACertSpec,
        status: Option<&ECDSACertStatus>,
        now: SystemTime,
    ) -> Decision {
        let refuse = |reason: &str, message: String| Decision::Write {
            status: not_issued(status, true, reason, &message, now),
            // A refused spec only changes when someone edits it (which
            // triggers a reconcile); look again now and then regardless.
            recheck_after: Duration::from_secs(600),
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
            return Decision::Write {
                status: not_issued(
                    status,
                    false,
                    "WaitingForCSR",
                    "waiting for the node agent that holds the key to write spec.csr",
                    now,
                ),
                recheck_after: Duration::from_secs(300),
            };
        };
        let digest = csr_sha256(csr);
        if let Some(current) = status
            && current.csr_sha256.as_deref() == Some(digest.as_str())
            && let Some(renew_at) = current.next_renewal.as_deref().and_then(parse_time)
            && now < renew_at
        {
            return Decision::UpToDate { renew_at };
        }
        let not_before = now - CLOCK_SKEW;
        let not_after = now + lifetime;
        let issued = match self.ca.sign_valid(csr, &identity, not_before, not_after) {
            Ok(issued) => issued,
            Err(error) => return refuse("SigningRefused", error.to_string()),
        };
        let renew_at = match renew_before {
            Some(before) => issued.not_after - before,
            // From now, not from the back-dated `not_before`.
            None => self.renewal.renew_at(now, issued.not_after),
        };
        let message = format!("issued serial {} by the local CA", issued.serial);
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
                csr_sha256: Some(digest),
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
        ECDSACertSpec::workload(CART, csr)
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
        let (status, _) = written(issuer().decide(&spec(None), None, SystemTime::now()));
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
        let (status, recheck) = written(issuer.decide(&spec, None, now));
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
            issuer.decide(&spec, Some(&status), now + Duration::from_secs(3600)),
            Decision::UpToDate { .. }
        ));
        let (renewed, _) =
            written(issuer.decide(&spec, Some(&status), now + Duration::from_secs(17 * 3600)));
        assert_ne!(renewed.serial, status.serial);
        let rekeyed = ECDSACertSpec {
            csr: Some(csr_for(CART)),
            ..spec
        };
        let (rekeyed_status, _) = written(issuer.decide(&rekeyed, Some(&status), now));
        assert_ne!(rekeyed_status.serial, status.serial);
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason_keeping_a_valid_certificate() {
        let issuer = issuer();
        let now = SystemTime::now();
        let (good, _) = written(issuer.decide(&spec(Some(csr_for(CART))), None, now));
        // A CSR for another identity than the spec names.
        let stolen = spec(Some(csr_for("spiffe://cluster.local/ns/shop/sa/admin")));
        let (status, _) = written(issuer.decide(&stolen, Some(&good), now));
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
        let (status, _) = written(issuer.decide(&other_domain, None, now));
        assert_eq!(condition_of(&status, "Failed").reason, "SigningRefused");

        let mut short = spec(Some(csr_for(CART)));
        short.duration = Some("1m".into());
        let (status, _) = written(issuer.decide(&short, None, now));
        assert_eq!(condition_of(&status, "Failed").reason, "InvalidDuration");
        assert_eq!(condition_of(&status, "Ready").status, "False");

        let mut acme = spec(None);
        acme.issuer_ref.kind = IssuerKind::ACME;
        let (status, _) = written(issuer.decide(&acme, None, now));
        assert_eq!(condition_of(&status, "Failed").reason, "IssuerNotServed");
    }

    #[test]
    fn renew_before_sets_the_renewal_time() {
        let mut spec = spec(Some(csr_for(CART)));
        spec.renew_before = Some("1h".into());
        let (status, recheck) = written(issuer().decide(&spec, None, SystemTime::now()));
        assert!(status.next_renewal.is_some());
        let hours = recheck.as_secs_f64() / 3600.0;
        assert!((22.9..23.1).contains(&hours), "{hours}");
    }
}
