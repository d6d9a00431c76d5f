//! The durable outbox: every message lives here from before its acknowledgement until the central
//! broker has confirmed it (and for `retain_delivered` after that).
//!
//! # Design note
//!
//! **File.** One SQLite database, `<data_dir>/outbox.sqlite`, created with mode 0600 (SQLite gives
//! its `-wal` and `-shm` files the same mode). `journal_mode=WAL`, `synchronous=FULL`: a commit
//! returns only after the WAL has been fsynced, so a committed row survives a power cut.
//! `auto_vacuum=INCREMENTAL` lets pruning give space back to the file system. `secure_delete=FAST`
//! on the writer's connection (`store.secure_delete`, default on): a deleted row's bytes are
//! overwritten with zeros in its b-tree page, the pages it frees leave the file by the prune's
//! incremental vacuum, and a prune that deleted anything ends with a `TRUNCATE` checkpoint, so
//! pruned patient data is gone from the file and its WAL (`ON` would also rewrite every freed
//! page, into the WAL: on a full disk pruning then failed and the store never recovered) (the file system and the disk may
//! still keep old blocks: the data partition must be encrypted, docs/security.md). Next to it,
//! `outbox.reserve`: the space reserve (below).
//!
//! **Schema** (`PRAGMA user_version = 6`; created and migrated in `schema.rs`). Message content
//! and delivery state live in different tables, so recording a PUBACK writes a few bytes and
//! never a copy of the message:
//! - `messages(id INTEGER PRIMARY KEY, record_id, feed, seq, received_at_us, source_kind, peer,
//!   format, control_id, size, raw BLOB, reprocessed, control_id_reused, peer_certificate)`
//!   (`peer_certificate`: the subject of an MLLP sender's TLS client certificate): content, written
//!   once at append and never updated; deleted only by pruning. `id` is the global arrival
//!   order, assigned by the writer; it never goes backwards and is never reused, across
//!   restarts too (the sink's cursor and the duplicate log rely on that): pruning records the
//!   highest id handed out in `meta.last_row_id` before it deletes rows, and at open the next id
//!   is one more than the largest of that, the ids still stored and those the delivery and
//!   duplicate logs name. `raw` holds the bytes exactly as received; `record_id` is a UUIDv7
//!   fixed at insert, so every resend of a record carries the same `id` (the central side's
//!   idempotency key). (Files made before version 5 still have the `state` and
//!   `delivered_at_us` columns, unused and left in place: dropping them would rewrite the
//!   whole store at start.)
//! - `pending(id INTEGER PRIMARY KEY, size)`: one row per undelivered message, inserted in the
//!   append's transaction. What the sink reads (`pending` in id order joined to `messages` by
//!   rowid: the same B-tree walk as the partial index it replaces; measured by
//!   `examples/state_bench.rs` with 200,000 delivered and 50,000 pending rows of 4 KB: 1.78 ms
//!   per 512-row fetch against 1.82 ms before, the oldest-pending query 4.6 µs against 4.1 µs).
//! - `delivered(n INTEGER PRIMARY KEY, id, delivered_at_us)`: the delivery log, in the order
//!   PUBACKs were recorded (appends write its last page only). Marking a row delivered deletes
//!   its `pending` row and appends here: about 150 bytes of WAL per mark against 4.3 KB (4 KB
//!   messages) or 20.7 KB (20 KB messages) when the whole row was rewritten (same bench).
//!   Pruning reads it from the front: oldest delivery first, with no index.
//! - `feed_seq(feed PRIMARY KEY, last_seq)`: a floor for each feed's sequence numbers, written
//!   by pruning in the same transaction that deletes rows, so pruning every row of a feed never
//!   lets its `seq` restart. At open, a feed's last seq is the larger of this floor and the
//!   highest `seq` still in `messages`.
//! - `meta(key PRIMARY KEY, value)`: small appliance state that must survive restarts: `bdseq`
//!   (the MQTT birth sequence, incremented per connection), `inventory` (what each feed has
//!   carried, as JSON), the high-water marks `last_row_id` and `last_rejected_id`, the
//!   version-5 marker, and `seq_floor` (only in a store started after a damaged one whose
//!   numbers could not be read whole: the last `seq` of any feed without a `feed_seq` row).
//!   Written by the same writer thread.
//! - `rejected(...)`: quarantined (`AE`) messages, kept for `retain_rejected`. Ids are assigned
//!   by the writer and never reused either (`meta.last_rejected_id`, written whenever
//!   quarantine rows are deleted). A frame that is not HL7 at all keeps only its first 4 KiB
//!   (`size` is what was received; `QuarantinedRow::truncated`).
//! - `held(row_id INTEGER PRIMARY KEY, reason, detail, since_us)` (version 4): undelivered rows
//!   the sink has set aside because their record cannot be published (too large for the MQTT
//!   packet limit, refused by the broker with a permanent reason code, or unbuildable; see
//!   `held.rs`). The message stays in `messages` and keeps its `pending` row (it is
//!   undelivered, and counts as such); the sink's pending reads skip the ids in `held`; pruning
//!   never deletes it (it takes ids only from the `delivered` log, and checks `pending` and
//!   `held` besides). The writer mirrors the table in memory (row id -> size), so a delivered
//!   mark touches `held` only for a row that is held.
//! - `dedup_log(id, key, hash, row_id, seq, received_at_us)`: one row per stored message of a
//!   feed with a `dedup_window`, in time order (appends write its last page only). `key` is a
//!   64-bit hash of (feed, sender, control id), `hash` the content hash. The writer keeps an
//!   index rebuilt from this log at open (`dedup.rs`): the newest 1,024 rows whole in memory,
//!   and for every older key only a 32-bit fingerprint and which 1,024-row segment of the log
//!   holds it (6 bytes a key); a possible match is read exactly from that segment by the
//!   primary key, so an ordinary new message reads nothing and no secondary index is written.
//!   Pruning deletes log rows older than the longest window (`dedup_keep`) and the index forgets
//!   their segments. Version 2 kept the keys in a keyed `dedup` table; opening such a file moves
//!   them here.
//! - Deliberately no secondary index: uniqueness of `id`, `record_id` and `(feed, seq)` is
//!   guaranteed by the single writer, and every index page is another 4 KiB written into the
//!   WAL before each fsync. An append commit touches the last leaf of `messages` (and its
//!   overflow pages) and the last leaf of `pending`, as it touched the partial index before.
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
//! **Every waiter gets its own true answer** (`writer.rs`). Each command's answer is decided
//! while its group is applied and sent only once the commit's outcome is known. When one
//! command's statement fails, the transaction is rolled back, that command alone is answered
//! ([`AppendError::Failed`] with the SQLite error: the source answers `AR`, the sender keeps the
//! message), and the rest of the group is applied again without it in a new transaction (no
//! savepoints: the common path costs nothing; a failure costs its group one more attempt).
//! `SQLITE_FULL` releases the reserve and refuses every append and quarantine entry still in
//! the group ([`Full::Disk`]) before the rest is tried again. A commit that fails for another
//! reason answers everything in it `Failed` with that error. Nothing is answered
//! [`AppendError::Closed`] unless the writer has really stopped. A quarantine entry is answered
//! with its id only after its commit, and the intake sends `AE` only then; a quarantine that
//! fails (or is refused: the budget, the disk) is answered `AR` instead, so the sender keeps
//! the message.
//!
//! **Space** (`space.rs`, `prune.rs`).
//! - *What counts against `max_bytes`*: everything the store has on disk: the database's pages
//!   in use (pending and delivered messages, quarantine, the duplicate log, delivery state,
//!   meta) plus the WAL file, measured after every commit (`page_count - freelist_count`, and
//!   the WAL's length). The WAL is kept a small part of the cap (checkpoint after `max_bytes /
//!   16`, at most 1000 pages; truncated to `max_bytes / 8`, at most 64 MiB). An append (or
//!   quarantine entry) is refused ([`Full::Cap`]) when what pruning cannot free (all of that
//!   minus delivered messages' bytes) plus the new message would pass the cap; otherwise it is
//!   taken and, when the total is then over the cap, delivered rows are pruned at once (at most
//!   once a second), oldest delivery first, whatever `retain_delivered` says.
//! - *Quarantine* has its own budget inside the cap (`store.quarantine_max_bytes`, a tenth of
//!   it by default): beyond it a message that would be quarantined is refused
//!   ([`Full::Quarantine`]: `AR`). Only the first 4 KiB of a frame that is not HL7 at all is
//!   kept, so a peer sending junk cannot fill the disk.
//! - *The reserve*: `outbox.reserve`, 4 MiB really allocated (`posix_fallocate`). When a write
//!   fails with `SQLITE_FULL` the file is deleted: the store is *short of space*. While short,
//!   appends and quarantine entries are refused at once ([`Full::Disk`]: `AR`) and the reserve's
//!   room goes to what makes space come back: delivery marks (a few bytes each), pruning and
//!   vacuuming. At most once a second (also when idle: the writer polls every 200 ms while
//!   short) the writer prunes delivered rows oldest first regardless of age, 100 rows per
//!   transaction, vacuuming after each, until the file system has room for the reserve plus
//!   4 MiB; then re-creates the reserve and takes appends again. The 4 MiB headroom is the
//!   hysteresis. A disk filled by something else recovers the same way once it is freed.
//! - *Giving space back*: `PRAGMA incremental_vacuum(N)` frees one page per step of its
//!   statement (run through `execute_batch` it freed one page per call), so it is stepped to
//!   the end, 256 pages per transaction, until the freelist is empty; then a checkpoint
//!   (`TRUNCATE` under pressure), which is when a WAL-mode database file actually shrinks.
//! - *Retention is a maximum, not a promise*: delivered rows pruned before `retain_delivered`
//!   (space short, or over the cap) are counted (`pruned_early`, `retention_cut_at` in health)
//!   and logged. Pending rows and quarantine are never pruned early.
//!
//! **Time and clock steps** (`steps.rs`). Stamps are wall time from the outbox's [`Clock`]
//! (the system clock but in tests; the intake stamps `received_at` with the same one), and
//! retention compares them with it: `delivered.delivered_at_us` for `retain_delivered`,
//! `rejected.received_at_us` for `retain_rejected`, `dedup_log.received_at_us` for the
//! duplicate window and `dedup_keep`; `held.since_us` is only shown. The wall clock steps (a Pi
//! without an RTC boots in 1970 and NTP steps it to 2026; an RTC drifts back), so:
//! - the writer compares the wall clock with the monotonic clock before every group and every
//!   prune; a move of more than 10 s is a step, and every stamp this run wrote before it is
//!   moved by the step (by primary-key range from the first row this run stamped, 10,000 rows
//!   per transaction; the duplicate index's in-memory entries too). Ages stay true across the
//!   step: nothing retained is pruned at it, and a resend within the window is still found;
//! - at open and after every step, stamps that cannot be right (more than 10 s in the future,
//!   or before 2026 while the clock reads 2026 or later) are made now, read from the newest
//!   row of each table backwards until a right one: such rows are kept at most one period
//!   longer than due, never shorter, never for ever;
//! - `messages.received_at_us` (the record's `received_at`) is never rewritten;
//! - pending and held rows are never pruned by time, and pruning under pressure ignores stamps.
//! A failed restamp is logged and not repeated; rows keep their stamps. Timers never read this
//! clock (monotonic time: `tokio::time`, `Instant`).
//!
//! **States.** insert -> pending (a `pending` row) -> delivered (a `delivered` row instead) ->
//! deleted by pruning once delivered longer than `retain_delivered` ago, or earlier under
//! pressure (above). A pending row is never deleted or overwritten: when there is no room,
//! [`Outbox::append`] answers [`AppendError::Full`] and the source refuses the message (`AR`),
//! so the sender keeps it and retries.
//!
//! A pending row may also be *held* (a row in `held`): pending -> held ([`Outbox::hold`], by the
//! sink) -> pending again ([`Outbox::unhold`], by `siterelay queue held retry`), or -> delivered
//! when a `replay` resent it and the broker confirmed it (the mark removes the hold in the same
//! transaction). Held rows count against `max_bytes` like any undelivered row (pruning cannot
//! free them), are never pruned, and are counted apart in the gauges (`held_count`,
//! `held_bytes`, both included in the pending counts).
//!
//! **When rows are deleted** (all by the writer; `prune.rs` holds the retention rules):
//! `messages` only by pruning, delivered rows only (with their `delivered` rows, in the same
//! transaction); `pending` rows when their delivery is recorded; `rejected` by pruning after
//! `retain_rejected`, or when a retried message has been stored again
//! ([`Outbox::forget_rejected`]); `dedup_log` by pruning after `dedup_keep`. `feed_seq` and
//! `meta` rows are never deleted. `held` rows are deleted when their row is released or
//! delivered (and, at open, any whose row is no longer pending), never by pruning (and pruning
//! never deletes a held message).
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
//! - During pruning: a transaction either deletes a batch (messages, their `delivered` rows, and
//!   the raised floors and high-water mark) or not; nothing pending or held is touched. During
//!   a vacuum chunk: SQLite's own transaction.
//! - With the reserve released (short of space): nothing on disk says so; at the next open the
//!   reserve is made again if there is room, otherwise the store starts short.
//! - Holding or releasing a row: one statement in the group's transaction; a crash before the
//!   commit leaves the row as it was (held or not), and the sink decides again.
//! - While a damaged store is replaced at start (`damage.rs`): the fresh store is seeded beside
//!   it before the damaged files move, and renamed into place last; a crash leaves either the
//!   damaged store in place (found again) or the seeded fresh one beside an empty place (put
//!   there at the next start), never no store (which would restart every `seq` at 1).
//! - During a migration at open: the version-3 key move and the version-5 state move are one
//!   transaction each (the latter leaves a marker in `meta`); the version-4 `held` table is
//!   created with `IF NOT EXISTS` at every open (so a version-5 file made without it gains it);
//!   the version stamp is written last.
//!
//! **A damaged store at start** (`damage.rs`). Before the writer opens the file, a read-only
//! connection runs `PRAGMA quick_check` (one read of the whole file; start-up already reads
//! every row once). A file SQLite refuses ("not a database", "malformed") or that the check
//! faults is moved with its `-wal` and `-shm` into `<data_dir>/damaged/<UTC time>/` (both
//! directories fsynced; `damaged.json` beside it), logged once at `ERROR`, and replaced by a
//! fresh store; an open that still fails as malformed does the same. Other errors (permission,
//! I/O) fail start-up and leave the file alone. A SIGKILL or power cut on a sound disk is not
//! damage (the WAL). What must keep increasing is read from the moved file row by row
//! (`salvage.rs`) and written into the fresh store before the writer opens it: each feed's
//! last `seq` (as `feed_seq` rows), `bdseq`, `last_row_id`, `last_rejected_id` and the
//! inventory (in `meta`). When `feed_seq` or `messages` could not be read whole, a `seq` read
//! may not be the last one used: every feed then carries on above the time floor (the current
//! time in µs, or the damaged files' mtimes if later; a feed stores at most one message per µs
//! from `seq` 1), and `meta.seq_floor` gives the same floor to any feed not seen; `bdseq` too
//! when `meta` was not read whole. The health report lists every directory under `damaged/`
//! that still holds its store file (`outbox.damaged_stores[]`); one without `salvaged.json`
//! (written by `siterelay queue salvage`) makes the appliance degraded. The damaged file itself is never modified: salvage
//! reads a copy; the start-up read opens it read-only (SQLite may add a `-shm` beside it).
//!
//! # Files
//!
//! - `mod.rs`: this note, the [`Outbox`] handle, its options, errors and gauges.
//! - `message.rs`: what is stored and what the store answers ([`NewMessage`], [`RejectedMessage`],
//!   [`Stored`], [`SourceKind`], [`Format`]).
//! - `schema.rs`: the file, its pragmas, the tables and the migrations.
//! - `writer.rs`: the writer thread, group commit, one method per command.
//! - `prune.rs`: retention (what pruning deletes, and when).
//! - `space.rs`: bytes counted against the cap, the space reserve, vacuuming.
//! - `dedup.rs`: duplicate detection (keys, content hashes, the index of where keys are).
//! - `steps.rs`: clock steps (noticing them, moving stamps with them, stamps that cannot be right).
//! - `held.rs`: held rows (what held means, why a row is held, the hold and unhold answers).
//! - `reader.rs`: read-only queries ([`Reader`]).
//! - `damage.rs`: the start-up check, moving a damaged store aside, what the fresh store
//!   carries over, the list health shows.
//! - `salvage.rs`: reading a damaged file row by row; `siterelay queue salvage`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{info, warn};

