//! The embedded bus: the event bus when no broker is configured.
//!
//! One append-only journal file per topic (JSON lines, each append synced to
//! disk before `publish` returns), and per consumer group a committed offset
//! (a byte position, written atomically). Consumers read from their committed
//! offset, so after a restart they see again what they had not committed —
//! with [`crate::apply::Applier`] that is harmless. A line that does not
//! decode is delivered as an error with its offset, counted and skipped: it
//! never stops the consumer.
//!
//! Flow records are telemetry, many and never consumed by agents: their
//! journal is not synced per record, stays open between records (one comes
//! per connection, on the connection's thread: one write each instead of
//! stat, open, seek, write and close), and is kept to two files of
//! [`FLOW_JOURNAL_LIMIT`] (`flows.jsonl` and the previous `flows.jsonl.1`),
//! the way the Kafka topic's retention bounds it.
//!
//! [`EmbeddedBus`] implements [`EventBus`] like the Kafka bus does, so the
//! agent uses either without knowing which.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Seek, SeekFrom, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    bus::{self, BusState, EventBus, EventConsumer, Position},
    schema::{DecodeError, Envelope, Topic, decode},
};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("event journal {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("consumer group name {0:?} must be 1-64 characters of a-z, 0-9, '-' or '_'")]
    BadGroup(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A local, durable event bus.
#[derive(Debug, Clone)]
pub struct EmbeddedBus {
    dir: PathBuf,
    malformed: Arc<AtomicU64>,
    /// The flow journal, open for appending once the first record comes.
    flows: Arc<std::sync::Mutex<Option<OpenJournal>>>,
}

/// Size past which the flow journal is rotated.
pub const FLOW_JOURNAL_LIMIT: u64 = 64 * 1024 * 1024;

/// A journal file kept open for appending, and its size.
#[derive(Debug)]
struct OpenJournal {
    file: File,
    size: u64,
}

fn open_for_append(path: &Path) -> Result<File, JournalError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))
}

/// One event read from the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Byte offset of the event in its topic's journal.
    pub offset: u64,
    /// The offset to commit once this event is applied.
    pub next: u64,
    pub event: Result<Envelope, DecodeError>,
}

impl EmbeddedBus {
    /// Opens (creating, mode 0700) the journal directory.
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        Ok(Self {
            dir: dir.to_owned(),
            malformed: Arc::default(),
            flows: Arc::default(),
        })
    }

    fn journal(&self, topic: Topic) -> PathBuf {
        self.dir.join(format!("{}.jsonl", topic.name()))
    }

    /// Appends `envelope` to its topic and returns its offset once on disk
    /// (flow records: once written, and the journal rotated past its limit).
    pub fn publish(&self, envelope: &Envelope) -> Result<u64, JournalError> {
        self.publish_limited(envelope, FLOW_JOURNAL_LIMIT)
    }

    fn publish_limited(&self, envelope: &Envelope, flow_limit: u64) -> Result<u64, JournalError> {
        let path = self.journal(envelope.topic);
        let mut line = envelope.encode();
        line.push('\n');
        if envelope.topic == Topic::Flows {
            return self.publish_flow(&path, line.as_bytes(), flow_limit);
        }
        let mut file = open_for_append(&path)?;
        let offset = file.seek(SeekFrom::End(0)).map_err(io(&path))?;
        file.write_all(line.as_bytes()).map_err(io(&path))?;
        file.sync_data().map_err(io(&path))?;
        Ok(offset)
    }

    /// Appends a flow record to the open flow journal, rotating it first
    /// when it has reached `limit`.
    fn publish_flow(&self, path: &Path, line: &[u8], limit: u64) -> Result<u64, JournalError> {
        let mut flows = self.flows.lock().unwrap_or_else(|p| p.into_inner());
        let journal = match &mut *flows {
            Some(journal) if journal.size < limit => journal,
            open => {
                if open.take().is_some() || std::fs::metadata(path).is_ok_and(|m| m.len() >= limit)
                {
                    std::fs::rename(path, path.with_extension("jsonl.1")).map_err(io(path))?;
                }
                let mut file = open_for_append(path)?;
                let size = file.seek(SeekFrom::End(0)).map_err(io(path))?;
                open.insert(OpenJournal { file, size })
            }
        };
        let offset = journal.size;
        if let Err(error) = journal.file.write_all(line) {
            // Reopened (and its size read again) with the next record.
            *flows = None;
            return Err(io(path)(error));
        }
        journal.size += line.len() as u64;
        Ok(offset)
    }

    /// A consumer of `topic` for `group`, positioned at the group's committed offset.
    pub fn consumer(&self, group: &str, topic: Topic) -> Result<Consumer, JournalError> {
        let valid = (1..=64).contains(&group.len())
            && group
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b));
        if !valid {
            return Err(JournalError::BadGroup(group.into()));
        }
        let committed_path = self.dir.join(format!("{group}.{}.offset", topic.name()));
        let position = std::fs::read_to_string(&committed_path)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        Ok(Consumer {
            journal: self.journal(topic),
            committed_path,
            position,
            malformed: 0,
        })
    }
}

