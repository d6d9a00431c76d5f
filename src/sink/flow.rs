//! Which record goes out next, and what a refusal does to its feed: the sink's ordering rules as
//! pure bookkeeping (no I/O), so they can be tested alone. The MQTT session ([`super::mqtt`])
//! reads rows, asks [`Flow`] what to publish, and tells it what the broker answered.
//!
//! **The main stream** is every pending, not held row in row-id order (the order rows were
//! stored, so each feed's `seq` order), read a chunk at a time.
//!
//! **A transient refusal** (an MQTT 5 PUBACK reason that a later attempt may not meet:
//! [`Refusal::permanent`] is false) sets the record's feed apart behind a *gate*: the refused
//! record is published again after a backoff (5 s, doubling up to 60 s), alone, and no later
//! record of that feed is published until it has been accepted (or held). Rows of that feed are
//! then read by the gate itself, in row order, until it has caught up with the main stream, and
//! the feed rejoins it. Other feeds never wait. Records of the feed that were already published
//! when the refusal arrived (at most the in-flight window) can reach the broker before the
//! refused one: the central side can see `2, 3, 1, 4` but never `2, 3, 4, 1` once `1` has been
//! refused.
//!
//! **A permanent refusal**, a record too large for the packet limit, or a record that cannot be
//! built is held (the session's business: it answers [`Flow::settled`] for it) and its feed
//! goes on: a held record is a gap in its feed's `seq`, listed in health.
//!
//! **Rows released from hold** go out first, before anything else (they are the oldest);
//! **replay** records go out when nothing else waits.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

/// First wait before a transiently refused record is published again.
pub const RETRY_START: Duration = Duration::from_secs(5);
/// Longest wait between attempts on a transiently refused record.
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// Where a record came from, which decides how a refusal is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The main stream or a feed's gate: pending rows in row order.
    Stream,
    /// A row released from hold by a person.
    Released,
    /// Resent by a `replay` command (flagged `"replay": true`).
    Replay,
}

/// One record ready to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Outbox row id.
    pub row_id: i64,
    /// Feed name.
    pub feed: String,
    /// The record's `seq`.
    pub seq: u64,
    /// MQTT topic.
    pub topic: String,
    /// The record JSON.
    pub payload: Vec<u8>,
    /// Where it came from.
    pub origin: Origin,
}

/// An MQTT 5 PUBACK failure reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The reason code.
    pub code: u8,
}

impl Refusal {
    /// Permanent: the broker will refuse this record the same way until a person changes
    /// something (its ACL, its limits, the record). Held at once, never retried on its own:
    /// - 0x83 Implementation specific error ("valid, but the receiver is not willing to accept
    ///   it": a broker plugin's verdict on this message),
    /// - 0x87 Not authorized (ACL),
    /// - 0x90 Topic Name invalid,
    /// - 0x95 Packet too large (a DISCONNECT reason in the standard; listed in case a broker
    ///   puts it in a PUBACK),
    /// - 0x99 Payload format invalid.
    ///
    /// Transient (everything else: 0x80 Unspecified error, 0x91 Packet Identifier in use,
    /// 0x97 Quota exceeded, and any code not listed): retried with backoff before any later
    /// record of its feed.
    pub fn permanent(self) -> bool {
        matches!(self.code, 0x83 | 0x87 | 0x90 | 0x95 | 0x99)
    }

    /// The code's name in the MQTT 5 standard.
    pub fn name(self) -> &'static str {
        match self.code {
            0x80 => "Unspecified error",
            0x83 => "Implementation specific error",
            0x87 => "Not authorized",
            0x90 => "Topic Name invalid",
            0x91 => "Packet Identifier in use",
            0x95 => "Packet too large",
            0x97 => "Quota exceeded",
            0x99 => "Payload format invalid",
            _ => "unknown reason",
        }
    }

    /// For logs and held details, e.g. `PUBACK reason 0x87 (Not authorized)`.
    pub fn describe(self) -> String {
        format!("PUBACK reason 0x{:02X} ({})", self.code, self.name())
    }
}

