//! The outbox: events published while the broker cannot take them.
//!
//! A publish must never be lost because Kafka is down or slow. The outbox
//! holds every event until the broker acknowledges it: first in memory (up to
//! a bound), then spilled to a file under the state directory in the
//! journal's format (one JSON envelope per line, each append synced before
//! `push` returns). When the file would grow past its bound too, `push`
//! refuses with [`OutboxError::Full`] — the caller learns it, nothing is
//! dropped silently.
//!
//! Order: first in, first out. Once anything is on disk, new events go to
//! disk behind it until the file is read back, so the sender sees events in
//! publish order. An event the broker failed to take comes back ahead of the
//! others ([`Outbox::nack`]); the receiving [`crate::apply::Applier`] orders by
//! `seq` anyway, so a late retry cannot overwrite newer state.
//!
//! Durability: the spill file is truncated only once everything read from it
//! has been acknowledged, so a crash re-sends the whole file (duplicates are
//! harmless). Events still in memory at a crash are lost unless the memory
//! bound is 0 (every event goes through the file); a clean shutdown writes
//! them to the file ([`Outbox::persist`]) and the next start sends them.

use std::{
    collections::{BTreeMap, VecDeque},
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Seek, SeekFrom, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use crate::schema::{Envelope, decode};

/// Name of the spill file inside the state directory.
pub const SPILL_FILE: &str = "outbox.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("event outbox {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "event outbox is full ({memory} events in memory, {disk_bytes} of {limit_bytes} bytes on disk): \
         the event bus has been unreachable too long; the event was NOT queued"
    )]
    Full {
        memory: usize,
        disk_bytes: u64,
        limit_bytes: u64,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutboxError + '_ {
    move |source| OutboxError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// How much the outbox may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Events kept in memory (queued plus handed to the broker, unacknowledged).
    /// 0: every event is written to the file first.
    pub memory_events: usize,
    /// Size the spill file may reach.
    pub disk_bytes: u64,
}

/// A handle on one event handed out by [`Outbox::take`], to ack or nack it.
pub type Ticket = u64;

#[derive(Debug)]
struct Entry {
    envelope: Envelope,
    /// Read back from the spill file: the file stays until this is acked.
    from_disk: bool,
}

/// What the outbox holds right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxStats {
    /// Waiting in memory (including events to retry).
    pub memory: usize,
    /// Waiting in the spill file, not read back yet.
    pub on_disk: usize,
    /// Handed out, not acknowledged yet.
    pub in_flight: usize,
    /// Size of the spill file.
    pub disk_bytes: u64,
}

impl OutboxStats {
    /// Events not yet acknowledged by the broker.
    pub fn pending(&self) -> usize {
        self.memory + self.on_disk + self.in_flight
    }
}

/// Events waiting for the broker's acknowledgement.
#[derive(Debug)]
pub struct Outbox {
    limits: OutboxLimits,
    path: PathBuf,
    /// Failed events to send again, in their original order, ahead of `memory`.
    retry: BTreeMap<Ticket, Entry>,
    memory: VecDeque<(Ticket, Entry)>,
    in_flight: BTreeMap<Ticket, Entry>,
    next_ticket: Ticket,
    /// Byte length of the spill file.
    disk_len: u64,
    /// Where the next unread line of the spill file starts.
    disk_read: u64,
    /// Lines after `disk_read`.
    disk_unread: usize,
    /// Entries read from the file and not acked yet (the file must stay).
    disk_unacked: usize,
    /// Lines of the spill file that did not decode (skipped, logged).
    corrupt: u64,
}

