//! Messages answered AE are kept in quarantine, not forwarded, optionally announced without
//! content, and can be retried after a configuration change: the real binary, a real broker.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// An ADT whose patient name has a Latin-1 byte but whose MSH-18 is empty: valid under a
/// feed default of 8859/1, invalid under ASCII.
fn latin1_adt(id: &str) -> Vec<u8> {
    let mut m = adt(id);
    let at = m.windows(7).position(|w| w == b"PATIENT").unwrap();
    m[at + 1] = 0xC9; // 'É' in ISO 8859-1
    m
}

fn rejected(cfg: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["queue", "rejected"])
        .args(args)
        .arg("--config")
        .arg(cfg)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_messages_are_quarantined_announced_without_content_and_retried_after_a_fix() {
    let env = Env::new();
    let broker = Broker::start(Kind::InProcess, &env).await;
    let mut records = broker.subscribe(&env, "siterelay/test-box/records/#").await;
    let mut rejects = broker.subscribe(&env, "siterelay/test-box/rejects/#").await;
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let base = env.config_text(broker.port, &[], "")
        + "\n[records]\npublish_rejects = true\n"
        + &format!("\n[[mllp]]\nname = \"adt\"\nlisten = \"{listen}\"\n");
    let strict = base.clone() + "default_charset = \"ASCII\"\n";
    let cfg = env.write_config("s.toml", &strict);
    let mut p = Proc::start(&cfg, env.dir.path().join("run1.log"));
    wait_listening(port).await;

    let mut c = connect(listen.parse().unwrap()).await;
    let ack = c.send(&latin1_adt("Q1"), ACK_WAIT).await.unwrap();
    assert_eq!((ack.code.as_str(), ack.control_id.as_str()), ("AE", "Q1"));
    let ack = c.send(b"this is not HL7 at all", ACK_WAIT).await.unwrap();
    assert_eq!(ack.code, "AE");
    drop(c);

    // Kept, with the error code and location; never forwarded as a record.
    let (ok, out) = rejected(&cfg, &["--json"]);
    assert!(ok, "{out}");
    let list: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 2, "{out}");
    assert_eq!(
        (
            list[0]["error_code"].as_u64(),
            list[0]["error_location"].as_str()
        ),
        (Some(102), Some("MSH-18"))
    );
    assert_eq!(list[0]["control_id"], "Q1");
    assert_eq!(list[1]["error_code"], 100);
    assert!(
        records.recv(Duration::from_millis(500)).await.is_none(),
        "nothing forwarded"
    );

    // Announced with metadata only.
    let notices = rejects.collect(2, Duration::from_secs(10)).await;
    assert_eq!(notices.len(), 2);
    let (topic, payload, _) = &notices[0];
    assert_eq!(topic, "siterelay/test-box/rejects/adt");
    let text = String::from_utf8_lossy(payload);
    let n: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(n["schema"], "siterelay.reject.v1");
    assert_eq!(n["error_code"], 102);
    assert_eq!(n["message_type"], "ADT^A01");
    assert_eq!(n["sending_application"], "PAS");
    assert_eq!(n["quarantine_id"], list[0]["id"]);
    for secret in ["9990000018", "TEST^", "PATIENT", "Q1"] {
        assert!(
            !text.contains(secret),
            "reject notice carries no message content: {text}"
        );
    }

    // Export gives the bytes exactly as received.
    let out_file = env.dir.path().join("q1.hl7");
    let (ok, _) = rejected(
        &cfg,
        &[
            "export",
            &list[0]["id"].to_string(),
            "--out",
            out_file.to_str().unwrap(),
        ],
    );
    assert!(ok);
    assert_eq!(std::fs::read(&out_file).unwrap(), latin1_adt("Q1"));

    // Fix the configuration (the feed really sends ISO 8859-1), restart, retry everything.
    assert!(p.sigterm().unwrap().success());
    let fixed = base + "default_charset = \"8859/1\"\n";
    std::fs::write(&cfg, fixed).unwrap();
    let _p = Proc::start(&cfg, env.dir.path().join("run2.log"));
    wait_listening(port).await;
    let (ok, out) = rejected(&cfg, &["retry", "--all", "--json"]);
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results[0]["stored"], true, "{out}");
    assert_eq!(results[1]["stored"], false, "still not HL7: {out}");

    let (_, payload, _) = records
        .recv(Duration::from_secs(10))
        .await
        .expect("the retried message is forwarded");
    let r = json(&payload);
    assert_eq!(r["reprocessed"], true);
    assert_eq!(r["seq"], 1);
    assert_eq!(r["hl7"]["control_id"], "Q1");
    assert_eq!(r["charset"], "8859/1");
    // The retry went through the feed's receive stage like any arrival: counted in health.
    let out = Command::new(BIN)
        .args(["status", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let h: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(h["feeds"][0]["name"], "adt");
    assert_eq!(h["feeds"][0]["acks"]["AA"], 1, "{h}");
    assert!(
        r["raw"].as_str().unwrap().contains("PÉTIENT")
            || r["raw"].as_str().unwrap().contains("\u{c9}")
    );

    let (_, out) = rejected(&cfg, &["--json"]);
    let left: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        left.len(),
        1,
        "only the non-HL7 message stays quarantined: {out}"
    );

    // Without --json, retry answers in sentences, and a retry that stores nothing fails.
    let (ok, out) = rejected(&cfg, &["retry", "--all"]);
    assert!(!ok, "nothing passed, so the exit is non-zero: {out}");
    assert!(
        out.contains("still fails and stays in quarantine")
            && out.contains("0 of 1 quarantined message(s) stored; nothing changed."),
        "{out}"
    );
    assert!(
        !out.trim_start().starts_with('{'),
        "no JSON by default: {out}"
    );
    let (ok, out) = rejected(&cfg, &["retry", "999999"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("Nothing retried: no such quarantined message"),
        "{out}"
    );
}

fn acks(d: &siterelay::app::Daemon) -> (u64, u64, u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = d.telemetry().feed("adt");
    (
        c.ack_aa.load(Relaxed),
        c.ack_ae.load(Relaxed),
        c.ack_ar.load(Relaxed),
        c.quarantined.load(Relaxed),
    )
}

/// `AE` tells the sender to drop the message, so it goes out only once the quarantine entry is
/// committed. A quarantine that fails (an injected fault: a trigger refusing the insert) is
/// answered `AR` instead, with or without a usable MSH, so the sender keeps the message; once
/// the fault is gone the same messages get `AE` and are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_that_fails_is_answered_ar_so_the_sender_keeps_the_message() {
    let env = Env::new();
    let broker = Broker::down(Kind::InProcess, &env);
    let text = env.config_text(broker.port, &[("adt", "127.0.0.1:0")], "")
        + "default_charset = \"ASCII\"\n";
    let cfg = siterelay::config::parse(std::path::Path::new("t.toml"), &text).unwrap();
    let d = siterelay::app::Daemon::start(&cfg).await.unwrap();
    let db = rusqlite::Connection::open(env.data_dir().join("outbox.sqlite")).unwrap();
    db.execute_batch(
        "CREATE TRIGGER no_quarantine BEFORE INSERT ON rejected \
         BEGIN SELECT RAISE(ABORT, 'injected'); END;",
    )
    .unwrap();
    let mut c = connect(d.addr("adt").unwrap()).await;
    let ack = c.send(&latin1_adt("F1"), ACK_WAIT).await.unwrap();
    assert_eq!((ack.code.as_str(), ack.control_id.as_str()), ("AR", "F1"));
    assert!(ack.text.contains("store failure"), "{}", ack.text);
    let ack = c.send(b"not HL7 at all", ACK_WAIT).await.unwrap();
    assert_eq!(ack.code, "AR");
    assert_eq!(acks(&d), (0, 0, 2, 0), "counted as AR, not AE");
    assert!(
        d.outbox()
            .reader()
            .unwrap()
            .quarantined(None)
            .unwrap()
            .is_empty()
    );

    db.execute_batch("DROP TRIGGER no_quarantine").unwrap();
    assert_eq!(
        c.send(&latin1_adt("F1"), ACK_WAIT).await.unwrap().code,
        "AE"
    );
    assert_eq!(
        c.send(b"not HL7 at all", ACK_WAIT).await.unwrap().code,
        "AE"
    );
    assert_eq!(acks(&d), (0, 2, 2, 2));
    assert_eq!(
        d.outbox()
            .reader()
            .unwrap()
            .quarantined(None)
            .unwrap()
            .len(),
        2
    );
    d.stop().await;
}

