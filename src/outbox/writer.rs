//! The writer thread: the only code that changes the database.
//!
//! One thread owns the writing `rusqlite::Connection` and the in-memory state that goes with it
//! ([`WriterState`]: next row id, each feed's last `seq`, pending counts, the duplicate index).
//! [`Outbox`](super::Outbox) handles send it a [`Cmd`] over a bounded channel. The loop
//! ([`run`]) takes everything queued, up to [`MAX_BATCH`] commands, as one group and
//! [`commit_group`] applies it in ONE `IMMEDIATE` transaction, one [`Group`] method per command,
//! and commits once: many senders share one fsync. Answers wait in [`Held`] until the outcome
//! of the commit is known; a command that answers has a reply channel of its own type.
//!
//! **Group commit.** When the previous commit carried several senders' appends, those senders
//! are about to send again: the loop waits up to [`GROUP_COMMIT_WAIT`] until as many appends as
//! that commit carried are queued, so they share the next fsync instead of splitting into
//! alternating half-full commits. A lone sender never waits.
//!
//! **After the transaction**, in this order: the gauges (if it committed), the answers, pruning
//! if a `Prune` was in the group (its own transactions, [`super::prune`]), then the flushes.
//!
//! **A failed transaction** stores nothing. The in-memory state goes back to what it was before
//! the group. Commands applied before the failing statement are answered `Failed` (an append
//! refused as full keeps that answer); the failing command and those after it in the group are
//! dropped unanswered, so their callers see `Closed`. If the transaction could not even begin,
//! the group is kept and tried again, with whatever is queued by then, once another command
//! arrives.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rusqlite::{CachedStatement, Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{debug, error};

use super::dedup::{self, DedupEntry, Seen, dedup_key};
use super::held::{Hold, HoldOutcome, Unheld};
use super::{
    AppendError, NewMessage, OutboxError, OutboxGauges, OutboxOptions, RejectedMessage, Stored,
    now_us, prune, sqlite,
};

/// Depth of the command channel into the writer thread (bounded: sources wait when it is full).
const CMD_CHANNEL_DEPTH: usize = 8192;
/// Most commands applied in one transaction.
const MAX_BATCH: usize = 4096;
/// Longest the writer waits for the previous commit's senders before committing without them.
const GROUP_COMMIT_WAIT: Duration = Duration::from_micros(200);

/// The answer to one command, sent once the transaction holding it has committed or failed.
pub(super) type Reply<T> = oneshot::Sender<Result<T, AppendError>>;

