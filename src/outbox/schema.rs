//! The database file: created private, opened with its pragmas, its schema created and older
//! versions migrated in place. The tables themselves are described in the design note
//! ([`super`]).
//!
//! Versions (`PRAGMA user_version`):
//! - 1: `messages`, `feed_seq`, `meta`.
//! - 2: the `rejected` table and `messages.reprocessed`; later, still as version 2,
//!   `messages.control_id_reused` and a keyed `dedup` table.
//! - 3: `dedup` replaced by the append-only `dedup_log` (the writer keeps the index in memory).
//! - 4: the `held` table (records set aside because they cannot be published; `held.rs`).
//! - 5: delivery state moved out of `messages` into `pending` and `delivered`; the row-id
//!   high-water mark in `meta`. Later, still as version 5, `messages.truncated_bytes` (added
//!   when missing, like version 2's columns).
//! - 6: `messages.peer_certificate` (the subject of the sender's TLS client certificate).
//!
//! Versions 4 and 5 were written in parallel: a file may have been stamped 5 without ever
//! having had the `held` table (made by a build without it), and a version-4 file has held
//! rows whose delivery state is still in `messages`. So each step is detected from the file
//! itself (a column, a table or a `meta` marker missing or present), never from the version
//! number, and can run again harmlessly: every open runs every step, in order (v2, v3, v4,
//! v5), and the version is stamped last. The version-4 step creates `held` whenever it is
//! missing, on a file already at 5 too; the version-5 step moves a version-4 file's held rows
//! into `pending` like any undelivered row (they stay held: `held` names them by id). A new
//! step is one more `migrate_to_vN` called after the others, and a higher [`SCHEMA_VERSION`].

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, params};
use tracing::{info, warn};

use super::dedup::dedup_key;
use super::{OutboxError, sqlite};

/// The version this build writes; a file with a higher one is refused.
const SCHEMA_VERSION: i64 = 6;

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
    reprocessed     INTEGER NOT NULL DEFAULT 0,
    control_id_reused INTEGER NOT NULL DEFAULT 0,
    truncated_bytes INTEGER NOT NULL DEFAULT 0,
    peer_certificate TEXT
);
CREATE TABLE IF NOT EXISTS pending (
    id   INTEGER PRIMARY KEY,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS delivered (
    n               INTEGER PRIMARY KEY,
    id              INTEGER NOT NULL,
    delivered_at_us INTEGER NOT NULL
);
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

/// Open (creating if needed) the database at `path` for the writer: the directory 0700 when
/// created, the file 0600, the schema current.
pub(super) fn open(path: &Path) -> Result<Connection, OutboxError> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    create_private_file(path)?;
    let conn = Connection::open(path).map_err(sqlite(path))?;
    // The writer keeps about 25 distinct cached statements (appends, marks, the dedup log,
    // pruning, the size pragmas); rusqlite's default cache of 16 would evict and re-parse some
    // on every group.
    conn.set_prepared_statement_cache_capacity(64);
    init_schema(&conn, path)?;
    Ok(conn)
}

/// `PRAGMA secure_delete = FAST` on the writer's connection (the only one that deletes): deleted
/// content is overwritten with zeros in the b-tree pages it leaves. Pages that become free
/// (a large message's overflow pages) are not rewritten (`ON` would zero them too, writing every
/// freed page into the WAL: on a full disk that made pruning fail with `SQLITE_FULL`, so the store
/// never recovered); pruning's incremental vacuum then empties the freelist, so those pages leave
/// the file, and its `TRUNCATE` checkpoint drops the WAL frames that held the rows.
pub(super) fn set_secure_delete(
    conn: &Connection,
    path: &Path,
    on: bool,
) -> Result<(), OutboxError> {
    let now: i64 = conn
        .query_row(
            &format!("PRAGMA secure_delete = {}", if on { "FAST" } else { "OFF" }),
            [],
            |r| r.get(0),
        )
        .map_err(sqlite(path))?;
    if (now != 0) != on {
        warn!(
            requested = on,
            now, "outbox: SQLite refused the secure_delete setting"
        );
    }
    Ok(())
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

/// Pragmas, tables, migrations, then the version stamp.
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
    migrate_to_v2(conn).map_err(&e)?;
    migrate_to_v3(conn).map_err(&e)?;
    migrate_to_v4(conn).map_err(&e)?;
    migrate_to_v5(conn).map_err(&e)?;
    add_truncated_bytes(conn).map_err(&e)?;
    migrate_to_v6(conn).map_err(&e)?;
    conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION};"))
        .map_err(&e)?;
    Ok(())
}