/// The case: 40 junk frames of 1 MiB from one peer with `max_bytes = "8 MiB"` grew the
/// data directory to 44 MiB. Now only the first 4 KiB of a frame that is not HL7 at all is
/// kept, quarantine has its own budget inside the cap (a tenth: 819 KiB here) and beyond it a
/// would-be `AE` is answered `AR`; the data directory stays under the cap and `store_bytes`
/// says what is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_and_quarantine_floods_stay_within_the_quarantine_budget_and_the_cap() {
    use std::sync::atomic::Ordering::Relaxed;
    let env = Env::new();
    let broker = Broker::down(Kind::InProcess, &env);
    let text = env.config_text(broker.port, &[("adt", "127.0.0.1:0")], "")
        + "default_charset = \"ASCII\"\n"
        + "\n[store]\nmax_bytes = \"8 MiB\"\n";
    let cfg = siterelay::config::parse(std::path::Path::new("t.toml"), &text).unwrap();
    let d = siterelay::app::Daemon::start(&cfg).await.unwrap();
    let mut c = connect(d.addr("adt").unwrap()).await;
    let junk = vec![b'J'; 1 << 20];
    for _ in 0..40 {
        assert_eq!(c.send(&junk, ACK_WAIT).await.unwrap().code, "AE");
    }
    let g = d.outbox().gauges();
    assert_eq!(g.quarantine_bytes.load(Relaxed), 40 * 4096);
    let kept = d.outbox().reader().unwrap().quarantined(None).unwrap();
    assert!(kept.iter().all(|q| q.truncated && q.size == 1 << 20));
    // HL7 that is rejected is kept whole, up to the budget.
    let mut big = latin1_adt("BIG");
    big.extend(std::iter::repeat_n(b'X', 300 * 1024));
    big.push(b'\r');
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(c.send(&big, ACK_WAIT).await.unwrap().code);
    }
    assert_eq!(codes, ["AE", "AE", "AR", "AR"]);
    let dir_bytes: u64 = std::fs::read_dir(env.data_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        // The space reserve is room kept free for the store, not its data.
        .filter(|e| e.file_name() != "outbox.reserve")
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    let store = g.store_bytes.load(Relaxed);
    eprintln!(
        "quarantine {} B, store_bytes {store} B, data directory {dir_bytes} B (without the reserve)",
        g.quarantine_bytes.load(Relaxed)
    );
    assert!(store <= 8 << 20, "{store}");
    assert!(dir_bytes <= 8 << 20, "{dir_bytes}");
    d.stop().await;
}

