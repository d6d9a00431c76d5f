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
//! **Schema** (`PRAGMA user_version = 3`):
//! - `messages(id INTEGER PRIMARY KEY, record_id, feed, seq, received_at_us, source_kind, peer,
//!   format, control_id, size, raw BLOB, state, delivered_at_us)`. `id` is the global arrival
//!   order, assigned by the writer from an in-memory counter (so it never goes backwards while
//!   the process runs, even when pruning deletes the newest rows; the sink's cursor relies on
//!   that). `raw` holds the bytes exactly as received; `record_id` is a UUIDv7 fixed at insert,
//!   so every resend of a record carries the same `id` (the central side's idempotency key).
//!   `state` is 0 (pending) or 1 (delivered).
//! - `feed_seq(feed PRIMARY KEY, last_seq)`: a floor for each feed's sequence numbers, written
//!   by pruning in the same transaction that deletes rows, so pruning every row of a feed never
//!   lets its `seq` restart. At open, a feed's last seq is the larger of this floor and the
//!   highest `seq` still in `messages`.
//! - `meta(key PRIMARY KEY, value)`: small appliance state that must survive restarts: `bdseq`
//!   (the MQTT birth sequence, incremented per connection) and `inventory` (what each feed has
//!   carried, as JSON). Written by the same writer thread.
//! - `rejected(...)`: quarantined (`AE`) messages, kept for `retain_rejected`.
//! - `dedup_log(id, key, hash, row_id, seq, received_at_us)`: one row per stored message of a
//!   feed with a `dedup_window`, in time order (appends write its last page only). `key` is a
//!   64-bit hash of (feed, sender, control id), `hash` the content hash. The writer keeps an
//!   in-memory index (key -> latest row) rebuilt from this log at open; duplicate lookups never
//!   read the database. Pruning deletes log rows older than the longest window (`dedup_keep`).
//!   Version 2 kept the keys in a keyed `dedup` table; opening such a file moves them here.
//! - Partial indexes: pending rows by `id` (what the sink reads), delivered rows by
//!   `delivered_at_us` (what pruning reads).
//! - Deliberately no other index: uniqueness of `id`, `record_id` and `(feed, seq)` is
//!   guaranteed by the single writer, and every index page is another 4 KiB written into the
//!   WAL before each fsync. An append commit touches two pages (the table's last leaf and the
//!   pending index).
//!
//! **Who changes a row.** Only the writer thread (one `rusqlite::Connection`, owned by
//! [`writer_loop`]) writes. Sources send [`Cmd::Append`] and wait for the commit; the sink sends
//! [`Cmd::MarkDelivered`] when a PUBACK arrives; a timer sends [`Cmd::Prune`]. The writer drains
//! everything queued, applies it in ONE transaction and commits once: many connections share one
//! fsync (group commit). Readers (the sink, `siterelay queue stats`) use their own read-only
//! connections; WAL lets them read while the writer writes.
//!
//! **States.** insert -> pending (0) -> delivered (1) -> deleted by pruning once
//! `delivered_at_us` is older than `retain_delivered`, or earlier when the whole file would exceed
//! `max_bytes` (oldest delivered first). A pending row is never deleted or overwritten: when
//! pending bytes reach `max_bytes`, [`Outbox::append`] answers [`AppendError::Full`] and the source
//! refuses the message (`AR`), so the sender keeps it and retries.
//!
//! **Crash at each step.**
//! - Before the commit of an append: the row is not there and no ACK was sent; the sender resends.
//! - After the commit, before the ACK reached the sender: the row is there and will be delivered;
//!   the sender may resend (a duplicate with a new `seq`: at-least-once).
//! - After PUBLISH, before PUBACK: the row is pending; it is published again after restart.
//! - After PUBACK, before the delivered mark commits: the row is pending; it is published again
//!   with the same `record_id`, which the central side deduplicates.
//! - During pruning: a transaction either deletes a batch or not; nothing pending is touched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{debug, error, info, warn};

/// Depth of the command channel into the writer thread (bounded: sources wait when it is full).
const CMD_CHANNEL_DEPTH: usize = 8192;
/// Most commands applied in one transaction.
const MAX_BATCH: usize = 4096;
/// Longest the writer waits for the previous commit's senders before committing without them.
const GROUP_COMMIT_WAIT: Duration = Duration::from_micros(200);
/// Rows deleted per pruning transaction, so pruning never holds the write lock for long.
const PRUNE_CHUNK: usize = 2000;

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// HL7 over MLLP on TCP.
    Mllp,
    /// A serial port.
    Serial,
}

impl SourceKind {
    /// Stored and published name.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Mllp => "mllp",
            SourceKind::Serial => "serial",
        }
    }
    fn parse(s: &str) -> SourceKind {
        match s {
            "serial" => SourceKind::Serial,
            _ => SourceKind::Mllp,
        }
    }
}

/// Payload format of a stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// HL7 version 2 (ER7, pipe-delimited).
    Hl7v2,
    /// ASTM E1394 records.
    Astm,
    /// Line-oriented device output.
    Lines,
}

impl Format {
    /// Stored and published name.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Hl7v2 => "hl7v2",
            Format::Astm => "astm",
            Format::Lines => "lines",
        }
    }
    fn parse(s: &str) -> Format {
        match s {
            "astm" => Format::Astm,
            "lines" => Format::Lines,
            _ => Format::Hl7v2,
        }
    }
}

/// A message to be stored.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Feed name (from the config).
    pub feed: Arc<str>,
    /// Where it came from.
    pub source_kind: SourceKind,
    /// Peer address or device path.
    pub peer: Option<String>,
    /// Payload format.
    pub format: Format,
    /// MSH-10 or equivalent, for logs and stats.
    pub control_id: Option<String>,
    /// The bytes exactly as received.
    pub raw: Vec<u8>,
    /// Receive time, microseconds since the Unix epoch (UTC).
    pub received_at_us: i64,
    /// Released from quarantine by `siterelay queue rejected retry`.
    pub reprocessed: bool,
    /// Duplicate detection (HL7): a resend of a message already stored within the window is
    /// answered again but not stored twice.
    pub dedup: Option<DedupKey>,
}

/// What identifies a resent HL7 message: (feed, MSH-3/MSH-4, MSH-10) and a hash of its bytes.
#[derive(Debug, Clone)]
pub struct DedupKey {
    /// MSH-3 and MSH-4 as sent.
    pub sender: String,
    /// MSH-10.
    pub control_id: String,
    /// FNV-1a 64 of the raw bytes (stable across versions: it is stored).
    pub hash: u64,
    /// How far back a match counts, microseconds.
    pub window_us: i64,
}