use crate::clock::Clock;

pub mod damage;
mod dedup;
mod held;
mod message;
mod prune;
mod reader;
pub mod salvage;
mod schema;
mod space;
mod steps;
#[cfg(test)]
mod test_support;
mod writer;

pub use dedup::{DedupKey, content_hash, hl7_content_hash};
pub use held::{Hold, HoldOutcome, HoldReason, Unheld};
pub use message::{Format, NewMessage, QUARANTINE_JUNK_KEEP, RejectedMessage, SourceKind, Stored};
pub use reader::{FeedStats, HeldRow, PendingRow, QuarantinedRow, Reader};
pub use writer::WriterThread;

use writer::{Cmd, Reply, WriterState};

/// Why a message could not be stored. The message was not stored in every case.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// No room: the store's cap, the quarantine's budget, or the disk.
    #[error("{}", full_text(*.reason, *.used_bytes, *.max_bytes))]
    Full {
        /// Which limit.
        reason: Full,
        /// What counts against that limit now (bytes).
        used_bytes: u64,
        /// The limit (bytes).
        max_bytes: u64,
    },
    /// SQLite failed for this command (an I/O error, a constraint...).
    #[error("outbox write failed: {0}")]
    Failed(String),
    /// The writer has stopped (shutting down).
    #[error("outbox is closed")]
    Closed,
}

