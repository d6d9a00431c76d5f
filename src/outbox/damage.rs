//! A damaged store at start: detected, moved aside, replaced by a fresh store that carries on
//! the numbers the central side relies on, and listed in health until someone has salvaged it.
//!
//! **Detection** ([`check`]). Before the writer opens the file, a read-only connection runs
//! `PRAGMA quick_check` (every b-tree page, overflow chains and the freelist are read once: the
//! cost is one read of the file, against a read of every row that opening costs anyway). The
//! file is *damaged* when SQLite refuses it as "not a database" (a garbage header), reports it
//! malformed (a truncated file, a corrupt page), or quick_check answers anything but `ok`.
//! Anything else (a permission, an I/O error, a busy lock) is not damage: start-up fails with
//! that error and the file is left alone. A missing or empty file is a new store.
//!
//! **Moving aside** ([`set_aside`]). The fresh store is made and seeded first, beside the
//! damaged one (`outbox.sqlite.fresh`); then the file and its `-wal` and `-shm` are renamed into
//! `<data_dir>/damaged/<UTC time>/` (mode 0700), with `damaged.json` (reason, time, what was
//! carried over; no message content); then the fresh store is renamed into place; every
//! directory fsynced. A crash at any point leaves the damaged store in place (found again) or
//! the fresh one beside an empty place (put there at the next start): never no store, which
//! would start every feed at `seq` 1 again. A file that is empty although a store was there
//! (its WAL has content, or the space reserve exists) is damaged too. One `ERROR` log line
//! names the file, where it went and why.
//!
//! **Carrying on** ([`carry_over`]). The moved file is read row by row (`salvage::scan`) for
//! what must keep increasing: each feed's last `seq` (the `feed_seq` floors and every readable
//! message), `bdseq`, the row-id and quarantine-id high-water marks, and the saved inventory.
//! When `feed_seq` and `messages` were both read whole, each feed carries on at its last `seq`
//! + 1. When not (not a database, a bad page in either table), a `seq` read may not be the
//! last one used, so every feed (and any feed not seen, through `meta.seq_floor`) carries on
//! after the *time floor*: the current time in microseconds since the epoch, or the damaged
//! files' modification times if later. A feed stores at most one message per microsecond and
//! its first `seq` was 1, so every `seq` it ever used is below the time at which it was used:
//! the floor is above them all, provided the clock was never set back past that time. `bdseq`
//! follows the same rule when `meta` was not read whole. The fresh store gets these as its
//! `feed_seq` rows and `meta` keys before the writer opens it, so nothing else changes.
//!
//! **Health** ([`list`]). Every directory under `damaged/` that holds its store file is listed
//! in the health report (`outbox.damaged_stores[]`) until someone deletes it; one without `salvaged.json` (written
//! by `siterelay queue salvage` next to the file) makes `siterelay status` report degraded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, params};
use serde::{Deserialize, Serialize};
use tracing::error;

use super::salvage::{int, scan, text};
use super::{OutboxError, now_us, sqlite};

/// Directory (under the data directory) holding damaged stores.
pub const DAMAGED_DIR: &str = "damaged";
/// What was found and carried over, written next to a moved-aside store.
pub const DAMAGE_NOTE: &str = "damaged.json";
/// Written next to a moved-aside store by `siterelay queue salvage`.
pub const SALVAGED_NOTE: &str = "salvaged.json";
/// `meta` key: the lowest `seq` a feed without a `feed_seq` row may use, minus one (set when
/// a damaged store's numbers could not be read whole).
pub(super) const SEQ_FLOOR_KEY: &str = "seq_floor";
/// Most lines of quick_check output kept in a reason.
const REASON_LINES: usize = 5;
/// Longest reason kept (characters).
const REASON_MAX: usize = 400;

/// What [`check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No file yet, an empty one, or quick_check says `ok`.
    Healthy,
    /// Damaged, and why (SQLite's words; no content).
    Damaged(String),
}

/// Whether an open error means the file is damaged (malformed, or not a database).
pub fn is_damage(e: &OutboxError) -> bool {
    match e {
        OutboxError::Sqlite { source, .. } => is_damage_code(source),
        _ => false,
    }
}

