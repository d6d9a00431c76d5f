//! The writer thread: the only code that changes the database.
//!
//! One thread owns the writing `rusqlite::Connection` and the in-memory state that goes with it
//! ([`WriterState`]: next row id, each feed's last `seq`, pending counts, counted bytes, the
//! space reserve, the duplicate index). [`Outbox`](super::Outbox) handles send it a [`Cmd`]
//! over a bounded channel. The loop ([`run`]) takes everything queued, up to [`MAX_BATCH`]
//! commands, as one group and [`commit_group`] applies it in ONE `IMMEDIATE` transaction, one
//! [`Group`] method per command, and commits once: many senders share one fsync. Each command's
//! answer waits (an [`Answer`] per command) until the outcome of the commit is known.
//!
//! **Group commit.** When the previous commit carried several senders' appends, those senders
//! are about to send again: the loop waits up to [`GROUP_COMMIT_WAIT`] until as many appends as
//! that commit carried are queued, so they share the next fsync instead of splitting into
//! alternating half-full commits. A lone sender never waits.
//!
//! **After the transaction**, in this order: the gauges (if it committed), the answers, pruning
//! if a `Prune` was in the group or space is short or over the cap (its own transactions,
//! [`super::prune`]), then the flushes.
//!
//! **Every command gets its own true answer.** When a statement fails, the transaction is
//! rolled back, the in-memory state goes back to what it was before the group, the failing
//! command is taken out of the group with its own answer (`Failed` with the SQLite error), and
//! the rest of the group is applied again without it, in a new transaction; so one bad message
//! costs its neighbours a second attempt, never their answer. `SQLITE_FULL` is different: the
//! first one releases the space reserve ([`super::space`]), every append and quarantine entry
//! still in the group is refused `Full` (disk), and the rest (delivery marks, holds and
//! releases, meta, forgetting) is applied again in the room the reserve left. A commit that
//! fails for another reason answers every command in it `Failed` with that error. Nothing is
//! ever answered `Closed` while the writer runs. If the transaction could not even begin (the
//! write lock held elsewhere), the group is kept and tried again, with whatever is queued by
//! then, once another command arrives.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rusqlite::{CachedStatement, Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{debug, error, warn};

use super::dedup::{self, DedupEntry, DedupIndex, Seen, dedup_key};
use super::held::{Hold, HoldOutcome, Unheld};
use super::space::{self, Space};
use super::steps::Steps;
use super::{
    AppendError, Full, NewMessage, OutboxError, OutboxGauges, OutboxOptions, RejectedMessage,
    Stored, prune, sqlite,
};
use crate::clock::Clock;

/// Depth of the command channel into the writer thread (bounded: sources wait when it is full).
const CMD_CHANNEL_DEPTH: usize = 8192;
/// Most commands applied in one transaction.
const MAX_BATCH: usize = 4096;
/// Longest the writer waits for the previous commit's senders before committing without them.
const GROUP_COMMIT_WAIT: Duration = Duration::from_micros(200);
/// How often an idle writer looks at the disk while short of space.
const SHORT_POLL: Duration = Duration::from_millis(200);
/// Least time between two prunes started because the store is over its cap.
const CAP_PRUNE_EVERY: Duration = Duration::from_secs(1);
/// The store's size on disk is measured exactly at least this often while it is well under its
/// cap (between, groups add an over-estimate: [`WriterState::measure_after_group`]).
const EXACT_EVERY: Duration = Duration::from_millis(250);
/// What a stored message costs beyond its bytes (row header, `pending` row, index cells): used
/// only to count a group's appends against the cap before the group is measured after commit.
const ROW_OVERHEAD: u64 = 128;

/// `meta` key: the highest row id ever handed out (written by pruning before it deletes rows),
/// so ids are never reused even when the newest rows are pruned.
pub(super) const LAST_ROW_ID_KEY: &str = "last_row_id";
/// `meta` key: the highest quarantine id ever handed out (written whenever quarantine rows are
/// deleted).
pub(super) const LAST_REJECTED_ID_KEY: &str = "last_rejected_id";

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
    /// Keep several rejected messages (one batch's) in quarantine in one transaction; answers
    /// each one's quarantine id or why it was not kept, in order.
    QuarantineAll(Vec<RejectedMessage>, Reply<Vec<Result<i64, AppendError>>>),
    /// Delete a quarantined message (it has been stored as a message again).
    ForgetRejected(i64, Reply<()>),
    /// Set an undelivered row aside (its record cannot be published); answers what happened.
    Hold(Hold, Reply<HoldOutcome>),
    /// Release one held row (or every one, `None`); answers the rows released.
    Unhold(Option<i64>, Reply<Unheld>),
}

impl Cmd {
    /// Commands that add data (refused while the disk is full).
    fn adds_data(&self) -> bool {
        matches!(
            self,
            Cmd::Append(..) | Cmd::Quarantine(..) | Cmd::QuarantineAll(..)
        )
    }

    /// This command's answer when it is taken out of its group with `err`.
    fn failed(&self, err: AppendError) -> Answer {
        match self {
            Cmd::Append(..) => Answer::Stored(Err(err)),
            Cmd::Increment(..) | Cmd::Quarantine(..) => Answer::Value(Err(err)),
            Cmd::QuarantineAll(..) => Answer::Values(Err(err)),
            Cmd::ForgetRejected(..) => Answer::Done(Err(err)),
            Cmd::Hold(..) => Answer::Hold(Err(err)),
            Cmd::Unhold(..) => Answer::Unhold(Err(err)),
            Cmd::MarkDelivered(ids) => {
                error!(
                    rows = ids.len(),
                    error = %err,
                    "delivered marks could not be written: those records stay pending and are \
                     sent again after the next reconnect"
                );
                Answer::Nothing
            }
            Cmd::PutMeta(key, _) => {
                error!(key, error = %err, "could not store a meta value");
                Answer::Nothing
            }
            Cmd::Prune | Cmd::Flush(_) => Answer::Nothing,
        }
    }
}

