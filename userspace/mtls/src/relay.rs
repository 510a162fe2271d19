//! Moving bytes between a pod's plain socket and a kTLS socket with splice:
//! the bytes never enter userspace, and the kernel does the crypto.
//!
//! One blocking thread per direction (the second from [`crate::workers`]): splice socket → pipe, then drain the
//! pipe into the other socket before reading again (a pipe refilled before it
//! is empty deadlocks request/response traffic). End of stream on one side
//! becomes `shutdown(SHUT_WR)` on the other, so half-close propagates; an
//! error (a reset) on either side aborts the relay and resets both peers.
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

use nix::fcntl::{SpliceFFlags, splice};

use crate::limits::{RecordBudget, RecordLimitReached};

/// Largest chunk moved per splice call.
const CHUNK: usize = 64 * 1024;

/// Bytes moved in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Relays between `a` and `b` until both directions have ended.
pub fn splice_relay(a: TcpStream, b: TcpStream) -> std::io::Result<RelayStats> {
    splice_relay_with_budget(a, b, None)
}

/// Like [`splice_relay`], counting the records written into `b` (a kTLS
/// socket) against `budget`: past it, both peers are reset (see
/// [`crate::limits`]).
pub fn splice_relay_with_budget(
    a: TcpStream,
    b: TcpStream,
    budget: Option<RecordBudget>,
) -> std::io::Result<RelayStats> {
    splice_relay_until(a, b, budget, Arc::new(AtomicBool::new(false)))
}

/// [`splice_relay_with_budget`] with the abort flag of a
/// [`crate::abort::RelayAbort`].
pub(crate) fn splice_relay_until(
    a: TcpStream,
    b: TcpStream,
    budget: Option<RecordBudget>,
    aborted: Arc<AtomicBool>,
) -> std::io::Result<RelayStats> {
    let (a2, b2) = (a.try_clone()?, b.try_clone()?);
    let forward = {
        let aborted = Arc::clone(&aborted);
        crate::workers::spawn(move || one_way(&a, &b, &aborted, budget))?
    };
    let backward = one_way(&b2, &a2, &aborted, None);
    let forward = forward.join()?;
    // Every descriptor of both sockets closes here; after an abort they carry
    // SO_LINGER 0, so both peers get a RST rather than a FIN.
    Ok(RelayStats {
        a_to_b: forward?,
        b_to_a: backward?,
    })
}

/// Moves `from` → `to` until EOF (then half-closes `to`) or an error (then
/// aborts the relay so both peers are reset).
fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    aborted: &AtomicBool,
    mut budget: Option<RecordBudget>,
) -> std::io::Result<u64> {
    let (pipe_read, pipe_write): (OwnedFd, OwnedFd) = nix::unistd::pipe()?;
    let mut total = 0u64;
    loop {
        let filled = match splice(
            from.as_fd(),
            None,
            pipe_write.as_fd(),
            None,
            CHUNK,
            SpliceFFlags::SPLICE_F_MOVE,
        ) {
            Ok(0) if aborted.load(Ordering::SeqCst) => return Ok(total),
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return Ok(total);
            }
            Ok(n) => n,
            Err(errno) => return Err(abort_both(from, to, aborted, errno.into())),
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
                return Err(abort_both(from, to, aborted, std::io::Error::other(limit)));
            }
            match splice(
                pipe_read.as_fd(),
                None,
                to.as_fd(),
                None,
                allowed,
                SpliceFFlags::SPLICE_F_MOVE,
            ) {
                Ok(n) => {
                    if let Some(budget) = &mut budget
                        && let Err(limit) = budget.spend(n)
                    {
                        return Err(abort_both(from, to, aborted, std::io::Error::other(limit)));
                    }
                    left -= n;
                }
                Err(errno) => return Err(abort_both(from, to, aborted, errno.into())),
            }
        }
        total += filled as u64;
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