fn is_damage_code(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// Run `PRAGMA quick_check` on the store at `path` through a read-only connection.
pub fn check(path: &Path) -> Result<Verdict, OutboxError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Verdict::Healthy),
        Err(source) => {
            return Err(OutboxError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
        Ok(m) if m.len() == 0 => {
            // A store in use is never empty (WAL mode writes page 1 when the store is made):
            // empty beside a WAL with content or the space reserve, it was cut to nothing.
            let wal = std::fs::metadata(with_suffix(path, "-wal")).is_ok_and(|m| m.len() > 0);
            let reserve = path.with_extension("reserve").exists();
            return Ok(if wal || reserve {
                Verdict::Damaged(
                    "the file is empty, but a store was there (its WAL or reserve)".into(),
                )
            } else {
                Verdict::Healthy
            });
        }
        Ok(_) => {}
    }
    let verdict = |e: rusqlite::Error| {
        if is_damage_code(&e) {
            Ok(Verdict::Damaged(bounded(&e.to_string())))
        } else {
            Err(OutboxError::Sqlite {
                path: path.to_path_buf(),
                source: e,
            })
        }
    };
    let conn = match Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) {
        Ok(c) => c,
        Err(e) => return verdict(e),
    };
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(sqlite(path))?;
    let lines: rusqlite::Result<Vec<String>> = conn
        .prepare(&format!("PRAGMA quick_check({REASON_LINES})"))
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<String>>>()
        });
    match lines {
        Ok(lines) if lines.len() == 1 && lines[0] == "ok" => Ok(Verdict::Healthy),
        Ok(lines) => Ok(Verdict::Damaged(bounded(&format!(
            "quick_check: {}",
            lines.join("; ")
        )))),
        Err(e) => verdict(e),
    }
}

fn bounded(s: &str) -> String {
    crate::text::bounded(&s.chars().take(REASON_MAX).collect::<String>()).into_owned()
}

/// Sends systemd `EXTEND_TIMEOUT_USEC` (and `WATCHDOG=1`) every 10 s while a long start-up step
/// runs (a no-op outside systemd), so a large store's check is not killed by `TimeoutStartSec`.
struct ExtendStartTimeout {
    /// Dropped when the step ends: the thread stops.
    _stop: Option<std::sync::mpsc::Sender<()>>,
}

impl ExtendStartTimeout {
    fn start() -> ExtendStartTimeout {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return ExtendStartTimeout { _stop: None };
        }
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            loop {
                let _ = sd_notify::notify(&[
                    sd_notify::NotifyState::ExtendTimeoutUsec(30_000_000),
                    sd_notify::NotifyState::Watchdog,
                ]);
                if !matches!(
                    rx.recv_timeout(Duration::from_secs(10)),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                ) {
                    break;
                }
            }
        });
        ExtendStartTimeout { _stop: Some(tx) }
    }
}

/// At start: check the store at `path`; if it is damaged, move it aside, carry its numbers
/// over into a fresh store and say so (the returned note). The caller then opens `path` as
/// usual.
pub fn check_at_start(path: &Path) -> Result<Option<DamageNote>, OutboxError> {
    finish_replacement(path)?;
    let _extend = ExtendStartTimeout::start();
    match check(path)? {
        Verdict::Healthy => Ok(None),
        Verdict::Damaged(reason) => set_aside(path, &reason).map(Some),
    }
}

/// What a damaged store's moving aside found and carried over (`damaged.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DamageNote {
    /// Where the store was (`<data_dir>/outbox.sqlite`).
    pub original: PathBuf,
    /// The moved file.
    pub file: PathBuf,
    /// When it was moved (µs since the epoch).
    pub moved_at_us: i64,
    /// Why it was taken as damaged (SQLite's words).
    pub reason: String,
    /// Every feed's numbers were read whole (`feed_seq` and `messages`): each feed carries on
    /// at its last `seq` + 1. If not, each carries on after [`DamageNote::seq_floor`].
    pub seq_complete: bool,
    /// Each feed seen: its last `seq` read and the first the fresh store uses.
    pub feeds: Vec<FeedResume>,
    /// When the numbers were not read whole: the time floor (µs since the epoch); every feed,
    /// seen or not, uses `seq`s above it. 0 when `seq_complete`.
    pub seq_floor: u64,
    /// The birth sequence number carried over (the next connection uses one more).
    pub bdseq: i64,
    /// Message rows read, and found unreadable, while carrying over.
    pub rows_read: u64,
    /// Rows found but unreadable plus stretches of rows lost to bad pages.
    pub rows_unreadable: u64,
}

