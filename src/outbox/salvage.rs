//! Reading what can still be read from a damaged store: `siterelay queue salvage FILE`, and the
//! daemon's start-up reading of a damaged store's sequence numbers (`damage.rs`).
//!
//! **Never the original.** [`salvage`] copies the file (and its `-wal`) into a private work
//! directory inside the output directory and reads the copy, read-only, so nothing it does
//! (SQLite's `-shm`, a repaired header) can change the damaged file. The start-up reading opens
//! the moved-aside file itself read-only (copying a store of gigabytes at start-up would cost
//! more than the `-shm` SQLite may create next to it).
//!
//! **Row by row.** Every table is read in rowid order through [`scan`]: batches of rows while
//! they read; after an error, one row at a time; where even finding the next rowid fails (a bad
//! b-tree page on the way), the next readable rowid is found by probing further and further
//! ahead, then bisecting back (at most about 128 probes per bad region, each a b-tree seek).
//! So one bad page loses the rows on it, not the table. `PRAGMA writable_schema` (connection
//! only: nothing is written) lets SQLite read a truncated file at all (otherwise every query
//! fails because the header names more pages than the file has), and `cell_size_check` makes
//! it refuse a damaged cell rather than return garbage. A value of the wrong type (garbage that
//! happened to parse) makes its row unreadable.
//!
//! **Not a database.** When SQLite refuses the copy as "not a database" (a damaged header),
//! the copy's header is rewritten with the values siterelay's stores always have (the magic
//! string, 4096-byte pages, WAL) and read again; the report says so.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags, Row};
use serde::Serialize;

/// Rows read per query while they read.
const BATCH: i64 = 512;

/// Open a damaged file read-only for reading what can still be read.
pub(super) fn open_damaged(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(2))?;
    // Connection settings only (no write): read a truncated file, refuse damaged cells.
    let _ = conn.execute_batch("PRAGMA writable_schema = ON; PRAGMA cell_size_check = ON;");
    Ok(conn)
}

/// What reading one table found.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Scan {
    /// Rows read (the visitor accepted them).
    pub read: u64,
    /// Rows whose id was found but whose columns could not be read (or were of the wrong type).
    pub unreadable_rows: u64,
    /// Stretches of rowids skipped because a b-tree page on the way could not be read (the
    /// rows in them are lost; how many is not known).
    pub unreadable_regions: u64,
    /// The table could not be read at all (missing, or the file is not a database).
    pub table_unreadable: bool,
}

impl Scan {
    /// Every row of the table was read.
    pub fn complete(&self) -> bool {
        self.unreadable_rows == 0 && self.unreadable_regions == 0 && !self.table_unreadable
    }
}

