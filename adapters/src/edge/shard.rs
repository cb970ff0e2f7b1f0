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
//! A shard can also be **destroyed** while handles on it are still alive
//! ([`SharedShard::destroy`], what dropping a collection of the
//! [`EdgeCatalog`](super::EdgeCatalog) does): it is closed once the calls in
//! flight have finished, every later call through any handle fails with
//! [`EdgeError::Closed`], and its directory is removed.
//!
//! Every blocking call runs on tokio's blocking pool (`spawn_blocking`).

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, Weak};

use qdrant_edge::{EdgeConfig, EdgeShard, OperationError, UpdateOperation};

use super::error::EdgeError;

/// Directories whose shard this process has open. Held while a shard is loaded
/// and while one is closed, so that a close and a re-open never overlap.
static OPEN_SHARDS: LazyLock<Mutex<Registry>> = LazyLock::new(|| Mutex::new(HashMap::new()));

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
    /// `None` once the shard was closed by [`SharedShard::destroy`], or while
    /// the cell is being dropped. Every call holds it shared (so a close waits
    /// for the calls in flight); closing holds it exclusively.
    shard: RwLock<Option<EdgeShard>>,
    /// The shard's configuration when it was opened (what
    /// [`SharedShard::config`] reports once it is closed).
    opened_config: EdgeConfig,
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
    fn lock_shard(&self) -> RwLockReadGuard<'_, Option<EdgeShard>> {
        self.shard.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the shard, unless it was closed.
    fn with_shard<T>(
        &self,
        f: impl FnOnce(&EdgeShard) -> Result<T, EdgeError>,
    ) -> Result<T, EdgeError> {
        match self.lock_shard().as_ref() {
            Some(shard) => f(shard),
            None => Err(EdgeError::Closed {
                path: self.dir.clone(),
            }),
        }
    }
}

