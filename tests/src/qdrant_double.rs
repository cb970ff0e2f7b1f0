//! A Qdrant-compatible gRPC server for tests: Qdrant's own protocol (the
//! server traits `qdrant-client` generates), Qdrant's own engine (qdrant-edge,
//! one shard per collection), and network-level fault injection the test
//! controls while it runs.
//!
//! ```no_run
//! # async fn demo() {
//! use tandem_tests::qdrant_double::{QdrantDouble, RpcAction, RpcFault};
//!
//! let double = QdrantDouble::start().await; // 127.0.0.1, ephemeral port, temp dir
//! let client = qdrant_client::Qdrant::from_url(&double.url())
//!     .skip_compatibility_check()
//!     .build()
//!     .unwrap();
//! // The next upsert fails with Unavailable before anything is applied.
//! double.faults().add(RpcFault {
//!     method: "Upsert",
//!     nth: 0,
//!     times: 1,
//!     action: RpcAction::FailBefore(tonic::Code::Unavailable),
//! });
//! # let _ = client;
//! // ... and every call is logged:
//! let upserts = double.faults().calls_to("Points/Upsert");
//! # let _ = upserts;
//! # }
//! ```
//!
//! What it implements, and how it differs from a real Qdrant, is documented in
//! `docs/qdrant-double.md`. In short: `Qdrant/HealthCheck`; `Collections/`
//! `Create`, `Get`, `List`, `Delete`, `CollectionExists`; `Points/` `Upsert`,
//! `Delete` (by ids or filter), `Get`, `Count`, `Scroll`, `Search`, `Query`
//! (nearest dense vector, or none), `CreateFieldIndex`, `DeleteFieldIndex`.
//! Every other RPC answers `Unimplemented`. Collections have one unnamed dense
//! vector. Writes are applied synchronously; `wait=true` answers `Completed`,
//! `wait=false` `Acknowledged`.
//!
//! The fault plan ([`Faults`], from [`QdrantDouble::faults`]) holds
//! [`RpcFault`]s: an [`RpcAction`] for a window of calls to one RPC. The same
//! handle keeps the call log ([`CallRecord`]).

mod convert;
mod faults;
mod net;
mod service;
mod settings;

pub use faults::{CallOutcome, CallRecord, Faults, RpcAction, RpcFault};

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use qdrant_client::qdrant::collections_server::CollectionsServer;
use qdrant_client::qdrant::points_server::PointsServer;
use qdrant_client::qdrant::qdrant_server::QdrantServer;
use tandem_adapters::edge::EdgeError;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::net::Connections;
use self::service::DoubleService;

/// When the double makes writes durable (flushes its qdrant-edge shards).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// When it shuts down (or a collection is deleted). Fast; enough whenever
    /// the double stops gracefully, which is always the case in-process.
    #[default]
    OnShutdown,
    /// Before answering a `wait=true` write (flushes are shared between
    /// concurrent writes). Acknowledged writes survive a `kill -9` of the
    /// double's process, as they do with a real Qdrant.
    EveryWrite,
}

/// Why the double could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DoubleError {
    /// Binding the port or preparing the data directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The address or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A stored collection could not be opened.
    #[error("collection {collection:?}: {source}")]
    Storage {
        /// The collection.
        collection: String,
        /// The engine's error.
        #[source]
        source: EdgeError,
    },
}

/// How to start a [`QdrantDouble`].
#[derive(Clone, Default)]
pub struct QdrantDoubleBuilder {
    port: u16,
    data_dir: Option<PathBuf>,
    api_key: Option<String>,
    durability: Durability,
}

impl std::fmt::Debug for QdrantDoubleBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QdrantDoubleBuilder")
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("durability", &self.durability)
            .finish()
    }
}

impl QdrantDoubleBuilder {
    /// Listens on this port of 127.0.0.1 (default 0: an ephemeral port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Keeps collections under `dir` (created if missing; collections found
    /// there are served). Default: a temporary directory removed at shutdown.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Requires this API key (header `api-key`, or `authorization: Bearer`) on
    /// every call; others are answered `Unauthenticated`.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// When writes are flushed (default [`Durability::OnShutdown`]).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Binds the port, opens the stored collections and starts serving.
    pub async fn start(self) -> Result<QdrantDouble, DoubleError> {
        let (temp_dir, data_dir) = match self.data_dir {
            Some(dir) => (None, dir),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("qdrant-double-")
                    .tempdir()
                    .map_err(|source| DoubleError::Io {
                        path: std::env::temp_dir(),
                        source,
                    })?;
                let dir = temp.path().to_path_buf();
                (Some(temp), dir)
            }
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| DoubleError::Io {
                path: PathBuf::from(addr.to_string()),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| DoubleError::Io {
            path: PathBuf::from(addr.to_string()),
            source,
        })?;
        let faults = Faults::default();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let service = DoubleService::open(
            &data_dir,
            temp_dir,
            faults.clone(),
            self.api_key,
            self.durability,
            shutdown_rx.clone(),
        )
        .await?;
        let connections = Connections::default();
        let incoming = net::incoming(listener, connections.clone());
        let mut stop = shutdown_rx;
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(max_sizes(QdrantServer::new(service.clone())))
                .add_service(max_sizes(CollectionsServer::new(service.clone())))
                .add_service(max_sizes(PointsServer::new(service)))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|stopping| *stopping).await;
                })
                .await
        });
        Ok(QdrantDouble {
            addr,
            data_dir,
            faults,
            shutdown,
            connections,
            server: Some(server),
        })
    }
}

/// Qdrant accepts large messages; so does the double (32 MiB, Qdrant's default).
trait MaxSizes {
    fn limits(self, bytes: usize) -> Self;
}

macro_rules! max_sizes_impl {
    ($($server:ident),*) => {$(
        impl MaxSizes for $server<DoubleService> {
            fn limits(self, bytes: usize) -> Self {
                self.max_decoding_message_size(bytes)
                    .max_encoding_message_size(bytes)
            }
        }
    )*};
}

max_sizes_impl!(QdrantServer, CollectionsServer, PointsServer);

fn max_sizes<S: MaxSizes>(server: S) -> S {
    server.limits(32 * 1024 * 1024)
}

/// A running Qdrant-compatible test server. Dropping it stops it gracefully
/// (in the background); [`shutdown`](Self::shutdown) stops it and waits.
#[derive(Debug)]
pub struct QdrantDouble {
    addr: SocketAddr,
    data_dir: PathBuf,
    faults: Faults,
    shutdown: watch::Sender<bool>,
    connections: Connections,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl QdrantDouble {
    /// Starts a double on an ephemeral port of 127.0.0.1 with a temporary data
    /// directory. Panics if it cannot (a test fixture).
    pub async fn start() -> Self {
        Self::builder()
            .start()
            .await
            .expect("the Qdrant test double starts")
    }

    /// A builder, for a fixed port, a data directory, an API key or durability.
    pub fn builder() -> QdrantDoubleBuilder {
        QdrantDoubleBuilder::default()
    }

    /// The gRPC URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The directory holding its collections.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The fault plan and call log.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Closes every open client connection now (in-flight calls fail), as a
    /// network blip would. Clients reconnect on their next call.
    pub fn drop_connections(&self) {
        self.connections.kill_all();
    }

    /// Stops accepting connections, ends hanging calls, waits for in-flight
    /// calls, and closes the collections (flushing them).
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(server) = self.server.take() {
            // Stop errors are the server's to log; the test is done with it.
            let _ = server.await;
        }
    }
}

impl Drop for QdrantDouble {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}
