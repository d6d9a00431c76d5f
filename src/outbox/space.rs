//! Disk space: what the store occupies (counted against `max_bytes`), the reserve that keeps
//! delivery marks and pruning possible on a full file system, and giving freed pages back.
//!
//! **The reserve.** A file `<name>.reserve` next to the database, [`RESERVE_BYTES`] long and
//! really allocated (`posix_fallocate`, or zeros where that is not supported), made at open
//! when there is room. When a write fails with `SQLITE_FULL` the writer deletes it
//! ([`Space::release`]): the store is then *short of space*. While short, appends and
//! quarantine entries are refused at once (`AR`), so the reserve is spent only on what makes
//! space come back: delivery marks (a few bytes each), pruning and vacuuming. Each attempt to
//! recover ([`Space::try_restore`], at most once a second while commands arrive, after pruning)
//! re-creates the reserve once the file system has room for it and [`RESTORE_HEADROOM`] more;
//! then appends are taken again.
//!
//! **Counted bytes** ([`used_bytes`]): the database's pages in use (page count minus free
//! pages) plus the WAL file: every table (pending and delivered messages, quarantine, the
//! duplicate log, delivery state, indexes) and the journal, i.e. what the store really holds
//! on disk. Free pages are not counted: vacuuming gives them back (see [`vacuum`]).
//!
//! **Giving space back.** `PRAGMA incremental_vacuum(N)` frees one page per step of its
//! statement, so it is stepped to the end, [`VACUUM_CHUNK`] pages per transaction (bounded
//! WAL use, the write lock held briefly); the file shrinks when the WAL is checkpointed, which
//! [`vacuum`] then does (`TRUNCATE` when space is short, so the WAL file shrinks too).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, TransactionBehavior};
use tracing::{error, info, warn};

/// Size of the reserve file.
pub(super) const RESERVE_BYTES: u64 = 4 * 1024 * 1024;
/// Free space, beyond the reserve itself, needed before appends are taken again.
pub(super) const RESTORE_HEADROOM: u64 = 4 * 1024 * 1024;
/// Pages freed per vacuum transaction.
pub(super) const VACUUM_CHUNK: i64 = 256;
/// Least time between two attempts to recover space (prune, vacuum, re-create the reserve).
const RECOVER_EVERY: Duration = Duration::from_secs(1);

/// True when a SQLite error means the file system (or the database's size limit) is full.
pub(super) fn is_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::DiskFull)
}

/// Bytes the store occupies: database pages in use plus the WAL file.
pub(super) fn used_bytes(conn: &Connection, wal: &Path) -> rusqlite::Result<u64> {
    let (pages, free, size) = page_counts(conn)?;
    let wal = std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0);
    Ok((pages - free) * size + wal)
}

/// (page count, free pages, page size) of the main database. Asked after every group commit,
/// so the statements are cached: parsing three pragmas each time was 13% of the instructions
/// the daemon spent per message with one sender (docs/performance.md, "Where the time goes").
pub(super) fn page_counts(conn: &Connection) -> rusqlite::Result<(u64, u64, u64)> {
    let one = |sql: &str| -> rusqlite::Result<i64> {
        conn.prepare_cached(sql)?.query_row([], |r| r.get(0))
    };
    let pages = one("PRAGMA page_count")?;
    let free = one("PRAGMA freelist_count")?;
    let size = one("PRAGMA page_size")?;
    Ok((pages as u64, (free.min(pages)) as u64, size as u64))
}

/// Free bytes on the file system holding `dir`, as an unprivileged process may use them.
pub(super) fn fs_free(dir: &Path) -> Option<u64> {
    crate::sys::fs_free(dir)
}

/// Give free pages back to the file system: `incremental_vacuum` in chunks of
/// [`VACUUM_CHUNK`] pages, each in its own transaction, then a checkpoint (which is when the
/// file actually shrinks in WAL mode). Returns the pages freed.
pub(super) fn vacuum(conn: &mut Connection, truncate_wal: bool) -> rusqlite::Result<u64> {
    let mut freed = 0u64;
    loop {
        let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        if free == 0 {
            break;
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut n = 0u64;
        {
            let mut stmt = tx.prepare(&format!("PRAGMA incremental_vacuum({VACUUM_CHUNK})"))?;
            let mut rows = stmt.query([])?;
            // One page per step: step to the end.
            while rows.next()?.is_some() {
                n += 1;
            }
        }
        tx.commit()?;
        freed += n;
        if n == 0 {
            // auto_vacuum is off in this file (made before it was chosen): nothing to do.
            break;
        }
    }
    let mode = if truncate_wal { "TRUNCATE" } else { "PASSIVE" };
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()))?;
    Ok(freed)
}