/// What a handle asks of the writer.
pub(super) enum Cmd {
    /// Store a message; answers what the store assigned, or why it did not store it.
    Append(NewMessage, Reply<Stored>),
    /// Mark rows delivered (their PUBACK arrived). No answer.
    MarkDelivered(Vec<i64>),
    /// Prune after this group commits. No answer.
    Prune,
    /// Answered once every command queued before it has been applied (and pruning has run).
    Flush(oneshot::Sender<()>),
    /// Increment an integer in `meta` and answer the new value (birth sequence numbers).
    Increment(&'static str, Reply<i64>),
    /// Store a value in `meta` (e.g. the feed inventory). No answer.
    PutMeta(&'static str, String),
    /// Keep an `AE`-answered message in quarantine; answers its quarantine id.
    Quarantine(RejectedMessage, Reply<i64>),
    /// Delete a quarantined message (it has been stored as a message again).
    ForgetRejected(i64, Reply<()>),
    /// Set an undelivered row aside (its record cannot be published); answers what happened.
    Hold(Hold, Reply<HoldOutcome>),
    /// Release one held row (or every one, `None`); answers the rows released.
    Unhold(Option<i64>, Reply<Unheld>),
}

/// The writer thread; join it after dropping every [`Outbox`](super::Outbox) handle to be sure
/// all commits ran.
pub struct WriterThread(std::thread::JoinHandle<()>);

impl WriterThread {
    /// Wait for the writer to finish its last transaction.
    pub fn join(self) {
        let _ = self.0.join();
    }
}

/// Start the writer thread on `conn`; returns the sending end of its command channel.
pub(super) fn spawn(
    conn: Connection,
    state: WriterState,
    gauges: Arc<OutboxGauges>,
    appended: Arc<Notify>,
) -> std::io::Result<(mpsc::Sender<Cmd>, WriterThread)> {
    let (tx, rx) = mpsc::channel(CMD_CHANNEL_DEPTH);
    let thread = std::thread::Builder::new()
        .name("outbox-writer".into())
        .spawn(move || run(conn, state, rx, gauges, appended))?;
    Ok((tx, WriterThread(thread)))
}

/// State owned by the writer thread, mirrored into [`OutboxGauges`].
pub(super) struct WriterState {
    pub(super) opts: OutboxOptions,
    pub(super) last_seq: HashMap<Arc<str>, u64>,
    /// Next row id: only ever increases while the process runs.
    next_id: i64,
    pending_count: u64,
    pending_bytes: u64,
    pub(super) total_bytes: u64,
    /// Duplicate-detection index: the latest message per key within `dedup_keep`, rebuilt from
    /// `dedup_log` at open. Changed only after the commit that logged the change.
    pub(super) dedup: HashMap<u64, DedupEntry>,
    /// Held rows (row id -> size), mirroring the `held` table, so a delivered mark looks at the
    /// table only for a row that is held.
    held: HashMap<i64, u64>,
    held_bytes: u64,
}

/// What a failed group puts back: everything its commands may have advanced.
struct Snapshot {
    last_seq: HashMap<Arc<str>, u64>,
    next_id: i64,
    pending_count: u64,
    pending_bytes: u64,
    total_bytes: u64,
    held: HashMap<i64, u64>,
    held_bytes: u64,
}

impl WriterState {
    /// Read the state from the database at open.
    pub(super) fn load(
        conn: &Connection,
        path: &Path,
        opts: OutboxOptions,
    ) -> Result<Self, OutboxError> {
        let e = sqlite(path);
        let mut last_seq = HashMap::new();
        let mut stmt = conn
            .prepare("SELECT feed, last_seq FROM feed_seq")
            .map_err(&e)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(&e)?;
        for row in rows {
            let (feed, seq) = row.map_err(&e)?;
            last_seq.insert(Arc::from(feed), seq as u64);
        }
        let mut stmt = conn
            .prepare("SELECT feed, MAX(seq) FROM messages GROUP BY feed")
            .map_err(&e)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(&e)?;
        for row in rows {
            let (feed, seq) = row.map_err(&e)?;
            let slot = last_seq.entry(Arc::from(feed)).or_insert(0);
            *slot = (*slot).max(seq as u64);
        }
        let max_id: i64 = conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM messages", [], |r| {
                r.get(0)
            })
            .map_err(&e)?;
        let (pending_count, pending_bytes): (i64, i64) = conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE state = 0",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(&e)?;
        let total_bytes: i64 = conn
            .query_row("SELECT COALESCE(SUM(size), 0) FROM messages", [], |r| {
                r.get(0)
            })
            .map_err(&e)?;
        let dedup = dedup::load_index(conn, opts.dedup_keep).map_err(&e)?;
        // A hold only ever names an undelivered row; drop any that outlived its row.
        conn.execute(
            "DELETE FROM held WHERE row_id NOT IN (SELECT id FROM messages WHERE state = 0)",
            [],
        )
        .map_err(&e)?;
        let mut held = HashMap::new();
        let mut stmt = conn
            .prepare("SELECT h.row_id, m.size FROM held h JOIN messages m ON m.id = h.row_id")
            .map_err(&e)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            .map_err(&e)?;
        for row in rows {
            let (id, size) = row.map_err(&e)?;
            held.insert(id, size as u64);
        }
        let held_bytes = held.values().sum();
        Ok(WriterState {
            opts,
            last_seq,
            next_id: max_id + 1,
            pending_count: pending_count as u64,
            pending_bytes: pending_bytes as u64,
            total_bytes: total_bytes as u64,
            dedup,
            held,
            held_bytes,
        })
    }