/// One feed's numbers across a damaged store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeedResume {
    /// Feed name.
    pub feed: String,
    /// The highest `seq` read from the damaged store.
    pub last_seq_read: u64,
    /// The first `seq` the fresh store gives this feed.
    pub next_seq: u64,
}

/// The fresh store, made and seeded under this name before the damaged one is moved away, then
/// renamed into place: a crash at any step leaves either the damaged store in place (found
/// again at the next start) or this file, which [`finish_replacement`] puts in place. Never no
/// store at all, which would start every feed again at `seq` 1.
fn fresh_path(path: &Path) -> PathBuf {
    with_suffix(path, ".fresh")
}

/// A replacement interrupted after the damaged store was moved away: put the fresh store in
/// place.
fn finish_replacement(path: &Path) -> Result<(), OutboxError> {
    let fresh = fresh_path(path);
    if path.exists() || !fresh.exists() {
        return Ok(());
    }
    std::fs::rename(&fresh, path)
        .and_then(|()| sync_dir(parent_dir(path)))
        .map_err(|source| OutboxError::Io {
            path: fresh.clone(),
            source,
        })
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Move the damaged store at `path` aside and put a fresh store carrying its numbers in its
/// place. In this order: read the numbers (read-only), make and seed the fresh store beside it,
/// write the note into `damaged/<time>/`, move the damaged files there, rename the fresh store
/// into place; each directory fsynced.
pub fn set_aside(path: &Path, reason: &str) -> Result<DamageNote, OutboxError> {
    let data_dir = parent_dir(path);
    let ioerr = |p: &Path| {
        let p = p.to_path_buf();
        move |source| OutboxError::Io { path: p, source }
    };
    let moved_at_us = now_us();
    let carried = carry_over(path);
    let dir = new_damage_dir(data_dir, moved_at_us).map_err(ioerr(data_dir))?;
    let file = dir.join(path.file_name().unwrap_or_default());
    let note = carried.note(path, &file, moved_at_us, reason);
    let fresh = fresh_path(path);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(with_suffix(&fresh, suffix));
    }
    seed_fresh_store(&fresh, &carried, &note)?;
    std::fs::File::open(&fresh)
        .and_then(|f| f.sync_all())
        .map_err(ioerr(&fresh))?;
    let note_path = dir.join(DAMAGE_NOTE);
    std::fs::write(
        &note_path,
        serde_json::to_vec_pretty(&note).unwrap_or_default(),
    )
    .and_then(|()| std::fs::File::open(&note_path)?.sync_all())
    .map_err(ioerr(&note_path))?;
    // The WAL first: a crash between two renames must never leave the damaged store's WAL
    // beside the fresh store (SQLite would replay it into the fresh one).
    for suffix in ["-wal", "-shm", ""] {
        let from = with_suffix(path, suffix);
        match std::fs::rename(&from, with_suffix(&file, suffix)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !suffix.is_empty() => {}
            Err(e) => return Err(ioerr(&from)(e)),
        }
    }
    sync_dir(&dir).map_err(ioerr(&dir))?;
    std::fs::rename(&fresh, path).map_err(ioerr(&fresh))?;
    sync_dir(data_dir).map_err(ioerr(data_dir))?;
    error!(
        path = %path.display(),
        moved_to = %dir.display(),
        reason = %reason,
        seq_complete = note.seq_complete,
        rows_read = note.rows_read,
        rows_unreadable = note.rows_unreadable,
        "OUTBOX DAMAGED: the store was moved aside and a fresh one started; messages it still held \
         were never forwarded: salvage them with `siterelay queue salvage {}` (docs/operations.md, \
         \"A damaged store\")",
        file.display()
    );
    Ok(note)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// `<data_dir>/damaged/<YYYYmmddTHHMMSSZ>` (a suffix if taken), 0700.
fn new_damage_dir(data_dir: &Path, at_us: i64) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = data_dir.join(DAMAGED_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&parent)?;
    let stamp = jiff::Timestamp::from_microsecond(at_us)
        .map(|t| t.strftime("%Y%m%dT%H%M%SZ").to_string())
        .unwrap_or_else(|_| at_us.to_string());
    for n in 0..1000 {
        let dir = if n == 0 {
            parent.join(&stamp)
        } else {
            parent.join(format!("{stamp}-{n}"))
        };
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                sync_dir(&parent)?;
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free name under damaged/"))
}

/// What could be read from a damaged store for the fresh one.
#[derive(Debug, Default)]
struct Carried {
    /// Highest `seq` read per feed.
    last_seq: BTreeMap<String, u64>,
    /// `feed_seq` and `messages` were read whole.
    seq_complete: bool,
    /// `meta` was read whole.
    meta_complete: bool,
    bdseq: i64,
    last_row_id: i64,
    last_rejected_id: i64,
    inventory: Option<String>,
    rows_read: u64,
    rows_unreadable: u64,
    /// Latest modification time of the damaged files (µs).
    mtime_us: i64,
}

impl Carried {
    fn time_floor(&self) -> u64 {
        now_us().max(self.mtime_us).max(0) as u64
    }

    fn note(&self, original: &Path, file: &Path, moved_at_us: i64, reason: &str) -> DamageNote {
        let floor = if self.seq_complete {
            0
        } else {
            self.time_floor()
        };
        let bdseq = if self.meta_complete {
            self.bdseq
        } else {
            self.bdseq.max(floor as i64)
        };
        DamageNote {
            original: original.to_path_buf(),
            file: file.to_path_buf(),
            moved_at_us,
            reason: reason.to_owned(),
            seq_complete: self.seq_complete,
            feeds: self
                .last_seq
                .iter()
                .map(|(feed, &last)| FeedResume {
                    feed: feed.clone(),
                    last_seq_read: last,
                    next_seq: last.max(floor) + 1,
                })
                .collect(),
            seq_floor: floor,
            bdseq,
            rows_read: self.rows_read,
            rows_unreadable: self.rows_unreadable,
        }
    }
}

/// Read what must keep increasing from the damaged file (read-only, row by row). Never fails:
/// what cannot be read is counted, and makes the note say the numbers are not whole.
fn carry_over(file: &Path) -> Carried {
    let mut c = Carried {
        mtime_us: ["", "-wal"]
            .iter()
            .filter_map(|s| std::fs::metadata(with_suffix(file, s)).ok())
            .filter_map(|m| m.modified().ok())
            .filter_map(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_micros().min(i64::MAX as u128) as i64)
            .max()
            .unwrap_or(0),
        ..Carried::default()
    };
    let Ok(conn) = super::salvage::open_damaged(file) else {
        return c;
    };
    let mut last_seq: BTreeMap<String, u64> = BTreeMap::new();
    let mut raise = |feed: String, seq: i64| {
        let slot = last_seq.entry(feed).or_insert(0);
        *slot = (*slot).max(seq.max(0) as u64);
    };
    let floors = scan(&conn, "feed_seq", "feed, last_seq", &mut |_, r| {
        raise(text(r, 1)?, int(r, 2)?);
        Ok(())
    });
    let mut max_id = 0i64;
    let messages = scan(&conn, "messages", "feed, seq", &mut |id, r| {
        raise(text(r, 1)?, int(r, 2)?);
        max_id = max_id.max(id);
        Ok(())
    });
    c.last_seq = last_seq;
    c.seq_complete = floors.complete() && messages.complete();
    c.rows_read = messages.read;
    c.rows_unreadable = messages.unreadable_rows + messages.unreadable_regions;
    let mut meta: BTreeMap<String, String> = BTreeMap::new();
    let meta_scan = scan(&conn, "meta", "key, value", &mut |_, r| {
        meta.insert(text(r, 1)?, text(r, 2)?);
        Ok(())
    });
    c.meta_complete = meta_scan.complete();
    let num = |k: &str| meta.get(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    c.bdseq = num("bdseq");
    c.inventory = meta.get(crate::sink::mqtt::INVENTORY_KEY).cloned();
    // Row ids: what is stored, the delivery and duplicate logs, the high-water mark.
    for (table, col) in [
        ("pending", "1"),
        ("delivered", "id"),
        ("dedup_log", "row_id"),
    ] {
        scan(&conn, table, col, &mut |rowid, r| {
            let id = if col == "1" { rowid } else { int(r, 1)? };
            max_id = max_id.max(id);
            Ok(())
        });
    }
    c.last_row_id = max_id.max(num(super::writer::LAST_ROW_ID_KEY));
    let mut max_rejected = 0i64;
    scan(&conn, "rejected", "1", &mut |id, _| {
        max_rejected = max_rejected.max(id);
        Ok(())
    });
    c.last_rejected_id = max_rejected.max(num(super::writer::LAST_REJECTED_ID_KEY));
    c
}

/// Make the fresh store at `path` (the damaged one has been moved away) and write the numbers
/// carried over into it, in one transaction.
fn seed_fresh_store(path: &Path, c: &Carried, note: &DamageNote) -> Result<(), OutboxError> {
    let e = sqlite(path);
    let mut conn = super::schema::open(path)?;
    let tx = conn.transaction().map_err(&e)?;
    for f in &note.feeds {
        tx.execute(
            "INSERT INTO feed_seq (feed, last_seq) VALUES (?1, ?2) \
             ON CONFLICT(feed) DO UPDATE SET last_seq = MAX(last_seq, excluded.last_seq)",
            params![f.feed, (f.next_seq - 1) as i64],
        )
        .map_err(&e)?;
    }
    let mut meta: Vec<(&str, String)> = vec![
        ("bdseq", note.bdseq.to_string()),
        (super::writer::LAST_ROW_ID_KEY, c.last_row_id.to_string()),
        (
            super::writer::LAST_REJECTED_ID_KEY,
            c.last_rejected_id.to_string(),
        ),
    ];
    if note.seq_floor > 0 {
        meta.push((SEQ_FLOOR_KEY, note.seq_floor.to_string()));
    }
    if let Some(inv) = &c.inventory {
        meta.push((crate::sink::mqtt::INVENTORY_KEY, inv.clone()));
    }
    for (k, v) in meta {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) \
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![k, v],
        )
        .map_err(&e)?;
    }
    tx.commit().map_err(&e)?;
    // Everything into the main file before it is renamed into place (closing removes the WAL).
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .map_err(&e)?;
    drop(conn);
    Ok(())
}

