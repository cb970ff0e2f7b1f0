//! An in-process TCP proxy that adds a fixed one-way delay in each direction,
//! so that a loopback server behaves like one across a network, and counts
//! request turns (round trips) as they cross it.
//!
//! Each direction of each connection is a delay line: a reader thread stamps
//! every chunk with the instant it arrived, a writer thread forwards it once
//! `delay` has passed. Chunks in flight overlap, as on a real link (the delay
//! is latency, not a bandwidth limit). Plain threads and blocking sockets keep
//! the delay precise to well under a millisecond, which tokio's millisecond
//! timer wheel would not.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// What crossed the proxy so far.
#[derive(Debug, Default)]
pub struct ProxyStats {
    turns: AtomicU64,
    connections: AtomicU64,
}

impl ProxyStats {
    /// Client requests that followed a server reply (or opened a
    /// connection): one per round trip, pipelined statements counting once.
    pub fn turns(&self) -> u64 {
        self.turns.load(Ordering::Relaxed)
    }

    /// Connections accepted.
    #[cfg(test)]
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

/// A running proxy; dropping it stops accepting (open connections end when
/// either side closes).
#[derive(Debug)]
pub struct LatencyProxy {
    addr: SocketAddr,
    stats: Arc<ProxyStats>,
    stop: Arc<AtomicBool>,
}

const UP: u8 = 1;
const DOWN: u8 = 2;

impl LatencyProxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards every
    /// connection to `target`, delaying each direction by `delay`.
    pub fn start(target: SocketAddr, delay: Duration) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(ProxyStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (stats.clone(), stop.clone());
        thread::Builder::new()
            .name("bench-proxy".into())
            .spawn(move || accept_loop(listener, target, delay, s, st))?;
        Ok(Self { addr, stats, stop })
    }

    /// The address to connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<ProxyStats> {
        self.stats.clone()
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    delay: Duration,
    stats: Arc<ProxyStats>,
    stop: Arc<AtomicBool>,
) {
    for client in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(client) = client else { continue };
        let server = match TcpStream::connect(target) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%target, error = %e, "bench proxy: cannot reach the target");
                let _ = client.shutdown(Shutdown::Both);
                continue;
            }
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let last = Arc::new(AtomicU8::new(DOWN));
        for (from, to, dir) in [
            (client.try_clone(), server.try_clone(), UP),
            (server.try_clone(), client.try_clone(), DOWN),
        ] {
            let (Ok(from), Ok(to)) = (from, to) else {
                continue;
            };
            pipe(from, to, delay, dir, last.clone(), stats.clone());
        }
    }
}

/// One direction: a reader stamping chunks and a writer releasing them.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    delay: Duration,
    dir: u8,
    last: Arc<AtomicU8>,
    stats: Arc<ProxyStats>,
) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let reader = thread::Builder::new()
        .name("bench-proxy-rd".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let at = Instant::now();
                        if dir == UP {
                            if last.swap(UP, Ordering::Relaxed) != UP {
                                stats.turns.fetch_add(1, Ordering::Relaxed);
                            }
                        } else {
                            last.store(DOWN, Ordering::Relaxed);
                        }
                        if tx.send((at, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
            // Dropping `tx` tells the writer the stream ended.
        });
    if reader.is_err() {
        return;
    }
    let _ = thread::Builder::new()
        .name("bench-proxy-wr".into())
        .spawn(move || {
            while let Ok((at, chunk)) = rx.recv() {
                let due = at + delay;
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
                if to.write_all(&chunk).is_err() {
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server through the proxy: a round trip takes two delays, and
    /// each request after a reply counts one turn.
    #[test]
    fn round_trips_take_two_delays_and_are_counted() {
        let echo = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let target = echo.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut buf = [0u8; 16];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let delay = Duration::from_millis(5);
        let proxy = LatencyProxy::start(target, delay).unwrap();
        let mut c = TcpStream::connect(proxy.addr()).unwrap();
        c.set_nodelay(true).unwrap();
        let mut buf = [0u8; 4];
        let start = Instant::now();
        for _ in 0..5 {
            c.write_all(b"ping").unwrap();
            c.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"ping");
        }
        let per_trip = start.elapsed() / 5;
        assert!(per_trip >= 2 * delay, "{per_trip:?}");
        assert!(
            per_trip < 2 * delay + Duration::from_millis(20),
            "{per_trip:?}"
        );
        assert_eq!(proxy.stats().turns(), 5);
        assert_eq!(proxy.stats().connections(), 1);
    }
}
