//! Delivery state in `messages` (schema 3: `state`, `delivered_at_us`, two partial indexes)
//! against delivery state apart (schema 5: `pending(id, size)` and the `delivered` log): what
//! the sink's reads cost, and what recording PUBACKs writes.
//!
//! ```text
//! cargo run --release --example state_bench -- [--delivered 200000] [--pending 50000] [--bytes 4000]
//! ```
//!
//! Both files are built the same way (same rows, same pragmas as the outbox); the schema-5
//! file is then read through the outbox's own [`Reader`], the schema-3 one with the queries the
//! reader used before. Printed: the sink's full pass over the pending rows (512 per query, as
//! the sink fetches), the oldest-pending query (health), and marking every pending row
//! delivered in groups of 256 (as the sink hands marks over), with the WAL bytes written.

use std::path::Path;
use std::time::Instant;

use rusqlite::{Connection, params};
use siterelay::outbox::Reader;

const OLD: &str = "
CREATE TABLE messages (id INTEGER PRIMARY KEY, record_id TEXT NOT NULL, feed TEXT NOT NULL,
  seq INTEGER NOT NULL, received_at_us INTEGER NOT NULL, source_kind TEXT NOT NULL, peer TEXT,
  format TEXT NOT NULL, control_id TEXT, size INTEGER NOT NULL, raw BLOB NOT NULL,
  state INTEGER NOT NULL DEFAULT 0, delivered_at_us INTEGER,
  reprocessed INTEGER NOT NULL DEFAULT 0, control_id_reused INTEGER NOT NULL DEFAULT 0);
CREATE INDEX messages_pending ON messages(id) WHERE state = 0;
CREATE INDEX messages_delivered ON messages(delivered_at_us) WHERE state = 1;
";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn wal_frames(c: &Connection) -> i64 {
    c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
        .unwrap()
}

fn fill(c: &mut Connection, new: bool, delivered: usize, pending: usize, bytes: usize) {
    let raw = vec![b'x'; bytes];
    let tx = c.transaction().unwrap();
    {
        let mut ins = tx
            .prepare(
                "INSERT INTO messages (id, record_id, feed, seq, received_at_us, source_kind, \
                 peer, format, control_id, size, raw) \
                 VALUES (?1, 'r', 'adt', ?1, ?1, 'mllp', 'p', 'hl7v2', 'c', ?2, ?3)",
            )
            .unwrap();
        let mut pend = tx
            .prepare("INSERT INTO pending (id, size) VALUES (?1, ?2)")
            .ok();
        let mut del = tx
            .prepare("INSERT INTO delivered (id, delivered_at_us) VALUES (?1, ?1)")
            .ok();
        for id in 1..=(delivered + pending) as i64 {
            ins.execute(params![id, bytes as i64, raw]).unwrap();
            let is_delivered = id as usize <= delivered;
            if new {
                if is_delivered {
                    del.as_mut().unwrap().execute(params![id]).unwrap();
                } else {
                    pend.as_mut()
                        .unwrap()
                        .execute(params![id, bytes as i64])
                        .unwrap();
                }
            } else if is_delivered {
                tx.execute(
                    "UPDATE messages SET state = 1, delivered_at_us = ?1 WHERE id = ?1",
                    params![id],
                )
                .unwrap();
            }
        }
    }
    tx.commit().unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
}

fn open(path: &Path, new: bool) -> Connection {
    let _ = std::fs::remove_file(path);
    if new {
        // The outbox makes its own file.
        let (ob, w) = siterelay::outbox::Outbox::open(
            path,
            siterelay::outbox::OutboxOptions {
                max_bytes: u64::MAX / 2,
                quarantine_max_bytes: 1 << 30,
                retain_delivered: std::time::Duration::from_secs(3600),
                retain_rejected: std::time::Duration::from_secs(3600),
                dedup_keep: std::time::Duration::ZERO,
                secure_delete: true,
            },
        )
        .unwrap();
        drop(ob);
        w.join();
    }
    let c = Connection::open(path).unwrap();
    if !new {
        c.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL;")
            .unwrap();
        c.execute_batch(OLD).unwrap();
    }
    c.execute_batch("PRAGMA synchronous = FULL;").unwrap();
    c
}

