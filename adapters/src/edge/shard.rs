//! A qdrant-edge shard shared by every user in the process, with group-committed
//! flushes.
//!
//! qdrant-edge 0.7.0 is synchronous and has three sharp edges this type files off:
//!
//! * **One open shard per directory.** The WAL takes a lock, so a second
//!   `EdgeShard::load` of the same directory fails. [`SharedShard::open`] keeps a
//!   process-wide registry and hands out the already open shard instead.
//! * **`EdgeShard::flush` panics when the shard is busy.** It *try*-locks the WAL
//!   and the segment holder and `expect`s both. Writers and `optimize` therefore
//!   hold a gate shared, and a flush holds it exclusively.
//! * **Durability needs a flush** (see the module docs of [`crate::edge`]). A flush
//!   costs tens of milliseconds whatever it covers, so flushes are group-committed:
//!   [`SharedShard::make_durable`] flushes once for every write that finished
//!   applying before that flush started, and a caller whose write an earlier or
//!   running flush already covers does not flush again.
//!
//! Every blocking call runs on tokio's blocking pool (`spawn_blocking`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, RwLock, Weak};

use qdrant_edge::{EdgeConfig, EdgeShard, OperationError, UpdateOperation};

use super::error::EdgeError;

/// Directories whose shard this process has open. Held while a shard is loaded
/// and while one is closed, so that a close and a re-open never overlap.
static OPEN_SHARDS: LazyLock<Mutex<HashMap<PathBuf, Weak<ShardCell>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The file qdrant-edge persists its configuration in.
const EDGE_CONFIG_FILE: &str = "edge_config.json";
/// The directory qdrant-edge keeps its segments in.
const SEGMENTS_DIR: &str = "segments";

/// A handle on a qdrant-edge shard, shared by every handle on the same directory
/// in this process. Cloning is cheap. The shard is flushed and closed when the
/// last handle is dropped (synchronously, in the dropping thread).
#[derive(Clone)]
pub struct SharedShard {
    cell: Arc<ShardCell>,
}

impl std::fmt::Debug for SharedShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedShard")
            .field("dir", &self.cell.dir)
            .field("applied", &self.cell.applied.load(Ordering::SeqCst))
            .field("flushed", &self.cell.flushed.load(Ordering::SeqCst))
            .finish()
    }
}

/// Proof that a write was applied: pass it to [`SharedShard::make_durable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct WriteTicket(u64);

struct ShardCell {
    dir: PathBuf,
    /// `None` only while the cell is being dropped.
    shard: Option<EdgeShard>,
    /// Writers and `optimize` hold it shared, `flush` exclusively (see module docs).
    gate: RwLock<()>,
    /// Writes that finished applying (the sequence number of the latest one).
    applied: AtomicU64,
    /// Every write up to this sequence number is durable.
    flushed: AtomicU64,
    /// One flush at a time; waiters re-check `flushed` once they get it.
    flush_turn: tokio::sync::Mutex<()>,
    flushes: AtomicU64,
}

impl ShardCell {
    fn shard(&self) -> &EdgeShard {
        self.shard
            .as_ref()
            .expect("the shard is present until the cell is dropped")
    }
}

impl Drop for ShardCell {
    fn drop(&mut self) {
        // Close under the registry lock: a concurrent `open` of this directory
        // waits until the WAL lock is released instead of failing on it.
        let mut open = OPEN_SHARDS.lock().unwrap_or_else(PoisonError::into_inner);
        // EdgeShard's own Drop flushes.
        drop(self.shard.take());
        if open.get(&self.dir).is_some_and(|w| w.strong_count() == 0) {
            open.remove(&self.dir);
        }
    }
}

impl SharedShard {
    /// Opens the shard stored in `dir`, creating the directory and a new shard
    /// with `config` when it holds none. When this process already has the
    /// directory open, returns a handle on that shard (and ignores `config`).
    /// Callers compare [`config`](Self::config) with what they expect.
    pub async fn open(dir: impl AsRef<Path>, config: EdgeConfig) -> Result<Self, EdgeError> {
        let dir = dir.as_ref().to_path_buf();
        let cell = tokio::task::spawn_blocking(move || open_blocking(&dir, config))
            .await
            .map_err(EdgeError::Worker)??;
        Ok(Self { cell })
    }

    /// The directory the shard lives in (canonical).
    pub fn dir(&self) -> &Path {
        &self.cell.dir
    }

    /// The shard's persisted configuration.
    pub fn config(&self) -> EdgeConfig {
        self.cell.shard().config().clone()
    }

    /// Applies one update operation (not yet durable: see
    /// [`make_durable`](Self::make_durable)). On error, part of a batch may
    /// have been applied.
    pub async fn update(&self, operation: UpdateOperation) -> Result<WriteTicket, EdgeError> {
        let cell = Arc::clone(&self.cell);
        tokio::task::spawn_blocking(move || {
            let _shared = cell.gate.read().unwrap_or_else(PoisonError::into_inner);
            let result = cell.shard().update(operation);
            // Counted even on error: a failed batch may be partly applied, and
            // what was applied is made durable like the rest.
            let seq = cell.applied.fetch_add(1, Ordering::SeqCst) + 1;
            result.map(|()| WriteTicket(seq)).map_err(EdgeError::from)
        })
        .await
        .map_err(EdgeError::Worker)?
    }

