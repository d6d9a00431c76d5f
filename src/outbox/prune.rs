//! Retention: what is deleted, and when. Run by the writer thread after a group holding a
//! `Prune` command has committed (a timer in the daemon sends one every 5 minutes), and at once
//! when space is short or the store is over its cap; never touches a pending row, nor a held
//! one (held rows are pending; the delete also checks both, whatever the delivery log says).
//!
//! - Delivered messages, oldest delivery first (the `delivered` log's order), once delivered
//!   longer than `retain_delivered` ago; and, **under pressure**, regardless of age: while the
//!   disk is short of space (until the file system has room for the reserve again) or the
//!   store is over `max_bytes` (until it is under). `retain_delivered` is a maximum, not a
//!   promise: rows pruned early are counted (`pruned_early` in health) and logged. In chunks
//!   ([`PRUNE_CHUNK`] rows per transaction, [`PRESSURE_CHUNK`] under pressure, when every WAL
//!   page may be borrowed from the reserve), so pruning never holds the write lock for long.
//!   Each chunk first raises every feed's `feed_seq` floor and the row-id high-water mark, so
//!   neither `seq` nor row ids ever restart.
//! - Duplicate-detection keys older than the longest window (`dedup_keep`), from `dedup_log`
//!   and from the in-memory index.
//! - Quarantined messages older than `retain_rejected` (never early: quarantine has its own
//!   budget instead).
//!
//! Then the freed pages go back to the file system ([`space::vacuum`]).

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tracing::{info, warn};

use super::space;
use super::writer::{LAST_REJECTED_ID_KEY, LAST_ROW_ID_KEY, WriterState, record_high_water};

/// Rows deleted per pruning transaction, so pruning never holds the write lock for long.
const PRUNE_CHUNK: usize = 2000;
/// Rows deleted per transaction under pressure (each transaction's WAL pages may have to fit
/// in the reserve).
const PRESSURE_CHUNK: usize = 100;

/// Whether delivered rows must go regardless of age: short of space and not yet enough free,
/// or over the cap.
fn under_pressure(conn: &Connection, state: &WriterState) -> rusqlite::Result<bool> {
    if state.space.is_short() {
        let (_, free, size) = space::page_counts(conn)?;
        return Ok(!state.space.enough(free * size));
    }
    Ok(space::used_bytes(conn, &state.wal)? > state.opts.max_bytes)
}

