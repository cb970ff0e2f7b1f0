//! Opening a connection: the transport, the [`Tapped`] stream over it (so
//! that server errors keep their SQLSTATE, see [`super::wire`]),
//! tokio-postgres's startup, then diesel-async.
//!
//! tokio-postgres's `Config::connect` keeps the socket it opens to itself, so
//! nothing can go between it and the driver; `Config::connect_raw` takes any
//! stream but applies only the startup settings (user, password, database,
//! options, application name). This module opens the transport as
//! `Config::connect` does (tokio-postgres 0.7, `connect.rs` and
//! `connect_socket.rs`): each host in order (shuffled with
//! `load_balance_hosts=random`), `hostaddr` instead of the name where given,
//! every address a name resolves to, one port per host or one for all,
//! `connect_timeout` per attempt, `TCP_NODELAY`, TCP keepalives,
//! `tcp_user_timeout`, Unix-domain sockets, and `target_session_attrs`; a
//! failure at any step moves on to the next address. TLS stays what it was:
//! none (`NoTls`; `sslmode=require` fails as before).
//!
//! The driver's connection task is spawned here rather than by diesel-async
//! (whose `try_from_client_and_connection` accepts only tokio-postgres's own
//! socket type): a failure of the connection itself then reaches a statement
//! in flight as "connection closed", which is classified exactly as the
//! failure diesel-async would have forwarded (no reply: `08006`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use diesel_async::AsyncPgConnection;
use rand::seq::SliceRandom;
use socket2::{SockRef, TcpKeepalive};
use tandem_core::MetadataError;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::config::{Host, LoadBalanceHosts, TargetSessionAttrs};
use tokio_postgres::{Config, NoTls, SimpleQueryMessage};

use super::PostgresConfig;
use super::error::{ConnectError, classify_connect};
use super::wire::{ServerErrors, Tapped};

/// A connection opened the way the repo opens its pooled ones:
/// diesel-async's `AsyncPgConnection` (it dereferences to one) over a
/// transport that records each server error's SQLSTATE in [`ServerErrors`].
/// For tools and tests that run statements of their own and want their
/// failures classified as the repo classifies its own
/// ([`ServerErrors::classify`]).
pub struct Connection {
    conn: AsyncPgConnection,
    errors: ServerErrors,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Opens one connection with `config`'s URL and session settings
    /// (`search_path`, timeouts, application name), outside any pool.
    /// Failures are classified as the repo's connect failures are.
    pub async fn open(config: &PostgresConfig) -> Result<Self, MetadataError> {
        open(&config.driver_config()?)
            .await
            .map_err(classify_connect)
    }

    /// The server errors this connection received, by SQLSTATE.
    pub fn errors(&self) -> &ServerErrors {
        &self.errors
    }

    /// The diesel-async connection and its server errors, apart.
    pub fn into_parts(self) -> (AsyncPgConnection, ServerErrors) {
        (self.conn, self.errors)
    }
}

impl Deref for Connection {
    type Target = AsyncPgConnection;

    fn deref(&self) -> &AsyncPgConnection {
        &self.conn
    }
}

impl DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut AsyncPgConnection {
        &mut self.conn
    }
}

/// A transport tokio-postgres can run over.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// One host to try, with its port.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Target {
    host: Host,
    port: u16,
}

/// The hosts a connection is tried on, in order (before any shuffling), as
/// libpq and tokio-postgres pair `host`, `hostaddr` and `port`. An error says
/// what is inconsistent, naming no value.
pub(crate) fn targets(config: &Config) -> Result<Vec<Target>, String> {
    let (hosts, addrs, ports) = (
        config.get_hosts(),
        config.get_hostaddrs(),
        config.get_ports(),
    );
    if hosts.is_empty() && addrs.is_empty() {
        return Err("the connection string names no host (host or hostaddr)".to_owned());
    }
    if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
        return Err(format!(
            "{} hosts but {} hostaddrs in the connection string",
            hosts.len(),
            addrs.len()
        ));
    }
    let n = hosts.len().max(addrs.len());
    if ports.len() > 1 && ports.len() != n {
        return Err(format!(
            "{} ports for {n} hosts in the connection string",
            ports.len()
        ));
    }
    Ok((0..n)
        .map(|i| Target {
            // The address, where given, is connected to instead of the name.
            host: match (addrs.get(i), hosts.get(i)) {
                (Some(ip), _) => Host::Tcp(ip.to_string()),
                (None, Some(host)) => host.clone(),
                (None, None) => unreachable!("i < max(hosts, addrs)"),
            },
            port: ports.get(i).or(ports.first()).copied().unwrap_or(5432),
        })
        .collect())
}

/// Opens a connection: tries each target (and each address of each) until
/// one gives a ready session; else the last failure.
pub(crate) async fn open(config: &Config) -> Result<Connection, ConnectError> {
    let mut targets = targets(config).map_err(ConnectError::Config)?;
    let shuffle = config.get_load_balance_hosts() == LoadBalanceHosts::Random;
    if shuffle {
        targets.shuffle(&mut rand::rng());
    }
    let mut failure = None;
    for target in &targets {
        match open_target(config, target, shuffle).await {
            Ok(conn) => return Ok(conn),
            Err(e) => failure = Some(e),
        }
    }
    Err(failure.unwrap_or_else(|| ConnectError::Config("no host to connect to".to_owned())))
}

