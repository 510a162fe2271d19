//! Control-plane events: pod lifecycle, certificates, policy and flow records.
//!
//! Every event travels in a versioned [`schema::Envelope`] whose key gives
//! per-object ordering (a pod's events share its key) and whose sequence
//! number makes applying idempotent ([`apply::Applier`]): replays and
//! duplicates are harmless, older versions never overwrite newer ones. With a
//! Kafka broker configured the same envelopes go to Kafka; without one (a bare
//! host, the demo) the [`journal::EmbeddedBus`] keeps them in a local
//! append-only journal with per-group committed offsets — same interface,
//! nothing else changes ([`bus::EventBus`]). The Kafka bus
//! ([`kafka::KafkaBus`]) keeps what the broker has not acknowledged in an
//! [`outbox::Outbox`] (memory, then disk), so an outage loses nothing.

pub mod apply;
pub mod bus;
pub mod journal;
pub mod kafka;
pub mod outbox;
pub mod schema;
