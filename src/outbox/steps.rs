//! Clock steps: keeping the stamps that retention and the duplicate window compare with true
//! *relative to each other and to now*, whatever the wall clock does.
//!
//! Retention measures ages from wall-clock stamps (`delivered.delivered_at_us`,
//! `rejected.received_at_us`, `dedup_log.received_at_us`; `held.since_us` is shown, never
//! compared). A Pi without an RTC boots in 1970 and steps to 2026 when NTP first answers: left
//! alone, every stamp it wrote before the step would be 56 years old at the next prune, and
//! quarantine kept for the operator, the duplicate window and delivered rows would all go at
//! once. A box whose clock steps back would keep everything stamped "in the future" until the
//! clock caught up. The rules (all in the writer thread, so no other code sees a half-done
//! state):
//!
//! 1. **Steps are noticed** by comparing the wall clock with the monotonic one before every
//!    group and every prune ([`Steps::check`]): `wall - monotonic` moves only when the wall
//!    clock is stepped (NTP slewing moves both). A move of more than [`TOLERANCE_US`] is a step.
//! 2. **What this run stamped before a step is moved by the step** ([`Steps::check`]): every
//!    row stamped with this run's clock (from the first row of each table this run wrote or
//!    restamped, by primary key: one range, no scan of older rows) gets `+ delta`, in chunks of
//!    [`CHUNK`] rows per transaction. A delivered row then keeps its full `retain_delivered`
//!    after the step, quarantine its `retain_rejected`, and a resend within the window is still
//!    recognised. Held rows' `since` likewise.
//! 3. **Stamps that are certainly wrong are made now** ([`Steps::settle`], at open and after
//!    every step): a stamp more than [`TOLERANCE_US`] in the future (the clock went back since
//!    it was written, across a restart), or, while the clock reads a plausible time, a stamp
//!    before [`PLAUSIBLE_FROM_US`] (written by a run whose clock had not been set, e.g. a run in
//!    1970 that ended before NTP answered). Such rows are read from the newest backwards
//!    (they are the newest rows of their table: stamps grow with the key), stopping at the
//!    first right one. Their age then starts again from now: retention keeps them at most its
//!    full period longer than due, never shorter, and never forever.
//!
//! What is not restamped: `messages.received_at_us` (the record's `received_at`: content,
//! written once; the central side sees the time the clock said, see docs/contract.md) and the
//! health counters' times. A message received in the milliseconds between a step and the next
//! group keeps the stamp it got. Restamping is best effort: if it fails (a full disk), the
//! error is logged and the rows keep their stamps; pruning under disk pressure is unaffected.

use rusqlite::{Connection, params};
use tracing::{error, warn};

use crate::clock::{Clock, PLAUSIBLE_FROM_US};

use super::dedup::DedupIndex;

/// A move of `wall - monotonic` larger than this is a step; a stamp further than this in the
/// future is wrong. (NTP slews small offsets; systemd-timesyncd and chrony step larger ones.)
pub(super) const TOLERANCE_US: i64 = 10_000_000;

/// Rows restamped per transaction.
const CHUNK: i64 = 10_000;

/// A table with stamps that retention compares: (table, key column, stamp column).
const TABLES: [(&str, &str, &str); 3] = [
    ("delivered", "n", "delivered_at_us"),
    ("dedup_log", "id", "received_at_us"),
    ("rejected", "id", "received_at_us"),
];
/// `dedup_log`'s place in [`TABLES`] (its index in memory follows its stamps).
const DEDUP: usize = 1;

/// The last step noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Step {
    /// How far the wall clock moved (µs; negative: back).
    pub(super) delta_us: i64,
    /// The wall time just after it (µs).
    pub(super) at_us: i64,
}

/// The writer's view of its wall clock.
pub(super) struct Steps {
    pub(super) clock: Clock,
    /// `wall - monotonic` (µs) when the frame was last set.
    offset_us: i64,
    /// Per table in [`TABLES`]: the first key stamped with this run's clock (written by this
    /// run or restamped by it); every later key is too.
    first: [i64; 3],
    /// The lowest `held.since_us` this run can have written, in the current frame.
    held_lo_us: i64,
    /// Steps noticed since open.
    pub(super) count: u64,
    pub(super) last: Option<Step>,
}

