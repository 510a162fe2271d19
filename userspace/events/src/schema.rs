//! The wire schema of control-plane events (JSON), version 1.
//!
//! ```json
//! {"schema":1,"topic":"pods","key":"shop/cart-7d9","seq":3,
//!  "event":{"type":"pod-ready","namespace":"shop","pod":"cart-7d9","node":"node1",
//!           "ip":"198.19.1.4","identity":"spiffe://cluster.local/ns/shop/sa/cart"}}
//! ```
//!
//! `key` orders events of one object; `seq` increases with each change of
//! that object. A reader refuses an unknown `schema` rather than guessing.

use serde::{Deserialize, Serialize};

pub const SCHEMA_VERSION: u16 = 1;

/// Where an event belongs; topic names are configuration, these are the roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Topic {
    Pods,
    Certificates,
    Policy,
    Flows,
}

impl Topic {
    pub const ALL: [Topic; 4] = [Self::Pods, Self::Certificates, Self::Policy, Self::Flows];

    pub fn name(self) -> &'static str {
        match self {
            Self::Pods => "pods",
            Self::Certificates => "certificates",
            Self::Policy => "policy",
            Self::Flows => "flows",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Event {
    PodScheduled {
        namespace: String,
        pod: String,
        node: String,
        identity: String,
    },
    PodReady {
        namespace: String,
        pod: String,
        node: String,
        ip: String,
        identity: String,
    },
    PodDeleted {
        namespace: String,
        pod: String,
    },
    CertificateIssued {
        identity: String,
        serial: String,
        not_after: String,
    },
    CertificateRotated {
        identity: String,
        serial: String,
        previous_serial: String,
    },
    CertificateRevoked {
        identity: String,
        serial: String,
    },
    /// Every certificate of `identity` issued before `revoked_before` (RFC
    /// 3339, whole seconds) is refused; its holders re-key. An agent that
    /// does not know this type counts it as unknown and skips it.
    IdentityRevoked {
        identity: String,
        revoked_before: String,
    },
    PolicyChanged {
        name: String,
        version: u64,
    },
    Flow {
        source: String,
        destination: String,
        bytes: u64,
        mode: String,
        result: String,
    },
}

/// One event on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub schema: u16,
    pub topic: Topic,
    /// Orders the events of one object (e.g. `namespace/pod`, or an identity).
    pub key: String,
    /// Increases with every change of the object; applying is idempotent by it.
    pub seq: u64,
    pub event: Event,
}

impl Envelope {
    pub fn new(topic: Topic, key: impl Into<String>, seq: u64, event: Event) -> Self {
        Self {
            schema: SCHEMA_VERSION,
            topic,
            key: key.into(),
            seq,
            event,
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("envelopes always serialize")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a Veil event: {0}")]
    Malformed(String),
    #[error(
        "event schema version {0} is not supported (this agent reads version {SCHEMA_VERSION}): upgrade the agent"
    )]
    UnknownVersion(u64),
}

/// Decodes one event, refusing garbage and unknown schema versions by name.
pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    match value.get("schema").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(SCHEMA_VERSION) => {}
        Some(v) => return Err(DecodeError::UnknownVersion(v)),
        None => return Err(DecodeError::Malformed("no schema version".into())),
    }
    serde_json::from_value(value).map_err(|e| DecodeError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> Envelope {
        Envelope::new(
            Topic::Pods,
            "shop/cart-7d9",
            3,
            Event::PodReady {
                namespace: "shop".into(),
                pod: "cart-7d9".into(),
                node: "node1".into(),
                ip: "198.19.1.4".into(),
                identity: "spiffe://cluster.local/ns/shop/sa/cart".into(),
            },
        )
    }

    #[test]
    fn round_trips_in_the_documented_shape() {
        let text = ready().encode();
        assert!(text.starts_with(r#"{"schema":1,"topic":"pods","key":"shop/cart-7d9","seq":3,"event":{"type":"pod-ready""#), "{text}");
        assert_eq!(decode(text.as_bytes()), Ok(ready()));
    }

    #[test]
    fn garbage_and_unknown_versions_are_named() {
        assert!(matches!(
            decode(b"\x00\xff not json"),
            Err(DecodeError::Malformed(_))
        ));
        let v2 = ready().encode().replace(r#""schema":1"#, r#""schema":2"#);
        assert_eq!(decode(v2.as_bytes()), Err(DecodeError::UnknownVersion(2)));
        let unknown_event = ready().encode().replace("pod-ready", "pod-teleported");
        assert!(matches!(
            decode(unknown_event.as_bytes()),
            Err(DecodeError::Malformed(_))
        ));
    }
}