    pub(super) fn publish_gauges(&self, g: &OutboxGauges) {
        g.pending_count.store(self.pending_count, Ordering::Relaxed);
        g.pending_bytes.store(self.pending_bytes, Ordering::Relaxed);
        g.total_bytes.store(self.total_bytes, Ordering::Relaxed);
        g.held_count
            .store(self.held.len() as u64, Ordering::Relaxed);
        g.held_bytes.store(self.held_bytes, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            last_seq: self.last_seq.clone(),
            next_id: self.next_id,
            pending_count: self.pending_count,
            pending_bytes: self.pending_bytes,
            total_bytes: self.total_bytes,
            held: self.held.clone(),
            held_bytes: self.held_bytes,
        }
    }

    fn restore(&mut self, s: Snapshot) {
        self.last_seq = s.last_seq;
        self.next_id = s.next_id;
        self.pending_count = s.pending_count;
        self.pending_bytes = s.pending_bytes;
        self.total_bytes = s.total_bytes;
        self.held = s.held;
        self.held_bytes = s.held_bytes;
    }
}

/// The single writer: take a group of commands, commit it, answer; until every handle is gone.
fn run(
    mut conn: Connection,
    mut state: WriterState,
    mut rx: mpsc::Receiver<Cmd>,
    gauges: Arc<OutboxGauges>,
    appended: Arc<Notify>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut last_appends = 0usize;
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        drain_into(&mut rx, &mut batch);
        // Group commit: when the previous commit carried several senders' messages, those
        // senders are about to send again; wait a moment for them so they share this fsync
        // instead of splitting into alternating half-full commits. A lone sender never waits.
        if last_appends > 1 {
            let deadline = std::time::Instant::now() + GROUP_COMMIT_WAIT;
            while count_appends(&batch) < last_appends
                && batch.len() < MAX_BATCH
                && std::time::Instant::now() < deadline
            {
                std::thread::yield_now();
                drain_into(&mut rx, &mut batch);
            }
        }
        last_appends = count_appends(&batch);
        let added = commit_group(&mut conn, &mut state, &mut batch, &gauges);
        state.publish_gauges(&gauges);
        if added {
            appended.notify_one();
        }
    }
    debug!("outbox writer stopped");
}

fn drain_into(rx: &mut mpsc::Receiver<Cmd>, batch: &mut Vec<Cmd>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(c) => batch.push(c),
            Err(_) => break,
        }
    }
}

fn count_appends(batch: &[Cmd]) -> usize {
    batch
        .iter()
        .filter(|c| matches!(c, Cmd::Append(..)))
        .count()
}

/// Apply one group in a single transaction and commit; then answer, prune if asked, and answer
/// the flushes. Returns true if rows were added.
fn commit_group(
    conn: &mut Connection,
    state: &mut WriterState,
    batch: &mut Vec<Cmd>,
    gauges: &OutboxGauges,
) -> bool {
    let saved = state.snapshot();
    let mut held = Held::default();
    let added = match apply_group(conn, state, gauges, batch, &mut held) {
        Ok(applied) => {
            state.dedup.extend(applied.dedup);
            gauges.commits.fetch_add(1, Ordering::Relaxed);
            gauges
                .appended
                .fetch_add(applied.appended, Ordering::Relaxed);
            gauges
                .delivered
                .fetch_add(applied.delivered, Ordering::Relaxed);
            // Counters first, answers second: whoever learns of the commit sees it counted.
            state.publish_gauges(gauges);
            held.answer_committed();
            applied.appended > 0
        }
        Err(e) => {
            // Nothing in this group was stored: roll the in-memory view back and refuse every
            // append in it, so no sender is told a message was kept.
            error!(error = %e, "outbox transaction failed; refusing the messages in it");
            state.restore(saved);
            held.answer_failed(&e);
            false
        }
    };
    if held.prune
        && let Err(e) = prune::run(conn, state)
    {
        error!(error = %e, "pruning delivered messages failed");
    }
    for f in held.flushes {
        let _ = f.send(());
    }
    added
}

