//! The durable outbox: every message lives here from before its acknowledgement until the central
//! broker has confirmed it (and for `retain_delivered` after that).
//!
//! # Design note
//!
//! **File.** One SQLite database, `<data_dir>/outbox.sqlite`, created with mode 0600 (SQLite gives
//! its `-wal` and `-shm` files the same mode). `journal_mode=WAL`, `synchronous=FULL`: a commit
//! returns only after the WAL has been fsynced, so a committed row survives a power cut.
//! `auto_vacuum=INCREMENTAL` lets pruning give space back to the file system.
//!
//! **Schema** (`PRAGMA user_version = 4`; created and migrated in `schema.rs`):
//! - `messages(id INTEGER PRIMARY KEY, record_id, feed, seq, received_at_us, source_kind, peer,
//!   format, control_id, size, raw BLOB, state, delivered_at_us, reprocessed,
//!   control_id_reused)`. `id` is the global arrival order, assigned by the writer from an
//!   in-memory counter (so it never goes backwards while the process runs, even when pruning
//!   deletes the newest rows; the sink's cursor relies on that). `raw` holds the bytes exactly as
//!   received; `record_id` is a UUIDv7 fixed at insert, so every resend of a record carries the
//!   same `id` (the central side's idempotency key). `state` is 0 (pending) or 1 (delivered).
//! - `feed_seq(feed PRIMARY KEY, last_seq)`: a floor for each feed's sequence numbers, written
//!   by pruning in the same transaction that deletes rows, so pruning every row of a feed never
//!   lets its `seq` restart. At open, a feed's last seq is the larger of this floor and the
//!   highest `seq` still in `messages`.
//! - `meta(key PRIMARY KEY, value)`: small appliance state that must survive restarts: `bdseq`
//!   (the MQTT birth sequence, incremented per connection) and `inventory` (what each feed has
//!   carried, as JSON). Written by the same writer thread.
//! - `rejected(...)`: quarantined (`AE`) messages, kept for `retain_rejected`.
//! - `held(row_id INTEGER PRIMARY KEY, reason, detail, since_us)` (version 4): undelivered rows
//!   the sink has set aside because their record cannot be published (too large for the MQTT
//!   packet limit, refused by the broker with a permanent reason code, or unbuildable; see
//!   `held.rs`). The row itself stays in `messages`, undelivered, with its bytes; the sink's
//!   pending reads skip it; pruning never deletes it. The writer mirrors the table in memory
//!   (row id -> size), so a delivered mark touches `held` only for a row that is held.
//! - `dedup_log(id, key, hash, row_id, seq, received_at_us)`: one row per stored message of a
//!   feed with a `dedup_window`, in time order (appends write its last page only). `key` is a
//!   64-bit hash of (feed, sender, control id), `hash` the content hash. The writer keeps an
//!   in-memory index (key -> latest row) rebuilt from this log at open; duplicate lookups never
//!   read the database (`dedup.rs`). Pruning deletes log rows older than the longest window
//!   (`dedup_keep`). Version 2 kept the keys in a keyed `dedup` table; opening such a file moves
//!   them here.
//! - Partial indexes: pending rows by `id` (what the sink reads), delivered rows by
//!   `delivered_at_us` (what pruning reads).
//! - Deliberately no other index: uniqueness of `id`, `record_id` and `(feed, seq)` is
//!   guaranteed by the single writer, and every index page is another 4 KiB written into the
//!   WAL before each fsync. An append commit touches two pages (the table's last leaf and the
//!   pending index).
//!
//! **Who changes a row.** Only the writer thread (one `rusqlite::Connection`, `writer.rs`)
//! writes; [`Outbox`] handles send it commands. Sources append and wait for the commit (or
//! quarantine an `AE`-answered message and wait for its id); the sink marks rows delivered when
//! their PUBACK arrives, and holds a row whose record cannot be published; `siterelay queue held
//! retry` releases held rows; a timer asks for pruning; the control plane increments the birth
//! sequence and stores the inventory; a quarantine retry appends the message again, then forgets
//! the quarantined copy. The writer drains everything queued, applies it in ONE transaction (one
//! method per command) and commits once: many connections share one fsync (group commit).
//! Readers (the sink, the status socket, `siterelay queue stats`, `queue rejected` and `queue
//! held`) use their own read-only connections ([`Reader`], `reader.rs`); WAL lets them read
//! while the writer writes.
//!
//! **States.** insert -> pending (0) -> delivered (1) -> deleted by pruning once
//! `delivered_at_us` is older than `retain_delivered`, or earlier when the whole file would exceed
//! `max_bytes` (oldest delivered first). A pending row is never deleted or overwritten: when
//! pending bytes reach `max_bytes`, [`Outbox::append`] answers [`AppendError::Full`] and the source
//! refuses the message (`AR`), so the sender keeps it and retries.
//!
//! A pending row may also be *held* (a row in `held`): pending -> held ([`Outbox::hold`], by the
//! sink) -> pending again ([`Outbox::unhold`], by `siterelay queue held retry`), or -> delivered
//! when a `replay` resent it and the broker confirmed it (the mark removes the hold in the same
//! transaction). Held rows count as pending bytes against `max_bytes` (they are kept, not
//! delivered) and are counted apart in the gauges (`held_count`, `held_bytes`).
//!
//! **When rows are deleted** (all by the writer; `prune.rs` holds the retention rules):
//! `messages` only by pruning, delivered rows only; `rejected` by pruning after
//! `retain_rejected`, or when a retried message has been stored again
//! ([`Outbox::forget_rejected`]); `dedup_log` by pruning after `dedup_keep`. `feed_seq` and
//! `meta` rows are never deleted. `held` rows are deleted when their row is released or
//! delivered, never by pruning (and pruning never deletes a held message).
//!
//! **Crash at each step.**
//! - Before the commit of an append: the row is not there and no ACK was sent; the sender resends.
//! - After the commit, before the ACK reached the sender: the row is there and will be delivered;
//!   the sender may resend. On a feed with a `dedup_window` a resend with the same content within
//!   the window is answered again with the original's `seq` and `record_id` and not stored;
//!   otherwise it is stored again with a new `seq` (at-least-once).
//! - After PUBLISH, before PUBACK: the row is pending; it is published again after restart.
//! - After PUBACK, before the delivered mark commits: the row is pending; it is published again
//!   with the same `record_id`, which the central side deduplicates.
//! - Retrying a quarantined message: it is appended first and forgotten after that commit, so a
//!   crash in between leaves it in both places, never in neither.
//! - During pruning: a transaction either deletes a batch or not; nothing pending is touched.
//! - Holding or releasing a row: one statement in the group's transaction; a crash before the
//!   commit leaves the row as it was (held or not), and the sink decides again.
//! - During a migration at open: the version-3 key move is one transaction; the version-4
//!   table is created with `IF NOT EXISTS`; the version stamp is written last.
//!
//! # Files
//!
//! - `mod.rs`: this note, the [`Outbox`] handle, its options, errors and gauges.
//! - `message.rs`: what is stored and what the store answers ([`NewMessage`], [`RejectedMessage`],
//!   [`Stored`], [`SourceKind`], [`Format`]).
//! - `schema.rs`: the file, its pragmas, the tables and the migrations.
//! - `writer.rs`: the writer thread, group commit, one method per command.
//! - `prune.rs`: retention (what pruning deletes, and when).
//! - `dedup.rs`: duplicate detection (keys, content hashes, the in-memory index).
//! - `held.rs`: held rows (what held means, why a row is held, the hold and unhold answers).
//! - `reader.rs`: read-only queries ([`Reader`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{info, warn};

