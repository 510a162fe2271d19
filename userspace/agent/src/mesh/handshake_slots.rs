//! Admission of unauthenticated connections on the inbound mTLS port.
//!
//! Anyone who can reach `:15008` can open a connection, and until its
//! handshake and preface are checked the agent knows nothing about it. So
//! before a connection gets a thread it must get a **slot**: at most
//! `max_handshakes` connections are in handshake at once, at most
//! `max_handshakes_per_source` from one address, and a connection over
//! either cap is reset at once and counted, never queued. A slot also carries
//! a **total deadline**: a per-read timeout alone lets a client that sends a
//! byte every few seconds hold its thread forever, so a watchdog thread shuts
//! down any connection still in handshake when its deadline passes, which
//! ends the blocked read. The slot is given back when the handshake ends,
//! however it ends.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Shutdown, TcpStream},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::metrics::gauge::Gauge;

/// The caps and the deadline, from `[mesh]` in the agent config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// From accepting the connection to a checked preface.
    pub deadline: Duration,
    /// Connections in handshake at once, all sources together.
    pub max_total: usize,
    /// Connections in handshake at once from one source address.
    pub max_per_source: usize,
}

/// Why a connection got no slot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SlotRefusal {
    #[error(
        "{max} connections are already in handshake on the inbound port \
         (mesh.max_handshakes); refused without reading it"
    )]
    Full { max: usize },
    #[error(
        "{address} already has {max} connections in handshake on the inbound port \
         (mesh.max_handshakes_per_source); refused without reading it"
    )]
    SourceFull { address: IpAddr, max: usize },
    #[error("cannot watch the connection's deadline: {0}")]
    Watch(String),
}

impl SlotRefusal {
    /// The `result` label of `veil_mesh_connections_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Full { .. } => "handshake_slots_full",
            Self::SourceFull { .. } => "source_handshake_slots_full",
            Self::Watch(_) => "handshake_unwatchable",
        }
    }
}

/// A connection in handshake, as the watchdog sees it.
struct Watched {
    /// A second handle on the socket, to shut it down at the deadline.
    socket: TcpStream,
    expired: Arc<AtomicBool>,
}

#[derive(Default)]
struct Table {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
    /// Connections still in handshake, by deadline (and a sequence number,
    /// so two with one deadline stay apart).
    deadlines: BTreeMap<(Instant, u64), Watched>,
    next: u64,
}

/// Every slot of one inbound listener.
pub struct HandshakeSlots {
    limits: HandshakeLimits,
    table: Mutex<Table>,
    /// Wakes the watchdog when an earlier deadline arrives.
    changed: Condvar,
    in_progress: Gauge,
}

impl HandshakeSlots {
    /// The slots and their watchdog thread (`mesh-deadline`), which runs as
    /// long as the slots exist.
    pub fn start(limits: HandshakeLimits, in_progress: Gauge) -> std::io::Result<Arc<Self>> {
        let slots = Arc::new(Self {
            limits,
            table: Mutex::default(),
            changed: Condvar::new(),
            in_progress,
        });
        let weak = Arc::downgrade(&slots);
        std::thread::Builder::new()
            .name("mesh-deadline".into())
            .spawn(move || {
                while let Some(slots) = weak.upgrade() {
                    slots.expire_due();
                }
            })?;
        Ok(slots)
    }

    pub fn limits(&self) -> HandshakeLimits {
        self.limits
    }

    /// A slot for `socket`, or why there is none.
    pub fn admit(self: &Arc<Self>, socket: &TcpStream) -> Result<Slot, SlotRefusal> {
        let source = socket
            .peer_addr()
            .map_err(|error| SlotRefusal::Watch(error.to_string()))?
            .ip();
        let watched = socket
            .try_clone()
            .map_err(|error| SlotRefusal::Watch(error.to_string()))?;
        let deadline = Instant::now() + self.limits.deadline;
        let expired = Arc::new(AtomicBool::new(false));
        let key = {
            let mut table = self.lock();
            if table.total >= self.limits.max_total {
                return Err(SlotRefusal::Full {
                    max: self.limits.max_total,
                });
            }
            let from_source = table.per_source.entry(source).or_default();
            if *from_source >= self.limits.max_per_source {
                return Err(SlotRefusal::SourceFull {
                    address: source,
                    max: self.limits.max_per_source,
                });
            }
            *from_source += 1;
            table.total += 1;
            let key = (deadline, table.next);
            table.next += 1;
            let earliest = table
                .deadlines
                .keys()
                .next()
                .is_none_or(|first| key < *first);
            table.deadlines.insert(
                key,
                Watched {
                    socket: watched,
                    expired: Arc::clone(&expired),
                },
            );
            if earliest {
                self.changed.notify_one();
            }
            key
        };
        self.in_progress.inc();
        Ok(Slot {
            slots: Arc::clone(self),
            source,
            key,
            expired,
        })
    }

