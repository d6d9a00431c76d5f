//! Duplicate detection: what identifies a resent message, the content fingerprints, and the
//! writer's in-memory index of the latest message per key.
//!
//! The index lives in the writer ([`super::writer`]); it is rebuilt from the append-only
//! `dedup_log` table at open ([`load_index`]) and trimmed by pruning ([`super::prune`]). A
//! lookup never reads the database.

use std::collections::HashMap;
use std::time::Duration;

use rusqlite::{Connection, params};
use tracing::info;

use super::now_us;

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

/// The 64-bit identity of (feed, sender, control id) in the duplicate index (FNV-1a over the
/// three, separated by a byte that cannot occur in them unescaped). A collision between two
/// different keys could only flag `control_id_reused` wrongly, or, with the content hashes also
/// colliding, treat a message as a resend: about 1 in 10^13 for a million keys, then 1 in 2^64.
pub(super) fn dedup_key(feed: &str, sender: &str, control_id: &str) -> u64 {
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

/// The latest stored message with one (feed, sender, control id).
#[derive(Debug, Clone, Copy)]
pub(super) struct DedupEntry {
    pub(super) hash: u64,
    pub(super) row_id: i64,
    pub(super) seq: u64,
    pub(super) at_us: i64,
}

/// How a keyed message relates to the latest stored message with its key.
pub(super) enum Seen {
    /// Nothing with this key within the window: store it.
    New,
    /// Same key and content within the window: a resend of this entry; store nothing, answer
    /// again with the original's `seq` and `record_id`.
    Resend(DedupEntry),
    /// Same key within the window, other content: store it, flagged `control_id_reused`.
    Reused,
}

impl DedupKey {
    /// Compare a message received at `received_at_us` with `prior`, the latest stored message
    /// with the same key (if the index has one).
    pub(super) fn check(&self, prior: Option<DedupEntry>, received_at_us: i64) -> Seen {
        match prior {
            Some(p) if received_at_us - p.at_us <= self.window_us => {
                if p.hash == self.hash {
                    Seen::Resend(p)
                } else {
                    Seen::Reused
                }
            }
            _ => Seen::New,
        }
    }
}

/// Rebuild the index from `dedup_log`: the latest row per key received within `keep` (none
/// when `keep` is zero).
pub(super) fn load_index(
    conn: &Connection,
    keep: Duration,
) -> rusqlite::Result<HashMap<u64, DedupEntry>> {
    let mut dedup = HashMap::new();
    if keep.is_zero() {
        return Ok(dedup);
    }
    let since = now_us() - keep.as_micros() as i64;
    let mut stmt = conn.prepare(
        "SELECT key, hash, row_id, seq, received_at_us FROM dedup_log \
         WHERE received_at_us >= ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map(params![since], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            DedupEntry {
                hash: r.get::<_, i64>(1)? as u64,
                row_id: r.get(2)?,
                seq: r.get::<_, i64>(3)? as u64,
                at_us: r.get(4)?,
            },
        ))
    })?;
    for row in rows {
        let (key, entry) = row?;
        dedup.insert(key, entry);
    }
    if !dedup.is_empty() {
        info!(keys = dedup.len(), "duplicate-detection index loaded");
    }
    Ok(dedup)
}

#[cfg(test)]
mod tests {
    use super::super::Outbox;
    use super::super::test_support::{keyed, opts};
    use super::*;

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
}
