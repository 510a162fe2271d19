//! Applying events exactly once in effect, whatever the delivery does.
//!
//! Brokers deliver at least once, and after a restart from the last committed
//! offset some events come again; partitions may interleave. The applier keeps
//! the highest sequence applied per key and ignores anything not newer, so
//! duplicates and stale, out-of-order deliveries change nothing.

use std::collections::HashMap;

use crate::schema::{Envelope, Topic};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Newer than anything seen for its key: the caller applies it.
    Apply,
    /// Already applied, or older than what was: ignore.
    Stale,
}

/// Per-key high-water marks.
#[derive(Debug, Default, Clone)]
pub struct Applier {
    applied: HashMap<(Topic, String), u64>,
}

impl Applier {
    /// Decides whether `envelope` should be applied, and records it if so.
    pub fn admit(&mut self, envelope: &Envelope) -> Outcome {
        let slot = self
            .applied
            .entry((envelope.topic, envelope.key.clone()))
            .or_insert(0);
        if envelope.seq > *slot {
            *slot = envelope.seq;
            Outcome::Apply
        } else {
            Outcome::Stale
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Event;

    fn deleted(key: &str, seq: u64) -> Envelope {
        Envelope::new(
            Topic::Pods,
            key,
            seq,
            Event::PodDeleted {
                namespace: "shop".into(),
                pod: key.into(),
            },
        )
    }

    #[test]
    fn duplicates_and_older_versions_are_not_applied_again() {
        let mut applier = Applier::default();
        assert_eq!(applier.admit(&deleted("a", 1)), Outcome::Apply);
        assert_eq!(applier.admit(&deleted("a", 1)), Outcome::Stale, "duplicate");
        assert_eq!(applier.admit(&deleted("a", 3)), Outcome::Apply);
        assert_eq!(
            applier.admit(&deleted("a", 2)),
            Outcome::Stale,
            "out of order"
        );
        assert_eq!(
            applier.admit(&deleted("b", 1)),
            Outcome::Apply,
            "keys are independent"
        );
    }
}
