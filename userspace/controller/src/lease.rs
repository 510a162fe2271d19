//! Leader election with a `coordination.k8s.io/v1` Lease: of the
//! controller's replicas, only the holder reconciles.
//!
//! The holder renews every [`RENEW_EVERY`]; another replica takes over once
//! the lease has not been renewed for its duration. Updates carry the
//! resourceVersion they read, so two replicas racing for an expired lease
//! cannot both win (the loser gets 409 Conflict and tries again later).

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    chrono::{self, Utc},
};
use kube::{Api, Client, api::PostParams};
use tracing::info;

/// How long a lease stays valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    holder: String,
}

impl LeaseLock {
    pub fn new(client: Client, namespace: &str, name: &str, holder: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            holder: holder.into(),
        }
    }

    fn spec(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(Utc::now());
        let ours = previous.and_then(|p| p.holder_identity.as_deref()) == Some(&self.holder);
        LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: if ours {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(
                previous.and_then(|p| p.lease_transitions).unwrap_or(0) + i32::from(!ours),
            ),
            ..LeaseSpec::default()
        }
    }

    /// One attempt to take or renew the lease; true when we hold it after.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let current = match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(None)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                };
            }
            Some(lease) => lease,
        };
        let spec = current.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(&self.holder);
        let expired = spec.renew_time.as_ref().is_none_or(|renewed| {
            let duration = spec
                .lease_duration_seconds
                .map_or(LEASE_DURATION.as_secs() as i64, i64::from);
            renewed.0 + chrono::Duration::seconds(duration) < Utc::now()
        });
        if !ours && !expired {
            return Ok(false);
        }
        let mut updated = current.clone();
        updated.spec = Some(self.spec(Some(&spec)));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &updated)
            .await
        {
            Ok(_) => {
                if !ours {
                    info!(holder = %self.holder, lease = %self.name, "became the leader");
                }
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) -> Result<(), kube::Error> {
        loop {
            if self.try_acquire().await? {
                return Ok(());
            }
            tokio::time::sleep(RENEW_EVERY).await;
        }
    }

    /// Renews until a renewal fails or finds the lease taken; returns why.
    pub async fn hold(&self) -> String {
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match self.try_acquire().await {
                Ok(true) => {}
                Ok(false) => return "another replica holds the lease now".into(),
                Err(error) => return format!("cannot renew the lease: {error}"),
            }
        }
    }
}
