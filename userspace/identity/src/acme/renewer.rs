//! The long-running ACME client: keeps each configured certificate
//! obtained, stored and renewed.
//!
//! Per certificate: at start the stored one is loaded; if there is none, or
//! it is expired, unreadable, or for other names, a new one is ordered at
//! once. Then the renewer asks the CA's ARI when to renew ([`super::renewal`]),
//! sleeps until that time or the next ARI query, whichever comes first, and
//! renews with `replaces` naming the old certificate. A failed order keeps
//! the old certificate on disk and in service and is retried with jittered
//! exponential backoff ([`RenewalPolicy::retry_delay`]). One ACME account,
//! kept in the store, serves every certificate. What each certificate is
//! doing is in [`RenewerState`], for status pages and tests; logs carry
//! names, serials and times, never key material.

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use instant_acme::{Account, CertificateIdentifier};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::{
    AcmeError, AcmeSettings, CertificateInfo, ChallengeMethod, Dns01Hook, Http01Responder,
    order::{account_builder, create_account, order_certificate, protocol_error},
    renewal::{AriBounds, DecisionSource, RenewalPlan, ari_plan, lifetime_plan},
    store::{CertificateStore, valid_name},
};
use crate::renewal::RenewalPolicy;

/// The longest single sleep, so a wall-clock jump (suspend, a clock step)
/// delays a renewal by an hour at most.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// One certificate to keep: its store directory name and the DNS names it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSpec {
    pub name: String,
    pub dns_names: Vec<String>,
}

/// How the renewer proves control of the names (the HTTP-01 responder must
/// already be serving on the port the CA probes).
#[derive(Clone)]
pub enum Challenge {
    Http01(Http01Responder),
    Dns01(Arc<dyn Dns01Hook>),
}

impl Challenge {
    fn method(&self) -> ChallengeMethod<'_> {
        match self {
            Self::Http01(responder) => ChallengeMethod::Http01(responder),
            Self::Dns01(hook) => ChallengeMethod::Dns01(hook.as_ref()),
        }
    }
}

/// Where and how to renew.
#[derive(Debug, Clone)]
pub struct RenewerSettings {
    pub acme: AcmeSettings,
    /// The store directory ([`CertificateStore`]).
    pub store: PathBuf,
    /// Renewal at 2/3 of the lifetime without ARI, and the retry backoff.
    pub policy: RenewalPolicy,
    /// Bounds on the CA's Retry-After between ARI queries.
    pub ari_bounds: AriBounds,
}

impl RenewerSettings {
    /// The defaults: 2/3 of the lifetime, backoff 1 s to 5 min, ARI every 1 min to 6 h.
    pub fn new(acme: AcmeSettings, store: impl Into<PathBuf>) -> Self {
        Self {
            acme,
            store: store.into(),
            policy: RenewalPolicy::default(),
            ari_bounds: AriBounds::default(),
        }
    }
}

/// What one certificate is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateStatus {
    pub name: String,
    pub dns_names: Vec<String>,
    /// The certificate in service (lowercase hex serial), if any.
    pub serial: Option<String>,
    pub not_after: Option<SystemTime>,
    /// When it will be renewed (now or earlier: renewing).
    pub next_renewal: Option<SystemTime>,
    /// When the CA's ARI will be asked again (`None`: no ARI).
    pub next_ari_check: Option<SystemTime>,
    /// What `next_renewal` was decided from.
    pub source: Option<DecisionSource>,
    /// The last failure, cleared by the next success.
    pub last_error: Option<String>,
    /// Failed orders since the last success.
    pub failures: u32,
    /// Certificates this renewer obtained for this name.
    pub issued: u64,
    /// The ARI identifier the last order replaced (RFC 9773 `replaces`).
    pub replaced: Option<String>,
}

impl CertificateStatus {
    fn new(spec: &CertificateSpec) -> Self {
        Self {
            name: spec.name.clone(),
            dns_names: spec.dns_names.clone(),
            serial: None,
            not_after: None,
            next_renewal: None,
            next_ari_check: None,
            source: None,
            last_error: None,
            failures: 0,
            issued: 0,
            replaced: None,
        }
    }
}

