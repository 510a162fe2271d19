//! The load generator: each measurement is bounded in time and in count.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Stdio,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use veil_testbed::netns::NetNs;

use crate::iperf::{self, IperfResult};

/// Most requests one latency measurement sends, whatever its duration.
const MAX_REQUESTS: u64 = 2_000_000;
/// Most connections one connection-rate measurement opens.
const MAX_CONNECTIONS: u64 = 200_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Latency percentiles of one request/response measurement, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatencySample {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub requests: u64,
}

fn connect(target: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Ping-pong of `size`-byte messages on one connection for `duration`.
pub fn latency(
    ns: &NetNs,
    target: SocketAddr,
    size: usize,
    duration: Duration,
) -> Result<LatencySample, String> {
    ns.run(move || -> Result<LatencySample, String> {
        let mut stream = connect(target).map_err(|e| format!("connect {target}: {e}"))?;
        let request = vec![0x5a; size];
        let mut response = vec![0u8; size];
        let mut histogram =
            Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).map_err(|e| e.to_string())?;
        // Warm up the path (ARP, caches) before recording.
        for _ in 0..50 {
            stream.write_all(&request).map_err(|e| e.to_string())?;
            stream
                .read_exact(&mut response)
                .map_err(|e| e.to_string())?;
        }
        let deadline = Instant::now() + duration;
        let mut requests = 0;
        while requests < MAX_REQUESTS && Instant::now() < deadline {
            let sent = Instant::now();
            stream
                .write_all(&request)
                .map_err(|e| format!("send: {e}"))?;
            stream
                .read_exact(&mut response)
                .map_err(|e| format!("receive: {e}"))?;
            histogram.saturating_record(sent.elapsed().as_nanos() as u64);
            requests += 1;
        }
        if requests == 0 {
            return Err("no request completed".into());
        }
        let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        Ok(LatencySample {
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
            requests,
        })
    })
    .map_err(|e| e.to_string())?
}

/// New connections per second: connect, one 1-byte request, close — for `duration`.
pub fn connection_rate(ns: &NetNs, target: SocketAddr, duration: Duration) -> Result<f64, String> {
    ns.run(move || -> Result<f64, String> {
        let started = Instant::now();
        let deadline = started + duration;
        let mut completed = 0u64;
        let mut byte = [0u8; 1];
        while completed < MAX_CONNECTIONS && Instant::now() < deadline {
            let mut stream = connect(target).map_err(|e| format!("connect {target}: {e}"))?;
            stream.write_all(&[1]).map_err(|e| format!("send: {e}"))?;
            stream
                .read_exact(&mut byte)
                .map_err(|e| format!("receive: {e}"))?;
            completed += 1;
        }
        Ok(completed as f64 / started.elapsed().as_secs_f64())
    })
    .map_err(|e| e.to_string())?
}

/// New connections per second from `clients` clients at once, each doing
/// what [`connection_rate`] does, for `duration`: the rate the proxies
/// sustain when they are the bottleneck (the per-core figure divides it by
/// the proxies' CPU).
pub fn parallel_connection_rate(
    ns: &NetNs,
    target: SocketAddr,
    duration: Duration,
    clients: usize,
) -> Result<f64, String> {
    ns.run(move || -> Result<f64, String> {
        let started = Instant::now();
        let deadline = started + duration;
        let per_client = MAX_CONNECTIONS / clients.max(1) as u64;
        let results: Vec<Result<u64, String>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..clients)
                .map(|_| {
                    scope.spawn(move || -> Result<u64, String> {
                        let mut completed = 0u64;
                        let mut byte = [0u8; 1];
                        while completed < per_client && Instant::now() < deadline {
                            let mut stream =
                                connect(target).map_err(|e| format!("connect {target}: {e}"))?;
                            stream.write_all(&[1]).map_err(|e| format!("send: {e}"))?;
                            stream
                                .read_exact(&mut byte)
                                .map_err(|e| format!("receive: {e}"))?;
                            completed += 1;
                        }
                        Ok(completed)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|_| Err("a client panicked".into())))
                .collect()
        });
        let mut completed = 0;
        for result in results {
            completed += result?;
        }
        Ok(completed as f64 / started.elapsed().as_secs_f64())
    })
    .map_err(|e| e.to_string())?
}

/// Opens `count` connections to `target` and returns them, open.
pub fn open_connections(
    ns: &NetNs,
    target: SocketAddr,
    count: u32,
) -> Result<Vec<TcpStream>, String> {
    ns.run(move || -> Result<Vec<TcpStream>, String> {
        (0..count)
            .map(|i| connect(target).map_err(|e| format!("connection {i} to {target}: {e}")))
            .collect()
    })
    .map_err(|e| e.to_string())?
}

/// Idle connections an attacker holds open to an inbound port, opened one
/// after another from `ns` (bounded: `count` attempts, 30 s at most).
pub struct Flood {
    /// Connections the server accepted and has not closed yet.
    pub held: Vec<TcpStream>,
    /// Attempts refused or reset while connecting.
    pub refused: u32,
}

pub fn flood(ns: &NetNs, target: SocketAddr, count: u32) -> Result<Flood, String> {
    ns.run(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut flood = Flood {
            held: Vec::new(),
            refused: 0,
        };
        for _ in 0..count {
            if Instant::now() >= deadline {
                break;
            }
            match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
                Ok(stream) => flood.held.push(stream),
                Err(_) => flood.refused += 1,
            }
        }
        flood
    })
    .map_err(|e| e.to_string())
}

/// Like [`connection_rate`], but a failed connection is counted, not fatal:
/// (completed per second, failed).
pub fn connection_attempts(
    ns: &NetNs,
    target: SocketAddr,
    duration: Duration,
) -> Result<(f64, u64), String> {
    ns.run(move || {
        let started = Instant::now();
        let deadline = started + duration;
        let (mut completed, mut failed) = (0u64, 0u64);
        let mut byte = [0u8; 1];
        while completed + failed < MAX_CONNECTIONS && Instant::now() < deadline {
            let exchanged = connect(target).and_then(|mut stream| {
                stream.write_all(&[1])?;
                stream.read_exact(&mut byte)
            });
            match exchanged {
                Ok(()) => completed += 1,
                Err(_) => failed += 1,
            }
        }
        (completed as f64 / started.elapsed().as_secs_f64(), failed)
    })
    .map_err(|e| e.to_string())
}

/// Runs an iperf3 client in `ns` against `target` for `duration` (whole
/// seconds, at least one: iperf3 reads `-t` as an integer and `-t 0` runs
/// forever) with `streams` streams.
pub fn throughput(
    ns: &NetNs,
    target: SocketAddr,
    streams: u32,
    duration: Duration,
) -> Result<IperfResult, String> {
    let seconds = duration.as_secs_f64().round().max(1.0) as u64;
    let mut child = ns
        .command("iperf3")
        .args([
            "-c",
            &target.ip().to_string(),
            "-p",
            &target.port().to_string(),
        ])
        .args([
            "-P",
            &streams.to_string(),
            "-J",
            "--connect-timeout",
            "3000",
        ])
        .args(["-t", &seconds.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start iperf3 (package iperf3): {e}"))?;
    // iperf3 stops by itself after `duration`; this bound covers a hung peer.
    let deadline = Instant::now() + Duration::from_secs(seconds + 15);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let output = child.wait_with_output().map_err(|e| e.to_string())?;
                return Err(format!(
                    "iperf3 to {target} did not finish in time: {}{}",
                    String::from_utf8_lossy(&output.stdout).trim(),
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
        }
    }
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    iperf::parse(&String::from_utf8_lossy(&output.stdout))
}