/// A feed set apart while a refused record of it waits.
#[derive(Debug)]
struct Gate {
    /// Rows of this feed up to this id have been published, held, or are refused below.
    after: i64,
    /// Refused records waiting to be published again, in row order.
    refused: BTreeMap<i64, Outgoing>,
    /// The refused record published again and not yet answered.
    out: Option<i64>,
    /// When the first of `refused` may be published again.
    retry_at: Instant,
    backoff: Duration,
    /// Rows read for this feed alone (once nothing of it is refused), in row order.
    own: VecDeque<Outgoing>,
    /// The main cursor when this feed's own read last found nothing more.
    read_upto: i64,
}

impl Gate {
    fn blocked(&self) -> bool {
        !self.refused.is_empty() || self.out.is_some()
    }
}

/// The records of one connection waiting to be published, and the feeds set apart.
#[derive(Debug, Default)]
pub struct Flow {
    ready: VecDeque<Outgoing>,
    released: VecDeque<Outgoing>,
    replay: VecDeque<Outgoing>,
    gates: BTreeMap<String, Gate>,
    /// Per feed, the highest row id published from the main stream or the feed's gate.
    last_sent: HashMap<String, i64>,
    /// Highest row id the main stream has read.
    cursor: i64,
}

impl Flow {
    /// The highest row id the main stream has read.
    pub fn cursor(&self) -> i64 {
        self.cursor
    }

    /// Records of the main stream waiting.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// True when nothing but replay records wait (a replay chunk may be read).
    pub fn wants_replay(&self) -> bool {
        self.ready.is_empty() && self.replay.is_empty()
    }

    /// Feeds set apart now.
    pub fn gated_feeds(&self) -> usize {
        self.gates.len()
    }

    /// The names of the feeds set apart now (the main stream leaves their rows to them).
    pub fn gated(&self) -> Vec<String> {
        self.gates.keys().cloned().collect()
    }

    /// Rows the main stream read, in row order, up to `last_row` (which may be later than the
    /// last of `rows`: rows held instead of published). Rows of a feed set apart are left to
    /// its gate.
    pub fn add_stream(&mut self, rows: Vec<Outgoing>, last_row: Option<i64>) {
        if let Some(last) = last_row {
            self.cursor = self.cursor.max(last);
        }
        for o in rows {
            if !self.gates.contains_key(&o.feed) {
                self.ready.push_back(o);
            }
        }
    }

    /// Rows released from hold. One the main stream or a gate will read anyway (its id is
    /// beyond what they have read) is left to them, so it is not published twice.
    pub fn add_released(&mut self, rows: Vec<Outgoing>) {
        for o in rows {
            let later = o.row_id > self.cursor
                || self.gates.get(&o.feed).is_some_and(|g| o.row_id > g.after);
            if !later {
                self.released.push_back(o);
            }
        }
    }

    /// A chunk of a replay.
    pub fn add_replay(&mut self, rows: Vec<Outgoing>) {
        self.replay.extend(rows);
    }

    /// A feed whose gate wants its next rows: `(feed, after, upto)`, read rows with
    /// `after < id <= upto`.
    pub fn gate_read(&self) -> Option<(String, i64, i64)> {
        self.gates
            .iter()
            .find(|(_, g)| !g.blocked() && g.own.is_empty() && g.read_upto < self.cursor)
            .map(|(f, g)| (f.clone(), g.after, self.cursor))
    }

    /// What a gate's read found: `rows` in order, read up to `last_row` (rows held instead of
    /// published included), asked up to `upto`. Nothing found: the feed has caught up and
    /// rejoins the main stream.
    pub fn add_gate_rows(
        &mut self,
        feed: &str,
        rows: Vec<Outgoing>,
        last_row: Option<i64>,
        upto: i64,
    ) {
        let Some(g) = self.gates.get_mut(feed) else {
            return;
        };
        match last_row {
            Some(last) => g.after = g.after.max(last),
            None => g.read_upto = upto,
        }
        g.own.extend(rows);
        self.rejoin();
    }

    /// The next record to publish, if any: released rows, then refused records due again (one
    /// per feed at a time), then rows read by gates, then the main stream, then replay records.
    pub fn next(&mut self, now: Instant) -> Option<Outgoing> {
        if let Some(o) = self.released.pop_front() {
            return Some(o);
        }
        for (feed, g) in self.gates.iter_mut() {
            if g.out.is_none()
                && g.retry_at <= now
                && let Some((&id, _)) = g.refused.first_key_value()
            {
                let o = g.refused.remove(&id).expect("first key");
                g.out = Some(id);
                return Some(o);
            }
            if !g.blocked()
                && let Some(o) = g.own.pop_front()
            {
                let last = self.last_sent.entry(feed.clone()).or_default();
                *last = (*last).max(o.row_id);
                return Some(o);
            }
        }
        if let Some(o) = self.ready.pop_front() {
            let last = self.last_sent.entry(o.feed.clone()).or_default();
            *last = (*last).max(o.row_id);
            return Some(o);
        }
        self.replay.pop_front()
    }

