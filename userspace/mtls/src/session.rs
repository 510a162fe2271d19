//! An established agent-to-agent TLS session, in the kernel when it can be.
//!
//! [`Session::from_handshaken`] takes a finished handshake (see
//! [`crate::handshake`]) and tries the kernel first:
//! with the TLS ULP the keys go to the kernel and [`Session::relay`] splices;
//! without it the same session stays in rustls and the relay copies through
//! userspace. The choice is automatic and visible as [`Mode`].

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    os::fd::AsFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use rustls::Connection;

use crate::{
    abort::RelayAbort,
    handshake,
    ktls::{self, KtlsError},
    limits::RecordBudget,
    relay::{self, RelayStats},
};

/// Where the record encryption happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Kernel,
    Userspace,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "ktls",
            Self::Userspace => "userspace",
        }
    }
}

/// Whether a session may be handed to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelTls {
    /// When the kernel has the TLS ULP.
    Auto,
    /// Never: the session stays in rustls.
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot hand the session to the kernel: {0}")]
    Kernel(KtlsError),
    #[error("cannot extract the session keys: {0}")]
    Secrets(rustls::Error),
    #[error("cannot send what the handshake left queued: {0}")]
    Pending(crate::handshake::HandshakeError),
    #[error("no session ticket before the kernel takes the session: {0}")]
    Ticket(crate::handshake::HandshakeError),
}

/// A TLS session ready to carry a pod's bytes.
pub enum Session {
    Kernel(TcpStream),
    /// The rustls state is large; boxed so the kernel variant stays small.
    Userspace(Box<Connection>, TcpStream),
}

impl Session {
    /// Takes a connection whose handshake (and preface) is done, reading no
    /// further byte (see [`crate::handshake`]), into the kernel if it can.
    /// A client reads the server's session ticket first on the kernel path
    /// (see [`handshake::receive_ticket`]); in userspace rustls takes it
    /// whenever it comes.
    ///
    /// What the handshake left queued (a server's session ticket) is sent
    /// first, on either path: a kernel-path client waits for it.
    ///
    /// With [`KernelTls::Off`] the session stays in userspace whatever the
    /// kernel can do.
    pub fn from_handshaken(
        mut connection: Connection,
        mut tcp: TcpStream,
        kernel_tls: KernelTls,
    ) -> Result<Self, SessionError> {
        handshake::send_pending(&mut connection, &mut tcp).map_err(SessionError::Pending)?;
        if kernel_tls == KernelTls::Off {
            return Ok(Self::Userspace(Box::new(connection), tcp));
        }
        match ktls::attach_ulp(tcp.as_fd()) {
            Ok(()) => {}
            Err(KtlsError::Unsupported) => {
                return Ok(Self::Userspace(Box::new(connection), tcp));
            }
            Err(other) => return Err(SessionError::Kernel(other)),
        }
        handshake::receive_ticket(&mut connection, &mut tcp).map_err(SessionError::Ticket)?;
        let secrets = match connection {
            Connection::Client(c) => c.dangerous_extract_secrets(),
            Connection::Server(s) => s.dangerous_extract_secrets(),
        }
        .map_err(SessionError::Secrets)?;
        ktls::install_keys(tcp.as_fd(), secrets).map_err(SessionError::Kernel)?;
        Ok(Self::Kernel(tcp))
    }

    pub fn mode(&self) -> Mode {
        match self {
            Self::Kernel(_) => Mode::Kernel,
            Self::Userspace(..) => Mode::Userspace,
        }
    }

    /// Relays between the pod's `plain` socket and this session until both
    /// directions end; half-close (as close_notify) and resets propagate
    /// either way, and a peer's FIN without close_notify resets the pod
    /// ([`relay::Truncated`]).
    pub fn relay(self, plain: TcpStream) -> std::io::Result<RelayStats> {
        self.relay_with_budget(plain, RecordBudget::default())
    }