mod dedup;
mod held;
mod message;
mod prune;
mod reader;
mod schema;
#[cfg(test)]
mod test_support;
mod writer;

pub use dedup::{DedupKey, content_hash, hl7_content_hash};
pub use held::{Hold, HoldOutcome, HoldReason, Unheld};
pub use message::{Format, NewMessage, RejectedMessage, SourceKind, Stored};
pub use reader::{FeedStats, HeldRow, PendingRow, QuarantinedRow, Reader};
pub use writer::WriterThread;

use writer::{Cmd, Reply, WriterState};

/// Why a message could not be stored. The message was not stored in every case.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// Undelivered data has reached the configured cap.
    #[error("outbox full: {pending_bytes} bytes undelivered, cap {max_bytes}")]
    Full {
        /// Undelivered bytes now.
        pending_bytes: u64,
        /// The configured cap.
        max_bytes: u64,
    },
    /// SQLite failed (disk full, I/O error...).
    #[error("outbox write failed: {0}")]
    Failed(String),
    /// The writer has stopped (shutting down).
    #[error("outbox is closed")]
    Closed,
}

/// Errors opening or reading the store.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// SQLite error, with the file.
    #[error("{path}: {source}")]
    Sqlite {
        /// Database file.
        path: PathBuf,
        /// The error.
        source: rusqlite::Error,
    },
    /// File-system error, with the file.
    #[error("{path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file was written by a newer siterelay.
    #[error("{path}: schema version {found} is newer than this siterelay understands ({expected})")]
    Schema {
        /// Database file.
        path: PathBuf,
        /// Version in the file.
        found: i64,
        /// Version this build writes.
        expected: i64,
    },
}

