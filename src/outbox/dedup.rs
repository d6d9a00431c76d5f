//! Duplicate detection: what identifies a resent message, the content fingerprints, and the
//! writer's index of where in `dedup_log` each key is ([`DedupIndex`]).
//!
//! The index lives in the writer ([`super::writer`]); it is rebuilt from the append-only
//! `dedup_log` table at open ([`load_index`]) and trimmed by pruning ([`super::prune`]). A
//! lookup reads the database only for a key that may be there (a resend, a reused control id,
//! or one in 2^32 fingerprints shared), and then one segment of the log by its primary key.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};
use tracing::info;

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

/// Rows of `dedup_log` per segment: the unit in which the index locates a key on disk.
pub(super) const SEGMENT_ROWS: i64 = 1024;

/// The duplicate index in memory. It never holds a whole entry for an old key, only where on
/// disk to look: `dedup_log` is cut into segments of [`SEGMENT_ROWS`] consecutive ids, and for
/// each key of a closed segment the index keeps a 32-bit fingerprint and the segment's number
/// (16 bits), in sorted runs (struct of arrays, exact size: 6 bytes a key). The newest segment,
/// still filling, is kept whole (key -> latest entry, at most [`SEGMENT_ROWS`] of them), so
/// resends soon after the original and senders that reuse one control id are answered from
/// memory.
///
/// A lookup: the newest segment; otherwise the runs give the segments whose keys share the
/// fingerprint, newest first, and each is read exactly on disk (`key = ?` within its id range:
/// at most [`SEGMENT_ROWS`] rows, by the primary key) until the key is found. An ordinary new
/// message costs a few binary searches and no read; a fingerprint shared with another key
/// (about N / 2^32 of lookups with N keys in the window: 0.3% at 12 million) costs one
/// segment read. No index on disk: every append still writes only the log's last page.
///
/// Runs merge like a binary counter (a run is merged into the one before it once it is at
/// least half its size), so there are about log2(N / SEGMENT_ROWS) of them. Pruning drops the
/// segments that left the log.
#[derive(Debug, Default)]
pub(super) struct DedupIndex {
    /// The newest segment (number; key -> log id and entry of its latest row).
    recent_seg: i64,
    recent: HashMap<u64, (i64, DedupEntry)>,
    /// Closed segments, biggest run first.
    runs: Vec<Run>,
    /// The oldest segment still in the log; stored segment numbers are relative to it mod 2^16.
    base_seg: i64,
}

#[derive(Debug, Default)]
struct Run {
    /// Sorted.
    fps: Vec<u32>,
    /// The segment of each fingerprint, as `segment mod 2^16`.
    segs: Vec<u16>,
}

impl Run {
    fn from_pairs(mut packed: Vec<u64>) -> Run {
        packed.sort_unstable();
        let mut fps = Vec::with_capacity(packed.len());
        let mut segs = Vec::with_capacity(packed.len());
        for p in packed {
            fps.push((p >> 16) as u32);
            segs.push(p as u16);
        }
        Run { fps, segs }
    }

    fn merge(a: Run, b: Run) -> Run {
        let n = a.fps.len() + b.fps.len();
        let (mut fps, mut segs) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut i, mut j) = (0, 0);
        while i < a.fps.len() || j < b.fps.len() {
            if j == b.fps.len() || (i < a.fps.len() && a.fps[i] <= b.fps[j]) {
                fps.push(a.fps[i]);
                segs.push(a.segs[i]);
                i += 1;
            } else {
                fps.push(b.fps[j]);
                segs.push(b.segs[j]);
                j += 1;
            }
        }
        Run { fps, segs }
    }

    fn len(&self) -> usize {
        self.fps.len()
    }
}

/// A key's fingerprint: its high 32 bits after a multiplicative mix (the key is already an
/// FNV hash; the mix spreads its bits).
fn fingerprint(key: u64) -> u32 {
    (key.wrapping_mul(MIX) >> 32) as u32
}

/// The fingerprint's mixing constant (2^64 / golden ratio, odd).
const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

fn pack(key: u64, seg: i64) -> u64 {
    u64::from(fingerprint(key)) << 16 | u64::from(seg as u16)
}