    /// A record [`Flow::next`] gave out could not be handed to the client: it goes first next
    /// time.
    pub fn put_back(&mut self, o: Outgoing) {
        if let Some(g) = self.gates.get_mut(&o.feed)
            && g.out == Some(o.row_id)
        {
            g.out = None;
            g.refused.insert(o.row_id, o);
            return;
        }
        self.released.push_front(o);
    }

    /// The broker refused `o` with a transient reason: set its feed apart (if it is not yet)
    /// and publish it again after a backoff, before any later record of its feed. Replay records
    /// are not retried (the central side can ask again).
    pub fn refused(&mut self, o: Outgoing, now: Instant) {
        if o.origin == Origin::Replay {
            return;
        }
        let feed = o.feed.clone();
        if !self.gates.contains_key(&feed) {
            // Later rows of the feed not yet published are left to the gate's own reads.
            self.ready.retain(|r| r.feed != feed);
            let after = self
                .last_sent
                .get(&feed)
                .copied()
                .unwrap_or(0)
                .max(o.row_id);
            self.gates.insert(
                feed.clone(),
                Gate {
                    after,
                    refused: BTreeMap::new(),
                    out: None,
                    retry_at: now + RETRY_START,
                    backoff: RETRY_START,
                    own: VecDeque::new(),
                    read_upto: i64::MIN,
                },
            );
        }
        let g = self.gates.get_mut(&feed).expect("inserted above");
        if g.out == Some(o.row_id) {
            // Refused again: wait longer.
            g.out = None;
            g.backoff = (g.backoff * 2).min(RETRY_MAX);
            g.retry_at = now + g.backoff;
        } else if !g.blocked() {
            // The first refusal since the feed was last unblocked.
            g.retry_at = now + g.backoff;
        }
        g.after = g.after.max(o.row_id);
        g.refused.insert(o.row_id, o);
    }

    /// The broker accepted record `row_id` of `feed`, or it was held: if it was its feed's
    /// refused record out again, the next one may go at once.
    pub fn settled(&mut self, feed: &str, row_id: i64, now: Instant) {
        if let Some(g) = self.gates.get_mut(feed)
            && g.out == Some(row_id)
        {
            g.out = None;
            g.backoff = RETRY_START;
            g.retry_at = now;
        }
        self.rejoin();
    }

    /// When the next refused record becomes due, if one waits.
    pub fn next_retry(&self) -> Option<Instant> {
        self.gates
            .values()
            .filter(|g| g.out.is_none() && !g.refused.is_empty())
            .map(|g| g.retry_at)
            .min()
    }

    /// Forget everything waiting (shutting down: what is pending stays pending).
    pub fn clear(&mut self) {
        self.ready.clear();
        self.released.clear();
        self.replay.clear();
        for g in self.gates.values_mut() {
            g.refused.clear();
            g.own.clear();
        }
    }

