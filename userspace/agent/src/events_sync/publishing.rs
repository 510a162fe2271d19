//! What the agent publishes: certificate events from its workload store and
//! flow records from its mesh, through whichever bus runs, each sequenced
//! by microseconds so that it only grows.

use std::sync::Arc;

use tracing::warn;
use veil_events::{
    bus::EventBus,
    schema::{Envelope, Event, Topic},
};

use super::Events;

/// Publishing through whichever bus runs.
pub(super) trait Publisher: Send + Sync {
    fn publish(&self, envelope: &Envelope) -> Result<(), String>;
}

impl<B> Publisher for B
where
    B: EventBus + Send + Sync,
    B::Error: std::fmt::Display,
{
    fn publish(&self, envelope: &Envelope) -> Result<(), String> {
        EventBus::publish(self, envelope).map_err(|e| e.to_string())
    }
}

impl Events {
    /// A hook for the workload store (sequenced like [`Self::flow_sink`]):
    /// each certificate issued here becomes
    /// `certificate-issued` (first) or `certificate-rotated` (renewal or
    /// re-key) on `veil.certificates`, keyed `<node>/<identity>`.
    pub fn certificate_hook(&self, node_name: &str) -> crate::mesh::workloads::IssueHook {
        let bus = Arc::clone(&self.bus);
        let node = node_name.to_string();
        let sequence = MicrosSequence::default();
        Box::new(move |workload, previous| {
            let seq = sequence.next();
            let identity = workload.identity.to_string();
            let event = match previous {
                None => Event::CertificateIssued {
                    identity: identity.clone(),
                    serial: workload.serial.clone(),
                    not_after: humantime::format_rfc3339_seconds(workload.not_after).to_string(),
                },
                Some(previous) => Event::CertificateRotated {
                    identity: identity.clone(),
                    serial: workload.serial.clone(),
                    previous_serial: previous.to_string(),
                },
            };
            let key = format!("{node}/{identity}");
            if let Err(error) = bus.publish(&Envelope::new(Topic::Certificates, key, seq, event)) {
                warn!(%error, "certificate event not published");
            }
        })
    }

    /// A sink for the mesh's flow records: each becomes a `flow` event on
    /// `veil.flows`, keyed by this node (its flows stay in order) and
    /// sequenced by microseconds since the epoch (strictly increasing, also
    /// across restarts). Publishing never blocks on the broker (outbox).
    pub fn flow_sink(&self, node_name: &str) -> crate::mesh::flows::FlowSink {
        let bus = Arc::clone(&self.bus);
        let key = node_name.to_string();
        let sequence = MicrosSequence::default();
        Box::new(move |record: &veil_api::FlowRecord| {
            let seq = sequence.next();
            let event = Event::Flow {
                source: record.source.clone(),
                destination: record.destination.clone(),
                bytes: record.bytes_to_peer + record.bytes_to_pod,
                mode: record.mode.clone(),
                result: record.result.clone(),
            };
            if let Err(error) = bus.publish(&Envelope::new(Topic::Flows, key.clone(), seq, event)) {
                warn!(%error, "flow record not published");
            }
        })
    }
}

/// Event sequences for what this agent publishes: microseconds since the
/// epoch, strictly increasing (also across restarts, clock permitting).
#[derive(Default)]
struct MicrosSequence(std::sync::atomic::AtomicU64);

impl MicrosSequence {
    fn next(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        let next = |previous: u64| now.max(previous + 1);
        self.0
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |previous| Some(next(previous)),
            )
            .map_or(now, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_sequences_only_grow_even_within_one_microsecond() {
        let sequence = MicrosSequence::default();
        let values: Vec<u64> = (0..1000).map(|_| sequence.next()).collect();
        assert!(values.windows(2).all(|w| w[0] < w[1]));
        assert!(
            values[0] > 1_700_000_000_000_000,
            "microseconds since the epoch"
        );
    }
}