impl DedupIndex {
    /// Keys held for closed segments (the newest segment's are in memory whole).
    pub(super) fn len(&self) -> usize {
        self.runs.iter().map(Run::len).sum::<usize>() + self.recent.len()
    }

    /// Bytes of memory the runs take (the newest segment's map aside: at most
    /// [`SEGMENT_ROWS`] entries).
    pub(super) fn heap_bytes(&self) -> usize {
        self.runs
            .iter()
            .map(|r| r.fps.capacity() * 4 + r.segs.capacity() * 2)
            .sum()
    }

    /// Take on a committed `dedup_log` row (in id order).
    pub(super) fn logged(&mut self, log_id: i64, key: u64, entry: DedupEntry) {
        let seg = log_id.div_euclid(SEGMENT_ROWS);
        if seg != self.recent_seg {
            self.close_recent();
            self.recent_seg = seg;
        }
        if self.runs.is_empty() && self.recent.is_empty() {
            self.base_seg = seg;
        }
        self.recent.insert(key, (log_id, entry));
    }

    fn close_recent(&mut self) {
        if self.recent.is_empty() {
            return;
        }
        let seg = self.recent_seg;
        let packed = self.recent.drain().map(|(k, _)| pack(k, seg)).collect();
        self.push_run(Run::from_pairs(packed));
    }

    fn push_run(&mut self, run: Run) {
        self.runs.push(run);
        while self.runs.len() >= 2 {
            let n = self.runs.len();
            if self.runs[n - 1].len() * 2 < self.runs[n - 2].len() {
                break;
            }
            let b = self.runs.pop().unwrap_or_default();
            let a = self.runs.pop().unwrap_or_default();
            self.runs.push(Run::merge(a, b));
        }
    }

    /// The full segment number of a stored one (the live segments span fewer than 2^16).
    fn unwrap_seg(&self, stored: u16) -> i64 {
        self.base_seg + i64::from(stored.wrapping_sub(self.base_seg as u16))
    }