/// Which limit refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `store.max_bytes`: everything on disk except delivered messages (which pruning frees
    /// first) has reached the cap.
    Cap,
    /// `store.quarantine_max_bytes`: quarantine has reached its own budget.
    Quarantine,
    /// The file system is full (the space reserve has been released): nothing new is taken
    /// until delivered messages have been pruned and space given back.
    Disk,
}

fn full_text(reason: Full, used: u64, max: u64) -> String {
    match reason {
        Full::Cap => {
            format!("outbox full: {used} bytes on disk that pruning cannot free, cap {max}")
        }
        Full::Quarantine => format!("quarantine full: {used} bytes kept, budget {max}"),
        Full::Disk => {
            format!("disk full: no room on the outbox's file system (outbox {used} bytes)")
        }
    }
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
    /// Cap on the bytes the store occupies on disk (everything: messages, quarantine, the
    /// duplicate log, the WAL). Delivered messages are pruned first when it is reached.
    pub max_bytes: u64,
    /// Quarantine's own budget within the cap.
    pub quarantine_max_bytes: u64,
    /// Keep delivered rows this long.
    pub retain_delivered: Duration,
    /// Keep quarantined (`AE`) messages this long.
    pub retain_rejected: Duration,
    /// Keep duplicate-detection keys this long: the longest feed `dedup_window` (zero: none).
    pub dedup_keep: Duration,
    /// `PRAGMA secure_delete`: deleted rows are overwritten with zeros, and a prune that
    /// deleted anything ends with a `TRUNCATE` checkpoint, so pruned patient data does not stay
    /// in the file or its WAL (`store.secure_delete`; on by default).
    pub secure_delete: bool,
}