/// FNV-1a, 64 bits: a stable content fingerprint for duplicate detection.
pub fn content_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// [`content_hash`] of an HL7 message as if its segments were separated by CR alone (CRLF and
/// LF read as CR), so a resend that differs only in its segment separators is the same
/// message. For a message that already uses CR it equals `content_hash` (keys stored by
/// earlier versions still match).
pub fn hl7_content_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut prev_cr = false;
    for &b in bytes {
        let b = match b {
            // The LF of a CRLF: the CR already stood for the separator.
            b'\n' if prev_cr => {
                prev_cr = false;
                continue;
            }
            b'\n' => b'\r',
            b => b,
        };
        prev_cr = b == b'\r';
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A message answered `AE`, kept in quarantine instead of being forwarded.
#[derive(Debug, Clone)]
pub struct RejectedMessage {
    /// Feed name.
    pub feed: Arc<str>,
    /// Where it came from.
    pub source_kind: SourceKind,
    /// Peer address or device path.
    pub peer: Option<String>,
    /// Receive time (µs since epoch).
    pub received_at_us: i64,
    /// HL7 table 0357 error code sent in the ERR segment.
    pub error_code: u16,
    /// Segment and field of the problem, e.g. `MSH-10`.
    pub error_location: Option<String>,
    /// Why (no message content).
    pub reason: String,
    /// MSH-10, when readable.
    pub control_id: Option<String>,
    /// MSH-3, when readable.
    pub sending_application: Option<String>,
    /// MSH-4, when readable.
    pub sending_facility: Option<String>,
    /// `TYPE^TRIGGER`, when readable.
    pub message_type: Option<String>,
    /// The bytes exactly as received.
    pub raw: Vec<u8>,
}

/// What the store assigned to a committed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Global row id (arrival order).
    pub row_id: i64,
    /// Per-feed sequence number, gap-free and increasing.
    pub seq: u64,
    /// Record id published with every send of this message.
    pub record_id: String,
    /// Set when this was a resend of a message already stored within the duplicate window:
    /// nothing new was stored, and `seq`/`record_id` are those of the original.
    pub duplicate: bool,
}

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
}

enum Cmd {
    Append(NewMessage, oneshot::Sender<Result<Stored, AppendError>>),
    MarkDelivered(Vec<i64>),
    Prune,
    Flush(oneshot::Sender<()>),
    /// Increment an integer in `meta` and answer the new value (birth sequence numbers).
    Increment(&'static str, oneshot::Sender<Result<i64, AppendError>>),
    /// Store a value in `meta` (e.g. the feed inventory).
    PutMeta(&'static str, String),
    /// Keep an `AE`-answered message in quarantine; answers its quarantine id.
    Quarantine(RejectedMessage, oneshot::Sender<Result<i64, AppendError>>),
    /// Delete a quarantined message (it has been stored as a message again).
    Forget(i64, oneshot::Sender<Result<i64, AppendError>>),
}

/// Handle to the outbox. Cheap to clone; the writer thread stops when every handle is dropped.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Cmd>,
    path: PathBuf,
    appended: Arc<Notify>,
    gauges: Arc<OutboxGauges>,
}

/// The writer thread; join it after dropping every [`Outbox`] handle to be sure all commits ran.
pub struct WriterThread(std::thread::JoinHandle<()>);

impl WriterThread {
    /// Wait for the writer to finish its last transaction.
    pub fn join(self) {
        let _ = self.0.join();
    }
}

const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    id              INTEGER PRIMARY KEY,
    record_id       TEXT    NOT NULL,
    feed            TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    received_at_us  INTEGER NOT NULL,
    source_kind     TEXT    NOT NULL,
    peer            TEXT,
    format          TEXT    NOT NULL,
    control_id      TEXT,
    size            INTEGER NOT NULL,
    raw             BLOB    NOT NULL,
    state           INTEGER NOT NULL DEFAULT 0,
    delivered_at_us INTEGER
);
CREATE INDEX IF NOT EXISTS messages_pending ON messages(id) WHERE state = 0;
CREATE INDEX IF NOT EXISTS messages_delivered ON messages(delivered_at_us) WHERE state = 1;
CREATE TABLE IF NOT EXISTS feed_seq (
    feed     TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (
    id                  INTEGER PRIMARY KEY,
    feed                TEXT    NOT NULL,
    source_kind         TEXT    NOT NULL,
    peer                TEXT,
    received_at_us      INTEGER NOT NULL,
    error_code          INTEGER NOT NULL,
    error_location      TEXT,
    reason              TEXT    NOT NULL,
    control_id          TEXT,
    sending_application TEXT,
    sending_facility    TEXT,
    message_type        TEXT,
    size                INTEGER NOT NULL,
    raw                 BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS rejected_time ON rejected(received_at_us);
CREATE TABLE IF NOT EXISTS dedup_log (
    id             INTEGER PRIMARY KEY,
    key            INTEGER NOT NULL,
    hash           INTEGER NOT NULL,
    row_id         INTEGER NOT NULL,
    seq            INTEGER NOT NULL,
    received_at_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> OutboxError + '_ {
    move |source| OutboxError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

/// Current time in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    jiff::Timestamp::now().as_microsecond()
}

impl Outbox {
    /// Open (creating if needed) the outbox at `path` and start its writer thread.
    pub fn open(path: &Path, opts: OutboxOptions) -> Result<(Outbox, WriterThread), OutboxError> {
        if let Some(dir) = path.parent() {
            create_private_dir(dir)?;
        }
        create_private_file(path)?;
        let conn = Connection::open(path).map_err(sqlite(path))?;
        init_schema(&conn, path)?;
        let state = WriterState::load(&conn, path, opts)?;
        let gauges = Arc::new(OutboxGauges::default());
        state.publish_gauges(&gauges);
        info!(
            path = %path.display(),
            pending = state.pending_count,
            pending_bytes = state.pending_bytes,
            "outbox open"
        );
        let (tx, rx) = mpsc::channel(CMD_CHANNEL_DEPTH);
        let appended = Arc::new(Notify::new());
        let thread = {
            let gauges = gauges.clone();
            let appended = appended.clone();
            std::thread::Builder::new()
                .name("outbox-writer".into())
                .spawn(move || writer_loop(conn, state, rx, gauges, appended))
                .map_err(|source| OutboxError::Io {
                    path: path.to_path_buf(),
                    source,
                })?
        };
        Ok((
            Outbox {
                tx,
                path: path.to_path_buf(),
                appended,
                gauges,
            },
            WriterThread(thread),
        ))
    }

    /// Store one message. Returns once the transaction holding it has committed (fsynced).
    pub async fn append(&self, msg: NewMessage) -> Result<Stored, AppendError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Append(msg, tx))
            .await
            .map_err(|_| AppendError::Closed)?;
        rx.await.map_err(|_| AppendError::Closed)?
    }

    /// Append several messages (a batch): queued in order, so their `seq`s follow that order,
    /// and committed together where the writer can; answers once every one is committed or
    /// refused, in the same order.
    pub async fn append_all(&self, msgs: Vec<NewMessage>) -> Vec<Result<Stored, AppendError>> {
        let mut waits = Vec::with_capacity(msgs.len());
        for msg in msgs {
            let (tx, rx) = oneshot::channel();
            let queued = self.tx.send(Cmd::Append(msg, tx)).await.is_ok();
            waits.push(queued.then_some(rx));
        }
        let mut out = Vec::with_capacity(waits.len());
        for rx in waits {
            out.push(match rx {
                Some(rx) => rx.await.map_err(|_| AppendError::Closed).and_then(|r| r),
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
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Increment the integer stored under `key` (starting from 0) and return the committed value.
    pub async fn increment(&self, key: &'static str) -> Result<i64, AppendError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Increment(key, tx))
            .await
            .map_err(|_| AppendError::Closed)?;
        rx.await.map_err(|_| AppendError::Closed)?
    }

    /// Keep an `AE`-answered message in quarantine; returns its quarantine id once committed.
    pub async fn quarantine(&self, m: RejectedMessage) -> Result<i64, AppendError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Quarantine(m, tx))
            .await
            .map_err(|_| AppendError::Closed)?;
        rx.await.map_err(|_| AppendError::Closed)?
    }

    /// Delete a quarantined message once it has been stored again (a crash in between leaves
    /// it in both places, never in neither).
    pub async fn forget_rejected(&self, id: i64) -> Result<(), AppendError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Forget(id, tx))
            .await
            .map_err(|_| AppendError::Closed)?;
        rx.await.map_err(|_| AppendError::Closed)?.map(|_| ())
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
}

fn create_private_dir(dir: &Path) -> Result<(), OutboxError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.as_os_str().is_empty() || dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| OutboxError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

fn create_private_file(path: &Path) -> Result<(), OutboxError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| OutboxError::Io {
        path: path.to_path_buf(),
        source,
    };
    if !path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
    }
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