    /// Returns once the write behind `ticket` is durable, flushing if no flush
    /// that started after the write was applied has finished yet. Concurrent
    /// callers share flushes (group commit).
    pub async fn make_durable(&self, ticket: WriteTicket) -> Result<(), EdgeError> {
        if self.cell.flushed.load(Ordering::SeqCst) >= ticket.0 {
            return Ok(());
        }
        let _turn = self.cell.flush_turn.lock().await;
        // The flush we waited for may have covered this write.
        if self.cell.flushed.load(Ordering::SeqCst) >= ticket.0 {
            return Ok(());
        }
        self.flush_now().await
    }

    /// Flushes everything applied so far, now.
    pub async fn flush(&self) -> Result<(), EdgeError> {
        let _turn = self.cell.flush_turn.lock().await;
        self.flush_now().await
    }

    /// Caller holds `flush_turn`.
    async fn flush_now(&self) -> Result<(), EdgeError> {
        let cell = Arc::clone(&self.cell);
        // The bookkeeping happens in the blocking task, so that a flush whose
        // caller went away still counts for the next caller.
        tokio::task::spawn_blocking(move || {
            let _exclusive = cell.gate.write().unwrap_or_else(PoisonError::into_inner);
            // Read under the exclusive gate: every write counted here has
            // finished applying, and none is in flight.
            let covered = cell.applied.load(Ordering::SeqCst);
            cell.shard().flush();
            cell.flushed.fetch_max(covered, Ordering::SeqCst);
            cell.flushes.fetch_add(1, Ordering::SeqCst);
        })
        .await
        .map_err(EdgeError::Worker)
    }

    /// Runs a read-only closure against the shard on the blocking pool.
    pub async fn read<T, F>(&self, f: F) -> Result<T, EdgeError>
    where
        T: Send + 'static,
        F: FnOnce(&EdgeShard) -> Result<T, OperationError> + Send + 'static,
    {
        let cell = Arc::clone(&self.cell);
        tokio::task::spawn_blocking(move || f(cell.shard()).map_err(EdgeError::from))
            .await
            .map_err(EdgeError::Worker)?
    }

    /// Runs qdrant-edge's optimizers until they have nothing left to do (builds
    /// HNSW indexes, merges small segments, vacuums deleted points), then
    /// flushes. Writes wait while it runs. Returns whether anything changed.
    pub async fn optimize(&self) -> Result<bool, EdgeError> {
        let cell = Arc::clone(&self.cell);
        let changed = tokio::task::spawn_blocking(move || {
            // Exclusive: optimizers swap segments under the holder's write lock,
            // which a concurrent flush would trip over; writes simply wait.
            let _exclusive = cell.gate.write().unwrap_or_else(PoisonError::into_inner);
            cell.shard().optimize()
        })
        .await
        .map_err(EdgeError::Worker)??;
        self.flush().await?;
        Ok(changed)
    }

    /// How many flushes this shard has performed since it was opened in this
    /// process (to observe group commit).
    pub fn flush_count(&self) -> u64 {
        self.cell.flushes.load(Ordering::SeqCst)
    }
}

fn open_blocking(dir: &Path, config: EdgeConfig) -> Result<Arc<ShardCell>, EdgeError> {
    std::fs::create_dir_all(dir).map_err(|source| EdgeError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let dir = dir.canonicalize().map_err(|source| EdgeError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut open = loop {
        let open = OPEN_SHARDS.lock().unwrap_or_else(PoisonError::into_inner);
        match open.get(&dir).map(Weak::upgrade) {
            Some(Some(cell)) => {
                // Unlock first: dropping a last handle takes the registry lock.
                drop(open);
                return Ok(cell);
            }
            // Its last handle is being dropped; the close removes the entry.
            Some(None) => {
                drop(open);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            None => break open,
        }
    };
    let shard = if holds_shard(&dir) {
        EdgeShard::load(&dir, None)?
    } else {
        EdgeShard::new(&dir, config)?
    };
    let cell = Arc::new(ShardCell {
        dir: dir.clone(),
        shard: Some(shard),
        gate: RwLock::new(()),
        applied: AtomicU64::new(0),
        flushed: AtomicU64::new(0),
        flush_turn: tokio::sync::Mutex::new(()),
        flushes: AtomicU64::new(0),
    });
    open.insert(dir, Arc::downgrade(&cell));
    Ok(cell)
}

/// Whether `dir` already holds a shard (its config file, or any segment).
fn holds_shard(dir: &Path) -> bool {
    dir.join(EDGE_CONFIG_FILE).is_file()
        || std::fs::read_dir(dir.join(SEGMENTS_DIR))
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false)
}
