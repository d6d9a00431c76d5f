//! A damaged store at start (truncated, a corrupt page, a garbage header): the real daemon
//! moves it aside, starts with a fresh store that carries on each feed's `seq`, answers `AA`,
//! and says so in health and `siterelay status`; `siterelay queue salvage` exports what the
//! damaged file still holds. A healthy store, also one left by a SIGKILL mid-write, is never
//! moved. Real SQLite files made by the outbox itself, the real binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use siterelay::outbox::{
    Format, NewMessage, Outbox, OutboxOptions, Reader, RejectedMessage, SourceKind, now_us,
};

const PAGE: usize = 4096;

fn opts() -> OutboxOptions {
    OutboxOptions {
        max_bytes: 1 << 30,
        quarantine_max_bytes: 1 << 26,
        retain_delivered: Duration::from_secs(3600),
        retain_rejected: Duration::from_secs(3600),
        dedup_keep: Duration::ZERO,
        secure_delete: true,
    }
}

/// A synthetic ADT (999-range NHS number) padded to about 3 KB with a Z-segment carrying a
/// marker that is found nowhere else in the file: one message per b-tree page, and the page
/// that holds it can be found by its marker.
fn message(control_id: &str) -> Vec<u8> {
    let mut m = adt(control_id);
    m.extend_from_slice(format!("ZPD|1|MARK-{control_id}-END|").as_bytes());
    m.resize(3000, b'x');
    m.push(b'\r');
    m
}

fn new_message(control_id: &str) -> NewMessage {
    NewMessage {
        feed: Arc::from("adt"),
        source_kind: SourceKind::Mllp,
        peer: Some("127.0.0.1:1".into()),
        peer_certificate: None,
        format: Format::Hl7v2,
        control_id: Some(control_id.into()),
        raw: message(control_id),
        received_at_us: now_us(),
        reprocessed: false,
        dedup: None,
        truncated_bytes: 0,
    }
}

/// What a store made by [`make_store`] holds.
struct Made {
    /// Control ids of the messages delivered (seq 1..=n).
    delivered: Vec<String>,
    /// Control ids of the pending ones, in seq order after them.
    pending: Vec<String>,
}

/// A store as a running appliance leaves it: `delivered` messages confirmed by the broker, then
/// `pending` ones never confirmed, one quarantined message, and three broker connections
/// (`bdseq` 0, 1, 2). Closed cleanly (everything checkpointed into the main file).
async fn make_store(path: &Path, delivered: usize, pending: usize) -> Made {
    let (ob, w) = Outbox::open(path, opts()).unwrap();
    let mut made = Made {
        delivered: Vec::new(),
        pending: Vec::new(),
    };
    let mut delivered_rows = Vec::new();
    for i in 0..delivered {
        let id = format!("D{i}");
        delivered_rows.push(ob.append(new_message(&id)).await.unwrap().row_id);
        made.delivered.push(id);
    }
    for i in 0..pending {
        let id = format!("P{i}");
        ob.append(new_message(&id)).await.unwrap();
        made.pending.push(id);
    }
    ob.mark_delivered(delivered_rows).await;
    let mut junk = b"NOT HL7 ".to_vec();
    junk.extend_from_slice(b"MARK-Q-END");
    junk.resize(3000, b'q');
    ob.quarantine(RejectedMessage {
        feed: Arc::from("adt"),
        source_kind: SourceKind::Mllp,
        peer: None,
        received_at_us: now_us(),
        error_code: 100,
        error_location: None,
        reason: "not HL7".into(),
        control_id: None,
        sending_application: None,
        sending_facility: None,
        message_type: None,
        raw: junk,
    })
    .await
    .unwrap();
    for _ in 0..3 {
        ob.increment("bdseq").await.unwrap();
    }
    ob.flush().await;
    drop(ob);
    w.join();
    assert!(!sibling(path, "-wal").exists(), "closed cleanly");
    made
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The page of the file holding `MARK-<control_id>-END`.
fn page_of(path: &Path, control_id: &str) -> usize {
    let bytes = std::fs::read(path).unwrap();
    let needle = format!("MARK-{control_id}-END");
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .unwrap_or_else(|| panic!("{needle} not in the file"));
    at / PAGE
}

/// Overwrite one whole page with garbage.
fn corrupt_page(path: &Path, page: usize) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start((page * PAGE) as u64)).unwrap();
    f.write_all(&[0x5a; PAGE]).unwrap();
    f.sync_all().unwrap();
}