async fn open_target(
    config: &Config,
    target: &Target,
    shuffle: bool,
) -> Result<Connection, ConnectError> {
    match &target.host {
        Host::Tcp(name) => {
            let transport = |source| ConnectError::Transport {
                addr: format!("{name}:{}", target.port),
                source,
            };
            let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), target.port))
                .await
                .map_err(transport)?
                .collect();
            if shuffle {
                addrs.shuffle(&mut rand::rng());
            }
            let mut failure = None;
            for addr in addrs {
                let opened = match tcp(config, addr).await {
                    Ok(io) => start(config, io).await,
                    Err(source) => Err(ConnectError::Transport {
                        addr: addr.to_string(),
                        source,
                    }),
                };
                match opened {
                    Ok(conn) => return Ok(conn),
                    Err(e) => failure = Some(e),
                }
            }
            Err(failure.unwrap_or_else(|| {
                transport(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "could not resolve any addresses",
                ))
            }))
        }
        #[cfg(unix)]
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{}", target.port));
            let socket = within(
                config.get_connect_timeout(),
                tokio::net::UnixStream::connect(&path),
            )
            .await
            .map_err(|source| ConnectError::Transport {
                addr: path.display().to_string(),
                source,
            })?;
            start(config, Box::new(socket)).await
        }
    }
}

/// A TCP connection with the URL's socket settings.
async fn tcp(config: &Config, addr: SocketAddr) -> io::Result<Box<dyn Io>> {
    let stream = within(
        config.get_connect_timeout(),
        tokio::net::TcpStream::connect(addr),
    )
    .await?;
    stream.set_nodelay(true)?;
    let socket = SockRef::from(&stream);
    #[cfg(target_os = "linux")]
    if let Some(timeout) = config.get_tcp_user_timeout() {
        socket.set_tcp_user_timeout(Some(*timeout))?;
    }
    if config.get_keepalives() {
        #[allow(unused_mut)]
        let mut keepalive = TcpKeepalive::new().with_time(config.get_keepalives_idle());
        #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
        if let Some(interval) = config.get_keepalives_interval() {
            keepalive = keepalive.with_interval(interval);
        }
        #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
        if let Some(retries) = config.get_keepalives_retries() {
            keepalive = keepalive.with_retries(retries);
        }
        socket.set_tcp_keepalive(&keepalive)?;
    }
    Ok(Box::new(stream))
}

async fn within<T>(
    timeout: Option<&Duration>,
    connect: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match timeout {
        Some(timeout) => tokio::time::timeout(*timeout, connect)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection timed out",
                ))
            }),
        None => connect.await,
    }
}

/// The session's startup over `io`, then diesel-async's setup.
async fn start(config: &Config, io: Box<dyn Io>) -> Result<Connection, ConnectError> {
    let errors = ServerErrors::default();
    let (client, connection) = config
        .connect_raw(Tapped::new(io, errors.clone()), NoTls)
        .await
        .map_err(ConnectError::Connect)?;
    // Ends once the client is dropped (after telling the server) or the
    // socket closes; statements then fail with "connection closed".
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    check_session_attrs(config, &client).await?;
    let conn = AsyncPgConnection::try_from(client)
        .await
        .map_err(|source| {
            let code = match &source {
                diesel::ConnectionError::CouldntSetupConfiguration(e) => errors.sqlstate(e),
                _ => Some(tokio_postgres::error::SqlState::CONNECTION_FAILURE),
            };
            ConnectError::Setup { source, code }
        })?;
    Ok(Connection { conn, errors })
}

/// `target_session_attrs=read-write` / `read-only`: a server of the other
/// kind is passed over, as tokio-postgres does.
async fn check_session_attrs(
    config: &Config,
    client: &tokio_postgres::Client,
) -> Result<(), ConnectError> {
    let want_writes = match config.get_target_session_attrs() {
        TargetSessionAttrs::ReadWrite => true,
        TargetSessionAttrs::ReadOnly => false,
        _ => return Ok(()),
    };
    let rows = client
        .simple_query("SHOW transaction_read_only")
        .await
        .map_err(ConnectError::Connect)?;
    let read_only = rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0),
        _ => None,
    });
    let refused = match (want_writes, read_only) {
        (true, Some("on")) => "the server does not allow writes (target_session_attrs=read-write)",
        (false, Some("off")) => "the server is not read-only (target_session_attrs=read-only)",
        _ => return Ok(()),
    };
    Err(ConnectError::Transport {
        addr: "the server".to_owned(),
        source: io::Error::new(io::ErrorKind::PermissionDenied, refused),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(url: &str) -> Result<Vec<(String, u16)>, String> {
        let config: Config = url.parse().unwrap();
        Ok(targets(&config)?
            .into_iter()
            .map(|t| {
                let host = match t.host {
                    Host::Tcp(h) => h,
                    #[cfg(unix)]
                    Host::Unix(p) => p.display().to_string(),
                };
                (host, t.port)
            })
            .collect())
    }

    #[test]
    fn hosts_pair_with_ports_and_addresses_as_libpq_does() {
        assert_eq!(
            hosts("postgres://u@a,b:6000/db").unwrap(),
            [("a".to_owned(), 5432), ("b".to_owned(), 6000)]
        );
        assert_eq!(
            hosts("host=a,b port=6000 user=u").unwrap(),
            [("a".to_owned(), 6000), ("b".to_owned(), 6000)]
        );
        assert_eq!(
            hosts("host=a,b port=1,2 user=u").unwrap(),
            [("a".to_owned(), 1), ("b".to_owned(), 2)]
        );
        assert_eq!(
            hosts("host=db.example hostaddr=10.0.0.7 user=u").unwrap(),
            [("10.0.0.7".to_owned(), 5432)]
        );
        assert_eq!(
            hosts("host=/run/postgresql user=u").unwrap(),
            [("/run/postgresql".to_owned(), 5432)]
        );
        assert!(hosts("host=a,b,c port=1,2 user=u").is_err());
        assert!(hosts("host=a,b hostaddr=10.0.0.1 user=u").is_err());
        assert!(hosts("user=u").is_err());
    }
}
