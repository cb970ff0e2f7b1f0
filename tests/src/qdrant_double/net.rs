//! The server's connections: TCP streams it can close on demand, so that a
//! fault can drop the connection a call arrived on.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::Connected;

/// Closes one connection.
#[derive(Debug, Default)]
pub(crate) struct Killer {
    killed: AtomicBool,
    reader: AtomicWaker,
    writer: AtomicWaker,
}

impl Killer {
    /// From now on the stream fails every read and write, so the HTTP/2 server
    /// drops it (which closes the socket).
    pub(crate) fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.reader.wake();
        self.writer.wake();
    }

    fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }
}

/// What a call learns about its connection (from the request's extensions).
#[derive(Clone, Debug)]
pub(crate) struct ConnInfo {
    pub(crate) killer: Arc<Killer>,
}

/// The live connections, to close them all at shutdown.
#[derive(Clone, Debug, Default)]
pub(crate) struct Connections {
    live: Arc<Mutex<Vec<Weak<Killer>>>>,
}

impl Connections {
    fn register(&self, killer: &Arc<Killer>) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.retain(|k| k.strong_count() > 0);
        live.push(Arc::downgrade(killer));
    }

    pub(crate) fn kill_all(&self) {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        for killer in live.iter().filter_map(Weak::upgrade) {
            killer.kill();
        }
    }
}

/// A TCP stream that a [`Killer`] can break.
#[derive(Debug)]
pub(crate) struct KillableStream {
    inner: TcpStream,
    killer: Arc<Killer>,
}

fn killed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "connection dropped by an injected fault",
    )
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.killer.reader.register(cx.waker());
        if this.killer.is_killed() {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.killer.writer.register(cx.waker());
        if this.killer.is_killed() {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.killer.is_killed() {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Connected for KillableStream {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            killer: Arc::clone(&self.killer),
        }
    }
}

/// Accepted connections as the stream tonic serves.
pub(crate) fn incoming(
    listener: TcpListener,
    connections: Connections,
) -> impl futures::Stream<Item = io::Result<KillableStream>> {
    futures::stream::unfold(
        (listener, connections),
        |(listener, connections)| async move {
            let accepted = listener
                .accept()
                .await
                .map(|(inner, _peer): (_, SocketAddr)| {
                    // Calls are small and latency matters more than batching here.
                    let _ = inner.set_nodelay(true);
                    let killer = Arc::new(Killer::default());
                    connections.register(&killer);
                    KillableStream { inner, killer }
                });
            Some((accepted, (listener, connections)))
        },
    )
}