fn init_schema(conn: &Connection, path: &Path) -> Result<(), OutboxError> {
    let e = sqlite(path);
    conn.busy_timeout(Duration::from_secs(5)).map_err(&e)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(&e)?;
    if version > SCHEMA_VERSION {
        return Err(OutboxError::Schema {
            path: path.to_path_buf(),
            found: version,
            expected: SCHEMA_VERSION,
        });
    }
    if version == 0 {
        // auto_vacuum must be chosen before the first table exists.
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL;")
            .map_err(&e)?;
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(&e)?;
    if !mode.eq_ignore_ascii_case("wal") {
        warn!(mode, "outbox could not switch to WAL journal mode");
    }
    conn.execute_batch(
        "PRAGMA synchronous = FULL; PRAGMA foreign_keys = OFF; \
         PRAGMA journal_size_limit = 67108864;",
    )
    .map_err(&e)?;
    conn.execute_batch(SCHEMA).map_err(&e)?;
    // Version 2 added `messages.reprocessed` (and the `rejected` table, created above).
    let has_reprocessed: bool = conn
        .query_row(
            "SELECT COUNT(*) FROM pragma_table_info('messages') WHERE name = 'reprocessed'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(&e)?
        > 0;
    if !has_reprocessed {
        conn.execute_batch(
            "ALTER TABLE messages ADD COLUMN reprocessed INTEGER NOT NULL DEFAULT 0; \
             ALTER TABLE messages ADD COLUMN control_id_reused INTEGER NOT NULL DEFAULT 0;",
        )
        .map_err(&e)?;
    }
    // Version 3 replaced the keyed `dedup` table (random-order inserts) with the append-only
    // `dedup_log` and an in-memory index; carry the keys over.
    let has_old_dedup: bool = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'dedup'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(&e)?
        > 0;
    if has_old_dedup {
        migrate_dedup(conn).map_err(&e)?;
    }
    conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION};"))
        .map_err(&e)?;
    Ok(())
}

fn migrate_dedup(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let rows: Vec<(String, String, String, i64, i64, i64)> = conn
        .prepare(
            "SELECT feed, sender, control_id, hash, seq, received_at_us FROM dedup \
             ORDER BY received_at_us",
        )?
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    // One pass over messages (no index on (feed, seq)), not one scan per key.
    let mut ids: HashMap<(String, i64), i64> = HashMap::new();
    if !rows.is_empty() {
        let mut stmt = conn.prepare("SELECT feed, seq, id FROM messages")?;
        let found = stmt.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))?;
        for f in found {
            let (k, id) = f?;
            ids.insert(k, id);
        }
    }
    for (feed, sender, control_id, hash, seq, at) in &rows {
        let row_id = ids.get(&(feed.clone(), *seq)).copied().unwrap_or(0);
        conn.execute(
            "INSERT INTO dedup_log (key, hash, row_id, seq, received_at_us) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                dedup_key(feed, sender, control_id) as i64,
                hash,
                row_id,
                seq,
                at
            ],
        )?;
    }
    conn.execute_batch("DROP TABLE dedup; COMMIT")?;
    info!(
        keys = rows.len(),
        "duplicate-detection keys moved to the append-only log"
    );
    Ok(())
}