impl Drop for ShardCell {
    fn drop(&mut self) {
        // Close under the registry lock: a concurrent `open` of this directory
        // waits until the WAL lock is released instead of failing on it.
        let mut open = OPEN_SHARDS.lock().unwrap_or_else(PoisonError::into_inner);
        // EdgeShard's own Drop flushes.
        drop(
            self.shard
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
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

    /// Opens the shard stored in `dir` if there is one: like
    /// [`open`](Self::open), but never creates a shard (nor the directory).
    /// `Ok(None)` when `dir` holds no shard.
    pub async fn open_existing(dir: impl AsRef<Path>) -> Result<Option<Self>, EdgeError> {
        let dir = dir.as_ref().to_path_buf();
        let cell = tokio::task::spawn_blocking(move || open_existing_blocking(&dir))
            .await
            .map_err(EdgeError::Worker)??;
        Ok(cell.map(|cell| Self { cell }))
    }

    /// Closes the shard stored in `dir` and deletes the directory. Returns
    /// whether `dir` held a shard (a directory holding none is left alone).
    ///
    /// Handles on the shard may still be alive: the close waits for the
    /// calls in flight, then every later call through any of them fails with
    /// [`EdgeError::Closed`] (closing flushes, as dropping the last handle
    /// does). A later [`open`](Self::open) of `dir` creates a new shard.
    ///
    /// The directory is first renamed to a hidden sibling
    /// (`.<name>.dropped-<uuid>`), so the shard is gone at once, then
    /// removed; if the removal fails, the hidden directory is left behind
    /// (logged as a warning; delete it by hand) and the shard still counts
    /// as destroyed.
    pub async fn destroy(dir: impl AsRef<Path>) -> Result<bool, EdgeError> {
        let dir = dir.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || destroy_blocking(&dir))
            .await
            .map_err(EdgeError::Worker)?
    }

    /// Whether the shard was closed by [`destroy`](Self::destroy).
    pub fn is_closed(&self) -> bool {
        self.cell.lock_shard().is_none()
    }

    /// The shard's persisted configuration (once it is closed, the one it
    /// had when it was opened).
    pub fn config(&self) -> EdgeConfig {
        match self.cell.lock_shard().as_ref() {
            Some(shard) => shard.config().clone(),
            None => self.cell.opened_config.clone(),
        }
    }

    /// Applies one update operation (not yet durable: see
    /// [`make_durable`](Self::make_durable)). On error, part of a batch may
    /// have been applied.
    pub async fn update(&self, operation: UpdateOperation) -> Result<WriteTicket, EdgeError> {
        let cell = Arc::clone(&self.cell);
        tokio::task::spawn_blocking(move || {
            let _shared = cell.gate.read().unwrap_or_else(PoisonError::into_inner);
            let result = cell.with_shard(|shard| Ok(shard.update(operation)?));
            // Counted even on error: a failed batch may be partly applied, and
            // what was applied is made durable like the rest.
            let seq = cell.applied.fetch_add(1, Ordering::SeqCst) + 1;
            result.map(|()| WriteTicket(seq))
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
            cell.with_shard(|shard| {
                shard.flush();
                Ok(())
            })?;
            cell.flushed.fetch_max(covered, Ordering::SeqCst);
            cell.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .await
        .map_err(EdgeError::Worker)?
    }

    /// Runs a read-only closure against the shard on the blocking pool.
    pub async fn read<T, F>(&self, f: F) -> Result<T, EdgeError>
    where
        T: Send + 'static,
        F: FnOnce(&EdgeShard) -> Result<T, OperationError> + Send + 'static,
    {
        let cell = Arc::clone(&self.cell);
        tokio::task::spawn_blocking(move || cell.with_shard(|shard| Ok(f(shard)?)))
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
            cell.with_shard(|shard| Ok(shard.optimize()?))
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

/// The registry of open shards, by canonical directory.
type Registry = HashMap<PathBuf, Weak<ShardCell>>;

/// Locks the registry once no shard of `dir` is being closed by the drop of
/// its last handle, and returns the live cell of `dir`, if any. Unlock before
/// dropping the cell: dropping a last handle takes the registry lock.
fn lock_registry(dir: &Path) -> (MutexGuard<'static, Registry>, Option<Arc<ShardCell>>) {
    loop {
        let open = OPEN_SHARDS.lock().unwrap_or_else(PoisonError::into_inner);
        match open.get(dir).map(Weak::upgrade) {
            // Its last handle is being dropped; the close removes the entry.
            Some(None) => {
                drop(open);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            found => return (open, found.flatten()),
        }
    }
}

/// A cell for a shard just loaded or created, registered under `dir`.
fn register(open: &mut Registry, dir: PathBuf, shard: EdgeShard) -> Arc<ShardCell> {
    let opened_config = shard.config().clone();
    let cell = Arc::new(ShardCell {
        dir: dir.clone(),
        shard: RwLock::new(Some(shard)),
        opened_config,
        gate: RwLock::new(()),
        applied: AtomicU64::new(0),
        flushed: AtomicU64::new(0),
        flush_turn: tokio::sync::Mutex::new(()),
        flushes: AtomicU64::new(0),
    });
    open.insert(dir, Arc::downgrade(&cell));
    cell
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> EdgeError + '_ {
    move |source| EdgeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `dir` made canonical; `None` when it does not exist.
fn canonical_if_exists(dir: &Path) -> Result<Option<PathBuf>, EdgeError> {
    match dir.canonicalize() {
        Ok(canonical) => Ok(Some(canonical)),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => Ok(None),
        Err(e) => Err(io_error(dir)(e)),
    }
}

fn open_blocking(dir: &Path, config: EdgeConfig) -> Result<Arc<ShardCell>, EdgeError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let dir = dir.canonicalize().map_err(io_error(dir))?;
    let (mut open, found) = lock_registry(&dir);
    if let Some(cell) = found {
        // Unlock first: dropping a last handle takes the registry lock.
        drop(open);
        return Ok(cell);
    }
    let shard = if holds_shard(&dir) {
        EdgeShard::load(&dir, None)?
    } else {
        EdgeShard::new(&dir, config)?
    };
    Ok(register(&mut open, dir, shard))
}

fn open_existing_blocking(dir: &Path) -> Result<Option<Arc<ShardCell>>, EdgeError> {
    let Some(dir) = canonical_if_exists(dir)? else {
        return Ok(None);
    };
    let (mut open, found) = lock_registry(&dir);
    if let Some(cell) = found {
        drop(open);
        return Ok(Some(cell));
    }
    if !holds_shard(&dir) {
        return Ok(None);
    }
    let shard = EdgeShard::load(&dir, None)?;
    Ok(Some(register(&mut open, dir, shard)))
}

fn destroy_blocking(dir: &Path) -> Result<bool, EdgeError> {
    let Some(dir) = canonical_if_exists(dir)? else {
        return Ok(false);
    };
    // Under the registry lock from the close to the rename: no `open` of the
    // directory can load the shard in between.
    let (mut open, found) = lock_registry(&dir);
    let was_open = found.is_some();
    if let Some(cell) = &found {
        // Waits for the calls in flight (they hold the shard shared).
        let mut shard = cell.shard.write().unwrap_or_else(PoisonError::into_inner);
        // EdgeShard's own Drop flushes, and releases the WAL lock.
        drop(shard.take());
        drop(shard);
        open.remove(&dir);
    }
    if !was_open && !holds_shard(&dir) {
        drop(open);
        return Ok(false);
    }
    let tombstone = tombstone_of(&dir)?;
    let renamed = std::fs::rename(&dir, &tombstone);
    // Unlock before the cell can be dropped (its drop takes the lock).
    drop(open);
    drop(found);
    renamed.map_err(io_error(&dir))?;
    if let Err(e) = std::fs::remove_dir_all(&tombstone) {
        tracing::warn!(
            dir = %dir.display(),
            leftover = %tombstone.display(),
            error = %e,
            "dropped the qdrant-edge shard but could not delete its files; delete the \
             leftover directory by hand"
        );
    }
    Ok(true)
}

/// The hidden sibling a destroyed shard's directory is renamed to before it
/// is removed: `.<name>.dropped-<uuid>`.
fn tombstone_of(dir: &Path) -> Result<PathBuf, EdgeError> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(io_error(dir)(std::io::Error::new(
            ErrorKind::InvalidInput,
            "a filesystem root cannot hold a shard to destroy",
        )));
    };
    let mut hidden = std::ffi::OsString::from(".");
    hidden.push(name);
    hidden.push(format!(".dropped-{}", uuid::Uuid::new_v4().simple()));
    Ok(parent.join(hidden))
}

/// Whether `dir` already holds a shard (its config file, or any segment).
fn holds_shard(dir: &Path) -> bool {
    dir.join(EDGE_CONFIG_FILE).is_file()
        || std::fs::read_dir(dir.join(SEGMENTS_DIR))
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false)
}