/// The state of every certificate of a renewer, shared with its readers.
#[derive(Debug, Default)]
pub struct RenewerState {
    certificates: RwLock<BTreeMap<String, CertificateStatus>>,
}

impl RenewerState {
    /// Every certificate, by name.
    pub fn snapshot(&self) -> Vec<CertificateStatus> {
        self.certificates
            .read()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn get(&self, name: &str) -> Option<CertificateStatus> {
        self.certificates.read().ok()?.get(name).cloned()
    }

    fn update(&self, name: &str, change: impl FnOnce(&mut CertificateStatus)) {
        if let Ok(mut certificates) = self.certificates.write()
            && let Some(status) = certificates.get_mut(name)
        {
            change(status);
        }
    }
}

/// Keeps a set of certificates from one ACME CA; see the module docs.
pub struct AcmeRenewer {
    shared: Arc<Shared>,
    certificates: Vec<CertificateSpec>,
}

struct Shared {
    settings: RenewerSettings,
    store: CertificateStore,
    challenge: Challenge,
    /// Made (or loaded from the store) on first use, then reused.
    account: tokio::sync::Mutex<Option<Account>>,
    /// The CA has no ARI: decided by the lifetime from now on (logged once).
    no_ari: AtomicBool,
    state: Arc<RenewerState>,
}

impl AcmeRenewer {
    /// Checks the certificate list (names usable as directories, unique,
    /// each with DNS names); nothing is contacted yet.
    pub fn new(
        settings: RenewerSettings,
        challenge: Challenge,
        certificates: Vec<CertificateSpec>,
    ) -> Result<Self, AcmeError> {
        let mut seen = HashSet::new();
        let mut statuses = BTreeMap::new();
        for spec in &certificates {
            let invalid = |reason: &str| AcmeError::Spec {
                name: spec.name.clone(),
                reason: reason.into(),
            };
            if !valid_name(&spec.name) {
                return Err(invalid(
                    "not usable as a directory name (1 to 64 letters, digits, '-', '_', '.')",
                ));
            }
            if !seen.insert(spec.name.as_str()) {
                return Err(invalid("listed twice"));
            }
            if spec.dns_names.is_empty() {
                return Err(invalid("has no DNS names"));
            }
            statuses.insert(spec.name.clone(), CertificateStatus::new(spec));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                store: CertificateStore::new(&settings.store),
                settings,
                challenge,
                account: tokio::sync::Mutex::new(None),
                no_ari: AtomicBool::new(false),
                state: Arc::new(RenewerState {
                    certificates: RwLock::new(statuses),
                }),
            }),
            certificates,
        })
    }

    /// The live state, for status pages.
    pub fn state(&self) -> Arc<RenewerState> {
        Arc::clone(&self.shared.state)
    }

    /// Keeps every certificate until dropped (one task each; dropping this
    /// future stops them all).
    pub async fn run(self) {
        let mut tasks = JoinSet::new();
        for spec in self.certificates {
            tasks.spawn(Arc::clone(&self.shared).keep(spec));
        }
        while tasks.join_next().await.is_some() {}
    }
}

impl Shared {
    async fn keep(self: Arc<Self>, spec: CertificateSpec) {
        let mut current = self.load_usable(&spec);
        let mut plan: Option<RenewalPlan> = None;
        let mut failures = 0u32;
        loop {
            let Some(info) = current.clone() else {
                match self.issue(&spec, None).await {
                    Ok(issued) => (current, plan, failures) = (Some(issued), None, 0),
                    Err(error) => {
                        let delay = self.failed(&spec, &error, &mut failures);
                        tokio::time::sleep(delay).await;
                    }
                }
                continue;
            };
            let now = SystemTime::now();
            let next = match plan.take() {
                Some(previous) if !previous.recheck_due(now) => previous,
                previous => {
                    let next = self.plan(&info, previous.as_ref()).await;
                    self.report_plan(&spec, previous.as_ref(), &next);
                    next
                }
            };
            if SystemTime::now() >= next.renew_at {
                match self.issue(&spec, info.ari_id.clone()).await {
                    Ok(issued) => (current, plan, failures) = (Some(issued), None, 0),
                    Err(error) => {
                        plan = Some(next);
                        let delay = self.failed(&spec, &error, &mut failures);
                        tokio::time::sleep(delay).await;
                    }
                }
                continue;
            }
            let wake = next.wake_at();
            plan = Some(next);
            sleep_until(wake).await;
        }
    }