/// The 64-bit identity of (feed, sender, control id) in the duplicate index (FNV-1a over the
/// three, separated by a byte that cannot occur in them unescaped). A collision between two
/// different keys could only flag `control_id_reused` wrongly, or, with the content hashes also
/// colliding, treat a message as a resend: about 1 in 10^13 for a million keys, then 1 in 2^64.
fn dedup_key(feed: &str, sender: &str, control_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [
        feed.as_bytes(),
        b"\x1f",
        sender.as_bytes(),
        b"\x1f",
        control_id.as_bytes(),
    ] {
        for &b in part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// State owned by the writer thread, mirrored into [`OutboxGauges`].
struct WriterState {
    opts: OutboxOptions,
    last_seq: HashMap<Arc<str>, u64>,
    /// Next row id: only ever increases while the process runs.
    next_id: i64,
    pending_count: u64,
    pending_bytes: u64,
    total_bytes: u64,
    /// Duplicate-detection index: the latest message per key within `dedup_keep`, rebuilt from
    /// `dedup_log` at open. Changed only after the commit that logged the change.
    dedup: HashMap<u64, DedupEntry>,
}

/// The latest stored message with one (feed, sender, control id).
#[derive(Debug, Clone, Copy)]
struct DedupEntry {
    hash: u64,
    row_id: i64,
    seq: u64,
    at_us: i64,
}

impl WriterState {
    fn load(conn: &Connection, path: &Path, opts: OutboxOptions) -> Result<Self, OutboxError> {
        let e = sqlite(path);
        let mut last_seq = HashMap::new();
        let mut stmt = conn
            .prepare("SELECT feed, last_seq FROM feed_seq")
            .map_err(&e)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(&e)?;
        for row in rows {
            let (feed, seq) = row.map_err(&e)?;
            last_seq.insert(Arc::from(feed), seq as u64);
        }
        let mut stmt = conn
            .prepare("SELECT feed, MAX(seq) FROM messages GROUP BY feed")
            .map_err(&e)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(&e)?;
        for row in rows {
            let (feed, seq) = row.map_err(&e)?;
            let slot = last_seq.entry(Arc::from(feed)).or_insert(0);
            *slot = (*slot).max(seq as u64);
        }
        let max_id: i64 = conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM messages", [], |r| {
                r.get(0)
            })
            .map_err(&e)?;
        let (pending_count, pending_bytes): (i64, i64) = conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE state = 0",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(&e)?;
        let total_bytes: i64 = conn
            .query_row("SELECT COALESCE(SUM(size), 0) FROM messages", [], |r| {
                r.get(0)
            })
            .map_err(&e)?;
        let mut dedup = HashMap::new();
        if !opts.dedup_keep.is_zero() {
            let since = now_us() - opts.dedup_keep.as_micros() as i64;
            let mut stmt = conn
                .prepare(
                    "SELECT key, hash, row_id, seq, received_at_us FROM dedup_log \
                     WHERE received_at_us >= ?1 ORDER BY id",
                )
                .map_err(&e)?;
            let rows = stmt
                .query_map(params![since], |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        DedupEntry {
                            hash: r.get::<_, i64>(1)? as u64,
                            row_id: r.get(2)?,
                            seq: r.get::<_, i64>(3)? as u64,
                            at_us: r.get(4)?,
                        },
                    ))
                })
                .map_err(&e)?;
            for row in rows {
                let (key, entry) = row.map_err(&e)?;
                dedup.insert(key, entry);
            }
            if !dedup.is_empty() {
                info!(keys = dedup.len(), "duplicate-detection index loaded");
            }
        }
        Ok(WriterState {
            opts,
            last_seq,
            next_id: max_id + 1,
            pending_count: pending_count as u64,
            pending_bytes: pending_bytes as u64,
            total_bytes: total_bytes as u64,
            dedup,
        })
    }

    fn publish_gauges(&self, g: &OutboxGauges) {
        g.pending_count.store(self.pending_count, Ordering::Relaxed);
        g.pending_bytes.store(self.pending_bytes, Ordering::Relaxed);
        g.total_bytes.store(self.total_bytes, Ordering::Relaxed);
    }
}

type Reply = (
    oneshot::Sender<Result<Stored, AppendError>>,
    Result<Stored, AppendError>,
);

/// The single writer: drain commands, apply them in one transaction, commit, answer.
fn writer_loop(
    mut conn: Connection,
    mut state: WriterState,
    mut rx: mpsc::Receiver<Cmd>,
    gauges: Arc<OutboxGauges>,
    appended: Arc<Notify>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut last_appends = 0usize;
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        drain_into(&mut rx, &mut batch);
        // Group commit: when the previous commit carried several senders' messages, those
        // senders are about to send again; wait a moment for them so they share this fsync
        // instead of splitting into alternating half-full commits. A lone sender never waits.
        if last_appends > 1 {
            let deadline = std::time::Instant::now() + GROUP_COMMIT_WAIT;
            while count_appends(&batch) < last_appends
                && batch.len() < MAX_BATCH
                && std::time::Instant::now() < deadline
            {
                std::thread::yield_now();
                drain_into(&mut rx, &mut batch);
            }
        }
        last_appends = count_appends(&batch);
        let added = apply_batch(&mut conn, &mut state, &mut batch, &gauges);
        state.publish_gauges(&gauges);
        if added {
            appended.notify_one();
        }
    }
    debug!("outbox writer stopped");
}

fn drain_into(rx: &mut mpsc::Receiver<Cmd>, batch: &mut Vec<Cmd>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(c) => batch.push(c),
            Err(_) => break,
        }
    }
}

fn count_appends(batch: &[Cmd]) -> usize {
    batch
        .iter()
        .filter(|c| matches!(c, Cmd::Append(..)))
        .count()
}