/// Reads one topic for one group.
#[derive(Debug)]
pub struct Consumer {
    journal: PathBuf,
    committed_path: PathBuf,
    position: u64,
    malformed: u64,
}

impl Consumer {
    /// Up to `max` events after the last one polled. A line still being
    /// written (no newline yet) is left for the next poll.
    pub fn poll(&mut self, max: usize) -> Result<Vec<Delivery>, JournalError> {
        let mut file = match File::open(&self.journal) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.journal)(e)),
        };
        // A journal shorter than our position was rotated: start over.
        let length = file.metadata().map_err(io(&self.journal))?.len();
        if self.position > length {
            self.position = 0;
        }
        file.seek(SeekFrom::Start(self.position))
            .map_err(io(&self.journal))?;
        let mut reader = BufReader::new(file);
        let mut deliveries = Vec::new();
        let mut line = Vec::new();
        while deliveries.len() < max {
            line.clear();
            let read = reader
                .read_until(b'\n', &mut line)
                .map_err(io(&self.journal))?;
            if read == 0 || line.last() != Some(&b'\n') {
                break;
            }
            let offset = self.position;
            self.position += read as u64;
            let event = decode(&line[..line.len() - 1]);
            if event.is_err() {
                self.malformed += 1;
            }
            deliveries.push(Delivery {
                offset,
                next: self.position,
                event,
            });
        }
        Ok(deliveries)
    }

    /// Records that everything before `next` is applied (atomically, durably).
    pub fn commit(&mut self, next: u64) -> Result<(), JournalError> {
        let partial = self.committed_path.with_extension("offset.partial");
        let mut file = File::create(&partial).map_err(io(&partial))?;
        file.write_all(next.to_string().as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(io(&partial))?;
        std::fs::rename(&partial, &self.committed_path).map_err(io(&self.committed_path))
    }

    /// Lines that did not decode so far (skipped, never fatal).
    pub fn malformed(&self) -> u64 {
        self.malformed
    }
}

/// All topics of one group on the embedded bus (see [`EventBus::subscribe`]).
#[derive(Debug)]
pub struct EmbeddedConsumer {
    topics: Vec<(Topic, Consumer)>,
    bus_malformed: Arc<AtomicU64>,
    malformed: u64,
}

impl EventBus for EmbeddedBus {
    type Error = JournalError;
    type Consumer = EmbeddedConsumer;

    fn publish(&self, envelope: &Envelope) -> Result<(), JournalError> {
        EmbeddedBus::publish(self, envelope).map(|_| ())
    }

    fn subscribe(&self, group: &str, topics: &[Topic]) -> Result<EmbeddedConsumer, JournalError> {
        let topics = topics
            .iter()
            .map(|&topic| Ok((topic, self.consumer(group, topic)?)))
            .collect::<Result<_, JournalError>>()?;
        Ok(EmbeddedConsumer {
            topics,
            bus_malformed: Arc::clone(&self.malformed),
            malformed: 0,
        })
    }

    /// A local file is always there.
    fn state(&self) -> BusState {
        BusState::Connected
    }

    fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }
}

