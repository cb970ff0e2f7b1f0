//! A TCP proxy between the adapter and PostgreSQL that can lose a `COMMIT`:
//! drop the connection right before the `COMMIT` reaches the server (it never
//! commits), or right after the server committed, swallowing its reply (the
//! commit happened but the client cannot know).
//!
//! It reads the PostgreSQL wire protocol just enough to recognise a `COMMIT`
//! — a simple query that is exactly `COMMIT`, or the execution (`Bind`) of a
//! prepared statement that is, as the adapter sends it pipelined after a
//! transaction's last statements — and the server's reply to it; everything
//! else is forwarded byte for byte.
//!
//! It also counts the client's round trips ([`CommitProxy::round_trips`]).

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// What to do to a `COMMIT` passing through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitFault {
    /// Close the connection instead of forwarding the `COMMIT`: the server
    /// never receives it and rolls the transaction back.
    DropBeforeCommit,
    /// Forward the `COMMIT`, wait for the server's reply (so the commit has
    /// happened), discard the reply (and any other reply still on its way)
    /// and close the connection.
    DropAfterCommit,
}

#[derive(Default)]
struct Shared {
    plan: Mutex<VecDeque<CommitFault>>,
    fired: AtomicUsize,
    commits_seen: AtomicUsize,
    round_trips: AtomicUsize,
    /// Held back before each chunk of the server's answers (ms).
    answer_delay_ms: AtomicU64,
}

impl Shared {
    fn next_fault(&self) -> Option<CommitFault> {
        self.plan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front()
    }
}

/// The proxy; it stops (closing every connection) when dropped.
pub struct CommitProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl CommitProxy {
    /// Listens on an ephemeral local port, forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared::default());
        let accept = tokio::spawn({
            let shared = shared.clone();
            async move {
                let mut connections = JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    let shared = shared.clone();
                    connections.spawn(async move {
                        if let Ok(server) = TcpStream::connect(upstream).await {
                            relay(client, server, shared).await;
                        }
                    });
                    // Reap finished connections as we go.
                    while connections.try_join_next().is_some() {}
                }
            }
        });
        Self {
            addr,
            shared,
            accept,
        }
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Applies `fault` to the next `times` `COMMIT`s (on any connection).
    pub fn arm(&self, fault: CommitFault, times: usize) {
        let mut plan = self
            .shared
            .plan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        plan.extend(std::iter::repeat_n(fault, times));
    }

    /// Forgets any fault not applied yet.
    pub fn disarm(&self) {
        self.shared
            .plan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// How many `COMMIT`s were dropped so far.
    pub fn fired(&self) -> usize {
        self.shared.fired.load(Ordering::SeqCst)
    }

    /// How many `COMMIT`s passed through (dropped ones included).
    pub fn commits_seen(&self) -> usize {
        self.shared.commits_seen.load(Ordering::SeqCst)
    }

    /// How many round trips the clients made so far (on any connection,
    /// the startup's own not counted): a message a client sends once the
    /// server's answer to something has reached it since its previous
    /// message starts one. Statements sent in one pipeline count once —
    /// unless an answer reaches the client before it has sent the rest, so
    /// a count can only be too high, never too low; an
    /// [answer delay](Self::delay_answers) longer than the client takes to
    /// send a pipeline rules that out but for a stalled client.
    pub fn round_trips(&self) -> usize {
        self.shared.round_trips.load(Ordering::SeqCst)
    }

    /// Holds back every chunk of the server's answers for `delay` before
    /// forwarding it (in order), from now on.
    pub fn delay_answers(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.shared.answer_delay_ms.store(ms, Ordering::SeqCst);
    }
}

impl Drop for CommitProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Relays one connection until either side closes or a fault cuts it.
async fn relay(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Set before a COMMIT is forwarded under DropAfterCommit: whatever the
    // server sends next is that COMMIT's reply, and is swallowed.
    let cut = Arc::new(AtomicBool::new(false));
    // Set when the server sends something; the client's next message
    // starts a round trip.
    let answered = Arc::new(AtomicBool::new(false));
    tokio::select! {
        _ = client_to_server(client_read, server_write, shared.clone(), cut.clone(), answered.clone()) => {}
        _ = server_to_client(server_read, client_write, shared.clone(), cut, answered) => {}
    }
    // Returning drops all four halves: both sockets close.
}