/// Options for opening the outbox.
#[derive(Debug, Clone)]
pub struct OutboxOptions {
    /// Cap on undelivered bytes.
    pub max_bytes: u64,
    /// Keep delivered rows this long.
    pub retain_delivered: Duration,
    /// Keep quarantined (`AE`) messages this long.
    pub retain_rejected: Duration,
    /// Keep duplicate-detection keys this long: the longest feed `dedup_window` (zero: none).
    pub dedup_keep: Duration,
}

/// Counters shared with telemetry; updated by the writer after each commit.
#[derive(Debug, Default)]
pub struct OutboxGauges {
    /// Undelivered messages.
    pub pending_count: AtomicU64,
    /// Undelivered bytes.
    pub pending_bytes: AtomicU64,
    /// Bytes of all rows (pending + retained delivered).
    pub total_bytes: AtomicU64,
    /// Commits performed (each one fsync).
    pub commits: AtomicU64,
    /// Messages appended since start.
    pub appended: AtomicU64,
    /// Messages marked delivered since start.
    pub delivered: AtomicU64,
    /// Appends refused because the store was full.
    pub refused_full: AtomicU64,
    /// Resends recognised as duplicates (answered, not stored again).
    pub duplicates: AtomicU64,
    /// Held rows (undelivered rows set aside; included in `pending_count`).
    pub held_count: AtomicU64,
    /// Their bytes (included in `pending_bytes`).
    pub held_bytes: AtomicU64,
}

/// Handle to the outbox. Cheap to clone; the writer thread stops when every handle is dropped.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Cmd>,
    path: PathBuf,
    appended: Arc<Notify>,
    gauges: Arc<OutboxGauges>,
    /// Rows released from hold and not yet taken by the sink (see [`Outbox::take_released`]).
    released: Arc<Mutex<Vec<i64>>>,
}

/// Current time in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    jiff::Timestamp::now().as_microsecond()
}

/// Maps a SQLite error to an [`OutboxError`] naming the file.
fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> OutboxError + '_ {
    move |source| OutboxError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