/// Begin the transaction, apply every command of the group in order, commit. The group is
/// taken out of `batch` only once the transaction has begun.
fn apply_group(
    conn: &mut Connection,
    state: &mut WriterState,
    gauges: &OutboxGauges,
    batch: &mut Vec<Cmd>,
    held: &mut Held,
) -> rusqlite::Result<Applied> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let applied = {
        let mut group = Group::begin(&tx, state, gauges, held)?;
        for cmd in batch.drain(..) {
            group.apply(cmd)?;
        }
        group.finish()
    };
    tx.commit()?;
    Ok(applied)
}

/// What a group leaves for after its transaction: the answers (sent once the outcome is known),
/// whether to prune, and the flushes (answered last).
#[derive(Default)]
struct Held {
    appends: Vec<(Reply<Stored>, Result<Stored, AppendError>)>,
    increments: Vec<(Reply<i64>, i64)>,
    quarantined: Vec<(Reply<i64>, i64)>,
    forgotten: Vec<Reply<()>>,
    hold_answers: Vec<(Reply<HoldOutcome>, HoldOutcome)>,
    unhold_answers: Vec<(Reply<Unheld>, Unheld)>,
    prune: bool,
    flushes: Vec<oneshot::Sender<()>>,
}

impl Held {
    /// The group committed: every answer stands.
    fn answer_committed(&mut self) {
        for (reply, r) in self.appends.drain(..) {
            let _ = reply.send(r);
        }
        for (reply, value) in self.increments.drain(..) {
            let _ = reply.send(Ok(value));
        }
        for (reply, id) in self.quarantined.drain(..) {
            let _ = reply.send(Ok(id));
        }
        for reply in self.forgotten.drain(..) {
            let _ = reply.send(Ok(()));
        }
        for (reply, outcome) in self.hold_answers.drain(..) {
            let _ = reply.send(Ok(outcome));
        }
        for (reply, unheld) in self.unhold_answers.drain(..) {
            let _ = reply.send(Ok(unheld));
        }
    }

    /// The group's transaction failed: what would have been stored (or found) is answered
    /// `Failed`; a refusal stands.
    fn answer_failed(&mut self, e: &rusqlite::Error) {
        fn failed<T>(e: &rusqlite::Error) -> Result<T, AppendError> {
            Err(AppendError::Failed(e.to_string()))
        }
        for (reply, r) in self.appends.drain(..) {
            let r = match r {
                Ok(_) => failed(e),
                Err(other) => Err(other),
            };
            let _ = reply.send(r);
        }
        for (reply, _) in self.increments.drain(..) {
            let _ = reply.send(failed(e));
        }
        for (reply, _) in self.quarantined.drain(..) {
            let _ = reply.send(failed(e));
        }
        for reply in self.forgotten.drain(..) {
            let _ = reply.send(failed(e));
        }
        for (reply, _) in self.hold_answers.drain(..) {
            let _ = reply.send(failed(e));
        }
        for (reply, _) in self.unhold_answers.drain(..) {
            let _ = reply.send(failed(e));
        }
    }
}

/// What a committed group changed that the writer's state and gauges take on after the commit.
struct Applied {
    /// Index entries of the messages it logged.
    dedup: HashMap<u64, DedupEntry>,
    appended: u64,
    delivered: u64,
}

const INSERT_MESSAGE: &str = "INSERT INTO messages (id, record_id, feed, seq, received_at_us, \
     source_kind, peer, format, control_id, size, raw, reprocessed, control_id_reused) \
     VALUES (?11, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?12, ?13)";

const MARK_DELIVERED: &str = "UPDATE messages SET state = 1, delivered_at_us = ?2 \
     WHERE id = ?1 AND state = 0 RETURNING size";

/// One group being applied inside its transaction: one method per command. Row ids, seqs and
/// pending counts advance in [`WriterState`] as it goes (put back if the transaction fails);
/// duplicate-index entries and the appended/delivered counts wait in the group until the commit.
struct Group<'t> {
    db: &'t Connection,
    /// The two statements of the hot path, prepared once per group.
    insert: CachedStatement<'t>,
    mark: CachedStatement<'t>,
    state: &'t mut WriterState,
    gauges: &'t OutboxGauges,
    held: &'t mut Held,
    /// The group's clock for delivered marks.
    now: i64,
    dedup: HashMap<u64, DedupEntry>,
    appended: u64,
    delivered: u64,
}