fn truncate_to_half(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(len / 2 + 1000).unwrap();
}

fn garbage_header(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all(b"this is no database, just bytes").unwrap();
}

/// A config with one MLLP feed `adt` and the broker at `broker.port`: (config, listen, port).
fn config(env: &Env, broker: &Broker) -> (PathBuf, String, u16) {
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let cfg = env.write_config(
        "s.toml",
        &env.config_text(broker.port, &[("adt", &listen)], ""),
    );
    (cfg, listen, port)
}

fn store_path(env: &Env) -> PathBuf {
    env.data_dir().join("outbox.sqlite")
}

/// The directories under `data_dir/damaged/`.
fn damaged_dirs(env: &Env) -> Vec<PathBuf> {
    match std::fs::read_dir(env.data_dir().join("damaged")) {
        Ok(d) => d.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// `siterelay <args>`: (exit code, stdout).
fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The fresh store's messages (pending or delivered) and its last `seq`.
fn fresh_store(env: &Env) -> (u64, u64) {
    let stats = Reader::open(&store_path(env)).unwrap().stats().unwrap();
    (stats[0].pending + stats[0].delivered, stats[0].last_seq)
}

/// Start the daemon on a store damaged by `damage`, and check what a user sees: it listens and
/// answers `AA`, the file is in `damaged/` with its note, one loud log line, health lists it
/// (not salvaged), `siterelay status` exits 1 and names it. Returns the env, the moved file and
/// the new message's `seq`.
async fn daemon_starts_on_a_damaged_store(
    damage: impl FnOnce(&Path, &Made),
) -> (Env, PathBuf, u64, Made, Broker, Proc) {
    let env = Env::new();
    let made = make_store(&store_path(&env), 6, 4).await;
    damage(&store_path(&env), &made);
    let broker = Broker::start(Kind::InProcess, &env).await;
    let (cfg, listen, port) = config(&env, &broker);
    let p = Proc::start(&cfg, env.dir.path().join("run.log"));
    wait_listening(port).await;
    let mut c = connect(listen.parse().unwrap()).await;
    assert_eq!(
        c.send(&adt("NEW1"), ACK_WAIT).await.unwrap().code,
        "AA",
        "{}",
        p.log()
    );
    let dirs = damaged_dirs(&env);
    assert_eq!(dirs.len(), 1, "one damaged store moved aside: {dirs:?}");
    let moved = dirs[0].join("outbox.sqlite");
    assert!(moved.is_file(), "the damaged file is kept");
    assert!(dirs[0].join("damaged.json").is_file());
    let log = p.log();
    assert_eq!(
        log.matches("OUTBOX DAMAGED").count(),
        1,
        "one loud line:\n{log}"
    );
    assert!(log.contains(" ERROR "), "logged as an error:\n{log}");
    assert!(
        !log.contains("TEST^PATIENT") && !log.contains("9990000018"),
        "no patient data in the log"
    );
    let h = siterelay::status::query(&siterelay::status::socket_path(&env.data_dir()))
        .await
        .unwrap();
    let d = &h.outbox.damaged_stores;
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].path, moved.display().to_string());
    assert!(!d[0].salvaged);
    assert!(d[0].salvage_hint.contains("siterelay queue salvage"));
    check_schema("health", &serde_json::to_value(&h).unwrap());
    // Connected, nothing held: degraded only because of the damaged store.
    assert!(
        wait_until(Duration::from_secs(10), || {
            run(&["status", "--config", cfg.to_str().unwrap()])
                .1
                .contains("broker    connected")
        })
        .await
    );
    let (code, text) = run(&["status", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("1 damaged store(s) not salvaged") && text.contains("DAMAGED"),
        "{text}"
    );
    let (count, seq) = fresh_store(&env);
    assert_eq!(count, 1, "the fresh store holds the new message only");
    (env, moved, seq, made, broker, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_store_is_moved_aside_and_the_daemon_starts_fresh_above_every_old_seq() {
    let before_us = now_us() as u64;
    let (env, moved, seq, _made, _broker, _p) =
        daemon_starts_on_a_damaged_store(|p, _| truncate_to_half(p)).await;
    // The last pages are gone: the old seqs cannot all be read, so the feed carries on above
    // the time floor (µs), which is above any seq it ever used.
    assert!(seq > before_us, "seq {seq} jumps above the time floor");
    let note: serde_json::Value =
        serde_json::from_slice(&std::fs::read(moved.with_file_name("damaged.json")).unwrap())
            .unwrap();
    assert_eq!(note["seq_complete"], false, "{note}");
    let bdseq: i64 = Reader::open(&store_path(&env))
        .unwrap()
        .meta("bdseq")
        .unwrap()
        .unwrap()
        .parse()
        .unwrap();
    // `meta` sits in an early page, read whole: bdseq carries on exactly (three connections,
    // numbered 0, 1, 2; then this daemon's own).
    assert_eq!(note["bdseq"], 2, "{note}");
    assert!(bdseq > 2, "{bdseq}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_page_in_the_middle_is_moved_aside_and_salvage_clears_the_flag() {
    let (env, moved, seq, made, _broker, _p) =
        daemon_starts_on_a_damaged_store(|p, _| corrupt_page(p, page_of(p, "D2"))).await;
    // A message page is gone, so the numbers are not whole: above the time floor.
    assert!(seq > 1_000_000_000_000_000, "{seq}");
    // Salvage the moved file: every pending message comes back; the bad page is reported.
    let out = env.dir.path().join("salvage-out");
    let (code, text) = run(&[
        "queue",
        "salvage",
        moved.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "some rows unreadable: {text}");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    let exported: Vec<&str> = index["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["control_id"].as_str().unwrap())
        .collect();
    assert_eq!(exported, made.pending, "{index}");
    assert_eq!(index["pending_lost"], 0);
    // Now the damaged store is salvaged: status is healthy again (nothing else is wrong).
    let cfg = env.dir.path().join("s.toml");
    let (code, text) = run(&["status", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("salvaged; delete its directory"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_database_is_moved_aside_and_salvage_repairs_the_header_in_a_copy() {
    let (env, moved, _seq, made, _broker, _p) =
        daemon_starts_on_a_damaged_store(|p, _| garbage_header(p)).await;
    let before = std::fs::read(&moved).unwrap();
    let out = env.dir.path().join("salvage-out");
    let (code, text) = run(&[
        "queue",
        "salvage",
        moved.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(
        code, 0,
        "everything read once the header is repaired: {text}"
    );
    assert_eq!(
        std::fs::read(&moved).unwrap(),
        before,
        "the file is unchanged"
    );
    for id in &made.pending {
        let m = std::fs::read(out.join(format!(
            "adt-{}.hl7",
            7 + made.pending.iter().position(|p| p == id).unwrap()
        )))
        .unwrap();
        assert_eq!(m, message(id), "byte-identical");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seq_and_bdseq_carry_on_from_the_damaged_store_where_they_can_be_read() {
    // Damage only the quarantine's page: messages, floors and meta read whole.
    let (env, moved, seq, made, _broker, _p) =
        daemon_starts_on_a_damaged_store(|p, _| corrupt_page(p, page_of(p, "Q"))).await;
    let last = (made.delivered.len() + made.pending.len()) as u64;
    assert_eq!(
        seq,
        last + 1,
        "the feed carries on gap-free after the old store's last seq"
    );
    let note: serde_json::Value =
        serde_json::from_slice(&std::fs::read(moved.with_file_name("damaged.json")).unwrap())
            .unwrap();
    assert_eq!(note["seq_complete"], true, "{note}");
    assert_eq!(note["feeds"][0]["last_seq_read"], last);
    assert_eq!(note["feeds"][0]["next_seq"], last + 1);
    let bdseq: i64 = Reader::open(&store_path(&env))
        .unwrap()
        .meta("bdseq")
        .unwrap()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(note["bdseq"], 2, "{note}");
    assert!(
        bdseq > 2,
        "the birth sequence carried on past the old store's last (2): {bdseq}"
    );
}

/// The salvage CLI on its own: the damaged file by path, exit codes, byte-identical exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salvage_exports_every_pending_message_the_damage_spared_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    // A delivered message's page is bad: every pending message is still exported.
    let a = dir.path().join("a.sqlite");
    let made = make_store(&a, 6, 4).await;
    corrupt_page(&a, page_of(&a, "D3"));
    let before = std::fs::read(&a).unwrap();
    let out = dir.path().join("out-a");
    let (code, text) = run(&[
        "queue",
        "salvage",
        a.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "a row was unreadable: {text}");
    assert!(text.contains("4 undelivered exported"), "{text}");
    assert_eq!(std::fs::read(&a).unwrap(), before, "never modified");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["pending_exported"], 4);
    assert_eq!(index["pending_lost"], 0);
    assert_eq!(index["regions_unreadable"], 1, "{index}");
    for m in index["messages"].as_array().unwrap() {
        let id = m["control_id"].as_str().unwrap();
        assert_eq!(m["state"], "pending");
        assert_eq!(m["feed"], "adt");
        let bytes = std::fs::read(out.join(m["file"].as_str().unwrap())).unwrap();
        assert_eq!(bytes, message(id), "{id} byte-identical");
    }
    assert_eq!(made.pending.len(), 4);
    // A pending message's page is bad: that one is reported lost, the others exported.
    let b = dir.path().join("b.sqlite");
    make_store(&b, 6, 4).await;
    corrupt_page(&b, page_of(&b, "P1"));
    let out = dir.path().join("out-b");
    let (code, text) = run(&[
        "queue",
        "salvage",
        b.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{text}");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    let exported: Vec<&str> = index["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["control_id"].as_str().unwrap())
        .collect();
    assert_eq!(exported, ["P0", "P2", "P3"]);
    assert_eq!(index["pending_lost"], 1, "{index}");
    assert!(
        text.contains("1 undelivered message(s) named but not readable"),
        "{text}"
    );
    // A healthy store: everything read, exit 0.
    let c = dir.path().join("c.sqlite");
    make_store(&c, 2, 3).await;
    let (code, text) = run(&[
        "queue",
        "salvage",
        c.to_str().unwrap(),
        "--out",
        dir.path().join("out-c").to_str().unwrap(),
    ]);
    assert_eq!(
        (code, text.contains("3 undelivered exported")),
        (0, true),
        "{text}"
    );
    // Bad usage: not a file.
    let (code, _) = run(&["queue", "salvage", dir.path().to_str().unwrap()]);
    assert_eq!(code, 2);
    let (code, _) = run(&["queue", "salvage", "/nonexistent/outbox.sqlite"]);
    assert_eq!(code, 2);
}

/// Salvage never hangs or panics: a file with random bytes written over it in many places, and
/// a truncated one, are read as far as they can be and the command ends with 0 or 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salvage_finishes_on_a_file_overwritten_in_many_places_and_on_a_truncated_one() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.sqlite");
    make_store(&src, 30, 30).await;
    let len = std::fs::metadata(&src).unwrap().len();
    // A fixed-seed xorshift: the same damage on every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..8 {
        let f = dir.path().join(format!("r{round}.sqlite"));
        std::fs::copy(&src, &f).unwrap();
        let mut w = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        for _ in 0..(5 + round * 10) {
            let at = next() % len;
            let n = 1 + (next() % 600) as usize;
            let junk: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            w.seek(SeekFrom::Start(at)).unwrap();
            w.write_all(&junk).unwrap();
        }
        drop(w);
        let (code, text) = run(&[
            "queue",
            "salvage",
            f.to_str().unwrap(),
            "--out",
            dir.path().join(format!("out{round}")).to_str().unwrap(),
        ]);
        assert!(code == 0 || code == 1, "round {round}: exit {code}: {text}");
    }
    for keep in [len / 3, 100, 0] {
        let f = dir.path().join(format!("t{keep}.sqlite"));
        std::fs::copy(&src, &f).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(keep)
            .unwrap();
        let (code, text) = run(&[
            "queue",
            "salvage",
            f.to_str().unwrap(),
            "--out",
            dir.path().join(format!("out-t{keep}")).to_str().unwrap(),
        ]);
        assert!(
            code == 0 || code == 1,
            "truncated to {keep}: exit {code}: {text}"
        );
    }
}

/// A healthy store is never moved: not after a clean stop, and not after a SIGKILL in the
/// middle of writing (SQLite's WAL makes that an ordinary restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_left_by_a_sigkill_mid_write_is_healthy_and_kept() {
    let env = Env::new();
    let broker = Broker::down(Kind::InProcess, &env);
    let (cfg, listen, port) = config(&env, &broker);
    let mut p = Proc::start(&cfg, env.dir.path().join("run1.log"));
    wait_listening(port).await;
    // Four senders keep the writer busy; the daemon is killed while they send.
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut senders = Vec::new();
    for s in 0..4 {
        let acked = acked.clone();
        let addr: std::net::SocketAddr = listen.parse().unwrap();
        senders.push(tokio::spawn(async move {
            let mut c = connect(addr).await;
            for i in 0.. {
                match c.send(&message(&format!("S{s}N{i}")), ACK_WAIT).await {
                    Ok(a) if a.code == "AA" => {
                        acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    _ => break,
                }
            }
        }));
    }
    assert!(
        wait_until(Duration::from_secs(10), || {
            acked.load(std::sync::atomic::Ordering::SeqCst) >= 200
        })
        .await
    );
    p.kill9();
    for s in senders {
        let _ = s.await;
    }
    let acked = acked.load(std::sync::atomic::Ordering::SeqCst);
    let path = store_path(&env);
    assert!(
        sibling(&path, "-wal").exists(),
        "killed with its WAL in place"
    );
    assert_eq!(
        siterelay::outbox::damage::check(&path).unwrap(),
        siterelay::outbox::damage::Verdict::Healthy
    );
    let p = Proc::start(&cfg, env.dir.path().join("run2.log"));
    wait_listening(port).await;
    let mut c = connect(listen.parse().unwrap()).await;
    assert_eq!(c.send(&adt("AFTER"), ACK_WAIT).await.unwrap().code, "AA");
    assert!(damaged_dirs(&env).is_empty(), "nothing moved aside");
    assert!(!p.log().contains("OUTBOX DAMAGED"), "{}", p.log());
    let stats = Reader::open(&path).unwrap().stats().unwrap();
    assert!(
        stats[0].pending > acked,
        "every ACKed message is still there ({} pending, {acked} acked)",
        stats[0].pending
    );
    let h = siterelay::status::query(&siterelay::status::socket_path(&env.data_dir()))
        .await
        .unwrap();
    assert!(h.outbox.damaged_stores.is_empty());
}

/// Under systemd, the check and the moving aside extend the start timeout (a large store on an
/// SD card takes a while to read), before `READY=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_start_timeout_is_extended_while_the_store_is_checked() {
    let env = Env::new();
    make_store(&store_path(&env), 2, 2).await;
    garbage_header(&store_path(&env));
    let sock_path = env.dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let broker = Broker::down(Kind::InProcess, &env);
    let (cfg, _listen, port) = config(&env, &broker);
    let p = Proc::start_with_env(
        &cfg,
        env.dir.path().join("run.log"),
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let mut said = Vec::new();
    let mut buf = [0u8; 4096];
    while !said.iter().any(|m: &String| m.contains("READY=1")) {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{e}: {said:?}\n{}", p.log()));
        said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let extend = said
        .iter()
        .position(|m| m.contains("EXTEND_TIMEOUT_USEC=30000000"));
    let ready = said.iter().position(|m| m.contains("READY=1"));
    assert!(extend.is_some() && extend < ready, "{said:?}");
    wait_listening(port).await;
    assert_eq!(damaged_dirs(&env).len(), 1);
}
