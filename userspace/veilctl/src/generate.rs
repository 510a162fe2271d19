//! `veilctl generate`: the Kubernetes YAML for a desired mTLS state.
//!
//! Incremental adoption: start a namespace PERMISSIVE, then make one
//! workload, or one port of it, STRICT, one `MTLSPolicy` at a time. The
//! object is built from `veil-crd`'s own type and serialized, so what is
//! printed is exactly what the CRD accepts; nothing is sent anywhere (pipe it
//! to `kubectl apply -f -`).

use veil_crd::{MTLSMode, MTLSPolicy, MTLSPolicySpec};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("--port needs --service-account: a port belongs to a workload")]
    PortWithoutWorkload,
    #[error(
        "{what} {value:?} is not a Kubernetes name (lowercase letters, digits, '-', at most 63)"
    )]
    BadName { what: &'static str, value: String },
    #[error("cannot write YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("cannot write JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// What the user wants.
pub struct Desired<'a> {
    pub namespace: &'a str,
    pub service_account: Option<&'a str>,
    pub port: Option<u16>,
    pub mode: MTLSMode,
    pub name: Option<&'a str>,
}

fn check_name(what: &'static str, value: &str) -> Result<(), GenerateError> {
    let valid = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(GenerateError::BadName {
            what,
            value: value.into(),
        })
    }
}

/// The `MTLSPolicy` for `desired`, as YAML (with a comment saying what it does).
pub fn mtls_policy(desired: &Desired<'_>) -> Result<String, GenerateError> {
    let policy = build(desired)?;
    let scope = match (desired.service_account, desired.port) {
        (Some(sa), Some(port)) => format!("port {port} of workload {sa}"),
        (Some(sa), None) => format!("workload {sa}"),
        (None, _) => "every workload".into(),
    };
    Ok(format!(
        "# mTLS {} for {scope} in namespace {} (apply with `kubectl apply -f -`;\n\
         # `veilctl mtls <pod> [--port]` on a node shows the mode that results).\n{}",
        desired.mode.as_str(),
        desired.namespace,
        serde_yaml::to_string(&policy)?
    ))
}

/// The `MTLSPolicy` for `desired`, as JSON (`-o json`; kubectl takes it too).
pub fn mtls_policy_json(desired: &Desired<'_>) -> Result<String, GenerateError> {
    Ok(serde_json::to_string_pretty(&build(desired)?)?)
}

fn build(desired: &Desired<'_>) -> Result<MTLSPolicy, GenerateError> {
    check_name("--namespace", desired.namespace)?;
    if let Some(service_account) = desired.service_account {
        check_name("--service-account", service_account)?;
    }
    if desired.port.is_some() && desired.service_account.is_none() {
        return Err(GenerateError::PortWithoutWorkload);
    }
    let name = match (desired.name, desired.service_account, desired.port) {
        (Some(name), _, _) => name.to_string(),
        (None, Some(service_account), Some(port)) => format!("{service_account}-port-{port}"),
        (None, Some(service_account), None) => service_account.to_string(),
        (None, None, _) => "namespace-default".into(),
    };
    check_name("--name", &name)?;
    let mut policy = MTLSPolicy::new(
        &name,
        MTLSPolicySpec {
            service_account: desired.service_account.map(str::to_string),
            port: desired.port,
            mode: desired.mode,
        },
    );
    policy.metadata.namespace = Some(desired.namespace.to_string());
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(service_account: Option<&'static str>, port: Option<u16>) -> Desired<'static> {
        Desired {
            namespace: "shop",
            service_account,
            port,
            mode: MTLSMode::Strict,
            name: None,
        }
    }

    #[test]
    fn a_port_policy_reads_back_as_the_crd_type() {
        let yaml = mtls_policy(&desired(Some("checkout"), Some(8080))).unwrap();
        let policy: MTLSPolicy = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(policy.metadata.name.as_deref(), Some("checkout-port-8080"));
        assert_eq!(policy.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(policy.spec.port, Some(8080));
        assert_eq!(policy.spec.mode, MTLSMode::Strict);
        assert!(yaml.contains("apiVersion: veil.dev/v1alpha1"), "{yaml}");
        assert!(yaml.contains("mode: STRICT"), "{yaml}");
    }

    #[test]
    fn namespace_and_workload_policies_get_sensible_names() {
        let namespace: MTLSPolicy =
            serde_yaml::from_str(&mtls_policy(&desired(None, None)).unwrap()).unwrap();
        assert_eq!(
            namespace.metadata.name.as_deref(),
            Some("namespace-default")
        );
        assert_eq!(namespace.spec.service_account, None);
        let workload: MTLSPolicy =
            serde_yaml::from_str(&mtls_policy(&desired(Some("cart"), None)).unwrap()).unwrap();
        assert_eq!(workload.metadata.name.as_deref(), Some("cart"));
    }

    #[test]
    fn json_output_is_the_same_object() {
        let json = mtls_policy_json(&desired(Some("checkout"), Some(8080))).unwrap();
        let policy: MTLSPolicy = serde_json::from_str(&json).unwrap();
        let yaml: MTLSPolicy =
            serde_yaml::from_str(&mtls_policy(&desired(Some("checkout"), Some(8080))).unwrap())
                .unwrap();
        assert_eq!(policy, yaml);
        assert_eq!(policy.metadata.namespace.as_deref(), Some("shop"));
    }

    #[test]
    fn bad_requests_say_what_to_change() {
        let error = mtls_policy(&desired(None, Some(80)))
            .unwrap_err()
            .to_string();
        assert!(error.contains("--port needs --service-account"), "{error}");
        let mut bad = desired(Some("Cart_1"), None);
        bad.mode = MTLSMode::Permissive;
        let error = mtls_policy(&bad).unwrap_err().to_string();
        assert!(error.contains("--service-account \"Cart_1\""), "{error}");
    }
}