    /// Waits for the earliest deadline (or a new earlier one, or a second
    /// at most, so the thread notices the slots going away) and shuts down
    /// every connection whose deadline has passed.
    fn expire_due(&self) {
        let mut table = self.lock();
        let now = Instant::now();
        let wait = table
            .deadlines
            .keys()
            .next()
            .map_or(Duration::from_secs(1), |(deadline, _)| {
                deadline.saturating_duration_since(now)
            })
            .min(Duration::from_secs(1));
        if !wait.is_zero() {
            table = self
                .changed
                .wait_timeout(table, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let now = Instant::now();
        while let Some(entry) = table.deadlines.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let watched = entry.remove();
            watched.expired.store(true, Ordering::SeqCst);
            // Ends the handshake's blocked read; the slot itself is given
            // back when the handshake returns and drops it.
            let _ = watched.socket.shutdown(Shutdown::Both);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One connection's place among those in handshake; given back on drop.
pub struct Slot {
    slots: Arc<HandshakeSlots>,
    source: IpAddr,
    key: (Instant, u64),
    expired: Arc<AtomicBool>,
}

impl Slot {
    /// Whether the deadline passed and the watchdog shut the connection down.
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::SeqCst)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = self.slots.lock();
        table.deadlines.remove(&self.key);
        table.total = table.total.saturating_sub(1);
        if let Some(count) = table.per_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                table.per_source.remove(&self.source);
            }
        }
        drop(table);
        self.slots.in_progress.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read,
        net::{Ipv4Addr, TcpListener},
    };

    use super::*;

    /// A connected pair on loopback: (the accepted side, the client side).
    /// `source` picks the client's address inside 127.0.0.0/8.
    fn pair(listener: &TcpListener, source: Ipv4Addr) -> (TcpStream, TcpStream) {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&std::net::SocketAddr::from((source, 0)).into())
            .expect("bind the client's source");
        socket
            .connect(&listener.local_addr().expect("address").into())
            .expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        (accepted, socket.into())
    }

    impl HandshakeSlots {
        /// Connections in handshake now: all, and from `source`.
        fn in_handshake(&self, source: IpAddr) -> (usize, usize) {
            let table = self.lock();
            (
                table.total,
                table.per_source.get(&source).copied().unwrap_or(0),
            )
        }
    }

    fn slots(deadline: Duration, max_total: usize, max_per_source: usize) -> Arc<HandshakeSlots> {
        HandshakeSlots::start(
            HandshakeLimits {
                deadline,
                max_total,
                max_per_source,
            },
            Gauge::default(),
        )
        .expect("watchdog thread")
    }

    #[test]
    fn caps_refuse_per_source_and_in_total_and_a_dropped_slot_is_given_back() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        let slots = slots(Duration::from_secs(60), 3, 2);
        let (a, b) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
        let mut held = Vec::new();
        for _ in 0..2 {
            let (accepted, client) = pair(&listener, a);
            held.push((slots.admit(&accepted).expect("under both caps"), client));
        }
        let (accepted, _client) = pair(&listener, a);
        assert_eq!(
            slots.admit(&accepted).err(),
            Some(SlotRefusal::SourceFull {
                address: IpAddr::V4(a),
                max: 2
            })
        );
        let (accepted, _client_b) = pair(&listener, b);
        let from_b = slots.admit(&accepted).expect("another source has room");
        let (accepted, _client_b2) = pair(&listener, b);
        assert_eq!(
            slots.admit(&accepted).err(),
            Some(SlotRefusal::Full { max: 3 })
        );
        assert_eq!(slots.in_handshake(IpAddr::V4(a)), (3, 2));
        drop(from_b);
        drop(held.pop());
        assert_eq!(slots.in_handshake(IpAddr::V4(a)), (1, 1));
        let (accepted, _client) = pair(&listener, a);
        slots
            .admit(&accepted)
            .expect("a given-back slot is free again");
    }

    #[test]
    fn the_deadline_shuts_down_a_connection_still_in_handshake_and_spares_a_finished_one() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        let slots = slots(Duration::from_millis(300), 10, 10);
        let source = Ipv4Addr::LOCALHOST;
        let (mut slow, _slow_client) = pair(&listener, source);
        let slow_slot = slots.admit(&slow).expect("slot");
        let (mut done, mut done_client) = pair(&listener, source);
        let done_slot = slots.admit(&done).expect("slot");
        drop(done_slot);

        let started = Instant::now();
        let mut byte = [0u8; 1];
        // The client never sends: only the deadline can end this read.
        slow.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let read = slow.read(&mut byte).expect("a shut-down socket reads EOF");
        assert_eq!(read, 0);
        assert!(slow_slot.expired());
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(2),
            "the deadline took {waited:?}"
        );

        std::io::Write::write_all(&mut done_client, b"x").expect("write");
        done.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        assert_eq!(done.read(&mut byte).expect("still open"), 1);
        drop(slow_slot);
        assert_eq!(slots.in_handshake(IpAddr::V4(source)), (0, 0));
    }
}
