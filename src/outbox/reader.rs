//! Read-only queries: pending rows for the sink (never held ones: a held row keeps its `pending`
//! row, and every pending read skips the ids in `held`), rows of a feed for a replay, held and
//! quarantine listings, per-feed statistics, `meta` values. Each [`Reader`] has its own
//! read-only connection; WAL lets it read while the writer writes.

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
    /// MLLP over TLS: the subject of the sender's client certificate.
    pub peer_certificate: Option<String>,
    /// Format.
    pub format: Format,
    /// Raw bytes.
    pub raw: Vec<u8>,
    /// Released from quarantine by a retry.
    pub reprocessed: bool,
    /// Same sender and control id as an earlier message, different content.
    pub control_id_reused: bool,
    /// Device lines: bytes dropped past `max_message_bytes` (0: whole).
    pub truncated_bytes: u64,
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

/// A held row: the message set aside and why (see `held.rs`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeldRow {
    /// Row id (`messages.id`): the id `siterelay queue held` commands take.
    pub row_id: i64,
    /// Feed name.
    pub feed: String,
    /// The record's `seq` in its feed.
    pub seq: u64,
    /// The record's `id`.
    pub record_id: String,
    /// Receive time (µs since epoch).
    pub received_at_us: i64,
    /// `too_large`, `refused` or `unbuildable`.
    pub reason: String,
    /// What exactly (sizes, limits, reason codes; no message content).
    pub detail: String,
    /// Held since (µs since epoch).
    pub since_us: i64,
    /// MSH-10 or equivalent, when known.
    pub control_id: Option<String>,
    /// Size of the stored message in bytes.
    pub size: u64,
    /// The bytes as received (patient data: never logged); empty unless asked for.
    #[serde(skip)]
    pub raw: Vec<u8>,
}

/// Columns of a [`PendingRow`] (from `messages m`), in [`row_to_pending`] order.
const PENDING_COLUMNS: &str = "m.id, m.record_id, m.feed, m.seq, m.received_at_us, \
     m.source_kind, m.peer, m.format, m.raw, m.reprocessed, m.control_id_reused, \
     m.truncated_bytes, m.peer_certificate";