/// Counters shared with telemetry; updated by the writer after each commit.
#[derive(Debug, Default)]
pub struct OutboxGauges {
    /// Undelivered messages.
    pub pending_count: AtomicU64,
    /// Undelivered bytes.
    pub pending_bytes: AtomicU64,
    /// Message bytes of all rows (pending + retained delivered).
    pub total_bytes: AtomicU64,
    /// Bytes the store occupies on disk, counted against the cap: database pages in use and
    /// the WAL.
    pub store_bytes: AtomicU64,
    /// Bytes kept in quarantine.
    pub quarantine_bytes: AtomicU64,
    /// The disk filled up and the space reserve was released: new messages are refused until
    /// space has been given back.
    pub space_short: AtomicBool,
    /// New messages are being refused (space short, or the cap reached by what pruning cannot
    /// free).
    pub refusing: AtomicBool,
    /// Delivered records pruned before `retain_delivered` because space was short or the store
    /// over its cap, since start.
    pub pruned_early: AtomicU64,
    /// When that last happened (µs since the epoch), 0 if never.
    pub retention_cut_at_us: AtomicI64,
    /// Commits performed (each one fsync).
    pub commits: AtomicU64,
    /// Of those, commits that wrote quarantine entries (the rejected messages of one batch
    /// share one).
    pub quarantine_commits: AtomicU64,
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
    /// Steps of the wall clock the writer noticed since start (`steps.rs`).
    pub clock_steps: AtomicU64,
    /// The last one's size (µs, negative: back), 0 if none.
    pub clock_last_step_us: AtomicI64,
    /// When it was noticed (wall time after the step, µs), 0 if never.
    pub clock_last_step_at_us: AtomicI64,
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
    /// The wall clock the store's stamps come from (the system clock but in tests).
    clock: Clock,
}