    /// Feeds whose gate has nothing refused, nothing read and has read up to the main cursor
    /// rejoin the main stream (its later rows are all beyond the cursor).
    fn rejoin(&mut self) {
        let cursor = self.cursor;
        self.gates
            .retain(|_, g| g.blocked() || !g.own.is_empty() || g.read_upto < cursor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(row_id: i64, feed: &str) -> Outgoing {
        Outgoing {
            row_id,
            feed: feed.into(),
            seq: row_id as u64,
            topic: format!("t/{feed}"),
            payload: Vec::new(),
            origin: Origin::Stream,
        }
    }

    fn drain(f: &mut Flow, now: Instant) -> Vec<(String, i64)> {
        std::iter::from_fn(|| f.next(now))
            .map(|o| (o.feed, o.row_id))
            .collect()
    }

    fn ids(v: &[(String, i64)]) -> Vec<i64> {
        v.iter().map(|(_, id)| *id).collect()
    }

    #[test]
    fn a_transiently_refused_record_goes_again_before_any_later_record_of_its_feed() {
        let t0 = Instant::now();
        let mut f = Flow::default();
        f.add_stream(vec![rec(1, "lab"), rec(2, "adt")], Some(2));
        assert_eq!(ids(&drain(&mut f, t0)), [1, 2]);
        // lab's record 1 refused (quota exceeded); more rows of both feeds arrive.
        f.refused(rec(1, "lab"), t0);
        f.add_stream(vec![rec(3, "lab"), rec(4, "adt"), rec(5, "lab")], Some(5));
        // adt flows; lab waits (its rows are left to the gate).
        assert_eq!(ids(&drain(&mut f, t0)), [4]);
        assert_eq!(f.next_retry(), Some(t0 + RETRY_START));
        assert_eq!(
            f.gate_read(),
            None,
            "nothing read while the feed is blocked"
        );
        // Due: the refused record alone.
        let t1 = t0 + RETRY_START;
        assert_eq!(ids(&drain(&mut f, t1)), [1]);
        // Refused again: the wait doubles.
        f.refused(rec(1, "lab"), t1);
        assert_eq!(f.next_retry(), Some(t1 + RETRY_START * 2));
        let t2 = t1 + RETRY_START * 2;
        assert_eq!(ids(&drain(&mut f, t2)), [1]);
        f.settled("lab", 1, t2);
        // Now the feed's later rows, read by its gate, in order.
        assert_eq!(f.gate_read(), Some(("lab".into(), 1, 5)));
        f.add_gate_rows("lab", vec![rec(3, "lab"), rec(5, "lab")], Some(5), 5);
        assert_eq!(ids(&drain(&mut f, t2)), [3, 5]);
        assert_eq!(f.gate_read(), Some(("lab".into(), 5, 5)));
        f.add_gate_rows("lab", vec![], None, 5);
        assert_eq!(
            f.gated_feeds(),
            0,
            "caught up: lab rejoined the main stream"
        );
        f.add_stream(vec![rec(6, "lab")], Some(6));
        assert_eq!(ids(&drain(&mut f, t2)), [6]);
    }

    #[test]
    fn records_refused_while_in_flight_go_again_in_row_order_one_at_a_time() {
        let t0 = Instant::now();
        let mut f = Flow::default();
        f.add_stream(vec![rec(1, "lab"), rec(2, "lab"), rec(3, "lab")], Some(3));
        assert_eq!(ids(&drain(&mut f, t0)), [1, 2, 3]);
        // 2 and 1 refused (answers can come in any order); 3 accepted.
        f.refused(rec(2, "lab"), t0);
        f.refused(rec(1, "lab"), t0);
        f.settled("lab", 3, t0);
        let t1 = t0 + RETRY_START;
        assert_eq!(ids(&drain(&mut f, t1)), [1], "one at a time, oldest first");
        f.settled("lab", 1, t1);
        assert_eq!(ids(&drain(&mut f, t1)), [2]);
        f.settled("lab", 2, t1);
        // 3 was published before the refusals: the gate reads after it.
        assert_eq!(f.gate_read(), Some(("lab".into(), 3, 3)));
    }

    #[test]
    fn released_rows_go_first_and_replays_last() {
        let t0 = Instant::now();
        let mut f = Flow::default();
        f.add_stream(vec![rec(10, "adt")], Some(10));
        f.add_replay(vec![Outgoing {
            origin: Origin::Replay,
            ..rec(2, "adt")
        }]);
        f.add_released(vec![
            Outgoing {
                origin: Origin::Released,
                ..rec(4, "adt")
            },
            // Beyond the cursor: the main stream reads it itself.
            Outgoing {
                origin: Origin::Released,
                ..rec(11, "adt")
            },
        ]);
        assert_eq!(ids(&drain(&mut f, t0)), [4, 10, 2]);
    }

    #[test]
    fn permanent_and_transient_reason_codes() {
        let permanent: Vec<u8> = [0x80u8, 0x83, 0x87, 0x90, 0x91, 0x95, 0x97, 0x99]
            .into_iter()
            .filter(|&c| Refusal { code: c }.permanent())
            .collect();
        assert_eq!(permanent, [0x83, 0x87, 0x90, 0x95, 0x99]);
        assert_eq!(
            Refusal { code: 0x87 }.describe(),
            "PUBACK reason 0x87 (Not authorized)"
        );
    }
}
