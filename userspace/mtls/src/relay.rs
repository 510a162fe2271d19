//! Moving bytes between a pod's plain socket and a kTLS socket with splice:
//! the bytes never enter userspace, and the kernel does the crypto.
//!
//! One blocking thread per direction (the second from [`crate::workers`]): splice socket → pipe, then drain the
//! pipe into the other socket before reading again (a pipe refilled before it
//! is empty deadlocks request/response traffic). An error (a reset) on either
//! side aborts the relay and resets both peers.
//!
//! End of stream is authenticated (see [`crate::control_records`]): the pod
//! ending its stream becomes a close_notify and then `shutdown(SHUT_WR)` on
//! the kTLS socket; the peer's close_notify becomes `shutdown(SHUT_WR)` on
//! the pod's socket, so half-close propagates. A FIN from the peer without
//! a close_notify is [`Truncated`]: the pod is reset, never shown an end of
//! stream that an attacker on the path could have forged. Session tickets
//! that reach the kernel are skipped.
//!
//! `SPLICE_F_MORE` is never used: kTLS would hold the record back.

use std::{
    net::{Shutdown, TcpStream},
    os::fd::{AsFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use nix::{
    errno::Errno,
    fcntl::{SpliceFFlags, splice},
};

use crate::{
    control_records::{self, Record},
    limits::{RecordBudget, RecordLimitReached},
};

/// Largest chunk moved per splice call.
const CHUNK: usize = 64 * 1024;

/// Bytes moved in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// The peer agent's TLS stream ended without a close_notify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the peer agent's TLS stream ended without close_notify (a FIN anyone on the path could \
     forge, or the peer agent died): the pod is reset rather than shown a clean end of stream"
)]
pub struct Truncated;

/// Relays between the pod's socket `a` and the kTLS socket `b` until both
/// directions have ended, counting the records written into `b` against
/// `budget`: past it, both peers are reset (see [`crate::limits`]).
/// `aborted` is the flag of a [`crate::abort::RelayAbort`].
pub(crate) fn splice_relay_until(
    a: TcpStream,
    b: TcpStream,
    budget: Option<RecordBudget>,
    aborted: Arc<AtomicBool>,
) -> std::io::Result<RelayStats> {
    let (a2, b2) = (a.try_clone()?, b.try_clone()?);
    let forward = {
        let aborted = Arc::clone(&aborted);
        crate::workers::spawn(move || to_peer(&a, &b, &aborted, budget))?
    };
    let backward = from_peer(&b2, &a2, &aborted);
    let forward = forward.join()?;
    // Every descriptor of both sockets closes here; after an abort they carry
    // SO_LINGER 0, so both peers get a RST rather than a FIN.
    Ok(RelayStats {
        a_to_b: forward?,
        b_to_a: backward?,
    })
}

/// Pod → kTLS until the pod's EOF (then close_notify and half-close) or an
/// error (then the relay is aborted so both peers are reset).
fn to_peer(
    pod: &TcpStream,
    tls: &TcpStream,
    aborted: &AtomicBool,
    mut budget: Option<RecordBudget>,
) -> std::io::Result<u64> {
    let pipe = Pipe::new()?;
    let mut total = 0u64;
    loop {
        let filled = match pipe.fill_from(pod) {
            Ok(0) if aborted.load(Ordering::SeqCst) => return Ok(total),
            Ok(0) => {
                // The close_notify is one more record; the budget keeps far
                // more than one in hand below AES-GCM's limit.
                if let Err(error) = control_records::send_close_notify(tls.as_fd()) {
                    return Err(abort_both(pod, tls, aborted, error.into()));
                }
                let _ = tls.shutdown(Shutdown::Write);
                return Ok(total);
            }
            Ok(n) => n,
            Err(errno) => return Err(abort_both(pod, tls, aborted, errno.into())),
        };
        let mut left = filled;
        while left > 0 {
            // Never hand the kernel more than the budget allows: what it
            // takes is encrypted and sent at once.
            let allowed = budget.as_ref().map_or(left, |b| left.min(b.max_bytes()));
            if allowed == 0 {
                let limit = RecordLimitReached {
                    limit: budget.as_ref().map_or(0, |b| b.spent()),
                };
                return Err(abort_both(pod, tls, aborted, std::io::Error::other(limit)));
            }
            match pipe.drain_into(tls, allowed) {
                Ok(n) => {
                    if let Some(budget) = &mut budget
                        && let Err(limit) = budget.spend(n)
                    {
                        return Err(abort_both(pod, tls, aborted, std::io::Error::other(limit)));
                    }
                    left -= n;
                }
                Err(errno) => return Err(abort_both(pod, tls, aborted, errno.into())),
            }
        }
        total += filled as u64;
    }
}