async fn server_to_client(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    cut: Arc<AtomicBool>,
    answered: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if cut.load(Ordering::SeqCst) {
            return swallow_until_commit_reply(&mut from, buf[..n].to_vec()).await;
        }
        let delay = shared.answer_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        answered.store(true, Ordering::SeqCst);
        to.write_all(&buf[..n]).await?;
    }
}

/// Reads the server's replies, forwarding none, until the `COMMIT`'s own
/// (its `CommandComplete`: `COMMIT`, or `ROLLBACK` for an aborted
/// transaction) has arrived: the server has then ended the transaction.
async fn swallow_until_commit_reply(
    from: &mut OwnedReadHalf,
    mut seen: Vec<u8>,
) -> std::io::Result<()> {
    let ended = |bytes: &[u8]| {
        [b"COMMIT\0".as_slice(), b"ROLLBACK\0".as_slice()]
            .iter()
            .any(|tag| bytes.windows(tag.len()).any(|w| w == *tag))
    };
    let mut buf = vec![0u8; 64 * 1024];
    while !ended(&seen) {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

/// The first NUL-terminated string of `bytes`, and what follows it.
fn cstr(bytes: &[u8]) -> (&[u8], &[u8]) {
    match bytes.iter().position(|b| *b == 0) {
        Some(end) => (&bytes[..end], &bytes[end + 1..]),
        None => (bytes, &[]),
    }
}

async fn client_to_server(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    cut: Arc<AtomicBool>,
    answered: Arc<AtomicBool>,
) -> std::io::Result<()> {
    // Startup: untyped messages (an SSL or GSS request may precede the
    // startup message proper).
    loop {
        let len = from.read_i32().await?;
        let mut body = vec![0u8; usize::try_from(len).unwrap_or(0).saturating_sub(4)];
        from.read_exact(&mut body).await?;
        to.write_all(&len.to_be_bytes()).await?;
        to.write_all(&body).await?;
        let code = body
            .get(..4)
            .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        if !matches!(code, Some(80_877_103 | 80_877_104)) {
            break;
        }
    }
    // Typed messages. The prepared statements of this connection that are
    // `COMMIT`, by name.
    let mut commit_statements: HashSet<Vec<u8>> = HashSet::new();
    loop {
        let tag = from.read_u8().await?;
        if answered.swap(false, Ordering::SeqCst) {
            shared.round_trips.fetch_add(1, Ordering::SeqCst);
        }
        let len = from.read_i32().await?;
        let mut body = vec![0u8; usize::try_from(len).unwrap_or(0).saturating_sub(4)];
        from.read_exact(&mut body).await?;
        let is_commit = match tag {
            b'Q' => body == b"COMMIT\0",
            b'P' => {
                // Parse: statement name, query text.
                let (name, rest) = cstr(&body);
                let (query, _) = cstr(rest);
                if query == b"COMMIT" {
                    commit_statements.insert(name.to_vec());
                } else {
                    commit_statements.remove(name);
                }
                false
            }
            b'B' => {
                // Bind: portal name, statement name.
                let (_, rest) = cstr(&body);
                commit_statements.contains(cstr(rest).0)
            }
            _ => false,
        };
        if is_commit {
            shared.commits_seen.fetch_add(1, Ordering::SeqCst);
            match shared.next_fault() {
                Some(CommitFault::DropBeforeCommit) => {
                    shared.fired.fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
                Some(CommitFault::DropAfterCommit) => {
                    shared.fired.fetch_add(1, Ordering::SeqCst);
                    cut.store(true, Ordering::SeqCst);
                }
                None => {}
            }
        }
        to.write_all(&[tag]).await?;
        to.write_all(&len.to_be_bytes()).await?;
        to.write_all(&body).await?;
    }
}