impl<'t> Group<'t> {
    fn begin(
        db: &'t Connection,
        state: &'t mut WriterState,
        gauges: &'t OutboxGauges,
        held: &'t mut Held,
    ) -> rusqlite::Result<Self> {
        let insert = db.prepare_cached(INSERT_MESSAGE)?;
        let mark = db.prepare_cached(MARK_DELIVERED)?;
        Ok(Group {
            db,
            insert,
            mark,
            state,
            gauges,
            held,
            now: now_us(),
            dedup: HashMap::new(),
            appended: 0,
            delivered: 0,
        })
    }

    fn apply(&mut self, cmd: Cmd) -> rusqlite::Result<()> {
        match cmd {
            Cmd::Append(msg, reply) => self.append(msg, reply),
            Cmd::MarkDelivered(ids) => self.mark_delivered(ids),
            Cmd::Prune => {
                self.prune();
                Ok(())
            }
            Cmd::Flush(done) => {
                self.flush(done);
                Ok(())
            }
            Cmd::Increment(key, reply) => self.increment(key, reply),
            Cmd::PutMeta(key, value) => self.put_meta(key, value),
            Cmd::Quarantine(m, reply) => self.quarantine(m, reply),
            Cmd::ForgetRejected(id, reply) => self.forget_rejected(id, reply),
            Cmd::Hold(h, reply) => self.hold(h, reply),
            Cmd::Unhold(which, reply) => self.unhold(which, reply),
        }
    }

    fn finish(self) -> Applied {
        Applied {
            dedup: self.dedup,
            appended: self.appended,
            delivered: self.delivered,
        }
    }