/// kTLS → pod until the peer's close_notify (then half-close), or a FIN
/// without one or an error (then the relay is aborted so both peers are
/// reset).
fn from_peer(tls: &TcpStream, pod: &TcpStream, aborted: &AtomicBool) -> std::io::Result<u64> {
    let pipe = Pipe::new()?;
    // Only for the rare records splice refuses.
    let mut record = Vec::new();
    let mut total = 0u64;
    loop {
        let filled = match pipe.fill_from(tls) {
            Ok(0) if aborted.load(Ordering::SeqCst) => return Ok(total),
            Ok(0) => {
                return Err(abort_both(
                    tls,
                    pod,
                    aborted,
                    std::io::Error::other(Truncated),
                ));
            }
            Ok(n) => n,
            // The next record is not application data.
            Err(Errno::EINVAL) => match control_record(tls, pod, &mut record) {
                Ok(Some(moved)) => {
                    total += moved as u64;
                    continue;
                }
                Ok(None) => {
                    let _ = pod.shutdown(Shutdown::Write);
                    return Ok(total);
                }
                Err(_) if aborted.load(Ordering::SeqCst) => return Ok(total),
                Err(error) => return Err(abort_both(tls, pod, aborted, error)),
            },
            Err(errno) => return Err(abort_both(tls, pod, aborted, errno.into())),
        };
        let mut left = filled;
        while left > 0 {
            match pipe.drain_into(pod, left) {
                Ok(n) => left -= n,
                Err(errno) => return Err(abort_both(tls, pod, aborted, errno.into())),
            }
        }
        total += filled as u64;
    }
}

/// Reads the record splice refused from `tls`: `Some(bytes)` passed on to
/// `pod` (0 for a skipped session ticket), `None` for the peer's
/// close_notify.
fn control_record(
    tls: &TcpStream,
    pod: &TcpStream,
    buffer: &mut Vec<u8>,
) -> std::io::Result<Option<usize>> {
    buffer.resize(control_records::RECORD_BUFFER, 0);
    match control_records::read_record(tls.as_fd(), buffer)? {
        Record::Data(n) => {
            std::io::Write::write_all(&mut &*pod, &buffer[..n])?;
            Ok(Some(n))
        }
        Record::Skipped => Ok(Some(0)),
        Record::CloseNotify => Ok(None),
        Record::EndOfStream => Err(std::io::Error::other(Truncated)),
    }
}

/// The pipe a relay direction splices through.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> std::io::Result<Self> {
        let (read, write) = nix::unistd::pipe()?;
        Ok(Self { read, write })
    }

    /// Moves up to [`CHUNK`] bytes from `socket` into the (empty) pipe.
    fn fill_from(&self, socket: &TcpStream) -> nix::Result<usize> {
        splice(
            socket.as_fd(),
            None,
            self.write.as_fd(),
            None,
            CHUNK,
            SpliceFFlags::SPLICE_F_MOVE,
        )
    }

    /// Moves up to `len` of the pipe's bytes into `socket`.
    fn drain_into(&self, socket: &TcpStream, len: usize) -> nix::Result<usize> {
        splice(
            self.read.as_fd(),
            None,
            socket.as_fd(),
            None,
            len,
            SpliceFFlags::SPLICE_F_MOVE,
        )
    }
}

/// A reset (or any error) on one side of a relay: marks the relay aborted,
/// gives both sockets SO_LINGER 0 (their final close sends a RST, not a FIN)
/// and shuts their read side so the other direction's thread wakes and stops
/// without half-closing anything. Returns `error`.
pub(crate) fn abort_both(
    a: &TcpStream,
    b: &TcpStream,
    aborted: &AtomicBool,
    error: std::io::Error,
) -> std::io::Error {
    aborted.store(true, Ordering::SeqCst);
    for stream in [a, b] {
        reset_on_close(stream);
        let _ = stream.shutdown(Shutdown::Read);
    }
    error
}

/// Makes the socket's final close send a RST rather than a FIN
/// (SO_LINGER 0): the peer sees ECONNRESET, not a clean end of stream.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = nix::sys::socket::setsockopt(
        stream,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}