    /// The latest logged row with `key`, or `None` (exact: every candidate is read on disk).
    pub(super) fn latest(
        &self,
        conn: &Connection,
        key: u64,
    ) -> rusqlite::Result<Option<DedupEntry>> {
        if let Some((_, e)) = self.recent.get(&key) {
            return Ok(Some(*e));
        }
        let fp = fingerprint(key);
        let mut segs: Vec<i64> = Vec::new();
        for run in &self.runs {
            let mut i = run.fps.partition_point(|&f| f < fp);
            while i < run.fps.len() && run.fps[i] == fp {
                segs.push(self.unwrap_seg(run.segs[i]));
                i += 1;
            }
        }
        if segs.is_empty() {
            // The common case, an ordinary new message: no read, no statement.
            return Ok(None);
        }
        segs.sort_unstable_by(|a, b| b.cmp(a));
        segs.dedup();
        let mut stmt = conn.prepare_cached(
            "SELECT hash, row_id, seq, received_at_us FROM dedup_log \
             WHERE id >= ?1 AND id < ?2 AND key = ?3 ORDER BY id DESC LIMIT 1",
        )?;
        for seg in segs {
            let lo = seg * SEGMENT_ROWS;
            let found = stmt
                .query_row(params![lo, lo + SEGMENT_ROWS, key as i64], |r| {
                    Ok(DedupEntry {
                        hash: r.get::<_, i64>(0)? as u64,
                        row_id: r.get(1)?,
                        seq: r.get::<_, i64>(2)? as u64,
                        at_us: r.get(3)?,
                    })
                })
                .optional()?;
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// The stamps of log rows `ids` were rewritten (a clock step, `steps.rs`): the entries
    /// held whole in memory follow (older keys are read from disk anyway).
    pub(super) fn restamp(&mut self, ids: std::ops::Range<i64>, f: impl Fn(i64) -> i64) {
        for (id, e) in self.recent.values_mut() {
            if ids.contains(id) {
                e.at_us = f(e.at_us);
            }
        }
    }

    /// The log now starts at `first_id` (pruning deleted the rows before it), or is empty
    /// (`None`): forget the segments wholly before it.
    pub(super) fn expire_before(&mut self, first_id: Option<i64>) {
        let Some(first_id) = first_id else {
            *self = DedupIndex::default();
            return;
        };
        // A key whose latest row went has no row left at all.
        self.recent.retain(|_, (id, _)| *id >= first_id);
        let base = first_id.div_euclid(SEGMENT_ROWS);
        if base <= self.base_seg {
            return;
        }
        let old_base = self.base_seg;
        let keep = |stored: u16| old_base + i64::from(stored.wrapping_sub(old_base as u16)) >= base;
        for run in &mut self.runs {
            let mut w = 0;
            for r in 0..run.fps.len() {
                if keep(run.segs[r]) {
                    run.fps[w] = run.fps[r];
                    run.segs[w] = run.segs[r];
                    w += 1;
                }
            }
            run.fps.truncate(w);
            run.segs.truncate(w);
            run.fps.shrink_to_fit();
            run.segs.shrink_to_fit();
        }
        self.runs.retain(|r| r.len() > 0);
        self.base_seg = base;
    }
}

/// Rebuild the index from `dedup_log`: the newest segment whole, every older key as a
/// fingerprint and its segment, in one sorted run.
pub(super) fn load_index(conn: &Connection) -> rusqlite::Result<DedupIndex> {
    let mut index = DedupIndex::default();
    let bounds: Option<(i64, i64)> =
        conn.query_row("SELECT MIN(id), MAX(id) FROM dedup_log", [], |r| {
            Ok(r.get::<_, Option<i64>>(0)?.zip(r.get::<_, Option<i64>>(1)?))
        })?;
    let Some((min_id, max_id)) = bounds else {
        return Ok(index);
    };
    index.base_seg = min_id.div_euclid(SEGMENT_ROWS);
    index.recent_seg = max_id.div_euclid(SEGMENT_ROWS);
    let recent_start = index.recent_seg * SEGMENT_ROWS;
    let mut packed = Vec::new();
    {
        let mut stmt = conn.prepare("SELECT id, key FROM dedup_log WHERE id < ?1")?;
        let mut rows = stmt.query(params![recent_start])?;
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            packed.push(pack(
                r.get::<_, i64>(1)? as u64,
                id.div_euclid(SEGMENT_ROWS),
            ));
        }
    }
    // One entry per key and segment is enough (the disk read finds the latest in it).
    packed.sort_unstable();
    packed.dedup();
    if !packed.is_empty() {
        index.runs.push(Run::from_pairs(packed));
    }
    let mut stmt = conn.prepare(
        "SELECT id, key, hash, row_id, seq, received_at_us FROM dedup_log WHERE id >= ?1 \
         ORDER BY id",
    )?;
    let rows = stmt.query_map(params![recent_start], |r| {
        Ok((
            r.get::<_, i64>(1)? as u64,
            (
                r.get::<_, i64>(0)?,
                DedupEntry {
                    hash: r.get::<_, i64>(2)? as u64,
                    row_id: r.get(3)?,
                    seq: r.get::<_, i64>(4)? as u64,
                    at_us: r.get(5)?,
                },
            ),
        ))
    })?;
    for row in rows {
        let (key, entry) = row?;
        index.recent.insert(key, entry);
    }
    info!(
        keys = index.len(),
        bytes = index.heap_bytes(),
        "duplicate-detection index loaded"
    );
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::super::Outbox;
    use super::super::now_us;
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

    /// A small deterministic generator (xorshift) so the model test needs no extra crate.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// The index against a plain model (latest entry per key among the rows still in the log)
    /// over a real `dedup_log`: keys new, repeated soon, repeated much later, fingerprints
    /// shared, segments closing and merging, pruning from the front, a restart in the middle.
    #[test]
    fn the_index_finds_exactly_the_latest_logged_row_of_every_key_and_nothing_else() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE dedup_log (id INTEGER PRIMARY KEY, key INTEGER NOT NULL, \
             hash INTEGER NOT NULL, row_id INTEGER NOT NULL, seq INTEGER NOT NULL, \
             received_at_us INTEGER NOT NULL);",
        )
        .unwrap();
        // Ids far from zero: the 16-bit segment numbers are relative to the oldest segment.
        let first = 1_000_000_007_i64;
        let mut index = DedupIndex::default();
        let mut log: Vec<(i64, u64, DedupEntry)> = Vec::new();
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut keys: Vec<u64> = Vec::new();
        // The multiplicative inverse of the mixing constant mod 2^64 (Newton's iteration).
        let mut inverse = MIX;
        for _ in 0..6 {
            inverse = inverse.wrapping_mul(2u64.wrapping_sub(MIX.wrapping_mul(inverse)));
        }
        assert_eq!(MIX.wrapping_mul(inverse), 1);
        let latest = |log: &[(i64, u64, DedupEntry)], key: u64| {
            log.iter()
                .rev()
                .find(|(_, k, _)| *k == key)
                .map(|(_, _, e)| *e)
        };
        for step in 0..60_000_i64 {
            let r = xorshift(&mut rng);
            let key = match r % 10 {
                0 if !keys.is_empty() => {
                    keys[keys.len() - 1 - (r >> 8) as usize % keys.len().min(50)]
                }
                1 if !keys.is_empty() => keys[(r >> 8) as usize % keys.len()],
                // Two keys with one fingerprint: found by reading, told apart exactly.
                // (k + C^-1) * C = k * C + 1: the same high 32 bits unless the low ones carry.
                2 if !keys.is_empty() => {
                    let k = keys[(r >> 8) as usize % keys.len()];
                    let twin = k.wrapping_add(inverse);
                    assert!(
                        fingerprint(twin) == fingerprint(k)
                            || k.wrapping_mul(MIX) as u32 == u32::MAX
                    );
                    twin
                }
                _ => xorshift(&mut rng),
            };
            let id = first + step;
            let entry = DedupEntry {
                hash: r,
                row_id: step,
                seq: step as u64,
                at_us: step,
            };
            conn.execute(
                "INSERT INTO dedup_log VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, key as i64, r as i64, step, step, step],
            )
            .unwrap();
            index.logged(id, key, entry);
            log.push((id, key, entry));
            keys.push(key);
            if step % 7_919 == 0 && step > 0 {
                // Prune the oldest third.
                let cut = log[log.len() / 3].0;
                conn.execute("DELETE FROM dedup_log WHERE id < ?1", [cut])
                    .unwrap();
                log.retain(|(id, _, _)| *id >= cut);
                index.expire_before(Some(cut));
            }
            if step == 30_000 {
                index = load_index(&conn).unwrap();
            }
            if step % 101 == 0 {
                for probe in [
                    key,
                    keys[(r >> 20) as usize % keys.len()],
                    xorshift(&mut rng),
                ] {
                    let got = index.latest(&conn, probe).unwrap();
                    let want = latest(&log, probe);
                    assert_eq!(got.map(|e| e.row_id), want.map(|e| e.row_id), "step {step}");
                    assert_eq!(got.map(|e| e.hash), want.map(|e| e.hash));
                }
            }
        }
        // Runs merged like a binary counter: a handful, not one per segment.
        assert!(index.runs.len() <= 8, "{} runs", index.runs.len());
        conn.execute("DELETE FROM dedup_log", []).unwrap();
        index.expire_before(None);
        assert_eq!(index.len(), 0);
        assert_eq!(
            index.latest(&conn, keys[0]).unwrap().map(|e| e.row_id),
            None
        );
    }

    #[test]
    fn the_index_takes_at_most_8_bytes_a_key_in_memory() {
        let mut index = DedupIndex::default();
        let mut rng = 7_u64;
        for id in 1..=500_000_i64 {
            let entry = DedupEntry {
                hash: 0,
                row_id: id,
                seq: 0,
                at_us: 0,
            };
            index.logged(id, xorshift(&mut rng), entry);
            if id % 50_000 == 0 {
                let closed = index.len() - index.recent.len();
                assert!(
                    index.heap_bytes() <= 8 * closed,
                    "{} bytes, {closed} keys",
                    index.heap_bytes()
                );
            }
        }
        // And after pruning half.
        index.expire_before(Some(250_000));
        let closed = index.len() - index.recent.len();
        assert!(closed < 260_000 && index.heap_bytes() <= 8 * closed);
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