    /// Store one message: or answer a resend again without storing it, or refuse it when the
    /// pending bytes would pass the cap.
    fn append(&mut self, msg: NewMessage, reply: Reply<Stored>) -> rusqlite::Result<()> {
        let size = msg.raw.len() as u64;
        // A resend of something already stored within the window: answer again, store nothing.
        // Same control id with other content: store and flag.
        let keyed = msg
            .dedup
            .as_ref()
            .map(|k| (k, dedup_key(&msg.feed, &k.sender, &k.control_id)));
        let seen = match keyed {
            Some((k, key)) => {
                let prior = self
                    .dedup
                    .get(&key)
                    .or_else(|| self.state.dedup.get(&key))
                    .copied();
                k.check(prior, msg.received_at_us)
            }
            None => Seen::New,
        };
        let reused = match seen {
            Seen::Resend(original) => return self.answer_resend(original, reply),
            Seen::Reused => true,
            Seen::New => false,
        };
        if self.state.pending_bytes + size > self.state.opts.max_bytes {
            self.gauges.refused_full.fetch_add(1, Ordering::Relaxed);
            let err = AppendError::Full {
                pending_bytes: self.state.pending_bytes,
                max_bytes: self.state.opts.max_bytes,
            };
            self.held.appends.push((reply, Err(err)));
            return Ok(());
        }
        let row_id = self.state.next_id;
        let seq = self.state.last_seq.get(&msg.feed).copied().unwrap_or(0) + 1;
        let record_id = uuid::Uuid::now_v7().to_string();
        self.insert.execute(params![
            record_id,
            &*msg.feed,
            seq as i64,
            msg.received_at_us,
            msg.source_kind.as_str(),
            msg.peer,
            msg.format.as_str(),
            msg.control_id,
            size as i64,
            msg.raw,
            row_id,
            msg.reprocessed,
            reused,
        ])?;
        if let Some((k, key)) = keyed {
            // Appended in time order: the log's last page, never a random one.
            self.db
                .prepare_cached(
                    "INSERT INTO dedup_log (key, hash, row_id, seq, received_at_us) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    key as i64,
                    k.hash as i64,
                    row_id,
                    seq as i64,
                    msg.received_at_us
                ])?;
            self.dedup.insert(
                key,
                DedupEntry {
                    hash: k.hash,
                    row_id,
                    seq,
                    at_us: msg.received_at_us,
                },
            );
        }
        self.state.next_id += 1;
        self.state.last_seq.insert(msg.feed, seq);
        self.state.pending_count += 1;
        self.state.pending_bytes += size;
        self.state.total_bytes += size;
        self.appended += 1;
        self.held.appends.push((
            reply,
            Ok(Stored {
                row_id,
                seq,
                record_id,
                duplicate: false,
            }),
        ));
        Ok(())
    }

    /// An append recognised as a resend: answer with the original's row, seq and record id.
    fn answer_resend(
        &mut self,
        original: DedupEntry,
        reply: Reply<Stored>,
    ) -> rusqlite::Result<()> {
        self.gauges.duplicates.fetch_add(1, Ordering::Relaxed);
        let record_id: String = self
            .db
            .prepare_cached("SELECT record_id FROM messages WHERE id = ?1")?
            .query_row(params![original.row_id], |r| r.get(0))
            .optional()?
            .unwrap_or_default();
        self.held.appends.push((
            reply,
            Ok(Stored {
                row_id: original.row_id,
                seq: original.seq,
                record_id,
                duplicate: true,
            }),
        ));
        Ok(())
    }

    /// Mark rows delivered; a row already delivered (or gone) is left alone. A held row that was
    /// delivered anyway (resent by a replay) is no longer held.
    fn mark_delivered(&mut self, ids: Vec<i64>) -> rusqlite::Result<()> {
        for id in ids {
            let size: Option<i64> = self
                .mark
                .query_row(params![id, self.now], |r| r.get(0))
                .optional()?;
            if let Some(size) = size {
                self.state.pending_count -= 1;
                self.state.pending_bytes -= size as u64;
                self.delivered += 1;
                if let Some(held) = self.state.held.remove(&id) {
                    self.db
                        .prepare_cached("DELETE FROM held WHERE row_id = ?1")?
                        .execute(params![id])?;
                    self.state.held_bytes -= held;
                }
            }
        }
        Ok(())
    }

    /// Set an undelivered row aside: it stays stored and undelivered, and the sink's pending
    /// reads no longer return it. Holding a held row again updates its reason and detail.
    fn hold(&mut self, h: Hold, reply: Reply<HoldOutcome>) -> rusqlite::Result<()> {
        let size: Option<i64> = self
            .db
            .prepare_cached("SELECT size FROM messages WHERE id = ?1 AND state = 0")?
            .query_row(params![h.row_id], |r| r.get(0))
            .optional()?;
        let outcome = match size {
            None => HoldOutcome::NotPending,
            Some(_) if self.state.held.contains_key(&h.row_id) => {
                self.db.execute(
                    "UPDATE held SET reason = ?2, detail = ?3 WHERE row_id = ?1",
                    params![h.row_id, h.reason.as_str(), h.detail],
                )?;
                HoldOutcome::AlreadyHeld
            }
            Some(size) => {
                self.db.execute(
                    "INSERT INTO held (row_id, reason, detail, since_us) VALUES (?1, ?2, ?3, ?4)",
                    params![h.row_id, h.reason.as_str(), h.detail, self.now],
                )?;
                self.state.held.insert(h.row_id, size as u64);
                self.state.held_bytes += size as u64;
                HoldOutcome::Held
            }
        };
        self.held.hold_answers.push((reply, outcome));
        Ok(())
    }

    /// Release one held row, or all of them: they are ordinary undelivered rows again.
    fn unhold(&mut self, which: Option<i64>, reply: Reply<Unheld>) -> rusqlite::Result<()> {
        let mut row_ids: Vec<i64> = match which {
            Some(id) => self
                .state
                .held
                .contains_key(&id)
                .then_some(id)
                .into_iter()
                .collect(),
            None => self.state.held.keys().copied().collect(),
        };
        row_ids.sort_unstable();
        for id in &row_ids {
            self.db
                .prepare_cached("DELETE FROM held WHERE row_id = ?1")?
                .execute(params![id])?;
            if let Some(size) = self.state.held.remove(id) {
                self.state.held_bytes -= size;
            }
        }
        self.held.unhold_answers.push((reply, Unheld { row_ids }));
        Ok(())
    }

    /// Prune once this group has committed (pruning runs its own transactions).
    fn prune(&mut self) {
        self.held.prune = true;
    }

    /// Answered after everything else this group does.
    fn flush(&mut self, done: oneshot::Sender<()>) {
        self.held.flushes.push(done);
    }

    fn increment(&mut self, key: &'static str, reply: Reply<i64>) -> rusqlite::Result<()> {
        let value: i64 = self.db.query_row(
            "INSERT INTO meta (key, value) VALUES (?1, '0') \
             ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1 \
             RETURNING CAST(value AS INTEGER)",
            params![key],
            |r| r.get(0),
        )?;
        self.held.increments.push((reply, value));
        Ok(())
    }

    fn put_meta(&mut self, key: &'static str, value: String) -> rusqlite::Result<()> {
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) \
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    fn quarantine(&mut self, m: RejectedMessage, reply: Reply<i64>) -> rusqlite::Result<()> {
        self.db.execute(
            "INSERT INTO rejected (feed, source_kind, peer, received_at_us, error_code, \
             error_location, reason, control_id, sending_application, \
             sending_facility, message_type, size, raw) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                &*m.feed,
                m.source_kind.as_str(),
                m.peer,
                m.received_at_us,
                m.error_code,
                m.error_location,
                m.reason,
                m.control_id,
                m.sending_application,
                m.sending_facility,
                m.message_type,
                m.raw.len() as i64,
                m.raw,
            ],
        )?;
        self.held
            .quarantined
            .push((reply, self.db.last_insert_rowid()));
        Ok(())
    }

    /// Delete a quarantined message; answered the same whether or not it was still there.
    fn forget_rejected(&mut self, id: i64, reply: Reply<()>) -> rusqlite::Result<()> {
        self.db
            .execute("DELETE FROM rejected WHERE id = ?1", params![id])?;
        self.held.forgotten.push(reply);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{msg, opts};
    use super::super::{Outbox, SourceKind};
    use super::*;

    #[tokio::test]
    async fn full_store_refuses_new_messages_and_keeps_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _w) = Outbox::open(&dir.path().join("o.sqlite"), opts(10)).unwrap();
        ob.append(msg("a", "12345678")).await.unwrap();
        let err = ob.append(msg("a", "123")).await.unwrap_err();
        assert!(matches!(
            err,
            AppendError::Full {
                pending_bytes: 8,
                max_bytes: 10
            }
        ));
        let rows = ob.reader().unwrap().pending_after(0, 10, u64::MAX).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].raw, b"12345678");
        // Delivering frees room.
        ob.mark_delivered(vec![rows[0].row_id]).await;
        ob.flush().await;
        assert_eq!(ob.append(msg("a", "123")).await.unwrap().seq, 2);
    }

    #[tokio::test]
    async fn concurrent_appends_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _w) = Outbox::open(&dir.path().join("o.sqlite"), opts(1 << 30)).unwrap();
        let mut tasks = Vec::new();
        for t in 0..8 {
            let ob = ob.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    ob.append(msg("a", &format!("{t}-{i}"))).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let g = ob.gauges();
        assert_eq!(g.appended.load(Ordering::Relaxed), 400);
        assert!(g.commits.load(Ordering::Relaxed) < 400);
        let rows = ob
            .reader()
            .unwrap()
            .pending_after(0, 1000, u64::MAX)
            .unwrap();
        let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=400).collect::<Vec<_>>());
    }

    fn rejected(reason: &str) -> RejectedMessage {
        RejectedMessage {
            feed: Arc::from("a"),
            source_kind: SourceKind::Mllp,
            peer: None,
            received_at_us: now_us(),
            error_code: 100,
            error_location: Some("MSH-10".into()),
            reason: reason.into(),
            control_id: None,
            sending_application: None,
            sending_facility: None,
            message_type: None,
            raw: b"MSH|".to_vec(),
        }
    }

    #[tokio::test]
    async fn meta_and_quarantine_commands_answer_with_their_own_values() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, w) = Outbox::open(&dir.path().join("o.sqlite"), opts(1 << 20)).unwrap();
        assert_eq!(ob.increment("bdseq").await.unwrap(), 0);
        assert_eq!(ob.increment("bdseq").await.unwrap(), 1);
        ob.put_meta("inventory", "{}".into()).await;
        let first = ob.quarantine(rejected("one")).await.unwrap();
        let second = ob.quarantine(rejected("two")).await.unwrap();
        assert!(second > first);
        ob.forget_rejected(first).await.unwrap();
        // Forgetting what is not there is not an error.
        ob.forget_rejected(first).await.unwrap();
        ob.flush().await;
        let r = ob.reader().unwrap();
        assert_eq!(r.meta("bdseq").unwrap().as_deref(), Some("1"));
        assert_eq!(r.meta("inventory").unwrap().as_deref(), Some("{}"));
        let left: Vec<i64> = r.quarantined(None).unwrap().iter().map(|q| q.id).collect();
        assert_eq!(left, [second]);
        drop(ob);
        w.join();
    }

    #[tokio::test]
    async fn a_failed_transaction_stores_nothing_and_tells_no_sender_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
        assert_eq!(ob.append(msg("a", "before")).await.unwrap().seq, 1);
        // A statement that fails for one message, and the write lock held elsewhere so that what
        // is queued next is likely to land in one group with it.
        let other = Connection::open(&path).unwrap();
        other
            .execute_batch(
                "CREATE TRIGGER boom BEFORE INSERT ON messages WHEN NEW.control_id = 'BOOM' \
                 BEGIN SELECT RAISE(ABORT, 'boom'); END; BEGIN IMMEDIATE;",
            )
            .unwrap();
        let boom = NewMessage {
            control_id: Some("BOOM".into()),
            ..msg("a", "boom")
        };
        let (inc_tx, inc_rx) = oneshot::channel();
        let (q_tx, q_rx) = oneshot::channel();
        let answers = {
            let ob = ob.clone();
            tokio::spawn(async move {
                ob.append_all(vec![msg("a", "x"), boom, msg("a", "y")])
                    .await
            })
        };
        ob.tx.send(Cmd::Increment("n", inc_tx)).await.ok().unwrap();
        ob.tx
            .send(Cmd::Quarantine(rejected("r"), q_tx))
            .await
            .ok()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        other.execute_batch("COMMIT").unwrap();
        let answers = answers.await.unwrap();
        let inc = inc_rx.await.unwrap_or(Err(AppendError::Closed));
        let quarantined = q_rx.await.unwrap_or(Err(AppendError::Closed));
        ob.flush().await;

        // Every `Ok` is in the database, every error is not; the failing message is never `Ok`.
        assert!(answers[1].is_err(), "{:?}", answers[1]);
        let r = ob.reader().unwrap();
        let rows = r.pending_after(0, 100, u64::MAX).unwrap();
        let stored: Vec<(i64, u64)> = rows.iter().map(|p| (p.row_id, p.seq)).collect();
        let told: Vec<(i64, u64)> = std::iter::once((1, 1))
            .chain(answers.iter().flatten().map(|s| (s.row_id, s.seq)))
            .collect();
        assert_eq!(stored, told);
        assert_eq!(r.meta("n").unwrap().is_some(), inc.is_ok());
        assert_eq!(
            r.quarantined(None).unwrap().len(),
            quarantined.iter().count()
        );
        // Row ids and seqs carry on from what was stored, without a gap.
        let next = ob.append(msg("a", "after")).await.unwrap();
        assert_eq!(
            (next.row_id, next.seq),
            (stored.len() as i64 + 1, stored.len() as u64 + 1)
        );
        assert_eq!(
            ob.gauges().pending_count.load(Ordering::Relaxed),
            stored.len() as u64 + 1
        );
        drop(ob);
        w.join();
    }
}