/// The reserve file and whether the store is short of space.
pub(super) struct Space {
    reserve: PathBuf,
    dir: PathBuf,
    /// The reserve has been given up: appends are refused until it is made again.
    short: bool,
    last_attempt: Option<Instant>,
}

impl Space {
    /// The reserve next to `db` (`outbox.sqlite` -> `outbox.reserve`); made now if there is
    /// room, otherwise the store starts short of space.
    pub(super) fn open(db: &Path) -> Space {
        let mut s = Space {
            reserve: db.with_extension("reserve"),
            dir: db
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
            short: false,
            last_attempt: None,
        };
        let have = std::fs::metadata(&s.reserve)
            .map(|m| m.len() >= RESERVE_BYTES)
            .unwrap_or(false);
        if !have && !s.make_reserve() {
            s.short = true;
            warn!(
                dir = %s.dir.display(),
                "outbox: no room for the {} MiB space reserve: new messages are refused until \
                 space is freed",
                RESERVE_BYTES >> 20
            );
        }
        s
    }

    /// Short of space: appends and quarantine entries are refused.
    pub(super) fn is_short(&self) -> bool {
        self.short
    }

    /// A write failed with `SQLITE_FULL`: give up the reserve so that delivery marks, pruning
    /// and vacuuming can still write, and refuse appends from now on.
    pub(super) fn release(&mut self) {
        if !self.short {
            self.short = true;
            self.last_attempt = None;
            match std::fs::remove_file(&self.reserve) {
                Ok(()) => error!(
                    dir = %self.dir.display(),
                    free = fs_free(&self.dir),
                    "outbox: disk full: space reserve released; new messages are refused (AR) \
                     until delivered records have been pruned and space is free again"
                ),
                Err(e) => error!(
                    dir = %self.dir.display(),
                    error = %e,
                    "outbox: disk full and no space reserve to release; new messages are \
                     refused (AR) until space is free again"
                ),
            }
        }
    }

    /// Whether a recovery attempt is due (short of space, and none in the last second).
    pub(super) fn attempt_due(&self) -> bool {
        self.short
            && self
                .last_attempt
                .is_none_or(|t| t.elapsed() >= RECOVER_EVERY)
    }

    /// Whether the file system, with the database's free pages, has room for the reserve and
    /// the headroom: pruning under pressure can stop deleting.
    pub(super) fn enough(&self, free_pages_bytes: u64) -> bool {
        fs_free(&self.dir).unwrap_or(0) + free_pages_bytes >= RESERVE_BYTES + RESTORE_HEADROOM
    }

    /// After pruning and vacuuming: re-create the reserve if the file system has room for it
    /// and the headroom; then appends are taken again. Returns whether the store is short.
    pub(super) fn try_restore(&mut self) -> bool {
        self.last_attempt = Some(Instant::now());
        if !self.short {
            return false;
        }
        let free = fs_free(&self.dir).unwrap_or(0);
        if free >= RESERVE_BYTES + RESTORE_HEADROOM && self.make_reserve() {
            self.short = false;
            info!(
                dir = %self.dir.display(),
                free,
                "outbox: space recovered, reserve made again: new messages are accepted"
            );
        }
        self.short
    }