impl Outbox {
    /// Opens the outbox in `dir` (created 0700). A spill file left by an
    /// earlier run is kept and sent first.
    pub fn open(dir: &Path, limits: OutboxLimits) -> Result<Self, OutboxError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let path = dir.join(SPILL_FILE);
        let mut outbox = Self {
            limits,
            path,
            retry: BTreeMap::new(),
            memory: VecDeque::new(),
            in_flight: BTreeMap::new(),
            next_ticket: 0,
            disk_len: 0,
            disk_read: 0,
            disk_unread: 0,
            disk_unacked: 0,
            corrupt: 0,
        };
        match File::open(&outbox.path) {
            Ok(file) => {
                let mut reader = BufReader::new(file);
                let (mut lines, mut complete) = (0, 0u64);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    let n = reader
                        .read_until(b'\n', &mut line)
                        .map_err(io(&outbox.path))?;
                    if n == 0 {
                        break;
                    }
                    if line.last() != Some(&b'\n') {
                        // A publish that crashed mid-write: it was never
                        // acknowledged to its caller, so cut it off.
                        tracing::warn!(
                            path = %outbox.path.display(),
                            bytes = n,
                            "dropping a torn last line of the event outbox"
                        );
                        OpenOptions::new()
                            .write(true)
                            .open(&outbox.path)
                            .and_then(|f| f.set_len(complete))
                            .map_err(io(&outbox.path))?;
                        break;
                    }
                    complete += n as u64;
                    lines += 1;
                }
                outbox.disk_len = complete;
                outbox.disk_unread = lines;
                if lines > 0 {
                    tracing::info!(
                        events = lines,
                        path = %outbox.path.display(),
                        "event outbox holds events from an earlier run; sending them first"
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&outbox.path)(e)),
        }
        Ok(outbox)
    }

    /// The spill file's path.
    pub fn spill_path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> OutboxStats {
        OutboxStats {
            memory: self.retry.len() + self.memory.len(),
            on_disk: self.disk_unread,
            in_flight: self.in_flight.len(),
            disk_bytes: self.disk_len,
        }
    }

    /// Lines of the spill file that could not be decoded and were skipped.
    pub fn corrupt(&self) -> u64 {
        self.corrupt
    }

    fn in_memory(&self) -> usize {
        self.retry.len() + self.memory.len() + self.in_flight.len()
    }

    /// Queues `envelope` until the broker acknowledges it.
    pub fn push(&mut self, envelope: Envelope) -> Result<(), OutboxError> {
        if self.disk_unread == 0 && self.in_memory() < self.limits.memory_events {
            let ticket = self.ticket();
            self.memory.push_back((
                ticket,
                Entry {
                    envelope,
                    from_disk: false,
                },
            ));
            return Ok(());
        }
        let mut line = envelope.encode();
        line.push('\n');
        if self.disk_len + line.len() as u64 > self.limits.disk_bytes {
            return Err(OutboxError::Full {
                memory: self.in_memory(),
                disk_bytes: self.disk_len,
                limit_bytes: self.limits.disk_bytes,
            });
        }
        self.append(line.as_bytes())?;
        self.disk_unread += 1;
        if self.disk_unread == 1 {
            tracing::warn!(
                path = %self.path.display(),
                "event outbox memory is full: spilling events to disk until the bus takes them"
            );
        }
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), OutboxError> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(io(&self.path))?;
        let end = file.seek(SeekFrom::End(0)).map_err(io(&self.path))?;
        if end != self.disk_len {
            // A failed earlier append left a partial line: cut it off.
            file.set_len(self.disk_len).map_err(io(&self.path))?;
        }
        file.write_all(bytes)
            .and_then(|()| file.sync_data())
            .map_err(io(&self.path))?;
        self.disk_len += bytes.len() as u64;
        Ok(())
    }

    fn ticket(&mut self) -> Ticket {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        ticket
    }

    /// Reads spilled events back into memory while there is room.
    fn refill(&mut self) -> Result<(), OutboxError> {
        if self.disk_unread == 0 {
            return Ok(());
        }
        // Always let at least one event through, even with a memory bound of 0.
        let room = self
            .limits
            .memory_events
            .max(1)
            .saturating_sub(self.in_memory());
        if room == 0 {
            return Ok(());
        }
        let mut file = File::open(&self.path).map_err(io(&self.path))?;
        file.seek(SeekFrom::Start(self.disk_read))
            .map_err(io(&self.path))?;
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        let mut read = 0;
        while read < room && self.disk_unread > 0 {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(io(&self.path))?;
            if n == 0 || line.last() != Some(&b'\n') {
                // Fewer lines than counted: the file changed under us.
                tracing::error!(path = %self.path.display(), "event outbox file is shorter than expected");
                self.disk_unread = 0;
                break;
            }
            let offset = self.disk_read;
            self.disk_read += n as u64;
            self.disk_unread -= 1;
            match decode(&line[..n - 1]) {
                Ok(envelope) => {
                    let ticket = self.ticket();
                    self.memory.push_back((
                        ticket,
                        Entry {
                            envelope,
                            from_disk: true,
                        },
                    ));
                    self.disk_unacked += 1;
                    read += 1;
                }
                Err(error) => {
                    self.corrupt += 1;
                    tracing::error!(
                        path = %self.path.display(),
                        offset,
                        %error,
                        "skipping an undecodable line in the event outbox"
                    );
                }
            }
        }
        self.truncate_if_done()
    }

    fn truncate_if_done(&mut self) -> Result<(), OutboxError> {
        if self.disk_len > 0 && self.disk_unread == 0 && self.disk_unacked == 0 {
            OpenOptions::new()
                .write(true)
                .open(&self.path)
                .and_then(|f| f.set_len(0).and_then(|()| f.sync_data()))
                .map_err(io(&self.path))?;
            self.disk_len = 0;
            self.disk_read = 0;
        }
        Ok(())
    }

    /// Hands out up to `max` events to send, oldest (and failed) first. They
    /// stay in the outbox until [`Outbox::ack`]ed.
    pub fn take(&mut self, max: usize) -> Result<Vec<(Ticket, Envelope)>, OutboxError> {
        let mut out = Vec::new();
        while out.len() < max {
            if self.memory.is_empty() && self.retry.is_empty() {
                self.refill()?;
            }
            let next = match self.retry.pop_first() {
                Some(entry) => Some(entry),
                None => self.memory.pop_front(),
            };
            let Some((ticket, entry)) = next else { break };
            out.push((ticket, entry.envelope.clone()));
            self.in_flight.insert(ticket, entry);
        }
        Ok(out)
    }

    /// The broker has the event: forget it.
    pub fn ack(&mut self, ticket: Ticket) -> Result<(), OutboxError> {
        if let Some(entry) = self.in_flight.remove(&ticket)
            && entry.from_disk
        {
            self.disk_unacked -= 1;
            self.truncate_if_done()?;
        }
        Ok(())
    }

    /// The broker did not take the event: send it again, ahead of newer ones.
    pub fn nack(&mut self, ticket: Ticket) {
        if let Some(entry) = self.in_flight.remove(&ticket) {
            self.retry.insert(ticket, entry);
        }
    }

    /// Writes every unacknowledged event to the spill file (in order, ahead of
    /// what was still unread there), so that a restart sends them. For a
    /// clean shutdown; the disk bound is not enforced here, losing events
    /// would be worse. Returns how many events the file holds afterwards.
    pub fn persist(&mut self) -> Result<usize, OutboxError> {
        let mut lines = String::new();
        let mut count = 0;
        let mut queued: Vec<(Ticket, &Entry)> = self
            .in_flight
            .iter()
            .chain(self.retry.iter())
            .map(|(t, e)| (*t, e))
            .collect();
        queued.extend(self.memory.iter().map(|(t, e)| (*t, e)));
        queued.sort_by_key(|(t, _)| *t);
        for (_, entry) in &queued {
            lines.push_str(&entry.envelope.encode());
            lines.push('\n');
            count += 1;
        }
        if count == 0 && self.disk_read == 0 {
            return Ok(self.disk_unread);
        }
        // Everything read from the file is among `queued` (or acked); keep the unread tail.
        let unread = if self.disk_unread > 0 {
            let mut file = File::open(&self.path).map_err(io(&self.path))?;
            file.seek(SeekFrom::Start(self.disk_read))
                .map_err(io(&self.path))?;
            let mut tail = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut tail).map_err(io(&self.path))?;
            tail
        } else {
            Vec::new()
        };
        let partial = self.path.with_extension("jsonl.partial");
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .map_err(io(&partial))?;
        file.write_all(lines.as_bytes())
            .and_then(|()| file.write_all(&unread))
            .and_then(|()| file.sync_data())
            .map_err(io(&partial))?;
        std::fs::rename(&partial, &self.path).map_err(io(&self.path))?;
        let total = count + self.disk_unread;
        self.disk_len = (lines.len() + unread.len()) as u64;
        self.disk_read = 0;
        self.disk_unread = total;
        self.disk_unacked = 0;
        self.retry.clear();
        self.memory.clear();
        self.in_flight.clear();
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Event, Topic};

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

    fn seqs(taken: &[(Ticket, Envelope)]) -> Vec<u64> {
        taken.iter().map(|(_, e)| e.seq).collect()
    }

    fn limits(memory_events: usize, disk_bytes: u64) -> OutboxLimits {
        OutboxLimits {
            memory_events,
            disk_bytes,
        }
    }

    #[test]
    fn spills_past_the_memory_bound_and_keeps_publish_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), limits(2, 1 << 20)).unwrap();
        for v in 1..=5 {
            outbox.push(policy(v)).unwrap();
        }
        let stats = outbox.stats();
        assert_eq!((stats.memory, stats.on_disk), (2, 3));
        assert!(stats.disk_bytes > 0);
        assert_eq!(
            std::fs::read_to_string(outbox.spill_path())
                .unwrap()
                .lines()
                .count(),
            3
        );

        // Memory drains first, then the file is read back as room appears.
        let first = outbox.take(10).unwrap();
        assert_eq!(seqs(&first), [1, 2]);
        assert!(
            outbox.take(10).unwrap().is_empty(),
            "no room until something is acked"
        );
        for (ticket, _) in &first {
            outbox.ack(*ticket).unwrap();
        }
        // A publish while the file still holds events goes behind them.
        outbox.push(policy(6)).unwrap();
        let mut order = Vec::new();
        for _ in 0..10 {
            let taken = outbox.take(10).unwrap();
            if taken.is_empty() {
                break;
            }
            order.extend(seqs(&taken));
            for (ticket, _) in &taken {
                outbox.ack(*ticket).unwrap();
            }
        }
        assert_eq!(order, [3, 4, 5, 6]);
        assert_eq!(outbox.stats(), OutboxStats::default());
        assert_eq!(
            std::fs::metadata(outbox.spill_path()).unwrap().len(),
            0,
            "the file is truncated once everything in it is acked"
        );
    }

    #[test]
    fn refuses_loudly_when_the_disk_bound_is_reached() {
        let dir = tempfile::tempdir().unwrap();
        let line = policy(1).encode().len() as u64 + 1;
        let mut outbox = Outbox::open(dir.path(), limits(1, 2 * line)).unwrap();
        outbox.push(policy(1)).unwrap(); // memory
        outbox.push(policy(2)).unwrap(); // disk
        outbox.push(policy(3)).unwrap(); // disk, now full
        let error = outbox.push(policy(4)).unwrap_err();
        assert!(matches!(error, OutboxError::Full { .. }), "{error}");
        assert!(error.to_string().contains("NOT queued"), "{error}");
        assert_eq!(outbox.stats().pending(), 3, "nothing queued was lost");

        // Once the bus takes events again, there is room again.
        for _ in 0..5 {
            for (ticket, _) in outbox.take(10).unwrap() {
                outbox.ack(ticket).unwrap();
            }
        }
        outbox.push(policy(4)).unwrap();
        assert_eq!(outbox.stats().pending(), 1);
    }

    #[test]
    fn failed_events_are_sent_again_ahead_of_newer_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), limits(100, 1 << 20)).unwrap();
        for v in 1..=4 {
            outbox.push(policy(v)).unwrap();
        }
        let taken = outbox.take(3).unwrap();
        outbox.ack(taken[0].0).unwrap();
        outbox.nack(taken[2].0);
        outbox.nack(taken[1].0);
        assert_eq!(seqs(&outbox.take(10).unwrap()), [2, 3, 4]);
    }

    #[test]
    fn a_zero_memory_bound_writes_every_event_to_disk_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), limits(0, 1 << 20)).unwrap();
        outbox.push(policy(1)).unwrap();
        outbox.push(policy(2)).unwrap();
        assert_eq!(outbox.stats().on_disk, 2);
        let taken = outbox.take(10).unwrap();
        assert_eq!(seqs(&taken), [1], "one at a time through the file");
        // Crash now: the file still holds both (the first is not acked).
        let mut reopened = Outbox::open(dir.path(), limits(0, 1 << 20)).unwrap();
        assert_eq!(reopened.stats().on_disk, 2);
        let again = reopened.take(10).unwrap();
        reopened.ack(again[0].0).unwrap();
        assert_eq!(
            seqs(&reopened.take(10).unwrap()),
            [2],
            "the second comes after the first is acked"
        );
    }

    #[test]
    fn persist_keeps_every_unacknowledged_event_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), limits(2, 1 << 20)).unwrap();
        for v in 1..=5 {
            outbox.push(policy(v)).unwrap(); // 1, 2 in memory; 3, 4, 5 on disk
        }
        let taken = outbox.take(2).unwrap();
        outbox.ack(taken[0].0).unwrap(); // 1 delivered, 2 in flight
        assert_eq!(outbox.persist().unwrap(), 4);

        let mut reopened = Outbox::open(dir.path(), limits(100, 1 << 20)).unwrap();
        assert_eq!(reopened.stats().on_disk, 4);
        assert_eq!(seqs(&reopened.take(10).unwrap()), [2, 3, 4, 5]);
    }

    #[test]
    fn a_torn_or_corrupt_spill_file_is_survived() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPILL_FILE);
        let mut text = policy(1).encode();
        text.push_str("\n{garbage}\n");
        text.push_str(&policy(2).encode());
        text.push_str("\n{\"schema\":1,\"top"); // a publish that crashed mid-write
        std::fs::write(&path, text).unwrap();

        let mut outbox = Outbox::open(dir.path(), limits(100, 1 << 20)).unwrap();
        assert_eq!(outbox.stats().on_disk, 3);
        assert_eq!(seqs(&outbox.take(10).unwrap()), [1, 2]);
        assert_eq!(outbox.corrupt(), 1);
        // New events are appended after the last complete line.
        outbox.push(policy(3)).unwrap();
        assert_eq!(seqs(&outbox.take(10).unwrap()), [3]);
    }
}