/// Read every readable row of `table` (`cols`: its columns after the rowid), in rowid order,
/// handing each to `visit(rowid, row)` (the row's column 0 is the rowid, `cols` follow). A
/// visitor error counts the row unreadable. Never fails: what cannot be read is counted.
pub(super) fn scan(
    conn: &Connection,
    table: &str,
    cols: &str,
    visit: &mut dyn FnMut(i64, &Row<'_>) -> rusqlite::Result<()>,
) -> Scan {
    let mut out = Scan::default();
    let prepared = (
        conn.prepare(&format!(
            "SELECT rowid, {cols} FROM {table} WHERE rowid > ?1 ORDER BY rowid LIMIT {BATCH}"
        )),
        conn.prepare(&format!(
            "SELECT rowid FROM {table} WHERE rowid >= ?1 ORDER BY rowid LIMIT 1"
        )),
        conn.prepare(&format!(
            "SELECT rowid, {cols} FROM {table} WHERE rowid = ?1"
        )),
    );
    let (Ok(mut batch), Ok(mut next), Ok(mut one)) = prepared else {
        out.table_unreadable = true;
        return out;
    };
    // The first rowid at or after `x`; an answer before `x` is garbage from a damaged page.
    let mut next_ge = |x: i64| -> Result<Option<i64>, ()> {
        match next.query_row([x], |r| r.get::<_, i64>(0)) {
            Ok(id) if id >= x => Ok(Some(id)),
            Ok(_) => Err(()),
            Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
            Err(_) => Err(()),
        }
    };
    let mut after: i64 = 0;
    loop {
        // Batches while they read.
        let mut got = 0;
        let mut failed = false;
        match batch.query([after]) {
            Ok(mut rows) => loop {
                match rows.next() {
                    Ok(Some(r)) => {
                        let id = match r.get::<_, i64>(0) {
                            Ok(id) if id > after => id,
                            _ => {
                                failed = true;
                                break;
                            }
                        };
                        match visit(id, r) {
                            Ok(()) => out.read += 1,
                            Err(_) => out.unreadable_rows += 1,
                        }
                        after = id;
                        got += 1;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            },
            Err(_) => failed = true,
        }
        if !failed {
            if got < BATCH {
                break;
            }
            continue;
        }
        let Some(start) = after.checked_add(1) else {
            break;
        };
        // One row: its id readable, its columns perhaps not.
        match next_ge(start) {
            Ok(None) => break,
            Ok(Some(id)) => {
                let read = one.query_row([id], |r| visit(id, r));
                match read {
                    Ok(()) => out.read += 1,
                    Err(_) => out.unreadable_rows += 1,
                }
                after = id;
                continue;
            }
            Err(()) => {}
        }
        // A bad page on the way: skip to the next rowid that can be found.
        out.unreadable_regions += 1;
        match skip_bad_region(start, &mut next_ge) {
            Some(good) => after = good - 1,
            None => break,
        }
    }
    out
}

/// The smallest `x > bad` from which the next rowid can be found, given that it cannot be found
/// from `bad`: probing 1, 2, 4... rowids ahead, then bisecting back. `None` past the last rowid.
fn skip_bad_region(
    bad: i64,
    next_ge: &mut dyn FnMut(i64) -> Result<Option<i64>, ()>,
) -> Option<i64> {
    let mut bad = bad;
    let mut step: i64 = 1;
    let mut good = loop {
        let probe = bad.checked_add(step)?;
        if next_ge(probe).is_ok() {
            break probe;
        }
        bad = probe;
        step = step.saturating_mul(2);
    };
    while good - bad > 1 {
        let mid = bad + (good - bad) / 2;
        if next_ge(mid).is_ok() {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Some(good)
}

/// Strict column reads: a value of the wrong type is garbage from a damaged page.
pub(super) fn text(r: &Row<'_>, i: usize) -> rusqlite::Result<String> {
    match r.get_ref(i)? {
        ValueRef::Text(t) => std::str::from_utf8(t)
            .map(str::to_owned)
            .map_err(|e| rusqlite::Error::Utf8Error(i, e)),
        other => Err(wrong_type(i, other)),
    }
}

/// A text column that may be NULL.
pub(super) fn opt_text(r: &Row<'_>, i: usize) -> rusqlite::Result<Option<String>> {
    match r.get_ref(i)? {
        ValueRef::Null => Ok(None),
        _ => text(r, i).map(Some),
    }
}

/// An integer column.
pub(super) fn int(r: &Row<'_>, i: usize) -> rusqlite::Result<i64> {
    match r.get_ref(i)? {
        ValueRef::Integer(v) => Ok(v),
        other => Err(wrong_type(i, other)),
    }
}

fn blob(r: &Row<'_>, i: usize) -> rusqlite::Result<Vec<u8>> {
    match r.get_ref(i)? {
        ValueRef::Blob(b) => Ok(b.to_vec()),
        other => Err(wrong_type(i, other)),
    }
}

fn wrong_type(i: usize, v: ValueRef<'_>) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(i, "damaged".into(), v.data_type())
}

/// Why salvage could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum SalvageError {
    /// The path is not a regular file.
    #[error("{0}: not a file")]
    NotAFile(PathBuf),
    /// The output directory already holds a salvage.
    #[error("{0} already holds a salvage (index.json): give another --out, or remove it")]
    OutputUsed(PathBuf),
    /// Reading the file or writing the output failed.
    #[error("{path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SalvageError + '_ {
    move |source| SalvageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One exported message in `index.json` (no content: that is in `file`).
#[derive(Debug, Clone, Serialize)]
pub struct SalvagedMessage {
    /// Row id in the damaged store.
    pub row: i64,
    /// Feed name.
    pub feed: String,
    /// Its `seq` in the damaged store (never published if it was pending).
    pub seq: i64,
    /// Its record `id` in the damaged store.
    pub id: String,
    /// MSH-10 or equivalent, when known.
    pub control_id: Option<String>,
    /// When the appliance received it (RFC 3339 UTC).
    pub received_at: String,
    /// `pending`, `held` (both: never confirmed by the broker) or `unknown` (the delivery state
    /// could not be read: exported so that nothing undelivered is left behind).
    pub state: &'static str,
    /// `hl7v2`, `astm` or `lines`.
    pub format: String,
    /// Size when stored.
    pub size: i64,
    /// Bytes written (differs from `size` only if the store was damaged inside this row).
    pub bytes: usize,
    /// File holding the bytes exactly as received, relative to the output directory.
    pub file: String,
}

/// What `siterelay queue salvage` did.
#[derive(Debug, Clone, Serialize)]
pub struct SalvageReport {
    /// The damaged file (never modified).
    pub source: PathBuf,
    /// Where the messages and `index.json` were written.
    pub out_dir: PathBuf,
    /// When (RFC 3339 UTC).
    pub salvaged_at: String,
    /// Message rows read.
    pub rows_read: u64,
    /// Messages written out: never confirmed by the broker (or of unknown state).
    pub pending_exported: u64,
    /// Message rows read and left out: the broker had confirmed them.
    pub delivered_skipped: u64,
    /// Message rows found but unreadable.
    pub rows_unreadable: u64,
    /// Stretches of message rows lost to a bad page (how many rows each held is not known).
    pub regions_unreadable: u64,
    /// Undelivered messages the `pending` table names but whose row could not be read.
    pub pending_lost: u64,
    /// Whether the delivery state could be read whole (if not, messages of unknown state are
    /// exported too).
    pub state_complete: bool,
    /// The header was unusable and was rewritten (in the copy) before reading.
    pub header_repaired: bool,
    /// Everything was read: `rows_unreadable`, `regions_unreadable` and `pending_lost` are 0
    /// and the delivery state was complete.
    pub complete: bool,
    /// The exported messages.
    pub messages: Vec<SalvagedMessage>,
}

/// Removes the work copy however salvage ends.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Read every message that can still be read from `file` (a damaged store; never modified) and
/// write each undelivered one's bytes, exactly as received, into `out` (created 0700; files
/// 0600), with `index.json`. Fails only when it cannot run at all (not a file, output not
/// writable); what cannot be read is counted in the report.
pub fn salvage(file: &Path, out: &Path) -> Result<SalvageReport, SalvageError> {
    use std::os::unix::fs::DirBuilderExt;
    let meta = std::fs::metadata(file).map_err(io(file))?;
    if !meta.is_file() {
        return Err(SalvageError::NotAFile(file.to_path_buf()));
    }
    if out.join("index.json").exists() {
        return Err(SalvageError::OutputUsed(out.to_path_buf()));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .map_err(io(out))?;
    let work = out.join(format!(".salvage-copy-{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&work)
        .map_err(io(&work))?;
    let work = WorkDir(work);
    let copy = work.0.join("outbox.sqlite");
    std::fs::copy(file, &copy).map_err(io(file))?;
    let wal = sibling(file, "-wal");
    if wal.is_file() {
        std::fs::copy(&wal, sibling(&copy, "-wal")).map_err(io(&wal))?;
    }
    let mut header_repaired = false;
    let mut conn = open_damaged(&copy).ok();
    if conn.as_ref().is_none_or(|c| not_a_database(c)) {
        drop(conn.take());
        header_repaired = repair_header(&copy).is_ok();
        conn = open_damaged(&copy).ok();
    }
    let mut report = SalvageReport {
        source: file.to_path_buf(),
        out_dir: out.to_path_buf(),
        salvaged_at: crate::record::rfc3339_us(super::now_us()),
        rows_read: 0,
        pending_exported: 0,
        delivered_skipped: 0,
        rows_unreadable: 0,
        regions_unreadable: 0,
        pending_lost: 0,
        state_complete: false,
        header_repaired,
        complete: false,
        messages: Vec::new(),
    };
    match &conn {
        Some(c) => export(c, out, &mut report)?,
        None => report.regions_unreadable = 1,
    }
    report.complete = report.rows_unreadable == 0
        && report.regions_unreadable == 0
        && report.pending_lost == 0
        && report.state_complete;
    drop(conn);
    write_new(
        &out.join("index.json"),
        &serde_json::to_vec_pretty(&report).unwrap_or_default(),
    )?;
    Ok(report)
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn not_a_database(c: &Connection) -> bool {
    match c.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(_) => false,
        Err(e) => e.sqlite_error_code() == Some(ErrorCode::NotADatabase),
    }
}

/// Rewrite the first 24 bytes of the header (in the work copy) with what siterelay's stores
/// always have: the magic string, 4096-byte pages, WAL, no reserved bytes.
fn repair_header(copy: &Path) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::OpenOptions::new().write(true).open(copy)?;
    let mut h = Vec::with_capacity(24);
    h.extend_from_slice(b"SQLite format 3\0");
    h.extend_from_slice(&4096u16.to_be_bytes());
    h.extend_from_slice(&[2, 2, 0, 64, 32, 32]);
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&h)?;
    f.sync_all()
}

/// Read the delivery state, then every message, writing the undelivered ones out as they come.
fn export(c: &Connection, out: &Path, report: &mut SalvageReport) -> Result<(), SalvageError> {
    let mut pending = HashSet::new();
    let pending_scan = scan(c, "pending", "1", &mut |id, _| {
        pending.insert(id);
        Ok(())
    });
    let mut held = HashSet::new();
    let _ = scan(c, "held", "1", &mut |id, _| {
        held.insert(id);
        Ok(())
    });
    report.state_complete = pending_scan.complete();
    let mut seen_pending = 0u64;
    let mut names: BTreeMap<String, u32> = BTreeMap::new();
    let mut failure: Option<SalvageError> = None;
    let messages = scan(
        c,
        "messages",
        "feed, seq, record_id, control_id, received_at_us, format, size, raw",
        &mut |id, r| {
            let feed = text(r, 1)?;
            let seq = int(r, 2)?;
            let record_id = text(r, 3)?;
            let control_id = opt_text(r, 4)?;
            let received_at_us = int(r, 5)?;
            let format = text(r, 6)?;
            let size = int(r, 7)?;
            let raw = blob(r, 8)?;
            let state = if held.contains(&id) {
                "held"
            } else if pending.contains(&id) {
                "pending"
            } else if report.state_complete {
                report.delivered_skipped += 1;
                return Ok(());
            } else {
                "unknown"
            };
            if pending.contains(&id) {
                seen_pending += 1;
            }
            let file = file_name(&feed, seq, id, &format, &mut names);
            if failure.is_none()
                && let Err(e) = write_new(&out.join(&file), &raw)
            {
                failure = Some(e);
            }
            report.messages.push(SalvagedMessage {
                row: id,
                feed,
                seq,
                id: record_id,
                control_id,
                received_at: crate::record::rfc3339_us(received_at_us),
                state,
                format,
                size,
                bytes: raw.len(),
                file,
            });
            Ok(())
        },
    );
    if let Some(e) = failure {
        return Err(e);
    }
    report.rows_read = messages.read;
    report.rows_unreadable = messages.unreadable_rows;
    report.regions_unreadable = messages.unreadable_regions + u64::from(messages.table_unreadable);
    report.pending_exported = report.messages.len() as u64;
    report.pending_lost = (pending.len() as u64).saturating_sub(seen_pending);
    Ok(())
}

/// `<feed>-<seq>.hl7` (or `.txt` for device data); a feed name that is not a plain name (read
/// from a damaged page) becomes `feed`, and a name already used gets the row id.
fn file_name(
    feed: &str,
    seq: i64,
    row: i64,
    format: &str,
    used: &mut BTreeMap<String, u32>,
) -> String {
    let plain = !feed.is_empty()
        && feed.len() <= 64
        && feed
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let feed = if plain { feed } else { "feed" };
    let ext = if format == "hl7v2" { "hl7" } else { "txt" };
    let name = format!("{feed}-{seq}.{ext}");
    let n = used.entry(name.clone()).or_insert(0);
    *n += 1;
    if *n == 1 {
        name
    } else {
        format!("{feed}-{seq}-row{row}.{ext}")
    }
}

/// A new file, owner-only (it holds patient data), never over an existing one.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), SalvageError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::skip_bad_region;

    /// Rowids 10..=19 sit on a bad page: seeking into them fails, seeking past them works.
    #[test]
    fn skipping_a_bad_region_lands_on_the_first_rowid_after_it() {
        let mut probes = 0;
        let mut next_ge = |x: i64| {
            probes += 1;
            if (10..=19).contains(&x) {
                Err(())
            } else if x <= 40 {
                Ok(Some(x.max(20)))
            } else {
                Ok(None)
            }
        };
        assert_eq!(skip_bad_region(10, &mut next_ge), Some(20));
        assert!(probes < 20, "{probes} probes");
    }

    /// A region reaching past every rowid ends the scan; so does one at the top of the range.
    #[test]
    fn skipping_never_loops_and_gives_up_at_the_end_of_the_rowid_range() {
        let mut all_bad = |_x: i64| Err(());
        assert_eq!(skip_bad_region(1, &mut all_bad), None);
        assert_eq!(skip_bad_region(i64::MAX - 1, &mut all_bad), None);
    }
}