impl Outbox {
    /// Open (creating if needed) the outbox at `path` and start its writer thread.
    pub fn open(path: &Path, opts: OutboxOptions) -> Result<(Outbox, WriterThread), OutboxError> {
        let conn = schema::open(path)?;
        let state = WriterState::load(&conn, path, opts)?;
        let gauges = Arc::new(OutboxGauges::default());
        state.publish_gauges(&gauges);
        info!(
            path = %path.display(),
            pending = gauges.pending_count.load(Ordering::Relaxed),
            pending_bytes = gauges.pending_bytes.load(Ordering::Relaxed),
            "outbox open"
        );
        let appended = Arc::new(Notify::new());
        let (tx, thread) =
            writer::spawn(conn, state, gauges.clone(), appended.clone()).map_err(|source| {
                OutboxError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        Ok((
            Outbox {
                tx,
                path: path.to_path_buf(),
                appended,
                gauges,
                released: Arc::default(),
            },
            thread,
        ))
    }

    /// Store one message. Returns once the transaction holding it has committed (fsynced).
    pub async fn append(&self, msg: NewMessage) -> Result<Stored, AppendError> {
        self.request(|reply| Cmd::Append(msg, reply)).await
    }

    /// Append several messages (a batch): queued in order, so their `seq`s follow that order,
    /// and committed together where the writer can; answers once every one is committed or
    /// refused, in the same order.
    pub async fn append_all(&self, msgs: Vec<NewMessage>) -> Vec<Result<Stored, AppendError>> {
        let mut waits = Vec::with_capacity(msgs.len());
        for msg in msgs {
            waits.push(self.queue(|reply| Cmd::Append(msg, reply)).await);
        }
        let mut out = Vec::with_capacity(waits.len());
        for rx in waits {
            out.push(match rx {
                Some(rx) => answer(rx).await,
                None => Err(AppendError::Closed),
            });
        }
        out
    }

    /// Mark rows delivered (their PUBACK arrived). Committed with the next group.
    pub async fn mark_delivered(&self, row_ids: Vec<i64>) {
        if row_ids.is_empty() {
            return;
        }
        if self.tx.send(Cmd::MarkDelivered(row_ids)).await.is_err() {
            warn!(
                "outbox closed before delivered marks were written: those records will be resent"
            );
        }
    }

    /// Ask the writer to prune delivered rows past retention.
    pub async fn prune(&self) {
        let _ = self.tx.send(Cmd::Prune).await;
    }

    /// Wait until every command sent before this call has been committed.
    pub async fn flush(&self) {
        if let Some(rx) = self.queue(Cmd::Flush).await {
            let _ = rx.await;
        }
    }

    /// Increment the integer stored under `key` (starting from 0) and return the committed value.
    pub async fn increment(&self, key: &'static str) -> Result<i64, AppendError> {
        self.request(|reply| Cmd::Increment(key, reply)).await
    }

    /// Keep an `AE`-answered message in quarantine; returns its quarantine id once committed.
    pub async fn quarantine(&self, m: RejectedMessage) -> Result<i64, AppendError> {
        self.request(|reply| Cmd::Quarantine(m, reply)).await
    }

    /// Delete a quarantined message once it has been stored again (a crash in between leaves
    /// it in both places, never in neither).
    pub async fn forget_rejected(&self, id: i64) -> Result<(), AppendError> {
        self.request(|reply| Cmd::ForgetRejected(id, reply)).await
    }

    /// Set an undelivered row aside (its record cannot be published). Answers once committed.
    pub async fn hold(&self, h: Hold) -> Result<HoldOutcome, AppendError> {
        self.request(|reply| Cmd::Hold(h, reply)).await
    }

    /// Release one held row (or all, `None`). Once committed, the rows are handed to the sink
    /// ([`Outbox::take_released`]) and it is woken to publish them.
    pub async fn unhold(&self, which: Option<i64>) -> Result<Unheld, AppendError> {
        let unheld = self.request(|reply| Cmd::Unhold(which, reply)).await?;
        if !unheld.row_ids.is_empty() {
            self.released
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(&unheld.row_ids);
            self.appended.notify_one();
        }
        Ok(unheld)
    }

    /// Rows released from hold since the last call (for the sink; a new connection reads every
    /// pending row anyway and clears this).
    pub fn take_released(&self) -> Vec<i64> {
        std::mem::take(&mut *self.released.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Store `value` under `key` (committed with the next group).
    pub async fn put_meta(&self, key: &'static str, value: String) {
        let _ = self.tx.send(Cmd::PutMeta(key, value)).await;
    }

    /// Notified after every commit that added rows (the sink waits on it when idle).
    pub fn appended(&self) -> Arc<Notify> {
        self.appended.clone()
    }

    /// Live counters.
    pub fn gauges(&self) -> Arc<OutboxGauges> {
        self.gauges.clone()
    }

    /// A new read-only connection for the sink.
    pub fn reader(&self) -> Result<Reader, OutboxError> {
        Reader::open(&self.path)
    }

    /// Send a command that answers and wait for its answer (after the commit holding it).
    async fn request<T>(&self, cmd: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, AppendError> {
        match self.queue(cmd).await {
            Some(rx) => answer(rx).await,
            None => Err(AppendError::Closed),
        }
    }

    /// Queue a command with a new reply channel; `None` when the writer has stopped.
    async fn queue<R>(
        &self,
        cmd: impl FnOnce(oneshot::Sender<R>) -> Cmd,
    ) -> Option<oneshot::Receiver<R>> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(cmd(tx)).await.ok()?;
        Some(rx)
    }
}

/// The writer's answer; `Closed` if it stopped without answering.
async fn answer<T>(rx: oneshot::Receiver<Result<T, AppendError>>) -> Result<T, AppendError> {
    rx.await.map_err(|_| AppendError::Closed)?
}