/// Apply one batch in a single transaction; answers every append. Returns true if rows were added.
fn apply_batch(
    conn: &mut Connection,
    state: &mut WriterState,
    batch: &mut Vec<Cmd>,
    gauges: &OutboxGauges,
) -> bool {
    let mut replies: Vec<Reply> = Vec::new();
    let mut flushes = Vec::new();
    let mut increments: Vec<(oneshot::Sender<Result<i64, AppendError>>, i64)> = Vec::new();
    let mut prune = false;
    let saved_seq = state.last_seq.clone();
    let saved = (
        state.pending_count,
        state.pending_bytes,
        state.total_bytes,
        state.next_id,
    );
    let mut appended_n = 0u64;
    let mut delivered_n = 0u64;
    // Index changes of this transaction, applied to `state.dedup` only once it commits.
    let mut batch_dedup: HashMap<u64, DedupEntry> = HashMap::new();

    let result = (|| -> rusqlite::Result<()> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (id, record_id, feed, seq, received_at_us, source_kind, peer, \
                 format, control_id, size, raw, reprocessed, control_id_reused) \
                 VALUES (?11, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?12, ?13)",
            )?;
            let mut mark = tx.prepare_cached(
                "UPDATE messages SET state = 1, delivered_at_us = ?2 WHERE id = ?1 AND state = 0 \
                 RETURNING size",
            )?;
            let now = now_us();
            for cmd in batch.drain(..) {
                match cmd {
                    Cmd::Append(msg, reply) => {
                        let size = msg.raw.len() as u64;
                        // A resend of something already stored within the window: answer again,
                        // store nothing. Same control id with other content: store and flag.
                        let mut reused = false;
                        let key = msg
                            .dedup
                            .as_ref()
                            .map(|k| dedup_key(&msg.feed, &k.sender, &k.control_id));
                        if let (Some(k), Some(key)) = (&msg.dedup, key) {
                            let prior = batch_dedup
                                .get(&key)
                                .or_else(|| state.dedup.get(&key))
                                .copied();
                            if let Some(p) = prior
                                && msg.received_at_us - p.at_us <= k.window_us
                            {
                                if p.hash == k.hash {
                                    gauges.duplicates.fetch_add(1, Ordering::Relaxed);
                                    let record_id: String = tx
                                        .prepare_cached(
                                            "SELECT record_id FROM messages WHERE id = ?1",
                                        )?
                                        .query_row(params![p.row_id], |r| r.get(0))
                                        .optional()?
                                        .unwrap_or_default();
                                    replies.push((
                                        reply,
                                        Ok(Stored {
                                            row_id: p.row_id,
                                            seq: p.seq,
                                            record_id,
                                            duplicate: true,
                                        }),
                                    ));
                                    continue;
                                }
                                reused = true;
                            }
                        }
                        if state.pending_bytes + size > state.opts.max_bytes {
                            gauges.refused_full.fetch_add(1, Ordering::Relaxed);
                            let err = AppendError::Full {
                                pending_bytes: state.pending_bytes,
                                max_bytes: state.opts.max_bytes,
                            };
                            replies.push((reply, Err(err)));
                            continue;
                        }
                        let seq = state.last_seq.get(&msg.feed).copied().unwrap_or(0) + 1;
                        let record_id = uuid::Uuid::now_v7().to_string();
                        insert.execute(params![
                            record_id,
                            &*msg.feed,
                            seq as i64,
                            msg.received_at_us,
                            msg.source_kind.as_str(),
                            msg.peer,
                            msg.format.as_str(),
                            msg.control_id,
                            size as i64,
                            msg.raw,
                            state.next_id,
                            msg.reprocessed,
                            reused,
                        ])?;
                        if let (Some(k), Some(key)) = (&msg.dedup, key) {
                            // Appended in time order: the log's last page, never a random one.
                            tx.prepare_cached(
                                "INSERT INTO dedup_log (key, hash, row_id, seq, received_at_us) \
                                 VALUES (?1, ?2, ?3, ?4, ?5)",
                            )?
                            .execute(params![
                                key as i64,
                                k.hash as i64,
                                state.next_id,
                                seq as i64,
                                msg.received_at_us
                            ])?;
                            batch_dedup.insert(
                                key,
                                DedupEntry {
                                    hash: k.hash,
                                    row_id: state.next_id,
                                    seq,
                                    at_us: msg.received_at_us,
                                },
                            );
                        }
                        let row_id = state.next_id;
                        state.next_id += 1;
                        state.last_seq.insert(msg.feed, seq);
                        state.pending_count += 1;
                        state.pending_bytes += size;
                        state.total_bytes += size;
                        appended_n += 1;
                        replies.push((
                            reply,
                            Ok(Stored {
                                row_id,
                                seq,
                                record_id,
                                duplicate: false,
                            }),
                        ));
                    }
                    Cmd::MarkDelivered(ids) => {
                        for id in ids {
                            let size: Option<i64> =
                                mark.query_row(params![id, now], |r| r.get(0)).optional()?;
                            if let Some(size) = size {
                                state.pending_count -= 1;
                                state.pending_bytes -= size as u64;
                                delivered_n += 1;
                            }
                        }
                    }
                    Cmd::Prune => prune = true,
                    Cmd::Flush(done) => flushes.push(done),
                    Cmd::Increment(key, reply) => {
                        let v: i64 = tx.query_row(
                            "INSERT INTO meta (key, value) VALUES (?1, '0') \
                             ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1 \
                             RETURNING CAST(value AS INTEGER)",
                            params![key],
                            |r| r.get(0),
                        )?;
                        increments.push((reply, v));
                    }
                    Cmd::Quarantine(m, reply) => {
                        tx.execute(
                            "INSERT INTO rejected (feed, source_kind, peer, received_at_us, error_code, \
                             error_location, reason, control_id, sending_application, \
                             sending_facility, message_type, size, raw) \
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                            params![
                                &*m.feed,
                                m.source_kind.as_str(),
                                m.peer,
                                m.received_at_us,
                                m.error_code,
                                m.error_location,
                                m.reason,
                                m.control_id,
                                m.sending_application,
                                m.sending_facility,
                                m.message_type,
                                m.raw.len() as i64,
                                m.raw,
                            ],
                        )?;
                        increments.push((reply, tx.last_insert_rowid()));
                    }
                    Cmd::Forget(id, reply) => {
                        let n = tx.execute("DELETE FROM rejected WHERE id = ?1", params![id])?;
                        increments.push((reply, n as i64));
                    }
                    Cmd::PutMeta(key, value) => {
                        tx.execute(
                            "INSERT INTO meta (key, value) VALUES (?1, ?2) \
                             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                            params![key, value],
                        )?;
                    }
                }
            }
        }
        tx.commit()
    })();

    match result {
        Ok(()) => {
            state.dedup.extend(batch_dedup);
            gauges.commits.fetch_add(1, Ordering::Relaxed);
            gauges.appended.fetch_add(appended_n, Ordering::Relaxed);
            gauges.delivered.fetch_add(delivered_n, Ordering::Relaxed);
            // Counters first, answers second: whoever learns of the commit sees it counted.
            state.publish_gauges(gauges);
            for (reply, r) in replies {
                let _ = reply.send(r);
            }
            for (reply, v) in increments {
                let _ = reply.send(Ok(v));
            }
        }
        Err(e) => {
            // Nothing in this batch was stored: roll the in-memory view back and refuse every
            // append in it, so no sender is told a message was kept.
            error!(error = %e, "outbox transaction failed; refusing the messages in it");
            state.last_seq = saved_seq;
            (
                state.pending_count,
                state.pending_bytes,
                state.total_bytes,
                state.next_id,
            ) = saved;
            for (reply, r) in replies {
                let r = match r {
                    Ok(_) => Err(AppendError::Failed(e.to_string())),
                    Err(other) => Err(other),
                };
                let _ = reply.send(r);
            }
            for (reply, _) in increments {
                let _ = reply.send(Err(AppendError::Failed(e.to_string())));
            }
            appended_n = 0;
        }
    }
    if prune && let Err(e) = prune_delivered(conn, state) {
        error!(error = %e, "pruning delivered messages failed");
    }
    for f in flushes {
        let _ = f.send(());
    }
    appended_n > 0
}