/// A sender's bytes are shown, not obeyed: `queue rejected show` prints escape sequences as
/// `\x1b...` (the terminal is not retitled, cleared or recoloured); `--raw` prints them as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_rejected_show_escapes_a_senders_escape_sequences_unless_raw() {
    let env = Env::new();
    let port = siterelay_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let text = env.config_text(siterelay_testkit::free_port(), &[], "")
        + &format!("\n[[mllp]]\nname = \"adt\"\nlisten = \"{listen}\"\n");
    let cfg = env.write_config("s.toml", &text);
    let _p = Proc::start(&cfg, env.dir.path().join("run.log"));
    wait_listening(port).await;
    let hostile = b"\x1b]0;owned\x07\x1b[2J\xc2\x9b31mnot HL7\x1b[8m";
    let mut c = connect(listen.parse().unwrap()).await;
    assert_eq!(c.send(hostile, ACK_WAIT).await.unwrap().code, "AE");
    drop(c);
    let (_, out) = rejected(&cfg, &["--json"]);
    let id = serde_json::from_str::<Vec<Value>>(&out).unwrap()[0]["id"].to_string();

    for json in [false, true] {
        let mut args = vec!["show", id.as_str()];
        if json {
            args.insert(0, "--json");
        }
        let (ok, shown) = rejected(&cfg, &args);
        assert!(ok, "{shown}");
        assert!(
            !shown.contains('\u{1b}') && !shown.contains('\u{7}') && !shown.contains('\u{9b}'),
            "no control character reaches the terminal: {shown:?}"
        );
        assert!(shown.contains("not HL7"), "{shown}");
        if json {
            let v: Value = serde_json::from_str(&shown).unwrap();
            assert_eq!(
                v["raw"].as_str(),
                Some(&*String::from_utf8_lossy(hostile)),
                "still the same JSON"
            );
        } else {
            assert!(
                shown.contains("\\x1b]0;owned\\x07\\x1b[2J\\x9b31m"),
                "{shown}"
            );
        }
    }
    let (ok, shown) = rejected(&cfg, &["show", &id, "--raw"]);
    assert!(ok);
    assert!(
        shown.contains("\u{1b}]0;owned\u{7}\u{1b}[2J"),
        "--raw prints the bytes as sent"
    );
}