/// Whether a stamp is certainly wrong at `now`.
fn wrong(at_us: i64, now_us: i64) -> bool {
    at_us > now_us + TOLERANCE_US || (now_us >= PLAUSIBLE_FROM_US && at_us < PLAUSIBLE_FROM_US)
}

impl Steps {
    /// At open: this run's frame starts now; certainly wrong stamps are made now.
    pub(super) fn open(conn: &Connection, clock: Clock) -> rusqlite::Result<Steps> {
        let now = clock.now_us();
        let mut first = [0; 3];
        for (slot, (table, key, _)) in first.iter_mut().zip(TABLES) {
            *slot = conn.query_row(
                &format!("SELECT COALESCE(MAX({key}), 0) + 1 FROM {table}"),
                [],
                |r| r.get(0),
            )?;
        }
        let mut steps = Steps {
            offset_us: now - clock.mono_us(),
            clock,
            first,
            held_lo_us: now - TOLERANCE_US,
            count: 0,
            last: None,
        };
        steps.settle(conn, now)?;
        Ok(steps)
    }

    /// Make certainly wrong stamps now (rule 3): in each table, the rows below this run's
    /// first key, newest first, until a right one. Returns, per table, the keys restamped.
    fn settle(
        &mut self,
        conn: &Connection,
        now: i64,
    ) -> rusqlite::Result<[std::ops::Range<i64>; 3]> {
        let mut from = [0..0, 0..0, 0..0];
        for (i, (table, key, at)) in TABLES.into_iter().enumerate() {
            let mut lowest = None;
            {
                let mut stmt = conn.prepare(&format!(
                    "SELECT {key}, {at} FROM {table} WHERE {key} < ?1 ORDER BY {key} DESC"
                ))?;
                let mut rows = stmt.query(params![self.first[i]])?;
                while let Some(r) = rows.next()? {
                    let (k, stamp): (i64, i64) = (r.get(0)?, r.get(1)?);
                    if !wrong(stamp, now) {
                        break;
                    }
                    lowest = Some(k);
                }
            }
            let Some(lowest) = lowest else { continue };
            let sql = format!("UPDATE {table} SET {at} = ?3 WHERE {key} >= ?1 AND {key} < ?2");
            let n = chunked(conn, &sql, lowest, self.first[i], now)?;
            warn!(
                table,
                rows = n,
                "stamps the clock cannot have written (in the future, or before the clock was \
                 set) made now: their retention starts again from now"
            );
            from[i] = lowest..self.first[i];
            self.first[i] = lowest;
        }
        conn.execute(
            "UPDATE held SET since_us = ?1 WHERE since_us > ?1 + ?2 \
             OR (?1 >= ?3 AND since_us < ?3)",
            params![now, TOLERANCE_US, PLAUSIBLE_FROM_US],
        )?;
        Ok(from)
    }

    /// Notice a step (rule 1) and move what this run stamped before it (rule 2), then settle
    /// (rule 3). The duplicate index's in-memory entries follow. Returns the step, if any.
    pub(super) fn check(&mut self, conn: &Connection, dedup: &mut DedupIndex) -> Option<Step> {
        let now = self.clock.now_us();
        let offset = now - self.clock.mono_us();
        let delta = offset - self.offset_us;
        if delta.abs() <= TOLERANCE_US {
            return None;
        }
        // Taken as the new frame at once: a restamp that fails is not repeated (rows moved
        // twice would be worse than rows not moved).
        self.offset_us = offset;
        let step = Step {
            delta_us: delta,
            at_us: now,
        };
        self.count += 1;
        self.last = Some(step);
        warn!(
            step_secs = delta / 1_000_000,
            "the wall clock stepped; stamps written before the step are moved with it"
        );
        if let Err(e) = self.shift(conn, delta, dedup) {
            error!(error = %e, "could not move the outbox's stamps after a clock step");
        }
        match self.settle(conn, now) {
            Ok(from) => dedup.restamp(from[DEDUP].clone(), |_| now),
            Err(e) => {
                error!(error = %e, "could not correct the outbox's stamps after a clock step")
            }
        }
        Some(step)
    }