/// Delete delivered rows past retention (or, under pressure, oldest first regardless of age);
/// then old duplicate keys and old quarantined messages; then give the space back. Never
/// touches pending rows.
pub(super) fn run(conn: &mut Connection, state: &mut WriterState) -> rusqlite::Result<()> {
    // A step since the last group moves the stamps first: ages are then measured sensibly.
    state.check_clock(conn);
    let now = state.now_us();
    let cutoff = now - state.opts.retain_delivered.as_micros() as i64;
    let mut removed = 0u64;
    let mut early = 0u64;
    let mut pressed = false;
    loop {
        let pressure = under_pressure(conn, state)?;
        pressed |= pressure;
        let chunk = if pressure {
            PRESSURE_CHUNK
        } else {
            PRUNE_CHUNK
        };
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let due: Vec<(i64, i64, i64)> = {
            let mut stmt = tx.prepare_cached(
                "SELECT n, id, delivered_at_us FROM delivered ORDER BY n LIMIT ?1",
            )?;
            let rows = stmt.query_map(params![chunk as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
            let mut due = Vec::new();
            for row in rows {
                let row: (i64, i64, i64) = row?;
                if !(pressure || row.2 < cutoff) {
                    break;
                }
                due.push(row);
            }
            due
        };
        let Some(&(last_n, _, _)) = due.last() else {
            break;
        };
        // Record each feed's last seq and the highest row id before rows go, so neither
        // restarts.
        {
            let mut floor = tx.prepare_cached(
                "INSERT INTO feed_seq (feed, last_seq) VALUES (?1, ?2) \
                 ON CONFLICT(feed) DO UPDATE SET last_seq = MAX(last_seq, excluded.last_seq)",
            )?;
            for (feed, seq) in &state.last_seq {
                floor.execute(params![&**feed, *seq as i64])?;
            }
        }
        record_high_water(&tx, LAST_ROW_ID_KEY, state.next_id - 1)?;
        let mut freed = 0u64;
        let mut gone_early = 0u64;
        {
            // Delivered rows only, and never a held or pending one: a held row is undelivered
            // (it keeps its `pending` row), and these conditions keep that true whatever put an
            // id into the delivery log. Such an id's log entry goes; its message stays.
            let mut delete = tx.prepare_cached(
                "DELETE FROM messages WHERE id = ?1 \
                 AND NOT EXISTS (SELECT 1 FROM pending WHERE id = ?1) \
                 AND NOT EXISTS (SELECT 1 FROM held WHERE row_id = ?1) RETURNING size",
            )?;
            for &(_, id, at) in &due {
                let size: Option<i64> = delete.query_row(params![id], |r| r.get(0)).optional()?;
                if let Some(size) = size {
                    freed += size as u64;
                    gone_early += u64::from(at >= cutoff);
                }
            }
        }
        tx.execute("DELETE FROM delivered WHERE n <= ?1", params![last_n])?;
        tx.commit()?;
        state.total_bytes = state.total_bytes.saturating_sub(freed);
        removed += due.len() as u64;
        early += gone_early;
        if due.len() < chunk && !pressure {
            break;
        }
        if pressure {
            // Give the pages back as we go: under pressure the file system needs them.
            space::vacuum(conn, true)?;
        }
    }
    // Duplicate keys older than the longest window: the log is in time order, so find the first
    // row to keep (reading only the rows that go) and delete everything before it.
    let dedup_cutoff = now - state.opts.dedup_keep.as_micros() as i64;
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
    state.dedup.expire_before(first_kept);
    let rejected_cutoff = now - state.opts.retain_rejected.as_micros() as i64;
    {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let gone: i64 = tx.query_row(
            "SELECT COUNT(*) FROM rejected WHERE received_at_us < ?1",
            params![rejected_cutoff],
            |r| r.get(0),
        )?;
        if gone > 0 {
            record_high_water(&tx, LAST_REJECTED_ID_KEY, state.next_rejected_id - 1)?;
            let bytes: i64 = tx.query_row(
                "SELECT COALESCE(SUM(length(raw)), 0) FROM rejected WHERE received_at_us < ?1",
                params![rejected_cutoff],
                |r| r.get(0),
            )?;
            tx.execute(
                "DELETE FROM rejected WHERE received_at_us < ?1",
                params![rejected_cutoff],
            )?;
            tx.commit()?;
            state.quarantine_bytes = state.quarantine_bytes.saturating_sub(bytes as u64);
            removed += gone as u64;
        }
    }
    if removed > 0 || pressed {
        // With secure_delete, the WAL still holds the frames that wrote the deleted rows until
        // they are overwritten: truncate it.
        let truncate =
            pressed || state.space.is_short() || (removed > 0 && state.opts.secure_delete);
        let pages = space::vacuum(conn, truncate)?;
        info!(removed, pages_returned = pages, "pruned");
    }
    if early > 0 {
        state.pruned_early += early;
        state.retention_cut_at_us = now;
        warn!(
            rows = early,
            short_of_space = state.space.is_short(),
            "delivered records pruned before retain_delivered to make room (retention is a \
             maximum, not a promise)"
        );
    }
    state.measure(conn);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::now_us;
    use super::super::test_support::{keyed, msg, opts};
    use super::super::{Outbox, OutboxOptions};
    use super::*;

    /// How many times `needle` occurs in the database file and its WAL, read as raw bytes.
    fn occurrences_on_disk(db: &std::path::Path, needle: &[u8]) -> usize {
        let mut n = 0;
        for p in [db.to_path_buf(), db.with_extension("sqlite-wal")] {
            if let Ok(bytes) = std::fs::read(&p) {
                n += memchr::memmem::find_iter(&bytes, needle).count();
            }
        }
        n
    }

    /// Store 200 messages naming a (synthetic) patient, deliver them, prune them: returns how
    /// often the surname is still in the file and its WAL, with the writer still running.
    async fn surname_left_after_prune(secure_delete: bool) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.sqlite");
        let (ob, w) = Outbox::open(
            &path,
            OutboxOptions {
                secure_delete,
                ..no_retention(1 << 30)
            },
        )
        .unwrap();
        let mut ids = Vec::new();
        for i in 0..200 {
            // Every fourth one large enough for overflow pages, the name near its end.
            let pad = if i % 4 == 0 {
                "x".repeat(20_000)
            } else {
                String::new()
            };
            let body = format!(
                "MSH|^~\\&|PAS|RXX|HUB|RXX|20261130093000||ADT^A01|C{i}|P|2.4\r\
                 NTE|1||{pad}\r\
                 PID|1||9990000018^^^NHS^NH||QUILLFEATHERSTONE^ADA||19800615|F\r"
            );
            ids.push(ob.append(msg("a", &body)).await.unwrap().row_id);
        }
        let before = occurrences_on_disk(&path, b"QUILLFEATHERSTONE");
        assert!(before >= 200, "the messages were stored ({before} copies)");
        ob.mark_delivered(ids).await;
        ob.flush().await;
        ob.prune().await;
        ob.flush().await;
        assert!(ob.reader().unwrap().stats().unwrap().is_empty());
        let left = occurrences_on_disk(&path, b"QUILLFEATHERSTONE");
        drop(ob);
        w.join();
        left
    }

    /// Issue 13: after 200 delivered messages were pruned, a test surname was still in the file
    /// 207 times. With `secure_delete` (the default) not once, in the file or its WAL.
    #[tokio::test]
    async fn pruned_patient_data_is_gone_from_the_file_and_its_wal() {
        assert_eq!(surname_left_after_prune(true).await, 0);
    }

    /// The same with `store.secure_delete = false`: the bytes stay (what the test above guards
    /// against).
    #[tokio::test]
    async fn without_secure_delete_pruned_patient_data_stays_on_disk() {
        assert!(surname_left_after_prune(false).await > 0);
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
                quarantine_max_bytes: (1 << 20) / 10,
                retain_delivered: Duration::ZERO,
                retain_rejected: Duration::from_secs(3600),
                dedup_keep: Duration::ZERO,
                secure_delete: true,
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

    fn no_retention(max_bytes: u64) -> OutboxOptions {
        OutboxOptions {
            max_bytes,
            quarantine_max_bytes: max_bytes / 10,
            retain_delivered: Duration::ZERO,
            retain_rejected: Duration::ZERO,
            dedup_keep: Duration::ZERO,
            secure_delete: true,
        }
    }

    fn rejected_msg() -> super::super::RejectedMessage {
        super::super::RejectedMessage {
            feed: std::sync::Arc::from("a"),
            source_kind: super::super::SourceKind::Mllp,
            peer: None,
            received_at_us: now_us(),
            error_code: 100,
            error_location: None,
            reason: "r".into(),
            control_id: None,
            sending_application: None,
            sending_facility: None,
            message_type: None,
            raw: b"MSH|".to_vec(),
        }
    }

    /// Pruning the newest rows (all of them here) and reopening must not hand their ids out
    /// again: a duplicate-log entry or a central-side reference to an old id would otherwise
    /// name a different message. The same for quarantine ids.
    #[tokio::test]
    async fn row_ids_are_never_reused_after_the_newest_rows_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        {
            let (ob, w) = Outbox::open(&path, no_retention(1 << 20)).unwrap();
            let mut ids = Vec::new();
            for _ in 0..3 {
                ids.push(ob.append(msg("a", "x")).await.unwrap().row_id);
            }
            assert_eq!(ids, [1, 2, 3]);
            ob.mark_delivered(ids).await;
            let q1 = ob.quarantine(rejected_msg()).await.unwrap();
            let q2 = ob.quarantine(rejected_msg()).await.unwrap();
            assert_eq!((q1, q2), (1, 2));
            ob.forget_rejected(q2).await.unwrap();
            ob.prune().await;
            ob.flush().await;
            let r = ob.reader().unwrap();
            assert!(r.stats().unwrap().is_empty(), "every message pruned");
            assert!(
                r.quarantined(None).unwrap().is_empty(),
                "every entry pruned"
            );
            drop(ob);
            w.join();
        }
        let (ob, w) = Outbox::open(&path, no_retention(1 << 20)).unwrap();
        let next = ob.append(msg("a", "x")).await.unwrap();
        assert_eq!((next.row_id, next.seq), (4, 4));
        assert_eq!(ob.quarantine(rejected_msg()).await.unwrap(), 3);
        drop(ob);
        w.join();
    }

    /// Pruning deletes only ids it takes from the delivery log, and even then never a held or
    /// pending message: here the log is made to name a held row (and a pending one), and
    /// pruning under pressure (a cap the rows exceed, no retention) deletes the delivered row
    /// only; the held row stays stored and held, the pending one pending.
    #[tokio::test]
    async fn pruning_under_pressure_never_deletes_a_held_or_pending_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        {
            let (ob, w) = Outbox::open(&path, no_retention(1 << 30)).unwrap();
            for body in ["one", "two", "three"] {
                ob.append(msg("a", body)).await.unwrap();
            }
            ob.hold(super::super::Hold {
                row_id: 2,
                reason: super::super::HoldReason::TooLarge,
                detail: "record 3 bytes, limit 2".into(),
            })
            .await
            .unwrap();
            ob.mark_delivered(vec![1]).await;
            ob.flush().await;
            drop(ob);
            w.join();
        }
        Connection::open(&path)
            .unwrap()
            .execute_batch("INSERT INTO delivered (id, delivered_at_us) VALUES (2, 1), (3, 1);")
            .unwrap();
        // Reopened with a cap the rows exceed: pruning is under pressure.
        let (ob, w) = Outbox::open(&path, no_retention(8)).unwrap();
        ob.prune().await;
        ob.flush().await;
        let r = ob.reader().unwrap();
        assert_eq!(r.row_state(1).unwrap(), None, "the delivered row is pruned");
        assert_eq!(r.row_state(2).unwrap(), Some("held"));
        assert_eq!(r.row_state(3).unwrap(), Some("pending"));
        assert_eq!(r.held(None, true).unwrap()[0].raw, b"two");
        let stats = r.stats().unwrap();
        assert_eq!((stats[0].pending, stats[0].held), (2, 1));
        drop(ob);
        w.join();
    }

    /// Pruned pages go back to the file system: `incremental_vacuum` stepped to the end in
    /// chunks (run through `execute_batch` it frees a single page per call), then a checkpoint
    /// shrinks the file.
    #[tokio::test]
    async fn pruning_gives_the_space_back_to_the_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let (ob, w) = Outbox::open(&path, no_retention(1 << 30)).unwrap();
        let body = "x".repeat(50 * 1024);
        let mut ids = Vec::new();
        for _ in 0..200 {
            ids.push(ob.append(msg("a", &body)).await.unwrap().row_id);
        }
        ob.mark_delivered(ids).await;
        ob.flush().await;
        let c = Connection::open(&path).unwrap();
        let checkpoint = || {
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap()
        };
        let file = || std::fs::metadata(&path).unwrap().len();
        let freelist = || -> i64 {
            c.query_row("PRAGMA freelist_count", [], |r| r.get(0))
                .unwrap()
        };
        checkpoint();
        let before = file();
        // What the old code did: delete, then one execute_batch of the pragma.
        c.execute_batch("DELETE FROM messages WHERE id = 1; DELETE FROM delivered WHERE id = 1;")
            .unwrap();
        let free_after_delete = freelist();
        c.execute_batch("PRAGMA incremental_vacuum;").unwrap();
        let freed_by_one_call = free_after_delete - freelist();
        assert!(free_after_delete > 10, "{free_after_delete}");
        assert_eq!(freed_by_one_call, 1, "execute_batch steps the pragma once");
        ob.prune().await;
        ob.flush().await;
        checkpoint();
        let after = file();
        eprintln!(
            "file {before} -> {after} bytes; freelist after deleting one 50 KiB row: \
             {free_after_delete}, one execute_batch freed {freed_by_one_call}, after pruning: {}",
            freelist()
        );
        assert_eq!(freelist(), 0);
        assert!(before > 10_000_000, "{before}");
        assert!(after < 200_000, "{after}");
        assert!(ob.reader().unwrap().stats().unwrap().is_empty());
        drop(ob);
        w.join();
    }
}