/// One command's answer, decided while its group is applied (or when it is taken out of the
/// group) and sent once the outcome is known.
pub(super) enum Answer {
    /// No answer (yet), or a command that answers nothing.
    Nothing,
    Stored(Result<Stored, AppendError>),
    Value(Result<i64, AppendError>),
    Values(Result<Vec<Result<i64, AppendError>>, AppendError>),
    Done(Result<(), AppendError>),
    Hold(Result<HoldOutcome, AppendError>),
    Unhold(Result<Unheld, AppendError>),
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
    /// The last `seq` of a feed with none of its own yet (0; above it after a damaged store
    /// whose numbers could not be read whole: `damage.rs`, `meta.seq_floor`).
    pub(super) seq_floor: u64,
    /// Next row id: only ever increases, across restarts too (see [`LAST_ROW_ID_KEY`]).
    pub(super) next_id: i64,
    /// Next quarantine id, likewise.
    pub(super) next_rejected_id: i64,
    pending_count: u64,
    pending_bytes: u64,
    /// Message bytes of every row (pending and delivered).
    pub(super) total_bytes: u64,
    /// Bytes kept in quarantine (as stored).
    pub(super) quarantine_bytes: u64,
    /// Bytes the store occupies on disk ([`space::used_bytes`]), measured after each commit
    /// and each prune.
    pub(super) used_bytes: u64,
    /// The WAL file, counted in `used_bytes`.
    pub(super) wal: PathBuf,
    /// The reserve and whether space is short.
    pub(super) space: Space,
    /// Delivered rows pruned before `retain_delivered` (space short or over the cap).
    pub(super) pruned_early: u64,
    /// When that last happened (µs), 0 if never.
    pub(super) retention_cut_at_us: i64,
    last_cap_prune: Option<Instant>,
    /// What pruning could not free when the cap last refused an append (cleared by the next
    /// append stored): new messages are refused until it goes down.
    refused_at: Option<u64>,
    /// Duplicate-detection index (where in `dedup_log` each key is), rebuilt from the log at
    /// open. Changed only after the commit that logged the change.
    pub(super) dedup: DedupIndex,
    /// Held rows (row id -> size), mirroring the `held` table, so a delivered mark looks at the
    /// table only for a row that is held.
    held: HashMap<i64, u64>,
    held_bytes: u64,
    /// The wall clock, and the steps noticed in it (`steps.rs`).
    pub(super) steps: Steps,
    /// When `used_bytes` was last measured exactly (see [`WriterState::measure_after_group`]).
    last_exact: Option<Instant>,
}

/// What a failed group puts back: everything its commands may have advanced.
struct Snapshot {
    last_seq: HashMap<Arc<str>, u64>,
    next_id: i64,
    next_rejected_id: i64,
    pending_count: u64,
    pending_bytes: u64,
    total_bytes: u64,
    quarantine_bytes: u64,
    held: HashMap<i64, u64>,
    held_bytes: u64,
}

fn meta_i64(conn: &Connection, key: &str) -> rusqlite::Result<i64> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
            r.get::<_, String>(0)
        })
        .optional()?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

impl WriterState {
    /// Read the state from the database at open.
    pub(super) fn load(
        conn: &Connection,
        path: &Path,
        opts: OutboxOptions,
        clock: Clock,
    ) -> Result<Self, OutboxError> {
        let e = sqlite(path);
        limit_wal(conn, opts.max_bytes).map_err(&e)?;
        // Stamps the clock cannot have written are corrected before anything reads them (the
        // duplicate index below included).
        let steps = Steps::open(conn, clock).map_err(&e)?;
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
        // The highest id ever handed out: what is still stored, what pruning recorded before
        // deleting, and what the delivery log and the duplicate log still name.
        let max_id: i64 = conn
            .query_row(
                "SELECT MAX(COALESCE((SELECT MAX(id) FROM messages), 0), \
                 COALESCE((SELECT MAX(id) FROM pending), 0), \
                 COALESCE((SELECT id FROM delivered ORDER BY n DESC LIMIT 1), 0), \
                 COALESCE((SELECT row_id FROM dedup_log ORDER BY id DESC LIMIT 1), 0))",
                [],
                |r| r.get(0),
            )
            .map_err(&e)?;
        let max_id = max_id.max(meta_i64(conn, LAST_ROW_ID_KEY).map_err(&e)?);
        let (pending_count, pending_bytes): (i64, i64) = conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM pending",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(&e)?;
        let total_bytes: i64 = conn
            .query_row("SELECT COALESCE(SUM(size), 0) FROM messages", [], |r| {
                r.get(0)
            })
            .map_err(&e)?;
        let (quarantine_bytes, max_rejected): (i64, i64) = conn
            .query_row(
                "SELECT COALESCE(SUM(length(raw)), 0), COALESCE(MAX(id), 0) FROM rejected",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(&e)?;
        let max_rejected = max_rejected.max(meta_i64(conn, LAST_REJECTED_ID_KEY).map_err(&e)?);
        let seq_floor = meta_i64(conn, super::damage::SEQ_FLOOR_KEY)
            .map_err(&e)?
            .max(0) as u64;
        let dedup = dedup::load_index(conn).map_err(&e)?;
        let wal = wal_path(path);
        let used_bytes = space::used_bytes(conn, &wal).map_err(&e)?;
        // A hold only ever names an undelivered row; drop any that outlived its row.
        conn.execute(
            "DELETE FROM held WHERE row_id NOT IN (SELECT id FROM pending)",
            [],
        )
        .map_err(&e)?;
        let mut held = HashMap::new();
        let mut stmt = conn
            .prepare("SELECT h.row_id, p.size FROM held h JOIN pending p ON p.id = h.row_id")
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
            seq_floor,
            next_id: max_id + 1,
            next_rejected_id: max_rejected + 1,
            pending_count: pending_count as u64,
            pending_bytes: pending_bytes as u64,
            total_bytes: total_bytes as u64,
            quarantine_bytes: quarantine_bytes as u64,
            used_bytes,
            last_exact: Some(Instant::now()),
            wal,
            space: Space::open(path),
            pruned_early: 0,
            retention_cut_at_us: 0,
            last_cap_prune: None,
            refused_at: None,
            dedup,
            held,
            held_bytes,
            steps,
        })
    }

    /// The wall clock now (µs).
    pub(super) fn now_us(&self) -> i64 {
        self.steps.clock.now_us()
    }

    /// Notice a step of the wall clock and move the stamps with it (`steps.rs`).
    pub(super) fn check_clock(&mut self, conn: &Connection) {
        self.steps.check(conn, &mut self.dedup);
    }

    /// Bytes on disk that pruning cannot free: everything but the delivered messages' bytes.
    fn fixed_bytes(&self) -> u64 {
        let delivered = self.total_bytes.saturating_sub(self.pending_bytes);
        self.used_bytes.saturating_sub(delivered)
    }

    /// Over the cap with delivered rows that pruning could free.
    pub(super) fn over_cap(&self) -> bool {
        self.used_bytes > self.opts.max_bytes && self.total_bytes > self.pending_bytes
    }

    pub(super) fn publish_gauges(&self, g: &OutboxGauges) {
        g.pending_count.store(self.pending_count, Ordering::Relaxed);
        g.pending_bytes.store(self.pending_bytes, Ordering::Relaxed);
        g.total_bytes.store(self.total_bytes, Ordering::Relaxed);
        g.store_bytes.store(self.used_bytes, Ordering::Relaxed);
        g.quarantine_bytes
            .store(self.quarantine_bytes, Ordering::Relaxed);
        g.space_short
            .store(self.space.is_short(), Ordering::Relaxed);
        let capped = self.refused_at.is_some_and(|f| self.fixed_bytes() >= f);
        g.refusing
            .store(self.space.is_short() || capped, Ordering::Relaxed);
        g.pruned_early.store(self.pruned_early, Ordering::Relaxed);
        g.retention_cut_at_us
            .store(self.retention_cut_at_us, Ordering::Relaxed);
        g.held_count
            .store(self.held.len() as u64, Ordering::Relaxed);
        g.held_bytes.store(self.held_bytes, Ordering::Relaxed);
        g.clock_steps.store(self.steps.count, Ordering::Relaxed);
        if let Some(step) = self.steps.last {
            g.clock_last_step_us.store(step.delta_us, Ordering::Relaxed);
            g.clock_last_step_at_us.store(step.at_us, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            last_seq: self.last_seq.clone(),
            next_id: self.next_id,
            next_rejected_id: self.next_rejected_id,
            pending_count: self.pending_count,
            pending_bytes: self.pending_bytes,
            total_bytes: self.total_bytes,
            quarantine_bytes: self.quarantine_bytes,
            held: self.held.clone(),
            held_bytes: self.held_bytes,
        }
    }

    fn restore(&mut self, s: Snapshot) {
        self.last_seq = s.last_seq;
        self.next_id = s.next_id;
        self.next_rejected_id = s.next_rejected_id;
        self.pending_count = s.pending_count;
        self.pending_bytes = s.pending_bytes;
        self.total_bytes = s.total_bytes;
        self.quarantine_bytes = s.quarantine_bytes;
        self.held = s.held;
        self.held_bytes = s.held_bytes;
    }

    /// Measure the bytes on disk again (after a prune, or a group when an estimate will not do).
    pub(super) fn measure(&mut self, conn: &Connection) {
        match space::used_bytes(conn, &self.wal) {
            Ok(n) => {
                self.used_bytes = n;
                self.last_exact = Some(Instant::now());
            }
            Err(e) => warn!(error = %e, "could not measure the outbox's size"),
        }
    }

    /// After a group commit: the size pragmas cost as much as the rest of a one-message group
    /// (SQLite parses a `PRAGMA` again at every use), so while the store is well under its cap
    /// (more than 1/16 of `max_bytes` to spare) and space is not short, a group adds an
    /// over-estimate of what it wrote (twice the message bytes, plus 512 bytes a row; a stored
    /// message takes about 1.7 times its bytes) and the exact figure is taken again at least
    /// every [`EXACT_EVERY`]. Near the cap, every group is measured exactly, as before.
    fn measure_after_group(&mut self, conn: &Connection, added_bytes: u64, rows: u64) {
        let estimate = added_bytes.saturating_mul(2) + rows * 512;
        let recent = self.last_exact.is_some_and(|t| t.elapsed() < EXACT_EVERY);
        let spare = self.opts.max_bytes / 16;
        if recent
            && !self.space.is_short()
            && self
                .used_bytes
                .saturating_add(estimate)
                .saturating_add(spare)
                < self.opts.max_bytes
        {
            self.used_bytes += estimate;
        } else {
            self.measure(conn);
        }
    }
}