/// Delete delivered rows past retention, then oldest delivered rows while the file's rows exceed
/// `max_bytes`. Never touches pending rows.
fn prune_delivered(conn: &mut Connection, state: &mut WriterState) -> rusqlite::Result<()> {
    let cutoff = now_us() - state.opts.retain_delivered.as_micros() as i64;
    let mut removed = 0u64;
    loop {
        let over_cap = state.total_bytes > state.opts.max_bytes;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Record each feed's last seq before rows go, so seq never restarts.
        {
            let mut floor = tx.prepare_cached(
                "INSERT INTO feed_seq (feed, last_seq) VALUES (?1, ?2) \
                 ON CONFLICT(feed) DO UPDATE SET last_seq = MAX(last_seq, excluded.last_seq)",
            )?;
            for (feed, seq) in &state.last_seq {
                floor.execute(params![&**feed, *seq as i64])?;
            }
        }
        let freed: i64 = tx.query_row(
            "WITH doomed AS (SELECT id, size FROM messages WHERE state = 1 AND \
             (delivered_at_us < ?1 OR ?2) ORDER BY delivered_at_us LIMIT ?3) \
             SELECT COALESCE(SUM(size), 0) FROM doomed",
            params![cutoff, over_cap, PRUNE_CHUNK as i64],
            |r| r.get(0),
        )?;
        let n = tx.execute(
            "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE state = 1 AND \
             (delivered_at_us < ?1 OR ?2) ORDER BY delivered_at_us LIMIT ?3)",
            params![cutoff, over_cap, PRUNE_CHUNK as i64],
        )?;
        tx.commit()?;
        state.total_bytes = state.total_bytes.saturating_sub(freed as u64);
        removed += n as u64;
        if n < PRUNE_CHUNK {
            break;
        }
    }
    // Duplicate keys older than the longest window: the log is in time order, so find the first
    // row to keep (reading only the rows that go) and delete everything before it.
    let dedup_cutoff = now_us() - state.opts.dedup_keep.as_micros() as i64;
    let first_kept: Option<i64> = conn
        .query_row(
            "SELECT id FROM dedup_log WHERE received_at_us >= ?1 ORDER BY id LIMIT 1",
            params![dedup_cutoff],
            |r| r.get(0),
        )
        .optional()?;
    removed += match first_kept {
        Some(id) => conn.execute("DELETE FROM dedup_log WHERE id < ?1", params![id])?,
        None => conn.execute("DELETE FROM dedup_log", [])?,
    } as u64;
    state.dedup.retain(|_, e| e.at_us >= dedup_cutoff);
    let rejected_cutoff = now_us() - state.opts.retain_rejected.as_micros() as i64;
    removed += conn.execute(
        "DELETE FROM rejected WHERE received_at_us < ?1",
        params![rejected_cutoff],
    )? as u64;
    if removed > 0 {
        conn.execute_batch("PRAGMA incremental_vacuum;")?;
        info!(removed, "pruned delivered messages");
    }
    Ok(())
}

/// A message waiting for delivery, as read by the sink.
#[derive(Debug, Clone)]
pub struct PendingRow {
    /// Global row id.
    pub row_id: i64,
    /// Stable record id.
    pub record_id: String,
    /// Feed name.
    pub feed: String,
    /// Per-feed sequence number.
    pub seq: u64,
    /// Receive time (µs since epoch).
    pub received_at_us: i64,
    /// Source kind.
    pub source_kind: SourceKind,
    /// Peer.
    pub peer: Option<String>,
    /// Format.
    pub format: Format,
    /// Raw bytes.
    pub raw: Vec<u8>,
    /// Released from quarantine by a retry.
    pub reprocessed: bool,
    /// Same sender and control id as an earlier message, different content.
    pub control_id_reused: bool,
}

/// A quarantined message as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuarantinedRow {
    /// Quarantine id.
    pub id: i64,
    /// Feed name.
    pub feed: String,
    /// `mllp` or `serial`.
    pub source_kind: String,
    /// Peer address or device path.
    pub peer: Option<String>,
    /// Receive time (µs since epoch).
    pub received_at_us: i64,
    /// HL7 table 0357 error code.
    pub error_code: u16,
    /// Segment and field, e.g. `MSH-10`.
    pub error_location: Option<String>,
    /// Why.
    pub reason: String,
    /// MSH-10, when readable.
    pub control_id: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// The bytes as received (patient data: never logged).
    #[serde(skip)]
    pub raw: Vec<u8>,
}

fn row_to_quarantined(r: &rusqlite::Row<'_>) -> rusqlite::Result<QuarantinedRow> {
    Ok(QuarantinedRow {
        id: r.get(0)?,
        feed: r.get(1)?,
        source_kind: r.get(2)?,
        peer: r.get(3)?,
        received_at_us: r.get(4)?,
        error_code: r.get::<_, i64>(5)? as u16,
        error_location: r.get(6)?,
        reason: r.get(7)?,
        control_id: r.get(8)?,
        size: r.get::<_, i64>(9)? as u64,
        raw: r.get(10)?,
    })
}

fn row_to_pending(r: &rusqlite::Row<'_>) -> rusqlite::Result<PendingRow> {
    Ok(PendingRow {
        row_id: r.get(0)?,
        record_id: r.get(1)?,
        feed: r.get(2)?,
        seq: r.get::<_, i64>(3)? as u64,
        received_at_us: r.get(4)?,
        source_kind: SourceKind::parse(&r.get::<_, String>(5)?),
        peer: r.get(6)?,
        format: Format::parse(&r.get::<_, String>(7)?),
        raw: r.get(8)?,
        reprocessed: r.get::<_, i64>(9)? != 0,
        control_id_reused: r.get::<_, i64>(10)? != 0,
    })
}

/// A read-only connection to the outbox.
pub struct Reader {
    conn: Connection,
    path: PathBuf,
}

