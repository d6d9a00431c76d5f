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
//!
//! Each step is detected from the file itself (a column or a table missing or present), not
//! from the version number, and is safe to run again (`IF NOT EXISTS`); the version is stamped
//! last. A new step is one more `migrate_to_vN` called after the others, and a higher
//! [`SCHEMA_VERSION`].

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, params};
use tracing::{info, warn};

use super::dedup::dedup_key;
use super::{OutboxError, sqlite};

/// The version this build writes; a file with a higher one is refused.
const SCHEMA_VERSION: i64 = 4;

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

/// Open (creating if needed) the database at `path` for the writer: the directory 0700 when
/// created, the file 0600, the schema current.
pub(super) fn open(path: &Path) -> Result<Connection, OutboxError> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    create_private_file(path)?;
    let conn = Connection::open(path).map_err(sqlite(path))?;
    init_schema(&conn, path)?;
    Ok(conn)
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
    conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION};"))
        .map_err(&e)?;
    Ok(())
}

/// Version 2 added `messages.reprocessed` and `messages.control_id_reused` (and the `rejected`
/// table, created by [`SCHEMA`]). Only `reprocessed` is looked for: the two columns are added
/// together (two statements, not one transaction).
fn migrate_to_v2(conn: &Connection) -> rusqlite::Result<()> {
    let has_reprocessed: bool = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('messages') WHERE name = 'reprocessed'",
        [],
        |r| r.get::<_, i64>(0),
    )? > 0;
    if !has_reprocessed {
        conn.execute_batch(
            "ALTER TABLE messages ADD COLUMN reprocessed INTEGER NOT NULL DEFAULT 0; \
             ALTER TABLE messages ADD COLUMN control_id_reused INTEGER NOT NULL DEFAULT 0;",
        )?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::super::test_support::{keyed, msg, opts};
    use super::super::{Outbox, content_hash, now_us};
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
            assert_eq!(version(&path), 4);
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
}
