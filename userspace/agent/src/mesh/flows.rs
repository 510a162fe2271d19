//! What talked to what: the last meshed connections of this node, for
//! `veilctl flows` — source and destination pods, direction, TLS mode,
//! result (`ok` or why it was refused) and bytes each way.
//!
//! A bounded ring (the newest [`CAPACITY`]), so memory stays flat however
//! many connections pass.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use veil_api::FlowRecord;

use super::{directory::Directory, metrics::Direction};

/// How many flows are kept.
pub const CAPACITY: usize = 1024;

#[derive(Debug, Default)]
pub struct FlowLog {
    records: Mutex<VecDeque<FlowRecord>>,
}

/// What one connection did.
pub struct Flow<'a> {
    pub direction: Direction,
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    pub mode: &'static str,
    pub result: &'static str,
    pub bytes_to_peer: u64,
    pub bytes_to_pod: u64,
    pub directory: &'a Directory,
}

impl FlowLog {
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