/// A damaged store as health lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DamagedStore {
    /// The moved file.
    pub path: PathBuf,
    /// What was found and carried over (absent if the note could not be read).
    pub note: Option<DamageNote>,
    /// `salvaged.json`, when `siterelay queue salvage` has been run on it.
    pub salvaged: Option<serde_json::Value>,
}

/// Most damaged stores listed (the newest).
pub const DAMAGED_LISTED: usize = 10;

/// The damaged stores under `<data_dir>/damaged/`, oldest first (at most the newest
/// [`DAMAGED_LISTED`]): each directory that still holds its store file. Reads two small files
/// per entry; one whose note cannot be read is still listed.
pub fn list(data_dir: &Path) -> Vec<DamagedStore> {
    let Ok(entries) = std::fs::read_dir(data_dir.join(DAMAGED_DIR)) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    let found: Vec<DamagedStore> = dirs
        .into_iter()
        .filter_map(|dir| {
            let read = |name: &str| {
                std::fs::read(dir.join(name))
                    .ok()
                    .filter(|b| b.len() < 1 << 20)
            };
            let note: Option<DamageNote> =
                read(DAMAGE_NOTE).and_then(|b| serde_json::from_slice(&b).ok());
            let name = note
                .as_ref()
                .and_then(|n| n.file.file_name().map(|n| n.to_owned()))
                .unwrap_or_else(|| "outbox.sqlite".into());
            // Without its file (a moving aside cut short, or deleted by trust IT): nothing to
            // salvage there.
            let path = dir.join(name);
            path.is_file().then(|| DamagedStore {
                path,
                note,
                salvaged: read(SALVAGED_NOTE).and_then(|b| serde_json::from_slice(&b).ok()),
            })
        })
        .collect();
    let skip = found.len().saturating_sub(DAMAGED_LISTED);
    found.into_iter().skip(skip).collect()
}