    /// Allocate the reserve file for real (not sparse). False if there is no room.
    fn make_reserve(&self) -> bool {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.reserve);
        let mut f = match f {
            Ok(f) => f,
            Err(_) => return false,
        };
        let ok = match crate::sys::allocate(&f, RESERVE_BYTES) {
            crate::sys::Allocated::Yes => true,
            crate::sys::Allocated::Unsupported => {
                // No fallocate on this file system: write zeros.
                let zeros = vec![0u8; 64 * 1024];
                (0..RESERVE_BYTES / zeros.len() as u64).all(|_| f.write_all(&zeros).is_ok())
                    && f.sync_all().is_ok()
            }
            crate::sys::Allocated::Failed(_) => false,
        };
        if !ok {
            drop(f);
            let _ = std::fs::remove_file(&self.reserve);
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use siterelay_testkit::Tmpfs;

    use super::super::test_support::{msg, opts};
    use super::super::{AppendError, Full, Outbox};
    use super::*;

    /// A real full disk (a 24 MiB tmpfs): appends are taken until the file system is full,
    /// then refused `Full(Disk)`; the delivery marks still commit (the reserve is released for
    /// them); the oldest delivered rows are then pruned although retention (an hour) has not
    /// passed, just enough of them; the pages go back to the file system, the reserve is made
    /// again and appends are taken again, with no restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_keeps_marking_gives_space_back_and_takes_appends_again() {
        let Some(fs) = Tmpfs::mount(24 << 20) else {
            return;
        };
        let path = fs.path().join("outbox.sqlite");
        let (ob, w) = Outbox::open(&path, opts(1 << 40)).unwrap();
        assert!(path.with_extension("reserve").exists());
        let body = "x".repeat(64 * 1024);
        let mut ids = Vec::new();
        let refused = loop {
            match ob.append(msg("a", &body)).await {
                Ok(s) => ids.push(s.row_id),
                Err(e) => break e,
            }
            assert!(ids.len() < 1000);
        };
        assert!(
            matches!(
                refused,
                AppendError::Full {
                    reason: Full::Disk,
                    ..
                }
            ),
            "{refused:?}"
        );
        let g = ob.gauges();
        assert!(g.space_short.load(Ordering::Relaxed));
        let full_free = fs.free();
        let file_full = std::fs::metadata(&path).unwrap().len();
        // Still refused while short, even though the reserve's room is there.
        assert!(matches!(
            ob.append(msg("a", "small")).await,
            Err(AppendError::Full {
                reason: Full::Disk,
                ..
            })
        ));
        // The broker confirms everything: the marks commit on the full disk.
        ob.mark_delivered(ids.clone()).await;
        ob.flush().await;
        assert_eq!(g.pending_count.load(Ordering::Relaxed), 0);
        // Within seconds and without a restart, appends are taken again.
        let start = std::time::Instant::now();
        let again = loop {
            if let Ok(s) = ob.append(msg("a", "again")).await {
                break s;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "still refused");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(again.seq, ids.len() as u64 + 1);
        assert!(!g.space_short.load(Ordering::Relaxed));
        assert!(g.pruned_early.load(Ordering::Relaxed) > 0);
        assert!(path.with_extension("reserve").exists());
        let file_after = std::fs::metadata(&path).unwrap().len();
        let freelist: i64 = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))
            .unwrap();
        eprintln!(
            "{} x 64 KiB accepted; refused: {refused}; free when full {full_free} B, db file \
             {file_full} B -> {file_after} B, free now {} B, freelist {freelist}, \
             pruned early {}, appends again after {:?}",
            ids.len(),
            fs.free(),
            g.pruned_early.load(Ordering::Relaxed),
            start.elapsed()
        );
        // Only as many delivered rows went as the reserve and the headroom needed; the rest
        // keep their retention.
        assert!(file_after < file_full);
        assert_eq!(freelist, 0);
        assert!(fs.free() > RESTORE_HEADROOM / 2);
        let delivered_left = ob.reader().unwrap().stats().unwrap()[0].delivered;
        assert!(delivered_left > 0 && delivered_left < ids.len() as u64);
        drop(ob);
        w.join();
    }

    /// Recovering from a full disk prunes delivered rows regardless of age, but never a held
    /// one: the held rows are still stored and held once appends are taken again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovering_from_a_full_disk_never_prunes_a_held_row() {
        use super::super::{Hold, HoldOutcome, HoldReason};
        let Some(fs) = Tmpfs::mount(24 << 20) else {
            return;
        };
        let path = fs.path().join("outbox.sqlite");
        let (ob, w) = Outbox::open(&path, opts(1 << 40)).unwrap();
        let body = "x".repeat(64 * 1024);
        let mut ids = Vec::new();
        loop {
            match ob.append(msg("a", &body)).await {
                Ok(s) => ids.push(s.row_id),
                Err(_) => break,
            }
            assert!(ids.len() < 1000);
        }
        let g = ob.gauges();
        assert!(g.space_short.load(Ordering::Relaxed));
        // The two oldest rows are held (on the full disk: a hold is a few bytes, like a mark),
        // every other row is delivered.
        let held = [ids[0], ids[1]];
        for &id in &held {
            let outcome = ob
                .hold(Hold {
                    row_id: id,
                    reason: HoldReason::Refused,
                    detail: "reason code 0x87".into(),
                })
                .await
                .unwrap();
            assert_eq!(outcome, HoldOutcome::Held);
        }
        ob.mark_delivered(ids[2..].to_vec()).await;
        ob.flush().await;
        let start = std::time::Instant::now();
        while ob.append(msg("a", "again")).await.is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "still refused");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(g.pruned_early.load(Ordering::Relaxed) > 0);
        let r = ob.reader().unwrap();
        let still: Vec<i64> = r
            .held(None, false)
            .unwrap()
            .iter()
            .map(|h| h.row_id)
            .collect();
        assert_eq!(still, held);
        for id in held {
            assert_eq!(r.row_state(id).unwrap(), Some("held"));
        }
        assert_eq!(g.held_count.load(Ordering::Relaxed), 2);
        drop(ob);
        w.join();
    }

    /// The disk filled by someone else: the outbox refuses new messages and recovers by itself
    /// once the other file is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_disk_filled_by_another_file_recovers_when_it_goes() {
        let Some(fs) = Tmpfs::mount(16 << 20) else {
            return;
        };
        let path = fs.path().join("outbox.sqlite");
        let (ob, w) = Outbox::open(&path, opts(1 << 40)).unwrap();
        let filler = fs.fill("filler", 0);
        let body = "y".repeat(64 * 1024);
        let mut stored = 0;
        let refused = loop {
            match ob.append(msg("a", &body)).await {
                Ok(_) => stored += 1,
                Err(e) => break e,
            }
            assert!(stored < 1000);
        };
        assert!(
            matches!(
                refused,
                AppendError::Full {
                    reason: Full::Disk,
                    ..
                }
            ),
            "{refused:?}"
        );
        std::fs::remove_file(filler).unwrap();
        let start = std::time::Instant::now();
        while ob.append(msg("a", "z")).await.is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "still refused");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Nothing was lost: every accepted message is there.
        let n = ob
            .reader()
            .unwrap()
            .pending_after(0, 10_000, u64::MAX)
            .unwrap()
            .len();
        assert_eq!(n, stored + 1);
        drop(ob);
        w.join();
    }

    /// `SQLITE_FULL` in a group holding delivery marks and an append: the reserve is released,
    /// the append alone is refused (`Full(Disk)`, never `Closed`), and the marks are applied
    /// again in the room the reserve left and committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_in_a_mixed_group_refuses_the_append_and_commits_the_marks() {
        let Some(fs) = Tmpfs::mount(16 << 20) else {
            return;
        };
        let path = fs.path().join("outbox.sqlite");
        let (ob, w) = Outbox::open(&path, opts(1 << 40)).unwrap();
        let body = "m".repeat(64 * 1024);
        let mut ids = Vec::new();
        for _ in 0..20 {
            ids.push(ob.append(msg("a", &body)).await.unwrap().row_id);
        }
        let _filler = fs.fill("filler", 256 * 1024);
        // One group: the write lock is held elsewhere, the writer waits for it with a first
        // command, and both commands are queued behind it.
        let other = rusqlite::Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        ob.put_meta("warm-up", "1".into()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let marks = {
            let ob = ob.clone();
            let ids = ids.clone();
            tokio::spawn(async move { ob.mark_delivered(ids).await })
        };
        marks.await.unwrap();
        let big = {
            let ob = ob.clone();
            tokio::spawn(async move { ob.append(msg("a", &"b".repeat(2 << 20))).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let commits = ob.gauges().commits.load(Ordering::Relaxed);
        other.execute_batch("COMMIT").unwrap();
        let answer = big.await.unwrap();
        ob.flush().await;
        // The warm-up, the group (once: the marks, after the append was taken out), the flush.
        assert_eq!(ob.gauges().commits.load(Ordering::Relaxed) - commits, 3);
        assert!(
            matches!(
                answer,
                Err(AppendError::Full {
                    reason: Full::Disk,
                    ..
                })
            ),
            "{answer:?}"
        );
        let g = ob.gauges();
        assert!(g.space_short.load(Ordering::Relaxed));
        assert_eq!(g.pending_count.load(Ordering::Relaxed), 0);
        assert_eq!(g.delivered.load(Ordering::Relaxed), 20);
        let r = ob.reader().unwrap();
        assert!(r.pending_after(0, 100, u64::MAX).unwrap().is_empty());
        // Delivered: still retained, or already pruned to make room (the disk is still full).
        let retained: u64 = r.stats().unwrap().iter().map(|s| s.delivered).sum();
        assert_eq!(retained + g.pruned_early.load(Ordering::Relaxed), 20);
        drop(ob);
        w.join();
    }
}
