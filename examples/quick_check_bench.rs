//! What the start-up damage check costs: `PRAGMA quick_check` on a store of N messages,
//! against opening the same store (which already reads every row once).
//!
//! ```text
//! cargo run --release --example quick_check_bench -- [--rows 100000] [--bytes 2000]
//! ```
//!
//! The store is made by the outbox itself (schema, pragmas), then filled with `rows` pending
//! messages of `bytes` bytes in one transaction, and closed. Printed: the file size, the check
//! ([`siterelay::outbox::damage::check`]) and `Outbox::open` (to the writer answering), each
//! run twice (the second with the file in the page cache). Drop the page cache between runs
//! (`echo 3 > /proc/sys/vm/drop_caches`, as root) for the cold figure on an SD card.

use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use siterelay::outbox::{Outbox, OutboxOptions, damage};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn opts() -> OutboxOptions {
    OutboxOptions {
        max_bytes: 64 << 30,
        quarantine_max_bytes: 1 << 30,
        retain_delivered: Duration::from_secs(3600),
        retain_rejected: Duration::from_secs(3600),
        dedup_keep: Duration::ZERO,
        secure_delete: true,
    }
}

#[tokio::main]
async fn main() {
    let rows = arg("--rows", 100_000);
    let bytes = arg("--bytes", 2000);
    let dir = tempfile_dir();
    let path = dir.join("outbox.sqlite");
    {
        let (ob, w) = Outbox::open(&path, opts()).unwrap();
        drop(ob);
        w.join();
    }
    let mut c = Connection::open(&path).unwrap();
    c.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF;")
        .unwrap();
    let tx = c.transaction().unwrap();
    let raw = vec![b'x'; bytes];
    for i in 1..=rows as i64 {
        tx.execute(
            "INSERT INTO messages (id, record_id, feed, seq, received_at_us, source_kind, format, \
             control_id, size, raw) VALUES (?1, ?2, 'adt', ?1, ?1, 'mllp', 'hl7v2', ?2, ?3, ?4)",
            params![i, format!("r{i}"), bytes as i64, raw],
        )
        .unwrap();
        tx.execute(
            "INSERT INTO pending (id, size) VALUES (?1, ?2)",
            params![i, bytes as i64],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
    drop(c);
    let size = std::fs::metadata(&path).unwrap().len();
    println!(
        "{rows} rows of {bytes} bytes: file {:.1} MiB",
        size as f64 / 1048576.0
    );
    for run in 1..=2 {
        let t = Instant::now();
        let v = damage::check(&path).unwrap();
        let check = t.elapsed();
        assert_eq!(v, damage::Verdict::Healthy);
        let t = Instant::now();
        let (ob, w) = Outbox::open(&path, opts()).unwrap();
        ob.flush().await;
        let open = t.elapsed();
        drop(ob);
        w.join();
        println!(
            "run {run}: quick_check {:.0} ms, Outbox::open {:.0} ms",
            check.as_secs_f64() * 1e3,
            open.as_secs_f64() * 1e3
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("siterelay-qc-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