    /// Move every stamp this run wrote by `delta` (rule 2).
    fn shift(
        &mut self,
        conn: &Connection,
        delta: i64,
        dedup: &mut DedupIndex,
    ) -> rusqlite::Result<()> {
        for (i, (table, key, at)) in TABLES.into_iter().enumerate() {
            let end: i64 = conn.query_row(
                &format!("SELECT COALESCE(MAX({key}), 0) + 1 FROM {table}"),
                [],
                |r| r.get(0),
            )?;
            let sql =
                format!("UPDATE {table} SET {at} = {at} + ?3 WHERE {key} >= ?1 AND {key} < ?2");
            chunked(conn, &sql, self.first[i], end, delta)?;
            if i == DEDUP {
                dedup.restamp(self.first[i]..end, |at| at + delta);
            }
        }
        conn.execute(
            "UPDATE held SET since_us = since_us + ?1 WHERE since_us >= ?2",
            params![delta, self.held_lo_us],
        )?;
        self.held_lo_us += delta;
        Ok(())
    }
}

/// Run `sql` (parameters: the first key, the key after the last, `value`) over keys
/// `[from, to)` in chunks of [`CHUNK`] keys, one transaction each; returns the rows changed.
fn chunked(
    conn: &Connection,
    sql: &str,
    from: i64,
    to: i64,
    value: i64,
) -> rusqlite::Result<usize> {
    let mut n = 0;
    let mut a = from;
    while a < to {
        let b = a.saturating_add(CHUNK).min(to);
        let tx = conn.unchecked_transaction()?;
        n += tx.prepare_cached(sql)?.execute(params![a, b, value])?;
        tx.commit()?;
        a = b;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_support::{keyed, msg};
    use super::super::{Hold, HoldReason, Outbox, OutboxOptions, RejectedMessage, SourceKind};
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);
    const DAY: Duration = Duration::from_secs(86_400);
    const DAY_US: i64 = 86_400 * 1_000_000;

    /// 2026-12-03T08:00:00Z, µs.
    fn synced() -> i64 {
        "2026-12-03T08:00:00Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_microsecond()
    }

    /// Delivered rows a week, quarantine 30 days, duplicate keys a week.
    fn week() -> OutboxOptions {
        OutboxOptions {
            max_bytes: 64 << 20,
            quarantine_max_bytes: 8 << 20,
            retain_delivered: 7 * DAY,
            retain_rejected: 30 * DAY,
            dedup_keep: 7 * DAY,
            secure_delete: true,
        }
    }

    fn rejected(at_us: i64) -> RejectedMessage {
        RejectedMessage {
            feed: std::sync::Arc::from("a"),
            source_kind: SourceKind::Mllp,
            peer: None,
            received_at_us: at_us,
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

    /// What a box keeps, after pruning: (state of rows 1..=4, quarantined entries).
    async fn kept(ob: &Outbox) -> (Vec<Option<&'static str>>, usize) {
        ob.prune().await;
        ob.flush().await;
        let r = ob.reader().unwrap();
        let states = (1..=4).map(|id| r.row_state(id).unwrap()).collect();
        (states, r.quarantined(None).unwrap().len())
    }

    /// Rows 1 (keyed, pending), 2 (pending), 3 (held), 4 (delivered), and one quarantined
    /// message, all stamped by `clock`.
    async fn store_four(ob: &Outbox, clock: &Clock) {
        let now = clock.now_us();
        ob.append(keyed("a", "C1", "x", now)).await.unwrap();
        for body in ["two", "three", "four"] {
            let mut m = msg("a", body);
            m.received_at_us = now;
            ob.append(m).await.unwrap();
        }
        ob.hold(Hold {
            row_id: 3,
            reason: HoldReason::TooLarge,
            detail: "record 9 bytes, limit 8".into(),
        })
        .await
        .unwrap();
        ob.mark_delivered(vec![4]).await;
        ob.quarantine(rejected(now)).await.unwrap();
        ob.flush().await;
    }

    const ALL: [Option<&str>; 4] = [
        Some("pending"),
        Some("pending"),
        Some("held"),
        Some("delivered"),
    ];

    /// Issue 12: a Pi without an RTC boots in 1970, stores and delivers, then NTP steps the
    /// clock 56 years forward. Nothing is pruned at the step (the delivered row keeps its week
    /// from the step on, quarantine its 30 days), a resend within the window is still
    /// recognised, and pending and held rows are never pruned by time.
    #[tokio::test]
    async fn a_box_that_booted_in_1970_and_then_synced_prunes_nothing_early() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual(30_000_000);
        let (ob, w) =
            Outbox::open_with_clock(&dir.path().join("o.sqlite"), week(), clock.clone()).unwrap();
        store_four(&ob, &clock).await;
        clock.advance(10 * MINUTE);
        clock.set(synced());
        assert_eq!(
            kept(&ob).await,
            (ALL.to_vec(), 1),
            "nothing pruned at the step"
        );
        let g = ob.gauges();
        assert_eq!(g.clock_steps.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(
            g.clock_last_step_us
                .load(std::sync::atomic::Ordering::Relaxed)
                > 50 * 365 * DAY_US
        );
        // The resend of row 1, a minute after the step: within the window.
        clock.advance(MINUTE);
        let again = ob
            .append(keyed("a", "C1", "x", clock.now_us()))
            .await
            .unwrap();
        assert!(again.duplicate);
        assert_eq!(again.row_id, 1);
        // The hold's `since` moved with the step.
        let held = ob.reader().unwrap().held(None, false).unwrap();
        assert!(held[0].since_us > synced() - DAY_US, "{}", held[0].since_us);
        // Six days later the delivered row is still kept; eight days later it is gone,
        // quarantine is kept for its 30 days, pending and held rows for ever.
        clock.advance(6 * DAY);
        assert_eq!(kept(&ob).await, (ALL.to_vec(), 1));
        clock.advance(2 * DAY);
        assert_eq!(
            kept(&ob).await,
            (ALL[..3].iter().copied().chain([None]).collect(), 1)
        );
        clock.advance(21 * DAY);
        assert_eq!(kept(&ob).await.1, 1);
        clock.advance(2 * DAY);
        assert_eq!(
            kept(&ob).await,
            (ALL[..3].iter().copied().chain([None]).collect(), 0)
        );
        drop(ob);
        w.join();
    }

    /// The same box, restarted before NTP answered: the stamps it wrote in 1970 are found at
    /// the first open with a set clock (before 2026 is impossible) and made now, so they keep
    /// their whole retention from then on.
    #[tokio::test]
    async fn stamps_written_in_1970_by_a_previous_run_are_made_now_once_the_clock_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let clock = Clock::manual(30_000_000);
        {
            let (ob, w) = Outbox::open_with_clock(&path, week(), clock.clone()).unwrap();
            store_four(&ob, &clock).await;
            drop(ob);
            w.join();
        }
        clock.set(synced());
        let (ob, w) = Outbox::open_with_clock(&path, week(), clock.clone()).unwrap();
        assert_eq!(kept(&ob).await, (ALL.to_vec(), 1), "nothing pruned at open");
        let again = ob
            .append(keyed("a", "C1", "x", clock.now_us()))
            .await
            .unwrap();
        assert!(again.duplicate, "the 1970 key is within the window");
        clock.advance(6 * DAY);
        assert_eq!(kept(&ob).await, (ALL.to_vec(), 1));
        clock.advance(2 * DAY);
        assert_eq!(
            kept(&ob).await.0[3],
            None,
            "pruned a week after the clock was set"
        );
        drop(ob);
        w.join();
    }

    /// A keyed message with a one-day window.
    fn one_day(control_id: &str, at_us: i64) -> crate::outbox::NewMessage {
        let mut m = keyed("a", control_id, "x", at_us);
        m.dedup.as_mut().unwrap().window_us = DAY_US;
        m
    }

    /// The clock steps three days back while running: the delivered row is still pruned a
    /// week after its delivery (not ten days), and the one-day duplicate window still ends a
    /// day after the original (not four).
    #[tokio::test]
    async fn after_a_step_back_retention_and_the_duplicate_window_still_end_on_time() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual(synced());
        let (ob, w) =
            Outbox::open_with_clock(&dir.path().join("o.sqlite"), week(), clock.clone()).unwrap();
        store_four(&ob, &clock).await;
        ob.append(one_day("D1", clock.now_us())).await.unwrap();
        clock.advance(MINUTE);
        clock.step(-3 * DAY_US);
        assert_eq!(kept(&ob).await, (ALL.to_vec(), 1));
        clock.advance(DAY);
        let resend = ob.append(one_day("D1", clock.now_us())).await.unwrap();
        assert!(!resend.duplicate, "the one-day window has ended");
        clock.advance(6 * DAY);
        assert_eq!(
            kept(&ob).await,
            (ALL[..3].iter().copied().chain([None]).collect(), 1),
            "delivered a week ago: pruned"
        );
        drop(ob);
        w.join();
    }

    /// A box restarts with its clock a month behind (a drifting RTC, NTP not yet answering):
    /// what it stored before is stamped "in the future". Those stamps are made now at open, so
    /// nothing is kept for ever: the delivered row goes a week later, the window ends a day
    /// later.
    #[tokio::test]
    async fn stamps_in_the_future_at_open_are_made_now_and_still_expire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let clock = Clock::manual(synced());
        {
            let (ob, w) = Outbox::open_with_clock(&path, week(), clock.clone()).unwrap();
            store_four(&ob, &clock).await;
            ob.append(one_day("D1", clock.now_us())).await.unwrap();
            drop(ob);
            w.join();
        }
        clock.set(synced() - 30 * DAY_US);
        let (ob, w) = Outbox::open_with_clock(&path, week(), clock.clone()).unwrap();
        assert_eq!(kept(&ob).await, (ALL.to_vec(), 1));
        clock.advance(DAY + MINUTE);
        let resend = ob.append(one_day("D1", clock.now_us())).await.unwrap();
        assert!(!resend.duplicate, "the one-day window has ended");
        clock.advance(6 * DAY);
        assert_eq!(
            kept(&ob).await.0[3],
            None,
            "delivered row pruned a week after open"
        );
        let held = ob.reader().unwrap().held(None, false).unwrap();
        assert!(
            held[0].since_us <= clock.now_us(),
            "no hold since the future"
        );
        drop(ob);
        w.join();
    }

    /// A step back while running can leave what an earlier run stored "in the future": that
    /// is made now, and what this run stored keeps its own (moved) stamp, in memory too: a key
    /// stored 12 hours before the step is 25 hours old 13 hours after it, out of a one-day
    /// window.
    #[tokio::test]
    async fn a_step_back_makes_an_earlier_runs_stamps_now_and_moves_this_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let clock = Clock::manual(synced());
        {
            let (ob, w) = Outbox::open_with_clock(&path, week(), clock.clone()).unwrap();
            ob.append(one_day("P1", clock.now_us())).await.unwrap();
            drop(ob);
            w.join();
        }
        clock.advance(Duration::from_secs(3600));
        let (ob, w) = Outbox::open_with_clock(&path, week(), clock.clone()).unwrap();
        ob.append(one_day("K1", clock.now_us())).await.unwrap();
        clock.advance(12 * 60 * MINUTE);
        clock.step(-3 * DAY_US);
        ob.flush().await;
        clock.advance(13 * 60 * MINUTE);
        let k = ob.append(one_day("K1", clock.now_us())).await.unwrap();
        assert!(!k.duplicate, "K1 was stored 25 hours ago");
        let p = ob.append(one_day("P1", clock.now_us())).await.unwrap();
        assert!(
            p.duplicate,
            "P1's stamp was made now at the step, 13 hours ago"
        );
        drop(ob);
        w.join();
    }

    /// Small corrections (NTP slewing, a step under the tolerance) are not steps, and stamps
    /// a moment in the future are left alone.
    #[test]
    fn only_moves_beyond_the_tolerance_are_steps_or_wrong() {
        let now = synced();
        assert!(!wrong(now + TOLERANCE_US, now));
        assert!(wrong(now + TOLERANCE_US + 1, now));
        assert!(wrong(30_000_000, now), "1970 once the clock is set");
        assert!(
            !wrong(30_000_000, 60_000_000),
            "1970 while the clock reads 1970"
        );
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::schema::open(&dir.path().join("o.sqlite")).unwrap();
        let clock = Clock::manual(now);
        let mut steps = Steps::open(&conn, clock.clone()).unwrap();
        let mut index = DedupIndex::default();
        clock.step(TOLERANCE_US);
        assert_eq!(steps.check(&conn, &mut index), None);
        clock.step(1);
        assert_eq!(
            steps.check(&conn, &mut index).map(|s| s.delta_us),
            Some(TOLERANCE_US + 1)
        );
        clock.advance(DAY);
        assert_eq!(
            steps.check(&conn, &mut index),
            None,
            "time passing is no step"
        );
    }
}