/// After `siterelay queue salvage FILE`: when FILE is a moved-aside store
/// (`.../damaged/<time>/...`), record next to it that it was salvaged (counts and where the
/// messages went; no content), so health stops reporting it as waiting.
pub fn record_salvaged(file: &Path, summary: &serde_json::Value) -> std::io::Result<bool> {
    let Some(dir) = file.parent() else {
        return Ok(false);
    };
    let under_damaged = dir
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == DAMAGED_DIR);
    if !under_damaged {
        return Ok(false);
    }
    let path = dir.join(SALVAGED_NOTE);
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(summary).unwrap_or_default(),
    )?;
    std::fs::File::open(&path)?.sync_all()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{msg, opts};
    use super::super::{Outbox, now_us};
    use super::*;

    async fn store_with(path: &Path, feed: &str, n: usize) {
        let (ob, w) = Outbox::open(path, opts(1 << 30)).unwrap();
        for i in 0..n {
            ob.append(msg(feed, &format!("m{i}"))).await.unwrap();
        }
        drop(ob);
        w.join();
    }

    async fn next_seq(path: &Path, feed: &str) -> u64 {
        let (ob, w) = Outbox::open(path, opts(1 << 30)).unwrap();
        let seq = ob.append(msg(feed, "next")).await.unwrap().seq;
        drop(ob);
        w.join();
        seq
    }

    /// A power cut after the damaged files moved away and before the fresh store was renamed
    /// into place: the next start puts it there, so the feed carries on instead of restarting
    /// at 1.
    #[tokio::test]
    async fn an_interrupted_replacement_is_finished_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.sqlite");
        store_with(&path, "a", 3).await;
        let note = set_aside(&path, "test").unwrap();
        assert!(note.seq_complete);
        std::fs::rename(&path, fresh_path(&path)).unwrap();
        assert_eq!(check_at_start(&path).unwrap().map(|n| n.reason), None);
        assert_eq!(next_seq(&path, "a").await, 4);
    }

    /// A store cut to nothing is damaged, not new; an empty file alone (a store being made when
    /// the power went) is new.
    #[tokio::test]
    async fn an_empty_file_where_a_store_was_is_damaged_and_one_alone_is_new() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.sqlite");
        store_with(&path, "a", 2).await;
        assert!(path.with_extension("reserve").exists());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        assert!(matches!(check(&path).unwrap(), Verdict::Damaged(_)));
        let alone = dir.path().join("sub/outbox.sqlite");
        std::fs::create_dir_all(alone.parent().unwrap()).unwrap();
        std::fs::File::create(&alone).unwrap();
        assert_eq!(check(&alone).unwrap(), Verdict::Healthy);
    }

    /// Not a database: nothing can be read, so every feed, also one the damaged store never
    /// named, carries on above the time floor.
    #[tokio::test]
    async fn after_an_unreadable_store_every_feed_starts_above_the_time_floor() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.sqlite");
        store_with(&path, "a", 2).await;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all(b"garbage garbage garbage")
            .unwrap();
        let before = now_us() as u64;
        let note = check_at_start(&path).unwrap().expect("damaged");
        assert!(!note.seq_complete);
        assert!(note.seq_floor >= before, "{note:?}");
        assert_eq!(list(dir.path()).len(), 1);
        assert!(next_seq(&path, "a").await > note.seq_floor);
        assert!(next_seq(&path, "never-seen").await > note.seq_floor);
    }
}
