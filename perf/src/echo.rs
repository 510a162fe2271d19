//! The servers our own load generator talks to, running inside a server pod.
//!
//! - echo (7100): echoes whatever arrives; one thread per connection;
//! - one-shot (7101): accept, read one byte, answer one byte, close — inline,
//!   so the connection-rate measurement pays no thread start per connection;
//! - hold (7102): accepts and keeps connections open until told to let go.
//!
//! Accept loops wait in poll(2) with a short timeout so they stop promptly
//! when the servers are dropped, without adding latency to accepts.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use veil_testbed::netns::NetNs;

use crate::{Result, io_error};

pub const ECHO_PORT: u16 = 7100;
pub const ONE_SHOT_PORT: u16 = 7101;
pub const HOLD_PORT: u16 = 7102;

/// How long an idle connection may block a server thread before it re-checks the stop flag.
const IDLE_CHECK: Duration = Duration::from_millis(500);

pub struct Servers {
    stop: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Binds the three servers on `ip` inside `ns` and starts serving.
    pub fn start(ns: &NetNs, ip: Ipv4Addr) -> Result<Self> {
        let bind = |port: u16| -> Result<TcpListener> {
            let address = SocketAddr::from((ip, port));
            ns.run(move || TcpListener::bind(address))?
                .map_err(io_error(format!(
                    "cannot listen on {address} in {}",
                    ns.name()
                )))
        };
        let (echo, one_shot, hold) = (bind(ECHO_PORT)?, bind(ONE_SHOT_PORT)?, bind(HOLD_PORT)?);
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        {
            let stop = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                accept_loop(&echo, &stop, |stream| {
                    let stop = Arc::clone(&stop);
                    std::thread::spawn(move || echo_connection(stream, &stop));
                })
            }));
        }
        {
            let stop = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                // One thread per connection: parallel clients must not queue
                // behind one another's first byte.
                accept_loop(&one_shot, &stop, |stream| {
                    std::thread::spawn(move || answer_once(stream));
                })
            }));
        }
        {
            let stop = Arc::clone(&stop);
            let held = Arc::clone(&held);
            threads.push(std::thread::spawn(move || {
                accept_loop(&hold, &stop, |stream| {
                    if let Ok(mut held) = held.lock() {
                        held.push(stream);
                    }
                })
            }));
        }
        Ok(Self {
            stop,
            held,
            threads,
        })
    }

    /// Closes every connection the hold server keeps.
    pub fn release_held(&self) {
        if let Ok(mut held) = self.held.lock() {
            held.clear();
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.release_held();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, mut serve: impl FnMut(TcpStream)) {
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        if let Ok((stream, _)) = listener.accept() {
            let _ = stream.set_nodelay(true);
            serve(stream);
        }
    }
}

fn echo_connection(mut stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(IDLE_CHECK));
    let mut buffer = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

fn answer_once(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut byte = [0u8; 1];
    if stream.read_exact(&mut byte).is_ok() {
        let _ = stream.write_all(&byte);
    }
}