/// Current time in microseconds since the Unix epoch, from the system clock. For display
/// only: what the outbox records and compares comes from its [`Clock`] ([`Outbox::clock`]).
pub fn now_us() -> i64 {
    Clock::system().now_us()
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
        Outbox::open_with_clock(path, opts, Clock::system())
    }

    /// [`Outbox::open`] with the wall clock its stamps come from (a test clock, to step it).
    pub fn open_with_clock(
        path: &Path,
        opts: OutboxOptions,
        clock: Clock,
    ) -> Result<(Outbox, WriterThread), OutboxError> {
        let conn = schema::open(path)?;
        schema::set_secure_delete(&conn, path, opts.secure_delete)?;
        let state = WriterState::load(&conn, path, opts, clock.clone())?;
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
                clock,
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

    /// Whether the writer thread is alive and working through its queue: true once a no-op
    /// command sent now has been answered (false at once if the writer is gone). The daemon's
    /// watchdog and its dead-part check ask this.
    pub async fn probe(&self) -> bool {
        match self.queue(Cmd::Flush).await {
            Some(rx) => rx.await.is_ok(),
            None => false,
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

    /// One batch's outcome, written together: its rejected messages kept in quarantine in one
    /// transaction, queued just before its accepted messages so that they normally share that
    /// commit (a batch of refused messages costs one commit, not one per message). Answers
    /// both in order, once every one is committed or refused.
    pub async fn quarantine_and_append(
        &self,
        rejected: Vec<RejectedMessage>,
        msgs: Vec<NewMessage>,
    ) -> (
        Vec<Result<i64, AppendError>>,
        Vec<Result<Stored, AppendError>>,
    ) {
        let n = rejected.len();
        let q = if n == 0 {
            None
        } else {
            self.queue(|reply| Cmd::QuarantineAll(rejected, reply))
                .await
        };
        let stored = self.append_all(msgs).await;
        let kept = match q {
            None if n == 0 => Vec::new(),
            None => (0..n).map(|_| Err(AppendError::Closed)).collect(),
            Some(rx) => match answer(rx).await {
                Ok(each) => each,
                Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
            },
        };
        (kept, stored)
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

    /// The wall clock the store's stamps come from: the intake stamps `received_at` with it.
    pub fn clock(&self) -> &Clock {
        &self.clock
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
