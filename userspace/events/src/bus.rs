//! The event bus interface, shared by Kafka and the embedded journal.
//!
//! The agent publishes and consumes through [`EventBus`] and [`EventConsumer`]
//! and never learns which transport is behind them: [`crate::kafka::KafkaBus`]
//! when a broker is configured, [`crate::journal::EmbeddedBus`] when not.
//! Delivery is at least once; consumers commit a position only after the
//! event is applied ([`apply_batch`]), and the [`Applier`] turns redeliveries
//! and out-of-order events into no-ops. Messages that do not decode are
//! delivered as errors with their position, logged, counted, and committed
//! like any other: they never block a partition.

use std::{collections::HashMap, fmt, time::Duration};

use crate::{
    apply::{Applier, Outcome},
    schema::{DecodeError, Envelope, Topic},
};

/// Where a delivered message sits on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// The transport's topic name (`veil.pods`; the role name on the embedded bus).
    pub topic: String,
    /// Kafka partition; always 0 on the embedded bus.
    pub partition: i32,
    /// The message's own offset (a byte offset on the embedded bus).
    pub offset: u64,
    /// What to commit once the message is applied (the next message's offset).
    pub next: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]@{}", self.topic, self.partition, self.offset)
    }
}

/// One message from the bus: an event, or why it is not one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub position: Position,
    pub event: Result<Envelope, DecodeError>,
    /// When the message was published, where the transport records it
    /// (Kafka's CreateTime); consumers measure their lag from it.
    pub published: Option<std::time::SystemTime>,
}

/// Whether the bus can deliver right now; the agent's readiness reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusState {
    /// The broker answers and takes events.
    Connected,
    /// Events are kept in the outbox until the broker is back; nothing is lost
    /// unless the outbox is full, which `publish` reports.
    Degraded { reason: String },
}

impl fmt::Display for BusState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connected => f.write_str("connected"),
            Self::Degraded { reason } => write!(f, "degraded: event bus: {reason}"),
        }
    }
}

/// A transport for control-plane events.
pub trait EventBus {
    type Error: std::error::Error + Send + Sync + 'static;
    type Consumer: EventConsumer<Error = Self::Error>;

    /// Hands `envelope` to the bus. `Ok` means it will be delivered (at least
    /// once) even if the broker is down now; an error means it will not.
    fn publish(&self, envelope: &Envelope) -> Result<(), Self::Error>;

    /// A consumer of `topics` for consumer `group`, starting at the group's
    /// committed positions (from the beginning for a new group).
    fn subscribe(&self, group: &str, topics: &[Topic]) -> Result<Self::Consumer, Self::Error>;

    fn state(&self) -> BusState;

    /// Messages that did not decode, over all consumers of this bus.
    fn malformed(&self) -> u64;
}

/// Reads events for one consumer group.
pub trait EventConsumer {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Up to `max` messages, waiting up to `timeout` for the first.
    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivery>, Self::Error>;

    /// Records that every message up to these positions (per topic and
    /// partition: the furthest one) is applied.
    fn commit(&mut self, positions: &[Position]) -> Result<(), Self::Error>;

    /// Messages this consumer skipped because they did not decode.
    fn malformed(&self) -> u64;
}

/// The furthest position per topic and partition.
pub fn furthest(positions: &[Position]) -> Vec<Position> {
    let mut best: HashMap<(&str, i32), &Position> = HashMap::new();
    for position in positions {
        let slot = best
            .entry((position.topic.as_str(), position.partition))
            .or_insert(position);
        if position.next > slot.next {
            *slot = position;
        }
    }
    let mut out: Vec<Position> = best.into_values().cloned().collect();
    out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    out
}

/// What one [`apply_batch`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Messages polled.
    pub delivered: usize,
    /// Events newer than anything seen for their key: handed to `apply`.
    pub applied: usize,
    /// Duplicates and older versions: ignored.
    pub stale: usize,
    /// Messages that did not decode: logged, skipped, committed.
    pub malformed: usize,
}

/// Polls once, applies what is new (through `applier`, so duplicates and
/// stale events are ignored), logs and skips what does not decode, then
/// commits everything polled. Commit-after-apply: a crash before the commit
/// redelivers the batch, which the applier makes harmless.
///
/// `apply` cannot fail: it records the wanted state (the agent reconciles
/// kernel maps from that state separately), so an event once applied is done.
pub fn apply_batch<C: EventConsumer>(
    consumer: &mut C,
    applier: &mut Applier,
    max: usize,
    timeout: Duration,
    mut apply: impl FnMut(&Envelope),
) -> Result<BatchReport, C::Error> {
    apply_batch_with(
        consumer,
        applier,
        max,
        timeout,
        &mut Vec::new(),
        |e, _| apply(e),
        |_| true,
    )
}

/// [`apply_batch`], handing `apply` each event's publication time too, and
/// committing only what the caller has made durable: the positions polled
/// collect in `pending`, and after each poll `durable(applied_any)` is asked
/// whether everything applied so far is persisted (the caller may persist
/// now, or wait to persist many batches at once and answer `false`); on
/// `true` the furthest pending positions are committed. `durable` is also
/// asked after empty polls while positions are pending, so a quiet bus still
/// gets its last events committed.
pub fn apply_batch_with<C: EventConsumer>(
    consumer: &mut C,
    applier: &mut Applier,
    max: usize,
    timeout: Duration,
    pending: &mut Vec<Position>,
    mut apply: impl FnMut(&Envelope, Option<std::time::SystemTime>),
    mut durable: impl FnMut(bool) -> bool,
) -> Result<BatchReport, C::Error> {
    let deliveries = consumer.poll(max, timeout)?;
    let mut report = BatchReport {
        delivered: deliveries.len(),
        ..BatchReport::default()
    };
    for delivery in &deliveries {
        match &delivery.event {
            Ok(envelope) => match applier.admit(envelope) {
                Outcome::Apply => {
                    apply(envelope, delivery.published);
                    report.applied += 1;
                }
                Outcome::Stale => report.stale += 1,
            },
            // Already logged and counted by the consumer.
            Err(_) => report.malformed += 1,
        }
    }
    pending.extend(deliveries.into_iter().map(|d| d.position));
    if !pending.is_empty() && durable(report.applied > 0) {
        consumer.commit(&furthest(pending))?;
        pending.clear();
    }
    Ok(report)
}

/// Logs a message that did not decode, with where it is.
pub(crate) fn log_malformed(position: &Position, error: &DecodeError) {
    tracing::warn!(
        topic = %position.topic,
        partition = position.partition,
        offset = position.offset,
        %error,
        "skipping an event that does not decode"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(topic: &str, partition: i32, offset: u64) -> Position {
        Position {
            topic: topic.into(),
            partition,
            offset,
            next: offset + 1,
        }
    }

    #[test]
    fn furthest_keeps_one_position_per_partition() {
        let positions = [
            at("veil.pods", 0, 4),
            at("veil.pods", 1, 2),
            at("veil.pods", 0, 9),
            at("veil.pods", 0, 7),
            at("veil.policy", 0, 1),
        ];
        assert_eq!(
            furthest(&positions),
            [
                at("veil.pods", 0, 9),
                at("veil.pods", 1, 2),
                at("veil.policy", 0, 1)
            ]
        );
    }

    #[test]
    fn degraded_state_reads_as_the_readiness_reason() {
        let state = BusState::Degraded {
            reason: "all brokers down".into(),
        };
        assert_eq!(state.to_string(), "degraded: event bus: all brokers down");
    }
}
