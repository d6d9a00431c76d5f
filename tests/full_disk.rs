//! A full disk heals itself: the data directory on a real 24 MiB tmpfs, the broker down, MLLP
//! senders until the disk is full; then the broker comes back. Needs root to mount the tmpfs
//! (fails loudly without it unless `SITERELAY_SKIP_ROOT_TESTS=1`).

mod common;

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;
use siterelay::app::Daemon;
use siterelay_testkit::Tmpfs;

/// An ADT padded to about 48 KiB (a note segment), as a report with an attachment would be.
fn padded(id: &str) -> Vec<u8> {
    let mut m = adt(id);
    m.extend_from_slice(b"NTE|1||");
    m.extend(std::iter::repeat_n(b'X', 48 * 1024));
    m.push(b'\r');
    m
}

/// `siterelay status --json` against the running daemon (its status socket), checked against
/// the health schema.
fn status(config: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new(BIN)
        .args(["status", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let h: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    check_schema("health", &h);
    h
}

fn file_len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Broker down: `AA` until the disk is full, then `AR` (never a lost `AA`). Broker back: every
/// `AA`-answered message is delivered; then, without a restart, new messages get `AA` again
/// within seconds (before this change they were still refused 90 s later: delivered rows held
/// the space for `retain_delivered`, 7 days here), and the space is given back to the file
/// system (the database file shrinks, no free pages are left in it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_then_heals_itself_once_the_broker_takes_the_backlog() {
    let Some(fs) = Tmpfs::mount(24 << 20) else {
        return;
    };
    let env = Env::new();
    let mut broker = Broker::down(Kind::InProcess, &env);
    let text = env
        .config_text(broker.port, &[("adt", "127.0.0.1:0")], "")
        .replace(
            &format!("data_dir = \"{}\"", env.data_dir().display()),
            &format!("data_dir = \"{}\"", fs.path().display()),
        );
    assert!(text.contains(&fs.path().display().to_string()));
    let cfg_file = env.write_config("t.toml", &text);
    let cfg = siterelay::config::parse(&cfg_file, &text).unwrap();
    let d = Daemon::start(&cfg).await.unwrap();
    let db = fs.path().join("outbox.sqlite");
    let g = d.outbox().gauges();
    let mut c = connect(d.addr("adt").unwrap()).await;

    // Broker down: AA until the disk is full, then AR.
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..2000 {
        let id = format!("F{i}");
        let ack = c.send(&padded(&id), ACK_WAIT).await.unwrap();
        match ack.code.as_str() {
            "AA" => {
                assert_eq!(refused, 0, "{id}: AA after an AR");
                accepted.push(id);
            }
            "AR" => {
                assert!(ack.text.contains("store full"), "{}", ack.text);
                refused += 1;
                if refused == 5 {
                    break;
                }
            }
            other => panic!("{id}: {other} {}", ack.text),
        }
    }
    assert_eq!(refused, 5, "the disk never filled");
    assert!(g.space_short.load(Relaxed));
    assert_eq!(g.pending_count.load(Relaxed), accepted.len() as u64);
    let full_file = file_len(&db);
    let full_free = fs.free();
    let h = status(&cfg_file);
    assert_eq!(h["outbox"]["space_short"], true, "{h}");
    assert_eq!(h["outbox"]["refused_full"], 5);
    assert_eq!(h["feeds"][0]["acks"]["AR"], 5);

    // The broker comes back: everything acknowledged is delivered.
    broker.up(&env).await;
    let mut sub = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let got = sub.collect(accepted.len(), Duration::from_secs(120)).await;
    let ids: HashSet<String> = got
        .iter()
        .map(|(_, p, _)| json(p)["hl7"]["control_id"].as_str().unwrap().to_string())
        .collect();
    let expected: HashSet<String> = accepted.iter().cloned().collect();
    assert_eq!(
        ids, expected,
        "every AA-answered message delivered, nothing else"
    );
    assert!(
        wait_until(Duration::from_secs(30), || g.pending_count.load(Relaxed)
            == 0)
        .await,
        "delivery marks recorded on the full disk"
    );
    let delivered_at = Instant::now();

    // Without a restart, new messages get AA again within seconds.
    let mut n = 0;
    let healed_after = loop {
        let ack = c.send(&padded(&format!("N{n}")), ACK_WAIT).await.unwrap();
        if ack.code == "AA" {
            break delivered_at.elapsed();
        }
        assert!(
            delivered_at.elapsed() < Duration::from_secs(10),
            "still refused 10 s after everything was delivered: {}",
            ack.text
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(!g.space_short.load(Relaxed));
    assert!(
        g.pruned_early.load(Relaxed) > 0,
        "retention cut short, and counted"
    );
    assert!(
        fs.path().join("outbox.reserve").exists(),
        "reserve made again"
    );
    let h = status(&cfg_file);
    assert_eq!(h["outbox"]["space_short"], false, "{h}");
    assert!(h["outbox"]["pruned_early"].as_u64().unwrap() > 0, "{h}");
    assert!(h["outbox"]["retention_cut_at"].is_string(), "{h}");
    let sub_got = sub.collect(1, Duration::from_secs(20)).await;
    assert_eq!(sub_got.len(), 1, "the new message is delivered too");
    // Refused (AR) messages stay with their sender (MLLP senders resend); the row counts what
    // was acknowledged.
    let delivered = ids.len() + sub_got.len();
    let distinct: HashSet<String> = got
        .iter()
        .chain(sub_got.iter())
        .map(|(_, p, _)| json(p)["id"].as_str().unwrap().to_string())
        .collect();
    FaultRow {
        fault: "full disk (24 MiB tmpfs as data_dir, broker down, then back)",
        sent: accepted.len() + refused + n + 1,
        acked: accepted.len() + 1,
        delivered: distinct.len(),
        duplicated: got.len() + sub_got.len() - distinct.len(),
        lost: (accepted.len() + 1).saturating_sub(delivered),
        recovered: delivered == accepted.len() + 1 && healed_after < Duration::from_secs(10),
    }
    .print();

    // Space returned: fewer pages in the file, none left free in it, room on the disk.
    let freelist: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("PRAGMA freelist_count", [], |r| r.get(0))
        .unwrap();
    let now_file = file_len(&db);
    let wal = file_len(&fs.path().join("outbox.sqlite-wal"));
    eprintln!(
        "{} AA then AR on a 24 MiB disk; all delivered; AA again {:?} after the last delivery \
         ({} refused meanwhile); db file {} -> {} bytes, WAL {} bytes, freelist {}, disk free \
         {} -> {} bytes, pruned early {}",
        accepted.len(),
        healed_after,
        n,
        full_file,
        now_file,
        wal,
        freelist,
        full_free,
        fs.free(),
        g.pruned_early.load(Relaxed)
    );
    assert!(now_file < full_file, "{now_file} < {full_file}");
    assert_eq!(freelist, 0);
    assert!(fs.free() > 4 << 20);
    d.stop().await;
}
