//! Ending a live relay from outside it.
//!
//! Authorization and revocation are decided at the handshake, but a rule
//! can change and a certificate can be revoked while a session runs. The
//! agent keeps a [`RelayAbort`] per relayed session and, when a session is no
//! longer allowed, calls [`RelayAbort::abort`]: both peers are reset, and
//! neither sees a clean end of stream that could pass for a finished
//! transfer.
//!
//! - The pod's socket is disconnected at once (`connect(AF_UNSPEC)`, the
//!   kernel's ABORT): it sends a RST, and the relay threads blocked on it,
//!   reading or writing, wake with an error.
//! - The agent-to-agent socket is disconnected the same way in userspace
//!   mode. A kTLS socket refuses a disconnect; its reader is woken by
//!   shutting its read side, and its final close sends the RST (SO_LINGER 0).
//!   A relay thread blocked writing to a peer agent that has stopped reading
//!   wakes only when that peer reads or resets.
//!
//! `unsafe`: one `connect(2)` with an `AF_UNSPEC` address, which std and nix
//! do not offer.
#![allow(unsafe_code)]

use std::{
    net::{Shutdown, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

/// Ends one relay from another thread. Holds second descriptors of the two
/// sockets: drop it once the relay has returned, so they close.
#[derive(Debug)]
pub struct RelayAbort {
    aborted: Arc<AtomicBool>,
    plain: TcpStream,
    tls: TcpStream,
}

impl RelayAbort {
    pub(crate) fn new(plain: &TcpStream, tls: &TcpStream) -> std::io::Result<Self> {
        Ok(Self {
            aborted: Arc::new(AtomicBool::new(false)),
            plain: plain.try_clone()?,
            tls: tls.try_clone()?,
        })
    }

    /// The flag the relay's threads check when a read ends.
    pub(crate) fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.aborted)
    }

    /// Resets both peers and makes the relay return. Calling it again, or
    /// after the relay ended, does nothing more.
    pub fn abort(&self) {
        if self.aborted.swap(true, Ordering::SeqCst) {
            return;
        }
        for stream in [&self.plain, &self.tls] {
            crate::relay::reset_on_close(stream);
        }
        let _ = disconnect(&self.plain);
        if disconnect(&self.tls).is_err() {
            let _ = self.tls.shutdown(Shutdown::Read);
        }
    }

    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }
}

/// The kernel's ABORT of a TCP connection: a RST to the peer, queues
/// dropped, waiting threads woken with an error; the socket stays open.
fn disconnect(stream: &TcpStream) -> std::io::Result<()> {
    let unspecified = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: `unspecified` is a valid sockaddr of the length passed, and
    // connect(2) reads it only during the call; the descriptor is open for
    // the lifetime of `stream`.
    let ret = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            &unspecified,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{ErrorKind, Read, Write},
        time::Duration,
    };

    use super::*;
    use crate::relay;

    fn pair() -> (TcpStream, TcpStream) {
        veil_testbed::traffic::loopback_pair().unwrap()
    }

    /// How the peer's stream ends once it has read what was queued: a clean
    /// end of stream (`Ok`) or the error (a reset, or a timeout after 5 s).
    fn how_it_ends(peer: &mut TcpStream) -> std::io::Result<()> {
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buffer = [0u8; 64 * 1024];
        loop {
            if peer.read(&mut buffer)? == 0 {
                return Ok(());
            }
        }
    }

    /// Waits for an aborted relay's thread; fails the test if it hangs.
    fn returns_within_5s<T: Send + 'static>(relay: std::thread::JoinHandle<T>) {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || done.send(relay.join().is_ok()).unwrap());
        assert_eq!(
            finished.recv_timeout(Duration::from_secs(5)),
            Ok(true),
            "the relay is still blocked 5 s after the abort"
        );
    }

    #[test]
    fn an_aborted_relay_returns_and_both_peers_are_reset_not_closed() {
        let (plain, mut pod) = pair();
        let (tls, mut agent) = pair();
        let abort = RelayAbort::new(&plain, &tls).unwrap();
        let flag = abort.flag();
        let relay = std::thread::spawn(move || relay::splice_relay_until(plain, tls, None, flag));
        // The relay carries bytes before the abort…
        pod.write_all(b"before").unwrap();
        let mut seen = [0u8; 6];
        agent.read_exact(&mut seen).unwrap();
        assert_eq!(&seen, b"before");
        // …and returns promptly after it, with both peers reset.
        abort.abort();
        returns_within_5s(relay);
        drop(abort);
        for (name, peer) in [("pod", &mut pod), ("agent", &mut agent)] {
            match how_it_ends(peer) {
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                other => panic!("the {name} was not reset: {other:?}"),
            }
        }
    }

    #[test]
    fn abort_wakes_a_relay_blocked_writing_to_a_pod_that_stopped_reading() {
        let (plain, mut pod) = pair();
        let (tls, mut agent) = pair();
        let abort = RelayAbort::new(&plain, &tls).unwrap();
        let flag = abort.flag();
        let relay = std::thread::spawn(move || relay::splice_relay_until(plain, tls, None, flag));
        // The pod reads nothing: the agent's bytes fill every buffer on the
        // way and the relay blocks writing to the pod.
        agent
            .set_write_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        while agent.write(&chunk).map(|n| sent += n).is_ok() {
            assert!(
                sent < 1 << 30,
                "nothing stopped 1 GiB: the pod socket never filled"
            );
        }
        abort.abort();
        returns_within_5s(relay);
        drop(abort);
        match how_it_ends(&mut pod) {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("the pod was not reset: {other:?}"),
        }
    }
}
