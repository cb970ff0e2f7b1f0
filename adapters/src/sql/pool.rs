//! The bb8 pool both SQL backends use.
//!
//! - A call marks its connection *dirty* while it uses it and clean only when
//!   it finished cleanly: a call whose future was dropped mid-way (or whose
//!   COMMIT / ROLLBACK failed) leaves it dirty, and the pool discards it
//!   instead of handing out a session with an open transaction or a reply in
//!   flight.
//! - A connection is verified before it is handed out: always by a local
//!   check (has the driver seen its socket close?), and by a round trip when
//!   it sat idle longer than the pool's *verify window* — the bypass window
//!   of HikariCP's `aliveBypassWindowMs`. A connection killed by a server
//!   restart or `pg_terminate_backend` is seen closed at once; the round trip
//!   catches the rest (a peer that vanished silently) on connections that
//!   idled long enough for that to be likely, without costing a round trip on
//!   every call of a busy pool. A dead connection that slips through fails its
//!   first statement, which classifies as not applied (retryable), and the
//!   pool discards it.
//! - bb8 opens connections in background tasks and tells a waiting caller only
//!   that its wait timed out; the pool's error sink hands the real failure to
//!   every caller waiting at that moment, so an unreachable or refusing server
//!   is reported at once, with its cause.
//! - The pool never retries a failed connect: the coordinator owns retries.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

/// How a backend opens and verifies its connections.
pub(crate) trait Connector: Send + Sync + 'static {
    /// The connection.
    type Conn: Send + 'static;
    /// Why opening or verifying one failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Opens a connection, ready for use.
    fn connect(&self) -> impl Future<Output = Result<Self::Conn, Self::Error>> + Send;

    /// A round trip proving the connection still works.
    fn check(&self, conn: &mut Self::Conn) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Whether the driver already knows the connection is unusable (no I/O).
    fn is_closed(&self, conn: &mut Self::Conn) -> bool;
}

/// A pooled connection and whether a call left it mid-way.
pub(crate) struct Tracked<T> {
    conn: T,
    dirty: bool,
    /// When a call last finished with it cleanly (or it was opened).
    last_used: Instant,
}

/// Why bb8's manager failed: opening (reported to waiting callers) or
/// verifying (the pool replaces the connection itself).
#[derive(Debug)]
pub(crate) enum ManagerError<E> {
    Connect(E),
    Check(E),
}

pub(crate) struct Manager<C> {
    connector: C,
    verify_after: Duration,
}

impl<C: Connector> bb8::ManageConnection for Manager<C> {
    type Connection = Tracked<C::Conn>;
    type Error = ManagerError<C::Error>;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        let conn = self
            .connector
            .connect()
            .await
            .map_err(ManagerError::Connect)?;
        Ok(Tracked {
            conn,
            dirty: false,
            last_used: Instant::now(),
        })
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        if conn.last_used.elapsed() < self.verify_after && !self.connector.is_closed(&mut conn.conn)
        {
            // Used moments ago and not seen closed: no round trip.
            return Ok(());
        }
        // Idle for a while, or closed (then the round trip fails at once).
        self.connector
            .check(&mut conn.conn)
            .await
            .map_err(ManagerError::Check)
    }

    fn has_broken(&self, conn: &mut Self::Connection) -> bool {
        conn.dirty || self.connector.is_closed(&mut conn.conn)
    }
}

/// Hands connect failures to the callers waiting for a connection.
struct FailFast<E> {
    tx: broadcast::Sender<Arc<E>>,
    backend: &'static str,
}

impl<E> Clone for FailFast<E> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            backend: self.backend,
        }
    }
}

impl<E> std::fmt::Debug for FailFast<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailFast")
            .field("backend", &self.backend)
            .finish()
    }
}

impl<E: std::error::Error + Send + Sync + 'static> bb8::ErrorSink<ManagerError<E>> for FailFast<E> {
    fn sink(&self, error: ManagerError<E>) {
        match error {
            ManagerError::Connect(e) => {
                tracing::warn!(backend = self.backend, error = %e, "connection failed");
                let _ = self.tx.send(Arc::new(e));
            }
            ManagerError::Check(e) => {
                tracing::debug!(backend = self.backend, error = %e, "dropping a dead pooled connection");
            }
        }
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<ManagerError<E>>> {
        Box::new(self.clone())
    }
}

/// Why no connection could be had.
pub(crate) enum CheckoutError<E> {
    /// Opening a connection failed (the same failure reaches every caller
    /// waiting at that moment).
    Connect(Arc<E>),
    /// None became free within the timeout.
    TimedOut,
}

/// The pool.
pub(crate) struct Pool<C: Connector> {
    pool: bb8::Pool<Manager<C>>,
    failures: broadcast::Sender<Arc<C::Error>>,
    connector: Arc<C>,
}

impl<C: Connector> Pool<C> {
    /// A pool of at most `size` connections; a caller waits at most `timeout`;
    /// a connection idle for `verify_after` or longer is verified with a round
    /// trip before it is handed out. No connection is opened until one is
    /// needed.
    pub(crate) fn new(
        connector: C,
        size: u32,
        timeout: Duration,
        verify_after: Duration,
        backend: &'static str,
    ) -> Self
    where
        C: Clone,
    {
        let sink = FailFast {
            tx: broadcast::channel(16).0,
            backend,
        };
        let failures = sink.tx.clone();
        let pool = bb8::Pool::builder()
            .max_size(size)
            .connection_timeout(timeout)
            .test_on_check_out(true)
            .retry_connection(false)
            .error_sink(Box::new(sink))
            .build_unchecked(Manager {
                connector: connector.clone(),
                verify_after,
            });
        Self {
            pool,
            failures,
            connector: Arc::new(connector),
        }
    }

    /// A connection for one call, marked dirty until [`Checkout::release`].
    pub(crate) async fn checkout(&self) -> Result<Checkout<C>, CheckoutError<C::Error>> {
        let mut failures = self.failures.subscribe();
        let mut conn = tokio::select! {
            got = self.pool.get_owned() => match got {
                Ok(conn) => conn,
                Err(bb8::RunError::User(ManagerError::Connect(e) | ManagerError::Check(e))) => {
                    return Err(CheckoutError::Connect(Arc::new(e)));
                }
                Err(bb8::RunError::TimedOut) => return Err(CheckoutError::TimedOut),
            },
            Ok(failure) = failures.recv() => return Err(CheckoutError::Connect(failure)),
        };
        conn.dirty = true;
        Ok(Checkout { conn })
    }

    /// A connection of its own, outside the pool (for migrations).
    pub(crate) async fn dedicated(&self) -> Result<C::Conn, C::Error> {
        self.connector.connect().await
    }

    /// Open and idle connections.
    pub(crate) fn status(&self) -> (u32, u32) {
        let state = self.pool.state();
        (state.connections, state.idle_connections)
    }
}

/// One call's connection.
pub(crate) struct Checkout<C: Connector> {
    conn: bb8::PooledConnection<'static, Manager<C>>,
}

impl<C: Connector> Checkout<C> {
    /// The connection.
    pub(crate) fn conn(&mut self) -> &mut C::Conn {
        &mut self.conn.conn
    }

    /// The call finished cleanly: the connection may be reused.
    pub(crate) fn release(&mut self) {
        self.conn.dirty = false;
        self.conn.last_used = Instant::now();
    }
}