/// Version 6 added `messages.peer_certificate`: the subject of the client certificate an MLLP
/// sender presented (NULL for plain TCP, serial ports and rows stored before). Detected from the
/// file (the column), so it runs harmlessly on any version.
fn migrate_to_v6(conn: &Connection) -> rusqlite::Result<()> {
    if !has_column(conn, "messages", "peer_certificate")? {
        conn.execute_batch("ALTER TABLE messages ADD COLUMN peer_certificate TEXT")?;
    }
    Ok(())
}

/// Version 2 added `messages.reprocessed` and, later under the same version number,
/// `messages.control_id_reused` (and the `rejected` table, created by [`SCHEMA`]). The two
/// columns were added by two statements outside a transaction, so a file can have the first
/// without the second (made between those releases, or interrupted between the two): each
/// column is looked for on its own.
fn migrate_to_v2(conn: &Connection) -> rusqlite::Result<()> {
    for (column, add) in [
        (
            "reprocessed",
            "ALTER TABLE messages ADD COLUMN reprocessed INTEGER NOT NULL DEFAULT 0",
        ),
        (
            "control_id_reused",
            "ALTER TABLE messages ADD COLUMN control_id_reused INTEGER NOT NULL DEFAULT 0",
        ),
    ] {
        if !has_column(conn, "messages", column)? {
            conn.execute_batch(add)?;
            info!(column, "outbox: column added to messages");
        }
    }
    Ok(())
}

/// `messages.truncated_bytes` (bytes of a device line cut at `max_message_bytes`), added
/// within version 5: older builds write rows without it (the default, 0, is right for them)
/// and ignore it when reading.
fn add_truncated_bytes(conn: &Connection) -> rusqlite::Result<()> {
    if !has_column(conn, "messages", "truncated_bytes")? {
        conn.execute_batch(
            "ALTER TABLE messages ADD COLUMN truncated_bytes INTEGER NOT NULL DEFAULT 0",
        )?;
        info!(
            column = "truncated_bytes",
            "outbox: column added to messages"
        );
    }
    Ok(())
}

fn has_column(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    Ok(conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
        params![table, column],
        |r| r.get::<_, i64>(0),
    )? > 0)
}

/// Version 3 replaced the keyed `dedup` table (random-order inserts) with the append-only
/// `dedup_log` (created by [`SCHEMA`]) and an in-memory index; carry the keys over, in one
/// transaction that also drops the old table.
fn migrate_to_v3(conn: &Connection) -> rusqlite::Result<()> {
    let has_old_dedup: bool = conn.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'dedup'",
        [],
        |r| r.get::<_, i64>(0),
    )? > 0;
    if !has_old_dedup {
        return Ok(());
    }
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

/// Version 4 added the `held` table: one row per message set aside because its record cannot
/// be published (too large, refused for good, or unbuildable). `row_id` is `messages.id`;
/// `detail` never holds message content. Idempotent: a file that has the table is unchanged.
/// Runs at every open, so a file already at version 5 that was made without the table (by a
/// build that had version 5 but not version 4) gains it too.
fn migrate_to_v4(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS held (
            row_id   INTEGER PRIMARY KEY,
            reason   TEXT    NOT NULL,
            detail   TEXT    NOT NULL,
            since_us INTEGER NOT NULL
        );",
    )
}

/// `meta` key set by the version-5 step once the delivery state has been moved.
const STATE_MOVED_KEY: &str = "delivery_state_moved";