fn main() {
    let delivered = arg("--delivered", 200_000);
    let pending = arg("--pending", 50_000);
    let bytes = arg("--bytes", 4000);
    let dir = tempfile::tempdir_in("target").unwrap();
    println!(
        "{delivered} delivered + {pending} pending rows of {bytes} bytes; times are the best of 3"
    );
    for new in [false, true] {
        let path = dir.path().join(if new { "v5.sqlite" } else { "v3.sqlite" });
        let mut c = open(&path, new);
        fill(&mut c, new, delivered, pending, bytes);
        let reader = new.then(|| Reader::open(&path).unwrap());
        let old_read = |after: i64| -> Vec<i64> {
            c.prepare_cached(
                "SELECT id, record_id, feed, seq, received_at_us, source_kind, peer, format, raw, \
                 reprocessed, control_id_reused FROM messages WHERE state = 0 AND id > ?1 \
                 ORDER BY id LIMIT ?2",
            )
            .unwrap()
            .query_map(params![after, 512], |r| {
                // Every column, as the reader's row mapping takes them.
                let _: (String, String, i64, i64, String, Option<String>, String) = (
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                );
                let _: (Vec<u8>, i64, i64) = (r.get(8)?, r.get(9)?, r.get(10)?);
                r.get(0)
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
        };
        let mut best_pass = f64::MAX;
        let mut best_oldest = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let (mut cursor, mut n) = (0i64, 0usize);
            loop {
                let ids: Vec<i64> = match &reader {
                    Some(r) => r
                        .pending_after(cursor, 512, u64::MAX)
                        .unwrap()
                        .iter()
                        .map(|p| p.row_id)
                        .collect(),
                    None => old_read(cursor),
                };
                let Some(&last) = ids.last() else { break };
                cursor = last;
                n += ids.len();
            }
            assert_eq!(n, pending);
            best_pass = best_pass.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for _ in 0..100 {
                let oldest: Option<i64> = match &reader {
                    Some(r) => r.oldest_pending_us().unwrap(),
                    None => c
                        .query_row(
                            "SELECT received_at_us FROM messages WHERE state = 0 ORDER BY id LIMIT 1",
                            [],
                            |r| r.get(0),
                        )
                        .ok(),
                };
                assert!(oldest.is_some());
            }
            best_oldest = best_oldest.min(t.elapsed().as_secs_f64() / 100.0);
        }
        // Mark everything pending delivered, 256 per transaction, with no checkpoint in
        // between: the WAL then holds every page the marks wrote.
        c.execute_batch("PRAGMA wal_autocheckpoint = 0;").unwrap();
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        let t = Instant::now();
        let first = delivered as i64 + 1;
        let last = (delivered + pending) as i64;
        let mut id = first;
        let mut commits = 0;
        while id <= last {
            let tx = c.transaction().unwrap();
            for i in id..(id + 256).min(last + 1) {
                if new {
                    let size: i64 = tx
                        .query_row(
                            "DELETE FROM pending WHERE id = ?1 RETURNING size",
                            [i],
                            |r| r.get(0),
                        )
                        .unwrap();
                    assert_eq!(size, bytes as i64);
                    tx.execute(
                        "INSERT INTO delivered (id, delivered_at_us) VALUES (?1, ?1)",
                        [i],
                    )
                    .unwrap();
                } else {
                    tx.query_row(
                        "UPDATE messages SET state = 1, delivered_at_us = ?1 \
                         WHERE id = ?1 AND state = 0 RETURNING size",
                        [i],
                        |r| r.get::<_, i64>(0),
                    )
                    .unwrap();
                }
            }
            tx.commit().unwrap();
            commits += 1;
            id += 256;
        }
        let mark_secs = t.elapsed().as_secs_f64();
        let frames = wal_frames(&c);
        let page: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        println!(
            "schema {}: sink pass over {pending} pending {:.1} ms ({:.1} us per 512-row fetch), \
             oldest pending {:.1} us; marking {pending} delivered in {commits} commits: {:.2} s, \
             {frames} WAL pages ({:.1} MiB, {:.0} bytes per mark)",
            if new { 5 } else { 3 },
            best_pass * 1e3,
            best_pass * 1e6 / (pending as f64 / 512.0),
            best_oldest * 1e6,
            mark_secs,
            (frames * page) as f64 / (1 << 20) as f64,
            (frames * page) as f64 / pending as f64,
        );
    }
}