/// `<db>-wal`.
fn wal_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}

/// Keep the WAL, which counts against the cap, a small part of it: checkpoint after
/// `max_bytes / 16` of WAL (at most the default 1000 pages) and truncate the file to
/// `max_bytes / 8` (at most 64 MiB) when it is reset.
fn limit_wal(conn: &Connection, max_bytes: u64) -> rusqlite::Result<()> {
    let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let checkpoint_pages = (max_bytes / 16 / page.max(512) as u64).clamp(16, 1000);
    let limit = (max_bytes / 8).clamp(64 * 1024, 64 * 1024 * 1024);
    conn.query_row(
        &format!("PRAGMA wal_autocheckpoint = {checkpoint_pages}"),
        [],
        |_| Ok(()),
    )?;
    conn.query_row(&format!("PRAGMA journal_size_limit = {limit}"), [], |_| {
        Ok(())
    })?;
    Ok(())
}

/// The single writer: take a group of commands, commit it, answer; until every handle is gone.
/// While space is short, an idle writer still looks at the disk every [`SHORT_POLL`], so
/// appends are taken again as soon as space is back.
fn run(
    mut conn: Connection,
    mut state: WriterState,
    mut rx: mpsc::Receiver<Cmd>,
    gauges: Arc<OutboxGauges>,
    appended: Arc<Notify>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut last_appends = 0usize;
    let mut closing = false;
    loop {
        if batch.is_empty() && !state.space.is_short() {
            match rx.blocking_recv() {
                Some(c) => batch.push(c),
                None => break,
            }
        } else {
            // Short of space, or a group kept because its transaction could not begin: poll,
            // so that space is looked at and the kept group tried again even when idle.
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(mpsc::error::TryRecvError::Empty) => {
                    std::thread::sleep(SHORT_POLL);
                    if batch.is_empty() {
                        upkeep(&mut conn, &mut state, false);
                        state.publish_gauges(&gauges);
                        continue;
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    if batch.is_empty() || closing {
                        if !batch.is_empty() {
                            error!(
                                commands = batch.len(),
                                "outbox closing with a group that could not be written"
                            );
                        }
                        break;
                    }
                    closing = true;
                }
            }
        }
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

/// Why a group's transaction did not commit.
enum Failure {
    /// It could not begin (the write lock held elsewhere): nothing was applied.
    Begin(rusqlite::Error),
    /// The command at this index failed.
    Command(usize, rusqlite::Error),
    /// Every command applied, but the commit failed.
    Commit(rusqlite::Error),
}

/// Apply one group, taking failing commands out and applying the rest again, until it commits
/// (or nothing is left to commit); then answer, prune if asked (or space is short, or over the
/// cap), and answer the flushes. Returns true if rows were added.
fn commit_group(
    conn: &mut Connection,
    state: &mut WriterState,
    batch: &mut Vec<Cmd>,
    gauges: &OutboxGauges,
) -> bool {
    // Before anything is stamped: a step since the last group moves what was stamped before it.
    state.check_clock(conn);
    let n = batch.len();
    // Final answers of the commands taken out of the group.
    let mut settled: Vec<Option<Answer>> = (0..n).map(|_| None).collect();
    let committed = loop {
        if settled.iter().all(Option::is_some) {
            break None;
        }
        let saved = state.snapshot();
        let mut answers: Vec<Answer> = (0..n).map(|_| Answer::Nothing).collect();
        let failure = match apply_group(conn, state, batch, &settled, &mut answers) {
            Ok(applied) => break Some((applied, answers)),
            Err(f) => f,
        };
        state.restore(saved);
        match failure {
            Failure::Begin(e) => {
                error!(error = %e, "outbox transaction could not begin; the group is kept and tried again");
                // Answer what is already decided; keep the rest for the next try.
                let mut kept = Vec::new();
                for (cmd, s) in batch.drain(..).zip(settled) {
                    match s {
                        Some(a) => {
                            send_answer(cmd, a, gauges);
                        }
                        None => kept.push(cmd),
                    }
                }
                *batch = kept;
                return false;
            }
            Failure::Command(i, e) => {
                let was_short = state.space.is_short();
                if space::is_full(&e) {
                    refuse_additions(state, batch, &mut settled);
                }
                // The failing command, unless the reserve was just released for it to use.
                if settled[i].is_none() && (was_short || !space::is_full(&e)) {
                    error!(error = %e, "outbox command failed; the rest of its group is applied without it");
                    settled[i] = Some(batch[i].failed(AppendError::Failed(e.to_string())));
                }
            }
            Failure::Commit(e) => {
                if space::is_full(&e) && !state.space.is_short() {
                    refuse_additions(state, batch, &mut settled);
                    continue;
                }
                error!(error = %e, "outbox commit failed; every command in it is answered with this error");
                for (s, cmd) in settled.iter_mut().zip(batch.iter()) {
                    if s.is_none() {
                        *s = Some(cmd.failed(AppendError::Failed(e.to_string())));
                    }
                }
                break None;
            }
        }
    };
    let (added, wrote) = match committed {
        Some((applied, answers)) => {
            for (log_id, key, entry) in applied.logged {
                state.dedup.logged(log_id, key, entry);
            }
            gauges.commits.fetch_add(1, Ordering::Relaxed);
            let quarantined = batch.iter().zip(&settled).any(|(c, s)| {
                s.is_none() && matches!(c, Cmd::Quarantine(..) | Cmd::QuarantineAll(..))
            });
            if quarantined {
                gauges.quarantine_commits.fetch_add(1, Ordering::Relaxed);
            }
            gauges
                .appended
                .fetch_add(applied.appended, Ordering::Relaxed);
            gauges
                .delivered
                .fetch_add(applied.delivered, Ordering::Relaxed);
            for (s, a) in settled.iter_mut().zip(answers) {
                if s.is_none() {
                    *s = Some(a);
                }
            }
            (
                applied.appended > 0,
                Some((applied.added, applied.appended + applied.delivered)),
            )
        }
        None => (false, None),
    };
    match wrote {
        Some((bytes, rows)) => state.measure_after_group(conn, bytes, rows),
        None => state.measure(conn),
    }
    // Counters first, answers second: whoever learns of the commit sees it counted.
    state.publish_gauges(gauges);
    let mut prune = false;
    let mut flushes = Vec::new();
    for (cmd, a) in batch.drain(..).zip(settled) {
        match cmd {
            Cmd::Prune => prune = true,
            Cmd::Flush(done) => flushes.push(done),
            cmd => send_answer(cmd, a.unwrap_or(Answer::Nothing), gauges),
        }
    }
    upkeep(conn, state, prune);
    for f in flushes {
        let _ = f.send(());
    }
    added
}

/// The disk is full: release the reserve (once) and refuse every append and quarantine entry
/// not yet answered, so the room the reserve leaves goes to delivery marks and pruning.
fn refuse_additions(state: &mut WriterState, batch: &[Cmd], settled: &mut [Option<Answer>]) {
    state.space.release();
    for (s, cmd) in settled.iter_mut().zip(batch) {
        if s.is_none() && cmd.adds_data() {
            *s = Some(cmd.failed(disk_full(state)));
        }
    }
}

fn disk_full(state: &WriterState) -> AppendError {
    AppendError::Full {
        reason: Full::Disk,
        used_bytes: state.used_bytes,
        max_bytes: state.opts.max_bytes,
    }
}

/// Send one command's answer (counting refusals and recognised resends).
fn send_answer(cmd: Cmd, a: Answer, gauges: &OutboxGauges) {
    fn missing<T>() -> Result<T, AppendError> {
        Err(AppendError::Failed(
            "the outbox did not apply this command".into(),
        ))
    }
    match (cmd, a) {
        (Cmd::Append(_, reply), a) => {
            let r = match a {
                Answer::Stored(r) => r,
                _ => missing(),
            };
            match &r {
                Ok(s) if s.duplicate => {
                    gauges.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                Err(AppendError::Full { .. }) => {
                    gauges.refused_full.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            let _ = reply.send(r);
        }
        (Cmd::Increment(_, reply), a) | (Cmd::Quarantine(_, reply), a) => {
            let r = match a {
                Answer::Value(r) => r,
                _ => missing(),
            };
            if let Err(AppendError::Full { .. }) = &r {
                gauges.refused_full.fetch_add(1, Ordering::Relaxed);
            }
            let _ = reply.send(r);
        }
        (Cmd::QuarantineAll(_, reply), a) => {
            let r = match a {
                Answer::Values(r) => r,
                _ => missing(),
            };
            let full = match &r {
                Ok(each) => each
                    .iter()
                    .filter(|e| matches!(e, Err(AppendError::Full { .. })))
                    .count(),
                Err(AppendError::Full { .. }) => 1,
                Err(_) => 0,
            };
            gauges
                .refused_full
                .fetch_add(full as u64, Ordering::Relaxed);
            let _ = reply.send(r);
        }
        (Cmd::ForgetRejected(_, reply), a) => {
            let r = match a {
                Answer::Done(r) => r,
                _ => missing(),
            };
            let _ = reply.send(r);
        }
        (Cmd::Flush(done), _) => {
            let _ = done.send(());
        }
        (Cmd::Hold(_, reply), a) => {
            let r = match a {
                Answer::Hold(r) => r,
                _ => missing(),
            };
            let _ = reply.send(r);
        }
        (Cmd::Unhold(_, reply), a) => {
            let r = match a {
                Answer::Unhold(r) => r,
                _ => missing(),
            };
            let _ = reply.send(r);
        }
        (Cmd::MarkDelivered(_) | Cmd::PutMeta(..) | Cmd::Prune, _) => {}
    }
}

/// After a group (or, while space is short, when idle): prune when asked, when space is short
/// (at most once a second) or when over the cap with delivered rows to prune; then, if short,
/// try to make the reserve again.
fn upkeep(conn: &mut Connection, state: &mut WriterState, asked: bool) {
    let recover = state.space.attempt_due();
    let cap = state.over_cap()
        && state
            .last_cap_prune
            .is_none_or(|t| t.elapsed() >= CAP_PRUNE_EVERY);
    if !(asked || recover || cap) {
        return;
    }
    if cap {
        state.last_cap_prune = Some(Instant::now());
    }
    if let Err(e) = prune::run(conn, state) {
        error!(error = %e, "pruning delivered messages failed");
    }
    if state.space.is_short() {
        state.space.try_restore();
    }
    state.measure(conn);
}

/// Begin the transaction, apply every command of the group not yet settled, in order, commit.
fn apply_group(
    conn: &mut Connection,
    state: &mut WriterState,
    batch: &[Cmd],
    settled: &[Option<Answer>],
    answers: &mut [Answer],
) -> Result<Applied, Failure> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(Failure::Begin)?;
    let applied = {
        let mut group = Group::begin(&tx, state).map_err(Failure::Commit)?;
        for (i, cmd) in batch.iter().enumerate() {
            if settled[i].is_none() {
                answers[i] = group.apply(cmd).map_err(|e| Failure::Command(i, e))?;
            }
        }
        group.finish()
    };
    tx.commit().map_err(Failure::Commit)?;
    Ok(applied)
}

/// What a committed group changed that the writer's state and gauges take on after the commit.
struct Applied {
    /// The `dedup_log` rows it wrote (log id, key, entry), in id order.
    logged: Vec<(i64, u64, DedupEntry)>,
    /// Message bytes it added (appends and quarantine).
    added: u64,
    appended: u64,
    delivered: u64,
}

const INSERT_MESSAGE: &str = "INSERT INTO messages (id, record_id, feed, seq, received_at_us, \
     source_kind, peer, format, control_id, size, raw, reprocessed, control_id_reused, \
     truncated_bytes, peer_certificate) VALUES (?11, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?12, ?13, ?14, ?15)";

const INSERT_PENDING: &str = "INSERT INTO pending (id, size) VALUES (?1, ?2)";

const TAKE_PENDING: &str = "DELETE FROM pending WHERE id = ?1 RETURNING size";

const LOG_DELIVERED: &str = "INSERT INTO delivered (id, delivered_at_us) VALUES (?1, ?2)";

/// One group being applied inside its transaction: one method per command, each returning the
/// command's answer. Row ids, seqs and pending counts advance in [`WriterState`] as it goes
/// (put back if the transaction fails); duplicate-index entries and the appended/delivered
/// counts wait in the group until the commit.
struct Group<'t> {
    db: &'t Connection,
    /// The statements of the hot path, prepared once per group.
    insert: CachedStatement<'t>,
    insert_pending: CachedStatement<'t>,
    take_pending: CachedStatement<'t>,
    log_delivered: CachedStatement<'t>,
    state: &'t mut WriterState,
    /// The group's clock for delivered marks.
    now: i64,
    /// Bytes this group has added (counted against the cap with `state.used_bytes`).
    added: u64,
    /// The `dedup_log` rows this group wrote, for the index after the commit, and the latest
    /// entry per key among them (looked up before the index).
    logged: Vec<(i64, u64, DedupEntry)>,
    logged_latest: HashMap<u64, DedupEntry>,
    appended: u64,
    delivered: u64,
}

impl<'t> Group<'t> {
    fn begin(db: &'t Connection, state: &'t mut WriterState) -> rusqlite::Result<Self> {
        Ok(Group {
            db,
            insert: db.prepare_cached(INSERT_MESSAGE)?,
            insert_pending: db.prepare_cached(INSERT_PENDING)?,
            take_pending: db.prepare_cached(TAKE_PENDING)?,
            log_delivered: db.prepare_cached(LOG_DELIVERED)?,
            now: state.now_us(),
            state,
            added: 0,
            logged: Vec::new(),
            logged_latest: HashMap::new(),
            appended: 0,
            delivered: 0,
        })
    }

    fn apply(&mut self, cmd: &Cmd) -> rusqlite::Result<Answer> {
        match cmd {
            Cmd::Append(msg, _) => self.append(msg).map(Answer::Stored),
            Cmd::MarkDelivered(ids) => self.mark_delivered(ids).map(|()| Answer::Nothing),
            Cmd::Prune | Cmd::Flush(_) => Ok(Answer::Nothing),
            Cmd::Increment(key, _) => self.increment(key).map(|v| Answer::Value(Ok(v))),
            Cmd::PutMeta(key, value) => self.put_meta(key, value).map(|()| Answer::Nothing),
            Cmd::Quarantine(m, _) => self.quarantine(m).map(Answer::Value),
            Cmd::QuarantineAll(ms, _) => ms
                .iter()
                .map(|m| self.quarantine(m))
                .collect::<rusqlite::Result<Vec<_>>>()
                .map(|each| Answer::Values(Ok(each))),
            Cmd::ForgetRejected(id, _) => self.forget_rejected(*id).map(|()| Answer::Done(Ok(()))),
            Cmd::Hold(h, _) => self.hold(h).map(|o| Answer::Hold(Ok(o))),
            Cmd::Unhold(which, _) => self.unhold(*which).map(|u| Answer::Unhold(Ok(u))),
        }
    }

    fn finish(self) -> Applied {
        Applied {
            logged: self.logged,
            added: self.added,
            appended: self.appended,
            delivered: self.delivered,
        }
    }

    /// Whether `bytes` more fit under the cap, counting everything on disk except what pruning
    /// can free (delivered messages).
    fn room_for(&mut self, bytes: u64) -> Result<(), AppendError> {
        if self.state.space.is_short() {
            return Err(disk_full(self.state));
        }
        let fixed = self.state.fixed_bytes() + self.added;
        let max_bytes = self.state.opts.max_bytes;
        if fixed + bytes > max_bytes {
            self.state.refused_at = Some(self.state.fixed_bytes());
            return Err(AppendError::Full {
                reason: Full::Cap,
                used_bytes: fixed,
                max_bytes,
            });
        }
        Ok(())
    }

    /// Store one message: or answer a resend again without storing it, or refuse it when the
    /// disk is short or the store would pass its cap.
    fn append(&mut self, msg: &NewMessage) -> rusqlite::Result<Result<Stored, AppendError>> {
        let size = msg.raw.len() as u64;
        // A resend of something already stored within the window: answer again, store nothing.
        // Same control id with other content: store and flag.
        let keyed = msg
            .dedup
            .as_ref()
            .map(|k| (k, dedup_key(&msg.feed, &k.sender, &k.control_id)));
        let seen = match keyed {
            Some((k, key)) => {
                let prior = match self.logged_latest.get(&key) {
                    Some(e) => Some(*e),
                    None => self.state.dedup.latest(self.db, key)?,
                };
                k.check(prior, msg.received_at_us)
            }
            None => Seen::New,
        };
        let reused = match seen {
            Seen::Resend(original) => return self.answer_resend(original).map(Ok),
            Seen::Reused => true,
            Seen::New => false,
        };
        if let Err(full) = self.room_for(size + ROW_OVERHEAD) {
            return Ok(Err(full));
        }
        let row_id = self.state.next_id;
        let seq = self
            .state
            .last_seq
            .get(&msg.feed)
            .copied()
            .unwrap_or(self.state.seq_floor)
            + 1;
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
            msg.truncated_bytes as i64,
            msg.peer_certificate,
        ])?;
        self.insert_pending.execute(params![row_id, size as i64])?;
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
            let entry = DedupEntry {
                hash: k.hash,
                row_id,
                seq,
                at_us: msg.received_at_us,
            };
            self.logged.push((self.db.last_insert_rowid(), key, entry));
            self.logged_latest.insert(key, entry);
        }
        self.state.next_id += 1;
        self.state.last_seq.insert(msg.feed.clone(), seq);
        self.state.pending_count += 1;
        self.state.pending_bytes += size;
        self.state.total_bytes += size;
        self.added += size + ROW_OVERHEAD;
        self.appended += 1;
        self.state.refused_at = None;
        Ok(Ok(Stored {
            row_id,
            seq,
            record_id,
            duplicate: false,
        }))
    }

    /// An append recognised as a resend: answer with the original's row, seq and record id.
    fn answer_resend(&mut self, original: DedupEntry) -> rusqlite::Result<Stored> {
        let record_id: String = self
            .db
            .prepare_cached("SELECT record_id FROM messages WHERE id = ?1")?
            .query_row(params![original.row_id], |r| r.get(0))
            .optional()?
            .unwrap_or_default();
        Ok(Stored {
            row_id: original.row_id,
            seq: original.seq,
            record_id,
            duplicate: true,
        })
    }

    /// Mark rows delivered: a few bytes each (the row leaves `pending`, its id and time join
    /// the `delivered` log); the message itself is not touched. A row already delivered (or
    /// gone) is left alone. A held row that was delivered anyway (resent by a replay) is no
    /// longer held.
    fn mark_delivered(&mut self, ids: &[i64]) -> rusqlite::Result<()> {
        let (mut count, mut bytes) = (0u64, 0u64);
        for &id in ids {
            let size: Option<i64> = self
                .take_pending
                .query_row(params![id], |r| r.get(0))
                .optional()?;
            if let Some(size) = size {
                self.log_delivered.execute(params![id, self.now])?;
                count += 1;
                bytes += size as u64;
                if let Some(held) = self.state.held.remove(&id) {
                    self.db
                        .prepare_cached("DELETE FROM held WHERE row_id = ?1")?
                        .execute(params![id])?;
                    self.state.held_bytes -= held;
                }
            }
        }
        self.state.pending_count -= count;
        self.state.pending_bytes -= bytes;
        self.delivered += count;
        Ok(())
    }

    /// Set an undelivered row aside: it stays stored and undelivered (its `pending` row
    /// stays), and the sink's pending reads no longer return it. Holding a held row again
    /// updates its reason and detail.
    fn hold(&mut self, h: &Hold) -> rusqlite::Result<HoldOutcome> {
        let size: Option<i64> = self
            .db
            .prepare_cached("SELECT size FROM pending WHERE id = ?1")?
            .query_row(params![h.row_id], |r| r.get(0))
            .optional()?;
        Ok(match size {
            None => HoldOutcome::NotPending,
            Some(_) if self.state.held.contains_key(&h.row_id) => {
                self.db
                    .prepare_cached("UPDATE held SET reason = ?2, detail = ?3 WHERE row_id = ?1")?
                    .execute(params![h.row_id, h.reason.as_str(), h.detail])?;
                HoldOutcome::AlreadyHeld
            }
            Some(size) => {
                self.db
                    .prepare_cached(
                        "INSERT INTO held (row_id, reason, detail, since_us) \
                         VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![h.row_id, h.reason.as_str(), h.detail, self.now])?;
                self.state.held.insert(h.row_id, size as u64);
                self.state.held_bytes += size as u64;
                HoldOutcome::Held
            }
        })
    }

    /// Release one held row, or all of them: they are ordinary undelivered rows again.
    fn unhold(&mut self, which: Option<i64>) -> rusqlite::Result<Unheld> {
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
        Ok(Unheld { row_ids })
    }

    fn increment(&mut self, key: &str) -> rusqlite::Result<i64> {
        self.db.query_row(
            "INSERT INTO meta (key, value) VALUES (?1, '0') \
             ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1 \
             RETURNING CAST(value AS INTEGER)",
            params![key],
            |r| r.get(0),
        )
    }

    fn put_meta(&mut self, key: &str, value: &str) -> rusqlite::Result<()> {
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) \
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Keep a rejected message (only its first bytes when it is not HL7 at all), within the
    /// quarantine's own budget and the store's cap.
    fn quarantine(&mut self, m: &RejectedMessage) -> rusqlite::Result<Result<i64, AppendError>> {
        let kept = &m.raw[..super::message::quarantine_keep(&m.raw)];
        let bytes = kept.len() as u64;
        let s = &*self.state;
        if !s.space.is_short() && s.quarantine_bytes + bytes > s.opts.quarantine_max_bytes {
            return Ok(Err(AppendError::Full {
                reason: Full::Quarantine,
                used_bytes: s.quarantine_bytes,
                max_bytes: s.opts.quarantine_max_bytes,
            }));
        }
        if let Err(full) = self.room_for(bytes + ROW_OVERHEAD) {
            return Ok(Err(full));
        }
        let id = self.state.next_rejected_id;
        self.db
            .prepare_cached(
                "INSERT INTO rejected (id, feed, source_kind, peer, received_at_us, error_code, \
                 error_location, reason, control_id, sending_application, \
                 sending_facility, message_type, size, raw) \
                 VALUES (?14, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?
            .execute(params![
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
                kept,
                id,
            ])?;
        self.state.next_rejected_id += 1;
        self.state.quarantine_bytes += bytes;
        self.added += bytes + ROW_OVERHEAD;
        Ok(Ok(id))
    }

    /// Delete a quarantined message; answered the same whether or not it was still there. Its
    /// id is never handed out again.
    fn forget_rejected(&mut self, id: i64) -> rusqlite::Result<()> {
        let freed: Option<i64> = self
            .db
            .query_row(
                "DELETE FROM rejected WHERE id = ?1 RETURNING length(raw)",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(n) = freed {
            record_high_water(
                self.db,
                LAST_REJECTED_ID_KEY,
                self.state.next_rejected_id - 1,
            )?;
            self.state.quarantine_bytes = self.state.quarantine_bytes.saturating_sub(n as u64);
        }
        Ok(())
    }
}

/// Raise a high-water mark in `meta` (never lowers it).
pub(super) fn record_high_water(db: &Connection, key: &str, value: i64) -> rusqlite::Result<()> {
    db.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, CAST(?2 AS TEXT)) \
         ON CONFLICT(key) DO UPDATE SET value = \
           CAST(MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER)) AS TEXT)",
    )?
    .execute(params![key, value])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{msg, opts};
    use super::super::{Full, Outbox, SourceKind};
    use super::*;

    /// The cap counts what is on disk; delivered rows go first (before `retain_delivered`),
    /// pending ones never.
    #[tokio::test]
    async fn the_cap_refuses_new_messages_keeps_the_pending_and_prunes_delivered_first() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 2 << 20;
        let (ob, w) = Outbox::open(&dir.path().join("o.sqlite"), opts(cap)).unwrap();
        let body = "x".repeat(100 * 1024);
        let mut stored = Vec::new();
        let err = loop {
            match ob.append(msg("a", &body)).await {
                Ok(s) => stored.push(s),
                Err(e) => break e,
            }
            assert!(stored.len() < 100, "the cap never refused");
        };
        assert!(
            matches!(
                err,
                AppendError::Full {
                    reason: Full::Cap,
                    max_bytes,
                    ..
                } if max_bytes == cap
            ),
            "{err:?}"
        );
        let g = ob.gauges();
        assert!(stored.len() >= 12, "{} x 100 KiB under 2 MiB", stored.len());
        assert!(g.store_bytes.load(Ordering::Relaxed) <= cap);
        assert!(g.refusing.load(Ordering::Relaxed));
        let rows = ob
            .reader()
            .unwrap()
            .pending_after(0, 100, u64::MAX)
            .unwrap();
        assert_eq!(rows.len(), stored.len(), "nothing pending was dropped");
        // Delivered rows make room at once, although retention (an hour) has not passed: they
        // are pruned first.
        ob.mark_delivered(rows.iter().map(|r| r.row_id).collect())
            .await;
        ob.flush().await;
        for _ in 0..stored.len() {
            ob.append(msg("a", &body)).await.unwrap();
        }
        ob.flush().await;
        assert!(g.pruned_early.load(Ordering::Relaxed) > 0);
        assert!(g.retention_cut_at_us.load(Ordering::Relaxed) > 0);
        assert!(g.store_bytes.load(Ordering::Relaxed) <= cap);
        assert_eq!(g.pending_count.load(Ordering::Relaxed), stored.len() as u64);
        drop(ob);
        w.join();
    }

    /// Recording a PUBACK writes a few pages (the `pending` row goes, a `delivered` row is
    /// logged), never a copy of the message: the WAL grows by a handful of frames for 20
    /// messages of 100 KiB each.
    #[tokio::test]
    async fn delivery_marks_write_a_few_pages_not_the_messages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let (ob, w) = Outbox::open(&path, opts(1 << 30)).unwrap();
        let body = "x".repeat(100 * 1024);
        let mut ids = Vec::new();
        for _ in 0..20 {
            ids.push(ob.append(msg("a", &body)).await.unwrap().row_id);
        }
        let other = Connection::open(&path).unwrap();
        let frames = |mode: &str| -> i64 {
            other
                .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| r.get(1))
                .unwrap()
        };
        assert_eq!(frames("TRUNCATE"), 0);
        ob.mark_delivered(ids).await;
        ob.flush().await;
        let written = frames("PASSIVE");
        // The messages alone are 500 pages; the marks are a few.
        assert!(
            (1..=8).contains(&written),
            "{written} WAL frames for 20 marks"
        );
        assert_eq!(ob.gauges().pending_count.load(Ordering::Relaxed), 0);
        drop(ob);
        w.join();
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
            received_at_us: super::super::now_us(),
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
    async fn a_batch_of_rejected_messages_is_quarantined_in_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, w) = Outbox::open(&dir.path().join("o.sqlite"), opts(64 << 20)).unwrap();
        let g = ob.gauges();
        let before = g.commits.load(Ordering::Relaxed);
        let batch: Vec<_> = (0..2600).map(|i| rejected(&format!("r{i}"))).collect();
        let q_before = g.quarantine_commits.load(Ordering::Relaxed);
        let (kept, stored) = ob.quarantine_and_append(batch, Vec::new()).await;
        assert_eq!(g.commits.load(Ordering::Relaxed) - before, 1);
        assert_eq!(g.quarantine_commits.load(Ordering::Relaxed) - q_before, 1);
        assert!(stored.is_empty());
        let ids: Vec<i64> = kept.into_iter().map(Result::unwrap).collect();
        assert_eq!(ids.len(), 2600);
        assert!(
            ids.windows(2).all(|w| w[1] == w[0] + 1),
            "ids in batch order"
        );
        let r = ob.reader().unwrap();
        assert_eq!(r.quarantined(None).unwrap().len(), 2600);
        drop(ob);
        w.join();
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

    /// One append that fails (an injected fault: a trigger raising an error for one control
    /// id) does not fail the rest of its group: the others are stored and told so, the failing
    /// one is told `Failed` (never `Closed`), a failing delivery mark does not cost the group
    /// its appends, and ids and seqs carry on without a gap.
    #[tokio::test]
    async fn one_failing_command_does_not_fail_the_rest_of_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let (ob, w) = Outbox::open(&path, opts(1 << 20)).unwrap();
        assert_eq!(ob.append(msg("a", "before")).await.unwrap().seq, 1);
        // Statements that fail for one message, one quarantine entry and one delivery mark,
        // and the write lock held elsewhere so that everything queued lands in one group.
        let other = Connection::open(&path).unwrap();
        other
            .execute_batch(
                "CREATE TRIGGER boom BEFORE INSERT ON messages WHEN NEW.control_id = 'BOOM' \
                 BEGIN SELECT RAISE(ABORT, 'boom'); END; \
                 CREATE TRIGGER qboom BEFORE INSERT ON rejected WHEN NEW.reason = 'BOOM' \
                 BEGIN SELECT RAISE(ABORT, 'qboom'); END; \
                 CREATE TRIGGER mboom BEFORE INSERT ON delivered WHEN NEW.id = 1 \
                 BEGIN SELECT RAISE(ABORT, 'mboom'); END; BEGIN IMMEDIATE;",
            )
            .unwrap();
        // The writer takes this alone and waits for the lock; everything after it queues up
        // and becomes the next group.
        ob.put_meta("warm-up", "1".into()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let boom = NewMessage {
            control_id: Some("BOOM".into()),
            ..msg("a", "boom")
        };
        let answers = {
            let ob = ob.clone();
            tokio::spawn(async move {
                ob.append_all(vec![msg("a", "x"), boom, msg("a", "y")])
                    .await
            })
        };
        let (inc_tx, inc_rx) = oneshot::channel();
        let (q_tx, q_rx) = oneshot::channel();
        let (qb_tx, qb_rx) = oneshot::channel();
        ob.tx.send(Cmd::MarkDelivered(vec![1])).await.ok().unwrap();
        ob.tx.send(Cmd::Increment("n", inc_tx)).await.ok().unwrap();
        ob.tx
            .send(Cmd::Quarantine(rejected("BOOM"), qb_tx))
            .await
            .ok()
            .unwrap();
        ob.tx
            .send(Cmd::Quarantine(rejected("r"), q_tx))
            .await
            .ok()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let commits = ob.gauges().commits.load(Ordering::Relaxed);
        other.execute_batch("COMMIT").unwrap();
        let answers = answers.await.unwrap();
        ob.flush().await;
        // The warm-up, the whole group (once, after its failing commands were taken out), the
        // flush.
        assert_eq!(ob.gauges().commits.load(Ordering::Relaxed) - commits, 3);

        assert_eq!(answers[0].as_ref().unwrap().seq, 2);
        assert!(
            matches!(&answers[1], Err(AppendError::Failed(e)) if e.contains("boom")),
            "{:?}",
            answers[1]
        );
        assert_eq!(answers[2].as_ref().unwrap().seq, 3);
        assert_eq!(inc_rx.await.unwrap().unwrap(), 0);
        assert!(matches!(qb_rx.await.unwrap(), Err(AppendError::Failed(_))));
        let q = q_rx.await.unwrap().unwrap();
        let r = ob.reader().unwrap();
        let rows = r.pending_after(0, 100, u64::MAX).unwrap();
        let stored: Vec<(i64, u64)> = rows.iter().map(|p| (p.row_id, p.seq)).collect();
        // Row 1's mark failed: it is still pending, the rest of the group is stored.
        assert_eq!(stored, [(1, 1), (2, 2), (3, 3)]);
        assert_eq!(
            r.quarantined(None)
                .unwrap()
                .iter()
                .map(|q| q.id)
                .collect::<Vec<_>>(),
            [q]
        );
        assert_eq!(r.meta("n").unwrap().as_deref(), Some("0"));
        // Row ids and seqs carry on from what was stored, without a gap.
        let next = ob.append(msg("a", "after")).await.unwrap();
        assert_eq!((next.row_id, next.seq), (4, 4));
        assert_eq!(ob.gauges().pending_count.load(Ordering::Relaxed), 4);
        drop(ob);
        w.join();
    }

    /// Quarantine keeps only the first 4 KiB of a frame that is not HL7 at all (so junk cannot
    /// fill the disk), all of an HL7 message, and refuses beyond its own budget.
    #[tokio::test]
    async fn quarantine_keeps_4_kib_of_junk_and_refuses_beyond_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(64 << 20);
        o.quarantine_max_bytes = 1 << 20;
        let (ob, w) = Outbox::open(&dir.path().join("o.sqlite"), o).unwrap();
        let junk = RejectedMessage {
            raw: vec![b'J'; 1 << 20],
            ..rejected("not HL7")
        };
        let mut hl7 = b"MSH|^~\\&|A|B".to_vec();
        hl7.resize(300 * 1024, b'X');
        let hl7 = RejectedMessage {
            raw: hl7,
            ..rejected("bad charset")
        };
        for _ in 0..40 {
            ob.quarantine(junk.clone()).await.unwrap();
        }
        let kept = ob.reader().unwrap().quarantined(None).unwrap();
        assert_eq!(kept.len(), 40);
        assert!(
            kept.iter()
                .all(|q| q.truncated && q.size == 1 << 20 && q.raw.len() == 4096)
        );
        let mut answers = Vec::new();
        for _ in 0..3 {
            answers.push(ob.quarantine(hl7.clone()).await);
        }
        // 160 KiB of junk and two 300 KiB messages fit in 1 MiB, a third does not.
        assert!(answers[..2].iter().all(Result::is_ok), "{answers:?}");
        assert!(
            matches!(
                answers[2],
                Err(AppendError::Full {
                    reason: Full::Quarantine,
                    max_bytes: 1048576,
                    ..
                })
            ),
            "{:?}",
            answers[2]
        );
        let g = ob.gauges();
        let q = g.quarantine_bytes.load(Ordering::Relaxed);
        assert_eq!(q, 40 * 4096 + 2 * 300 * 1024);
        assert_eq!(g.refused_full.load(Ordering::Relaxed), 1);
        drop(ob);
        w.join();
    }
}