    /// [`Self::relay`] with an explicit record budget for what this side
    /// sends (see [`crate::limits`]): past it, both peers are reset.
    pub fn relay_with_budget(
        self,
        plain: TcpStream,
        budget: RecordBudget,
    ) -> std::io::Result<RelayStats> {
        self.relay_inner(plain, budget, Arc::new(AtomicBool::new(false)))
    }

    /// A handle that ends this session's relay with `plain` from another
    /// thread (see [`crate::abort`]); pass it to [`Self::relay_abortable`].
    pub fn abort_handle(&self, plain: &TcpStream) -> std::io::Result<RelayAbort> {
        let tls = match self {
            Self::Kernel(tls) | Self::Userspace(_, tls) => tls,
        };
        RelayAbort::new(plain, tls)
    }

    /// [`Self::relay`], ended early (both peers reset) when `abort` fires.
    pub fn relay_abortable(
        self,
        plain: TcpStream,
        abort: &RelayAbort,
    ) -> std::io::Result<RelayStats> {
        self.relay_inner(plain, RecordBudget::default(), abort.flag())
    }

    fn relay_inner(
        self,
        plain: TcpStream,
        budget: RecordBudget,
        aborted: Arc<AtomicBool>,
    ) -> std::io::Result<RelayStats> {
        match self {
            Self::Kernel(tls) => relay::splice_relay_until(plain, tls, Some(budget), aborted),
            Self::Userspace(connection, tls) => {
                userspace_relay(plain, *connection, tls, budget, aborted)
            }
        }
    }
}

/// The fallback relay: rustls encrypts in userspace. One thread per
/// direction (the second from [`crate::workers`]); the connection is locked
/// only to move bytes in or out of it, never across a blocking socket call.
fn userspace_relay(
    plain: TcpStream,
    connection: Connection,
    tls: TcpStream,
    budget: RecordBudget,
    aborted: Arc<AtomicBool>,
) -> std::io::Result<RelayStats> {
    let connection = Arc::new(Mutex::new(connection));
    let (plain2, tls2) = (plain.try_clone()?, tls.try_clone()?);
    let outbound = {
        let (connection, aborted) = (Arc::clone(&connection), Arc::clone(&aborted));
        crate::workers::spawn(move || {
            encrypt_direction(&plain, &tls, &connection, &aborted, budget)
        })?
    };
    let inbound = decrypt_direction(&tls2, &plain2, &connection, &aborted);
    let outbound = outbound.join()?;
    Ok(RelayStats {
        a_to_b: outbound?,
        b_to_a: inbound?,
    })
}

fn lock(connection: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    connection.lock().unwrap_or_else(|p| p.into_inner())
}

/// plain → TLS records. EOF sends close_notify and half-closes the TLS socket.
fn encrypt_direction(
    plain: &TcpStream,
    tls: &TcpStream,
    connection: &Mutex<Connection>,
    aborted: &AtomicBool,
    mut budget: RecordBudget,
) -> std::io::Result<u64> {
    let mut buffer = buffers::Buffer::take(16 * 1024);
    let mut total = 0u64;
    loop {
        let n = match (&*plain).read(&mut buffer) {
            Ok(0) if aborted.load(Ordering::SeqCst) => return Ok(total),
            Ok(n) => n,
            Err(error) => return Err(relay::abort_both(plain, tls, aborted, error)),
        };
        if n > 0
            && let Err(limit) = budget.spend(n)
        {
            return Err(relay::abort_both(
                plain,
                tls,
                aborted,
                std::io::Error::other(limit),
            ));
        }
        let mut records = Vec::new();
        {
            let mut connection = lock(connection);
            if n == 0 {
                connection.send_close_notify();
            } else {
                connection.writer().write_all(&buffer[..n])?;
            }
            while connection.wants_write() {
                connection.write_tls(&mut records)?;
            }
        }
        if let Err(error) = (&*tls).write_all(&records) {
            return Err(relay::abort_both(plain, tls, aborted, error));
        }
        if n == 0 {
            let _ = tls.shutdown(Shutdown::Write);
            return Ok(total);
        }
        total += n as u64;
    }
}

