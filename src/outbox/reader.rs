//! Read-only queries: pending rows for the sink, rows of a feed for a replay, quarantine
//! listings, per-feed statistics, `meta` values. Each [`Reader`] has its own read-only
//! connection; WAL lets it read while the writer writes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::{Format, OutboxError, SourceKind, now_us, sqlite};

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
    /// Size in bytes, as received.
    pub size: u64,
    /// Only the first bytes were kept (a frame that is not HL7 at all; see
    /// `QUARANTINE_JUNK_KEEP`): `raw` is shorter than `size`.
    pub truncated: bool,
    /// The bytes as received, or their beginning when `truncated` (patient data: never logged).
    #[serde(skip)]
    pub raw: Vec<u8>,
}

fn row_to_quarantined(r: &rusqlite::Row<'_>) -> rusqlite::Result<QuarantinedRow> {
    let size = r.get::<_, i64>(9)? as u64;
    let raw: Vec<u8> = r.get(10)?;
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
        size,
        truncated: (raw.len() as u64) < size,
        raw,
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
                "SELECT m.id, m.record_id, m.feed, m.seq, m.received_at_us, m.source_kind, m.peer, \
                 m.format, m.raw, m.reprocessed, m.control_id_reused \
                 FROM pending p CROSS JOIN messages m ON m.id = p.id \
                 WHERE p.id > ?1 ORDER BY p.id LIMIT ?2",
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
                "SELECT m.received_at_us FROM pending p CROSS JOIN messages m ON m.id = p.id \
                 ORDER BY p.id LIMIT 1",
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
                "SELECT m.feed, \
                   COUNT(p.id), COALESCE(SUM(p.size), 0), \
                   COUNT(*) - COUNT(p.id), SUM(m.size) - COALESCE(SUM(p.size), 0), \
                   MIN(CASE WHEN p.id IS NOT NULL THEN m.received_at_us END), MAX(m.seq) \
                 FROM messages m LEFT JOIN pending p ON p.id = m.id \
                 GROUP BY m.feed ORDER BY m.feed",
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
                "SELECT d.delivered_at_us - m.received_at_us \
                 FROM delivered d CROSS JOIN messages m ON m.id = d.id \
                 WHERE m.received_at_us >= ?1",
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
    use super::super::Outbox;
    use super::super::test_support::{msg, opts};

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
}