impl EventConsumer for EmbeddedConsumer {
    type Error = JournalError;

    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<bus::Delivery>, JournalError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut out = Vec::new();
            for (topic, consumer) in &mut self.topics {
                if out.len() >= max {
                    break;
                }
                for delivery in consumer.poll(max - out.len())? {
                    let position = Position {
                        topic: topic.name().to_owned(),
                        partition: 0,
                        offset: delivery.offset,
                        next: delivery.next,
                    };
                    if let Err(error) = &delivery.event {
                        bus::log_malformed(&position, error);
                        self.malformed += 1;
                        self.bus_malformed.fetch_add(1, Ordering::Relaxed);
                    }
                    out.push(bus::Delivery {
                        position,
                        event: delivery.event,
                        // The journal keeps no publication time.
                        published: None,
                    });
                }
            }
            let now = Instant::now();
            if !out.is_empty() || now >= deadline {
                return Ok(out);
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
        }
    }

    fn commit(&mut self, positions: &[Position]) -> Result<(), JournalError> {
        for position in bus::furthest(positions) {
            if let Some((_, consumer)) = self
                .topics
                .iter_mut()
                .find(|(topic, _)| topic.name() == position.topic)
            {
                consumer.commit(position.next)?;
            }
        }
        Ok(())
    }

    fn malformed(&self) -> u64 {
        self.malformed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        apply::{Applier, Outcome},
        schema::Event,
    };

    fn policy(version: u64) -> Envelope {
        Envelope::new(
            Topic::Policy,
            "default/allow-shop",
            version,
            Event::PolicyChanged {
                name: "allow-shop".into(),
                version,
            },
        )
    }

    #[test]
    fn consumers_resume_from_their_committed_offset() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EmbeddedBus::open(dir.path()).unwrap();
        for v in 1..=3 {
            bus.publish(&policy(v)).unwrap();
        }
        let mut consumer = bus.consumer("agent-node1", Topic::Policy).unwrap();
        let first = consumer.poll(10).unwrap();
        assert_eq!(first.len(), 3);
        assert_eq!(first[0].offset, 0);
        assert_eq!(first[1].event, Ok(policy(2)));
        consumer.commit(first[1].next).unwrap();

        // A restarted agent sees again only what it had not committed.
        let mut restarted = bus.consumer("agent-node1", Topic::Policy).unwrap();
        let again = restarted.poll(10).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].event, Ok(policy(3)));
        // Another group starts from the beginning.
        assert_eq!(
            bus.consumer("agent-node2", Topic::Policy)
                .unwrap()
                .poll(10)
                .unwrap()
                .len(),
            3
        );
        // Nothing new: an empty poll.
        assert!(restarted.poll(10).unwrap().is_empty());
    }

    #[test]
    fn garbage_is_delivered_as_an_error_counted_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EmbeddedBus::open(dir.path()).unwrap();
        bus.publish(&policy(1)).unwrap();
        let journal = dir.path().join("policy.jsonl");
        let mut file = OpenOptions::new().append(true).open(&journal).unwrap();
        file.write_all(b"{not an event}\n").unwrap();
        file.write_all(b"{\"schema\":9,\"topic\":\"policy\"}\n")
            .unwrap();
        bus.publish(&policy(2)).unwrap();
        file.write_all(b"{\"schema\":1,\"topic\":\"pol").unwrap(); // a torn last line

        let mut consumer = bus.consumer("g", Topic::Policy).unwrap();
        let deliveries = consumer.poll(10).unwrap();
        let kinds: Vec<&str> = deliveries
            .iter()
            .map(|d| match &d.event {
                Ok(_) => "ok",
                Err(DecodeError::Malformed(_)) => "malformed",
                Err(DecodeError::UnknownVersion(_)) => "unknown-version",
            })
            .collect();
        assert_eq!(kinds, ["ok", "malformed", "unknown-version", "ok"]);
        assert_eq!(consumer.malformed(), 2);
        assert_eq!(
            deliveries[3].event,
            Ok(policy(2)),
            "events after garbage still arrive"
        );
    }

    #[test]
    fn replaying_the_journal_applies_each_change_once() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EmbeddedBus::open(dir.path()).unwrap();
        for v in [1, 2, 2, 1, 3] {
            bus.publish(&policy(v)).unwrap(); // duplicates and a late older version
        }
        let mut applier = Applier::default();
        let mut applied = Vec::new();
        for pass in 0..2 {
            // The second pass is a full replay (a new group), as after losing offsets.
            let mut consumer = bus.consumer(&format!("g{pass}"), Topic::Policy).unwrap();
            for delivery in consumer.poll(100).unwrap() {
                let envelope = delivery.event.unwrap();
                if applier.admit(&envelope) == Outcome::Apply {
                    applied.push(envelope.seq);
                }
            }
        }
        assert_eq!(applied, [1, 2, 3]);
    }

    #[test]
    fn the_flow_journal_is_rotated_past_its_limit_and_others_never_are() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EmbeddedBus::open(dir.path()).unwrap();
        let flow = |seq| {
            Envelope::new(
                Topic::Flows,
                "node1",
                seq,
                crate::schema::Event::Flow {
                    source: "shop/a".into(),
                    destination: "shop/b".into(),
                    bytes: 1,
                    mode: "userspace".into(),
                    result: "ok".into(),
                },
            )
        };
        let mut consumer = bus.consumer("g", Topic::Flows).unwrap();
        for seq in 1..=40 {
            bus.publish_limited(&flow(seq), 1024).unwrap();
            bus.publish_limited(&policy(seq), 1024).unwrap();
        }
        let current = std::fs::metadata(dir.path().join("flows.jsonl"))
            .unwrap()
            .len();
        let previous = std::fs::metadata(dir.path().join("flows.jsonl.1"))
            .unwrap()
            .len();
        assert!(
            current < 1024 + 256 && previous >= 1024,
            "{current} {previous}"
        );
        assert!(!dir.path().join("policy.jsonl.1").exists());
        assert_eq!(
            bus.consumer("g", Topic::Policy)
                .unwrap()
                .poll(100)
                .unwrap()
                .len(),
            40
        );
        // A consumer past the end of a rotated journal starts over.
        consumer.position = u64::MAX;
        let read = consumer.poll(1000).unwrap();
        assert!(!read.is_empty() && read.iter().all(|d| d.event.is_ok()));
    }

    #[test]
    fn a_bad_group_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bus = EmbeddedBus::open(dir.path()).unwrap();
        let error = bus.consumer("../etc", Topic::Pods).unwrap_err().to_string();
        assert!(error.contains("must be 1-64 characters"), "{error}");
    }

    #[test]
    fn the_bus_interface_applies_once_commits_and_skips_garbage() {
        use crate::bus::{EventBus, EventConsumer, apply_batch};

        let dir = tempfile::tempdir().unwrap();
        let bus = EmbeddedBus::open(dir.path()).unwrap();
        for v in [1, 2, 2] {
            EventBus::publish(&bus, &policy(v)).unwrap();
        }
        OpenOptions::new()
            .append(true)
            .open(dir.path().join("policy.jsonl"))
            .unwrap()
            .write_all(b"garbage\n")
            .unwrap();
        EventBus::publish(&bus, &policy(3)).unwrap();

        let mut applier = Applier::default();
        let mut consumer = bus.subscribe("g", &[Topic::Pods, Topic::Policy]).unwrap();
        let mut applied = Vec::new();
        let report = apply_batch(
            &mut consumer,
            &mut applier,
            100,
            Duration::from_millis(10),
            |e| applied.push(e.seq),
        )
        .unwrap();
        assert_eq!(applied, [1, 2, 3]);
        assert_eq!(
            (
                report.delivered,
                report.applied,
                report.stale,
                report.malformed
            ),
            (5, 3, 1, 1)
        );
        assert_eq!((consumer.malformed(), bus.malformed()), (1, 1));
        // Everything, garbage included, was committed: a restarted consumer has nothing.
        let mut restarted = bus.subscribe("g", &[Topic::Pods, Topic::Policy]).unwrap();
        assert!(
            restarted
                .poll(100, Duration::from_millis(10))
                .unwrap()
                .is_empty()
        );
    }
}