impl Reader {
    /// Open read-only. Works while the daemon writes (WAL).
    pub fn open(path: &Path) -> Result<Reader, OutboxError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite(path))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(sqlite(path))?;
        Ok(Reader {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Pending rows with `id > after`, oldest first: at most `limit` rows, and no more rows once
    /// their raw bytes reach `max_bytes` (always at least one row if any is pending).
    pub fn pending_after(
        &self,
        after: i64,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Vec<PendingRow>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, record_id, feed, seq, received_at_us, source_kind, peer, format, raw, \
                 reprocessed, control_id_reused FROM messages WHERE state = 0 AND id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(sqlite(&self.path))?;
        let rows = stmt
            .query_map(params![after, limit as i64], row_to_pending)
            .map_err(sqlite(&self.path))?;
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for row in rows {
            let row = row.map_err(sqlite(&self.path))?;
            bytes += row.raw.len() as u64;
            out.push(row);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// A value from `meta`.
    pub fn meta(&self, key: &str) -> Result<Option<String>, OutboxError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(sqlite(&self.path))
    }

    /// Receive time (µs) of the oldest pending message.
    pub fn oldest_pending_us(&self) -> Result<Option<i64>, OutboxError> {
        self.conn
            .query_row(
                "SELECT received_at_us FROM messages WHERE state = 0 ORDER BY id LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(sqlite(&self.path))
    }

    /// Rows of one feed with `seq >= from_seq` (delivered or not), oldest first: what a replay
    /// can still send.
    pub fn feed_rows_from(
        &self,
        feed: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<PendingRow>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, record_id, feed, seq, received_at_us, source_kind, peer, format, raw, \
                 reprocessed, control_id_reused FROM messages WHERE feed = ?1 AND seq >= ?2 ORDER BY id LIMIT ?3",
            )
            .map_err(sqlite(&self.path))?;
        let rows = stmt
            .query_map(params![feed, from_seq as i64, limit as i64], row_to_pending)
            .map_err(sqlite(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(sqlite(&self.path))
    }

    /// For a replay: how many rows of `feed` with `seq >= from_seq` are still retained, and the
    /// first and last such seq.
    pub fn feed_range(
        &self,
        feed: &str,
        from_seq: u64,
    ) -> Result<(u64, Option<u64>, Option<u64>), OutboxError> {
        self.conn
            .query_row(
                "SELECT COUNT(*), MIN(seq), MAX(seq) FROM messages WHERE feed = ?1 AND seq >= ?2",
                params![feed, from_seq as i64],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, Option<i64>>(1)?.map(|v| v as u64),
                        r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
                    ))
                },
            )
            .map_err(sqlite(&self.path))
    }

    /// Quarantined messages, oldest first (one id, or all).
    pub fn quarantined(&self, which: Option<i64>) -> Result<Vec<QuarantinedRow>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, feed, source_kind, peer, received_at_us, error_code, error_location, \
                 reason, control_id, size, raw FROM rejected WHERE ?1 IS NULL OR id = ?1 ORDER BY id",
            )
            .map_err(sqlite(&self.path))?;
        let rows = stmt
            .query_map(params![which], row_to_quarantined)
            .map_err(sqlite(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(sqlite(&self.path))
    }

    /// Per-feed queue statistics.
    pub fn stats(&self) -> Result<Vec<FeedStats>, OutboxError> {
        let now = now_us();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT feed, \
                   SUM(state = 0), SUM(CASE WHEN state = 0 THEN size ELSE 0 END), \
                   SUM(state = 1), SUM(CASE WHEN state = 1 THEN size ELSE 0 END), \
                   MIN(CASE WHEN state = 0 THEN received_at_us END), MAX(seq) \
                 FROM messages GROUP BY feed ORDER BY feed",
            )
            .map_err(sqlite(&self.path))?;
        let rows = stmt
            .query_map([], |r| {
                let oldest: Option<i64> = r.get(5)?;
                Ok(FeedStats {
                    feed: r.get(0)?,
                    pending: r.get::<_, i64>(1)? as u64,
                    pending_bytes: r.get::<_, i64>(2)? as u64,
                    delivered: r.get::<_, i64>(3)? as u64,
                    delivered_bytes: r.get::<_, i64>(4)? as u64,
                    oldest_pending_age: oldest
                        .map(|t| Duration::from_micros((now - t).max(0) as u64)),
                    last_seq: r.get::<_, i64>(6)? as u64,
                })
            })
            .map_err(sqlite(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(sqlite(&self.path))
    }

    /// Receive-to-delivered latencies (µs, unsorted) of delivered rows received at or after
    /// `since_us`. For measurements (the load generator).
    pub fn delivery_latencies_since_us(&self, since_us: i64) -> Result<Vec<i64>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT delivered_at_us - received_at_us FROM messages \
                 WHERE state = 1 AND received_at_us >= ?1",
            )
            .map_err(sqlite(&self.path))?;
        let rows = stmt
            .query_map([since_us], |r| r.get(0))
            .map_err(sqlite(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(sqlite(&self.path))
    }
}

/// Queue statistics of one feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedStats {
    /// Feed name.
    pub feed: String,
    /// Messages waiting for the broker.
    pub pending: u64,
    /// Their bytes.
    pub pending_bytes: u64,
    /// Delivered messages still retained.
    pub delivered: u64,
    /// Their bytes.
    pub delivered_bytes: u64,
    /// Age of the oldest pending message.
    pub oldest_pending_age: Option<Duration>,
    /// Highest sequence number stored for the feed.
    pub last_seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(feed: &str, body: &str) -> NewMessage {
        NewMessage {
            feed: Arc::from(feed),
            source_kind: SourceKind::Mllp,
            peer: Some("127.0.0.1:1".into()),
            format: Format::Hl7v2,
            control_id: Some("C1".into()),
            raw: body.as_bytes().to_vec(),
            received_at_us: now_us(),
            reprocessed: false,
            dedup: None,
        }
    }

    fn opts(max_bytes: u64) -> OutboxOptions {
        OutboxOptions {
            max_bytes,
            retain_delivered: Duration::from_secs(3600),
            retain_rejected: Duration::from_secs(3600),
            dedup_keep: Duration::from_secs(7 * 86_400),
        }
    }

    #[test]
    fn hl7_hash_treats_lf_and_crlf_separators_as_cr_and_equals_the_stored_hash_for_cr() {
        let cr = b"MSH|^~\\&|A|B|C|D|20261130||ADT^A01|C1|P|2.5\rPID|1||1\r";
        let lf: Vec<u8> = cr
            .iter()
            .map(|&b| if b == b'\r' { b'\n' } else { b })
            .collect();
        let crlf = String::from_utf8_lossy(cr).replace('\r', "\r\n");
        assert_eq!(hl7_content_hash(cr), content_hash(cr));
        assert_eq!(hl7_content_hash(&lf), content_hash(cr));
        assert_eq!(hl7_content_hash(crlf.as_bytes()), content_hash(cr));
        let other = String::from_utf8_lossy(cr).replace("PID|1||1", "PID|1||2");
        assert_ne!(hl7_content_hash(other.as_bytes()), content_hash(cr));
    }

    #[tokio::test]
    async fn seq_is_gap_free_per_feed_and_survives_reopen_and_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        {
            let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
            assert_eq!(ob.append(msg("a", "x")).await.unwrap().seq, 1);
            assert_eq!(ob.append(msg("b", "x")).await.unwrap().seq, 1);
            let s = ob.append(msg("a", "x")).await.unwrap();
            assert_eq!(s.seq, 2);
            ob.mark_delivered(vec![1, 2, s.row_id]).await;
            ob.flush().await;
            drop(ob);
            w.join();
        }
        // Delivered rows pruned (zero retention): the feed's seq must not restart.
        let (ob, w) = Outbox::open(
            &path,
            OutboxOptions {
                max_bytes: 1 << 20,
                retain_delivered: Duration::ZERO,
                retain_rejected: Duration::from_secs(3600),
                dedup_keep: Duration::ZERO,
            },
        )
        .unwrap();
        ob.prune().await;
        ob.flush().await;
        assert!(ob.reader().unwrap().stats().unwrap().is_empty());
        assert_eq!(ob.append(msg("a", "x")).await.unwrap().seq, 3);
        drop(ob);
        w.join();
    }

    fn keyed(feed: &str, control_id: &str, body: &str, at_us: i64) -> NewMessage {
        NewMessage {
            control_id: Some(control_id.into()),
            received_at_us: at_us,
            dedup: Some(DedupKey {
                sender: "PAS|RXX".into(),
                control_id: control_id.into(),
                hash: content_hash(body.as_bytes()),
                window_us: 7 * 86_400 * 1_000_000,
            }),
            ..msg(feed, body)
        }
    }

    #[tokio::test]
    async fn resends_are_recognised_within_the_window_across_batches_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let now = now_us();
        let day = 86_400 * 1_000_000;
        let first;
        {
            let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
            first = ob.append(keyed("a", "C1", "x", now)).await.unwrap();
            assert!(!first.duplicate);
            // Same key and content in one group commit: the second is a resend of the first.
            let both = ob
                .append_all(vec![keyed("a", "C2", "y", now), keyed("a", "C2", "y", now)])
                .await;
            assert!(!both[0].as_ref().unwrap().duplicate);
            assert!(both[1].as_ref().unwrap().duplicate);
            drop(ob);
            w.join();
        }
        // After a restart the index is rebuilt from the log.
        let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
        let again = ob.append(keyed("a", "C1", "x", now + day)).await.unwrap();
        assert!(again.duplicate);
        assert_eq!((again.seq, &again.record_id), (first.seq, &first.record_id));
        // Other feed, same control id: not a resend.
        assert!(
            !ob.append(keyed("b", "C1", "x", now))
                .await
                .unwrap()
                .duplicate
        );
        // Same key, other content: stored and flagged.
        let reused = ob.append(keyed("a", "C1", "z", now + day)).await.unwrap();
        assert!(!reused.duplicate);
        let rows = ob
            .reader()
            .unwrap()
            .pending_after(0, 100, u64::MAX)
            .unwrap();
        assert_eq!(rows.len(), 4, "C1, C2, C1 on feed b, reused C1");
        assert!(rows.last().unwrap().control_id_reused);
        // Outside the window: a new message.
        let late = ob
            .append(keyed("a", "C2", "y", now + 8 * day))
            .await
            .unwrap();
        assert!(!late.duplicate);
        drop(ob);
        w.join();
    }

    #[tokio::test]
    async fn pruning_forgets_keys_older_than_the_longest_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let day = 86_400 * 1_000_000;
        let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
        ob.append(keyed("a", "OLD", "x", now_us() - 8 * day))
            .await
            .unwrap();
        ob.append(keyed("a", "NEW", "x", now_us() - day))
            .await
            .unwrap();
        ob.prune().await;
        ob.flush().await;
        let n: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM dedup_log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        // A window longer than what is kept cannot find the forgotten key.
        let mut m = keyed("a", "OLD", "x", now_us());
        m.dedup.as_mut().unwrap().window_us = 30 * day;
        assert!(!ob.append(m).await.unwrap().duplicate);
        assert!(
            ob.append(keyed("a", "NEW", "x", now_us()))
                .await
                .unwrap()
                .duplicate
        );
        drop(ob);
        w.join();
    }

    #[tokio::test]
    async fn keys_of_a_version_2_outbox_are_carried_into_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let first = {
            let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
            let s = ob.append(msg("a", "x")).await.unwrap();
            drop(ob);
            w.join();
            s
        };
        // Put the file back into the version 2 layout with one key.
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "DROP TABLE dedup_log; PRAGMA user_version = 2; \
             CREATE TABLE dedup (feed TEXT NOT NULL, sender TEXT NOT NULL, control_id TEXT NOT NULL, \
             hash INTEGER NOT NULL, seq INTEGER NOT NULL, record_id TEXT NOT NULL, \
             received_at_us INTEGER NOT NULL, PRIMARY KEY (feed, sender, control_id)) WITHOUT ROWID;",
        )
        .unwrap();
        c.execute(
            "INSERT INTO dedup VALUES ('a', 'PAS|RXX', 'C1', ?1, 1, ?2, ?3)",
            params![content_hash(b"x") as i64, first.record_id, now_us()],
        )
        .unwrap();
        drop(c);
        let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
        let again = ob.append(keyed("a", "C1", "x", now_us())).await.unwrap();
        assert!(again.duplicate);
        assert_eq!((again.seq, &again.record_id), (1, &first.record_id));
        drop(ob);
        w.join();
    }

    #[tokio::test]
    async fn full_store_refuses_new_messages_and_keeps_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _w) = Outbox::open(&dir.path().join("o.sqlite"), opts(10)).unwrap();
        ob.append(msg("a", "12345678")).await.unwrap();
        let err = ob.append(msg("a", "123")).await.unwrap_err();
        assert!(matches!(
            err,
            AppendError::Full {
                pending_bytes: 8,
                max_bytes: 10
            }
        ));
        let rows = ob.reader().unwrap().pending_after(0, 10, u64::MAX).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].raw, b"12345678");
        // Delivering frees room.
        ob.mark_delivered(vec![rows[0].row_id]).await;
        ob.flush().await;
        assert_eq!(ob.append(msg("a", "123")).await.unwrap().seq, 2);
    }

    #[tokio::test]
    async fn pending_reads_stop_at_the_byte_budget_but_return_at_least_one_row() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _w) = Outbox::open(&dir.path().join("o.sqlite"), opts(1 << 20)).unwrap();
        for _ in 0..5 {
            ob.append(msg("a", "0123456789")).await.unwrap();
        }
        let r = ob.reader().unwrap();
        assert_eq!(r.pending_after(0, 10, 25).unwrap().len(), 3);
        assert_eq!(r.pending_after(0, 10, 1).unwrap().len(), 1);
        let after_two = r.pending_after(2, 10, u64::MAX).unwrap();
        assert_eq!(
            after_two.iter().map(|p| p.seq).collect::<Vec<_>>(),
            [3, 4, 5]
        );
    }

    #[tokio::test]
    async fn database_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/o.sqlite");
        let (ob, _w) = Outbox::open(&path, opts(1 << 20)).unwrap();
        ob.append(msg("a", "x")).await.unwrap();
        for p in [path.clone(), dir.path().join("sub/o.sqlite-wal")] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
    }

    #[tokio::test]
    async fn concurrent_appends_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _w) = Outbox::open(&dir.path().join("o.sqlite"), opts(1 << 30)).unwrap();
        let mut tasks = Vec::new();
        for t in 0..8 {
            let ob = ob.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    ob.append(msg("a", &format!("{t}-{i}"))).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let g = ob.gauges();
        assert_eq!(g.appended.load(Ordering::Relaxed), 400);
        assert!(g.commits.load(Ordering::Relaxed) < 400);
        let rows = ob
            .reader()
            .unwrap()
            .pending_after(0, 1000, u64::MAX)
            .unwrap();
        let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=400).collect::<Vec<_>>());
    }
}