/// Version 5 keeps delivery state apart from message content: `pending(id, size)` holds a row
/// per undelivered message and `delivered(n, id, delivered_at_us)` logs deliveries in the order
/// they happened (both created by [`SCHEMA`]), so recording a PUBACK never rewrites a message.
/// A file from before has `messages.state` and `messages.delivered_at_us`: their values are
/// copied into the two tables and the two partial indexes on them dropped, in one transaction
/// that also leaves a marker in `meta` (so the step never runs twice) and the row-id high-water
/// mark. The two columns stay in such a file, unused: dropping them would rewrite every row,
/// i.e. the whole store, at start (impossible on the full disk this change is for).
///
/// Independent of version 4: it reads and writes only `messages`, `pending`, `delivered` and
/// `meta`. A version-4 file's held rows are undelivered (`state = 0`), so they get their
/// `pending` row like any other and stay held (`held` names them by id).
fn migrate_to_v5(conn: &Connection) -> rusqlite::Result<()> {
    if !has_column(conn, "messages", "state")? {
        return Ok(());
    }
    let moved: bool = conn.query_row(
        "SELECT COUNT(*) FROM meta WHERE key = ?1",
        params![STATE_MOVED_KEY],
        |r| r.get::<_, i64>(0),
    )? > 0;
    if moved {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        let pending = conn.execute(
            "INSERT OR IGNORE INTO pending (id, size) \
             SELECT id, size FROM messages WHERE state = 0 ORDER BY id",
            [],
        )?;
        let delivered = conn.execute(
            "INSERT INTO delivered (id, delivered_at_us) \
             SELECT id, COALESCE(delivered_at_us, 0) FROM messages WHERE state <> 0 \
             AND id NOT IN (SELECT id FROM delivered) ORDER BY delivered_at_us, id",
            [],
        )?;
        conn.execute_batch(
            "DROP INDEX IF EXISTS messages_pending; DROP INDEX IF EXISTS messages_delivered;",
        )?;
        conn.execute(
            "INSERT INTO meta (key, value) \
             SELECT ?1, CAST(COALESCE(MAX(id), 0) AS TEXT) FROM messages WHERE 1 \
             ON CONFLICT(key) DO UPDATE SET value = \
               MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
            params![super::writer::LAST_ROW_ID_KEY],
        )?;
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, '5')",
            params![STATE_MOVED_KEY],
        )?;
        Ok::<_, rusqlite::Error>((pending, delivered))
    })();
    match result {
        Ok((pending, delivered)) => {
            conn.execute_batch("COMMIT")?;
            info!(
                pending,
                delivered, "outbox: delivery state moved out of messages (version 5)"
            );
            Ok(())
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{keyed, msg, opts};
    use super::super::{NewMessage, Outbox, content_hash, now_us};
    use super::*;

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
    async fn a_version_3_file_gains_the_held_table_and_opening_again_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        {
            let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
            ob.append(msg("a", "x")).await.unwrap();
            drop(ob);
            w.join();
        }
        let c = Connection::open(&path).unwrap();
        c.execute_batch("DROP TABLE held; PRAGMA user_version = 3;")
            .unwrap();
        drop(c);
        let version = |p: &Path| -> i64 {
            Connection::open(p)
                .unwrap()
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap()
        };
        for _ in 0..2 {
            let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
            assert!(ob.reader().unwrap().held(None, false).unwrap().is_empty());
            assert_eq!(
                ob.reader()
                    .unwrap()
                    .pending_after(0, 10, u64::MAX)
                    .unwrap()
                    .len(),
                1
            );
            drop(ob);
            w.join();
            assert_eq!(version(&path), SCHEMA_VERSION);
        }
    }

    fn user_version(p: &Path) -> i64 {
        Connection::open(p)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    fn hold(row_id: i64) -> super::super::Hold {
        super::super::Hold {
            row_id,
            reason: super::super::HoldReason::Refused,
            detail: "reason code 0x87".into(),
        }
    }

    /// A version-5 file (no `messages.peer_certificate`) gets the column; its rows read as
    /// having no certificate, and new rows keep theirs.
    #[tokio::test]
    async fn a_version_5_file_gets_the_peer_certificate_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        {
            let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
            ob.append(msg("a", "old")).await.unwrap();
            drop(ob);
            w.join();
        }
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "ALTER TABLE messages DROP COLUMN peer_certificate; PRAGMA user_version = 5;",
        )
        .unwrap();
        assert!(!has_column(&c, "messages", "peer_certificate").unwrap());
        drop(c);
        let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
        assert_eq!(user_version(&path), SCHEMA_VERSION);
        ob.append(NewMessage {
            peer_certificate: Some("CN=pas".into()),
            ..msg("a", "new")
        })
        .await
        .unwrap();
        let rows = ob.reader().unwrap().pending_after(0, 10, u64::MAX).unwrap();
        let certs: Vec<_> = rows.iter().map(|r| r.peer_certificate.as_deref()).collect();
        assert_eq!(certs, [None, Some("CN=pas")]);
        drop(ob);
        w.join();
    }

    /// A file made by a build that had version 5 but not version 4 (the two were written in
    /// parallel): stamped 5, no `held` table. Opening it creates the table (the version-4 step
    /// runs at every open, whatever the stamp), and holding, listing, skipping and releasing
    /// work, across a reopen too.
    #[tokio::test]
    async fn a_version_5_file_made_without_the_held_table_gets_a_working_one() {
        use super::super::HoldOutcome;
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        {
            let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
            for body in ["one", "two", "three"] {
                ob.append(msg("a", body)).await.unwrap();
            }
            ob.mark_delivered(vec![1]).await;
            ob.flush().await;
            drop(ob);
            w.join();
        }
        let c = Connection::open(&path).unwrap();
        c.execute_batch("DROP TABLE held; PRAGMA user_version = 5;")
            .unwrap();
        drop(c);
        assert_eq!(user_version(&path), 5);
        {
            let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
            let r = ob.reader().unwrap();
            assert!(r.held(None, false).unwrap().is_empty());
            assert_eq!(ob.hold(hold(2)).await.unwrap(), HoldOutcome::Held);
            assert_eq!(ob.hold(hold(1)).await.unwrap(), HoldOutcome::NotPending);
            let pending: Vec<i64> = r
                .pending_after(0, 10, u64::MAX)
                .unwrap()
                .iter()
                .map(|p| p.row_id)
                .collect();
            assert_eq!(pending, [3]);
            assert_eq!(r.row_state(2).unwrap(), Some("held"));
            drop(ob);
            w.join();
        }
        assert_eq!(user_version(&path), SCHEMA_VERSION);
        let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
        let g = ob.gauges();
        assert_eq!(g.held_count.load(Ordering::Relaxed), 1);
        assert_eq!(g.held_bytes.load(Ordering::Relaxed), 3);
        assert_eq!(g.pending_count.load(Ordering::Relaxed), 2);
        let r = ob.reader().unwrap();
        let held = r.held(None, true).unwrap();
        assert_eq!(
            (
                held[0].row_id,
                held[0].reason.as_str(),
                held[0].raw.as_slice()
            ),
            (2, "refused", &b"two"[..])
        );
        assert_eq!(ob.unhold(None).await.unwrap().row_ids, [2]);
        assert_eq!(r.pending_after(0, 10, u64::MAX).unwrap().len(), 2);
        assert_eq!(r.row_state(2).unwrap(), Some("pending"));
        drop(ob);
        w.join();
    }

    /// A file from the `held` build (version 4): delivery state still in `messages.state`, a
    /// held row, and a stale hold on a delivered row. Opening it moves the state (the held row
    /// gets its `pending` row like any undelivered row and stays held), drops the stale hold,
    /// and the held row is never read as pending nor pruned.
    #[tokio::test]
    async fn a_version_4_file_keeps_its_held_rows_held_when_its_state_moves() {
        use std::sync::atomic::Ordering;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL;
             CREATE TABLE messages (id INTEGER PRIMARY KEY, record_id TEXT NOT NULL,
               feed TEXT NOT NULL, seq INTEGER NOT NULL, received_at_us INTEGER NOT NULL,
               source_kind TEXT NOT NULL, peer TEXT, format TEXT NOT NULL, control_id TEXT,
               size INTEGER NOT NULL, raw BLOB NOT NULL, state INTEGER NOT NULL DEFAULT 0,
               delivered_at_us INTEGER, reprocessed INTEGER NOT NULL DEFAULT 0,
               control_id_reused INTEGER NOT NULL DEFAULT 0);
             CREATE INDEX messages_pending ON messages(id) WHERE state = 0;
             CREATE INDEX messages_delivered ON messages(delivered_at_us) WHERE state = 1;
             CREATE TABLE feed_seq (feed TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
             CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE held (row_id INTEGER PRIMARY KEY, reason TEXT NOT NULL,
               detail TEXT NOT NULL, since_us INTEGER NOT NULL);
             INSERT INTO messages (id, record_id, feed, seq, received_at_us, source_kind,
               format, size, raw, state, delivered_at_us)
               VALUES (1, 'r1', 'a', 1, 1, 'mllp', 'hl7v2', 3, X'616263', 1, 1796000000000005),
                      (2, 'r2', 'a', 2, 2, 'mllp', 'hl7v2', 3, X'646566', 0, NULL),
                      (3, 'r3', 'a', 3, 3, 'mllp', 'hl7v2', 3, X'676869', 0, NULL);
             INSERT INTO held VALUES (2, 'too_large', 'record 3 bytes, limit 2', 1796000000000007),
                                     (1, 'refused', 'stale', 6);
             PRAGMA user_version = 4;",
        )
        .unwrap();
        drop(c);
        let prune_all = super::super::OutboxOptions {
            retain_delivered: Duration::ZERO,
            ..opts(1 << 20)
        };
        for _ in 0..2 {
            let (ob, w) = Outbox::open(&path, prune_all.clone()).unwrap();
            let g = ob.gauges();
            assert_eq!(g.held_count.load(Ordering::Relaxed), 1);
            assert_eq!(g.pending_count.load(Ordering::Relaxed), 2);
            ob.prune().await;
            ob.flush().await;
            let r = ob.reader().unwrap();
            let pending: Vec<i64> = r
                .pending_after(0, 10, u64::MAX)
                .unwrap()
                .iter()
                .map(|p| p.row_id)
                .collect();
            assert_eq!(pending, [3]);
            let held = r.held(None, false).unwrap();
            assert_eq!(held.len(), 1);
            assert_eq!(
                (held[0].row_id, held[0].reason.as_str(), held[0].since_us),
                (2, "too_large", 1_796_000_000_000_007)
            );
            assert_eq!(r.row_state(1).unwrap(), None, "delivered row 1 pruned");
            assert_eq!(r.row_state(2).unwrap(), Some("held"));
            assert_eq!(r.row_state(3).unwrap(), Some("pending"));
            drop(ob);
            w.join();
            assert_eq!(user_version(&path), SCHEMA_VERSION);
        }
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

    /// A file from between the two version-2 releases: `reprocessed` present, but not
    /// `control_id_reused` (or one interrupted between the two ALTERs), with its delivery state
    /// still in `messages`. Opening it adds the missing column (every insert used to fail),
    /// moves the state into `pending` and `delivered`, and keeps ids increasing.
    #[tokio::test]
    async fn a_version_2_file_missing_control_id_reused_is_completed_and_its_state_moved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL;
             CREATE TABLE messages (id INTEGER PRIMARY KEY, record_id TEXT NOT NULL,
               feed TEXT NOT NULL, seq INTEGER NOT NULL, received_at_us INTEGER NOT NULL,
               source_kind TEXT NOT NULL, peer TEXT, format TEXT NOT NULL, control_id TEXT,
               size INTEGER NOT NULL, raw BLOB NOT NULL, state INTEGER NOT NULL DEFAULT 0,
               delivered_at_us INTEGER);
             CREATE INDEX messages_pending ON messages(id) WHERE state = 0;
             CREATE INDEX messages_delivered ON messages(delivered_at_us) WHERE state = 1;
             CREATE TABLE feed_seq (feed TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
             CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             ALTER TABLE messages ADD COLUMN reprocessed INTEGER NOT NULL DEFAULT 0;
             INSERT INTO messages (id, record_id, feed, seq, received_at_us, source_kind,
               format, size, raw, state, delivered_at_us)
               VALUES (1, 'r1', 'a', 1, 1, 'mllp', 'hl7v2', 3, X'616263', 1, 1796000000000005),
                      (2, 'r2', 'a', 2, 2, 'mllp', 'hl7v2', 3, X'646566', 0, NULL);
             PRAGMA user_version = 2;",
        )
        .unwrap();
        drop(c);
        for reopen in 0..2 {
            let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
            let r = ob.reader().unwrap();
            let pending: Vec<(i64, Vec<u8>)> = r
                .pending_after(0, 10, u64::MAX)
                .unwrap()
                .into_iter()
                .map(|p| (p.row_id, p.raw))
                .collect();
            let expect_pending: Vec<(i64, Vec<u8>)> = if reopen == 0 {
                vec![(2, b"def".to_vec())]
            } else {
                vec![(2, b"def".to_vec()), (3, b"x".to_vec())]
            };
            assert_eq!(pending, expect_pending);
            let stats = r.stats().unwrap();
            assert_eq!((stats[0].delivered, stats[0].delivered_bytes), (1, 3));
            if reopen == 0 {
                // Inserting works again (it failed on the missing column), with the next id.
                let s = ob.append(msg("a", "x")).await.unwrap();
                assert_eq!((s.row_id, s.seq), (3, 3));
            }
            drop(ob);
            w.join();
        }
        let c = Connection::open(&path).unwrap();
        assert!(has_column(&c, "messages", "control_id_reused").unwrap());
        let version: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let old_indexes: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name IN ('messages_pending', 'messages_delivered')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old_indexes, 0);
        let logged: Vec<(i64, i64)> = c
            .prepare("SELECT id, delivered_at_us FROM delivered")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            logged,
            [(1, 1_796_000_000_000_005)],
            "moved once, not twice"
        );
    }
}