/// TLS records → plain. close_notify half-closes the plain socket; a FIN
/// without one is [`relay::Truncated`] and resets it.
fn decrypt_direction(
    tls: &TcpStream,
    plain: &TcpStream,
    connection: &Mutex<Connection>,
    aborted: &AtomicBool,
) -> std::io::Result<u64> {
    let mut records = buffers::Buffer::take(32 * 1024);
    let mut plaintext = buffers::Buffer::take(32 * 1024);
    let mut total = 0u64;
    loop {
        let n = match (&*tls).read(&mut records) {
            Ok(0) if aborted.load(Ordering::SeqCst) => return Ok(total),
            Ok(n) => n,
            Err(error) => return Err(relay::abort_both(tls, plain, aborted, error)),
        };
        if n == 0 {
            // A FIN with no close_notify before it: rustls took every
            // record so far, and none was the peer's close_notify.
            return Err(relay::abort_both(
                tls,
                plain,
                aborted,
                std::io::Error::other(relay::Truncated),
            ));
        }
        let mut out = Vec::new();
        let mut closed = false;
        {
            let mut connection = lock(connection);
            let mut input = &records[..n];
            while !input.is_empty() {
                connection.read_tls(&mut input)?;
                if let Err(error) = connection.process_new_packets() {
                    let error = std::io::Error::new(std::io::ErrorKind::InvalidData, error);
                    drop(connection);
                    return Err(relay::abort_both(tls, plain, aborted, error));
                }
                loop {
                    match connection.reader().read(&mut plaintext) {
                        Ok(0) => {
                            closed = true;
                            break;
                        }
                        Ok(m) => out.extend_from_slice(&plaintext[..m]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        if let Err(error) = (&*plain).write_all(&out) {
            return Err(relay::abort_both(tls, plain, aborted, error));
        }
        total += out.len() as u64;
        if closed {
            let _ = plain.shutdown(Shutdown::Write);
            return Ok(total);
        }
    }
}

/// The relay's copy buffers, kept per thread: the agent's connection threads
/// are reused, so a connection takes buffers the last one left instead of
/// allocating and zeroing 80 KiB. Only the bytes a read just filled are ever
/// used, so what a buffer held before never leaks into a stream.
mod buffers {
    use std::{
        cell::RefCell,
        ops::{Deref, DerefMut},
    };

    /// Buffers kept per thread at most (a direction uses up to two).
    const KEPT: usize = 2;

    thread_local! {
        static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    /// A buffer of at least the asked length, handed back to its thread on drop.
    pub struct Buffer(Vec<u8>);

    impl Buffer {
        pub fn take(len: usize) -> Self {
            let spare = SPARE.with(|spare| spare.borrow_mut().pop());
            match spare {
                Some(buffer) if buffer.len() >= len => Self(buffer),
                _ => Self(vec![0u8; len]),
            }
        }
    }

    impl Drop for Buffer {
        fn drop(&mut self) {
            let buffer = std::mem::take(&mut self.0);
            SPARE.with(|spare| {
                let mut spare = spare.borrow_mut();
                if spare.len() < KEPT {
                    spare.push(buffer);
                }
            });
        }
    }

    impl Deref for Buffer {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            &self.0
        }
    }

    impl DerefMut for Buffer {
        fn deref_mut(&mut self) -> &mut [u8] {
            &mut self.0
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_thread_reuses_its_buffers_and_a_small_one_is_not_handed_out_for_more() {
            let address = {
                let buffer = Buffer::take(1024);
                buffer.as_ptr()
            };
            assert_eq!(Buffer::take(1024).as_ptr(), address, "reused");
            let bigger = Buffer::take(64 * 1024);
            assert!(bigger.len() >= 64 * 1024);
            let elsewhere = std::thread::spawn(|| Buffer::take(1024).len())
                .join()
                .unwrap();
            assert_eq!(elsewhere, 1024);
        }
    }
}
