//! Retention: what is deleted, and when. Run by the writer thread after a group holding a
//! `Prune` command has committed (a timer in the daemon sends one); never touches a pending row,
//! nor a held one.
//!
//! - Delivered messages once `delivered_at_us` is older than `retain_delivered`, and, while the
//!   rows' bytes exceed `max_bytes`, the oldest delivered ones regardless of age; in chunks of
//!   [`PRUNE_CHUNK`] rows per transaction, so pruning never holds the write lock for long. Each
//!   chunk first raises every feed's `feed_seq` floor, so `seq` never restarts.
//! - Duplicate-detection keys older than the longest window (`dedup_keep`), from `dedup_log`
//!   and from the in-memory index.
//! - Quarantined messages older than `retain_rejected`.
//!
//! Then `PRAGMA incremental_vacuum` gives the freed pages back to the file system.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tracing::info;

use super::now_us;
use super::writer::WriterState;

/// Rows deleted per pruning transaction, so pruning never holds the write lock for long.
const PRUNE_CHUNK: usize = 2000;

/// Delete delivered rows past retention, then oldest delivered rows while the file's rows exceed
/// `max_bytes`; then old duplicate keys and old quarantined messages. Never touches pending rows.
pub(super) fn run(conn: &mut Connection, state: &mut WriterState) -> rusqlite::Result<()> {
    let cutoff = now_us() - state.opts.retain_delivered.as_micros() as i64;
    let mut removed = 0u64;
    loop {
        let over_cap = state.total_bytes > state.opts.max_bytes;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
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
        // Delivered rows only, and never a held one (a held row is undelivered; the second
        // condition keeps that true whatever marks a row delivered).
        let freed: i64 = tx.query_row(
            "WITH doomed AS (SELECT id, size FROM messages WHERE state = 1 AND \
             (delivered_at_us < ?1 OR ?2) AND id NOT IN (SELECT row_id FROM held) \
             ORDER BY delivered_at_us LIMIT ?3) \
             SELECT COALESCE(SUM(size), 0) FROM doomed",
            params![cutoff, over_cap, PRUNE_CHUNK as i64],
            |r| r.get(0),
        )?;
        let n = tx.execute(
            "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE state = 1 AND \
             (delivered_at_us < ?1 OR ?2) AND id NOT IN (SELECT row_id FROM held) \
             ORDER BY delivered_at_us LIMIT ?3)",
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_support::{keyed, msg, opts};
    use super::super::{Outbox, OutboxOptions};
    use super::*;

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
}