    /// The stored certificate when it can serve `spec` now.
    fn load_usable(&self, spec: &CertificateSpec) -> Option<CertificateInfo> {
        let stored = match self.store.load(&spec.name) {
            Ok(Some(stored)) => stored,
            Ok(None) => {
                info!(name = %spec.name, "no stored ACME certificate: ordering one");
                return None;
            }
            Err(error) => {
                warn!(name = %spec.name, %error, "stored ACME certificate unusable: ordering a new one");
                return None;
            }
        };
        let info = stored.info;
        if info.not_after <= SystemTime::now() {
            warn!(name = %spec.name, serial = %info.serial, "stored ACME certificate expired: ordering a new one");
            return None;
        }
        if !info.covers_exactly(&spec.dns_names) {
            info!(name = %spec.name, stored = ?info.dns_names, configured = ?spec.dns_names,
                "stored ACME certificate is for other names: ordering a new one");
            return None;
        }
        info!(name = %spec.name, serial = %info.serial,
            not_after = %humantime::format_rfc3339_seconds(info.not_after),
            "loaded the stored ACME certificate");
        self.state.update(&spec.name, |status| {
            status.serial = Some(info.serial.clone());
            status.not_after = Some(info.not_after);
        });
        Some(info)
    }

    /// Orders, stores and reports a certificate for `spec`.
    async fn issue(
        &self,
        spec: &CertificateSpec,
        replaces: Option<CertificateIdentifier<'static>>,
    ) -> Result<CertificateInfo, AcmeError> {
        let account = self.account().await?;
        let replaces = replaces.filter(|_| !self.no_ari.load(Ordering::Relaxed));
        let url = &self.settings.acme.directory_url;
        let method = self.challenge.method();
        let (issued, replaced) = match order_certificate(
            &account,
            url,
            &spec.dns_names,
            self.challenge.method(),
            replaces.clone(),
        )
        .await
        {
            Err(AcmeError::Protocol { source, .. })
                if replaces.is_some() && refused_replacement(&source) =>
            {
                // E.g. the replacement was issued but not stored (a crash,
                // a full disk), or the account was lost: order afresh.
                warn!(name = %spec.name, error = %source,
                    "the CA refused the order as a replacement: ordering a plain one");
                let issued =
                    order_certificate(&account, url, &spec.dns_names, method, None).await?;
                (issued, None)
            }
            other => (other?, replaces.map(|id| id.to_string())),
        };
        self.store
            .save(&spec.name, &issued.chain_pem, &issued.key)?;
        info!(name = %spec.name, serial = %issued.info.serial,
            not_after = %humantime::format_rfc3339_seconds(issued.info.not_after),
            replaced = replaced.as_deref().unwrap_or("-"),
            "ACME certificate stored");
        self.state.update(&spec.name, |status| {
            status.serial = Some(issued.info.serial.clone());
            status.not_after = Some(issued.info.not_after);
            status.last_error = None;
            status.failures = 0;
            status.issued += 1;
            status.replaced = replaced;
        });
        Ok(issued.info)
    }