/// A `pending p` row that is not held (held rows keep their `pending` row: they are undelivered,
/// but the sink does not read them).
const NOT_HELD: &str = "NOT EXISTS (SELECT 1 FROM held h WHERE h.row_id = p.id)";

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
        truncated_bytes: r.get::<_, i64>(11)? as u64,
        peer_certificate: r.get(12)?,
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
            .prepare_cached(&format!(
                "SELECT {PENDING_COLUMNS} FROM pending p CROSS JOIN messages m ON m.id = p.id \
                 WHERE p.id > ?1 AND {NOT_HELD} ORDER BY p.id LIMIT ?2"
            ))
            .map_err(sqlite(&self.path))?;
        let rows = stmt
            .query_map(params![after, limit as i64], row_to_pending)
            .map_err(sqlite(&self.path))?;
        take_within(rows, max_bytes).map_err(sqlite(&self.path))
    }

    /// Pending rows of one feed with `after < id <= upto`, oldest first, never held ones; the
    /// same limits as [`Reader::pending_after`]. For the sink while that feed is set apart from
    /// the others (a refused record of it waiting to be sent again).
    pub fn pending_of_feed(
        &self,
        feed: &str,
        after: i64,
        upto: i64,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Vec<PendingRow>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {PENDING_COLUMNS} FROM pending p CROSS JOIN messages m ON m.id = p.id \
                 WHERE p.id > ?2 AND p.id <= ?3 AND m.feed = ?1 AND {NOT_HELD} \
                 ORDER BY p.id LIMIT ?4"
            ))
            .map_err(sqlite(&self.path))?;
        let rows = stmt
            .query_map(params![feed, after, upto, limit as i64], row_to_pending)
            .map_err(sqlite(&self.path))?;
        take_within(rows, max_bytes).map_err(sqlite(&self.path))
    }

    /// These rows, oldest first, if they are still pending and not held (rows released from
    /// hold, for the sink).
    pub fn pending_rows(&self, ids: &[i64]) -> Result<Vec<PendingRow>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {PENDING_COLUMNS} FROM pending p CROSS JOIN messages m ON m.id = p.id \
                 WHERE p.id = ?1 AND {NOT_HELD}"
            ))
            .map_err(sqlite(&self.path))?;
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut out = Vec::new();
        for id in ids {
            if let Some(row) = stmt
                .query_row(params![id], row_to_pending)
                .optional()
                .map_err(sqlite(&self.path))?
            {
                out.push(row);
            }
        }
        Ok(out)
    }

    /// Held rows, oldest first: one row id, or all (`None`); with the stored bytes only when
    /// `with_raw`.
    pub fn held(&self, which: Option<i64>, with_raw: bool) -> Result<Vec<HeldRow>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT h.row_id, m.feed, m.seq, m.record_id, m.received_at_us, h.reason, \
                 h.detail, h.since_us, m.control_id, m.size, CASE WHEN ?2 THEN m.raw END \
                 FROM held h JOIN messages m ON m.id = h.row_id \
                 WHERE ?1 IS NULL OR h.row_id = ?1 ORDER BY h.row_id",
            )
            .map_err(sqlite(&self.path))?;
        let rows = stmt
            .query_map(params![which, with_raw], |r| {
                Ok(HeldRow {
                    row_id: r.get(0)?,
                    feed: r.get(1)?,
                    seq: r.get::<_, i64>(2)? as u64,
                    record_id: r.get(3)?,
                    received_at_us: r.get(4)?,
                    reason: r.get(5)?,
                    detail: r.get(6)?,
                    since_us: r.get(7)?,
                    control_id: r.get(8)?,
                    size: r.get::<_, i64>(9)? as u64,
                    raw: r.get::<_, Option<Vec<u8>>>(10)?.unwrap_or_default(),
                })
            })
            .map_err(sqlite(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(sqlite(&self.path))
    }

    /// Where a row stands: `delivered`, `held`, `pending`, or `None` when it is not stored
    /// (pruned, or never was). A held row is still in `pending`; a stored row that is not in
    /// `pending` has been delivered (its id is in the `delivered` log until both are pruned
    /// together), which this reads without scanning that log.
    pub fn row_state(&self, id: i64) -> Result<Option<&'static str>, OutboxError> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM pending WHERE id = ?1), \
                 EXISTS (SELECT 1 FROM held WHERE row_id = ?1) FROM messages WHERE id = ?1",
                params![id],
                |r| {
                    Ok(match (r.get::<_, bool>(0)?, r.get::<_, bool>(1)?) {
                        (_, true) => "held",
                        (true, false) => "pending",
                        (false, false) => "delivered",
                    })
                },
            )
            .optional()
            .map_err(sqlite(&self.path))
    }

    /// How many rows each feed has held, by feed name.
    pub fn held_per_feed(&self) -> Result<Vec<(String, u64)>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT m.feed, COUNT(*) FROM held h JOIN messages m ON m.id = h.row_id \
                 GROUP BY m.feed ORDER BY m.feed",
            )
            .map_err(sqlite(&self.path))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .map_err(sqlite(&self.path))?;
        rows.collect::<Result<_, _>>().map_err(sqlite(&self.path))
    }

    /// A value from `meta`.
    pub fn meta(&self, key: &str) -> Result<Option<String>, OutboxError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(sqlite(&self.path))
    }

    /// Receive time (µs) of the oldest pending message that is not held (a held message waits
    /// for a person, not for the broker; health lists it apart).
    pub fn oldest_pending_us(&self) -> Result<Option<i64>, OutboxError> {
        self.conn
            .query_row(
                &format!(
                    "SELECT m.received_at_us FROM pending p CROSS JOIN messages m ON m.id = p.id \
                     WHERE {NOT_HELD} ORDER BY p.id LIMIT 1"
                ),
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
            .prepare_cached(&format!(
                "SELECT {PENDING_COLUMNS} FROM messages m WHERE m.feed = ?1 AND m.seq >= ?2 \
                 ORDER BY m.id LIMIT ?3"
            ))
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
                   MIN(CASE WHEN p.id IS NOT NULL THEN m.received_at_us END), MAX(m.seq), \
                   COUNT(h.row_id) \
                 FROM messages m LEFT JOIN pending p ON p.id = m.id \
                 LEFT JOIN held h ON h.row_id = m.id \
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
                    held: r.get::<_, i64>(7)? as u64,
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
    /// Held messages (included in `pending`).
    pub held: u64,
}

/// Rows in order until their raw bytes reach `max_bytes` (at least one row if there is any).
fn take_within(
    rows: impl Iterator<Item = rusqlite::Result<PendingRow>>,
    max_bytes: u64,
) -> rusqlite::Result<Vec<PendingRow>> {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    for row in rows {
        let row = row?;
        bytes += row.raw.len() as u64;
        out.push(row);
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(out)
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
