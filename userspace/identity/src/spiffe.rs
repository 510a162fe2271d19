//! SPIFFE IDs of Kubernetes workloads: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

use std::{fmt, str::FromStr};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a workload SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>): {reason}"
)]
pub struct SpiffeIdError {
    input: String,
    reason: &'static str,
}

/// A workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds an ID from its parts, checking each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let error = |reason| SpiffeIdError {
            input: input.into(),
            reason,
        };
        let rest = input
            .strip_prefix("spiffe://")
            .ok_or_else(|| error("it must start with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [trust_domain, "ns", namespace, "sa", service_account] = parts[..] else {
            return Err(error(
                "the path must be /ns/<namespace>/sa/<service-account>",
            ));
        };
        // SPIFFE: trust domains are lowercase letters, digits, '.', '-', '_'.
        if trust_domain.is_empty()
            || !trust_domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b))
        {
            return Err(error(
                "the trust domain must be lowercase letters, digits, '.', '-' or '_'",
            ));
        }
        // Kubernetes names: DNS labels.
        for name in [namespace, service_account] {
            let valid = (1..=253).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-".contains(&b))
                && !name.starts_with('-')
                && !name.ends_with('-');
            if !valid {
                return Err(error(
                    "namespace and service account must be Kubernetes names",
                ));
            }
        }
        Ok(Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "cart");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(SpiffeId::new("cluster.local", "shop", "cart").unwrap(), id);
    }

    #[test]
    fn malformed_ids_say_what_is_wrong() {
        for (input, reason) in [
            ("https://cluster.local/ns/a/sa/b", "spiffe://"),
            ("spiffe://cluster.local/ns/a", "/ns/<namespace>/sa/"),
            ("spiffe://Cluster/ns/a/sa/b", "trust domain"),
            ("spiffe://td/ns/A_B/sa/b", "Kubernetes names"),
            ("spiffe://td/ns/a/sa/b/extra", "/ns/<namespace>/sa/"),
        ] {
            let error = input.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(error.contains(reason), "{input}: {error}");
        }
    }
}