    /// When to renew `info`: its ARI window, else 2/3 of its lifetime.
    async fn plan(&self, info: &CertificateInfo, previous: Option<&RenewalPlan>) -> RenewalPlan {
        let bounds = &self.settings.ari_bounds;
        let lifetime = |recheck_in: Option<Duration>| {
            lifetime_plan(
                &self.settings.policy,
                info.not_before,
                info.not_after,
                recheck_in.map(|delay| SystemTime::now() + delay),
            )
        };
        if self.no_ari.load(Ordering::Relaxed) {
            return lifetime(None);
        }
        let Some(id) = &info.ari_id else {
            debug!(serial = %info.serial, "no Authority Key Identifier: the CA cannot be asked (ARI)");
            return lifetime(None);
        };
        let account = match self.account().await {
            Ok(account) => account,
            Err(error) => {
                warn!(%error, "cannot reach the ACME account for ARI: the lifetime decides for now");
                return lifetime(Some(bounds.min));
            }
        };
        match account.renewal_info(id).await {
            Ok((answer, retry_after)) => {
                let window = (
                    SystemTime::from(answer.suggested_window.start),
                    SystemTime::from(answer.suggested_window.end),
                );
                ari_plan(
                    window,
                    retry_after,
                    SystemTime::now(),
                    info.not_after,
                    bounds,
                    previous,
                    rand::random::<f64>(),
                )
                .unwrap_or_else(|| {
                    warn!(serial = %info.serial, start = %humantime::format_rfc3339_seconds(window.0),
                        end = %humantime::format_rfc3339_seconds(window.1),
                        "the CA's ARI window is unusable: the lifetime decides");
                    lifetime(Some(bounds.clamp(retry_after)))
                })
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                if !self.no_ari.swap(true, Ordering::Relaxed) {
                    info!(directory = %self.settings.acme.directory_url,
                        "the ACME CA offers no renewal information (ARI): renewing at 2/3 of the lifetime");
                }
                lifetime(None)
            }
            Err(error) => {
                warn!(%error, serial = %info.serial,
                    "ARI query failed: the lifetime decides until the next query");
                lifetime(Some(bounds.min))
            }
        }
    }

    fn report_plan(
        &self,
        spec: &CertificateSpec,
        previous: Option<&RenewalPlan>,
        next: &RenewalPlan,
    ) {
        let changed =
            previous.is_none_or(|p| (p.renew_at, p.source) != (next.renew_at, next.source));
        if changed {
            info!(name = %spec.name, source = %next.source,
                renew_at = %humantime::format_rfc3339_seconds(next.renew_at),
                "next ACME renewal");
        }
        self.state.update(&spec.name, |status| {
            status.next_renewal = Some(next.renew_at);
            status.next_ari_check = next.recheck_at;
            status.source = Some(next.source);
        });
    }

    /// Records a failed order; returns how long to wait before the next.
    fn failed(&self, spec: &CertificateSpec, error: &AcmeError, failures: &mut u32) -> Duration {
        let delay = self.settings.policy.retry_delay(*failures);
        *failures = failures.saturating_add(1);
        warn!(name = %spec.name, %error, failures = *failures, retry_in = ?delay,
            "ACME order failed: keeping the current certificate");
        let attempts = *failures;
        self.state.update(&spec.name, |status| {
            status.last_error = Some(error.to_string());
            status.failures = attempts;
        });
        delay
    }

    /// The account, loaded from the store or registered (and stored) once.
    async fn account(&self) -> Result<Account, AcmeError> {
        let mut slot = self.account.lock().await;
        if let Some(account) = slot.as_ref() {
            return Ok(account.clone());
        }
        let acme = &self.settings.acme;
        let stored = self
            .store
            .load_account(&acme.directory_url)
            .unwrap_or_else(|error| {
                warn!(%error, "the stored ACME account is unusable: registering a new one");
                None
            });
        let account = match stored {
            Some(credentials) => account_builder(acme)?
                .from_credentials(credentials)
                .await
                .map_err(protocol_error(&acme.directory_url))?,
            None => {
                let (account, credentials) = create_account(acme).await?;
                self.store.save_account(&credentials)?;
                info!(directory = %acme.directory_url, id = account.id(), "ACME account registered");
                account
            }
        };
        *slot = Some(account.clone());
        Ok(account)
    }
}

/// Errors for which an order without `replaces` may succeed.
fn refused_replacement(error: &instant_acme::Error) -> bool {
    match error {
        instant_acme::Error::Unsupported(_) => true,
        instant_acme::Error::Api(problem) => problem.r#type.as_deref().is_some_and(|kind| {
            kind.ends_with(":alreadyReplaced") || kind.ends_with(":unauthorized")
        }),
        instant_acme::Error::Other(other) => other.to_string().contains("replaces"),
        _ => false,
    }
}

async fn sleep_until(at: SystemTime) {
    let delay = at
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .min(MAX_SLEEP);
    tokio::time::sleep(delay).await;
}
