//! A TCP relay from inside a test bed's namespace to a host loopback service.
//!
//! Servers the tests start on the host's loopback (the kube-apiserver) are
//! out of reach of agents running in node namespaces. [`TcpRelay`] listens
//! on an address inside a namespace (e.g. node 1's underlay address, which
//! every node reaches) and copies each connection, both ways, to the host
//! service. The bytes pass untouched (TLS included). It stops accepting when
//! dropped; open connections end when either side closes.

use std::{
    io::ErrorKind,
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{Result, TestbedError, netns::NetNs};

pub struct TcpRelay {
    listen: SocketAddrV4,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpRelay {
    /// Listens on `listen` inside `ns` and relays to `target` (reached from
    /// the caller's namespace, normally the host's).
    pub fn start(ns: &NetNs, listen: SocketAddrV4, target: SocketAddr) -> Result<Self> {
        let listener = ns
            .run(move || TcpListener::bind(listen))?
            .map_err(|source| TestbedError::Io {
                context: format!("cannot listen on {listen} in {}", ns.name()),
                source,
            })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| TestbedError::Io {
                context: "cannot make the relay's listener non-blocking".into(),
                source,
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        // Spawned from the caller's thread, so its connects happen in the
        // caller's namespace.
        let acceptor = std::thread::Builder::new()
            .name("tcp-relay".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let _ = client.set_nonblocking(false);
                            if let Ok(server) =
                                TcpStream::connect_timeout(&target, Duration::from_secs(5))
                            {
                                pipe(client, server);
                            }
                        }
                        Err(error) if error.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
            .map_err(|source| TestbedError::Io {
                context: "cannot start the relay thread".into(),
                source,
            })?;
        Ok(Self {
            listen,
            stop,
            acceptor: Some(acceptor),
        })
    }

    pub fn address(&self) -> SocketAddrV4 {
        self.listen
    }
}

/// Copies both directions on two threads; each half-closes its far side when
/// its source ends.
fn pipe(client: TcpStream, server: TcpStream) {
    let halves = (client.try_clone(), server.try_clone());
    let (Ok(client_reader), Ok(server_reader)) = halves else {
        return;
    };
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        }
    };
    std::thread::spawn(copy(client_reader, server));
    std::thread::spawn(copy(server_reader, client));
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}
