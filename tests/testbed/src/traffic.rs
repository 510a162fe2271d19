//! Bounded test traffic between pods: every loop stops by itself in count and time.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use crate::{PodRef, Result, TestbedError, Topology};

/// Longest any single transfer may take before it is abandoned as failed.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30);
/// Size of each write and read.
const CHUNK: usize = 64 * 1024;

/// What a transfer measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TransferReport {
    /// Bytes sent, echoed back, and checked.
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Two connected TCP sockets over loopback in the calling thread's network
/// namespace: (the connecting side, the accepted side).
pub fn loopback_pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let connecting = TcpStream::connect(listener.local_addr()?)?;
    let (accepted, _) = listener.accept()?;
    Ok((connecting, accepted))
}

/// The byte at offset `i` of every test stream: cheap, and a shifted or
/// dropped byte breaks the pattern.
pub fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 11)) as u8
}

/// Sends `bytes` from `from` to an echo server in `to` on `port`, reads the echo
/// back and checks both directions byte for byte.
pub fn tcp_echo(
    topology: &Topology,
    from: PodRef,
    to: PodRef,
    port: u16,
    bytes: u64,
) -> Result<TransferReport> {
    let server_addr = SocketAddr::from((to.ip(), port));
    let listener = topology
        .pod(to)
        .run(move || TcpListener::bind(server_addr))?
        .map_err(|e| TestbedError::Traffic(format!("{to}: cannot listen on {server_addr}: {e}")))?;
    let server = std::thread::spawn(move || echo_one(listener, bytes));

    let started = Instant::now();
    let client = topology
        .pod(from)
        .run(move || TcpStream::connect_timeout(&server_addr, Duration::from_secs(5)))?
        .map_err(|e| TestbedError::Traffic(format!("{from} → {to}: cannot connect: {e}")))?;
    let result = send_and_check_echo(client, bytes)
        .map_err(|e| TestbedError::Traffic(format!("{from} → {to}: {e}")));
    let server_result = server
        .join()
        .map_err(|_| TestbedError::Traffic("echo server thread panicked".into()))?;
    result?;
    server_result.map_err(|e| TestbedError::Traffic(format!("{to} echo server: {e}")))?;
    Ok(TransferReport {
        bytes,
        elapsed: started.elapsed(),
    })
}

fn set_timeouts(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(TRANSFER_TIMEOUT))?;
    stream.set_write_timeout(Some(TRANSFER_TIMEOUT))
}

/// Accepts one connection (within the timeout) and echoes exactly `bytes`.
fn echo_one(listener: TcpListener, bytes: u64) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + TRANSFER_TIMEOUT;
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nonblocking(false)?;
    set_timeouts(&stream)?;
    let mut buffer = vec![0u8; CHUNK];
    let mut echoed = 0u64;
    while echoed < bytes {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        stream.write_all(&buffer[..n])?;
        echoed += n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    if echoed != bytes {
        return Err(std::io::Error::other(format!(
            "received {echoed} bytes, expected {bytes}"
        )));
    }
    Ok(())
}

fn send_and_check_echo(stream: TcpStream, bytes: u64) -> std::io::Result<()> {
    set_timeouts(&stream)?;
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut chunk = vec![0u8; CHUNK];
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(CHUNK as u64) as usize;
            for (i, b) in chunk[..n].iter_mut().enumerate() {
                *b = pattern_byte(sent + i as u64);
            }
            writer.write_all(&chunk[..n])?;
            sent += n as u64;
        }
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut reader = stream;
    let mut buffer = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        for (i, &b) in buffer[..n].iter().enumerate() {
            let offset = received + i as u64;
            if b != pattern_byte(offset) {
                return Err(std::io::Error::other(format!(
                    "echoed byte {offset} is {b:#04x}, expected {:#04x}",
                    pattern_byte(offset)
                )));
            }
        }
        received += n as u64;
    }
    sender
        .join()
        .map_err(|_| std::io::Error::other("sender thread panicked"))??;
    if received != bytes {
        return Err(std::io::Error::other(format!(
            "echo returned {received} bytes, expected {bytes}"
        )));
    }
    Ok(())
}

/// `ping -c count` from `from` to `to`; all replies must arrive.
pub fn ping(topology: &Topology, from: PodRef, to: Ipv4Addr, count: u32) -> Result<()> {
    let output = topology
        .pod(from)
        .command("ping")
        .args(["-q", "-n", "-c", &count.to_string(), "-i", "0.2", "-W", "2"])
        .arg(to.to_string())
        .output()
        .map_err(|source| TestbedError::Spawn {
            command: "ping (package iputils-ping)".into(),
            source,
        })?;
    if !output.status.success() {
        return Err(TestbedError::Traffic(format!(
            "{from} → {to}: ping failed: {}{}",
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// Sends `count` UDP datagrams of `size` bytes from `from` to an echo server
/// in `to` and returns how many came back (each waits at most 1 s).
pub fn udp_echo(
    topology: &Topology,
    from: PodRef,
    to: PodRef,
    port: u16,
    count: u32,
    size: usize,
) -> Result<u32> {
    use std::net::UdpSocket;
    let server_addr = SocketAddr::from((to.ip(), port));
    let server = topology
        .pod(to)
        .run(move || UdpSocket::bind(server_addr))?
        .map_err(|e| TestbedError::Traffic(format!("{to}: cannot bind {server_addr}: {e}")))?;
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| TestbedError::Traffic(e.to_string()))?;
    let echo = std::thread::spawn(move || {
        let mut buffer = vec![0u8; 65536];
        for _ in 0..count {
            match server.recv_from(&mut buffer) {
                Ok((n, peer)) => {
                    let _ = server.send_to(&buffer[..n], peer);
                }
                Err(_) => return,
            }
        }
    });
    let client_bind = SocketAddr::from((from.ip(), 0));
    let client = topology
        .pod(from)
        .run(move || UdpSocket::bind(client_bind))?
        .map_err(|e| TestbedError::Traffic(format!("{from}: cannot bind: {e}")))?;
    client
        .set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| TestbedError::Traffic(e.to_string()))?;
    let mut answered = 0;
    let mut reply = vec![0u8; 65536];
    for i in 0..count {
        let datagram: Vec<u8> = (0..size as u64)
            .map(|b| pattern_byte(b + u64::from(i)))
            .collect();
        client
            .send_to(&datagram, server_addr)
            .map_err(|e| TestbedError::Traffic(format!("{from} → {to}: UDP send: {e}")))?;
        if let Ok((n, _)) = client.recv_from(&mut reply) {
            if reply[..n] == datagram[..] {
                answered += 1;
            }
        }
    }
    let _ = echo.join();
    Ok(answered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_detects_a_shift() {
        let a: Vec<u8> = (0..4096).map(pattern_byte).collect();
        let b: Vec<u8> = (1..4097).map(pattern_byte).collect();
        assert_ne!(a, b);
        assert!(a.iter().any(|&x| x != a[0]));
    }
}
