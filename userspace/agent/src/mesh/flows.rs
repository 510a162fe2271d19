//! What talked to what: the last meshed connections of this node, for
//! `veilctl flows` — source and destination pods, direction, TLS mode,
//! result (`ok` or why it was refused) and bytes each way.
//!
//! A bounded ring (the newest [`CAPACITY`]), so memory stays flat however
//! many connections pass. With an event bus, every record is also handed to
//! a sink ([`FlowLog::publish_to`]) that puts it on `veil.flows`.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Mutex, OnceLock},
    time::{SystemTime, UNIX_EPOCH},
};

use veil_api::FlowRecord;

use super::{directory::Directory, metrics::Direction};

/// How many flows are kept.
pub const CAPACITY: usize = 1024;

/// Where finished flows go besides the ring (the event bus).
pub type FlowSink = Box<dyn Fn(&FlowRecord) + Send + Sync>;

#[derive(Default)]
pub struct FlowLog {
    records: Mutex<VecDeque<FlowRecord>>,
    sink: OnceLock<FlowSink>,
}

impl std::fmt::Debug for FlowLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowLog")
            .field("records", &self.records)
            .field("published", &self.sink.get().is_some())
            .finish()
    }
}

/// What one connection did.
pub struct Flow<'a> {
    pub direction: Direction,
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    pub mode: &'static str,
    /// `ok`, `ended_with_error`, why it was refused, or `reset: <why>`.
    pub result: std::borrow::Cow<'static, str>,
    pub bytes_to_peer: u64,
    pub bytes_to_pod: u64,
    pub directory: &'a Directory,
}

impl FlowLog {
    /// Hands every later record to `sink` too (set once; later calls are ignored).
    pub fn publish_to(&self, sink: FlowSink) {
        let _ = self.sink.set(sink);
    }

    pub fn record(&self, flow: Flow<'_>) {
        let name = |address: Option<SocketAddr>| {
            address.map_or_else(String::new, |address| match address {
                SocketAddr::V4(v4) => flow
                    .directory
                    .meshed_pod(*v4.ip())
                    .ok()
                    .flatten()
                    .map_or_else(
                        || address.to_string(),
                        |pod| format!("{} ({address})", pod.name),
                    ),
                SocketAddr::V6(_) => address.to_string(),
            })
        };
        let record = FlowRecord {
            unix_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            direction: flow.direction.as_str().into(),
            source: name(flow.source),
            destination: name(flow.destination),
            mode: flow.mode.into(),
            result: flow.result.into(),
            bytes_to_peer: flow.bytes_to_peer,
            bytes_to_pod: flow.bytes_to_pod,
        };
        if let Some(sink) = self.sink.get() {
            sink(&record);
        }
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.len() == CAPACITY {
            records.pop_front();
        }
        records.push_back(record);
    }

    /// Oldest first.
    pub fn snapshot(&self) -> Vec<FlowRecord> {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records.iter().cloned().collect()
    }
}
